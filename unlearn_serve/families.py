"""MoE family adapters: one class per model family, registered by `config.model_type`.

Everything that depends on how a family lays out its experts and router lives here, so that
attribution (training/uoe_attribution.py), UOE training (training/uoe_trainer.py) and serving
(server/unlearning/uoe.py) never branch on the model type.

Verified against the transformers 5 sources:
  qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek_v3:
      layer.mlp.gate            router, weight [E, H], forward(x) -> (logits, top-k weights, top-k indices)
      layer.mlp.experts         gate_up_proj [E, 2I, H] (gate rows first, then up), down_proj [E, H, I]
      (qwen2_moe adds shared_expert + shared_expert_gate, deepseek_v3 adds shared_experts, a sigmoid router
       with e_score_correction_bias and dense MLPs in the first `first_k_dense_replace` layers; qwen2/3_moe
       can have dense layers via mlp_only_layers/decoder_sparse_step: only blocks with experts are MoE layers)
  gpt_oss:
      layer.mlp.router          weight [E, H] and bias [E]
      layer.mlp.experts         gate_up_proj [E, H, 2I] (transposed, gate/up interleaved on the last dim),
                                gate_up_proj_bias [E, 2I], down_proj [E, I, H], down_proj_bias [E, H]

The canonical per-expert layout ("ExpertSlices") is nn.Linear style, whatever the fused layout:
gate [I, H], up [I, H], down [H, I], plus gate_bias [I], up_bias [I], down_bias [H] where the family has biases.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_serve.errors import UnlearnServeError


class NotMoEError(UnlearnServeError, ValueError):
    """The model is not a mixture-of-experts model of a supported family."""


@dataclass
class ExpertSlices:
    """One expert's weights in the canonical (nn.Linear, [out, in]) layout."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ExpertSlices:
        return cls(**{f.name: tensors.get(f.name) for f in fields(cls)})

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ExpertSlices:
        return ExpertSlices.from_tensors({k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()})

    def clone(self) -> ExpertSlices:
        return ExpertSlices.from_tensors({k: v.detach().clone() for k, v in self.tensors().items()})


# (gate_up [2I, H], its bias [2I] | None, down [H, I], its bias [H] | None), see MoEFamily.prepare_expert
PreparedExpert = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


