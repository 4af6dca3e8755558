"""The unlearning artifact format shared by the trainers (`training/`) and the server (`server/`).

An artifact is a directory:
  unlearning.json             manifest (method, format version, base fingerprint, defaults, details, training)
  adapter_model.safetensors   ULD: the assistant's LoRA weights (peft layout, with adapter_config.json)
  expert_patch.safetensors    UOE: one expert's weights plus the router weight

No pickles. Writes go through `atomic_artifact_dir`: a temp dir in the same parent, renamed into
place only when complete, so a crashed run leaves an earlier artifact intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearn_serve.errors import ArtifactError  # noqa: F401  (re-exported)

FORMAT_VERSION = 1
MANIFEST_NAME = "unlearning.json"
METHODS = ("uld", "uoe")
WEIGHT_FILES = {"uld": "adapter_model.safetensors", "uoe": "expert_patch.safetensors"}




@dataclass
class Manifest:
    method: str
    base_fingerprint: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)  # ULD: alpha, filter
    details: dict[str, Any] = field(default_factory=dict)  # ULD: layers; UOE: layer, expert, family
    training: dict[str, Any] = field(default_factory=dict)  # data hashes, final losses, timings
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<manifest>") -> Manifest:
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: manifest must be a JSON object")
        method = data.get("method")
        if method not in METHODS:
            raise ArtifactError(f"{source}: unknown method {method!r} (expected one of {', '.join(METHODS)})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: format_version {version!r} is not supported (this build reads {FORMAT_VERSION})"
            )
        if not isinstance(data.get("base_fingerprint"), dict):
            raise ArtifactError(f"{source}: base_fingerprint missing")
        return cls(
            method=method,
            base_fingerprint=data["base_fingerprint"],
            defaults=dict(data.get("defaults") or {}),
            details=dict(data.get("details") or {}),
            training=dict(data.get("training") or {}),
            format_version=version,
        )


def save_manifest(manifest: Manifest, directory: str | Path) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(manifest.to_json() + "\n")
    return path


def load_manifest(directory: str | Path) -> Manifest:
    """Read and validate `directory/unlearning.json` and check the weights file is present."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory}: not an unlearning artifact (no {MANIFEST_NAME})")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from None
    manifest = Manifest.from_dict(data, str(path))
    weights = directory / WEIGHT_FILES[manifest.method]
    if not weights.is_file():
        raise ArtifactError(f"{directory}: manifest says {manifest.method!r} but {weights.name} is missing")
    return manifest


