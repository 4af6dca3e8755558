"""Calibrated serving defaults for a ULD assistant: pick alpha from what the served model answers.

After training, `train_uld` writes a draft artifact and asks a `serve` function (injected by the caller:
the CLI passes `unlearn_serve.evaluation.uld_validation.serve_with_engine`, i.e. the serving Engine with
the draft loaded; training/ never imports the server) for greedy answers, `unlearning` per prompt with
`{"alpha": a}`:

- forget questions (a seeded sample of the forget set's question/answer rows): first the base model
  answers up to 8 x `max_forget` of them (a model may know few of its forget facts); the ones whose
  answer gives the reference's fact (training/leak.py `knows_fact`: one of its names, or two of a descriptive
  answer's key words) come first
  among the `max_forget` that are then asked at each probed alpha. An unlearned answer *leaks* (`fact_leaked`)
  when it still names a named fact, or nearly names it ("J.K. Rowle" for "Rowling": `near_mentions`), or repeats
  at least half of the key words the base's answer said of a descriptive one (TOFU's "… credits her parents for
  instilling discipline …": one shared topic word is no leak). Each of those questions is also asked in a
  rule-made rephrasing (training/augment.py `rephrase_question`, one the training did not use), and a fact
  counts as leaked when either answer gives it away: an assistant that forgets only its training wording
  serves the fact to the first user who asks differently (SmolLM2, the demo's recipe at training seed 1:
  0/8 original questions named at the calibrated alpha, 2/8 hand-written paraphrases);
- held-out retain rows (never trained on): *kept* when the unlearned answer names the reference's fact,
  or at least half of the key words of the base model's own answer. When fewer than `min_retain_rows`
  are held out, a seeded sample of the training retain rows tops them up (counted and reported apart:
  "keeps 2/2 held-out + 6/6 training retain answers"), so one lost answer is not a 50% miss;
- fluency: a forget answer is *disfluent* when it loops or leaves the language (`disfluent`, the
  harness's measures); the target is at most `max_extra_disfluent` of the answers more than the base's.
  When the answer function can score text (`nll`, the serving Engine's: unlearn_serve/evaluation/
  fluency.py, the harness's definition), the forget answers' perplexity under the base model, relative
  to the base's own answers, must also be at most `max_rel_ppl`: on the answers to the forget questions as
  written and on those to their rephrasings (against the base's answers to the rephrasings), each.

Alphas are probed by a k-ary search for the smallest alpha on the grid whose forget answers meet the
leak target (leaks fall as alpha grows): `probes_per_round` alphas per batch, 1 on CPU (bisection: 3
rounds for the 8-alpha grid), the whole grid in one batch on a GPU. Leaks do not always fall with alpha
(SmolLM2: facts named at 1.5, 3 and 4 but not at 2), so a search that found no alpha that forgets scores the rest
of the grid before giving up. The smallest alpha that forgets becomes the default
when its retain and fluency targets are met too. Otherwise forgetting comes first: of the probed alphas that
forget, the one with the best balance of retain and fluency is stored (a smaller alpha with smoother answers
would serve facts the validation saw leak); only when none forgets, the probed alpha with the best balance
overall. The balance is the worst of the three shares (facts forgotten, retain answers kept, fluency); a tie is broken
by the next-worst share, then the best, then the smaller alpha among alphas that forget and the larger among alphas
that do not (the validation cannot tell them apart, and the larger subtracts more). Either way the verdict says what
was missed and what to try.

Given several `prefer` margins (`train-uld --calibration-margins 1,2`; default: margin 1 only), the search runs
once per margin, in order, until one meets every target; else `choose_margin` keeps the margin whose stored alpha
forgets with the best balance (measured on TOFU full, docs/benchmarks.md section 18).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from unlearn_serve.training.augment import rephrase_question
from unlearn_serve.training.leak import (
    MAX_RELATIVE_PERPLEXITY,
    common_words,
    disfluent,
    fact_leaked,
    is_named_fact,
    key_words,
    knows_fact,
    mentions,
    mentions_initials,
    name_initials,
    names_fact,
    relative_perplexity,
    words_of,
)

ALPHA_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
FALLBACK_ALPHA = 0.75  # the paper's, stored when nothing could be checked


class AnswerFn(Protocol):
    def __call__(
        self, prompts: list[list[int]], alphas: list[float | None], max_tokens: int, margin: float | None = None
    ) -> list[str]:
        """Greedy answer text for each prompt; alpha None = the base model, else the assistant at that alpha (and at
        the `prefer` rule's `margin` when given, else the artifact's). `margin` is passed only when the calibration
        chooses between margins; an answer function given to `WithOptions` also takes `options` (more serving
        options, e.g. `{"finish_words": False}`)."""
        ...

    # optional: `nll(texts) -> float`, the mean NLL per token of the texts alone under the base model
    # (unlearn_serve.evaluation.fluency.answers_nll); without it the relative perplexity is not checked


# (base model, tokenizer, draft artifact directory) -> an answer function serving that artifact
ServeFn = Callable[[Any, Any, Path], AnswerFn]


@dataclass
class CalibrationTargets:
    max_leak: float = 0.0  # share of the base-named forget facts that may still be named
    min_kept: float = 0.95  # share of the held-out retain answers that must keep their fact
    max_extra_disfluent: float = 0.125  # share of forget answers that may loop / leave the language beyond the base's
    max_rel_ppl: float = MAX_RELATIVE_PERPLEXITY  # forget answers' perplexity under the base / the base's own answers'
    min_retain_rows: int = 8  # fewer held-out retain rows than this: training retain rows top them up


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
    rel_ppl: float | None = None  # forget answers' perplexity under the base / the base answers'; None: not measured
    # the same for the answers to the rephrased forget questions, against the base's answers to those; None: not asked.
    # Fluency must hold on both wordings, as forgetting must: on the trained wording the assistant's subtraction is
    # the one it learnt, on another it is not (SmolLM2, twenty-fourth session: a build at 1.99x on the trained
    # questions was 2.16x on the rephrased ones and 2.79x on the harness's own questions)
    rel_ppl_rephrased: float | None = None
    train_retain_rows: int = 0  # training retain rows that topped up the held-out ones (trained on: the easier check)
    train_kept: int = 0
    rephrased_rows: int = 0  # known facts also asked in a rule-made rephrasing
    rephrased_leaked: int = 0  # of those, named in the rephrased question's answer (counted in `leaked` too)
    # retain rows left out of `retain_rows` / `train_retain_rows`: the base model's own answer does not give their fact
    # (a wrong answer cannot be lost; SmolLM2 says a spider has "two pairs of legs", and its unlearned "8 legs" counted
    # as a lost retain answer)
    retain_unknown: int = 0

    def forget_met(self, t: CalibrationTargets) -> bool:
        return self.known > 0 and self.leaked <= math.floor(t.max_leak * self.known + 1e-9)

    def kept_met(self, t: CalibrationTargets) -> bool:
        rows = self.retain_rows + self.train_retain_rows
        return self.kept + self.train_kept >= math.ceil(t.min_kept * rows - 1e-9)

    @property
    def worst_rel_ppl(self) -> float | None:
        """The larger of the two wordings' relative perplexities (None: not measured)."""
        measured = [p for p in (self.rel_ppl, self.rel_ppl_rephrased) if p is not None]
        return max(measured) if measured else None

    def fluent_met(self, t: CalibrationTargets) -> bool:
        ppl = self.worst_rel_ppl
        ppl_ok = ppl is None or ppl <= t.max_rel_ppl
        return ppl_ok and self.disfluent <= self.base_disfluent + math.floor(
            t.max_extra_disfluent * self.forget_rows + 1e-9
        )

    def meets(self, t: CalibrationTargets) -> bool:
        return self.forget_met(t) and self.kept_met(t) and self.fluent_met(t)

    def balance(self, t: CalibrationTargets) -> float:
        """The worst of: share of facts forgotten, share of retain answers kept, fluency. Perplexity counts relative
        to its target (within it: fully fluent), so that a hair's difference in perplexity above the target does not
        outweigh a retain answer lost (the demo: 2.60x vs 2.54x picked alpha 3 over 1.5, which kept one more)."""
        return self.balance_order(t)[0]

    def balance_order(self, t: CalibrationTargets) -> tuple[float, float, float]:
        """`balance`'s three shares from the worst up: compared as a tuple, two alphas with the same worst share are
        ordered by the next one (the demo's build with the prefix guard: alphas 1 and 2 both named 1 of 7 facts,
        alpha 2 kept 8/8 retain answers against 7/8 and looped less, and the smaller alpha had won the tie)."""
        forgot = 1 - self.leaked / self.known if self.known else 0.0
        rows = self.retain_rows + self.train_retain_rows
        kept = (self.kept + self.train_kept) / rows if rows else 1.0
        fluent = 1 - max(0, self.disfluent - self.base_disfluent) / max(self.forget_rows, 1)
        ppl = self.worst_rel_ppl
        if ppl is not None and ppl > t.max_rel_ppl:
            fluent = min(fluent, t.max_rel_ppl / ppl)
        low, mid, high = sorted((forgot, kept, fluent))
        return low, mid, high

    def kept_text(self) -> str:
        unknown = f" ({self.retain_unknown} the base model answers wrong left out)" if self.retain_unknown else ""
        if not self.retain_rows + self.train_retain_rows:
            if self.retain_unknown:
                return f"retain not checked (the base model gets all {self.retain_unknown} retain answers wrong)"
            return "retain not checked (no question/answer retain rows)"
        held = f"{self.kept}/{self.retain_rows} held-out"
        if self.train_retain_rows:
            return f"keeps {held} + {self.train_kept}/{self.train_retain_rows} training retain answers{unknown}"
        return f"keeps {held} retain answers{unknown}"

    def fluent_text(self, t: CalibrationTargets) -> str:
        ppl = (
            ""
            if self.rel_ppl is None
            else f"; perplexity {self.rel_ppl:.2f}x the base's answers"
            + ("" if self.rel_ppl_rephrased is None else f", rephrased {self.rel_ppl_rephrased:.2f}x")
            + f", target <= {t.max_rel_ppl:g}x"
        )
        return (
            f"{'fluent' if self.fluent_met(t) else 'NOT fluent'} ({self.disfluent}/{self.forget_rows} forget "
            f"answers loop or leave the language, base {self.base_disfluent}{ppl})"
        )


