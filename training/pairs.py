"""Forget/retain pairs for the unlearning trainers: tokenized sets, a paired dataset and its collator.

Each training example is one forget example plus one retain example, so every step sees one
forget and one retain batch (interleaved one-to-one). By default the dataset is as long as the
larger set and cycles the smaller one; a trainer that schedules by steps passes `length` (the
examples its whole run consumes) and the dataset cycles both sets for that long.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from unlearn_serve.training.data import IGNORE_INDEX, DataError, has_loss_tokens, label_positions, render_example

Example = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass
class TokenizedSet:
    examples: list[Example]
    skipped: int  # records with no loss token left after truncation to max_length


def tokenize_records(
    tokenizer, records: list[dict[str, Any]], max_length: int, question_template: str, source: str
) -> TokenizedSet:
    examples: list[Example] = []
    skipped = 0
    for i, record in enumerate(records):
        try:
            input_ids, labels = render_example(tokenizer, record, max_length, question_template)
        except DataError as exc:
            raise DataError(f"{source}: record {i + 1}: {exc}") from None
        if has_loss_tokens(labels):
            examples.append((input_ids, labels))
        else:
            skipped += 1
    if not examples:
        raise DataError(
            f"{source}: no record has a loss token within --max-length {max_length}; raise it or shorten prompts"
        )
    return TokenizedSet(examples, skipped)


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Item i pairs forget[i % F] with retain[order[i % R]]; length `length` (default max(F, R)).

    With `retain_seed`, `order` is a seeded permutation of the retain set, so a run that sees
    only part of a large retain set sees a spread of it, not its first rows; the i % F / i % R
    pairing gives each forget example a different retain partner on each pass.
    """

    def __init__(
        self,
        forget: list[Example],
        retain: list[Example],
        length: int | None = None,
        retain_seed: int | None = None,
        forget_weights: list[list[float]] | None = None,
        retain_candidates: list[list[list[int]]] | None = None,
        forget_fact_tokens: list[list[int]] | None = None,
    ):
        if not forget or not retain:
            raise ValueError("both the forget and the retain set need at least one example")
        if length is not None and length < 1:
            raise ValueError(f"length must be >= 1 (got {length})")
        self.forget = forget
        self.retain = retain
        self.length = length if length is not None else max(len(forget), len(retain))
        self.retain_order = list(range(len(retain)))
        # Per forget example, one weight per label position 1.. (see training/uld_weights.py),
        # spread to the example's full length (0 where no loss applies).
        self.forget_weights: list[list[float]] | None = None
        if forget_weights is not None:
            if len(forget_weights) != len(forget):
                raise ValueError("forget_weights needs one entry per forget example")
            self.forget_weights = [_spread(w, labels) for w, (_, labels) in zip(forget_weights, forget, strict=True)]
        # Per retain example, the target's top-M tokens at each label position 1.. (uld_weights.target_candidates).
        if retain_candidates is not None and len(retain_candidates) != len(retain):
            raise ValueError("retain_candidates needs one entry per retain example")
        self.retain_candidates = retain_candidates
        # Per forget example, the tokens that carry its fact (uld_weights.fact_tokens), for the fact-set loss.
        if forget_fact_tokens is not None and len(forget_fact_tokens) != len(forget):
            raise ValueError("forget_fact_tokens needs one entry per forget example")
        self.forget_fact_tokens = forget_fact_tokens
        if retain_seed is not None:
            random.Random(retain_seed).shuffle(self.retain_order)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, list]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        f_ids, f_labels = self.forget[i % len(self.forget)]
        r = self.retain_order[i % len(self.retain)]
        r_ids, r_labels = self.retain[r]
        item: dict[str, list] = {
            "forget_input_ids": f_ids,
            "forget_labels": f_labels,
            "retain_input_ids": r_ids,
            "retain_labels": r_labels,
        }
        if self.forget_weights is not None:
            item["forget_weights"] = self.forget_weights[i % len(self.forget)]
        if self.retain_candidates is not None:
            item["retain_candidates"] = self.retain_candidates[r]
        if self.forget_fact_tokens is not None:
            item["forget_fact_tokens"] = self.forget_fact_tokens[i % len(self.forget)]
        return item


def _spread(weights: list[float], labels: list[int]) -> list[float]:
    positions = label_positions(labels)
    if len(weights) != len(positions):
        raise ValueError("forget weights do not match the example's label tokens")
    full = [0.0] * len(labels)
    for p, w in zip(positions, weights, strict=True):
        full[p] = float(w)
    return full


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass
class ForgetRetainCollator:
    """Right-pads both halves of a batch into one dict of tensors.

    Keys: {forget,retain}_{input_ids,attention_mask,labels} and retain_loss_mask, a float [B, T]
    mask already aligned with the logits: position t is 1 when it predicts a loss token (t+1).
    With per-token forget weights in the features, also forget_weights [B, T] (aligned with the labels); with
    retain candidates, retain_candidates [B, T, M] (aligned with retain_loss_mask; 0 where the mask is 0); with
    fact tokens, forget_fact_tokens [B, F] (-1 = padding).
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, list]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for side in ("forget", "retain"):
            ids = [f[f"{side}_input_ids"] for f in features]
            batch[f"{side}_input_ids"] = _pad(ids, self.pad_token_id)
            batch[f"{side}_attention_mask"] = _pad([[1] * len(r) for r in ids], 0)
            batch[f"{side}_labels"] = _pad([f[f"{side}_labels"] for f in features], IGNORE_INDEX)
        targets = batch["retain_labels"]
        loss_mask = torch.zeros(targets.shape, dtype=torch.float32)
        loss_mask[:, :-1] = (targets[:, 1:] != IGNORE_INDEX).float()
        batch["retain_loss_mask"] = loss_mask
        if "forget_weights" in features[0]:
            rows = [f["forget_weights"] for f in features]
            width = batch["forget_labels"].shape[1]
            batch["forget_weights"] = torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32)
        if "retain_candidates" in features[0]:
            rows = [f["retain_candidates"] for f in features]
            count = max((len(c) for r in rows for c in r), default=1)
            candidates = torch.zeros((*loss_mask.shape, count), dtype=torch.long)
            for b, per_position in enumerate(rows):
                where = loss_mask[b].nonzero().flatten()
                if len(where) != len(per_position):
                    raise ValueError("retain candidates do not match the example's label tokens")
                if per_position:
                    candidates[b, where] = torch.tensor(per_position, dtype=torch.long)
            batch["retain_candidates"] = candidates
        if "forget_fact_tokens" in features[0]:
            rows = [f["forget_fact_tokens"] for f in features]
            width = max(1, max(len(r) for r in rows))
            batch["forget_fact_tokens"] = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)
        return batch
