"""Calibrated serving defaults for a ULD assistant: pick alpha from what the served model answers.

After training, `train_uld` writes a draft artifact and asks a `serve` function (injected by the caller:
the CLI passes `unlearn_serve.evaluation.uld_validation.serve_with_engine`, i.e. the serving Engine with
the draft loaded; training/ never imports the server) for greedy answers, `unlearning` per prompt with
`{"alpha": a}`:

- forget questions (a seeded sample of the forget set's question/answer rows): first the base model
  answers up to 8 x `max_forget` of them (a model may know few of its forget facts); the ones whose
  answer names the reference's fact (training/leak.py `names_fact`: one of its key words) come first
  among the `max_forget` that are then asked at each probed alpha. An unlearned answer *leaks* when it
  still names the fact;
- held-out retain rows (never trained on): *kept* when the unlearned answer names the reference's fact,
  or at least half of the key words of the base model's own answer;
- fluency: a forget answer is *disfluent* when it loops or leaves the language (`disfluent`, the
  harness's measures); the target is at most `max_extra_disfluent` of the answers more than the base's.

Alphas are probed by a k-ary search for the smallest alpha on the grid whose forget answers meet the
leak target (leaks fall as alpha grows): `probes_per_round` alphas per batch, 1 on CPU (bisection: 3
rounds for the 8-alpha grid), the whole grid in one batch on a GPU. That alpha becomes the default
when its retain and fluency targets are met too; otherwise the probed alpha with the best balance is
stored and the verdict says what was missed and what to try.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from unlearn_serve.training.leak import common_words, disfluent, key_words, mentions, names_fact

ALPHA_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
FALLBACK_ALPHA = 0.75  # the paper's, stored when nothing could be checked


class AnswerFn(Protocol):
    def __call__(self, prompts: list[list[int]], alphas: list[float | None], max_tokens: int) -> list[str]:
        """Greedy answer text for each prompt; alpha None = the base model, else the assistant at that alpha."""
        ...


# (base model, tokenizer, draft artifact directory) -> an answer function serving that artifact
ServeFn = Callable[[Any, Any, Path], AnswerFn]


@dataclass
class CalibrationTargets:
    max_leak: float = 0.0  # share of the base-named forget facts that may still be named
    min_kept: float = 0.95  # share of the held-out retain answers that must keep their fact
    max_extra_disfluent: float = 0.125  # share of forget answers that may loop / leave the language beyond the base's


@dataclass
class AlphaScore:
    alpha: float
    known: int  # forget facts the base model names
    leaked: int  # of those, still named by the unlearned answer
    retain_rows: int
    kept: int
    forget_rows: int
    disfluent: int  # forget answers that loop or leave the language
    base_disfluent: int

    def forget_met(self, t: CalibrationTargets) -> bool:
        return self.known > 0 and self.leaked <= math.floor(t.max_leak * self.known + 1e-9)

    def kept_met(self, t: CalibrationTargets) -> bool:
        return self.kept >= math.ceil(t.min_kept * self.retain_rows - 1e-9)

    def fluent_met(self, t: CalibrationTargets) -> bool:
        return self.disfluent <= self.base_disfluent + math.floor(t.max_extra_disfluent * self.forget_rows + 1e-9)

    def meets(self, t: CalibrationTargets) -> bool:
        return self.forget_met(t) and self.kept_met(t) and self.fluent_met(t)

    def balance(self) -> float:
        forgot = 1 - self.leaked / self.known if self.known else 0.0
        kept = self.kept / self.retain_rows if self.retain_rows else 1.0
        fluent = 1 - max(0, self.disfluent - self.base_disfluent) / max(self.forget_rows, 1)
        return min(forgot, kept, fluent)


@dataclass
class Calibration:
    alpha: float
    filter: float
    met: bool
    scores: list[AlphaScore] = field(default_factory=list)
    targets: CalibrationTargets = field(default_factory=CalibrationTargets)
    max_tokens: int = 24
    grid: tuple[float, ...] = ALPHA_GRID
    forget_questions: list[str] = field(default_factory=list)
    retain_questions: list[str] = field(default_factory=list)
    answers: dict[str, dict[str, str]] = field(default_factory=dict)  # alpha ("base" too) -> question -> answer
    asked: int = 0  # forget questions the base model answered (to find the facts it names)

    @property
    def chosen(self) -> AlphaScore | None:
        return next((s for s in self.scores if s.alpha == self.alpha), None)

    def verdict(self) -> str:
        s = self.chosen
        if s is None or s.known == 0:
            return (
                f"the base model names none of the {self.asked} validation facts it was asked, so forgetting cannot "
                "be checked; "
                f"alpha {self.alpha:g}: TARGETS NOT MET (check that the forget questions are ones the model answers)"
            )
        kept = (
            f"keeps {s.kept}/{s.retain_rows} held-out retain answers"
            if s.retain_rows
            else "retain not checked (fewer than 4 retain records: none held out)"
        )
        fluent = "fluent" if s.fluent_met(self.targets) else "NOT fluent"
        few = f" (the base model names {s.known} of the {self.asked} it was asked)" if s.known < s.forget_rows else ""
        line = (
            f"forgets {s.known - s.leaked}/{s.known} validation facts{few}, {kept}, {fluent} ({s.disfluent}/"
            f"{s.forget_rows} forget answers loop or leave the language, base {s.base_disfluent}) at alpha "
            f"{s.alpha:g}, filter {self.filter:g} (served greedy answers, {self.max_tokens} tokens)"
        )
        if self.met:
            return line + ": targets met"
        hints = []
        t = self.targets
        if not s.forget_met(t):
            best = max(self.scores, key=lambda x: (x.forget_met(t), -x.alpha))
            where = f"at every alpha probed up to {max(x.alpha for x in self.scores):g}" if not best.forget_met(
                t) else f"below alpha {best.alpha:g}"
            cost = ""
            if best.forget_met(t) and not best.meets(t):
                cost = (f" (there: keeps {best.kept}/{best.retain_rows}, {best.disfluent}/{best.forget_rows} "
                        "forget answers disfluent)")
            hints.append(f"facts still named {where}: train longer (--epochs / --min-steps)"
                         + (f", or serve --default-alpha {best.alpha:g}{cost}" if best.forget_met(t) else ""))
        if not s.kept_met(t):
            hints.append("retain answers change: add more retain data (questions of the same form as the forget "
                         "ones) or raise --retain-weight")
        if not s.fluent_met(t):
            hints.append("forget answers loop or leave the language: raise --retain-weight, add retain data, or "
                         "try a smaller --default-alpha")
        return line + ": TARGETS NOT MET (" + "; ".join(hints) + ")"

    def to_manifest(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "filter": self.filter,
            "met": self.met,
            "verdict": self.verdict(),
            "targets": asdict(self.targets),
            "scores": [asdict(s) for s in self.scores],
            "grid": list(self.grid),
            "max_tokens": self.max_tokens,
            "forget_questions": self.forget_questions,
            "retain_questions": self.retain_questions,
            "answers": self.answers,
            "forget_questions_asked_of_the_base": self.asked,
            "method": "greedy answers of the served draft artifact (training/uld_calibrate.py)",
        }


def kept_fact(
    answer: str, reference: str, base_answer: str, question: str, common: frozenset[str] = frozenset()
) -> bool:
    """A retain answer keeps its fact: it names the reference's, or at least half the key words of the base's answer."""
    if names_fact(answer, reference, question, common):
        return True
    keys = key_words(base_answer, question, common)
    return bool(keys) and 2 * sum(mentions(answer, [k]) for k in keys) >= len(keys)


def score_answers(
    alpha: float,
    forget: list[dict[str, Any]],
    retain: list[dict[str, Any]],
    base_forget: list[str],
    base_retain: list[str],
    forget_answers: list[str],
    retain_answers: list[str],
    common: frozenset[str] = frozenset(),
) -> AlphaScore:
    """Counts for one alpha; `common`: topic words that never count as a fact (training/leak.py `common_words`)."""
    known = leaked = 0
    for row, base, got in zip(forget, base_forget, forget_answers, strict=True):
        if names_fact(base, row["answer"], row["question"], common):
            known += 1
            leaked += names_fact(got, row["answer"], row["question"], common)
    kept = sum(
        kept_fact(got, row["answer"], base, row["question"], common)
        for row, base, got in zip(retain, base_retain, retain_answers, strict=True)
    )
    return AlphaScore(
        alpha, known, leaked, len(retain), kept, len(forget),
        sum(disfluent(a) for a in forget_answers), sum(disfluent(a) for a in base_forget),
    )


def validation_forget_rows(records: list[Any], max_rows: int, seed: int) -> list[dict[str, Any]]:
    """Up to `max_rows` question/answer records of the forget set, a seeded sample in file order."""
    qa = [r for r in records if isinstance(r, dict) and isinstance(r.get("question"), str)
          and isinstance(r.get("answer"), str)]
    if len(qa) > max_rows:
        picked = set(random.Random(seed).sample(range(len(qa)), max_rows))
        qa = [r for i, r in enumerate(qa) if i in picked]
    return qa


def calibrate(
    answer: AnswerFn,
    encode: Callable[[str], list[int]],
    forget_records: list[Any],
    retain_rows: list[dict[str, Any]],
    filter_value: float = 0.01,
    alphas: tuple[float, ...] = ALPHA_GRID,
    targets: CalibrationTargets | None = None,
    max_forget: int = 8,
    max_tokens: int = 24,
    probes_per_round: int = 1,
    seed: int = 0,
) -> Calibration | None:
    """Pick the serving alpha from served greedy answers (module docstring). None: no question/answer forget rows."""
    targets = targets or CalibrationTargets()
    grid = tuple(sorted(alphas))
    candidates = validation_forget_rows(forget_records, 8 * max_forget, seed)
    retain = [r for r in retain_rows if isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)]
    if not candidates:
        return None
    # words most forget answers share are the topic ("Harry Potter"), not a fact
    common = common_words([r["answer"] for r in validation_forget_rows(forget_records, len(forget_records), seed)])
    # round 0: the base model's answers (which facts it names; its own retain answers and fluency)
    prompts = [encode(r["question"]) for r in candidates + retain]
    base = answer(prompts, [None] * len(prompts), max_tokens)
    base_candidates, base_retain = base[: len(candidates)], base[len(candidates) :]
    named = [names_fact(b, r["answer"], r["question"], common)
             for r, b in zip(candidates, base_candidates, strict=True)]
    order = sorted(range(len(candidates)), key=lambda i: not named[i])[:max_forget]
    order.sort()
    forget = [candidates[i] for i in order]
    base_forget = [base_candidates[i] for i in order]
    questions = [r["question"] for r in forget + retain]
    prompts = [encode(q) for q in questions]
    answers: dict[str, dict[str, str]] = {"base": dict(zip(questions, base_forget + base_retain, strict=True))}
    scores: dict[int, AlphaScore] = {}
    lo, hi = 0, len(grid)  # smallest index meeting the forget target lies in [lo, hi]; hi = none
    if any(named):
        while lo < hi:
            span = [i for i in range(lo, hi) if i not in scores]
            if not span:
                break
            k = max(1, min(probes_per_round, len(span)))
            probe = sorted({span[(j + 1) * len(span) // (k + 1)] for j in range(k)} if k < len(span) else set(span))
            got = answer(
                [p for _ in probe for p in prompts], [grid[i] for i in probe for _ in prompts], max_tokens
            )
            for n, i in enumerate(probe):
                block = got[n * len(prompts) : (n + 1) * len(prompts)]
                answers[f"{grid[i]:g}"] = dict(zip(questions, block, strict=True))
                scores[i] = score_answers(
                    grid[i], forget, retain, base_forget, base_retain, block[: len(forget)], block[len(forget) :],
                    common,
                )
            meeting = [i for i in probe if scores[i].forget_met(targets)]
            failing = [i for i in probe if not scores[i].forget_met(targets) and (not meeting or i < min(meeting))]
            hi = min(meeting) if meeting else hi
            lo = max(lo, max(failing) + 1) if failing else lo
    ordered = [scores[i] for i in sorted(scores)]
    common = dict(filter=filter_value, scores=ordered, targets=targets, max_tokens=max_tokens, grid=grid,
                  forget_questions=[r["question"] for r in forget], retain_questions=[r["question"] for r in retain],
                  answers=answers, asked=len(candidates))
    if not ordered:
        return Calibration(FALLBACK_ALPHA, met=False, **common)
    if hi < len(grid) and scores[hi].meets(targets):
        return Calibration(grid[hi], met=True, **common)
    best = max(ordered, key=lambda s: (s.balance(), -s.alpha))
    return Calibration(best.alpha, met=False, **common)
