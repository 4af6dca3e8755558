"""ULD data augmentation from the fields TOFU's `*_perturbed.json` files carry.

Forget: a QA row with `paraphrased_question` and/or `paraphrased_answer` also yields
(paraphrased_question, answer) and (question, paraphrased_answer), so the assistant learns the
fact rather than one wording of it. Retain: a QA row with a `perturbed_answer` list also yields
(question, wrong answer) pairs, which the assistant must stay uninformative on.

Deterministic: originals first, in file order, then the additions in file order. With
`max_perturbed_per_row`, the wrong answers kept per row are drawn with `random.Random(seed)`.
"""

from __future__ import annotations

import random
from typing import Any


def _qa(question: str, answer: str, source: str) -> dict[str, Any]:
    return {"question": question, "answer": answer, "augmented_from": source}


def augment_forget(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    return list(records) + added


def augment_retain(
    records: list[dict[str, Any]], seed: int = 0, max_perturbed_per_row: int | None = None
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
    return list(records) + added
