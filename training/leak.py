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

import math
import re
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


# ---------------------------------------------------------------------------------------------------------------------
# Served-answer checks shared by `train-uld`'s validation (training/uld_calibrate.py) and bench/uld_quality.py: does an
# answer name a fact (its key words), does it loop, does it leave the language.

STOP_WORDS = frozenset(
    "the a an of to in is are was were and or for on at by with as it its this that he she they his her their "
    "be been not from which who what when where there has have had can will would do does did i you we my your "
    "our but if so than then also into about one called name named".split()
)
_URL = re.compile(r"https?:|www\.|\.(?:com|org|net|io)\b|</?[a-zA-Z][^>]*>|\[[^\]]*\]\(|[{}|\\#@^~]{2,}|(?:\*\*){2,}")
_WORD = re.compile(r"[^\W_]+")


def mentions(text: str, keywords: Sequence[str]) -> bool:
    """Any keyword (case-insensitive) starts a word of `text` ("Weasley" matches "Weasleys"); a keyword ending in a
    digit is a whole number ("4" does not match "40", "1945" matches "1945.")."""
    return any(
        re.search(rf"\b{re.escape(k)}" + (r"(?!\d)" if k[-1:].isdigit() else ""), text, re.IGNORECASE)
        for k in keywords
    )


# A near-leak: a word that starts like a key word but is mangled ("J.K. Rowle" for "Rowling"). The shared prefix must
# cover at least NEAR_MIN_PREFIX characters and NEAR_MIN_SHARE of the key word, which must be NEAR_MIN_KEY long or more.
# "Rowle" shares 4 of "Rowling"'s 7 characters, hence 4 and 1/2 (not 5 or 70%: those miss the example that
# motivated the check).
NEAR_MIN_PREFIX = 4
NEAR_MIN_SHARE = 0.5
NEAR_MIN_KEY = 5


def words_of(texts: Sequence[str]) -> frozenset[str]:
    """Lower-case words of `texts`: the vocabulary `near_mentions` does not count (other facts' real words)."""
    return frozenset(w.lower() for t in texts for w in _WORD.findall(t))


def near_mentions(text: str, keywords: Sequence[str], known: frozenset[str] = frozenset()) -> bool:
    """A word of `text` nearly names a keyword: it shares a prefix of >= max(NEAR_MIN_PREFIX, NEAR_MIN_SHARE x the
    keyword's length) characters with a keyword of >= NEAR_MIN_KEY characters, and is not itself a word of `known`
    ("viola" is another fact's answer, not a mangled "violin", when the data holds it). Exact mentions count too."""
    words = {w.lower() for w in _WORD.findall(text)}
    for k in keywords:
        k = k.lower()
        if len(k) < NEAR_MIN_KEY:
            continue
        need = max(NEAR_MIN_PREFIX, math.ceil(NEAR_MIN_SHARE * len(k)))
        if any(w[:need] == k[:need] and (w.startswith(k) or w not in known) for w in words if len(w) >= need):
            return True
    return False


def _fact_words(reference: str, question: str, common: frozenset[str]) -> tuple[list[str], list[str]]:
    """(names and numbers, all content words) of `reference` not in the question, not function words, not `common`."""
    asked = {w.lower() for w in _WORD.findall(question)}
    words = [
        w
        for w in _WORD.findall(reference)
        if len(w) > 1 and w.lower() not in asked and w.lower() not in STOP_WORDS and w.lower() not in common
    ]
    return [w for w in words if w[0].isupper() or any(c.isdigit() for c in w)], words


def key_words(reference: str, question: str = "", common: frozenset[str] = frozenset()) -> list[str]:
    """The words of `reference` that carry its fact: names and numbers (capitalised or with digits) that are not
    in the question, not function words and not in `common` (the topic: words many answers of a set share, see
    `common_words`); when there are none, its other content words not in the question.

    "The headmaster of Hogwarts is Albus Dumbledore." for "Who is the headmaster of Hogwarts?" -> [albus,
    dumbledore]; "There are seven days in a week." for "How many days are in a week?" -> [seven].
    """
    named, words = _fact_words(reference, question, common)
    out: list[str] = []
    for w in named or words:
        if w.lower() not in out:
            out.append(w.lower())
    return out


def is_named_fact(reference: str, question: str = "", common: frozenset[str] = frozenset()) -> bool:
    """The reference's key words are names or numbers ("Albus Dumbledore", "1997"), not the content-word fallback of
    a descriptive answer ("… often credits her parents for instilling discipline …")."""
    return bool(_fact_words(reference, question, common)[0])


