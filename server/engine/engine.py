"""The generation engine: continuous batching over one model, unlearning chosen per request.

The engine is the step loop; its parts (docs/architecture.md, "The engine"):

    ArtifactManager   load, pin, unload artifacts of every UnlearningBackend (ULD, UOE)
    Scheduler         waiting queue, slot pools (admission by free KV slots)
    BatchBuilder      sequences -> ForwardBatch: persistent input buffers, bucketed decode rows
    ModelRunner       one forward over target + assistant rows, on the slot KV cache
    CudaGraphRunner   CUDA: the decode forward of plain target rows, one graph per bucket (cuda_graphs.py)
    sampler           penalties, filters, sampling (batched tensor ops)
    OutputProcessor   sampled ids -> detokenized, stop-checked deltas -> RequestOutputs

A step is either a batched prefill of newly admitted sequences or one decode token for every
running sequence. The decode step (`_decode_step`) is tensor-only: no host sync inside; its one
device-to-host transfer is the sampled ids (and the logprobs asked for).

The engine knows nothing of HTTP. It is driven either by `generate()`/`score()` (synchronous,
for training/evaluation code) or by `AsyncEngine`, which runs `step()` on a background thread.
Other threads talk to it only through `add_request`, `abort` and `call_soon` (an inbox).
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from unlearn_serve.server.engine.artifact_manager import ArtifactManager
from unlearn_serve.server.engine.batch_builder import BatchBuilder, DecodeState
from unlearn_serve.server.engine.cuda_graphs import CudaGraphCapture, CudaGraphRunner, GraphCapture, graph_unsupported
from unlearn_serve.server.engine.errors import EngineInputError, UnknownArtifactError
from unlearn_serve.server.engine.kv_budget import (
    KVLayout,
    activation_estimate,
    cuda_budget,
    plan_slots,
)
from unlearn_serve.server.engine.model_runner import ModelRunner
from unlearn_serve.server.engine.output_processor import (
    OutputProcessor,
    finite_logprobs,
    logprob_entries,
    prompt_logprobs,
)
from unlearn_serve.server.engine.repeat_guard import (
    DEFAULT_NO_REPEAT_NGRAM,
    guard_substitutions,
    repeat_completions,
    substituted_rows,
)
from unlearn_serve.server.engine.sampler import SamplingBatch, apply_penalties, gather_logprobs, row_argmax, sample
from unlearn_serve.server.engine.sampling_params import SamplingParams, SamplingParamsError
from unlearn_serve.server.engine.scheduler import Scheduler
from unlearn_serve.server.engine.sequence import (
    Request,
    RequestOutput,
    Selection,
    Sequence,
    TokenLogprob,
)
from unlearn_serve.server.unlearning.backends import PatchChoice, ULDBackend, ULDChoice, UOEBackend
from unlearn_serve.server.unlearning.uld import Assistant

from unlearn_serve.artifact import fingerprint_model
from unlearn_serve.token_prefixes import TokenPrefixes

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineInputError",
    "GenerationResult",
    "PatchChoice",
    "ULDChoice",
    "UnknownArtifactError",
]


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_model_len: int | None = None  # default: min(model's max positions, 4096)
    max_prefill_tokens: int = 8192  # rows x padded prompt length per prefill step
    max_n: int = 16
    max_logprobs: int = 20
    # Layers of KV reserved for ULD assistant rows (a second slot region on layers < this), sized at
    # build so that loading an assistant while requests run never reallocates live KV. None: a quarter
    # of the model's layers, raised to the K of assistants loaded before the first request. 0: none.
    assistant_kv_layers: int | None = None
    # KV budget in bytes (CPU; on CUDA it overrides gpu_memory_utilization). None on CPU: one slot per
    # max_num_seqs. The slots it holds (at most max_num_seqs) are the sequences that run at once.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9  # CUDA: share of the device's memory the process may use
    # Decode step without any device read (ULD then scores the assistant on the whole vocabulary).
    # None: on CUDA only, where a read stalls the launch queue; on CPU a read costs nothing.
    sync_free_decode: bool | None = None
    # CUDA: no CUDA graphs, every decode step eager (--enforce-eager). On CPU the engine always runs eager.
    enforce_eager: bool = False
    # n-gram size: where the unlearning replaced the target's best token, candidates that would repeat an n-gram of
    # the answer are removed (server/engine/repeat_guard.py). 0: off; None: DEFAULT_NO_REPEAT_NGRAM.
    no_repeat_substitution: int | None = None
    # The repeat guard's reach: from the first position where the unlearning changed an answer on, every later position
    # of that answer (True), or only the changed positions themselves (False). A small target steered off the fact it
    # wanted to write often loops on its own a few tokens later ("a fantasy fantasy fantasy ..."); an answer the
    # unlearning never changed is the target's own either way (repeat_guard.py).
    repeat_guard_after_substitution: bool = True
    # Asynchronous output processing: a decode step is launched before the previous step's tokens are read back and
    # processed (detokenised, stop rules), so the host's work overlaps the device's. None: on CUDA only (on CPU the
    # host does the device's work itself: nothing to overlap). Outputs then come one step later.
    async_output: bool | None = None


@dataclass
class _PendingStep:
    """A launched decode step: its tokens on the device (a chained step's inputs) and their host copies."""

    state: DecodeState
    tokens: torch.Tensor
    host_tokens: torch.Tensor
    logprobs: tuple | None  # host copies of gather_logprobs' (chosen, top values, top ids)
    done: torch.cuda.Event | None  # recorded after the copies (CUDA); None on CPU


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None
    completions: list[Completion] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: EngineConfig | None = None,
        model_name: str = "model",
        graph_capture: GraphCapture | None = None,
    ):
        """`graph_capture`: how decode graphs are captured (default: CUDA graphs on CUDA, none on CPU)."""
        self.config = config or EngineConfig()
        self._graph_capture = graph_capture
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        # Fingerprint before anything (patches, hooks) touches the model.
        self.fingerprint = fingerprint_model(model)
        max_pos = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_model_len = int(self.config.max_model_len or min(max_pos, 4096))
        self.runner = ModelRunner(model, self.config.max_num_seqs, self.max_model_len)
        reserve = self.config.assistant_kv_layers
        if reserve is None:
            reserve = math.ceil(self.runner.num_layers / 4)
        self.runner.reserve_assistant_cache(min(max(int(reserve), 0), self.runner.num_layers))
        self.device = self.runner.device
        self.vocab_size = int(self.runner.lm_head.weight.shape[0])
        # KV budget: probe the per-layer K/V shapes, then size the slots (refused if not even one fits)
        self._kv_shapes = self.runner.probe_kv()
        self.scheduler = Scheduler(self._plan_slots(), self.config.max_prefill_tokens)
        self.requests: dict[str, Request] = {}
        self.eos_token_ids = self._eos_ids()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # sequences of requests added but not yet drained into the scheduler (counted as waiting: admission control
        # must see a burst before the engine thread's next step moves it)
        self._inbox_sequences = 0
        self._inbox_lock = threading.Lock()
        self.wakeup = threading.Event()
        self.engine_thread: threading.Thread | None = None  # set by AsyncEngine
        self.uld = ULDBackend(model, self.fingerprint, model_name, self.runner)
        self.uld.prefixes_factory = lambda: TokenPrefixes.from_tokenizer(tokenizer, self.vocab_size).to(self.device)
        self.uoe = UOEBackend(model, self.fingerprint, model_name, self.runner)
        sync_free = self.config.sync_free_decode
        self.uld.sync_free = self.device.type == "cuda" if sync_free is None else sync_free
        self.artifacts = ArtifactManager(
            [self.uld, self.uoe], model_name, self.call_soon, self._on_engine_thread, self.wakeup
        )
        self.output = OutputProcessor(
            tokenizer, self.eos_token_ids, self.max_model_len, self.scheduler, self.requests, self.artifacts.unpin
        )
        self.builder: BatchBuilder | None = None  # made with the KV allocation, when the slot count is final
        self.graphs: CudaGraphRunner | None = None  # made with the builder, unless eager
        self._last_step_prefilled = False
        self._pending: _PendingStep | None = None  # a launched decode step whose tokens are not yet processed
        async_output = self.config.async_output
        self.async_output = self.device.type == "cuda" if async_output is None else async_output
        self._ids = itertools.count()
        m = self.config.max_num_seqs
        # Penalty state per target slot: prompt tokens seen, output token counts.
        self._prompt_mask = torch.zeros(m, self.vocab_size, dtype=torch.bool, device=self.device)
        self._output_counts = torch.zeros(m, self.vocab_size, dtype=torch.int32, device=self.device)
        # The repeat guard's state per target slot: the output so far and its length (repeat_guard.py).
        self._guard_n = 0
        self._history = torch.zeros(m, 0, dtype=torch.int32, device=self.device)
        self._history_len = torch.zeros(m, dtype=torch.long, device=self.device)
        # per slot: the unlearning changed this answer at some position (the guard's reach, EngineConfig)
        self._diverged = torch.zeros(m, dtype=torch.bool, device=self.device)
        n = self.config.no_repeat_substitution
        self.set_no_repeat_substitution(DEFAULT_NO_REPEAT_NGRAM if n is None else n)

    @classmethod
    def from_pretrained(cls, model: str, config: EngineConfig | None = None, **load_kwargs) -> Engine:
        from unlearn_serve.loading import load_model_and_tokenizer

        hf_model, tokenizer = load_model_and_tokenizer(model, **load_kwargs)
        return cls(hf_model, tokenizer, config, model_name=model)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list | tuple):
                ids.update(int(i) for i in source)
        return ids

    def _on_engine_thread(self) -> bool:
        return self.engine_thread is None or threading.current_thread() is self.engine_thread

    # ================================================================== KV budget
    def kv_layout(self) -> KVLayout:
        return KVLayout(
            self.runner.kv_bytes_per_token(self._kv_shapes), self.max_model_len, self.runner.assistant_cache_layers
        )

    def _plan_slots(self) -> int:
        cfg = self.config
        budget, source = cfg.kv_cache_memory, "--kv-cache-memory"
        if budget is None and self.device.type == "cuda":
            hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
            elem = torch.empty(0, dtype=self.runner.dtype).element_size()
            activations = activation_estimate(
                cfg.max_prefill_tokens, hidden, self.vocab_size, cfg.max_num_seqs, elem, graphs=not cfg.enforce_eager
            )
            budget = cuda_budget(self.device, cfg.gpu_memory_utilization, activations)
            source = f"--gpu-memory-utilization {cfg.gpu_memory_utilization}"
        slots = plan_slots(self.kv_layout(), budget, cfg.max_num_seqs, source)
        self.runner.set_num_slots(slots)
        return slots

    def allocate_kv(self) -> None:
        """Allocate the whole KV cache (once, before the first request is served; the CLI calls it after
        loading the start-up artifacts, whose depth may have raised the assistant reserve)."""
        if self.builder is not None:
            return
        slots = self._plan_slots()  # the reserve may have grown since __init__
        if slots != self.scheduler.max_num_seqs:
            self.scheduler.resize(slots)
        self.runner.cache.allocate(self._kv_shapes)
        self.builder = BatchBuilder(self.scheduler, self.artifacts.backends, slots, self.vocab_size, self.device)
        self.graphs = self.builder.graphs = self._graph_runner(slots)
        self.uld.graphs = self.graphs is not None

    def _graph_runner(self, slots: int) -> CudaGraphRunner | None:
        capture = self._graph_capture
        if self.config.enforce_eager or (capture is None and self.device.type != "cuda"):
            return None  # CPU: eager (torch.compile measured slower there, docs/benchmarks.md)
        reason = graph_unsupported(self.model)
        if reason is not None:
            logging.getLogger("unlearn_serve").info("CUDA graphs off: %s", reason)
            return None
        b, capture = self.builder, capture or CudaGraphCapture(self.device)
        return CudaGraphRunner(
            self.runner, b.input_ids, b.positions, slots, self.vocab_size, self.max_model_len, capture
        )

    @property
    def num_slots(self) -> int:
        """Sequences that can run at once (the KV budget's slots, at most max_num_seqs)."""
        return self.scheduler.max_num_seqs

    # ================================================================== thread-safe API
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        try:
            # n above the slot count could never be admitted and would block the queue behind it
            params.validate(self.vocab_size, min(self.config.max_n, self.num_slots), self.config.max_logprobs)
        except SamplingParamsError as exc:
            raise EngineInputError(str(exc), exc.param) from None
        if not prompt_token_ids:
            raise EngineInputError("the prompt is empty", "prompt")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineInputError(f"prompt token id {bad[0]} is outside the vocabulary", "prompt")
        n = len(prompt_token_ids)
        if n + params.max_tokens > self.max_model_len or n >= self.max_model_len:
            raise EngineInputError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                "max_tokens" if n < self.max_model_len else "prompt",
            )

    def resolve(self, selection: Selection | None):
        return self.artifacts.resolve(selection)

    def add_request(self, request: Request) -> None:
        """Validate, resolve the unlearning selection, pin its artifact and queue (any thread)."""
        self.check_request(request.prompt_token_ids, request.params)
        self.artifacts.pin(request)
        with self._inbox_lock:
            self._inbox_sequences += len(request.sequences)
        self._inbox.put(("add", request))
        self.wakeup.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self.wakeup.set()

    def call_soon(self, fn) -> Future:
        """Run `fn()` on the engine thread between steps (directly when no thread runs the engine)."""
        future: Future = Future()
        if self._on_engine_thread():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
            return future
        self._inbox.put(("call", (fn, future)))
        self.wakeup.set()
        return future

    # ================================================================== artifacts
    @property
    def assistants(self):
        """The ULD assistant registry."""
        return self.uld.registry

    @property
    def patches(self):
        """The UOE ExpertPatchSet (None until the first patch loads)."""
        return self.uoe.patches

    def artifact_names(self) -> list[str]:
        return self.artifacts.names()

    def load_uld(self, name: str, path) -> Assistant:
        return self.artifacts.load("uld", name, path)

    def load_uoe(self, name: str, path) -> int:
        return self.artifacts.load("uoe", name, path)

    def unload(self, name: str) -> threading.Event:
        """Stop accepting requests for `name`; it is removed once every request that pinned it has finished."""
        return self.artifacts.unload(name)

    # ================================================================== stepping
    def has_work(self) -> bool:
        return bool(
            self._pending is not None
            or self.scheduler.waiting
            or self.scheduler.running
            or not self._inbox.empty()
            or self.artifacts.pending_unloads
        )

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        """Sequences queued for a batch slot, those still in the inbox included."""
        return self.scheduler.num_waiting_sequences() + self._inbox_sequences

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.requests[item.request_id] = item
                self.scheduler.add(item)
                with self._inbox_lock:
                    self._inbox_sequences -= len(item.sequences)
            elif kind == "abort":
                self._abort(item)
            elif kind == "call":
                fn, future = item
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

    def _abort(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return
        request.aborted = True
        self.scheduler.remove_waiting(request)
        for seq in request.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
            self.scheduler.release(seq)
        self.output.emit(request, request.sequences)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an unexpected step failure: end every request with an error, free every slot."""
        self.output.take()
        self._pending = None  # its tokens belong to requests ended here
        for request in list(self.requests.values()):
            if request.finished:
                continue
            self.scheduler.remove_waiting(request)
            for seq in request.sequences:
                if seq.finish_reason is None:
                    seq.finish_reason = "abort"
                self.scheduler.release(seq)
            self.output.emit(request, request.sequences, error=message)
        if self.builder is not None:
            self.builder.invalidate()
        return self.output.take()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        self.output.take()  # before the inbox: aborts handled there emit their final output too
        self._drain_inbox()
        self.allocate_kv()  # no-op after the first step
        # At least one decode step between two prefills while sequences run: a steady stream of
        # arrivals must not stall the running streams (each prefill is bounded by max_prefill_tokens).
        may_prefill = not (self.scheduler.running and self._last_step_prefilled)
        if self._pending is not None and self.scheduler.waiting and may_prefill:
            self._flush()  # its finishes free slots for the admission; a prefill changes the running set
        admitted = self.scheduler.admit() if self.scheduler.waiting and may_prefill else []
        self._last_step_prefilled = bool(admitted)
        if admitted:
            self._prefill(admitted)
        elif self.scheduler.running:
            self._decode()
        else:
            self._flush()
        if self.artifacts.pending_unloads:
            self.artifacts.finish_unloads()
        return self.output.take()

    # ------------------------------------------------------------------ prefill
    def _prefill(self, seqs: list[Sequence]) -> None:
        dev = self.device
        for seq in seqs:
            request = seq.request
            if request.scheduled_time is None:
                request.scheduled_time = time.monotonic()
            if request.params.seed is not None:
                seq.generator = torch.Generator(device=dev).manual_seed(request.params.seed + seq.index)
        layout = self.builder.prefill(seqs)
        hidden_t, hidden_a, early_a = self.runner.forward(layout.batch, self.assistants.rows)
        logits = self.runner.logits(hidden_t[layout.logit_rows, layout.logit_pos])
        last_index = torch.tensor(layout.last_index, device=dev)
        guarded = self._guarded(layout.plans)
        if guarded:
            target_best = row_argmax(logits[last_index])
        for backend, plan in layout.plans:
            logits = backend.process_logits(plan, logits, hidden_a, early_a)
        for i, seq in enumerate(seqs):
            request = seq.request
            k = request.params.prompt_logprobs
            if k is not None and request.prompt_logprobs is None:
                start, end = layout.spans[i]
                request.prompt_logprobs = prompt_logprobs(logits[start:end], request.prompt_token_ids, k)

        last = logits[last_index]
        params = [s.request.params for s in seqs]
        sampling = SamplingBatch.build(params, [s.generator for s in seqs], self.vocab_size, dev)
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        if sampling.any_penalty:
            self._prompt_mask[slots] = False
            self._output_counts[slots] = 0
            for seq in seqs:
                if seq.request.params.needs_penalties:
                    self._prompt_mask[seq.slot, torch.tensor(seq.request.prompt_token_ids, device=dev)] = True
        processed = apply_penalties(last, sampling, self._prompt_mask[slots], self._output_counts[slots])
        tokens = sample(processed, sampling)
        if sampling.any_penalty:
            self._output_counts[slots, tokens] += 1
        if guarded:
            self._history[slots, 0] = tokens.to(self._history.dtype)
            self._history_len[slots] = 1
            self._diverged[slots] = substituted_rows(last, target_best)
        else:  # a slot's last sequence may have diverged; these rows may later decode in a guarded batch
            self._diverged[slots] = False
        want = [i for i, s in enumerate(seqs) if s.request.params.logprobs is not None]
        entries = self._token_logprobs(last, tokens, want, [seqs[i].request.params.logprobs for i in want])
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            if seq.request.params.max_tokens == 0:  # echo/scoring only: nothing to generate
                seq.finish_reason = "length"
                self.scheduler.release(seq)
                continue
            self.output.append(seq, token, entries.get(i))
        self.output.emit_many(seqs)

    def _token_logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], tops: list[int]
    ) -> dict[int, TokenLogprob]:
        if not rows:
            return {}
        idx = torch.tensor(rows, device=self.device)
        chosen, top_v, top_i = gather_logprobs(finite_logprobs(logits[idx]), tokens[idx], max(tops))
        return dict(zip(rows, logprob_entries(tokens[idx].tolist(), chosen, top_v, top_i, tops), strict=True))

    # ------------------------------------------------------------------ decode
    def _decode(self) -> None:
        """Launch one decode step; process its tokens now, or (asynchronous output processing) at the next call,
        after launching the next step from those tokens while they are still on the device (a *chained* step).

        A step is chained only onto a step of the same running set (no arrival, finish or abort in between) none of
        whose sequences that step finishes by length; otherwise the pending step is processed first and the next
        one built from the sequences. A sequence finished by its pending token (EOS, a stop rule) still gets the
        chained step's token, which is dropped: its K/V lands in its own slot, freed the next moment."""
        pending, self._pending = self._pending, None
        state = self.builder.decode_state()
        chain = pending is not None and pending.state is state and not self._length_finish_ahead(state)
        if pending is not None and not chain:
            self._process(pending)
            if not self.scheduler.running:
                return
            state = self.builder.decode_state()
        launched = self._launch(state, pending.tokens if chain else None)
        if chain:
            self._process(pending)
        if self.async_output:
            self._pending = launched
        else:
            self._process(launched)

    def _flush(self) -> None:
        """Process the pending decode step, if any (before a prefill, which changes the running set)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._process(pending)

    def _length_finish_ahead(self, state) -> bool:
        """Whether the pending token finishes some running sequence by length (max_tokens, the context): a chained
        step would then write its K/V past what that sequence may hold."""
        limit = self.max_model_len
        return any(
            s is not None and (len(s.output_ids) + 1 >= s.request.params.max_tokens or s.total_len + 1 >= limit)
            for s in state.rows
        )

    def _launch(self, state: DecodeState, chained: torch.Tensor | None) -> _PendingStep:
        """Build the inputs, run the step and start copying its tokens (and logprobs) to the host."""
        batch = self.builder.decode_batch(state, chained)
        # the repeat guard scans the outputs so far (their lengths are on the host): a power-of-two width, few shapes
        ahead = 0 if chained is None else 1
        guard_width = self._guard_scan_width(state.rows, ahead) if self._guarded(state.plans) else 0
        tokens, logprobs = self._decode_step(state, batch, guard_width=guard_width)
        host = [self._copy_to_host(t) for t in (tokens, *(logprobs or ()))]
        done = None
        if tokens.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return _PendingStep(state, tokens, host[0], tuple(host[1:]) if logprobs is not None else None, done)

    def _process(self, step: _PendingStep) -> None:
        """Wait for a launched step's host copies, then append its tokens to their sequences and emit."""
        if step.done is not None:
            step.done.synchronize()
        token_list = step.host_tokens.tolist()
        state = step.state
        entries: dict[int, TokenLogprob] = {}
        if step.logprobs is not None:
            rows = state.logprob_row_ids
            chosen = logprob_entries([token_list[r] for r in rows], *step.logprobs, state.logprob_tops)
            entries = dict(zip(rows, chosen, strict=True))
        active = []
        for i, seq in enumerate(state.rows):
            if seq is None or seq.finish_reason is not None:
                continue
            self.output.append(seq, token_list[i], entries.get(i))
            active.append(seq)
        self.output.emit_many(active)

    @property
    def no_repeat_substitution(self) -> int:
        """The repeat guard's n-gram size (0 = off)."""
        return self._guard_n

    def set_no_repeat_substitution(self, n: int) -> None:
        """The repeat guard's n-gram size (0 = off; `EngineConfig.no_repeat_substitution`). Only while no sequence
        runs: the guard reads each answer's history, which is written only while it is on."""
        if n < 0:
            raise ValueError(f"no_repeat_substitution must be >= 0 (got {n})")
        if self.scheduler.running:
            raise RuntimeError("the repeat guard can only be switched while no sequence runs")
        self._guard_n = int(n)
        if n and not self._history.shape[1]:
            self._history = torch.zeros(len(self._history), self.max_model_len, dtype=torch.int32, device=self.device)

    def _guard_scan_width(self, rows: list[Sequence | None], ahead: int = 0) -> int:
        """Columns of the output history the guard scans this step: the longest output so far (`ahead`: tokens
        sampled but not yet appended), rounded up to a power of two (a few distinct shapes)."""
        longest = max(len(s.output_ids) for s in rows if s is not None) + ahead
        return min(self._history.shape[1], 1 << max(4, longest.bit_length()))

    def _guarded(self, plans: list) -> bool:
        """Whether the repeat guard runs for a batch with these backend plans: on, and some backend decides tokens
        after the forward (ULD). Host-side, decided per batch composition's plans."""
        return bool(self._guard_n) and any(backend.changes_logits for backend, _ in plans)

    @staticmethod
    def _copy_to_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
        """A non-blocking copy into pinned memory (read after the step's event); on CPU the tensor itself."""
        if tensor is None or tensor.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def _decode_step(
        self, state: DecodeState, batch, guard_width: int | None = None
    ) -> tuple[torch.Tensor, tuple | None]:
        """One token for every row: forward -> unlearning backends -> repeat guard -> penalties -> sample.

        `guard_width`: columns of the output history the repeat guard scans (`_guard_scan_width`, computed by the
        caller on the host, which has decided whether the guard runs: 0 = it does not); None: decided here, the
        whole history.

        Tensor ops only, on inputs already in the builder's buffers: no host sync (tested under a
        patched `Tensor.item`/`tolist`/...), static shapes per decode bucket.
        """
        early_a = None
        if state.graphed:  # plain target rows: a CUDA graph replay (captured on first use of the shape)
            logits, hidden_a = self.graphs.logits(len(state.rows), batch.target_group.view_len), None
        elif state.uld_graph is not None:  # target + ULD assistant rows: a graph replay of the stacked forward
            view = batch.target_group.view_len
            rows, assistant_rows = len(state.rows), len(state.assistant_rows)
            uld = self.graphs.uld_logits(rows, assistant_rows, view, state.uld_graph, self.assistants.rows)
            logits, hidden_a, early_a = uld
        else:
            hidden_t, hidden_a, early_a = self.runner.forward(batch, self.assistants.rows)
            logits = self.runner.logits(hidden_t[:, 0])
        n = len(state.rows)
        guard = self._guarded(state.plans) if guard_width is None else guard_width > 0
        if guard:
            target_best = row_argmax(logits)
        for backend, plan in state.plans:
            logits = backend.process_logits(plan, logits, hidden_a, early_a)
        if guard:
            history = self._history[:n, :guard_width]
            followers, repeats = repeat_completions(history, self._history_len[:n], self._guard_n)
            diverged = self._diverged[:n] if self.config.repeat_guard_after_substitution else None
            logits = guard_substitutions(logits, target_best, followers, repeats, diverged)
        sampling = state.sampling
        processed = apply_penalties(logits, sampling, self._prompt_mask[:n], self._output_counts[:n])
        tokens = sample(processed, sampling)
        if sampling.any_penalty:
            self._output_counts[state.row_index, tokens] += 1
        if guard:  # the rows it guards are in every batch with a guard; row i is slot i; padding rows write too
            at = self._history_len[:n].clamp_max(self._history.shape[1] - 1)
            self._history[:n].scatter_(1, at[:, None], tokens[:, None].to(self._history.dtype))
            self._history_len[:n] += 1
        logprobs = None
        if state.logprob_rows is not None:
            rows = state.logprob_rows
            logprobs = gather_logprobs(finite_logprobs(logits[rows]), tokens[rows], state.logprob_top)
        return tokens, logprobs

    # ================================================================== synchronous API
    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return list(prompt)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        unlearning: str | Selection | None | list = None,
        use_tqdm: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt (batched); `unlearning` is an artifact name, one per prompt, or None."""
        if self.engine_thread is not None and threading.current_thread() is not self.engine_thread:
            # two threads stepping one engine would corrupt its batch state
            raise RuntimeError("this engine is driven by a serving thread (AsyncEngine); use AsyncEngine.generate")
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        selections = unlearning if isinstance(unlearning, list) else [unlearning] * len(prompts)
        # checked before any request is added: a short list used to leave the first requests queued in the engine
        if not len(params_list) == len(selections) == len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts need as many `params` and `unlearning` entries when lists "
                f"are given (got {len(params_list)} and {len(selections)})"
            )
        collected: dict[str, GenerationResult] = {}
        order = []
        for prompt, p, sel in zip(prompts, params_list, selections, strict=True):
            if isinstance(sel, str):
                sel = Selection(sel)
            rid = self.new_request_id()
            ids = self.encode_prompt(prompt)
            self.add_request(Request(rid, ids, p, sel))
            collected[rid] = GenerationResult(
                rid,
                ids,
                None,
                [Completion(i, "", [], [] if p.logprobs is not None else None, None) for i in range(p.n)],
            )
            order.append(rid)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="generate", unit="req")
        remaining = set(order)
        while remaining:
            for out in self.step():
                result = collected.get(out.request_id)
                if result is None:
                    continue
                if out.prompt_logprobs is not None:
                    result.prompt_logprobs = out.prompt_logprobs
                for so in out.outputs:
                    c = result.completions[so.index]
                    c.text += so.text
                    c.token_ids.extend(so.token_ids)
                    if so.logprobs:
                        c.logprobs.extend(so.logprobs)
                    c.finish_reason = so.finish_reason
                    c.stop_reason = so.stop_reason
                if out.finished and out.request_id in remaining:
                    remaining.discard(out.request_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [collected[r] for r in order]

    def score(
        self,
        contexts: list[list[int]],
        continuations: list[list[int]],
        unlearning: str | Selection | None | list = None,
    ) -> list[list[float]]:
        """Log-prob of each continuation token given its context (and earlier continuation tokens)."""
        prompts = [list(c) + list(x) for c, x in zip(contexts, continuations, strict=True)]
        params = SamplingParams(max_tokens=0, prompt_logprobs=0, temperature=0.0)
        results = self.generate(prompts, params, unlearning)
        return [[e.logprob for e in r.prompt_logprobs[len(c) :]] for r, c in zip(results, contexts, strict=True)]