class MoEFamily:
    """Adapter for one MoE family. Subclasses override the layout-specific parts."""

    model_types: ClassVar[tuple[str, ...]] = ()
    router_attr: ClassVar[str] = "gate"
    block_attr: ClassVar[str] = "mlp"
    router_kind: ClassVar[str] = "softmax"  # what `router_probs` returns; see there

    # ------------------------------------------------------------------ structure

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        inner = getattr(model, "model", model)  # *ForCausalLM -> *Model
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise NotMoEError(f"{type(model).__name__}: no decoder layers found at .model.layers")
        return layers

    def is_moe_block(self, block: nn.Module) -> bool:
        return hasattr(block, "experts") and hasattr(block, self.router_attr)

    def moe_layers(self, model: nn.Module) -> dict[int, nn.Module]:
        """Decoder layer index -> MoE block (dense layers are left out)."""
        blocks = {}
        for index, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.block_attr, None)
            if block is not None and self.is_moe_block(block):
                blocks[index] = block
        return blocks

    def moe_block(self, model: nn.Module, layer: int) -> nn.Module:
        blocks = self.moe_layers(model)
        if layer not in blocks:
            raise ValueError(f"layer {layer} is not an MoE layer; MoE layers are {sorted(blocks)}")
        return blocks[layer]

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def experts(self, block: nn.Module) -> nn.Module:
        return block.experts

    def router_params(self, block: nn.Module) -> dict[str, nn.Parameter]:
        """The router's trainable tensors: 'weight' [E, H] and, where the family has one, 'bias' [E]."""
        router = self.router(block)
        params = {"weight": router.weight}
        if isinstance(getattr(router, "bias", None), nn.Parameter):
            params["bias"] = router.bias
        return params

    def num_experts(self, block: nn.Module) -> int:
        return int(self.router(block).weight.shape[0])

    def top_k(self, block: nn.Module) -> int:
        return int(self.router(block).top_k)

    def expert_parameters(self, block: nn.Module) -> dict[str, nn.Parameter]:
        """Fused expert tensors; in every supported family dim 0 indexes the expert."""
        return {n: p for n, p in self.experts(block).named_parameters(recurse=False)}

    # ------------------------------------------------------------------ routing

    def router_logits(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[N, E] float32 router logits for flattened hidden states [N, H] (or [..., H])."""
        params = self.router_params(block)
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        return F.linear(x, params["weight"].float(), params["bias"].float() if "bias" in params else None)

    def router_probs(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[N, E] full softmax over all experts (not top-k masked), float32, differentiable."""
        return torch.softmax(self.router_logits(block, hidden), dim=-1)

    def topk_indices(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[N, k] experts the router actually selects (runs the family's own router forward)."""
        router = self.router(block)
        return router(hidden.reshape(-1, hidden.shape[-1]))[2]

    # ------------------------------------------------------------------ one expert

    def get_expert(self, block: nn.Module, expert: int) -> ExpertSlices:
        experts = self.experts(block)
        gate_up = experts.gate_up_proj[expert]  # [2I, H]: gate rows, then up rows
        inter = gate_up.shape[0] // 2
        return ExpertSlices(gate=gate_up[:inter], up=gate_up[inter:], down=experts.down_proj[expert])

    @torch.no_grad()
    def set_expert(self, block: nn.Module, expert: int, slices: ExpertSlices) -> None:
        experts = self.experts(block)
        dtype = experts.gate_up_proj.dtype
        experts.gate_up_proj[expert].copy_(torch.cat([slices.gate, slices.up], dim=0).to(dtype))
        experts.down_proj[expert].copy_(slices.down.to(dtype))

    def prepare_expert(self, slices: ExpertSlices) -> PreparedExpert:
        """The expert as two matmuls in the layout the experts module's `_apply_gate` expects (done once per
        patch when serving, so that a forward costs two matmuls and the gating): gate rows, then up rows."""
        return torch.cat([slices.gate, slices.up], dim=0), None, slices.down, None

    def expert_forward(
        self, experts: nn.Module, x: torch.Tensor, slices: ExpertSlices, prepared: PreparedExpert | None = None
    ) -> torch.Tensor:
        """One expert applied to tokens x [n, H] -> [n, H], unweighted (reuses the module's own gating)."""
        gate_up, gate_up_bias, down, down_bias = prepared or self.prepare_expert(slices)
        return F.linear(experts._apply_gate(F.linear(x, gate_up, gate_up_bias)), down, down_bias)


# ---------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[MoEFamily]] = {}


def register(cls: type[MoEFamily]) -> type[MoEFamily]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def registered_families() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_family(model_or_type: nn.Module | str) -> MoEFamily:
    """The adapter for a model (or a model_type string); NotMoEError for dense or unsupported models."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None) or type(model_or_type).__name__
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise NotMoEError(
            f"model type {model_type!r} is not a supported mixture-of-experts family "
            f"(UOE supports {', '.join(sorted(_REGISTRY))}); dense models have no experts to unlearn"
        )
    family = cls()
    if not isinstance(model_or_type, str) and not family.moe_layers(model_or_type):
        raise NotMoEError(f"model type {model_type!r} has no MoE layers in this checkpoint")
    return family


@register
class Qwen2MoeFamily(MoEFamily):
    """Qwen1.5/2-MoE: softmax router; the shared expert and its sigmoid gate are not per-expert and stay put."""

    model_types = ("qwen2_moe",)


@register
class Qwen3MoeFamily(MoEFamily):
    model_types = ("qwen3_moe",)


@register
class MixtralFamily(MoEFamily):
    model_types = ("mixtral",)


@register
class OlmoeFamily(MoEFamily):
    model_types = ("olmoe",)


@register
class DeepseekV3Family(MoEFamily):
    """DeepSeek-V3: sigmoid router. The routing weights are sigmoid scores renormalised over the top-k,
    and the choice adds e_score_correction_bias (a buffer, never trained here). `router_probs` therefore
    returns the sigmoid scores renormalised over ALL experts (bias excluded): the full, un-masked analogue
    of the weights the model uses, and a distribution so the anchor loss stays well defined."""

    model_types = ("deepseek_v3",)
    router_kind = "sigmoid, renormalised over all experts"

    def router_probs(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(self.router_logits(block, hidden))
        return scores / scores.sum(dim=-1, keepdim=True)


@register
class GptOssFamily(MoEFamily):
    """GPT-OSS: `mlp.router` with a bias; transposed experts with interleaved gate/up and biases.
    Its router softmaxes only the top-k logits; `router_probs` is the full softmax over all logits."""

    model_types = ("gpt_oss",)
    router_attr = "router"

    def get_expert(self, block: nn.Module, expert: int) -> ExpertSlices:
        experts = self.experts(block)
        gate_up = experts.gate_up_proj[expert]  # [H, 2I], columns gate0, up0, gate1, up1, ...
        gate_up_bias = experts.gate_up_proj_bias[expert]  # [2I]
        return ExpertSlices(
            gate=gate_up[:, 0::2].T,
            up=gate_up[:, 1::2].T,
            down=experts.down_proj[expert].T,  # [I, H] -> [H, I]
            gate_bias=gate_up_bias[0::2],
            up_bias=gate_up_bias[1::2],
            down_bias=experts.down_proj_bias[expert],
        )

    @torch.no_grad()
    def set_expert(self, block: nn.Module, expert: int, slices: ExpertSlices) -> None:
        experts = self.experts(block)
        dtype = experts.gate_up_proj.dtype
        # Interleave back: stack on a new last dim then flatten -> g0, u0, g1, u1, ...
        gate_up = torch.stack([slices.gate.T, slices.up.T], dim=-1).flatten(-2)
        gate_up_bias = torch.stack([slices.gate_bias, slices.up_bias], dim=-1).flatten(-2)
        experts.gate_up_proj[expert].copy_(gate_up.to(dtype))
        experts.gate_up_proj_bias[expert].copy_(gate_up_bias.to(dtype))
        experts.down_proj[expert].copy_(slices.down.T.to(dtype))
        experts.down_proj_bias[expert].copy_(slices.down_bias.to(dtype))

    def prepare_expert(self, slices: ExpertSlices) -> PreparedExpert:
        # rows g0, u0, g1, u1, ...: the interleaved layout GPT-OSS's _apply_gate expects
        gate_up = torch.stack([slices.gate, slices.up], dim=1).flatten(0, 1)  # [2I, H]
        gate_up_bias = torch.stack([slices.gate_bias, slices.up_bias], dim=-1).flatten(-2)  # [2I]
        return gate_up, gate_up_bias, slices.down, slices.down_bias
