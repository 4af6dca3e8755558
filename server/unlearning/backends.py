"""ULD and UOE behind the engine's one backend interface (`unlearning.base.UnlearningBackend`).

ULD: assistant rows (the target's layers < K + per-row LoRA) stacked under the target rows;
     logits = target - alpha * penalty(assistant) on the target's plausible tokens, then (refilter) -inf on
     those the subtraction pushed below max + ln(filter) (uld_combine.py).
UOE: per-row expert patches applied by router/expert hooks; logits untouched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from unlearn_serve.server.engine.errors import EngineInputError
from unlearn_serve.server.unlearning.base import BatchRows, UnlearningBackend
from unlearn_serve.server.unlearning.uld import (
    MASKED_MAX_ADAPTERS,
    Assistant,
    AssistantRegistry,
    CombineOptionError,
    CombineOptions,
    CombineSettings,
    adapter_columns_mask,
    combine_logits,
)

from unlearn_serve.artifact import ArtifactError
from unlearn_serve.token_prefixes import TokenPrefixes
from unlearn_serve.uld_combine import (
    CandidateSplit,
    combine_candidate_values,
    plausible_candidates,
    split_plausible_candidates,
)

# Plausible tokens per row for the batch's plausible-only LM head; rows with more are combined apart (`_combined`).
ULD_MAX_CANDIDATES = 256


@dataclass
class ULDChoice:
    """A request's resolved ULD selection."""

    assistant: Assistant
    alpha: float
    filter: float
    uses_assistant: bool = True
    combine: CombineOptions = field(default_factory=CombineOptions)  # the artifact's, or the request's override

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
class ULDGraphInputs:
    """What a CUDA graph of a ULD decode step reads besides the builder's buffers (engine/cuda_graphs.py): every
    assistant row leaves after the same K layers, and each row's LoRA is its adapter's columns of the stacked A/B."""

    num_layers: int  # K of every assistant row of the batch
    lora_mask: torch.Tensor | None  # [na, W] 0/1 columns of each row's adapter (zeros: padding); None: one adapter
    layout_version: int  # the stacked A/B these columns index (a load or unload restacks them)
    # per assistant row, its target row (the early exit of gated rows, uld_combine.py); None: no row is gated
    early_exit_source: torch.Tensor | None = None


@dataclass
class ULDPlan:
    logit_rows: torch.Tensor  # logits rows of unlearned target rows
    hidden_rows: torch.Tensor  # their assistant rows
    hidden_pos: torch.Tensor  # and positions in them
    alpha: torch.Tensor
    log_filter: torch.Tensor
    settings: CombineSettings = field(default_factory=CombineSettings)  # rule, refilter, margin, floor of the rows
    every_row: bool = False  # logit_rows is every logits row, in order (all unlearned): no row gather or scatter
    graph: ULDGraphInputs | None = None  # decode: the step may be a CUDA graph replay (None: it must run eagerly)
    # rows that finish words (settings.finish_words): the forward batch whose input ids hold each logit row's previous
    # token, at (token_rows, hidden_pos): read when the logits are processed (a decode step's ids are chained on the
    # device), None when no row needs them
    inputs: Any = None
    token_rows: torch.Tensor | None = None


def log_filter(filters: torch.Tensor) -> torch.Tensor:
    """ln(filter), with filter 0 meaning 'keep every token'."""
    return torch.where(filters > 0, filters.clamp_min(1e-30).log(), torch.full_like(filters, float("-inf")))


