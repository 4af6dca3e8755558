"""CUDA graphs for the decode step: one captured target forward per (batch bucket, length bucket).

A decode step launches a few hundred small kernels; on a GPU, launching them from Python costs more
than running them. A CUDA graph records those kernels once and replays them with one launch. A graph
replays the same kernels on the same memory, so everything a step varies must live in memory the
graph reads, at fixed shapes:

* rows: the batch is padded to a decode bucket (1, 2, 4, multiples of 8: `batch_builder.decode_buckets`);
  row i is slot i, and a padding row writes its K/V into its own free slot (no live KV is touched);
* keys: attention reads the first `view` positions of each slot, `view` rounded up to a length bucket
  (16, 32, 64, ... up to max_model_len); keys past a row's position are hidden by a mask built inside
  the graph from the positions buffer;
* inputs: token ids and positions are the batch builder's persistent buffers, written before replay;
* output: float32 logits, copied inside the graph into one persistent buffer shared by all graphs.

Which batches are graphed: those of plain target rows (`logits`), and those whose only unlearning is ULD with
assistants of one depth K (`uld_logits`: the stacked target + assistant forward, every assistant row's LoRA taken
from a fixed plan over persistent buffers, `uld.fixed_plan`; one graph per adapter layout, since a load or unload
restacks the LoRA weights). A UOE patch row acts inside the forward through per-batch host plans (per-row expert
hooks) that a graph would freeze, so its batches run eagerly; the hooks stay on the model and take the base path
for plain rows. The ULD combination, the sampler (penalties, filters, seeded noise) and logprobs run eagerly after
the replay, on the graph's outputs, as vLLM's sampler does.

Graphs are captured lazily, the first time a (rows, view) pair is met, on the step's real inputs: the
warm-up run and the replay write the same K/V to the same places, so capturing mid-serving is safe. All
graphs share one memory pool. The mechanism is injectable (`GraphCapture`): the tests drive the same
code on CPU with a stand-in that records the step's tensor ops once and replays them on the same
memory (tests/graph_standin.py). On CPU the engine runs eager (torch.compile measured slower there);
`EngineConfig.enforce_eager` (`--enforce-eager`) turns graphs off on CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch
from unlearn_serve.server.engine.kv_cache import AttnGroup, decode_mask
from unlearn_serve.server.engine.model_runner import ForwardBatch, ModelRunner
from unlearn_serve.server.unlearning.backends import ULDGraphInputs
from unlearn_serve.server.unlearning.uld import LoRARowContext, fixed_plan

log = logging.getLogger("unlearn_serve")


def length_buckets(max_len: int, smallest: int = 16) -> list[int]:
    """Attention view lengths a graph is captured for: 16, 32, 64, ... below `max_len`, then `max_len`."""
    sizes = []
    size = smallest
    while size < max_len:
        sizes.append(size)
        size *= 2
    return [*sizes, max_len]


class GraphCapture(Protocol):
    """How a function is captured: `capture(fn)` records `fn` (which reads and writes only tensors that
    outlive it) and returns `replay()`, which redoes the recorded work on that same memory."""

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]: ...


class CudaGraphCapture:
    """torch.cuda.CUDAGraph capture: warm-up on a side stream, then capture into a shared memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()  # warm-up: lazy initialisation (cuBLAS workspaces, kernel choice) outside the capture
        current.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (artifact loads, the HTTP side) may use CUDA during the capture
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            fn()
        return graph.replay


def graph_unsupported(model: torch.nn.Module) -> str | None:
    """Why the decode step of `model` must not be graphed (None: it may)."""
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) > 1:
        return "the model is spread over several devices (--device-map)"
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "bitsandbytes-quantized layers"
    rope = str(getattr(model.get_decoder().rotary_emb, "rope_type", "default"))
    if "dynamic" in rope or rope == "longrope":  # their RoPE reads the positions back to the host
        return f"{rope} rotary embeddings"
    return None


