"""Requests, their sequences (one per choice, `n` of them) and the outputs the engine emits."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from unlearn_serve.server.engine.sampling_params import SamplingParams

# Reported log-probabilities never go below this (vLLM's floor): tokens an unlearned row rules out
# have probability 0 (-inf), which JSON cannot carry and clients such as lm-eval choke on.
LOGPROB_FLOOR = -9999.0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class Selection:
    """A request's unlearning choice, resolved by the engine to a loaded artifact."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"alpha": 0.5, "filter": 0.01}


@dataclass
class SequenceOutput:
    """One step's news for one sequence (choice). Text and tokens are deltas since the last output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[SequenceOutput]
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, with the first output
    finished: bool = False
    num_generated_tokens: int = 0  # over all sequences, so far
    error: str | None = None


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        selection: Selection | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.selection = selection
        self.backend: Any = None  # resolved by the engine (ULD assistant or UOE patch)
        self.pinned = False  # holds a pin on its artifact (taken at admission, released at finish)
        self.on_output = on_output
        self.arrival_time = time.monotonic()
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.prompt_logprobs_sent = False
        self.sequences = [Sequence(self, i) for i in range(params.n)]
        self.aborted = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(s.output_ids) for s in self.sequences)


class Sequence:
    def __init__(self, request: Request, index: int):
        self.request = request
        self.index = index
        self.output_ids: list[int] = []
        self.slot = -1
        self.assistant_slot = -1
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.generator: torch.Generator | None = None
        # incremental detokenisation: a few prompt tokens then the output ids, offsets into that list,
        # and the text of detok_ids[prefix_offset:read_offset] (OutputProcessor._detokenize)
        self.detok_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.read_text = ""
        self.text = ""
        self.sent_text_len = 0
        self.sent_token_len = 0
        self.pending_logprobs: list[TokenLogprob] = []

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.output_ids)
