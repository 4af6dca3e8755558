"""Calibrated serving defaults for a ULD assistant: pick alpha on a validation slice, with a verdict.

After training, `train_uld` scores the assistant teacher-forced (one forward of the target and one of
the assistant per row; every alpha then costs only a re-combination) with the serving rule
(`unlearn_serve.uld_combine`):

- forget rows (the trained forget rows and their paraphrases): the fact *leaks* when the combined
  model's top token at the answer's first knowledge-carrying token (training/uld_weights.py) is
  still the fact's token; the target *knows* the row when its own top token there is;
- retain rows (a held-out slice of the retain set, not trained on): the row is *kept* when the
  combined top token equals the target's at every answer position the target gets right;
- fluency: a forget answer stays *fluent* when its lead-in (the answer tokens before the first
  knowledge token: "The headmaster of Hogwarts is") is unchanged, i.e. the subtraction only acts
  on the fact, so greedy decoding does not leave the language from the first token.

The smallest alpha on the grid that meets all three targets becomes the manifest default; when none
does, the alpha with the best balance is stored and the verdict says what is missing and what to do.
The real generated answers are measured by bench/uld_quality.py through the serving engine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from unlearn_serve.training.data import IGNORE_INDEX

from unlearn_serve.assistant import assistant_hidden_states, unwrap_causal_lm
from unlearn_serve.uld_combine import ULD_MIN_CANDIDATES

ALPHA_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
_TOP = 128  # target tokens kept per position (a superset of any candidate set on the grid)


@dataclass
class CalibrationTargets:
    max_leak: float = 0.0  # share of the target-known forget facts that may still leak
    min_kept: float = 0.95  # share of the retain rows whose answers must stay unchanged
    min_fluent: float = 0.9  # share of forget answers whose lead-in must stay unchanged


@dataclass
class AlphaScore:
    alpha: float
    known: int  # forget rows the target answers (first knowledge token top-1)
    leaked: int
    retain_rows: int
    kept: int
    forget_rows: int
    fluent: int

    def meets(self, t: CalibrationTargets) -> bool:
        return (
            self.leaked <= math.floor(t.max_leak * self.known + 1e-9)
            and self.kept >= math.ceil(t.min_kept * self.retain_rows - 1e-9)
            and self.fluent >= math.ceil(t.min_fluent * self.forget_rows - 1e-9)
        )


@dataclass
class Calibration:
    alpha: float
    filter: float
    met: bool
    scores: list[AlphaScore] = field(default_factory=list)
    targets: CalibrationTargets = field(default_factory=CalibrationTargets)

    @property
    def chosen(self) -> AlphaScore:
        return next(s for s in self.scores if s.alpha == self.alpha)

    def verdict(self) -> str:
        s = self.chosen
        fluent = s.fluent >= math.ceil(self.targets.min_fluent * s.forget_rows - 1e-9)
        kept = (
            f"keeps {s.kept}/{s.retain_rows} held-out retain answers"
            if s.retain_rows
            else "retain not checked (fewer than 4 retain records: none held out)"
        )
        line = (
            f"forgets {s.known - s.leaked}/{s.known} validation facts, {kept}, {'fluent' if fluent else 'NOT fluent'} "
            f"({s.fluent}/{s.forget_rows} lead-ins intact) at alpha {s.alpha:g}, filter {self.filter:g}"
        )
        if self.met:
            return line + ": targets met"
        hints = []
        if s.leaked > math.floor(self.targets.max_leak * s.known + 1e-9):
            hints.append("facts still leak: train longer (--epochs/--min-steps) or add paraphrased forget rows")
        if s.kept < math.ceil(self.targets.min_kept * s.retain_rows - 1e-9):
            hints.append("retain answers change: raise --retain-weight or add retain rows like the forget rows")
        if s.fluent < math.ceil(self.targets.min_fluent * s.forget_rows - 1e-9):
            hints.append("lead-ins change: the assistant is not flat on generic tokens; raise --retain-weight")
        return line + ": TARGETS NOT MET (" + "; ".join(hints) + ")"

    def to_manifest(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "filter": self.filter,
            "min_candidates": ULD_MIN_CANDIDATES,
            "met": self.met,
            "verdict": self.verdict(),
            "targets": asdict(self.targets),
            "scores": [asdict(s) for s in self.scores],
            "method": "teacher-forced on the validation rows (training/uld_calibrate.py)",
        }


@dataclass
class _Row:
    top_ids: torch.Tensor  # [L, TOP] target's top tokens per answer position
    target: torch.Tensor  # [L, TOP] their target logits
    assistant: torch.Tensor  # [L, TOP] the assistant's logits on them
    labels: torch.Tensor  # [L]
    key: int  # index of the first knowledge-carrying position (forget rows), -1 for retain rows


def _score_rows(
    peft_model: torch.nn.Module,
    num_layers: int,
    examples: list[tuple[list[int], list[int]]],
    keys: list[int],
    pad_id: int,
    batch_size: int = 8,
) -> list[_Row]:
    device = next(peft_model.parameters()).device
    lm_head = unwrap_causal_lm(peft_model).lm_head
    rows: list[_Row] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in chunk], device=device)
        labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in chunk], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
        with torch.no_grad():
            with peft_model.disable_adapter():
                target = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            hidden = assistant_hidden_states(peft_model, ids, mask, num_layers)[:, :-1]
        targets = labels[:, 1:]
        for r in range(len(chunk)):
            pos = (targets[r] != IGNORE_INDEX).nonzero()[:, 0]
            if len(pos) == 0:
                continue
            t = target[r, pos]
            top = t.topk(min(_TOP, t.shape[-1]), dim=-1)
            with torch.no_grad():
                a = lm_head(hidden[r, pos]).float().gather(-1, top.indices)
            rows.append(_Row(top.indices.cpu(), top.values.cpu(), a.cpu(), targets[r, pos].cpu(), keys[start + r]))
    return rows


def _combined_top(row: _Row, alpha: float, log_filter: float, min_keep: int) -> torch.Tensor:
    """[L] the combined model's greedy token at each answer position (teacher-forced)."""
    t = row.target
    keep = t >= t[:, :1] + log_filter  # top_ids are sorted: column 0 is the max
    keep[:, : min(min_keep, t.shape[-1])] = True
    combined = (t - alpha * row.assistant).masked_fill(~keep, float("-inf"))
    return row.top_ids.gather(-1, combined.argmax(dim=-1, keepdim=True))[:, 0]