class ULDBackend(UnlearningBackend):
    kind = "uld"
    changes_logits = True  # target - alpha * assistant decides the token after the forward

    def __init__(self, model: torch.nn.Module, fingerprint: dict, model_name: str, runner):
        self.registry = AssistantRegistry(model, fingerprint, model_name)
        self.runner = runner
        # True where the decode step must not read the device (CUDA graphs): the assistant's LM head then
        # runs on the whole vocabulary, since the plausible-set size would be a host read.
        self.sync_free = False
        # True where decode steps may be CUDA graphs (the engine's graph runner exists): `prepare` then says which
        # compositions a graph can run (ULDPlan.graph); elsewhere it does none of that work.
        self.graphs = False
        # the tokenizer's TokenPrefixes for the prefix guard (uld_combine.close_over_prefixes), made by
        # `prefixes_factory` (the engine's: it has the tokenizer) when a guarded assistant is installed, or on first use
        # (an engine-level prefix_guard option on an older artifact); None until then
        self.prefixes_factory: Callable[[], TokenPrefixes] | None = None
        self._prefixes: TokenPrefixes | None = None

    def prefixes(self) -> TokenPrefixes:
        """The prefix guard's table (built once, on the engine's device)."""
        if self._prefixes is None:
            if self.prefixes_factory is None:
                raise ValueError("the prefix guard needs the tokenizer's prefixes (ULDBackend.prefixes_factory)")
            self._prefixes = self.prefixes_factory()
        return self._prefixes

    def names(self) -> list[str]:
        return list(self.registry.assistants)

    def resolve(self, name: str, options: dict[str, Any]) -> ULDChoice | None:
        assistant = self.registry.assistants.get(name)
        if assistant is None or assistant.unloading:
            return None
        alpha = float(options.get("alpha", assistant.alpha))
        filt = float(options.get("filter", assistant.filter))
        # rule, refilter, margin, floor: engine-level options (train-uld's calibration, the benches); the HTTP API
        # does not take them
        try:
            combine = assistant.combine.updated(options)
        except CombineOptionError as exc:
            raise EngineInputError(f"unlearning.{exc.key} {exc}", f"unlearning.{exc.key}") from None
        if not math.isfinite(alpha):
            raise EngineInputError("unlearning.alpha must be a finite number", "unlearning.alpha")
        if not 0.0 <= filt <= 1.0:
            raise EngineInputError("unlearning.filter must be in [0, 1]", "unlearning.filter")
        return ULDChoice(assistant, alpha, filt, combine=combine)

    def read(self, name: str, path) -> Assistant:
        return self.registry.read(name, path)

    def install(self, assistant: Assistant) -> Assistant:
        # Never reallocates KV that running sequences use: refused beyond the reserved budget.
        self.runner.ensure_assistant_cache(assistant.num_layers, assistant.name)
        if (assistant.combine.prefix_guard or assistant.combine.finish_words) and self.prefixes_factory is not None:
            self.prefixes()  # built here, not in a decode step (SmolLM2's vocabulary: ~1 s, once per engine)
        return self.registry.add(assistant)

    def remove(self, name: str) -> None:
        self.registry.remove(name)

    def mark_unloading(self, name: str) -> None:
        self.registry.assistants[name].unloading = True

    def is_unloading(self, name: str) -> bool:
        return self.registry.assistants[name].unloading

    def prepare(self, rows: BatchRows, batch) -> ULDPlan | None:
        dev = rows.device
        n_target = len(rows.choices)
        by_k: dict[int, list[int]] = {}
        by_adapter: dict[int, list[int]] = {}
        for choice, arow in zip(rows.choices, rows.assistant_row, strict=True):
            if choice is not None and arow >= 0:
                by_k.setdefault(choice.assistant.num_layers, []).append(arow)
                by_adapter.setdefault(choice.assistant.adapter_id, []).append(n_target + arow)
        if not by_k:
            return None
        batch.assistant_exits = {k: torch.tensor(v, device=dev) for k, v in by_k.items()}
        batch.lora_groups = [(a, torch.tensor(v, device=dev)) for a, v in by_adapter.items()]
        logit_rows, hidden_rows, hidden_pos, alpha, filt = [], [], [], [], []
        combine: list[CombineOptions] = []
        for j, (t, pos) in enumerate(rows.logit_rows):
            choice = rows.choices[t]
            if choice is not None and rows.assistant_row[t] >= 0:
                logit_rows.append(j)
                hidden_rows.append(rows.assistant_row[t])
                hidden_pos.append(pos)
                alpha.append(choice.alpha)
                filt.append(choice.filter)
                combine.append(choice.combine)
        if not logit_rows:
            return None

        def t(values, dtype=None):
            return torch.tensor(values, device=dev, dtype=dtype)

        settings = CombineSettings.of_rows(combine, filt, dev)
        if batch.prefill and settings.finish_words is not False:
            # a prompt's words were begun by the client (a probe writing the answer's start), not by the unlearned
            # model: only decode steps, whose previous token was sampled under the unlearning, finish words
            settings = dataclasses.replace(settings, finish_words=False)
        if settings.needs_early_exit:  # each assistant row's early exit is its target row's hidden state
            batch.early_exit_source = t(rows.assistant_source())

        graph = None
        layout = self.registry.rows.layout
        graphable = len(by_k) == 1 and layout.width <= MASKED_MAX_ADAPTERS * layout.max_rank
        if self.graphs and not batch.prefill and graphable:
            mask = None
            if len(layout.columns) > 1:  # several adapters loaded: each row's own columns
                slots = [-1] * rows.num_assistant_rows
                for choice, arow in zip(rows.choices, rows.assistant_row, strict=True):
                    if choice is not None and arow >= 0:
                        slots[arow] = layout.slots[choice.assistant.adapter_id]
                mask = adapter_columns_mask(layout, t(slots), self.runner.dtype)
            graph = ULDGraphInputs(next(iter(by_k)), mask, layout.version, batch.early_exit_source)

        finishing = settings.needs_previous_ids  # the assistant rows' input ids are their target rows' tokens
        return ULDPlan(
            t(logit_rows),
            t(hidden_rows),
            t(hidden_pos),
            t(alpha),
            log_filter(t(filt, torch.float32)),
            settings,
            every_row=logit_rows == list(range(len(rows.logit_rows))),
            graph=graph,
            inputs=batch if finishing else None,
            token_rows=t([n_target + r for r in hidden_rows]) if finishing else None,
        )

    def process_logits(
        self, plan: ULDPlan | None, logits: torch.Tensor, assistant_hidden, early_exit_hidden=None
    ) -> torch.Tensor:
        """The unlearned rows' logits replaced in place by the combination (`combine`); other rows untouched."""
        if plan is None:
            return logits
        hidden = assistant_hidden[plan.hidden_rows, plan.hidden_pos]
        early = None
        if plan.settings.needs_early_exit:  # `prepare` asked the forward for the early exits
            if early_exit_hidden is None:
                raise ValueError("a gated ULD row needs the early exits (ForwardBatch.early_exit_source)")
            early = early_exit_hidden[plan.hidden_rows, plan.hidden_pos]
        previous = None
        if plan.inputs is not None:
            previous = plan.inputs.input_ids[plan.token_rows, plan.hidden_pos]
        rows, every_row = plan.logit_rows, plan.every_row
        target = logits if every_row else logits.index_select(0, rows)
        # every part is computed before the first write: `target` may be `logits` itself
        parts = self._combined(target, hidden, plan.alpha, plan.log_filter, plan.settings, early, previous)
        for part_rows, candidates, values in parts:
            values = values.to(logits.dtype)
            if part_rows is None and every_row:  # the usual case: no row gather or scatter
                if candidates is None:
                    logits.copy_(values)
                else:  # -inf on the unlearned rows, then their candidates' values (no [R, V] temporary)
                    logits.fill_(float("-inf")).scatter_(1, candidates, values)
                continue
            dest = rows if part_rows is None else rows.index_select(0, part_rows)
            if candidates is None:
                logits.index_copy_(0, dest, values)
            else:
                logits.index_fill_(0, dest, float("-inf"))
                logits[dest[:, None], candidates] = values
        return logits

    def combine(
        self,
        target_logits: torch.Tensor,
        assistant_hidden: torch.Tensor,
        alpha: torch.Tensor,
        log_filter: torch.Tensor,
        settings: CombineSettings,
        early_exit_hidden: torch.Tensor | None = None,
        previous_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ULD logits for [S] unlearned rows: target - alpha * penalty(assistant) on the target's plausible tokens,
        combined as `settings` say (rule, margin, floor, refilter, gate: uld_combine.py), as a new [S, V] tensor.
        Gated rows need the early exit's [S, H] hidden states; rows that finish words their `previous_ids` [S]."""
        out = torch.full_like(target_logits.float(), float("-inf"))
        parts = self._combined(
            target_logits, assistant_hidden, alpha, log_filter, settings, early_exit_hidden, previous_ids
        )
        for part_rows, candidates, values in parts:
            dest = torch.arange(out.shape[0], device=out.device) if part_rows is None else part_rows
            if candidates is None:
                out.index_copy_(0, dest, values.float())
            else:
                out[dest[:, None], candidates] = values.float()
        return out

    def _combined(
        self,
        target_logits: torch.Tensor,
        assistant_hidden: torch.Tensor,
        alpha: torch.Tensor,
        log_filter: torch.Tensor,
        settings: CombineSettings,
        early_exit_hidden: torch.Tensor | None = None,
        previous_ids: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]]:
        """`combine`'s values in one or two parts (part rows, candidates, values): rows None = all S rows; candidates
        [s, M] token ids with values their [s, M] combined logits (every other token is -inf), or None with values
        the [s, V] combined logits, where the assistant's LM head ran on the whole vocabulary.

        The head runs only on the plausible tokens (the top-M by target logit, M the largest plausible-set size of
        the rows: `split_plausible_candidates`, two host reads) unless the head cannot be sliced or the step must not
        read the device (`sync_free`). Rows with more than ULD_MAX_CANDIDATES plausible tokens, or spread over many
        blocks of the vocabulary (a flat distribution), are a second part, so that one such row does not send the batch
        to the whole vocabulary (random prompts: most decode steps of SmolLM2's overhead bench had one): a few of them
        get the head on their own candidates (as many head rows in all as the first part may use), more take the whole
        vocabulary. Gated rows (`settings.gate`) score the early exit's `early_exit_hidden` on the same columns; rows
        that finish words (`settings.finish_words`) need `previous_ids`."""
        every_row = (target_logits, assistant_hidden, alpha, log_filter, settings, early_exit_hidden, previous_ids)
        found = None
        if not self.sync_free and self.runner.candidate_logits_supported:
            found = split_plausible_candidates(target_logits, log_filter, ULD_MAX_CANDIDATES)
        if found is None:
            return [(None, None, self._on_vocabulary(*every_row))]
        parts = []
        if found.token_ids is not None:
            parts.append((found.rows, found.token_ids, self._on_candidates(found, every_row)))
        if found.rest_rows is not None:  # flat rows: their own candidates when few, else the whole vocabulary
            rows = None if found.token_ids is None else found.rest_rows  # None: every row is left
            rest = every_row if rows is None else (target_logits[rows], *_row_args(rows, *every_row[1:]))
            budget = ULD_MAX_CANDIDATES * target_logits.shape[0] // len(found.rest_rows)  # head rows per left row
            again = plausible_candidates(rest[0], rest[3], budget)
            if again is None:
                parts.append((rows, None, self._on_vocabulary(*rest)))
            else:
                parts.append((rows, again[0], self._on_candidates(CandidateSplit(None, *again, None), rest)))
        return parts

    def _on_candidates(self, found: CandidateSplit, args: tuple) -> torch.Tensor:
        """[s, M] combined logits of the rows `found` keeps, on the plausible-only head: `args` are `_combined`'s
        (target logits, assistant hidden, alpha, log filter, settings, early exit hidden, previous ids) for the rows
        `found` indexes."""
        target_logits, assistant_hidden, alpha, log_filter, settings, early, previous = args
        candidates, rows = found.token_ids, found.rows
        if rows is None:
            target = target_logits.gather(-1, candidates)
        else:
            target = target_logits[rows[:, None], candidates]  # [s, M] only: no copy of the rows' logits
            assistant_hidden, alpha, log_filter, settings, early, previous = _row_args(rows, *args[1:])
        if early is None:
            assistant, early_logits = self.runner.candidate_logits(assistant_hidden, candidates), None
        else:  # both on the same candidates: the head's rows gathered once
            assistant, early_logits = self.runner.candidate_logits(
                torch.stack([assistant_hidden, early], 1), candidates
            ).unbind(1)
        kwargs = self.combine_kwargs(settings)
        return combine_candidate_values(
            target,
            assistant,
            alpha,
            found.kept,
            log_filter=log_filter,
            early_exit_logits=early_logits,
            token_ids=candidates,
            previous_ids=previous,
            **kwargs,
        )

    def _on_vocabulary(
        self, target_logits, assistant_hidden, alpha, log_filter, settings, early, previous=None
    ) -> torch.Tensor:
        """The whole-vocabulary combination: the assistant's head (and the early exit's) on every token."""
        if early is None:
            assistant, early_logits = self.runner.logits(assistant_hidden), None
        else:  # one LM head matmul for both
            assistant, early_logits = self.runner.logits(torch.cat([assistant_hidden, early])).chunk(2)
        kwargs = self.combine_kwargs(settings)
        return combine_logits(
            target_logits, assistant, alpha, log_filter, early_exit_logits=early_logits, previous_ids=previous, **kwargs
        )

    def combine_kwargs(self, settings: CombineSettings) -> dict[str, Any]:
        """`settings` as the combine functions' keyword arguments, with the tokenizer's prefixes where a row is
        guarded or finishes words."""
        kwargs = settings.kwargs()
        if settings.prefix_guard is not False or settings.finish_words is not False:
            kwargs["prefixes"] = self.prefixes()
        return kwargs


