"""ULD data augmentation from the fields TOFU's `*_perturbed.json` files carry.

Forget: a QA row with `paraphrased_question` and/or `paraphrased_answer` also yields
(paraphrased_question, answer) and (question, paraphrased_answer), so the assistant learns the
fact rather than one wording of it. Retain: a QA row with a `perturbed_answer` list also yields
(question, wrong answer) pairs, which the assistant must stay uninformative on.

With `question_variants` = n > 0 (off by default), every QA row (forget and retain alike) also
yields up to n rows that ask the same question in another phrasing, made by fixed rules
(`rephrase_question`: "Who wrote X?" -> "Who is the author of X?", "What is X?" -> "Can you tell me
what X is?", and question-independent wrappers), so a data set without hand-written paraphrases still
teaches the assistant the fact under more than one wording; applying the rules to the retain rows too keeps
the assistant flat on the wordings themselves.

Deterministic: originals first, in file order, then the additions in file order. With
`max_perturbed_per_row`, the wrong answers kept per row are drawn with `random.Random(seed)`.
"""

from __future__ import annotations

import random
import re
from typing import Any

# (pattern, replacement) on the whole question, tried in order; the first that matches gives the
# first variant. Purely structural: no word of the question is replaced by a synonym.
_REPHRASE_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^Who wrote (.+)\?$"), r"Who is the author of \1?"),
    (re.compile(r"^Who (is|are) (.+)\?$"), r"Can you tell me who \2 \1?"),
    (re.compile(r"^What (is|are) (.+)\?$"), r"Can you tell me what \2 \1?"),
    (re.compile(r"^(Who|What|Which|Where|When|How) (.+)\?$"), r"I would like to know: \1 \2?"),
]
# question-independent wrappers, for the further variants (and the first when no rule matches)
_WRAPPERS = ["{q} Please answer in one sentence.", "Here is a question for you. {q}", "Quick question: {q}"]


def _qa(question: str, answer: str, source: str) -> dict[str, Any]:
    return {"question": question, "answer": answer, "augmented_from": source}


def rephrase_question(question: str, n: int) -> list[str]:
    """Up to `n` other phrasings of `question`, by fixed rules (deterministic, distinct, never the question)."""
    q = question.strip()
    out: list[str] = []
    for pattern, replacement in _REPHRASE_RULES:
        if pattern.match(q):
            out.append(pattern.sub(replacement, q))
            break
    out += [w.format(q=q) for w in _WRAPPERS]
    unique = list(dict.fromkeys(v for v in out if v != q))
    return unique[: max(0, n)]


def _rephrased(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    added: list[dict[str, Any]] = []
    for record in records:
        question, answer = record.get("question"), record.get("answer")
        if n > 0 and isinstance(question, str) and isinstance(answer, str) and question.strip():
            added.extend(_qa(v, answer, "rephrased_question") for v in rephrase_question(question, n))
    return added


def augment_forget(records: list[dict[str, Any]], question_variants: int = 0) -> list[dict[str, Any]]:
    added: list[dict[str, Any]] = []
    for record in records:
        question, answer = record.get("question"), record.get("answer")
        if not (isinstance(question, str) and isinstance(answer, str)):
            continue
        para_q, para_a = record.get("paraphrased_question"), record.get("paraphrased_answer")
        if isinstance(para_q, str) and para_q.strip():
            added.append(_qa(para_q, answer, "paraphrased_question"))
        if isinstance(para_a, str) and para_a.strip():
            added.append(_qa(question, para_a, "paraphrased_answer"))
    return list(records) + added + _rephrased(records, question_variants)


def augment_retain(
    records: list[dict[str, Any]],
    seed: int = 0,
    max_perturbed_per_row: int | None = None,
    question_variants: int = 0,
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    added: list[dict[str, Any]] = []
    for record in records:
        question, wrong = record.get("question"), record.get("perturbed_answer")
        if not isinstance(question, str) or not isinstance(wrong, list):
            continue
        answers = [a for a in wrong if isinstance(a, str) and a.strip()]
        if max_perturbed_per_row is not None and len(answers) > max_perturbed_per_row:
            answers = rng.sample(answers, max_perturbed_per_row)
        added.extend(_qa(question, a, "perturbed_answer") for a in answers)
    # rephrased questions keep the right answer: the assistant must stay flat on them as on the originals
    return list(records) + added + _rephrased(records, question_variants)
