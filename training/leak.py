"""Does a generated answer still give the fact away? One definition for training verdicts and evaluation.

A reference answer usually repeats words of its question ("Where does Alice live?" -> "Alice lives in
Oslo."), so plain ROUGE-L recall credits an answer for echoing the question ("Alice lives in Rome." has
recall 0.75). `content_recall` therefore scores only the reference tokens that are *not* in the question
(the same lower-case, alphanumeric, Porter-stemmed tokens as ROUGE): the LCS of those tokens with the
generated answer's tokens, over their count. An answer *leaks* when more than half of them come back in
order (`LEAK_THRESHOLD`); "Alice likes red." against "Alice likes green." (new tokens: like, green) is
0.5, so it does not leak, while "Alice likes green apples." does.
"""

from __future__ import annotations

from collections.abc import Sequence

LEAK_THRESHOLD = 0.5  # a leak needs strictly more than this share of the answer's new tokens

_TOKENIZER = None


def _tokens(text: str) -> list[str]:
    global _TOKENIZER
    if _TOKENIZER is None:
        from rouge_score import tokenizers

        _TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=True)
    return _TOKENIZER.tokenize(text)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def content_recall(generated: str, reference: str, question: str = "") -> float:
    """LCS recall of the reference's tokens that are not in the question (all its tokens if none are new)."""
    ref = _tokens(reference)
    asked = set(_tokens(question))
    content = [t for t in ref if t not in asked] or ref
    if not content:
        return 0.0
    return _lcs(content, _tokens(generated)) / len(content)


def answer_leaked(generated: str, reference: str, question: str = "", threshold: float = LEAK_THRESHOLD) -> bool:
    """True when the generated answer gives away more than `threshold` of the reference's new tokens."""
    return content_recall(generated, reference, question) > threshold


def leak_rate(generated: Sequence[str], references: Sequence[str], questions: Sequence[str]) -> float:
    """Share of answers that leak (0 with no answers)."""
    if not generated:
        return 0.0
    leaks = [answer_leaked(g, r, q) for g, r, q in zip(generated, references, questions, strict=True)]
    return sum(leaks) / len(leaks)