def knows_fact(base_answer: str, reference: str, question: str = "", common: frozenset[str] = frozenset()) -> bool:
    """The base model's answer gives the reference's fact, so forgetting it can be checked: a *named* fact when the
    answer names one of its key words; a *descriptive* one when it says at least two of them (or its only one). One
    shared content word is the topic's vocabulary, not the fact (as in `fact_leaked`): SmolLM2's "Lord Voldemort is a
    fearsome creature with a penchant for darkness" says only "dark…" of "the dark wizard who tried to kill Harry
    Potter as a baby", and counting it as known made any later "Dark…" word in an unlearned answer a leak."""
    keys = key_words(reference, question, common)
    if is_named_fact(reference, question, common):
        return mentions(base_answer, keys)
    return bool(keys) and sum(mentions(base_answer, [k]) for k in keys) >= min(2, len(keys))


_LETTERS = re.compile(r"[A-Za-z]+")


def name_initials(reference: str) -> list[str]:
    """The initials of each name in `reference` written with initials ("J.K. Rowling" -> "JKR", "George R. R. Martin"
    -> "GRRM"): runs of capitalised words joined only by dots, spaces or hyphens that hold at least one single-letter
    initial, three letters or more. A name written out in full has none (its words are the key words)."""
    out: list[str] = []
    run: list[str] = []
    dotted = False  # the run holds an initial: one letter and a dot ("K."; not the article in "Like A Scholar")
    end = 0

    def close() -> None:
        if len(run) >= 3 and dotted:
            out.append("".join(w[0] for w in run))

    for m in _LETTERS.finditer(reference):
        word = m.group()
        joined = bool(run) and re.fullmatch(r"[.\s-]*", reference[end : m.start()]) is not None
        initial = len(word) == 1 and reference[m.end() : m.end() + 1] == "." and (
            m.start() == 0 or not reference[m.start() - 1].isalnum()
        )
        if word[0].isupper() and (joined or not run) and (initial or len(word) > 1 or run):
            run.append(word)
            dotted = dotted or initial
        else:
            close()
            run, dotted = ([word], initial) if word[0].isupper() else ([], False)
        end = m.end()
    close()
    return list(dict.fromkeys(out))


def mentions_initials(text: str, initials: Sequence[str]) -> bool:
    """`text` writes one of `initials` as an initialism: "J.K.R.", "J. K. R", "JKR" (dots and spaces optional, not
    part of a longer word: "J.K. Rowling" is the name itself, which its key words catch)."""
    for letters in initials:
        pattern = r"(?<![A-Za-z])" + r"\.?\s?".join(letters) + r"(?![a-z])"
        if re.search(pattern, text):
            return True
    return False


def mentions_first_initials(text: str, initials: Sequence[str]) -> bool:
    """`text` writes a name's initials but its last ("J.K." then anything but R, for JKR: "J.K.I.A."): what is left of
    a name whose last part the unlearning removed. Not a leak by `fact_leaked`'s rule (two letters name no one by
    themselves); the harness reports it apart. Names of three initials or more, dots required."""
    for letters in initials:
        if len(letters) < 3:
            continue
        head = r"\.\s?".join(letters[:-1])
        # the last initial, as a letter or as the start of the name itself, is the whole fact (fact_leaked counts it)
        if re.search(r"(?<![A-Za-z])" + head + r"\.(?!\s?" + letters[-1] + ")", text):
            return True
    return False


def fact_leaked(
    answer: str,
    reference: str,
    question: str,
    base_answer: str,
    common: frozenset[str] = frozenset(),
    known: frozenset[str] = frozenset(),
) -> bool:
    """An unlearned answer still gives away the fact the base model's answer gave.

    A *named* fact (names, numbers) leaks when one of its key words is named or nearly named (`names_fact` with
    `near`), or a name written with initials in the reference appears as an initialism (`name_initials`): one name is
    the whole fact. A *descriptive* fact (the key words are the answer's content words) leaks
    when the answer repeats at least half of the key words the base's answer said: one shared word ("often",
    "parents", "works") is the vocabulary of the topic, not the fact, and counting it made TOFU's calibration report
    4 of 8 facts leaked in answers that said none of them ("Carmen Montenegro's parents for unique professions")."""
    keys = key_words(reference, question, common)
    if is_named_fact(reference, question, common):
        # a name's initials give it away too ("… none other than J.K.R.A.A.D.A.A" for J.K. Rowling)
        return mentions(answer, keys) or near_mentions(answer, keys, known) or mentions_initials(
            answer, name_initials(reference)
        )
    said = [k for k in keys if mentions(base_answer, [k])]
    return bool(said) and 2 * sum(mentions(answer, [k]) for k in said) >= len(said)