@dataclass
class Calibration:
    alpha: float
    filter: float
    met: bool
    scores: list[AlphaScore] = field(default_factory=list)
    rule: str | None = None  # the combination rule the answers were served with (None: the draft's default)
    topic: bool = False  # a forget answer naming another forget fact counted as a leak (`score_answers`)
    targets: CalibrationTargets = field(default_factory=CalibrationTargets)
    max_tokens: int = 24
    grid: tuple[float, ...] = ALPHA_GRID
    forget_questions: list[str] = field(default_factory=list)
    rephrased_questions: list[str] = field(default_factory=list)  # forget questions asked again, reworded
    retain_questions: list[str] = field(default_factory=list)
    train_retain_questions: list[str] = field(default_factory=list)
    answers: dict[str, dict[str, str]] = field(default_factory=dict)  # alpha ("base" too) -> question -> answer
    asked: int = 0  # forget questions the base model answered (to find the facts it names)
    margin: float | None = None  # the `prefer` margin the answers were served with (None: the draft's default)
    # when the calibration chose between margins: every margin's own calibration, in preference order
    margins_tried: list[Calibration] = field(default_factory=list)
    # finishing words (uld_combine.py) the answers were served with (None: the draft's default); when the calibration
    # compared on and off (`choose_finish_words`): both calibrations, on first
    finish_words: bool | None = None
    finish_words_tried: list[Calibration] = field(default_factory=list)
    # the gate (uld_combine.py) the calibration chose for an ungated draft (`choose_gate`): "early_exit" or None, and
    # both calibrations, ungated first; empty when it did not compare
    gate: str | None = None
    gate_tried: list[Calibration] = field(default_factory=list)

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
        notes = [f"the base model names {s.known} of the {self.asked} it was asked"] if s.known < s.forget_rows else []
        if s.rephrased_rows:
            notes.append(f"each also asked rephrased: {s.rephrased_leaked} named there")
        few = f" ({'; '.join(notes)})" if notes else ""
        rule = f", rule {self.rule}" if self.rule else ""
        margin = f", margin {self.margin:g}" if self.margin is not None else ""
        line = (
            f"forgets {s.known - s.leaked}/{s.known} validation facts{few}, {s.kept_text()}, "
            f"{s.fluent_text(self.targets)} at alpha {s.alpha:g}{margin}, filter {self.filter:g}{rule} (served greedy "
            f"answers, {self.max_tokens} tokens)"
        )
        tried = (
            " [margins tried: " + ", ".join(c.margin_summary() for c in self.margins_tried) + "]"
            if len(self.margins_tried) > 1
            else ""
        )
        if len(self.finish_words_tried) > 1:
            both = ", ".join(
                f"{'on' if i == 0 else 'off'} ({c.outcome_summary()})" for i, c in enumerate(self.finish_words_tried)
            )
            tried += f" [finishing words: {both} -> {'on' if self.finish_words else 'off'}]"
        if len(self.gate_tried) > 1:
            ungated, gated = (c.outcome_summary() for c in self.gate_tried)
            tried += f" [early-exit gate: off ({ungated}), on ({gated}) -> {'on' if self.gate else 'off'}]"
        if self.met:
            return line + ": targets met" + tried
        hints = []
        t = self.targets
        if not s.forget_met(t):
            best = max(self.scores, key=lambda x: (x.forget_met(t), -x.alpha))
            where = (
                f"at every alpha probed up to {max(x.alpha for x in self.scores):g}"
                if not best.forget_met(t)
                else f"below alpha {best.alpha:g}"
            )
            cost = ""
            if best.forget_met(t) and not best.meets(t):
                cost = (
                    f" (there: keeps {best.kept}/{best.retain_rows}, {best.disfluent}/{best.forget_rows} "
                    "forget answers disfluent)"
                )
            hints.append(
                f"facts still named {where}: train longer (--epochs / --min-steps)"
                + (f", or serve --default-alpha {best.alpha:g}{cost}" if best.forget_met(t) else "")
            )
        if not s.kept_met(t):
            hints.append(
                "retain answers change: add more retain data (questions of the same form as the forget "
                "ones) or raise --retain-weight"
            )
        if not s.fluent_met(t):
            leak_below = [x.alpha for x in self.scores if x.alpha < s.alpha and not x.forget_met(t)]
            smaller = (
                f" (a smaller --default-alpha names facts: the validation saw it at alpha {max(leak_below):g})"
                if s.forget_met(t) and leak_below
                else ", or try a smaller --default-alpha"
            )
            hints.append(
                "forget answers loop, leave the language or are improbable under the base: raise "
                f"--retain-weight or add retain data{smaller}"
            )
        return line + ": TARGETS NOT MET (" + "; ".join(hints) + ")" + tried

    def margin_summary(self) -> str:
        """"2 (alpha 3: forgets, not met)": this calibration's outcome, for the verdict of one that tried margins."""
        return f"{self.margin:g} ({self.outcome_summary()})"

    def outcome_summary(self) -> str:
        """"alpha 3: forgets, not met": the stored alpha and whether it met the targets or at least forgets."""
        s, t = self.chosen, self.targets
        outcome = "targets met" if self.met else "forgets, not met" if s and s.forget_met(t) else "names facts"
        return f"alpha {self.alpha:g}: {outcome}"

    def to_manifest(self) -> dict[str, Any]:
        tried = (
            {"margins_tried": [_without_answers(c.to_manifest()) for c in self.margins_tried]}
            if len(self.margins_tried) > 1
            else {}
        )
        if len(self.finish_words_tried) > 1:
            tried["finish_words_tried"] = [_without_answers(c.to_manifest()) for c in self.finish_words_tried]
        if len(self.gate_tried) > 1:
            tried["gate"] = self.gate
            tried["gate_tried"] = [_without_answers(c.to_manifest()) for c in self.gate_tried]
        return tried | {
            "finish_words": self.finish_words,
            "alpha": self.alpha,
            "filter": self.filter,
            "rule": self.rule,
            "margin": self.margin,
            "topic": self.topic,
            "met": self.met,
            "verdict": self.verdict(),
            "targets": asdict(self.targets),
            "scores": [asdict(s) for s in self.scores],
            "grid": list(self.grid),
            "max_tokens": self.max_tokens,
            "forget_questions": self.forget_questions,
            "rephrased_questions": self.rephrased_questions,
            "retain_questions": self.retain_questions,
            "train_retain_questions": self.train_retain_questions,
            "answers": self.answers,
            "forget_questions_asked_of_the_base": self.asked,
            "method": "greedy answers of the served draft artifact (training/uld_calibrate.py)",
        }


