"""The generation engine: continuous batching over one model, unlearning chosen per request.

A step is either a batched prefill of newly admitted sequences or one decode token for every
running sequence:

    forward (target rows + assistant rows) -> per-row logits hooks (ULD combination) -> sample

The engine knows nothing of HTTP. It is driven either by `generate()`/`score()` (synchronous,
for training/evaluation code) or by `AsyncEngine`, which runs `step()` on a background thread.
Other threads talk to it only through `add_request`, `abort` and `call_soon` (an inbox).
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from unlearn_serve.server.engine.kv_cache import AttnGroup, decode_mask, prefill_mask
from unlearn_serve.server.engine.model_runner import ForwardBatch, ModelRunner
from unlearn_serve.server.engine.sampler import SamplingBatch, apply_penalties, gather_logprobs, sample
from unlearn_serve.server.engine.sampling_params import SamplingParams, SamplingParamsError
from unlearn_serve.server.engine.scheduler import Scheduler
from unlearn_serve.server.engine.sequence import (
    LOGPROB_FLOOR,
    Request,
    RequestOutput,
    Selection,
    Sequence,
    SequenceOutput,
    TokenLogprob,
)
from unlearn_serve.server.unlearning.uld import (
    Assistant,
    AssistantRegistry,
    combine_logits,
    combine_on_candidates,
    plausible_mask,
)

from unlearn_serve.artifact import ArtifactError, fingerprint_model


class EngineInputError(ValueError):
    """A request the engine cannot run as given (prompt too long, bad parameters)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownArtifactError(LookupError):
    """A request named an unlearning artifact that is not loaded."""


# Tokens of context (prompt, then earlier output) decoded before the newest token, as in vLLM.
DETOKENIZE_CONTEXT = 5

# Above this many plausible tokens in a row, the assistant's LM head runs on the whole vocabulary.
ULD_MAX_CANDIDATES = 256


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


@dataclass
class ULDChoice:
    """A request's resolved ULD selection."""

    assistant: Assistant
    alpha: float
    filter: float
    uses_assistant: bool = True

    @property
    def name(self) -> str:
        return self.assistant.name


@dataclass
class PatchChoice:
    """A request's resolved UOE expert-patch selection."""

    name: str
    patch_id: int
    handle: Any = None
    uses_assistant: bool = False


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


