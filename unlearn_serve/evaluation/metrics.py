"""TOFU metrics as pure functions over numbers and strings (no model in here).

The evaluation driver (training/evaluation.py) gets token log-probabilities and greedy answers
from the serving engine and hands them to these functions. Definitions follow open-unlearning
(locuslab/open-unlearning, `src/evals/metrics/memorization.py`, `utility.py`, `privacy.py`,
`utils.py`) and the TOFU paper (Maini et al., 2024); each function cites the piece it matches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

# The leak definition (used by the attack block and by train-uoe's verdict) lives below the evaluation layer.
from unlearn_serve.training.leak import LEAK_THRESHOLD, answer_leaked, content_recall, leak_rate  # noqa: F401

_EPS = 1e-10  # open-unlearning's guard in every ratio


# ----------------------------------------------------------------------------- probability


def mean_nll(token_logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood per answer token (open-unlearning `evaluate_probability`: avg_loss)."""
    if len(token_logprobs) == 0:
        raise ValueError("no answer tokens to score")
    return -float(np.mean(np.asarray(token_logprobs, dtype=np.float64)))


def probability(token_logprobs: Sequence[float]) -> float:
    """exp(-mean token NLL) of an answer given its question (open-unlearning metric `probability`)."""
    return math.exp(-mean_nll(token_logprobs))


def normalised_option_probability(
    correct_logprobs: Sequence[float], wrong_logprobs: Sequence[Sequence[float]]
) -> float:
    """p(correct) / (p(correct) + sum p(wrong)), each p the length-normalised probability.

    open-unlearning `probability_w_options` (used for real authors / world facts in model utility).
    """
    correct = probability(correct_logprobs)
    wrong = sum(probability(w) for w in wrong_logprobs)
    return correct / (correct + wrong + _EPS)


# ----------------------------------------------------------------------------- ROUGE