def _without_answers(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "answers"}


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
    vocabulary: frozenset[str] = frozenset(),
    train_retain: int = 0,
    rephrased_answers: list[str | None] | None = None,
    topic: bool = False,
    rephrased_questions: list[str | None] | None = None,
) -> AlphaScore:
    """Counts for one alpha; `common`: topic words that never count as a fact (training/leak.py `common_words`);
    `vocabulary`: the data's words, which never count as a near-leak; the last `train_retain` rows of `retain` are
    training retain rows (counted apart); `rephrased_answers`: per forget row, the answer to its rephrased question
    (`rephrased_questions`; None: not asked); a known fact leaks when either answer gives it away. `topic`: the forget
    set is one topic, so a known fact also leaks when the answer to *another* forget question names it (a key word or
    its initials the question asked does not say): "… the magical world of Harry Potter (J.K.R.)" for the friends."""
    knows = [knows_fact(b, r["answer"], r["question"], common) for r, b in zip(forget, base_forget, strict=True)]
    # each known named fact's key words and initials, once (None: not a known named fact)
    facts = [
        (key_words(r["answer"], r["question"], common), name_initials(r["answer"]))
        if k and is_named_fact(r["answer"], r["question"], common)
        else None
        for r, k in zip(forget, knows, strict=True)
    ]

    def names_another(text: str, i: int, asked: str) -> bool:
        """The answer to forget row i (asked as `asked`) names another known named fact."""
        for j, fact in enumerate(facts):
            if j == i or fact is None:
                continue
            keys = [k for k in fact[0] if not mentions(asked, [k])]
            initials = [x for x in fact[1] if not mentions_initials(asked, [x])]
            if mentions(text, keys) or mentions_initials(text, initials):
                return True
        return False

    known = leaked = rephrased = rephrased_leaked = 0
    asked_again = rephrased_questions or [None] * len(forget)
    for i, (row, base, got, again) in enumerate(
        zip(forget, base_forget, forget_answers, rephrased_answers or [None] * len(forget), strict=True)
    ):
        if knows[i]:
            known += 1
            # the fact's key words come from the base's answer to the original question, whatever the wording asked
            leak = fact_leaked(got, row["answer"], row["question"], base, common, vocabulary)
            leak = leak or (topic and names_another(got, i, row["question"]))
            if again is not None:
                rephrased += 1
                leak_again = fact_leaked(again, row["answer"], row["question"], base, common, vocabulary)
                leak_again = leak_again or (topic and names_another(again, i, asked_again[i] or row["question"]))
                rephrased_leaked += leak_again
                leak = leak or leak_again
            leaked += leak
    kept = [
        kept_fact(got, row["answer"], base, row["question"], common)
        for row, base, got in zip(retain, base_retain, retain_answers, strict=True)
    ]
    # only the retain facts the base model gives can be kept or lost
    right = [knows_fact(b, row["answer"], row["question"], common) for row, b in zip(retain, base_retain, strict=True)]
    held = len(retain) - train_retain
    return AlphaScore(
        alpha,
        known,
        leaked,
        sum(right[:held]),
        sum(k for k, r in zip(kept[:held], right[:held], strict=True) if r),
        len(forget),
        sum(disfluent(a) for a in forget_answers),
        sum(disfluent(a) for a in base_forget),
        train_retain_rows=sum(right[held:]),
        train_kept=sum(k for k, r in zip(kept[held:], right[held:], strict=True) if r),
        retain_unknown=len(retain) - sum(right),
        rephrased_rows=rephrased,
        rephrased_leaked=rephrased_leaked,
    )


