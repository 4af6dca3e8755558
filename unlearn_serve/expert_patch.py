"""The UOE expert patch: one expert of one MoE layer plus that layer's router, and its file format.

`expert_patch.safetensors` holds
  expert.gate [I, H], expert.up [I, H], expert.down [H, I]     (canonical nn.Linear layout, see families.py)
  expert.gate_bias, expert.up_bias, expert.down_bias            (families with expert biases: gpt_oss)
  router.weight [E, H], router.bias [E]                          (bias only where the router has one)
and the manifest's details say which (family, layer, expert, num_experts) it belongs to.

Shared by the trainer (writes), the server (serves) and export (merges); it depends on neither side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unlearn_serve.artifact import (
    WEIGHT_FILES,
    ArtifactError,
    Manifest,
    check_fingerprint,
    fingerprint_model,
    load_manifest,
    load_weights,
    save_manifest,
)
from unlearn_serve.families import ExpertSlices, MoEFamily, get_family

EXPERT_PREFIX = "expert."
ROUTER_PREFIX = "router."


@dataclass
class ExpertPatch:
    family: str
    layer: int
    expert: int
    num_experts: int
    slices: ExpertSlices
    router: dict[str, torch.Tensor]  # "weight" [E, H], optional "bias" [E]

    def tensors(self) -> dict[str, torch.Tensor]:
        flat = {EXPERT_PREFIX + k: v for k, v in self.slices.tensors().items()}
        flat.update({ROUTER_PREFIX + k: v for k, v in self.router.items()})
        return {k: v.detach().contiguous().cpu() for k, v in flat.items()}

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ExpertPatch:
        return ExpertPatch(
            self.family,
            self.layer,
            self.expert,
            self.num_experts,
            self.slices.to(device, dtype),
            {k: v.to(device=device, dtype=dtype) for k, v in self.router.items()},
        )


def extract_expert_patch(model: nn.Module, layer: int, expert: int, family: MoEFamily | None = None) -> ExpertPatch:
    """A detached copy of the model's current (layer, expert) slices and that layer's router."""
    family = family or get_family(model)
    block = family.moe_block(model, layer)
    num_experts = family.num_experts(block)
    if not 0 <= expert < num_experts:
        raise ValueError(f"expert {expert} out of range: layer {layer} has {num_experts} experts")
    return ExpertPatch(
        family=model.config.model_type,
        layer=layer,
        expert=expert,
        num_experts=num_experts,
        slices=family.get_expert(block, expert).clone(),
        router={k: v.detach().clone() for k, v in family.router_params(block).items()},
    )


def save_expert_patch(patch: ExpertPatch, manifest: Manifest, directory: str | Path) -> Path:
    """Write weights + manifest into `directory` (call inside `atomic_artifact_dir`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file(patch.tensors(), str(directory / WEIGHT_FILES["uoe"]))
    save_manifest(manifest, directory)
    return directory


def load_expert_patch(
    artifact_dir: str | Path,
    model: nn.Module,
    model_name: str = "the loaded model",
    base_fingerprint: dict | None = None,
) -> tuple[ExpertPatch, Manifest]:
    """Load a UOE artifact for `model`, refusing anything that does not fit it (always an ArtifactError):
    wrong method, another base model (naming both), corrupted safetensors, or shapes/indices that disagree.
    `base_fingerprint`: the model's fingerprint when the caller already has it (default: computed here)."""
    artifact = str(artifact_dir)
    manifest = load_manifest(artifact_dir)
    if manifest.method != "uoe":
        raise ArtifactError(f"{artifact}: is a {manifest.method!r} artifact, not a UOE expert patch")
    check_fingerprint(manifest, base_fingerprint or fingerprint_model(model), artifact, model_name)
    try:
        family = get_family(model)
    except ValueError as exc:
        raise ArtifactError(f"{artifact}: {exc}") from None
    details = manifest.details
    try:
        layer, expert = int(details["layer"]), int(details["expert"])
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{artifact}: manifest details must give integer 'layer' and 'expert'") from None
    blocks = family.moe_layers(model)
    if layer not in blocks:
        raise ArtifactError(f"{artifact}: layer {layer} is not an MoE layer of {model_name} ({sorted(blocks)})")
    block = blocks[layer]
    num_experts = family.num_experts(block)
    if not 0 <= expert < num_experts or details.get("num_experts", num_experts) != num_experts:
        raise ArtifactError(
            f"{artifact}: expert {expert} of {details.get('num_experts')} does not fit layer {layer} "
            f"of {model_name} ({num_experts} experts)"
        )
    tensors = load_weights(artifact_dir, "uoe")
    expected = ExpertPatch(
        model.config.model_type, layer, expert, num_experts, family.get_expert(block, expert),
        dict(family.router_params(block)),
    ).tensors()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    bad_shapes = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad_shapes:
        raise ArtifactError(
            f"{artifact}: expert patch does not fit layer {layer} of {model_name}: "
            f"missing {missing or '-'}, unexpected {extra or '-'}, wrong shape {bad_shapes or '-'}"
        )
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise ArtifactError(f"{artifact}: expert patch holds NaN/inf values")
    patch = ExpertPatch(
        family=model.config.model_type,
        layer=layer,
        expert=expert,
        num_experts=num_experts,
        slices=ExpertSlices.from_tensors(
            {k[len(EXPERT_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXPERT_PREFIX)}
        ),
        router={k[len(ROUTER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ROUTER_PREFIX)},
    )
    return patch, manifest


@torch.no_grad()
def apply_expert_patch(model: nn.Module, patch: ExpertPatch) -> None:
    """Overwrite the model's (layer, expert) slices and that layer's router with the patch, in place."""
    family = get_family(model)
    block = family.moe_block(model, patch.layer)
    family.set_expert(block, patch.expert, patch.slices)
    for key, param in family.router_params(block).items():
        param.copy_(patch.router[key].to(param.dtype))


def merge_patch_into(
    model: nn.Module, artifact_dir: str | Path, model_name: str = "the loaded model"
) -> tuple[ExpertPatch, Manifest]:
    """Validate a UOE artifact against `model` and write it into the model's weights (for export)."""
    patch, manifest = load_expert_patch(artifact_dir, model, model_name)
    apply_expert_patch(model, patch)
    return patch, manifest