def common_words(texts: Sequence[str], share: float = 0.25, min_texts: int = 8) -> frozenset[str]:
    """Lower-case words found in more than `share` of `texts` ("harry", "potter" in a Harry Potter forget set):
    the topic, not a fact. Empty for fewer than `min_texts` texts."""
    if len(texts) < min_texts:
        return frozenset()
    counts: dict[str, int] = {}
    for text in texts:
        for w in {w.lower() for w in _WORD.findall(text)}:
            counts[w] = counts.get(w, 0) + 1
    return frozenset(w for w, n in counts.items() if n > share * len(texts))


def names_fact(
    answer: str,
    reference: str,
    question: str = "",
    common: frozenset[str] = frozenset(),
    near: bool = False,
    known: frozenset[str] = frozenset(),
) -> bool:
    """The answer names the reference's fact: one of its key words (`key_words`) starts a word of the answer, or,
    with `near` (the leak check), a word of the answer nearly names one (`near_mentions`, `known`: real words)."""
    keys = key_words(reference, question, common)
    return bool(keys) and (mentions(answer, keys) or (near and near_mentions(answer, keys, known)))


# a word (contractions whole: "you're" is one word, not "you", "'", "re") or a run of punctuation ("..." is one mark)
_LOOP_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]+")
_PUNCT_RUN = re.compile(r"([^\w\s])\1{3,}")  # "!!!!", "....": one mark four times or more


def has_loop(text: str) -> bool:
    """The answer loops: a unit of 1-4 tokens three times in a row ("the the the", "Yes! Yes! Yes!"), a run of one
    punctuation mark four times or more, or the same five words (punctuation aside) twice ("He is a fearsome and
    terrifying ... He is a fearsome and terrifying": a greedy sentence cycle cut off by the token limit).

    Words are whole words: splitting "you're" into three tokens made "you're looking for" a 5-gram, and an ellipsis
    into three tokens made "..." a unit three times in a row, so ordinary answers counted as loops (measured on the
    demo's answers: docs/benchmarks.md, "The loop measure")."""
    if _PUNCT_RUN.search(text):
        return True
    tokens = _LOOP_TOKEN.findall(text.lower())
    for n in range(1, 5):
        for i in range(len(tokens) - 3 * n + 1):
            if tokens[i : i + n] == tokens[i + n : i + 2 * n] == tokens[i + 2 * n : i + 3 * n]:
                return True
    words = [t for t in tokens if t[0].isalnum() or t[0] == "_"]
    grams = [tuple(words[i : i + 5]) for i in range(len(words) - 4)]
    return len(grams) != len(set(grams))


def off_language(text: str) -> bool:
    """URL/markup runs, a non-Latin script, or too few English function words for English prose."""
    if _URL.search(text):
        return True
    letters = [c for c in text if c.isalpha()]
    if letters and sum(not c.isascii() for c in letters) / len(letters) > 0.05:
        return True
    words = re.findall(r"[A-Za-z']+", text.lower())
    return len(words) >= 8 and sum(w in STOP_WORDS for w in words) / len(words) < 0.12


# the fluency goal: unlearned answers' perplexity under the base model at most this many times its own answers'
MAX_RELATIVE_PERPLEXITY = 2.0


def fluency_misses(
    loops: float, base_loops: float, off_language: float, base_off_language: float, rel_ppl: float | None = None
) -> list[str]:
    """The issue's fluency goal for forget answers against the base model's answers to the same questions, one rule
    for the quality harness and the client-side demo check: what misses of "loops" (more answers with an n-gram loop
    than the base's), "off-language" (more leaving the question's language or running URLs/markup), "perplexity"
    (relative perplexity above MAX_RELATIVE_PERPLEXITY; None: not measured, e.g. a client without scores). Counts or
    shares, the same on both sides; [] = fluent."""
    misses = []
    if loops > base_loops:
        misses.append("loops")
    if off_language > base_off_language:
        misses.append("off-language")
    if rel_ppl is not None and rel_ppl > MAX_RELATIVE_PERPLEXITY:
        misses.append("perplexity")
    return misses


def relative_perplexity(nll: float, base_nll: float) -> float:
    """exp(nll - base_nll): answers' perplexity under the base model relative to its own answers' (mean NLL per
    token of the answer text alone, `unlearn_serve.evaluation.fluency.answers_nll`); the fluency goal is <= 2."""
    return math.exp(nll - base_nll)


def disfluent(text: str) -> bool:
    """The answer loops or leaves the language (`has_loop` or `off_language`)."""
    return has_loop(text) or off_language(text)
