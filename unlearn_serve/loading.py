"""Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

Shared by the trainers and the server. Every failure a user can cause (missing path, no CUDA for
bitsandbytes, missing optional package, unknown dtype) is a `ModelLoadError` with one clear line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from unlearn_serve.errors import ModelLoadError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
QUANTIZATIONS = ("none", "4bit", "8bit")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is CUDA when available, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r} ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is available")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a CUDA GPU that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_path(model: str) -> bool:
    # A hub id is "name" or "org/name"; anything with more structure is meant as a local path.
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _quantization_config(quantization: str, device: torch.device, dtype: torch.dtype):
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r}; choose {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    if device.type != "cuda":
        raise ModelLoadError(
            f"--quantization {quantization}: bitsandbytes 4/8-bit quantization needs a CUDA GPU (device is {device})"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"--quantization {quantization} needs bitsandbytes: pip install 'unlearn-serve[quant]'"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model_and_tokenizer(
    model: str | Path,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    quantization: str = "none",
    device_map: str | None = None,
):
    """(model in eval mode on `device`, tokenizer with a pad token) for a hub id or local directory.

    `gguf_file` names a .gguf file inside `model` (a directory or hub repo), dequantized on load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(model)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    quant = _quantization_config(quantization, target, torch_dtype)

    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"{name}: is a file; pass the model directory (and --gguf-file for a .gguf)")
        name = str(local)
    elif _looks_like_path(name):
        raise ModelLoadError(f"{name}: no such model directory")
    if gguf_file is not None:
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError("loading a GGUF file needs the gguf package: pip install 'unlearn-serve[gguf]'")
        if local.is_dir() and not (local / gguf_file).is_file():
            raise ModelLoadError(f"{local / gguf_file}: no such GGUF file")

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    # No Hub kernels: transformers (5.2x, `kernels` installed) swaps layers for kernels fetched from the Hub when the
    # model is on a GPU (on load with a device map, on `.train()` otherwise). Offline that fails ("… not available in
    # the local cache", seen on a GPU host: train-uld stopped there); online it runs downloaded code in place of the
    # modules the engine and the trainers hook (attention, LoRA, experts).
    model_extra = {**extra, "use_kernels": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **extra)
        if device_map is not None:  # accelerate shards the model over the host's GPUs
            loaded = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, quantization_config=quant, device_map=device_map, **model_extra
            )
        elif quant is not None:
            loaded = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, quantization_config=quant, device_map={"": target.index or 0}, **model_extra
            )
        else:
            loaded = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **model_extra).to(target)
    except Exception as exc:  # hub, config, weights and OOM errors all come back as one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "" if local.exists() else " (no such local directory; tried the Hugging Face Hub)"
        raise ModelLoadError(f"cannot load model {name!r}{where}: {first_line}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded.eval()
    return loaded, tokenizer
