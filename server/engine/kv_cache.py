"""Preallocated, slot-indexed KV cache and the attention function that reads and writes it.

Each decoder layer owns K and V tensors of shape [slots, kv_heads, max_len, head_dim]. A sequence
keeps one slot for its whole life. Rows of a decode batch map 1:1 onto a contiguous slot range, so
attention reads a *view* of the cache (no gather, no concatenation). Slots are allocated lowest
first, which keeps that range dense.

The stacked batch of a step may hold several *groups* of rows with their own cache regions: the
target rows (slots [0, M)) and, for ULD, the assistant rows (slots [M, 2M), layers < K only).

The attention function is registered with transformers' AttentionInterface; the decoder layers
hand it our per-step `slot_ctx` through their **kwargs. Without a `slot_ctx` (an ordinary
`model(...)` call) it falls back to SDPA, so the same model object still works for plain forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "unlearn_slots"


@dataclass
class AttnGroup:
    """Consecutive rows [row_start, row_end) of the stacked batch that share one cache region."""

    row_start: int
    row_end: int
    slot_offset: int  # first slot of this group's region
    # decode: rows map onto slots slot_offset + i; prefill: rows map onto `slots`
    slots: torch.Tensor | None = None  # [rows] absolute slot ids (prefill)
    positions: torch.Tensor | None = None  # [rows] write position (decode)
    # decode: [rows,1,1,L] bool; prefill: [rows,1,T,T] bool. None: no mask is needed (decode rows all at
    # one position; prefill rows of one length, causal), so SDPA may take its fused kernels.
    mask: torch.Tensor | None = None
    view_len: int = 0  # decode: number of cache positions attended
    lengths: torch.Tensor | None = None  # prefill: prompt length per row
    padded_len: int = 0  # prefill: T
    _full: torch.Tensor | None = None  # `mask`, built when a layer needs one although none was required
    # `mask` narrowed to a sliding window, per window size (built by the first layer that asks, per step)
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def windowed_mask(self, window: int, prefill: bool, device: torch.device) -> torch.Tensor:
        """`mask` where a query at position p also sees only keys k > p - window (transformers' rule)."""
        mask = self.window_masks.get(window)
        if mask is None:
            base = self.full_mask(device)
            keys = torch.arange(base.shape[-1], device=device)
            if prefill:  # prompts start at position 0: query i is at position i
                queries = torch.arange(base.shape[-2], device=device)
                inside = keys[None, :] > queries[:, None] - window  # [T(q), T(k)]
                # padding queries (past a row's prompt) keep their mask: an empty row would give NaN
                padding = ~base.diagonal(dim1=-2, dim2=-1)[..., None]  # [rows, 1, T(q), 1]
                mask = base & (inside | padding)
            else:
                positions = _on(self.positions, device)
                mask = base & (keys[None, :] > positions[:, None] - window)[:, None, None, :]
            self.window_masks[window] = mask
        return mask

    def full_mask(self, device: torch.device) -> torch.Tensor:
        """`mask`, or the mask it stands for when None (sliding windows and eager attention need one)."""
        if self.mask is not None:
            return _on(self.mask, device)
        if self._full is None:
            if self.lengths is not None:
                self._full = prefill_mask(_on(self.lengths, device), self.padded_len)
            else:
                self._full = decode_mask(_on(self.positions, device), self.view_len)
        return _on(self._full, device)


@dataclass
class StepContext:
    """What the attention function needs to know about the current forward."""

    cache: SlotKVCache
    prefill: bool
    groups_by_layer: list[list[AttnGroup]]  # groups present at each layer (assistant rows leave at K)
    # start-up probe: layer -> (K shape, V shape, device) of a 1-token forward; nothing is cached
    probe: dict[int, tuple] | None = None


class SlotKVCache:
    def __init__(self, num_layers: int, slots_per_layer: list[int], max_len: int, device, dtype):
        self.num_layers = num_layers
        self.slots_per_layer = slots_per_layer
        self.max_len = max_len
        self.device = device
        self.dtype = dtype
        # Allocated by `allocate` at start-up from probed K/V shapes (MLA differs per layer); a runner used
        # without the engine allocates a layer at its first write.
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def _ensure(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.keys[layer] is None:
            n = self.slots_per_layer[layer]
            # on the layer's own device: with --device-map auto the layers are spread over several GPUs
            self.keys[layer] = torch.zeros(
                n, key.shape[1], self.max_len, key.shape[3], device=key.device, dtype=self.dtype
            )
            self.values[layer] = torch.zeros(
                n, value.shape[1], self.max_len, value.shape[3], device=value.device, dtype=self.dtype
            )

    def allocate(self, shapes: dict[int, tuple]) -> None:
        """Allocate every layer at once (start-up), from the probed (K shape, V shape, device) per layer."""
        for layer, (k_shape, v_shape, device) in shapes.items():
            if self.keys[layer] is None:
                n = self.slots_per_layer[layer]
                self.keys[layer] = torch.zeros(n, k_shape[1], self.max_len, k_shape[3], device=device, dtype=self.dtype)
                self.values[layer] = torch.zeros(
                    n, v_shape[1], self.max_len, v_shape[3], device=device, dtype=self.dtype
                )

    def resize_layers(self, slots_per_layer: list[int]) -> None:
        """Change slot counts before the cache is allocated."""
        if self.allocated():
            # dropping a live tensor would zero the KV of every running sequence
            raise RuntimeError("the KV cache is in use; its layout can no longer change")
        self.slots_per_layer = list(slots_per_layer)

    def allocated(self) -> bool:
        return any(t is not None for t in self.keys)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`t` on `device` (a no-op on one device; with --device-map auto a layer may sit on another GPU)."""
    return t if t is None or t.device == device else t.to(device)


def _attend_group(
    ctx: StepContext, layer: int, group: AttnGroup, q, k, v, scaling: float | None, features: AttnFeatures
) -> torch.Tensor:
    cache = ctx.cache
    cache._ensure(layer, k, v)
    kc, vc = cache.keys[layer], cache.values[layer]
    if features.sliding_window and features.sliding_window < cache.max_len:  # a wider window changes nothing
        mask = group.windowed_mask(features.sliding_window, ctx.prefill, k.device)
    else:
        mask = _on(group.mask, k.device)
    if ctx.prefill:
        t = k.shape[2]
        slots = _on(group.slots, k.device)
        kc[slots, :, :t] = k.to(kc.dtype)
        vc[slots, :, :t] = v.to(vc.dtype)
        keys, values = k, v
    else:
        n = group.row_end - group.row_start
        rows = torch.arange(n, device=k.device)
        positions = _on(group.positions, k.device)
        region_k = kc[group.slot_offset : group.slot_offset + n]
        region_v = vc[group.slot_offset : group.slot_offset + n]
        region_k[rows, :, positions] = k[:, :, 0].to(kc.dtype)
        region_v[rows, :, positions] = v[:, :, 0].to(vc.dtype)
        keys = region_k[:, :, : group.view_len].to(q.dtype)
        values = region_v[:, :, : group.view_len].to(q.dtype)
    if features.softcap is not None or features.sinks is not None:
        if mask is None:
            mask = group.full_mask(k.device)
        return eager_attention(q, keys, values, mask, scaling, features.softcap, features.sinks)
    if not ctx.prefill and q.shape[1] != keys.shape[1]:
        return _decode_gqa(q, keys, values, mask, scaling)
    # mask None: decode rows all see keys 0..p (no mask), prefill rows are causal (is_causal, no tensor)
    return F.scaled_dot_product_attention(
        q,
        keys,
        values,
        attn_mask=mask,
        is_causal=mask is None and ctx.prefill,
        scale=scaling,
        enable_gqa=q.shape[1] != keys.shape[1],
    )


def _decode_gqa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scaling) -> torch.Tensor:
    """Grouped-query decode attention (one query per row) with the query heads of each KV head folded into
    the query length: [rows, H, 1, D] -> [rows, KV, H/KV, D]. Exact (a row's queries share its mask), needs
    no `enable_gqa`, which CUDA supports only in the flash (no mask) and math kernels, the math one
    copying K/V per query head; folded, a masked decode may take the memory-efficient kernel. Also faster
    on CPU (bench note in docs/benchmarks.md, engine v2)."""
    rows, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    folded = q.reshape(rows, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim)


@dataclass
class AttnFeatures:
    """Per-layer attention variants the decoder layers pass as keyword arguments."""

    sliding_window: int | None = None  # Mistral, Gemma-2/3 local layers, gpt-oss, Qwen2 with windows
    softcap: float | None = None  # Gemma-2: tanh soft-capping of the attention scores
    sinks: torch.Tensor | None = None  # gpt-oss: one learned sink logit per head (`s_aux`)


def eager_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with score soft-capping and/or sink logits (SDPA has neither); `mask` is bool, True = attend."""
    if q.shape[1] != keys.shape[1]:  # grouped-query attention
        groups = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    else:  # the sink takes part in the softmax, then is dropped: rows may give attention to "nothing"
        sink = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1).to(scores.dtype)
        combined = torch.cat([scores, sink], dim=-1).float()
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(combined, dim=-1)[..., :-1].to(q.dtype)
    return torch.matmul(probs, values)


def slot_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    slot_ctx: StepContext | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    features = AttnFeatures(sliding_window, softcap, s_aux)
    if slot_ctx is None:  # a plain model(...) call: transformers built the mask (sliding window included)
        if softcap is None and s_aux is None:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        mask = _plain_mask(attention_mask, query.shape[2], key.shape[2], query.device)
        out = eager_attention(query, key, value, mask, scaling, softcap, s_aux)
        return out.transpose(1, 2).contiguous(), None
    layer = module.layer_idx
    if slot_ctx.probe is not None:
        slot_ctx.probe[layer] = (tuple(key.shape), tuple(value.shape), key.device)
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True)
    groups = slot_ctx.groups_by_layer[layer]
    if len(groups) == 1:
        out = _attend_group(slot_ctx, layer, groups[0], query, key, value, scaling, features)
    else:
        out = torch.cat(
            [
                _attend_group(
                    slot_ctx,
                    layer,
                    g,
                    query[g.row_start : g.row_end],
                    key[g.row_start : g.row_end],
                    value[g.row_start : g.row_end],
                    scaling,
                    features,
                )
                for g in groups
            ]
        )
    return out.transpose(1, 2).contiguous(), None


def _plain_mask(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor:
    """A bool mask (True = attend) from what transformers passes: None (causal), bool, or additive float."""
    if attention_mask is None:
        queries = torch.arange(q_len, device=device) + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, :] <= queries[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    return attention_mask[..., :k_len] > torch.finfo(attention_mask.dtype).min / 2


def register_slot_attention() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def decode_mask(positions: torch.Tensor, view_len: int) -> torch.Tensor:
    """[rows, 1, 1, view_len]: a decode query at position p sees keys 0..p."""
    keys = torch.arange(view_len, device=positions.device)
    return (keys[None, :] <= positions[:, None])[:, None, None, :]


def prefill_mask(lengths: torch.Tensor, padded_len: int) -> torch.Tensor:
    """[rows, 1, T, T]: causal, and keys beyond each row's prompt length hidden."""
    idx = torch.arange(padded_len, device=lengths.device)
    causal = idx[None, :] <= idx[:, None]  # [T(q), T(k)]
    valid = idx[None, :] < lengths[:, None]  # [rows, T(k)]
    return (causal[None] & valid[:, None, :])[:, None]
