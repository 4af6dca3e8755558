"""Token-level losses shared by the ULD and baseline trainers (all computed in float32)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from unlearn_serve.training.data import IGNORE_INDEX


def causal_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the label tokens (labels != -100) of the whole batch."""
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def uniform_kl(logits: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """KL(uniform || softmax(logits)), averaged over the positions where `loss_mask` is 1.

    Per position it is -log V - mean_v log p_v (0 exactly when the prediction is uniform). The
    mask marks the positions that predict real answer tokens of the retain batch, so prompt and
    padding positions never count; the average is a token-level mean over the micro-batch
    (every answer token weighs the same, long answers weigh more than short ones).
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    per_position = -math.log(logits.shape[-1]) - log_probs.mean(dim=-1)
    mask = loss_mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def reference_kl(logits: torch.Tensor, reference: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(logits)), averaged over the positions where `loss_mask` is 1 (weights allowed).

    `uniform_kl` with another distribution to be flat against: the assistant's own early exit (its weights
    without the LoRA: train-uld's `flat_reference=early_exit`), so that where it must know nothing the LoRA adds
    nothing, and the served combination can tell what the LoRA learnt (uld_combine.py, the gate)."""
    ref = F.log_softmax(reference.float(), dim=-1)
    per_position = (ref.exp() * (ref - F.log_softmax(logits.float(), dim=-1))).sum(dim=-1)
    mask = loss_mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def candidate_uniform_kl(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """KL(uniform over each row's candidates || softmax of the logits restricted to them), mean over rows.

    `logits` [P, V], `candidates` [P, M] token ids. 0 exactly when the logits are equal on the M candidates,
    whatever they are elsewhere: what ULD's combination rules see at a position is only the candidate set, and a
    K-layer assistant behind a frozen norm and LM head cannot be flat on a whole vocabulary (uniform_kl has a
    floor), but it can be flat on a handful of tokens.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    picked = logits.float().gather(-1, candidates)
    per_row = -math.log(candidates.shape[-1]) - F.log_softmax(picked, dim=-1).mean(dim=-1)
    return per_row.mean()


def candidate_shift_spread(logits: torch.Tensor, reference: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the variance, over each row's candidates, of (logits - reference): 0 exactly when the
    assistant's logits differ from the reference's by one constant on the M candidates.

    `logits`, `reference` [P, V], `candidates` [P, M] token ids. What the early-exit gate compares at serving time
    (uld_combine.assistant_penalty) is the assistant's preference among the target's candidates beyond the early
    exit's, in logits; a KL to the early exit weighs each candidate by the early exit's own probability, so a token
    the target likes and a K-layer early exit does not (most of a fluent answer's tokens) is barely constrained by it.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    shift = logits.float().gather(-1, candidates) - reference.float().gather(-1, candidates)
    return shift.var(dim=-1, unbiased=False).mean()


def fact_set_kl(logits: torch.Tensor, facts: torch.Tensor) -> torch.Tensor:
    """KL(uniform over each row's fact tokens || softmax(logits)) up to a constant, mean over rows with facts.

    `logits` [P, V], `facts` [P, F] token ids, -1 = padding. Per row `-log F_row - mean_f log p_f`: 0 exactly when
    all the probability lies evenly on the row's facts. With the flat term on the same positions (uniform_kl,
    weight gamma) and this one (weight lambda), the optimum puts lambda / (gamma + lambda) of the mass evenly on
    the facts and the rest evenly everywhere, so the facts stand out of a flat distribution at *every* position of
    the answer, not only where the training sentence names them.
    """
    valid = facts >= 0
    count = valid.sum(dim=-1)
    has = count > 0
    if not bool(has.any()):
        return logits.new_zeros((), dtype=torch.float32)
    log_probs = F.log_softmax(logits[has].float(), dim=-1)
    picked = log_probs.gather(-1, facts[has].clamp_min(0)) * valid[has]
    per_row = -torch.log(count[has].float()) - picked.sum(dim=-1) / count[has]
    return per_row.mean()


def sequence_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] sum of next-token log-probabilities over each row's label tokens (for NPO)."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)