def _score_alpha(forget: list[_Row], retain: list[_Row], alpha: float, log_filter: float, min_keep: int) -> AlphaScore:
    known = leaked = fluent = kept = 0
    for row in forget:
        greedy, combined = row.top_ids[:, 0], _combined_top(row, alpha, log_filter, min_keep)
        k = row.key
        if greedy[k] == row.labels[k]:
            known += 1
            leaked += int(combined[k] == row.labels[k])
        fluent += int(torch.equal(combined[:k], greedy[:k]))
    for row in retain:
        greedy, combined = row.top_ids[:, 0], _combined_top(row, alpha, log_filter, min_keep)
        right = greedy == row.labels
        kept += int(torch.equal(combined[right], greedy[right]))
    return AlphaScore(alpha, known, leaked, len(retain), kept, len(forget), fluent)


def first_key_position(weights: list[float], threshold: float = 0.5) -> int:
    """Index (among the label positions) of the first knowledge-carrying token: weight >= threshold, else the max."""
    for i, w in enumerate(weights):
        if w >= threshold:
            return i
    return max(range(len(weights)), key=weights.__getitem__) if weights else 0


def calibrate(
    peft_model: torch.nn.Module,
    num_layers: int,
    forget_examples: list[tuple[list[int], list[int]]],
    forget_weights: list[list[float]],
    retain_examples: list[tuple[list[int], list[int]]],
    pad_id: int,
    filter_value: float = 0.01,
    alphas: tuple[float, ...] = ALPHA_GRID,
    targets: CalibrationTargets | None = None,
    min_keep: int = ULD_MIN_CANDIDATES,
) -> Calibration:
    targets = targets or CalibrationTargets()
    was_training = peft_model.training
    peft_model.eval()
    keys = [first_key_position(w) for w in forget_weights]
    forget = _score_rows(peft_model, num_layers, forget_examples, keys, pad_id)
    retain = _score_rows(peft_model, num_layers, retain_examples, [-1] * len(retain_examples), pad_id)
    peft_model.train(was_training)
    log_filter = math.log(filter_value) if filter_value > 0 else float("-inf")
    scores = [_score_alpha(forget, retain, a, log_filter, min_keep) for a in sorted(alphas)]
    good = [s for s in scores if s.meets(targets)]
    if good:
        return Calibration(good[0].alpha, filter_value, True, scores, targets)

    def balance(s: AlphaScore) -> float:
        forgot = 1 - s.leaked / max(s.known, 1)
        return min(forgot, s.kept / max(s.retain_rows, 1), s.fluent / max(s.forget_rows, 1))

    best = max(scores, key=lambda s: (balance(s), -s.alpha))
    return Calibration(best.alpha, filter_value, False, scores, targets)
