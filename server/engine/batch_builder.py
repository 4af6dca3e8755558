"""The batch builder: from the scheduler's sequences to a `ForwardBatch` (host work only).

Decode batches are built in two parts:

* `DecodeState`, once per running set (rebuilt when `scheduler.version` moves): which sequence sits
  on which row, the row count padded to a batch-size bucket (static shapes: one per bucket), the
  sampling tensors, the logprob rows, and each backend's plan (ULD assistant rows and LoRA groups,
  UOE patch ids), all tensors made once;
* `decode_batch(state)`, every step: the newest token and position of every row, written into
  persistent device buffers (one host-to-device copy), and the attention groups.

Attention is mask-free when every row of a group is at the same position (batch 1, or a batch
that started together): SDPA may then use its fused kernels; padding rows take that position too
(their KV goes to free slots, their output is dropped).

A *graphed* decode state (CUDA graphs on, and no row of it selected any unlearning, or only ULD assistants
of one depth K) runs its forward in the `CudaGraphRunner`: the step then only needs the ids and positions in the
buffers and the attention view rounded up to a length bucket; the graph builds its own masks from the positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from unlearn_serve.server.engine.kv_cache import AttnGroup, decode_mask, prefill_mask
from unlearn_serve.server.engine.model_runner import ForwardBatch
from unlearn_serve.server.engine.sampler import SamplingBatch
from unlearn_serve.server.engine.scheduler import Scheduler
from unlearn_serve.server.engine.sequence import Sequence
from unlearn_serve.server.unlearning.base import BatchRows, UnlearningBackend, assistant_sources


def decode_buckets(limit: int) -> list[int]:
    """Decode batch sizes (vLLM's capture sizes): 1, 2, 4, then multiples of 8, then `limit`.

    A handful of static shapes (one CUDA graph each) while padding wastes at most 7 rows."""
    sizes = [n for n in (1, 2, 4) if n < limit] + list(range(8, limit, 8))
    return [*sizes, limit]


def bucket(n: int, limit: int) -> int:
    """The smallest decode bucket holding `n` rows (0 stays 0)."""
    if n == 0:
        return 0
    return next(b for b in decode_buckets(limit) if b >= n)


@dataclass
class DecodeState:
    """Batch tensors that depend only on the running set (rebuilt when `scheduler.version` moves)."""

    version: int
    rows: list[Sequence | None]  # target rows (bucketed; None = padding)
    assistant_rows: list[Sequence | None]  # assistant rows, by assistant slot (bucketed), [] when none
    sampling: SamplingBatch
    plans: list[tuple[UnlearningBackend, Any]]
    batch: ForwardBatch  # the fields that do not change per step (exits, LoRA groups, row hooks)
    logprob_rows: torch.Tensor | None  # target rows that asked for logprobs
    logprob_row_ids: list[int] = field(default_factory=list)  # the same rows, on the host
    logprob_tops: list[int] = field(default_factory=list)
    logprob_top: int = 0
    row_index: torch.Tensor | None = None  # arange(rows), for the penalty counts
    graphed: bool = False  # plain target rows with CUDA graphs on: the forward is a graph replay
    # target rows with ULD assistant rows, CUDA graphs on (ULDPlan.graph): the stacked forward is a graph replay
    uld_graph: Any = None
    # [na] the target row of each assistant row (0 for padding): a chained step copies its token from there
    assistant_source: torch.Tensor | None = None


@dataclass
class PrefillLayout:
    batch: ForwardBatch
    plans: list[tuple[UnlearningBackend, Any]]
    logit_rows: torch.Tensor  # target row of each logits row
    logit_pos: torch.Tensor  # its position
    spans: list[tuple[int, int]]  # per sequence: its logits rows
    last_index: list[int]  # per sequence: the logits row of its last prompt position


class BatchBuilder:
    def __init__(
        self, scheduler: Scheduler, backends: list[UnlearningBackend], num_slots: int, vocab_size: int, device
    ):
        self.scheduler = scheduler
        self.backends = backends
        self.num_slots = num_slots
        self.vocab_size = vocab_size
        self.device = device
        # Persistent inputs of the decode step (target rows, then assistant rows).
        self.input_ids = torch.zeros(2 * num_slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(2 * num_slots, dtype=torch.long, device=device)
        self._state: DecodeState | None = None
        self.graphs = None  # the engine's CudaGraphRunner over these buffers (None: every step eager)
        # CUDA: pinned staging for the host-to-device copies, four in turn (at most two per step). A copy from pageable
        # memory may wait for the stream, which would undo the overlap of asynchronous output processing; a buffer is
        # written again two steps later at the earliest, when the host has waited for the step that read it.
        pinned = torch.device(device).type == "cuda"
        self._stage = [torch.empty(2 * num_slots, dtype=torch.long, pin_memory=True) for _ in range(4 * pinned)]
        self._stage_turn = 0

    def invalidate(self) -> None:
        self._state = None

    def _staged(self, values: list[int]) -> torch.Tensor:
        """`values` as a host tensor to copy from: pinned on CUDA (ids and positions: two buffers per step)."""
        if not self._stage:
            return torch.tensor(values, dtype=torch.long)
        buffer = self._stage[self._stage_turn][: len(values)]
        self._stage_turn = (self._stage_turn + 1) % len(self._stage)
        buffer.copy_(torch.tensor(values, dtype=torch.long))
        return buffer

    # ------------------------------------------------------------------ prefill
    def prefill(self, seqs: list[Sequence]) -> PrefillLayout:
        dev = self.device
        lengths = [s.prompt_len for s in seqs]
        t = max(lengths)
        n = len(seqs)
        ids = torch.zeros(n, t, dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(seq.request.prompt_token_ids)
        ids = ids.to(dev)
        uniform = len(set(lengths)) == 1  # no padding: plain causal attention, no mask tensor
        len_t = torch.tensor(lengths, device=dev)
        mask = None if uniform else prefill_mask(len_t, t)
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        target_group = AttnGroup(0, n, 0, slots=slots, mask=mask, lengths=len_t, padded_len=t)
        uld_idx = [i for i, s in enumerate(seqs) if s.assistant_slot >= 0]
        batch = ForwardBatch(
            input_ids=ids,
            position_ids=torch.arange(t, device=dev)[None].expand(n, t),
            prefill=True,
            n_target=n,
            target_group=target_group,
        )
        if uld_idx:
            sel = torch.tensor(uld_idx, device=dev)
            na = len(uld_idx)
            batch.input_ids = torch.cat([ids, ids[sel]])
            batch.position_ids = torch.arange(t, device=dev)[None].expand(n + na, t)
            m = self.num_slots
            batch.assistant_group = AttnGroup(
                n,
                n + na,
                m,
                slots=torch.tensor([m + seqs[i].assistant_slot for i in uld_idx], device=dev),
                mask=None if mask is None else mask[sel],
                lengths=len_t[sel],
                padded_len=t,
            )
        # Which positions need logits: the last one, or all of them for prompt logprobs.
        flat_rows, flat_pos, last_index, spans = [], [], [], []
        for i, seq in enumerate(seqs):
            start = len(flat_rows)
            positions = range(lengths[i]) if seq.request.params.prompt_logprobs is not None else [lengths[i] - 1]
            flat_rows.extend([i] * len(positions))
            flat_pos.extend(positions)
            spans.append((start, len(flat_rows)))
            last_index.append(len(flat_rows) - 1)
        assistant_row = [-1] * n
        for j, i in enumerate(uld_idx):
            assistant_row[i] = j
        logit_rows = list(zip(flat_rows, flat_pos, strict=True))
        plans = self._prepare([s.request.backend for s in seqs], assistant_row, len(uld_idx), logit_rows, batch)
        return PrefillLayout(
            batch, plans, torch.tensor(flat_rows, device=dev), torch.tensor(flat_pos, device=dev), spans, last_index
        )

    def _prepare(
        self,
        choices: list[Any],
        assistant_row: list[int],
        num_assistant_rows: int,
        logit_rows: list[tuple[int, int]],
        batch: ForwardBatch,
    ) -> list[tuple[UnlearningBackend, Any]]:
        plans = []
        for backend in self.backends:
            own = [c if c is not None and c.name in backend.names() else None for c in choices]
            rows = BatchRows(own, assistant_row, num_assistant_rows, logit_rows, self.device)
            plan = backend.prepare(rows, batch)
            if plan is not None:
                plans.append((backend, plan))
        return plans

    # ------------------------------------------------------------------ decode
    def decode_state(self) -> DecodeState:
        state = self._state
        if state is None or state.version != self.scheduler.version:
            state = self._state = self._build_decode_state()
        return state

    def _build_decode_state(self) -> DecodeState:
        dev = self.device
        sched = self.scheduler
        n = bucket(sched.target_slots.high_water, self.num_slots)
        rows: list[Sequence | None] = [sched.running.get(i) for i in range(n)]
        params = [s.request.params if s else None for s in rows]
        # steps: tokens sampled so far, so that a seeded row's noise stream continues across rebuilds
        steps = [len(s.output_ids) if s else 0 for s in rows]
        sampling = SamplingBatch.build(params, [s.generator if s else None for s in rows], self.vocab_size, dev, steps)
        na = bucket(sched.assistant_slots.high_water, self.num_slots)
        assistant_rows: list[Sequence | None] = [None] * na
        assistant_row = [-1] * n
        for i, seq in enumerate(rows):
            if seq is not None and seq.assistant_slot >= 0:
                assistant_rows[seq.assistant_slot] = seq
                assistant_row[i] = seq.assistant_slot
        if all(s is None for s in assistant_rows):
            assistant_rows, na = [], 0
        batch = ForwardBatch(
            input_ids=self.input_ids[:0],
            position_ids=self.positions[:0],
            prefill=False,
            n_target=n,
            target_group=AttnGroup(0, n, 0),
        )
        choices = [s.request.backend if s else None for s in rows]
        plain = not na and all(c is None for c in choices)  # no unlearning in any row: a graph may run it
        plans = self._prepare(choices, assistant_row, na, [(i, 0) for i in range(n)], batch)
        graphs_on = self.graphs is not None and self.graphs.enabled
        logprob_rows = [i for i, s in enumerate(rows) if s is not None and s.request.params.logprobs is not None]
        tops = [rows[i].request.params.logprobs for i in logprob_rows]
        return DecodeState(
            version=sched.version,
            rows=rows,
            assistant_rows=assistant_rows,
            sampling=sampling,
            plans=plans,
            batch=batch,
            logprob_rows=torch.tensor(logprob_rows, device=dev) if logprob_rows else None,
            logprob_row_ids=logprob_rows,
            logprob_tops=tops,
            logprob_top=max(tops, default=0),
            row_index=torch.arange(n, device=dev),
            graphed=graphs_on and plain and not plans,
            uld_graph=_uld_graph(plans, choices) if graphs_on and na else None,
            assistant_source=torch.tensor(assistant_sources(assistant_row, na), device=dev) if na else None,
        )

    def decode_batch(self, state: DecodeState, chained: torch.Tensor | None = None) -> ForwardBatch:
        """This step's inputs in the persistent buffers, and the attention groups over them.

        `chained`: the previous step's sampled tokens, still on the device and not yet appended to the sequences
        (asynchronous output processing): they are this step's inputs, one position further on."""
        n, na = len(state.rows), len(state.assistant_rows)
        ahead = 0 if chained is None else 1
        ids, pos = _tokens_and_positions(state.rows, ahead)
        a_ids, a_pos = _tokens_and_positions(state.assistant_rows, ahead)
        # one host-to-device copy per buffer (before the masks that read it); the step reads the buffers only
        if chained is None:
            self.input_ids[: n + na].copy_(self._staged(ids + a_ids), non_blocking=True)
        else:  # device to device: the host has not read these tokens yet
            self.input_ids[:n].copy_(chained)
            if na:
                self.input_ids[n : n + na].copy_(chained.index_select(0, state.assistant_source))
        self.positions[: n + na].copy_(self._staged(pos + a_pos), non_blocking=True)
        graphed = state.graphed or state.uld_graph is not None
        if graphed:  # keys up to the length bucket; the graph masks those past each row's position
            view = self.graphs.view_bucket(max(pos + a_pos) + 1)
            target_group = AttnGroup(0, n, 0, positions=self.positions[:n], view_len=view)
        else:
            target_group = _decode_group(0, n, 0, self.positions[:n], pos)
        if na and graphed:  # the same view: an assistant row is at its target row's position
            assistant_group = AttnGroup(n, n + na, self.num_slots, positions=self.positions[n : n + na], view_len=view)
        elif na:
            assistant_group = _decode_group(n, n + na, self.num_slots, self.positions[n : n + na], a_pos)
        batch = state.batch
        batch.input_ids = self.input_ids[: n + na, None]
        batch.position_ids = self.positions[: n + na, None]
        batch.target_group = target_group
        batch.assistant_group = assistant_group if na else None
        return batch


def _uld_graph(plans: list[tuple[UnlearningBackend, Any]], choices: list[Any]) -> Any:
    """The ULD plan's graph inputs when the batch's only unlearning is ULD with graphable rows (one K, few
    adapters: `ULDPlan.graph`), else None. A row of another method (a UOE patch acts inside the forward through
    per-batch host plans) keeps the batch eager."""
    if len(plans) != 1:
        return None
    backend, plan = plans[0]
    inputs = getattr(plan, "graph", None)
    owned = set(backend.names())
    return inputs if inputs is not None and all(c is None or c.name in owned for c in choices) else None


def _tokens_and_positions(rows: list[Sequence | None], ahead: int = 0) -> tuple[list[int], list[int]]:
    """Newest token and its position per row; padding rows take the real rows' position when they all
    share one (so the group needs no mask), else 0. `ahead`: tokens sampled but not yet appended to the sequences
    (the positions are that much further on; the ids are not known here)."""
    live = [s.total_len - 1 + ahead for s in rows if s is not None]
    pad = live[0] if live and min(live) == max(live) else 0
    ids = [s.output_ids[-1] if s is not None else 0 for s in rows]
    pos = [s.total_len - 1 + ahead if s is not None else pad for s in rows]
    return ids, pos


def _decode_group(start: int, end: int, slot_offset: int, positions: torch.Tensor, host_pos: list[int]) -> AttnGroup:
    view = max(host_pos) + 1
    uniform = min(host_pos) == max(host_pos)  # every row sees keys 0..p: no mask needed
    mask = None if uniform else decode_mask(positions, view)
    return AttnGroup(start, end, slot_offset, positions=positions, mask=mask, view_len=view)
