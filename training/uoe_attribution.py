"""Expert attribution for UOE: which (layer, expert) do the forget data route to most?

Affinity s_i^l = mean over forget sequences of (mean over that sequence's non-pad tokens of the router's
FULL softmax probability of expert i at layer l) -- full softmax, not top-k masked, so experts just
below the top-k cut still count. For DeepSeek-V3 (sigmoid router) the sigmoid scores renormalised over
all experts are used instead (see unlearn_serve/families.py). Alongside it we report each expert's share
of the actual top-k selections on forget tokens.

Router inputs are captured with forward hooks during an ordinary forward pass, so the numbers are those
of the model as it runs (attention masks, rotary positions and all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from unlearn_serve.training.data import DEFAULT_QUESTION_TEMPLATE, render_example

from unlearn_serve.families import MoEFamily, get_family

RANKINGS = ("forget", "contrast")


@dataclass
class RouterAffinity:
    """Per MoE layer (rows, in `layers` order) and expert (columns)."""

    layers: list[int]
    scores: torch.Tensor  # [L_moe, E] mean full-softmax probability
    topk_share: torch.Tensor  # [L_moe, E] share of the top-k selections (rows sum to 1)
    num_sequences: int
    num_tokens: int


@dataclass
class ExpertRank:
    layer: int
    expert: int
    score: float  # the ranking key (forget affinity, or forget minus retain affinity)
    forget_affinity: float
    forget_topk_share: float
    retain_affinity: float | None = None
    retain_topk_share: float | None = None


@dataclass
class Attribution:
    family: str
    router_kind: str
    forget: RouterAffinity
    retain: RouterAffinity | None = None
    rankings: dict[str, list[ExpertRank]] = field(default_factory=dict)

    def top1(self, by: str = "forget") -> tuple[int, int]:
        best = self.rankings[by][0]
        return best.layer, best.expert

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        def rows(by: str) -> list[dict[str, Any]]:
            return [vars(r) for r in self.rankings[by][:top]]

        return {
            "family": self.family,
            "affinity": f"router {self.router_kind} probability, full softmax, not top-k masked",
            "pick": dict(zip(("layer", "expert"), self.top1("forget"), strict=True)),
            "forget_sequences": self.forget.num_sequences,
            "forget_tokens": self.forget.num_tokens,
            "retain_sequences": self.retain.num_sequences if self.retain else None,
            "rankings": {by: rows(by) for by in self.rankings},
        }


def encode_records(
    tokenizer, records: Sequence[dict[str, Any]], max_length: int, question_template: str
) -> list[list[int]]:
    """Token ids of each record as training renders it (prompt and answer; labels are not needed here)."""
    encoded = [render_example(tokenizer, r, max_length, question_template)[0] for r in records]
    return [ids for ids in encoded if ids]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


class RouterCapture:
    """Forward hooks that keep each MoE router's input (and its top-k choice) from the last forward."""

    def __init__(self, family: MoEFamily, blocks: dict[int, nn.Module], detach: bool = True) -> None:
        self.family = family
        self.inputs: dict[int, torch.Tensor] = {}
        self.topk: dict[int, torch.Tensor] = {}
        self._detach = detach
        self._handles = [
            family.router(block).register_forward_hook(self._hook(layer), with_kwargs=True)
            for layer, block in blocks.items()
        ]

    def _hook(self, layer: int):
        def capture(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            self.inputs[layer] = hidden.detach() if self._detach else hidden
            self.topk[layer] = output[2].detach()

        return capture

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> RouterCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def router_affinity(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    family: MoEFamily | None = None,
    desc: str = "router affinity",
    progress: bool = True,
) -> RouterAffinity:
    family = family or get_family(model)
    blocks = family.moe_layers(model)
    layers = sorted(blocks)
    num_experts = family.num_experts(blocks[layers[0]])
    device = next(model.parameters()).device
    score_sum = torch.zeros(len(layers), num_experts, dtype=torch.float64)
    select_count = torch.zeros(len(layers), num_experts, dtype=torch.float64)
    num_tokens = 0
    model.eval()
    with RouterCapture(family, blocks) as capture:
        for start in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", disable=not progress):
            input_ids, attention_mask = pad_batch(sequences[start : start + batch_size], pad_id)
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            mask = attention_mask.to(device=device, dtype=torch.float32)  # [B, T]
            per_token = mask / mask.sum(dim=1, keepdim=True)  # each sequence weighs 1 in total
            num_tokens += int(mask.sum())
            for row, layer in enumerate(layers):
                probs = family.router_probs(blocks[layer], capture.inputs[layer])  # [B*T, E]
                score_sum[row] += (probs * per_token.reshape(-1, 1)).sum(dim=0).double().cpu()
                chosen = torch.zeros_like(probs).scatter_(1, capture.topk[layer], 1.0)  # [B*T, E] 0/1
                select_count[row] += (chosen * mask.reshape(-1, 1)).sum(dim=0).double().cpu()
    return RouterAffinity(
        layers=layers,
        scores=(score_sum / len(sequences)).float(),
        topk_share=(select_count / select_count.sum(dim=1, keepdim=True).clamp_min(1)).float(),
        num_sequences=len(sequences),
        num_tokens=num_tokens,
    )


def _rank(forget: RouterAffinity, retain: RouterAffinity | None, key: torch.Tensor) -> list[ExpertRank]:
    order = torch.argsort(key.reshape(-1), descending=True, stable=True).tolist()
    num_experts = key.shape[1]
    ranks = []
    for flat in order:
        row, expert = divmod(flat, num_experts)
        ranks.append(
            ExpertRank(
                layer=forget.layers[row],
                expert=expert,
                score=float(key[row, expert]),
                forget_affinity=float(forget.scores[row, expert]),
                forget_topk_share=float(forget.topk_share[row, expert]),
                retain_affinity=float(retain.scores[row, expert]) if retain else None,
                retain_topk_share=float(retain.topk_share[row, expert]) if retain else None,
            )
        )
    return ranks


def attribute(
    model: nn.Module,
    tokenizer,
    forget_records: Sequence[dict[str, Any]],
    retain_records: Sequence[dict[str, Any]] | None = None,
    contrast: bool = False,
    max_length: int = 256,
    question_template: str = DEFAULT_QUESTION_TEMPLATE,
    batch_size: int = 8,
    progress: bool = True,
) -> Attribution:
    """Rank all (MoE layer, expert) pairs by forget affinity (and, with `contrast`, by forget minus retain)."""
    family = get_family(model)
    if contrast and not retain_records:
        raise ValueError("--contrast needs retain data (--retain)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    forget_seqs = encode_records(tokenizer, forget_records, max_length, question_template)
    if not forget_seqs:
        raise ValueError("the forget set renders to no tokens")
    forget = router_affinity(model, forget_seqs, pad_id, batch_size, family, "forget affinity", progress)
    retain = None
    if retain_records:
        retain_seqs = encode_records(tokenizer, retain_records, max_length, question_template)
        retain = router_affinity(model, retain_seqs, pad_id, batch_size, family, "retain affinity", progress)
    result = Attribution(model.config.model_type, family.router_kind, forget, retain)
    result.rankings["forget"] = _rank(forget, retain, forget.scores)
    if contrast and retain is not None:
        result.rankings["contrast"] = _rank(forget, retain, forget.scores - retain.scores)
    return result


def format_table(result: Attribution, by: str = "forget", top: int = 10) -> str:
    """A ranked text table; says what the affinity is and which pair is picked."""
    title = {"forget": "forget affinity", "contrast": "contrast = forget minus retain affinity"}[by]
    with_retain = result.retain is not None
    header = f"{'rank':>4}  {'layer':>5}  {'expert':>6}  {'score':>8}  {'forget':>8}  {'top-k share':>11}"
    if with_retain:
        header += f"  {'retain':>8}  {'retain top-k':>12}"
    lines = [
        f"Experts ranked by {title} ({result.family}; router {result.router_kind} probability, "
        f"full softmax, not top-k masked; mean over {result.forget.num_sequences} forget sequences)",
        header,
    ]
    for i, r in enumerate(result.rankings[by][:top], start=1):
        line = (
            f"{i:>4}  {r.layer:>5}  {r.expert:>6}  {r.score:>8.4f}  {r.forget_affinity:>8.4f}  "
            f"{r.forget_topk_share:>11.3f}"
        )
        if with_retain:
            line += f"  {r.retain_affinity:>8.4f}  {r.retain_topk_share:>12.3f}"
        lines.append(line)
    return "\n".join(lines)