_SCORER = None


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of a generated answer against the reference, with Porter stemming.

    open-unlearning `utils.eval_rouge_recall`: rouge_scorer.RougeScorer(["rouge1", "rougeL"],
    use_stemmer=True).score(gt, gen)["rougeL"].recall.
    """
    global _SCORER
    if _SCORER is None:
        import logging

        from rouge_score import rouge_scorer

        logging.getLogger("absl").setLevel(logging.WARNING)
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, prediction)["rougeL"].recall)


# ----------------------------------------------------------------------------- truth ratio


def truth_ratio(correct_logprobs: Sequence[float], wrong_logprobs: Sequence[Sequence[float]]) -> float:
    """Per-question truth ratio: p(wrong answers) / p(correct answer), length-normalised.

    open-unlearning `truth_ratio`: the wrong answers' mean token losses are averaged
    (`aggregate_to_1D`) before exp, so p(wrong) is the geometric mean of the perturbed answers'
    normalised probabilities; `correct` is the paraphrased answer (forget / retain) or the answer
    itself (real authors / world facts, which have no paraphrase).
    """
    if len(wrong_logprobs) == 0:
        raise ValueError("a truth ratio needs at least one perturbed answer")
    wrong_loss = float(np.mean([mean_nll(w) for w in wrong_logprobs]))
    correct_loss = mean_nll(correct_logprobs)
    return math.exp(-wrong_loss) / (math.exp(-correct_loss) + _EPS)


def truth_ratio_forget(ratios: Sequence[float]) -> float:
    """Forget set: mean of min(tr, 1/tr) ("closer_to_1_better"; 1 = the model cannot tell true from false)."""
    arr = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(arr, 1.0 / (arr + _EPS))))


def truth_ratio_utility(ratios: Sequence[float]) -> float:
    """Retain / real authors / world facts: mean of max(0, 1 - tr) ("true_better")."""
    arr = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - arr)))


# ----------------------------------------------------------------------------- forget quality / utility


def forget_quality(ratios: Sequence[float], reference_ratios: Sequence[float]) -> float:
    """p-value of scipy.stats.ks_2samp between per-question forget truth ratios of the evaluated
    model and of the retain-only reference model (open-unlearning `privacy.ks_test`; TOFU's FQ)."""
    from scipy.stats import ks_2samp

    if len(ratios) == 0 or len(reference_ratios) == 0:
        raise ValueError("forget quality needs truth ratios from both models")
    return float(ks_2samp(np.asarray(ratios), np.asarray(reference_ratios)).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """scipy.stats.hmean of the parts (open-unlearning `hm_aggregate`); 0 if any part is 0."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("harmonic mean of nothing")
    if np.any(arr < 0):
        raise ValueError("harmonic mean needs non-negative values")
    if np.any(arr == 0):
        return 0.0
    return float(arr.size / np.sum(1.0 / arr))


def model_utility(parts: dict[str, float]) -> float:
    """Harmonic mean of probability, ROUGE and truth ratio on retain, real authors and world facts
    (9 numbers in TOFU; probability is option-normalised for the last two)."""
    return harmonic_mean(list(parts.values()))


# ----------------------------------------------------------------------------- memorisation


def exact_memorization(argmax_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """Share of answer tokens the model predicts exactly under teacher forcing (open-unlearning
    `exact_memorization`: (argmax == labels).sum() / len(labels))."""
    if len(label_ids) == 0:
        raise ValueError("no answer tokens")
    preds = np.asarray(argmax_ids)
    labels = np.asarray(label_ids)
    return float((preds == labels).sum() / len(labels))


def extraction_strength(argmax_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """1 - k/n for the smallest k whose teacher-forced suffix preds[k:] == labels[k:] (open-unlearning
    `extraction_strength`). Matching its loop exactly: when no suffix matches, k ends at n - 1,
    so the value is 1/n rather than 0."""
    n = len(label_ids)
    if n == 0:
        return 0.0  # open-unlearning scores a question with no answer token 0
    preds = list(argmax_ids)
    labels = list(label_ids)
    k = 0
    for k in range(n):
        if preds[k:] == labels[k:]:
            break
    return 1.0 - k / n


# ----------------------------------------------------------------------------- fluency (beyond the references)


def perplexity(token_logprobs_per_answer: Sequence[Sequence[float]]) -> float:
    """Token-level perplexity over all answers: exp(total NLL / total tokens); NaN with no tokens."""
    total = sum(-float(lp) for answer in token_logprobs_per_answer for lp in answer)
    count = sum(len(answer) for answer in token_logprobs_per_answer)
    return math.exp(total / count) if count else float("nan")


_CHAR_LOOP = re.compile(r"(.{3,40}?)\1{3,}", re.DOTALL)


def has_ngram_loop(text: str, max_n: int = 8, repeats: int = 3) -> bool:
    """True when the text falls into a loop: some run of 1..max_n words repeated back to back at
    least `repeats` times ("the the the", "is a is a is a"), or a 3..40-character chunk repeated
    four times in a row (loops in text without spaces). Only back-to-back repeats: TOFU's answers run to 200 tokens,
    where a phrase may recur naturally; the 48-token served-answer checks (`train-uld`'s calibration,
    bench/uld_quality.py) use the stricter `unlearn_serve.training.leak.has_loop`, which also counts five words said
    twice."""
    words = text.split()
    for n in range(1, max_n + 1):
        needed = n * repeats
        for start in range(0, len(words) - needed + 1):
            chunk = words[start : start + n]
            if all(words[start + r * n : start + (r + 1) * n] == chunk for r in range(1, repeats)):
                return True
    return _CHAR_LOOP.search(text) is not None


def loop_share(texts: Sequence[str]) -> float:
    """Share of answers with a repeated n-gram loop (0 with no answers)."""
    return float(np.mean([has_ngram_loop(t) for t in texts])) if texts else 0.0