def load_weights(directory: str | Path, method: str) -> dict[str, torch.Tensor]:
    """Load an artifact's safetensors weights; a truncated or tampered file is an ArtifactError."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHT_FILES[method]
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several error types for corrupt headers/data
        raise ArtifactError(f"{path}: corrupted or unreadable safetensors file ({exc})") from None


# ----------------------------------------------------------------------------- fingerprint

# A fixed sample of weights: PROBE_TENSORS parameters spread over the sorted parameter names,
# PROBE_ELEMENTS values spread over each. Any fine-tune moves most of them; reading them is cheap.
PROBE_TENSORS = 8
PROBE_ELEMENTS = 16
# Loading one checkpoint in fp32, bf16 or fp16 moves each value by at most half a bf16 step
# (2**-9 relative) plus fp16 subnormal rounding; a different checkpoint differs by far more.
PROBE_RTOL = 2**-7
PROBE_ATOL = 1e-6


def _base_parameters(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    base = model
    # Unwrap peft so that a PeftModel and its base model fingerprint identically.
    while hasattr(base, "get_base_model") and callable(base.get_base_model):
        inner = base.get_base_model()
        if inner is base:
            break
        base = inner
    # A LoRA-injected module keeps its original weight under `.base_layer.`; name it as the plain model does.
    params = {n.replace(".base_layer.", "."): p for n, p in base.named_parameters() if "lora_" not in n}
    return base, params


def _weight_probe(params: dict[str, torch.Tensor]) -> list[float]:
    names = sorted(params)
    if not names:
        return []
    count = min(PROBE_TENSORS, len(names))
    picked = sorted({round(i * (len(names) - 1) / max(count - 1, 1)) for i in range(count)})
    values: list[float] = []
    for index in picked:
        flat = params[names[index]].detach().reshape(-1)
        # float64: float32 rounds numel - 1 up to numel for tensors past 2**24 elements (an index error)
        count = min(PROBE_ELEMENTS, flat.numel())
        positions = torch.linspace(0, flat.numel() - 1, count, dtype=torch.float64).round().long()
        values += flat[positions.to(flat.device)].to("cpu", torch.float32).tolist()
    return [float(f"{v:.6g}") for v in values]


def fingerprint_model(model: torch.nn.Module) -> dict[str, Any]:
    """Architecture, shapes and a fixed sample of weight values of `model` (a causal LM).

    Computed on the base model without adapters/patches. The same checkpoint loaded in fp32,
    bf16 or fp16 matches itself (see `check_fingerprint`); another checkpoint of the same
    architecture, a fine-tune included, does not.
    """
    base, params = _base_parameters(model)
    config = base.config
    names = sorted(params)
    shapes_hash = hashlib.sha256("\n".join(f"{n}:{tuple(params[n].shape)}" for n in names).encode()).hexdigest()[:16]
    probe = _weight_probe(params)
    # A short display id of the weights: the probe at 3 significant digits (informative, not compared).
    weights_hash = hashlib.sha256(json.dumps([f"{v:.3g}" for v in probe]).encode()).hexdigest()[:16]
    return {
        "model_type": getattr(config, "model_type", "unknown"),
        "architecture": (getattr(config, "architectures", None) or [type(base).__name__])[0],
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "shapes_hash": shapes_hash,
        "weights_hash": weights_hash,
        "weights_probe": probe,
        "name_or_path": getattr(config, "_name_or_path", "") or "",
    }


def _probes_match(want: Any, have: Any) -> bool:
    if not (isinstance(want, list) and isinstance(have, list)) or len(want) != len(have) or not want:
        return False
    try:
        return all(
            abs(float(a) - float(b)) <= PROBE_ATOL + PROBE_RTOL * max(abs(float(a)), abs(float(b)))
            for a, b in zip(want, have, strict=True)
        )
    except (TypeError, ValueError):
        return False


def fingerprint_mismatches(want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    """Names of the fingerprint fields that differ (empty: same base model)."""
    keys = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "shapes_hash")
    diffs = [k for k in keys if want.get(k) != have.get(k)]
    if not diffs:
        if "weights_probe" in want or "weights_probe" in have:
            if not _probes_match(want.get("weights_probe"), have.get("weights_probe")):
                diffs.append("weights")
        elif want.get("weights_hash") != have.get("weights_hash"):
            diffs.append("weights")
    return diffs


def check_fingerprint(manifest: Manifest, model_fingerprint: dict[str, Any], artifact: str, model: str) -> None:
    """Refuse an artifact trained on another base model, naming both."""
    want = manifest.base_fingerprint
    diffs = fingerprint_mismatches(want, model_fingerprint)
    if diffs:
        raise ArtifactError(
            f"artifact {artifact} was trained on base model {want.get('name_or_path') or '?'} "
            f"({want.get('model_type')}, {want.get('num_hidden_layers')} layers, weights {want.get('weights_hash')}) "
            f"but the loaded model is {model} ({model_fingerprint.get('model_type')}, "
            f"{model_fingerprint.get('num_hidden_layers')} layers, weights {model_fingerprint.get('weights_hash')}); "
            f"mismatched: {', '.join(diffs)}. Load the base model the artifact was trained on."
        )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_artifact_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir`; on success replace `out_dir` with it, on error delete it."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
