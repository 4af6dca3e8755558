"""ULD's combination of target and assistant logits (shared by serving and train-uld's calibration).

Two rules, on the candidate set (every other token gets -inf):

    difference:  logits = target - alpha * assistant                          (the paper's)
    prefer:      logits = target - alpha * relu(assistant - median_C(assistant))

`difference` subtracts the assistant's whole logit vector, so it also re-ranks the alternatives to a
remembered token by how little the assistant likes them: the token the assistant dislikes most gains
most, which promotes odd tokens (made-up names such as "Zorvath" where the fact was "Voldemort").
`prefer` penalises only the candidates the assistant prefers, by how far its logit lies above its
median over the row's candidates C: a remembered token is pushed down as strongly as before, while
every other candidate keeps the target's own order and logit. Over the candidates both are
invariant to a per-row shift of the assistant's logits (raw logits or log-probabilities alike).

Candidate set: the relative-top tokens (log p_target >= max log p_target + ln(filter), DoLa/ULD)
plus, always, the target's `min_keep` most likely tokens. Without the second part a position where
the target is confident (a memorised fact: p ~ 0.99) keeps one candidate and no alpha can change
it. The ULD reference keeps at least floor(filter * V) tokens (`min_tokens_to_keep`), 491 for
SmolLM2's vocabulary; a small fixed count does the same job (the facts' alternatives are among the
target's top few tokens) and keeps the assistant's LM head on the candidates only (docs/uld.md).

A rule is passed as a bool (the same for every row) or a [R] bool tensor (True = `prefer`), so a
batch mixing rules needs no host sync and no loop over rows.
"""

from __future__ import annotations

import torch

# Always-kept top tokens of the target (besides the relative-top ones); chosen by bench/uld_quality.py.
ULD_MIN_CANDIDATES = 8
ULD_RULES = ("prefer", "difference")
DEFAULT_RULE = "prefer"  # for new artifacts; chosen by bench/uld_quality.py (docs/uld.md)
LEGACY_RULE = "difference"  # for manifests written before the rule was stored: what their alpha was calibrated for


def check_rule(rule: str) -> str:
    if rule not in ULD_RULES:
        raise ValueError(f"unknown ULD combination rule {rule!r} (one of: {', '.join(ULD_RULES)})")
    return rule


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


def assistant_penalty(
    assistant: torch.Tensor, keep: torch.Tensor, prefer: bool | torch.Tensor = DEFAULT_RULE == "prefer"
) -> torch.Tensor:
    """What alpha multiplies, per [R, N] column: the assistant's logit (`difference`), or how far it lies above
    the assistant's median over the row's candidates `keep` (`prefer`: 0 for the candidates it does not prefer).

    Values outside `keep` are irrelevant (the caller masks them to -inf)."""
    a = assistant.float()
    if prefer is False:
        return a
    centre = a.masked_fill(~keep, float("nan")).nanmedian(dim=-1, keepdim=True).values
    preferred = (a - centre).clamp_min(0).nan_to_num(0.0)  # a row without candidates: NaN centre
    if prefer is True:
        return preferred
    return torch.where(prefer[:, None], preferred, a)


def combine_logits(
    target_logits: torch.Tensor,
    assistant_logits: torch.Tensor,
    alpha: torch.Tensor,
    log_filter: torch.Tensor,
    min_keep: int = ULD_MIN_CANDIDATES,
    prefer: bool | torch.Tensor = DEFAULT_RULE == "prefer",
) -> torch.Tensor:
    """ULD's combination for [R, V] rows: target - alpha * penalty on the candidate set, -inf elsewhere.

    Implausible tokens get -inf, so subtracting the assistant never promotes them.
    """
    keep = plausible_mask(target_logits, log_filter, min_keep)
    combined = target_logits.float() - alpha[:, None] * assistant_penalty(assistant_logits, keep, prefer)
    return combined.masked_fill(~keep, float("-inf"))


def combine_on_candidates(
    target_logits: torch.Tensor,
    candidates: torch.Tensor,
    assistant_candidate_logits: torch.Tensor,
    alpha: torch.Tensor,
    keep: torch.Tensor,
    prefer: bool | torch.Tensor = DEFAULT_RULE == "prefer",
) -> torch.Tensor:
    """`combine_logits` when the assistant was scored only on `candidates` [R, M] (a superset of `keep`).

    Everything outside the candidate set is -inf anyway, so the assistant's LM head is needed on
    those tokens only: M columns instead of V (SmolLM2: tens instead of 49,152).
    """
    target = target_logits.float()
    kept = keep.gather(-1, candidates)
    penalty = assistant_penalty(assistant_candidate_logits, kept, prefer)
    values = target.gather(-1, candidates) - alpha[:, None] * penalty
    values = values.masked_fill(~kept, float("-inf"))
    return torch.full_like(target, float("-inf")).scatter_(-1, candidates, values)