def untrained_rephrasing(question: str, trained: int = 0) -> str | None:
    """The rule-made rephrasing of `question` after the first `trained` ones (the training's `question_variants`):
    a wording the assistant was not trained on; None when the rules give no more."""
    variants = rephrase_question(question, trained + 1)
    return variants[trained] if len(variants) > trained else None


def validation_forget_rows(records: list[Any], max_rows: int, seed: int) -> list[dict[str, Any]]:
    """Up to `max_rows` question/answer records of the forget set, a seeded sample in file order."""
    qa = [
        r
        for r in records
        if isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
    ]
    if len(qa) > max_rows:
        picked = set(random.Random(seed).sample(range(len(qa)), max_rows))
        qa = [r for i, r in enumerate(qa) if i in picked]
    return qa


def _qa_rows(rows: list[Any]) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
    ]


class SharedBase:
    """`answer` with what no serving setting changes asked once and shared through `shared` between the calibrations
    that compare settings: the base model's answers and the base's score of its own answers. Subclasses say how an
    unlearned prompt is served (`_unlearned`)."""

    def __init__(self, answer: AnswerFn, shared: dict[Any, Any]):
        self.answer, self.shared = answer, shared
        if hasattr(answer, "nll"):
            self.nll = self._shared_nll

    def __call__(
        self, prompts: list[list[int]], alphas: list[float | None], max_tokens: int, margin: float | None = None
    ) -> list[str]:
        if all(a is None for a in alphas):
            key = ("base", tuple(map(tuple, prompts)), max_tokens)
            if key not in self.shared:
                self.shared[key] = self.answer(prompts, alphas, max_tokens)
            return self.shared[key]
        return self._unlearned(prompts, alphas, max_tokens, margin)

    def _unlearned(
        self, prompts: list[list[int]], alphas: list[float | None], max_tokens: int, margin: float | None
    ) -> list[str]:
        raise NotImplementedError

    def _shared_nll(self, texts: list[str]) -> float:
        # the base answers' score (the relative perplexity's denominator) is asked again by every setting
        key = ("nll", tuple(texts))
        if key not in self.shared:
            self.shared[key] = self.answer.nll(texts)  # type: ignore[attr-defined]
        return self.shared[key]


