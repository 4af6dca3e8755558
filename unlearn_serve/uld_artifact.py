"""ULD artifacts on disk: write one from a trained peft model, load and validate one for a base model.

Layout (see artifact.py): adapter_model.safetensors + adapter_config.json exactly as peft's
`save_pretrained` writes them (so `peft.PeftModel.from_pretrained(base, dir)` loads them too) and
unlearning.json with method "uld", details {assistant_layers, lora_rank, lora_alpha, ...}.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn_serve.artifact import (
    ArtifactError,
    Manifest,
    atomic_artifact_dir,
    check_fingerprint,
    fingerprint_model,
    load_manifest,
    load_weights,
    save_manifest,
)
from unlearn_serve.assistant import unwrap_causal_lm
from unlearn_serve.uld_combine import (
    DEFAULT_FINISH_WORDS,
    DEFAULT_FLOOR,
    DEFAULT_MARGIN,
    DEFAULT_PREFIX_GUARD,
    DEFAULT_REFILTER,
    DEFAULT_RULE,
)

# rule: how the assistant's logits are subtracted (uld_combine.py); a manifest without one means `difference`
# refilter: the relative-top rule again on the combined logits (uld_combine.py); a manifest without it: off
# margin: what the `prefer` rule ignores of the assistant's preference (uld_combine.py); without it: 0
# floor: how far below the best unpenalised candidate the penalty may push (uld_combine.py); null or absent: off
# prefix_guard: candidates that begin a penalised one's text share its penalty (uld_combine.py); absent: off
# finish_words: a word the unlearned answer began is finished without penalty unless learnt (uld_combine.py); absent:
# off
ULD_DEFAULTS = {
    "alpha": 0.75,
    "filter": 0.01,
    "rule": DEFAULT_RULE,
    "refilter": DEFAULT_REFILTER,
    "margin": DEFAULT_MARGIN,
    "floor": DEFAULT_FLOOR,
    "prefix_guard": DEFAULT_PREFIX_GUARD,
    "finish_words": DEFAULT_FINISH_WORDS,
}
# peft's saved key layout: adapter name stripped, `base_model.model.` prefix kept.
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def save_uld_artifact(
    peft_model: nn.Module,
    out_dir: str | Path,
    base_fingerprint: dict[str, Any],
    details: dict[str, Any],
    training: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
    defaults: dict[str, float] | None = None,
) -> Path:
    """Write the adapter and manifest atomically: a crash midway leaves any earlier artifact intact.

    `state_dict` (optional) is the peft model's gathered state dict, for sharded (FSDP/ZeRO-3) runs.
    `defaults` overrides the serving defaults (alpha, filter) stored in the manifest.
    """
    out = Path(out_dir)
    with atomic_artifact_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp), state_dict=state_dict)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's generic model card says nothing useful here
        manifest = Manifest(
            method="uld",
            base_fingerprint=base_fingerprint,
            defaults={**ULD_DEFAULTS, **(defaults or {})},
            details=details,
            training=training,
        )
        save_manifest(manifest, tmp)
    return out


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    linear = getattr(module, "base_layer", module)  # a model that already carries LoRA
    if isinstance(linear, nn.Linear):
        return linear.in_features, linear.out_features
    return None


def validate_lora_weights(
    weights: dict[str, torch.Tensor], model: nn.Module, num_layers: int, rank: int, source: str
) -> None:
    """Every key is a lora_A/lora_B of a linear layer in the first `num_layers` layers, with matching shapes."""
    if not weights:
        raise ArtifactError(f"{source}: holds no LoRA weights")
    causal_lm = unwrap_causal_lm(model)
    parts: dict[str, set[str]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise ArtifactError(f"{source}: unexpected tensor {key!r} (not a LoRA A/B weight)")
        module_name, part = match["module"], match["part"]
        layer = _LAYER.search(f".{module_name}.")
        if layer is None or int(layer[1]) >= num_layers:
            raise ArtifactError(f"{source}: {key!r} is outside the assistant's first {num_layers} decoder layers")
        try:
            shape = _linear_shape(causal_lm.get_submodule(module_name))
        except AttributeError:
            shape = None
        if shape is None:
            raise ArtifactError(f"{source}: {key!r} targets {module_name!r}, which is not a linear layer of the model")
        in_features, out_features = shape
        want = (rank, in_features) if part == "A" else (out_features, rank)
        if tuple(tensor.shape) != want:
            raise ArtifactError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, expected {want}")
        if not torch.isfinite(tensor).all():
            raise ArtifactError(f"{source}: {key!r} holds NaN or infinite values")
        parts.setdefault(module_name, set()).add(part)
    unpaired = sorted(name for name, seen in parts.items() if seen != {"A", "B"})
    if unpaired:
        raise ArtifactError(f"{source}: LoRA A/B pairs incomplete for {', '.join(unpaired[:3])}")


def load_uld_artifact(
    directory: str | Path, model: nn.Module, model_name: str | None = None
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Manifest and LoRA weights (peft key layout) of a ULD artifact, checked against `model`.

    Refuses (ArtifactError) an artifact of another method, one trained on another base model
    (naming both), a corrupted safetensors file, or weights that do not fit the model.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    if manifest.method != "uld":
        raise ArtifactError(f"{directory}: is a {manifest.method!r} artifact, not a ULD one")
    fingerprint = fingerprint_model(model)
    name = model_name or fingerprint.get("name_or_path") or type(unwrap_causal_lm(model)).__name__
    check_fingerprint(manifest, fingerprint, str(directory), name)

    num_hidden = len(unwrap_causal_lm(model).model.layers)
    num_layers, rank = manifest.details.get("assistant_layers"), manifest.details.get("lora_rank")
    if not isinstance(num_layers, int) or not 1 <= num_layers <= num_hidden:
        raise ArtifactError(f"{directory}: details.assistant_layers must be an integer in 1..{num_hidden}")
    if not isinstance(rank, int) or rank < 1:
        raise ArtifactError(f"{directory}: details.lora_rank must be a positive integer")
    if not isinstance(manifest.details.get("lora_alpha"), int | float):
        raise ArtifactError(f"{directory}: details.lora_alpha missing")

    weights = load_weights(directory, "uld")
    validate_lora_weights(weights, model, num_layers, rank, str(directory))
    return manifest, weights
