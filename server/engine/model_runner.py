"""One forward pass over the stacked batch: target rows, plus ULD assistant rows for layers < K.

    rows [0, n_target)          target rows: all N layers -> norm -> LM head
    rows [n_target, n_total)    assistant rows: layers 0..K_a-1 (+ their LoRA) -> norm -> LM head

Assistant rows share the target's frozen weights and run in the same matmuls as the target rows
for layers < K; after the last assistant layer they leave the batch, so an unlearned row costs
about K/N of a target forward plus one LM head, and rows without unlearning pay nothing.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from unlearn_serve.server.engine.kv_cache import (
    ATTN_IMPLEMENTATION,
    AttnGroup,
    SlotKVCache,
    StepContext,
    register_slot_attention,
)

from unlearn_serve.artifact import ArtifactError
from unlearn_serve.errors import ModelLoadError


class AssistantKVBudgetError(ArtifactError):
    """An assistant needs more KV layers than the engine reserved, and live KV must not be reallocated."""


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    prefill: bool
    n_target: int
    target_group: AttnGroup
    assistant_group: AttnGroup | None = None
    # assistant-local row indices leaving after layer K-1, per K (one entry per distinct K)
    assistant_exits: dict[int, torch.Tensor] = field(default_factory=dict)
    lora_groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # stacked-row indices
    lora_plan: object | None = None  # a fixed LoRA row plan instead of `lora_groups` (CUDA-graphed ULD decode)
    # per assistant row, the target row whose hidden state where the assistant row leaves is its early exit (the
    # assistant without its LoRA: gated ULD rows, uld_combine.py); None = not needed
    early_exit_source: torch.Tensor | None = None
    row_hooks_target: torch.Tensor | None = None  # per target row id for row hooks (UOE), -1 = none
    row_hooks_stacked: torch.Tensor | None = None  # the same with -1 for the assistant rows (built once per batch)


def unsupported_feature(model: torch.nn.Module) -> str | None:
    """What this engine would compute wrongly for `model` (it must then refuse it), or None."""
    config = model.config
    if getattr(config, "attention_chunk_size", None):
        return "chunked local attention (attention_chunk_size)"
    decoder = model.get_decoder()
    for part in ("layers", "norm", "rotary_emb"):
        if not hasattr(decoder, part):
            return f"a decoder without `{part}` (the layout this engine drives layer by layer)"
    if _rope_per_layer_type(decoder.rotary_emb) and not getattr(config, "layer_types", None):
        return "per-layer-type rotary embeddings without config.layer_types"
    return None


def _rope_per_layer_type(rotary: torch.nn.Module) -> bool:
    """Whether the rotary embedding differs per layer type (local/global RoPE, e.g. Gemma-3)."""
    return "layer_type" in inspect.signature(rotary.forward).parameters


class ModelRunner:
    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_model_len: int):
        feature = unsupported_feature(model)
        if feature is not None:
            raise ModelLoadError(
                f"cannot serve this {model.config.model_type} model: the engine does not implement {feature}"
            )
        register_slot_attention()
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.model = model
        self.decoder = model.get_decoder()
        config = model.config
        # What the model's own forward does around the decoder layers, which this runner replaces:
        self.embedding_multiplier = getattr(config, "embedding_multiplier", None)  # Granite
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)  # Gemma-2/3
        self.logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * scale
        self.logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / scaling
        self.layers = self.decoder.layers
        self.num_layers = len(self.layers)
        self.embed = self.decoder.get_input_embeddings()
        self.norm = self.decoder.norm
        self.rotary = self.decoder.rotary_emb
        # Gemma-3: local and global layers use different RoPE; one (cos, sin) per layer type then
        per_type = _rope_per_layer_type(self.rotary)
        self.rope_kinds: list[str | None] = (
            list(config.layer_types[: self.num_layers]) if per_type else [None] * self.num_layers
        )
        self.lm_head = model.get_output_embeddings()
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype if param.dtype.is_floating_point else torch.float16
        self.cache = SlotKVCache(
            self.num_layers, [max_num_seqs] * self.num_layers, max_model_len, self.device, self.dtype
        )
        self.assistant_cache_layers = 0
        self.num_slots = max_num_seqs  # target slots (the assistant region has as many); set by the budget
        # objects with set_rows(row_ids | None): per-row model patches (UOE expert patches)
        self.row_hooks: list = []

    def reserve_assistant_cache(self, num_layers: int) -> None:
        """Give layers < num_layers a second slot region [M, 2M) for assistant rows (before any KV exists)."""
        m = self.num_slots
        self.cache.resize_layers([2 * m if i < num_layers else m for i in range(self.num_layers)])
        self.assistant_cache_layers = num_layers

    def set_num_slots(self, slots: int) -> None:
        """Target slots (and as many assistant slots on layers < the reserve), before any KV exists."""
        self.num_slots = slots
        self.reserve_assistant_cache(self.assistant_cache_layers)

    @torch.inference_mode()
    def probe_kv(self) -> dict[int, tuple]:
        """(K shape, V shape, device) per layer, from a 1-token forward that caches nothing."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        hidden = self.embed(ids)
        rope = {
            kind: self.rotary(hidden, ids, kind) if kind else self.rotary(hidden, ids) for kind in set(self.rope_kinds)
        }
        probe: dict[int, tuple] = {}
        ctx = StepContext(cache=self.cache, prefill=True, groups_by_layer=[], probe=probe)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, position_embeddings=rope[self.rope_kinds[i]], position_ids=ids, slot_ctx=ctx)
        return probe

    def kv_bytes_per_token(self, shapes: dict[int, tuple]) -> list[int]:
        """K + V bytes one token takes on each layer, in the cache dtype."""
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return [(k[1] * k[3] + v[1] * v[3]) * elem for k, v, _ in (shapes[i] for i in range(self.num_layers))]

    def ensure_assistant_cache(self, num_layers: int, name: str = "the assistant") -> None:
        """Room for an assistant of `num_layers` layers; the reserve may only grow while no KV is allocated.

        Reallocating the cache later would drop the KV of every running sequence, so a load that needs
        more than the reserved layers is refused instead (AssistantKVBudgetError).
        """
        if num_layers <= self.assistant_cache_layers:
            return
        if self.cache.allocated():
            raise AssistantKVBudgetError(
                f"{name} needs assistant KV on {num_layers} layers but this engine reserved "
                f"{self.assistant_cache_layers}; restart with --assistant-kv-layers {num_layers} "
                "(or more) to hot-load it"
            )
        self.reserve_assistant_cache(num_layers)

    def _set_row_hooks(self, row_ids: torch.Tensor | None) -> None:
        for hook in self.row_hooks:
            hook.set_rows(row_ids)

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, lora_rows, for_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns hidden states: target [n_target, T, H], assistant [n_a, T, H] | None, and the assistant rows' early
        exits [n_a, T, H] (the target row's hidden state after the same layers: `batch.early_exit_source`) | None.
        The final norm is the LM head's part (`logits`).

        `for_graph`: the CUDA-graph runner's forward (warm-up, capture, and its eager fallback) keeps SDPA's default
        kernels: the warm-up must build what the capture then uses (a cuDNN plan built inside a capture invalidates
        it, seen on an H200), and its key lengths are bucketed (a plan per bucket)."""
        if for_graph:
            return self._forward(batch, lora_rows)
        with eager_attention_backends(self.device):
            return self._forward(batch, lora_rows)

    def _forward(
        self, batch: ForwardBatch, lora_rows
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        hidden = self.embed(batch.input_ids)
        if self.embedding_multiplier is not None:
            hidden = hidden * self.embedding_multiplier
        rope = {
            kind: self.rotary(hidden, batch.position_ids, kind) if kind else self.rotary(hidden, batch.position_ids)
            for kind in set(self.rope_kinds)
        }
        n_t = batch.n_target
        has_assistant = batch.assistant_group is not None
        k_max = max(batch.assistant_exits, default=0) if has_assistant else 0
        below = [batch.target_group] + ([batch.assistant_group] if has_assistant else [])
        ctx = StepContext(
            cache=self.cache,
            prefill=batch.prefill,
            groups_by_layer=[below if i < k_max else [batch.target_group] for i in range(self.num_layers)],
        )
        assistant_hidden = early_exit = None
        source = batch.early_exit_source
        if has_assistant:
            n_a = hidden.shape[0] - n_t
            assistant_hidden = hidden.new_empty(n_a, *hidden.shape[1:])
            if source is not None:
                early_exit = hidden.new_empty(n_a, *hidden.shape[1:])
            lora_rows.set(batch.lora_groups, batch.input_ids.shape[1], plan=batch.lora_plan)
            if self.row_hooks:
                stacked = batch.row_hooks_stacked
                if stacked is None and batch.row_hooks_target is not None:
                    pad = torch.full((n_a,), -1, dtype=torch.long, device=hidden.device)
                    stacked = torch.cat([batch.row_hooks_target, pad])
                self._set_row_hooks(stacked)
        else:
            self._set_row_hooks(batch.row_hooks_target)
        try:
            for i, layer in enumerate(self.layers):
                if has_assistant and i in batch.assistant_exits:
                    rows = batch.assistant_exits[i]
                    assistant_hidden[rows] = hidden[n_t:].index_select(0, rows)
                    if early_exit is not None:
                        early_exit[rows] = hidden.index_select(0, source.index_select(0, rows))
                    if i == k_max:  # the last assistant rows leave: continue with target rows only
                        hidden = hidden[:n_t]
                        rope = {kind: (cos[:n_t], sin[:n_t]) for kind, (cos, sin) in rope.items()}
                        lora_rows.clear()
                        self._set_row_hooks(batch.row_hooks_target)
                hidden = layer(
                    hidden,
                    position_embeddings=rope[self.rope_kinds[i]],
                    position_ids=batch.position_ids[: hidden.shape[0]],
                    slot_ctx=ctx,
                )
            if has_assistant and k_max == self.num_layers:
                rows = batch.assistant_exits[k_max]
                assistant_hidden[rows] = hidden[n_t:].index_select(0, rows)
                if early_exit is not None:
                    early_exit[rows] = hidden.index_select(0, source.index_select(0, rows))
                hidden = hidden[:n_t]
        finally:
            if lora_rows is not None:  # None: a batch without assistant rows (the graphed decode)
                lora_rows.clear()
            self._set_row_hooks(None)
        return hidden, assistant_hidden, early_exit

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on [S, H] hidden states -> float32 [S, V]."""
        # .to: with --device-map auto the head may sit on another GPU than the sampler state (self.device)
        return self._finish_logits(self.lm_head(self.norm(hidden)).float()).to(self.device)

    def _finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own post-processing of LM-head outputs (float32, elementwise)."""
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping is not None:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits

    @property
    def candidate_logits_supported(self) -> bool:
        """Whether `candidate_logits` can slice the head: a plain float nn.Linear (not e.g. bitsandbytes-quantized)."""
        head = self.lm_head
        return type(head) is torch.nn.Linear and head.weight.dtype.is_floating_point

    @torch.inference_mode()
    def candidate_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor | None:
        """Final norm + LM head on [S, H] hidden states for the given [S, M] token ids only -> float32 [S, M]; or on
        [S, P, H] (P states per row sharing its candidates: a gated ULD row's assistant and early exit) -> [S, P, M],
        with the head's rows gathered once.

        None when the head cannot be sliced (`candidate_logits_supported`): use `logits`.
        """
        if not self.candidate_logits_supported:
            return None
        head = self.lm_head
        weight = head.weight
        ids = token_ids.to(weight.device)
        rows = weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[-1])  # [S, M, H]
        normed = self.norm(hidden).to(weight.device, weight.dtype)
        states = normed if normed.dim() == 3 else normed[:, None]  # [S, P, H]
        out = torch.bmm(states, rows.transpose(1, 2))  # [S, P, M]
        if head.bias is not None:
            out = out + head.bias[ids][:, None]
        out = self._finish_logits(out.float()).to(self.device)
        return out if normed.dim() == 3 else out[:, 0]


# SDPA kernels an eager CUDA forward may use: not cuDNN's. Its attention builds an execution plan for every new
# shape (2-3 ms of host time per layer, measured on an H200: 59 ms per eager decode step of a 1B model at 32 rows,
# of which 41 ms in `_cudnn_attention_forward`; 18 ms without it), and an eager decode step's key length grows by one
# every step. CUDA graphs keep the default (`ModelRunner.forward(for_graph=True)`).
EAGER_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def eager_attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA kernels for one eager forward on `device` (a no-op off CUDA)."""
    return sdpa_kernel(EAGER_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()
