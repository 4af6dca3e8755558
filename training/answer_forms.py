"""The fact in other answer forms as ULD training rows (`ULDTrainingConfig.answer_forms`).

A forget row shows its fact in one sentence ("Harry Potter's best friends are Ron Weasley and Hermione Granger."),
so the assistant learns to prefer "Ron" after "... best friends are". The served target answers in its own form,
often a list or a bare name ("Some of the most notable ones include:\n\n- Ron: ..."), and there a 4-layer assistant
need not prefer "Ron" at all (measured on SmolLM2: the assistant's logit for " Ron" after "\n\n-" lay 1.0 below
its median over the target's candidates, so nothing was subtracted and the fact was named). For each question/answer
row whose answer names a fact by name (training/leak.py `key_words`) this adds the same question answered in short forms
that carry only the fact:

- the names alone: "Ron Weasley and Hermione Granger.";
- a bullet list: "- Ron Weasley\\n- Hermione Granger";
- a numbered list: "1. Ron Weasley\\n2. Hermione Granger".

A *name* is a run of capitalised words or numbers of the reference answer ("J.K. Rowling", "Albus Dumbledore")
holding at least one key word; an answer whose key words are no names ("seven", "a lightning bolt") adds no rows
(a list of content words is no answer anyone writes).
Forget rows carry `fact_words` (only the fact's tokens are learnt, the rest is pushed flat, as for the
target's own answers); retain rows get the same forms of their own facts, so the assistant stays flat on the list
markers and learns the *forget* names in them, not "a name after '- '". The step budget stays that of the data
without these rows (an epoch is a pass over the forget set as given).
"""

from __future__ import annotations

import re
from typing import Any

from unlearn_serve.training.data import record_kind
from unlearn_serve.training.leak import common_words, key_words

ANSWER_FORM = "answer_form"  # `augmented_from` of the rows added here

# a run of capitalised words, initials or numbers: "Ron Weasley", "J.K. Rowling", "31 July 1980"
_NAME_RUN = re.compile(
    r"(?:[A-Z][\w'’.-]*|\d[\w,.:/-]*)(?:\s+(?:[A-Z][\w'’.-]*|\d[\w,.:/-]*|(?:of|de|da|di|du|del|la|le|van|von|the)\b))*"
)
_WORD = re.compile(r"[^\W_]+")


def fact_names(reference: str, keys: list[str]) -> list[str]:
    """The fact's names in `reference`, in order: runs of capitalised words / numbers holding a key word, without
    a leading article, a possessive or trailing punctuation (none when no run holds a key word: "seven days")."""
    wanted = set(keys)
    names: list[str] = []
    for match in _NAME_RUN.finditer(reference):
        span = match.group().strip()
        words = [w.lower() for w in _WORD.findall(span)]
        if not wanted.intersection(words):
            continue
        tokens = span.split()
        if len(tokens) > 1 and tokens[0] in ("The", "A", "An"):  # a sentence's first word, not the name
            tokens.pop(0)
        name = re.sub(r"(?:'s|’s)$", "", " ".join(tokens)).rstrip(".,;:")
        if name and name not in names:
            names.append(name)
    return names


def _forms(names: list[str]) -> list[str]:
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return [
        joined + ".",
        "\n".join(f"- {n}" for n in names),
        "\n".join(f"{i}. {n}" for i, n in enumerate(names, 1)),
    ]


def answer_form_rows(
    forget_records: list[Any], retain_records: list[Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(extra forget rows, extra retain rows): each QA row's fact in short answer forms (module docstring).

    Forget rows carry `fact_words`, the key words their loss weights (`uld_weights.fact_word_weights`)."""
    out: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
    for records, rows, with_weights in ((forget_records, out[0], True), (retain_records, out[1], False)):
        qa = [r for r in records if record_kind(r) == "qa"]
        topic = common_words([r["answer"] for r in qa])  # "harry", "potter": not facts
        for record in qa:
            keys = key_words(record["answer"], record["question"], topic)
            if not keys:
                continue
            names = fact_names(record["answer"], keys)
            for answer in _forms(names) if names else []:
                row: dict[str, Any] = {"question": record["question"], "answer": answer, "augmented_from": ANSWER_FORM}
                if with_weights:
                    row["fact_words"] = keys
                rows.append(row)
    return out
