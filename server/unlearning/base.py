"""The interface an unlearning method implements to be served by the engine.

The engine knows three things about a method, all behind `UnlearningBackend`:

1. its artifacts: `read` (any thread: file I/O, validation), `install` (engine thread, between
   steps), `remove`, `names`, `resolve` (a request's selection -> a `Choice`);
2. `prepare(rows, batch)`: host work done once per batch composition (a prefill, or a change of
   the running set). It looks at which rows chose this method and fills the `ForwardBatch` fields
   the model runner acts on inside the forward (assistant-row exits and LoRA row groups for ULD,
   per-row patch ids for UOE's router/expert hooks), and returns a plan of device tensors;
3. `process_logits(plan, logits, assistant_hidden, early_exit_hidden)`: tensor-only post-processing of the
   target's logits (ULD's logit difference; identity for UOE), inside the decode step: no host sync.

A third method implements these (acting through forward hooks on the model, extra assistant rows,
and/or logits) and is added to `ArtifactManager.backends`; the step loop does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Choice(Protocol):
    """A request's resolved selection of one artifact (with its per-request options)."""

    name: str
    uses_assistant: bool  # the row needs an assistant slot (stacked rows through layers < K)


@dataclass
class BatchRows:
    """What a backend is told about the rows of one batch (host lists, built once per composition)."""

    choices: list[Any | None]  # per target row: the row's choice if it is this backend's, else None
    assistant_row: list[int]  # per target row: its row among the assistant rows, -1 when it has none
    num_assistant_rows: int  # assistant rows in the stacked batch (decode: padded to the slot region)
    # per logits row: (target row, position in that row); decode: (i, 0); prefill: last or all positions
    logit_rows: list[tuple[int, int]]
    device: torch.device

    def assistant_source(self) -> list[int]:
        """Per assistant row, the target row it is a copy of (0 for padding rows)."""
        return assistant_sources(self.assistant_row, self.num_assistant_rows)


def assistant_sources(assistant_row: list[int], num_assistant_rows: int) -> list[int]:
    """Per assistant row, its target row (0 for padding rows): `assistant_row` inverted."""
    source = [0] * num_assistant_rows
    for target_row, row in enumerate(assistant_row):
        if row >= 0:
            source[row] = target_row
    return source


class UnlearningBackend(ABC):
    kind: str  # "uld", "uoe": shown in logs and errors
    # True when `process_logits` decides the token (ULD): the target's own best token is then known before it, and
    # the engine's repeat guard (engine/repeat_guard.py) acts where the two differ. False when the method acts inside
    # the forward (UOE): there is no "target's own" token to compare with.
    changes_logits: bool = False

    # ------------------------------------------------------------------ artifacts
    @abstractmethod
    def names(self) -> list[str]:
        """Names of the installed artifacts (including ones being unloaded)."""

    @abstractmethod
    def resolve(self, name: str, options: dict[str, Any]) -> Choice | None:
        """The choice for artifact `name` with per-request `options`; None when `name` is not ours."""

    @abstractmethod
    def read(self, name: str, path) -> Any:
        """Read and validate an artifact (no engine state touched: safe off the engine thread)."""

    @abstractmethod
    def install(self, prepared: Any) -> Any:
        """Make a read artifact selectable (engine thread, between steps)."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Remove an artifact no request pins any more (engine thread, between steps)."""

    @abstractmethod
    def mark_unloading(self, name: str) -> None:
        """From now on `resolve` refuses `name` (its running requests go on)."""

    @abstractmethod
    def is_unloading(self, name: str) -> bool:
        """Whether `name` was marked for unloading."""

    # ------------------------------------------------------------------ per batch
    @abstractmethod
    def prepare(self, rows: BatchRows, batch: Any) -> Any:
        """Host work once per batch composition: fill `batch` (a ForwardBatch); return a plan or None."""

    def process_logits(
        self,
        plan: Any,
        logits: torch.Tensor,
        assistant_hidden: torch.Tensor | None,
        early_exit_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Post-process the target's float32 logits [S, V] of the rows in `plan` (tensor ops only). The hidden states
        are the model runner's: the assistant rows', and their early exits where `prepare` asked for them."""
        return logits