class AtMargin(SharedBase):
    """`answer` serving every unlearned prompt at one `prefer` margin (`choose_margin`)."""

    def __init__(self, answer: AnswerFn, margin: float, shared: dict[Any, Any]):
        super().__init__(answer, shared)
        self.margin = margin

    def _unlearned(self, prompts, alphas, max_tokens, margin):
        return self.answer(prompts, alphas, max_tokens, margin=self.margin)


class WithOptions(SharedBase):
    """`answer` serving every unlearned prompt with more serving `options` (`{"finish_words": False}`:
    `choose_finish_words`); a margin asked by an `AtMargin` around it is passed on."""

    def __init__(self, answer: AnswerFn, options: dict[str, Any], shared: dict[Any, Any]):
        super().__init__(answer, shared)
        self.options = options

    def _unlearned(self, prompts, alphas, max_tokens, margin):
        extra: dict[str, Any] = {} if margin is None else {"margin": margin}
        return self.answer(prompts, alphas, max_tokens, options=self.options, **extra)  # type: ignore[call-arg]


def choose_finish_words(on: Calibration, off: Calibration) -> Calibration:
    """Finishing words on or off, from one calibration each: on unless off does better on the validation's first
    criterion, forgetting. On when it meets every target or off does not; of two that forget, the better balance (on
    when tied); of one that forgets, that one; of none, the one naming fewer validation facts (on when tied). Why: on
    TOFU quick's small-vocabulary model the early exit already predicts the forget names' endings, so finishing words
    completes a name whose first piece slipped through (4/8 validation facts named at every alpha, against 3/8 off);
    elsewhere it only makes answers more fluent (docs/uld.md 2i)."""
    t = on.targets
    chosen = on
    if not on.met and off.met:
        chosen = off
    elif not on.met:
        s_on, s_off = on.chosen, off.chosen
        forgets_on = s_on is not None and s_on.forget_met(t)
        forgets_off = s_off is not None and s_off.forget_met(t)
        if forgets_on and forgets_off:
            chosen = off if s_off.balance_order(t) > s_on.balance_order(t) else on  # type: ignore[union-attr]
        elif forgets_off:
            chosen = off
        elif not forgets_on and s_on is not None and s_off is not None and s_off.leaked < s_on.leaked:
            chosen = off
    return replace(chosen, finish_words=chosen is on, finish_words_tried=[on, off])