@dataclass
class _DecodeState:
    """Batch tensors that depend only on the running set (rebuilt when `scheduler.version` moves)."""

    version: int
    rows: list[Sequence | None]
    assistant_rows: list[Sequence | None]
    sampling: SamplingBatch
    uld_target_rows: torch.Tensor | None  # target rows with an assistant
    uld_assistant_rows: torch.Tensor | None  # their assistant rows, same order
    uld_alpha: torch.Tensor | None
    uld_log_filter: torch.Tensor | None
    assistant_exits: dict[int, torch.Tensor]
    lora_groups: list[tuple[int, torch.Tensor]]
    logprob_rows: list[int]
    logprob_top: int
    row_patches: torch.Tensor | None


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: EngineConfig | None = None,
        model_name: str = "model",
    ):
        self.config = config or EngineConfig()
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
        self.assistants = AssistantRegistry(model, self.fingerprint, model_name)
        self.patches = None  # UOE ExpertPatchSet, created on first load
        self._unloading_patches: set[str] = set()  # UOE patches waiting for their in-flight requests
        # Artifact pins: a request pins its artifact when it is resolved (one locked step with the
        # unload check) and unpins when it finishes; an artifact is removed only at zero pins.
        self._artifact_lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_prefill_tokens)
        self.requests: dict[str, Request] = {}
        self.eos_token_ids = self._eos_ids()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.engine_thread: threading.Thread | None = None  # set by AsyncEngine
        self._decode_state: _DecodeState | None = None
        self._pending_unloads: list[tuple[str, threading.Event]] = []
        self._last_step_prefilled = False
        self._outputs: list[RequestOutput] = []
        self._ids = itertools.count()
        m = self.config.max_num_seqs
        # Penalty state per target slot: prompt tokens seen, output token counts.
        self._prompt_mask = torch.zeros(m, self.vocab_size, dtype=torch.bool, device=self.device)
        self._output_counts = torch.zeros(m, self.vocab_size, dtype=torch.int32, device=self.device)

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

    # ================================================================== thread-safe API
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        try:
            # n above the batch size could never be admitted and would block the queue behind it
            params.validate(self.vocab_size, min(self.config.max_n, self.config.max_num_seqs), self.config.max_logprobs)
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

    def resolve(self, selection: Selection | None) -> ULDChoice | PatchChoice | None:
        if selection is None:
            return None
        assistant = self.assistants.assistants.get(selection.name)
        if assistant is not None and not assistant.unloading:
            opts = selection.options or {}
            alpha = float(opts.get("alpha", assistant.alpha))
            filt = float(opts.get("filter", assistant.filter))
            if not math.isfinite(alpha):
                raise EngineInputError("unlearning.alpha must be a finite number", "unlearning.alpha")
            if not 0.0 <= filt <= 1.0:
                raise EngineInputError("unlearning.filter must be in [0, 1]", "unlearning.filter")
            return ULDChoice(assistant, alpha, filt)
        if self.patches is not None and selection.name not in self._unloading_patches:
            if selection.options:
                raise EngineInputError("UOE expert patches take no `unlearning` options", "unlearning")
            patch_id = self.patches.lookup(selection.name)
            if patch_id is not None:
                return PatchChoice(selection.name, patch_id)
        raise UnknownArtifactError(f"The model `{selection.name}` does not exist.")

    def add_request(self, request: Request) -> None:
        """Validate, resolve the unlearning selection and queue (any thread)."""
        self.check_request(request.prompt_token_ids, request.params)
        with self._artifact_lock:
            request.backend = self.resolve(request.selection)
            if request.backend is not None:
                self._pins[request.backend.name] = self._pins.get(request.backend.name, 0) + 1
                request.pinned = True
        self._inbox.put(("add", request))
        self.wakeup.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self.wakeup.set()

    def call_soon(self, fn) -> Future:
        """Run `fn()` on the engine thread between steps (directly when no thread runs the engine)."""
        future: Future = Future()
        if self.engine_thread is None or threading.current_thread() is self.engine_thread:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
            return future
        self._inbox.put(("call", (fn, future)))
        self.wakeup.set()
        return future

    # ================================================================== artifacts
    def artifact_names(self) -> list[str]:
        names = [n for n, a in self.assistants.assistants.items() if not a.unloading]
        if self.patches is not None:
            names += [n for n in self.patches.names() if n not in self._unloading_patches]
        return names

    def load_uld(self, name: str, path) -> Assistant:
        if name in self.artifact_names() or name == self.model_name:
            raise ArtifactError(f"an artifact named {name!r} is already loaded")
        assistant = self.assistants.read(name, path)  # validation and I/O off the engine thread

        def install():
            # Never reallocates KV that running sequences use: refused beyond the reserved budget.
            self.runner.ensure_assistant_cache(assistant.num_layers, name)
            return self.assistants.add(assistant)

        return self.call_soon(install).result()

    def load_uoe(self, name: str, path) -> int:
        if name in self.artifact_names() or name == self.model_name:
            raise ArtifactError(f"an artifact named {name!r} is already loaded")
        from unlearn_serve.server.unlearning.uoe import ExpertPatchSet

        from unlearn_serve.families import NotMoEError

        # File reads, validation and tensor preparation here, on the caller's thread: decoding goes on.
        patches = self.patches
        if patches is None:
            try:
                patches = ExpertPatchSet(self.model, self.model_name, base_fingerprint=self.fingerprint)
            except NotMoEError as exc:
                raise ArtifactError(f"{path}: cannot serve a UOE expert patch: {exc}") from None
        prepared = patches.read(name, path)

        def install():
            if self.patches is None:
                self.patches = patches
                self.runner.row_hooks.append(patches)
            return self.patches.install(prepared)

        return self.call_soon(install).result()

    def unload(self, name: str) -> threading.Event:
        """Stop accepting requests for `name`; it is removed once every request that pinned it has finished."""
        done = threading.Event()
        with self._artifact_lock:
            if name in self.assistants.assistants:
                self.assistants.assistants[name].unloading = True
            elif self.patches is not None and name in self.patches.names():
                self._unloading_patches.add(name)  # refuse new requests for it from now on
            else:
                raise UnknownArtifactError(f"no artifact named {name!r} is loaded")
            self._pending_unloads.append((name, done))
        if self.engine_thread is None or threading.current_thread() is self.engine_thread:
            self._finish_unloads()
        else:
            self.wakeup.set()  # the engine thread removes it between steps
        return done

    def _unpin(self, request: Request) -> None:
        if not request.pinned:
            return
        request.pinned = False
        with self._artifact_lock:
            name = request.backend.name
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]

    def _finish_unloads(self) -> None:
        """Remove artifacts marked for unloading that no request pins any more (engine thread)."""
        with self._artifact_lock:
            ready = [(n, d) for n, d in self._pending_unloads if not self._pins.get(n)]
            self._pending_unloads = [(n, d) for n, d in self._pending_unloads if self._pins.get(n)]
        for name, done in ready:
            if name in self.assistants.assistants:
                self.assistants.remove(name)
            elif self.patches is not None and name in self.patches.names():
                self.patches.remove(name)
                self._unloading_patches.discard(name)
            done.set()

    # ================================================================== stepping
    def has_work(self) -> bool:
        return bool(
            self.scheduler.waiting or self.scheduler.running or not self._inbox.empty() or self._pending_unloads
        )

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return self.scheduler.num_waiting_sequences()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.requests[item.request_id] = item
                self.scheduler.add(item)
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
        self._emit(request, request.sequences)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an unexpected step failure: end every request with an error, free every slot."""
        self._outputs = []
        for request in list(self.requests.values()):
            if request.finished:
                continue
            self.scheduler.remove_waiting(request)
            for seq in request.sequences:
                if seq.finish_reason is None:
                    seq.finish_reason = "abort"
                self.scheduler.release(seq)
            self._emit(request, request.sequences, error=message)
        self._decode_state = None
        return self._outputs

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        self._outputs = []  # before the inbox: aborts handled there emit their final output too
        self._drain_inbox()
        # At least one decode step between two prefills while sequences run: a steady stream of
        # arrivals must not stall the running streams (each prefill is bounded by max_prefill_tokens).
        may_prefill = not (self.scheduler.running and self._last_step_prefilled)
        admitted = self.scheduler.admit() if self.scheduler.waiting and may_prefill else []
        self._last_step_prefilled = bool(admitted)
        if admitted:
            self._prefill(admitted)
        elif self.scheduler.running:
            self._decode()
        if self._pending_unloads:
            self._finish_unloads()
        return self._outputs

    # ------------------------------------------------------------------ prefill
    def _prefill(self, seqs: list[Sequence]) -> None:
        dev = self.device
        for seq in seqs:
            request = seq.request
            if request.scheduled_time is None:
                request.scheduled_time = time.monotonic()
            if request.params.seed is not None:
                seq.generator = torch.Generator(device=dev).manual_seed(request.params.seed + seq.index)
        lengths = [s.prompt_len for s in seqs]
        t = max(lengths)
        n = len(seqs)
        ids = torch.zeros(n, t, dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(seq.request.prompt_token_ids)
        ids = ids.to(dev)
        len_t = torch.tensor(lengths, device=dev)
        mask = prefill_mask(len_t, t)
        target_group = AttnGroup(0, n, 0, slots=torch.tensor([s.slot for s in seqs], device=dev), mask=mask)
        uld_idx = [i for i, s in enumerate(seqs) if s.assistant_slot >= 0]
        m = self.config.max_num_seqs
        batch = ForwardBatch(
            input_ids=ids,
            position_ids=torch.arange(t, device=dev)[None].expand(n, t),
            prefill=True,
            n_target=n,
            target_group=target_group,
            row_hooks_target=self._row_patches(seqs),
        )
        if uld_idx:
            sel = torch.tensor(uld_idx, device=dev)
            na = len(uld_idx)
            batch.input_ids = torch.cat([ids, ids[sel]])
            batch.position_ids = torch.arange(t, device=dev)[None].expand(n + na, t)
            batch.assistant_group = AttnGroup(
                n,
                n + na,
                m,
                slots=torch.tensor([m + seqs[i].assistant_slot for i in uld_idx], device=dev),
                mask=mask[sel],
            )
            assistants = [seqs[i].request.backend.assistant for i in uld_idx]
            batch.assistant_exits, batch.lora_groups = self._assistant_layout(assistants, n)
        hidden_t, hidden_a = self.runner.forward(batch, self.assistants.rows)

        # Which positions need logits: the last one, or all of them for prompt logprobs.
        flat_rows, flat_pos, last_index, spans = [], [], [], []
        for i, seq in enumerate(seqs):
            start = len(flat_rows)
            positions = range(lengths[i]) if seq.request.params.prompt_logprobs is not None else [lengths[i] - 1]
            flat_rows.extend([i] * len(positions))
            flat_pos.extend(positions)
            spans.append((start, len(flat_rows)))
            last_index.append(len(flat_rows) - 1)
        rows_t = torch.tensor(flat_rows, device=dev)
        pos_t = torch.tensor(flat_pos, device=dev)
        logits = self.runner.logits(hidden_t[rows_t, pos_t])
        if uld_idx:
            comb_index, a_rows, a_pos, alphas, filters = [], [], [], [], []
            for j, i in enumerate(uld_idx):
                start, end = spans[i]
                backend = seqs[i].request.backend
                comb_index.extend(range(start, end))
                a_rows.extend([j] * (end - start))
                a_pos.extend(flat_pos[start:end])
                alphas.extend([backend.alpha] * (end - start))
                filters.extend([backend.filter] * (end - start))
            comb_t = torch.tensor(comb_index, device=dev)
            a_hidden = hidden_a[torch.tensor(a_rows, device=dev), torch.tensor(a_pos, device=dev)]
            logits[comb_t] = self._combine_uld(
                logits[comb_t], a_hidden, torch.tensor(alphas, device=dev), _log(torch.tensor(filters, device=dev))
            )
        for i, seq in enumerate(seqs):
            request = seq.request
            k = request.params.prompt_logprobs
            if k is not None and request.prompt_logprobs is None:
                start, end = spans[i]
                request.prompt_logprobs = self._prompt_logprobs(logits[start:end], request.prompt_token_ids, k)

        last = logits[torch.tensor(last_index, device=dev)]
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
        want = [i for i, s in enumerate(seqs) if s.request.params.logprobs is not None]
        entries = self._token_logprobs(last, tokens, want, [seqs[i].request.params.logprobs for i in want])
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            if seq.request.params.max_tokens == 0:  # echo/scoring only: nothing to generate
                seq.finish_reason = "length"
                self.scheduler.release(seq)
                continue
            self._append(seq, token, entries.get(i))
        self._emit_many(seqs)

    def _combine_uld(
        self, target_logits: torch.Tensor, assistant_hidden: torch.Tensor, alpha: torch.Tensor, log_filter: torch.Tensor
    ) -> torch.Tensor:
        """ULD logits for [S] unlearned rows: target - alpha * assistant on the target's plausible tokens.

        The assistant's LM head runs only on the plausible tokens (the top-M by target logit, M the
        largest plausible-set size in the batch; one host sync per step) unless M is large (a low
        filter) or the head cannot be sliced; then it runs on the whole vocabulary.
        """
        keep = plausible_mask(target_logits, log_filter)
        m = int(keep.sum(dim=-1).max())
        if m <= ULD_MAX_CANDIDATES:
            candidates = target_logits.topk(m, dim=-1).indices
            assistant = self.runner.candidate_logits(assistant_hidden, candidates)
            if assistant is not None:
                return combine_on_candidates(target_logits, candidates, assistant, alpha, keep)
        return combine_logits(target_logits, self.runner.logits(assistant_hidden), alpha, log_filter)

    # ------------------------------------------------------------------ decode
    def _decode(self) -> None:
        state = self._decode_state
        if state is None or state.version != self.scheduler.version:
            state = self._decode_state = self._build_decode_state()
        dev = self.device
        rows = state.rows
        bt = len(rows)
        ids, pos = [], []
        for seq in rows:
            if seq is None:
                ids.append(0)
                pos.append(0)
            else:
                ids.append(seq.output_ids[-1])
                pos.append(seq.total_len - 1)
        ids_t = torch.tensor(ids, device=dev)
        pos_t = torch.tensor(pos, device=dev)
        view = max(pos) + 1
        batch = ForwardBatch(
            input_ids=ids_t[:, None],
            position_ids=pos_t[:, None],
            prefill=False,
            n_target=bt,
            target_group=AttnGroup(0, bt, 0, positions=pos_t, mask=decode_mask(pos_t, view), view_len=view),
            row_hooks_target=state.row_patches,
        )
        if state.assistant_rows:
            a_ids, a_pos = [], []
            for seq in state.assistant_rows:
                a_ids.append(0 if seq is None else seq.output_ids[-1])
                a_pos.append(0 if seq is None else seq.total_len - 1)
            a_pos_t = torch.tensor(a_pos, device=dev)
            a_view = max(a_pos) + 1
            ba = len(a_ids)
            batch.input_ids = torch.cat([ids_t, torch.tensor(a_ids, device=dev)])[:, None]
            batch.position_ids = torch.cat([pos_t, a_pos_t])[:, None]
            batch.assistant_group = AttnGroup(
                bt,
                bt + ba,
                self.config.max_num_seqs,
                positions=a_pos_t,
                mask=decode_mask(a_pos_t, a_view),
                view_len=a_view,
            )
            batch.assistant_exits = state.assistant_exits
            batch.lora_groups = state.lora_groups
        hidden_t, hidden_a = self.runner.forward(batch, self.assistants.rows)
        logits = self.runner.logits(hidden_t[:, 0])
        if state.uld_target_rows is not None:
            uld_rows = state.uld_target_rows
            logits[uld_rows] = self._combine_uld(
                logits[uld_rows], hidden_a[state.uld_assistant_rows, 0], state.uld_alpha, state.uld_log_filter
            )
        sampling = state.sampling
        processed = apply_penalties(logits, sampling, self._prompt_mask[:bt], self._output_counts[:bt])
        tokens = sample(processed, sampling)
        if sampling.any_penalty:
            self._output_counts[torch.arange(bt, device=dev), tokens] += 1
        entries = self._token_logprobs(
            logits, tokens, state.logprob_rows, [rows[i].request.params.logprobs for i in state.logprob_rows]
        )
        active = []
        for i, token in enumerate(tokens.tolist()):
            seq = rows[i]
            if seq is None or seq.finish_reason is not None:
                continue
            self._append(seq, token, entries.get(i))
            active.append(seq)
        self._emit_many(active)

    def _build_decode_state(self) -> _DecodeState:
        dev = self.device
        sched = self.scheduler
        rows: list[Sequence | None] = [sched.running.get(i) for i in range(sched.target_slots.high_water)]
        params = [s.request.params if s else None for s in rows]
        # steps: tokens sampled so far, so that a seeded row's noise stream continues across rebuilds
        steps = [len(s.output_ids) if s else 0 for s in rows]
        sampling = SamplingBatch.build(params, [s.generator if s else None for s in rows], self.vocab_size, dev, steps)
        assistant_rows: list[Sequence | None] = [None] * sched.assistant_slots.high_water
        for seq in rows:
            if seq is not None and seq.assistant_slot >= 0:
                assistant_rows[seq.assistant_slot] = seq
        uld_t, uld_a, alpha, filt = [], [], [], []
        for arow, seq in enumerate(assistant_rows):
            if seq is not None:
                uld_t.append(seq.slot)
                uld_a.append(arow)
                alpha.append(seq.request.backend.alpha)
                filt.append(seq.request.backend.filter)
        exits: dict[int, torch.Tensor] = {}
        lora_groups: list[tuple[int, torch.Tensor]] = []
        if uld_a:
            by_k: dict[int, list[int]] = {}
            by_adapter: dict[int, list[int]] = {}
            for arow in uld_a:
                assistant = assistant_rows[arow].request.backend.assistant
                by_k.setdefault(assistant.num_layers, []).append(arow)
                by_adapter.setdefault(assistant.adapter_id, []).append(len(rows) + arow)
            exits = {k: torch.tensor(v, device=dev) for k, v in by_k.items()}
            lora_groups = [(a, torch.tensor(v, device=dev)) for a, v in by_adapter.items()]
        logprob_rows = [i for i, s in enumerate(rows) if s is not None and s.request.params.logprobs is not None]
        return _DecodeState(
            version=sched.version,
            rows=rows,
            assistant_rows=assistant_rows if uld_a else [],
            sampling=sampling,
            uld_target_rows=torch.tensor(uld_t, device=dev) if uld_t else None,
            uld_assistant_rows=torch.tensor(uld_a, device=dev) if uld_a else None,
            uld_alpha=torch.tensor(alpha, device=dev) if uld_t else None,
            uld_log_filter=_log(torch.tensor(filt, device=dev)) if uld_t else None,
            assistant_exits=exits,
            lora_groups=lora_groups,
            logprob_rows=logprob_rows,
            logprob_top=max((rows[i].request.params.logprobs for i in logprob_rows), default=0),
            row_patches=self._row_patches(rows),
        )

    def _assistant_layout(self, assistants: list[Assistant], n_target: int):
        by_k: dict[int, list[int]] = {}
        by_adapter: dict[int, list[int]] = {}
        for j, assistant in enumerate(assistants):
            by_k.setdefault(assistant.num_layers, []).append(j)
            by_adapter.setdefault(assistant.adapter_id, []).append(n_target + j)
        dev = self.device
        return (
            {k: torch.tensor(v, device=dev) for k, v in by_k.items()},
            [(a, torch.tensor(v, device=dev)) for a, v in by_adapter.items()],
        )

    def _row_patches(self, rows: list[Sequence | None]) -> torch.Tensor | None:
        if self.patches is None:
            return None
        ids = [
            s.request.backend.patch_id if s is not None and isinstance(s.request.backend, PatchChoice) else -1
            for s in rows
        ]
        return torch.tensor(ids, device=self.device)

    # ------------------------------------------------------------------ logprobs
    def _token_logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], tops: list[int]
    ) -> dict[int, TokenLogprob]:
        if not rows:
            return {}
        idx = torch.tensor(rows, device=self.device)
        logprobs = _finite_logprobs(logits[idx])
        chosen, top_v, top_i = gather_logprobs(logprobs, tokens[idx], max(tops))
        chosen_l = chosen.tolist()
        tok_l = tokens[idx].tolist()
        top_v_l = top_v.tolist() if top_v is not None else None
        top_i_l = top_i.tolist() if top_i is not None else None
        out = {}
        for j, row in enumerate(rows):
            top = list(zip(top_i_l[j][: tops[j]], top_v_l[j][: tops[j]], strict=True)) if top_v_l else []
            out[row] = TokenLogprob(tok_l[j], chosen_l[j], top)
        return out

    def _prompt_logprobs(self, logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob | None]:
        """Entry i > 0 is log p(prompt[i] | prompt[:i]); entry 0 has no context (None)."""
        if len(prompt) < 2:
            return [None]
        logprobs = _finite_logprobs(logits[:-1])
        targets = torch.tensor(prompt[1:], device=self.device)
        chosen, top_v, top_i = gather_logprobs(logprobs, targets, k)
        chosen_l = chosen.tolist()
        top_v_l = top_v.tolist() if top_v is not None else None
        top_i_l = top_i.tolist() if top_i is not None else None
        result: list[TokenLogprob | None] = [None]
        for j, tok in enumerate(prompt[1:]):
            top = list(zip(top_i_l[j], top_v_l[j], strict=True)) if top_v_l else []
            result.append(TokenLogprob(tok, chosen_l[j], top))
        return result

    # ------------------------------------------------------------------ per-sequence bookkeeping
    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        request = seq.request
        params = request.params
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        seq.output_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason = "stop"
            seq.stop_reason = token
        self._detokenize(seq)
        if seq.finish_reason is None and params.stop:
            self._check_stop_strings(seq)
        if seq.finish_reason is None and (
            len(seq.output_ids) >= params.max_tokens or seq.total_len >= self.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.release(seq)

    def _decode_text(self, ids: list[int], skip: bool) -> str:
        # no clean-up: it rewrites text across token boundaries, so a prefix's text would not stay a prefix
        return self.tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    def _detokenize(self, seq: Sequence) -> None:
        """Append the text of the newest token (after vLLM's detokenize_incrementally).

        The tokens are decoded in a window that starts a few tokens back, in the prompt at first, so a
        SentencePiece "▁" that begins the window is what gets stripped, never the new token's: " Paris",
        not "Paris". The window's text is kept, so a token costs one decode (plus one every
        DETOKENIZE_CONTEXT tokens when the window slides).
        """
        skip = seq.request.params.skip_special_tokens
        ids = seq.detok_ids
        if not ids:  # first token: the window starts in the prompt
            ids.extend(seq.request.prompt_token_ids[-DETOKENIZE_CONTEXT:])
            seq.prefix_offset, seq.read_offset = 0, len(ids)
            seq.read_text = self._decode_text(ids, skip)
        ids.append(seq.output_ids[-1])
        full = self._decode_text(ids[seq.prefix_offset :], skip)
        # Hold back incomplete UTF-8 sequences (byte-level BPE splits characters across tokens).
        if len(full) <= len(seq.read_text) or (full.endswith("\ufffd") and seq.finish_reason is None):
            return
        seq.text += full[len(seq.read_text) :]
        seq.read_offset = len(ids)
        seq.read_text = full
        if seq.read_offset - seq.prefix_offset > 2 * DETOKENIZE_CONTEXT:  # keep the window short
            seq.prefix_offset = seq.read_offset - DETOKENIZE_CONTEXT
            seq.read_text = self._decode_text(ids[seq.prefix_offset :], skip)

    def _check_stop_strings(self, seq: Sequence) -> None:
        params = seq.request.params
        longest = max(len(s) for s in params.stop)
        start = max(0, seq.sent_text_len - longest)
        best = None
        for stop in params.stop:
            idx = seq.text.find(stop, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is not None:
            idx, stop = best
            seq.text = seq.text[: idx + len(stop)] if params.include_stop_str_in_output else seq.text[:idx]
            seq.finish_reason = "stop"
            seq.stop_reason = stop

    def _emit_many(self, seqs: list[Sequence]) -> None:
        by_request: dict[str, tuple[Request, list[Sequence]]] = {}
        for seq in seqs:
            by_request.setdefault(seq.request.request_id, (seq.request, []))[1].append(seq)
        for request, group in by_request.values():
            self._emit(request, group)

    def _emit(self, request: Request, seqs: list[Sequence], error: str | None = None) -> None:
        outputs = []
        for seq in seqs:
            params = request.params
            send_upto = len(seq.text)
            if seq.finish_reason is None and params.stop:
                # a stop string may be forming at the end: hold its possible prefix back
                send_upto = max(seq.sent_text_len, len(seq.text) - (max(len(s) for s in params.stop) - 1))
            text = seq.text[seq.sent_text_len : send_upto]
            seq.sent_text_len = send_upto
            tokens = seq.output_ids[seq.sent_token_len :]
            seq.sent_token_len = len(seq.output_ids)
            logprobs = None
            if params.logprobs is not None:
                logprobs, seq.pending_logprobs = seq.pending_logprobs, []
            outputs.append(SequenceOutput(seq.index, text, tokens, logprobs, seq.finish_reason, seq.stop_reason))
        prompt_logprobs = None
        if request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            prompt_logprobs = request.prompt_logprobs
            request.prompt_logprobs_sent = True
        finished = request.finished
        out = RequestOutput(
            request_id=request.request_id,
            outputs=outputs,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            finished=finished,
            num_generated_tokens=request.num_generated_tokens,
            error=error,
        )
        if finished:
            request.finished_time = time.monotonic()
            self.requests.pop(request.request_id, None)
            self._unpin(request)
        self._outputs.append(out)
        if request.on_output is not None:
            request.on_output(out)

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
        return [
            [e.logprob for e in r.prompt_logprobs[len(c) :]]
            for r, c in zip(results, contexts, strict=True)
        ]



def _finite_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax floored at LOGPROB_FLOOR: unlearned rows put -inf on implausible tokens, and JSON has no -inf."""
    return logits.log_softmax(dim=-1).nan_to_num(nan=LOGPROB_FLOOR).clamp_min(LOGPROB_FLOOR)


def _log(filters: torch.Tensor) -> torch.Tensor:
    """ln(filter), with filter 0 meaning 'keep every token'."""
    return torch.where(filters > 0, filters.clamp_min(1e-30).log(), torch.full_like(filters, float("-inf")))
