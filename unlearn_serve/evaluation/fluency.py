"""Perplexity of answer text under the base model: one definition for bench/uld_quality.py and `train-uld`'s
calibration (training/uld_calibrate.py, through `uld_validation.serve_with_engine`).

The answer text alone (no question) is scored by the serving Engine without unlearning, after a single
start token (BOS, else EOS); `answers_nll` is the mean negative log-likelihood per token over all answers
together. The *relative perplexity* of unlearned answers is exp(nll(unlearned) - nll(base answers to the
same questions)): 1 = as probable under the base as its own answers; the issue's fluency goal is <= 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unlearn_serve.training.leak import relative_perplexity  # noqa: F401  (one definition, re-exported)


def answers_nll(engine: Any, tokenizer: Any, texts: Sequence[str]) -> float:
    """Mean NLL per token of `texts` under `engine`'s base model (nats); 0 for no tokens."""
    if not texts:
        return 0.0
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    conts = [tokenizer.encode(t, add_special_tokens=False) or [start] for t in texts]
    scores = engine.score([[start]] * len(conts), conts)
    total = [v for row in scores for v in row]
    return -sum(total) / max(len(total), 1)
