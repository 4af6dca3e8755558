"""ULD's combination of target and assistant logits (shared by serving and train-uld's calibration).

    logits = target - alpha * assistant, on the candidate set; every other token gets -inf.

Candidate set: the relative-top tokens (log p_target >= max log p_target + ln(filter), DoLa/ULD)
plus, always, the target's `min_keep` most likely tokens. Without the second part a position where
the target is confident (a memorised fact: p ~ 0.99) keeps one candidate and no alpha can change
it. The ULD reference keeps at least floor(filter * V) tokens (`min_tokens_to_keep`), 491 for
SmolLM2's vocabulary; a small fixed count does the same job (the facts' alternatives are among the
target's top few tokens) and keeps the assistant's LM head on the candidates only (docs/uld.md).

Raw logits or log-probabilities give the same result: log_softmax shifts each row by a constant, and a
per-row constant changes neither the argmax nor the softmax over the candidates.
"""

from __future__ import annotations

import torch

# Always-kept top tokens of the target (besides the relative-top ones); chosen by bench/uld_quality.py.
ULD_MIN_CANDIDATES = 8


def plausible_mask(
    target_logits: torch.Tensor, log_filter: torch.Tensor, min_keep: int = ULD_MIN_CANDIDATES
) -> torch.Tensor:
    """[R, V] bool: relative-top tokens (log p >= max log p + ln(filter)) or among the top `min_keep`."""
    # log p - max log p == logit - max logit, so no softmax is needed
    target = target_logits.float()
    keep = target >= target.max(dim=-1, keepdim=True).values + log_filter[:, None]
    k = min(int(min_keep), target.shape[-1])
    if k > 1:
        keep |= target >= target.topk(k, dim=-1).values[:, -1:]
    return keep


def combine_logits(
    target_logits: torch.Tensor,
    assistant_logits: torch.Tensor,
    alpha: torch.Tensor,
    log_filter: torch.Tensor,
    min_keep: int = ULD_MIN_CANDIDATES,
) -> torch.Tensor:
    """ULD's combination for [R, V] rows: target - alpha * assistant on the candidate set, -inf elsewhere.

    Implausible tokens get -inf, so subtracting the assistant never promotes them.
    """
    combined = target_logits.float() - alpha[:, None] * assistant_logits.float()
    return combined.masked_fill(~plausible_mask(target_logits, log_filter, min_keep), float("-inf"))


def combine_on_candidates(
    target_logits: torch.Tensor,
    candidates: torch.Tensor,
    assistant_candidate_logits: torch.Tensor,
    alpha: torch.Tensor,
    keep: torch.Tensor,
) -> torch.Tensor:
    """`combine_logits` when the assistant was scored only on `candidates` [R, M] (a superset of `keep`).

    Everything outside the candidate set is -inf anyway, so the assistant's LM head is needed on
    those tokens only: M columns instead of V (SmolLM2: tens instead of 49,152).
    """
    target = target_logits.float()
    values = target.gather(-1, candidates) - alpha[:, None] * assistant_candidate_logits.float()
    values = values.masked_fill(~keep.gather(-1, candidates), float("-inf"))
    return torch.full_like(target, float("-inf")).scatter_(-1, candidates, values)