def _row_args(
    rows: torch.Tensor,
    assistant_hidden,
    alpha,
    log_filter,
    settings: CombineSettings,
    early_exit_hidden,
    previous_ids=None,
) -> tuple:
    """`_combined`'s per-row arguments after the target logits, for `rows` only."""
    return (
        assistant_hidden.index_select(0, rows),
        alpha.index_select(0, rows),
        log_filter.index_select(0, rows),
        settings.rows(rows),
        None if early_exit_hidden is None else early_exit_hidden.index_select(0, rows),
        None if previous_ids is None else previous_ids.index_select(0, rows),
    )


class UOEBackend(UnlearningBackend):
    kind = "uoe"

    def __init__(self, model: torch.nn.Module, fingerprint: dict, model_name: str, runner):
        self.model, self.fingerprint, self.model_name, self.runner = model, fingerprint, model_name, runner
        self.patches = None  # ExpertPatchSet, created on the first load (the model must be MoE)
        self.unloading: set[str] = set()

    def names(self) -> list[str]:
        return self.patches.names() if self.patches is not None else []

    def resolve(self, name: str, options: dict[str, Any]) -> PatchChoice | None:
        if self.patches is None or name in self.unloading:
            return None
        patch_id = self.patches.lookup(name)
        if patch_id is None:
            return None
        if options:
            raise EngineInputError("UOE expert patches take no `unlearning` options", "unlearning")
        return PatchChoice(name, patch_id)

    def read(self, name: str, path):
        from unlearn_serve.server.unlearning.uoe import ExpertPatchSet

        from unlearn_serve.families import NotMoEError

        # File reads, validation and tensor preparation here, on the caller's thread: decoding goes on.
        patches = self.patches
        if patches is None:
            try:
                patches = ExpertPatchSet(self.model, self.model_name, base_fingerprint=self.fingerprint)
            except NotMoEError as exc:
                raise ArtifactError(f"{path}: cannot serve a UOE expert patch: {exc}") from None
        return patches, patches.read(name, path)

    def install(self, prepared) -> int:
        patches, loaded = prepared
        if self.patches is None:
            self.patches = patches
            self.runner.row_hooks.append(patches)
        return self.patches.install(loaded)

    def remove(self, name: str) -> None:
        self.patches.remove(name)
        self.unloading.discard(name)

    def mark_unloading(self, name: str) -> None:
        self.unloading.add(name)

    def is_unloading(self, name: str) -> bool:
        return name in self.unloading

    def prepare(self, rows: BatchRows, batch) -> None:
        if self.patches is None:
            return None
        ids = torch.tensor([c.patch_id if c is not None else -1 for c in rows.choices], device=rows.device)
        batch.row_hooks_target = ids
        if rows.num_assistant_rows:  # assistant rows (layers < K) take no patch
            batch.row_hooks_stacked = torch.cat([ids, ids.new_full((rows.num_assistant_rows,), -1)])
        # group the rows now, on the host: the patch set remembers these tensors, so the forward reads nothing
        for spec in (ids, batch.row_hooks_stacked):
            if spec is not None:
                self.patches.set_rows(spec)
        self.patches.set_rows(None)
        return None