class CudaGraphRunner:
    """The decode forward over the builder's persistent buffers, one graph per shape: plain target rows per (rows,
    view) bucket pair (`logits`), and target rows stacked with ULD assistant rows per (rows, assistant rows, view,
    K, adapter layout) (`uld_logits`)."""

    def __init__(
        self,
        runner: ModelRunner,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        max_rows: int,
        vocab_size: int,
        max_len: int,
        capture: GraphCapture,
    ):
        self.runner = runner
        self.input_ids, self.positions = input_ids, positions
        self.lengths = length_buckets(max_len)
        self.max_rows = max_rows
        self.logits_out = torch.empty(max_rows, vocab_size, dtype=torch.float32, device=runner.device)
        self.capturer = capture
        self.graphs: dict[tuple, Callable[[], None]] = {}
        self.enabled = True  # False after a failed capture: every step then runs eagerly
        # ULD: the assistant rows' final hidden states, and the per-row adapter columns (made on first use)
        self.assistant_out: torch.Tensor | None = None
        self.early_exit_out: torch.Tensor | None = None  # their early exits (gated rows; made on first use)
        self.early_exit_source: torch.Tensor | None = None  # per assistant row its target row (gated rows)
        self.lora_mask: torch.Tensor | None = None
        self.layout_version = -1

    def view_bucket(self, view_len: int) -> int:
        """The length bucket holding `view_len` keys."""
        return next(n for n in self.lengths if n >= view_len)

    def logits(self, rows: int, view: int) -> torch.Tensor:
        """float32 [rows, V] logits of this step's inputs (already in the buffers)."""
        self._run((rows, view), lambda: self._forward(rows, view))
        return self.logits_out[:rows]

    def uld_logits(
        self, rows: int, assistant_rows: int, view: int, inputs: ULDGraphInputs, lora_rows: LoRARowContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """float32 [rows, V] target logits, the [assistant_rows, 1, H] assistant hidden states and, when
        `inputs.early_exit_source` is set, their early exits, of this step's inputs: target rows [0, rows) and
        assistant rows [rows, rows + assistant_rows) of the buffers."""
        self._use_layout(inputs)
        if inputs.lora_mask is not None:
            self.lora_mask[:assistant_rows].copy_(inputs.lora_mask)
        early = inputs.early_exit_source is not None
        if early:
            self._use_early_exit()
            self.early_exit_source[:assistant_rows].copy_(inputs.early_exit_source)
        key = (rows, view, assistant_rows, inputs.num_layers, inputs.layout_version, early)
        self._run(key, lambda: self._forward_uld(rows, assistant_rows, view, inputs.num_layers, lora_rows, early))
        early_exit = self.early_exit_out[:assistant_rows] if early else None
        return self.logits_out[:rows], self.assistant_out[:assistant_rows], early_exit

    def _use_early_exit(self) -> None:
        """The persistent buffers of gated rows' early exits (their source rows in, their hidden states out)."""
        if self.early_exit_out is None:
            self.early_exit_out = torch.zeros_like(self.assistant_out)
            self.early_exit_source = torch.zeros(self.max_rows, dtype=torch.long, device=self.runner.device)

    def _use_layout(self, inputs: ULDGraphInputs) -> None:
        """The LoRA column buffers for `inputs`' adapter layout. A load or unload restacks every adapter's A/B into
        new tensors, which the graphs of the previous layout still point at: those are dropped."""
        if inputs.layout_version == self.layout_version:
            return
        self.graphs = {key: g for key, g in self.graphs.items() if len(key) == 2}
        device = self.runner.device
        mask = inputs.lora_mask
        self.lora_mask = None if mask is None else mask.new_zeros(self.max_rows, mask.shape[1])
        if self.assistant_out is None:
            hidden = self.runner.embed.weight.shape[1]
            self.assistant_out = torch.zeros(self.max_rows, 1, hidden, dtype=self.runner.dtype, device=device)
        self.layout_version = inputs.layout_version

    def _run(self, key: tuple, forward: Callable[[], None]) -> None:
        """Replay the graph of `key` (captured on first use); eager when graphs are off or its capture failed."""
        replay = self.graphs.get(key) if self.enabled else None
        if replay is None and self.enabled:
            replay = self._capture(key, forward)
        if replay is not None:
            replay()
        else:
            forward()

    def _capture(self, key: tuple, forward: Callable[[], None]) -> Callable[[], None] | None:
        try:
            replay = self.capturer.capture(forward)
        except Exception as exc:  # an op that cannot be captured: serve eagerly rather than fail
            self.enabled = False
            self.graphs.clear()
            log.warning("CUDA graph capture failed (shape %s), decoding eagerly from now on: %s", key, exc)
            return None
        self.graphs[key] = replay
        return replay

    def _forward(self, rows: int, view: int) -> None:
        """What a graph holds: the forward of rows [0, rows) over keys [0, view), LM head, copy to the output."""
        positions = self.positions[:rows]
        group = AttnGroup(0, rows, 0, positions=positions, mask=decode_mask(positions, view), view_len=view)
        batch = ForwardBatch(
            input_ids=self.input_ids[:rows, None],
            position_ids=positions[:, None],
            prefill=False,
            n_target=rows,
            target_group=group,
        )
        hidden, _, _ = self.runner.forward(batch, None, for_graph=True)
        self.logits_out[:rows].copy_(self.runner.logits(hidden[:, 0]))

    def _forward_uld(
        self, rows: int, na: int, view: int, num_layers: int, lora_rows: LoRARowContext, early_exit: bool
    ) -> None:
        """What a ULD graph holds: target rows as in `_forward`, and assistant rows (every one of them, padding too:
        a padding row has no LoRA columns and writes its K/V into its own free slot) through layers < K with their
        adapters' LoRA, stacked under them; target logits and assistant hidden states (and, `early_exit`, their
        target rows' hidden states after layer K) copied to the outputs."""
        positions, assistant_positions = self.positions[:rows], self.positions[rows : rows + na]
        target = AttnGroup(0, rows, 0, positions=positions, mask=decode_mask(positions, view), view_len=view)
        assistant = AttnGroup(
            rows,
            rows + na,
            self.runner.num_slots,
            positions=assistant_positions,
            mask=decode_mask(assistant_positions, view),
            view_len=view,
        )
        device = self.runner.device
        every = torch.arange(na, device=device)
        mask = None if self.lora_mask is None else self.lora_mask[:na]
        batch = ForwardBatch(
            input_ids=self.input_ids[: rows + na, None],
            position_ids=self.positions[: rows + na, None],
            prefill=False,
            n_target=rows,
            target_group=target,
            assistant_group=assistant,
            assistant_exits={num_layers: every},
            lora_plan=fixed_plan(rows, na, mask, device),
            early_exit_source=self.early_exit_source[:na] if early_exit else None,
        )
        hidden, assistant_hidden, early = self.runner.forward(batch, lora_rows, for_graph=True)
        self.logits_out[:rows].copy_(self.runner.logits(hidden[:, 0]))
        self.assistant_out[:na].copy_(assistant_hidden)
        if early_exit:
            self.early_exit_out[:na].copy_(early)
