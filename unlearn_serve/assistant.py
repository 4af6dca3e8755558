"""The ULD assistant: the target model truncated after its first K decoder layers.

The assistant is not a separate network. It is the target's own embedding, first K decoder layers
(carrying a LoRA adapter), final norm and LM head, so no target weight is ever copied. This module
is the reference forward used by the trainer and by tests; the server runs its own fused path.
Nothing here imports training code.
"""

from __future__ import annotations

import torch
from torch import nn

# Linear projections that get LoRA. Only exact leaf names, so an MoE router called `gate` is skipped.
LORA_CANDIDATE_NAMES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    # DeepSeek-style multi-head latent attention
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
)


def default_assistant_layers(num_hidden_layers: int) -> int:
    """K = round(N / 4), at least 1 (and never more than N)."""
    if num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be >= 1 (got {num_hidden_layers})")
    return max(1, min(num_hidden_layers, round(num_hidden_layers / 4)))


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The underlying `*ForCausalLM` of a peft-wrapped model (LoRA layers stay injected in it)."""
    base = model
    while hasattr(base, "get_base_model") and callable(base.get_base_model):
        inner = base.get_base_model()
        if inner is base:
            break
        base = inner
    return base


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    causal_lm = unwrap_causal_lm(model)
    layers = getattr(getattr(causal_lm, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(causal_lm).__name__} has no `model.layers`; the ULD assistant needs a decoder-only causal LM"
        )
    return layers


def lora_target_modules(model: nn.Module, num_layers: int | None = None) -> list[str]:
    """Leaf names of the attention/MLP linear layers present in the first `num_layers` decoder layers."""
    layers = decoder_layers(model)
    found: set[str] = set()
    for layer in list(layers)[: num_layers if num_layers is not None else len(layers)]:
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            # `base_layer` covers a model that already carries LoRA
            if leaf in LORA_CANDIDATE_NAMES and (
                isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)
            ):
                found.add(leaf)
    if not found:
        raise ValueError(f"no linear q/k/v/o/gate/up/down projections found in {type(model).__name__}")
    return [n for n in LORA_CANDIDATE_NAMES if n in found]


def assistant_lora_config(model: nn.Module, num_layers: int, rank: int = 32, alpha: float = 32, dropout: float = 0.05):
    """A peft LoraConfig restricted to the first `num_layers` decoder layers (never the LM head)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model, num_layers),
        layers_to_transform=list(range(num_layers)),
        layers_pattern="layers",
        bias="none",
        task_type="CAUSAL_LM",
    )


def _layer_masks(
    inner: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
) -> dict[str, object]:
    """The model's own causal(+padding, +sliding window) masks, keyed by layer type."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = inner.config
    kwargs = dict(
        config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    masks: dict[str, object] = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def assistant_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_layers: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states after embedding + the first `num_layers` decoder layers + the final norm."""
    causal_lm = unwrap_causal_lm(model)
    inner = causal_lm.model
    total = len(inner.layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in 1..{total} (got {num_layers})")
    hidden = inner.embed_tokens(input_ids)
    if position_ids is None:
        # Same default as the model's own forward: positions 0..T-1 for every row.
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    masks = _layer_masks(inner, hidden, attention_mask, position_ids)
    position_embeddings = inner.rotary_emb(hidden, position_ids)
    layer_types = getattr(inner.config, "layer_types", None)
    for i, layer in enumerate(inner.layers[:num_layers]):
        kind = layer_types[i] if layer_types else "full_attention"
        out = layer(
            hidden,
            attention_mask=masks.get(kind, masks["full_attention"]),
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            use_cache=False,
        )
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 5 layers return a tensor
    return inner.norm(hidden)


def assistant_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_layers: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, T, V] logits of the assistant: the (possibly peft-wrapped) target stopped after `num_layers`.

    The active LoRA adapter, if any, applies inside those layers. `attention_mask` is the usual
    [B, T] 1/0 padding mask (or None for no padding).
    """
    hidden = assistant_hidden_states(model, input_ids, attention_mask, num_layers, position_ids)
    return unwrap_causal_lm(model).lm_head(hidden)
