"""Where unlearning changed a served answer: each answer token against the target's own best token there.

`trace_answers` serves prompts greedily with an unlearning selection, then scores each prompt + answer once more
without unlearning (`prompt_logprobs=1`: the target's best token at every position, given the served text so far).
A position where the target's best token is another one is a *substitution*: the unlearning decided it. Every other
token is the target's own greedy choice in that context. Used by bench/uld_trace.py (marked answers) and
bench/uld_quality.py (the share of general-answer tokens the unlearning changed: interference where it should
change nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AnswerTrace:
    """One served answer: its tokens, the target's best token at each of their positions, and the text."""

    tokens: list[int]
    target_best: list[int]  # -1 where the engine gave no alternative
    text: str

    @property
    def substituted(self) -> list[bool]:
        """Per token: True where the target would have written another token."""
        return [t != b for t, b in zip(self.tokens, self.target_best, strict=True)]

    def marked(self, decode: Any) -> str:
        """The answer with each substitution written `[served|target's]`; `decode`: token ids -> text."""
        parts = []
        for t, b, changed in zip(self.tokens, self.target_best, self.substituted, strict=True):
            served = decode([t])
            parts.append(f"[{served}|{decode([b]) if b >= 0 else '?'}]" if changed else served)
        return "".join(parts)


def trace_answers(
    engine: Any, prompts: Sequence[list[int]], selection: Any, max_tokens: int
) -> list[AnswerTrace]:
    """Serve `prompts` greedily under `selection` (an engine Selection / artifact name) and trace each answer."""
    from unlearn_serve.server.engine.sampling_params import SamplingParams

    served = engine.generate(list(prompts), SamplingParams(max_tokens=max_tokens, temperature=0.0), selection)
    return trace_served(engine, prompts, [r.completions[0] for r in served])


def trace_served(engine: Any, prompts: Sequence[list[int]], completions: Sequence[Any]) -> list[AnswerTrace]:
    """Trace answers already served (each completion's `token_ids` and `text`): one scoring pass of the target."""
    from unlearn_serve.server.engine.sampling_params import SamplingParams

    scoring = SamplingParams(max_tokens=0, prompt_logprobs=1, temperature=0.0)
    full = [list(p) + list(c.token_ids) for p, c in zip(prompts, completions, strict=True)]
    scored = engine.generate(full, scoring, None)
    traces = []
    for p, c, s in zip(prompts, completions, scored, strict=True):
        best = [e.top[0][0] if e is not None and e.top else -1 for e in s.prompt_logprobs[len(p) :]]
        traces.append(AnswerTrace(list(c.token_ids), best, c.text))
    return traces


def substitution_share(traces: Sequence[AnswerTrace]) -> float:
    """Share of all answer tokens that are substitutions (0 with no tokens)."""
    total = sum(len(t.tokens) for t in traces)
    return sum(sum(t.substituted) for t in traces) / total if total else 0.0