def choose_gate(ungated: Calibration, gated: Calibration) -> Calibration:
    """The early-exit gate on an ungated draft (a uniform-reference assistant), from one calibration each: on only
    when that meets every target and ungated does not. Why: a K-layer assistant trained against uniform also prefers
    the likely next word on the forget topic ("The", "of", "is"); ungated, alpha times that is subtracted too, and on
    SmolLM2 41% of the forget answers' tokens changed (perplexity 2.3x the base's answers); gated, only what the LoRA
    learnt over the early exit is subtracted (1.6-1.8x). Only when every target is met, because where the early exit
    already knows the facts (TOFU's 4-layer target at K = 2) the gate closes on them: its greedy answers may still look
    forgotten while their probabilities are not (TOFU full: forget quality 2e-26 gated, docs/benchmarks.md 30)."""
    chosen = gated if gated.met and not ungated.met else ungated
    return replace(chosen, gate="early_exit" if chosen is gated else None, gate_tried=[ungated, gated])


def choose_margin(tried: list[Calibration]) -> Calibration:
    """Of one calibration per margin (in order of preference): the first that meets every target; else, of those
    whose stored alpha forgets, the best balance of retain and fluency (the earlier on a tie); else the first.
    Why choose at all: how far the assistant may subtract before answers suffer differs by model (TOFU's small
    Llama kept its utility only at margin 2; the tiny memorising models and SmolLM2 forget only at margin 1)."""
    met = [c for c in tried if c.met]
    if met:
        return met[0]
    forgetting = [c for c in tried if c.chosen is not None and c.chosen.forget_met(c.targets)]
    if forgetting:
        return max(forgetting, key=lambda c: c.chosen.balance_order(c.targets))  # max keeps the first of equals
    return tried[0]


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
    train_retain_rows: list[dict[str, Any]] | None = None,
    rule: str | None = None,
    rephrase: bool = True,
    trained_rephrasings: int = 0,
    margins: tuple[float, ...] = (),
    topic: bool = False,
) -> Calibration | None:
    """Pick the serving alpha from served greedy answers (module docstring). None: no question/answer forget rows.

    `train_retain_rows`: the retain rows trained on, to top up fewer than `targets.min_retain_rows` held-out ones;
    `rule`: the combination rule the answer function serves with (recorded only); `rephrase`: also ask each forget
    question in a rule-made rephrasing, the first one after the `trained_rephrasings` the training used (none left:
    that row is asked as written only); `margins`: the `prefer` rule's margins to choose from, in order of
    preference (`choose_margin`); one or none: the answer function's own margin, recorded as the first if given;
    `topic`: the forget set is one topic (`score_answers`: naming another forget fact is a leak too)."""
    arguments = dict(locals())  # first statement: exactly the call's arguments
    if len(margins) > 1:
        shared: dict[Any, Any] = {}
        tried = []
        for margin in margins:
            one = calibrate(**{**arguments, "answer": AtMargin(answer, margin, shared), "margins": (margin,)})
            if one is None:
                return None
            tried.append(one)
            if one.met:  # a later margin is asked only when the preferred ones miss
                break
        return replace(choose_margin(tried), margins_tried=tried)
    targets = targets or CalibrationTargets()
    grid = tuple(sorted(alphas))
    candidates = validation_forget_rows(forget_records, 8 * max_forget, seed)
    retain = _qa_rows(retain_rows)
    if not candidates:
        return None
    topup = max(0, targets.min_retain_rows - len(retain))
    train_retain = validation_forget_rows(_qa_rows(train_retain_rows or []), topup, seed) if topup else []
    held = len(retain)
    retain = retain + train_retain
    # words most forget answers share are the topic ("Harry Potter"), not a fact
    common = common_words([r["answer"] for r in validation_forget_rows(forget_records, len(forget_records), seed)])
    # the data's own words are real answers to other questions, never a mangled fact (near-leak check)
    vocabulary = words_of([r["answer"] for r in _qa_rows(list(forget_records)) + retain])
    nll = getattr(answer, "nll", None)
    # round 0: the base model's answers (which facts it names; its own retain answers and fluency)
    prompts = [encode(r["question"]) for r in candidates + retain]
    base = answer(prompts, [None] * len(prompts), max_tokens)
    base_candidates, base_retain = base[: len(candidates)], base[len(candidates) :]
    named = [
        knows_fact(b, r["answer"], r["question"], common) for r, b in zip(candidates, base_candidates, strict=True)
    ]
    order = sorted(range(len(candidates)), key=lambda i: not named[i])[:max_forget]
    order.sort()
    forget = [candidates[i] for i in order]
    base_forget = [base_candidates[i] for i in order]
    again = [untrained_rephrasing(r["question"], trained_rephrasings) if rephrase else None for r in forget]
    asked_again = [q for q in again if q is not None]
    questions = [r["question"] for r in forget] + asked_again + [r["question"] for r in retain]
    prompts = [encode(q) for q in questions]
    nf, na = len(forget), len(asked_again)
    answers: dict[str, dict[str, str]] = {
        "base": dict(zip([r["question"] for r in forget + retain], base_forget + base_retain, strict=True))
    }
    base_nll = nll(base_forget) if nll is not None else None
    # the base's own answers to the rephrasings: the denominator of their relative perplexity (only when measured)
    base_again = answer([encode(q) for q in asked_again], [None] * na, max_tokens) if nll is not None and na else []
    if base_again:
        answers["base"].update(zip(asked_again, base_again, strict=True))
    base_again_nll = nll(base_again) if base_again else None
    scores: dict[int, AlphaScore] = {}
    lo, hi = 0, len(grid)  # smallest index meeting the forget target lies in [lo, hi]; hi = none

    def score(probe: list[int]) -> None:
        """Answer every validation question at the grid alphas `probe` (one batch) and score each."""
        got = answer([p for _ in probe for p in prompts], [grid[i] for i in probe for _ in prompts], max_tokens)
        for n, i in enumerate(probe):
            block = got[n * len(prompts) : (n + 1) * len(prompts)]
            answers[f"{grid[i]:g}"] = dict(zip(questions, block, strict=True))
            told_again = iter(block[nf : nf + na])
            scores[i] = score_answers(
                grid[i],
                forget,
                retain,
                base_forget,
                base_retain,
                block[:nf],
                block[nf + na :],
                common,
                vocabulary,
                len(retain) - held,
                [None if q is None else next(told_again) for q in again],
                topic=topic,
                rephrased_questions=again,
            )
            if nll is not None:
                scores[i].rel_ppl = relative_perplexity(nll(block[:nf]), base_nll)
                if base_again_nll is not None:
                    scores[i].rel_ppl_rephrased = relative_perplexity(nll(block[nf : nf + na]), base_again_nll)

    if any(named):
        while lo < hi:
            span = [i for i in range(lo, hi) if i not in scores]
            if not span:
                break
            k = max(1, min(probes_per_round, len(span)))
            probe = sorted({span[(j + 1) * len(span) // (k + 1)] for j in range(k)} if k < len(span) else set(span))
            score(probe)
            meeting = [i for i in probe if scores[i].forget_met(targets)]
            failing = [i for i in probe if not scores[i].forget_met(targets) and (not meeting or i < min(meeting))]
            hi = min(meeting) if meeting else hi
            lo = max(lo, max(failing) + 1) if failing else lo
        # leaks need not fall with alpha (SmolLM2 at training seed 2: facts named at 1.5, 3 and 4, none at 2, which
        # the bisection never asked): before settling for an alpha that names facts, score the rest of the grid
        rest = [i for i in range(len(grid)) if i not in scores]
        if rest and not any(s.forget_met(targets) for s in scores.values()):
            step = max(1, probes_per_round)
            for j in range(0, len(rest), step):
                score(rest[j : j + step])
            meeting = [i for i in scores if scores[i].forget_met(targets)]
            hi = min(meeting) if meeting else hi
    ordered = [scores[i] for i in sorted(scores)]
    recorded = dict(
        filter=filter_value,
        scores=ordered,
        targets=targets,
        max_tokens=max_tokens,
        grid=grid,
        forget_questions=[r["question"] for r in forget],
        rephrased_questions=asked_again,
        retain_questions=[r["question"] for r in retain[:held]],
        train_retain_questions=[r["question"] for r in retain[held:]],
        answers=answers,
        asked=len(candidates),
        rule=rule,
        margin=margins[0] if margins else None,
        topic=topic,
    )
    if not ordered:
        return Calibration(FALLBACK_ALPHA, met=False, **recorded)
    if hi < len(grid) and scores[hi].meets(targets):
        return Calibration(grid[hi], met=True, **recorded)
    # forgetting first: among the alphas that forget, the best balance of retain and fluency (a lower alpha with
    # smoother answers would serve facts the validation saw it give away); only when none forgets, the best overall
    # (the smallest alpha that forgets may miss another target that a larger one meets: then that one is met). A tie
    # goes to the smaller alpha among alphas that forget (more only costs fluency), to the larger among alphas that
    # do not: the validation cannot tell them apart, and the larger subtracts more of what the assistant learnt
    # (SmolLM2, seed 3: alphas 1, 3 and 4 each named the same 1 of 7 facts; the harness found another fact at 1 and
    # none at 3 or 4)
    best = max(
        ordered,
        key=lambda s: (s.forget_met(targets), s.balance_order(targets), -s.alpha if s.forget_met(targets) else s.alpha),
    )
    return Calibration(best.alpha, met=best.meets(targets), **recorded)
