"""UOE training: unlearn one expert of one MoE layer (SEUF), on the Hugging Face Trainer.

Only the chosen expert's slices of the fused expert tensors of layer l and that layer's router get updates:
  * every other parameter has requires_grad=False;
  * the fused expert tensors carry a gradient mask (zero for the other experts' slices);
  * AdamW weight decay defaults to 0, and after every optimizer step the other experts' slices are restored
    from a copy anyway, so nothing (decay, optimizer quirks) can move them.

Loss = unlearning loss (ga | gd | npo | rmu) + anchor_weight * anchor, where the anchor is the mean over
forget tokens of ||g^l - onehot(expert)||^2 with g^l the layer's router distribution (families.router_probs):
it keeps the forget data routed to the expert being unlearned, so the unlearning cannot be dodged by routing.
  ga   -CE(forget)
  gd   -CE(forget) + retain_weight * CE(retain)
  npo  NPO on forget (beta, frozen reference model) + retain_weight * CE(retain)
  rmu  ||h^l - c*u||^2 on forget tokens + retain_weight * ||h^l - h^l_frozen||^2 on retain tokens
       (h^l: decoder layer l's output; u: a fixed random unit vector; c: --rmu-steering)

Adaptive schedule instead of a fixed step count (the paper's lr 1e-4 and a few hundred steps are tuned for
2.7B-47B models; a small model barely moves at that rate). Every `eval_every` steps the forget and retain CE
(answer tokens) are measured on fixed subsets (the validation facts), and:
  * stopping rule, QA records: a recall check (greedy answers to the validation questions, training/leak.py)
    passes: at most max_forget_leak of the forget facts still answered and at least min_retain_recall of the
    base model's retain recall, with retain CE <= retain_loss_bound. The check runs whenever the forget CE
    has risen by recall_check_step (0.5 nats) since the last failed one, or reached forget_loss_target.
    Other records (text / messages): forget CE >= forget_loss_target while retain CE <= retain_loss_bound.
    Met -> stop;
  * too slow: when, at the pace of the last evaluation window, the target is more than `patience`
    evaluations away, the learning rate is multiplied by lr_growth (at most max_lr, and never up to a rate
    that already broke the retain bound);
  * too fast: retain CE over its bound (or retain recall below its floor) -> the expert and router go back
    to the last state within the bound, the optimizer state is reset and the rate divided by lr_growth;
  * caps: max_epochs passes over the larger set, max_minutes of wall time, max_steps if given; training
    also gives up when the rate fell below lr / 1000.
The kept checkpoint is the best evaluation by:
  0. met the goal (the stopping rule) -> that step;
  1. reached the forget CE target and within the retain bound -> lowest retain CE;
  2. else the highest forget CE among evaluations within the retain bound (step 0 included);
  3. else (every evaluation over the bound) the lowest retain CE.
The result carries a verdict (`UOEVerdict`): forgot N/M validation facts, retain CE within/over its bound,
the kept step; the CLI prints it and `--strict` turns a missed goal into exit code 3.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from unlearn_serve.training.data import (
    DEFAULT_QUESTION_TEMPLATE,
    IGNORE_INDEX,
    encode_prompt,
    has_loss_tokens,
    render_example,
)
from unlearn_serve.training.leak import answer_leaked
from unlearn_serve.training.uoe_attribution import RANKINGS, RouterCapture, attribute

from unlearn_serve.artifact import Manifest, atomic_artifact_dir, fingerprint_model
from unlearn_serve.expert_patch import ExpertPatch, apply_expert_patch, extract_expert_patch, save_expert_patch
from unlearn_serve.families import MoEFamily, get_family

METHODS = ("ga", "gd", "npo", "rmu")


@dataclass
class UOEConfig:
    layer: int | None = None  # None: attribution's top-1
    expert: int | None = None
    # attribution ranking that picks (layer, expert): contrast (forget minus retain affinity; measured better:
    # on the TOFU quick MoE only it met the goal) | forget (the paper's)
    pick: str = "contrast"
    method: str = "gd"
    anchor_weight: float = 1.0
    retain_weight: float = 1.0  # gd / npo / rmu; doubled (up to max_retain_weight) when the retain bound breaks
    max_retain_weight: float = 16.0
    lr: float = 1e-4  # the starting rate (the paper's); the adaptive schedule raises it when forgetting is slow
    batch_size: int = 16
    adaptive_lr: bool = True
    lr_growth: float = 3.0
    max_lr: float = 3e-2
    patience: int = 10  # evaluations: raise the rate when the target is further away than this at the current pace
    max_epochs: float = 500.0  # caps; the stopping rule usually ends training much earlier
    max_minutes: float | None = 30.0
    max_steps: int | None = None
    forget_loss_target: float = 3.0  # nats per answer token
    retain_loss_bound: float | None = None  # None: the initial retain CE + retain_slack
    retain_slack: float = 0.5
    max_forget_leak: float = 0.1  # recall check: share of validation forget facts still answered
    min_retain_recall: float = 0.95  # ... and retain facts answered, relative to the base model
    recall_check: bool = True  # greedy answers to the validation questions (QA records only)
    recall_check_step: float = 0.5  # run the recall check each time forget CE rose this much (nats)
    eval_every: int = 5
    eval_examples: int = 32  # per set; the stopping rule's evaluation subsets (the validation facts)
    npo_beta: float = 0.1
    rmu_steering: float = 6.5
    weight_decay: float = 0.0
    max_length: int = 256
    question_template: str = DEFAULT_QUESTION_TEMPLATE
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.pick not in RANKINGS:
            raise ValueError(f"unknown ranking {self.pick!r}; choose one of {', '.join(RANKINGS)}")
        if (self.layer is None) != (self.expert is None):
            raise ValueError("give both --layer and --expert, or neither (attribution then picks them)")
        if self.lr_growth <= 1 or self.max_lr < self.lr:
            raise ValueError("lr_growth must be > 1 and max_lr >= lr")
        if self.max_epochs <= 0 or (self.max_minutes is not None and self.max_minutes <= 0):
            raise ValueError("max_epochs and max_minutes must be > 0")


@dataclass
class UOEVerdict:
    """How training ended, in the terms of its goal."""

    goal_met: bool
    kept_step: int
    steps: int
    forget_ce: float
    retain_ce: float
    forget_loss_target: float
    retain_loss_bound: float
    forgot: int | None = None  # validation forget facts no longer answered (None: no QA records to check)
    forget_checked: int = 0
    forget_allowed: int = 0  # the goal: at most this many still answered
    retain_kept: int | None = None  # validation retain facts still answered ...
    retain_checked: int = 0
    retain_base: int | None = None  # ... and by the base model
    stopped_by: str = "goal"  # goal | epochs | minutes | steps | lr floor
    final_lr: float = 0.0

    def lines(self) -> list[str]:
        ok = "goal met" if self.goal_met else "GOAL NOT MET"
        out = [f"verdict: {ok} (kept step {self.kept_step} of {self.steps}; stopped by {self.stopped_by}; "
               f"final lr {self.final_lr:.2g})"]
        if self.forgot is not None:
            out.append(f"  forgot {self.forgot}/{self.forget_checked} validation forget facts "
                       f"(goal: at most {self.forget_allowed} still answered)")
        else:
            out.append("  recall not checked: the forget set has no question/answer records")
        if self.retain_kept is not None:
            out.append(f"  kept {self.retain_kept}/{self.retain_checked} validation retain facts "
                       f"(base model: {self.retain_base}/{self.retain_checked})")
        within = "within" if self.retain_ce <= self.retain_loss_bound else "OVER"
        if self.forgot is None:  # no recall check: the CE target is the goal
            reached = "reached" if self.forget_ce >= self.forget_loss_target else "NOT reached"
            forget = f"forget CE {self.forget_ce:.3f} ({reached}: target >= {self.forget_loss_target:g})"
        else:
            forget = f"forget CE {self.forget_ce:.3f}"
        out.append(f"  {forget}; retain CE {self.retain_ce:.3f} ({within} its bound <= {self.retain_loss_bound:.3f})")
        return out


@dataclass
class UOEResult:
    patch: ExpertPatch
    manifest: Manifest
    history: list[dict[str, float]] = field(default_factory=list)
    verdict: UOEVerdict | None = None


# ----------------------------------------------------------------------------- data


def _render(
    tokenizer, records: Sequence[dict[str, Any]], config: UOEConfig, what: str
) -> tuple[list[dict[str, list[int]]], list[dict[str, Any]]]:
    """(examples with answer tokens, the records they came from)."""
    examples, kept = [], []
    for record in records:
        input_ids, labels = render_example(tokenizer, record, config.max_length, config.question_template)
        if has_loss_tokens(labels):
            examples.append({"input_ids": input_ids, "labels": labels})
            kept.append(record)
    if not examples:
        raise ValueError(f"the {what} set has no example with answer tokens within {config.max_length} tokens")
    return examples, kept


class PairedDataset(torch.utils.data.Dataset):
    """Item i = (forget example i mod |F|, retain example i mod |R|); an epoch covers the larger set."""

    def __init__(self, forget: list[dict], retain: list[dict]) -> None:
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return max(len(self.forget), len(self.retain))

    def __getitem__(self, i: int) -> dict[str, dict]:
        return {"forget": self.forget[i % len(self.forget)], "retain": self.retain[i % len(self.retain)]}


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": attention_mask, f"{prefix}labels": labels}


class PairCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, dict]]) -> dict[str, torch.Tensor]:
        batch = collate([it["forget"] for it in items], self.pad_id, "forget_")
        batch.update(collate([it["retain"] for it in items], self.pad_id, "retain_"))
        return batch


def records_sha256(records: Sequence[dict[str, Any]]) -> str:
    return hashlib.sha256("\n".join(json.dumps(r, sort_keys=True) for r in records).encode()).hexdigest()


# ----------------------------------------------------------------------------- losses


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: summed log p of the label tokens, and the number of label tokens (causal shift applied)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    token_logp = -F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(labels)
    return (token_logp * mask).sum(dim=1), mask.sum(dim=1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over all label tokens of the batch."""
    logp, count = sequence_log_likelihood(logits, labels)
    return -logp.sum() / count.sum().clamp_min(1)


class UOEObjective:
    """Computes the UOE loss for one (layer, expert) and owns the frozen reference model when needed."""

    def __init__(self, model: nn.Module, family: MoEFamily, layer: int, expert: int, config: UOEConfig) -> None:
        self.family, self.layer, self.expert, self.config = family, layer, expert, config
        self.retain_weight = config.retain_weight  # the adaptive schedule raises it when retain suffers
        self.block = family.moe_block(model, layer)
        self.num_experts = family.num_experts(self.block)
        self.reference: nn.Module | None = None
        if config.method in ("npo", "rmu"):
            self.reference = copy.deepcopy(model).eval()
            self.reference.requires_grad_(False)
        self.steering: torch.Tensor | None = None
        if config.method == "rmu":
            generator = torch.Generator().manual_seed(config.seed)
            direction = torch.rand(model.config.hidden_size, generator=generator)  # as in RMU: U(0,1), normalised
            self.steering = config.rmu_steering * direction / direction.norm()

    def _layer_output(self, model: nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
        store: list[torch.Tensor] = []
        layer_module = self.family.decoder_layers(model)[self.layer]

        def keep(module, args, output):
            store.append(output[0] if isinstance(output, tuple) else output)

        return store, layer_module.register_forward_hook(keep)

    def _forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], prefix: str, want_hidden: bool = False):
        hidden_store, handle = self._layer_output(model) if want_hidden else ([], None)
        try:
            out = model(input_ids=inputs[prefix + "input_ids"], attention_mask=inputs[prefix + "attention_mask"])
        finally:
            if handle is not None:
                handle.remove()
        return out.logits, (hidden_store[0] if hidden_store else None)

    def anchor_loss(self, router_input: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        probs = self.family.router_probs(self.block, router_input)  # [N, E]
        onehot = F.one_hot(torch.tensor(self.expert, device=probs.device), self.num_experts).to(probs.dtype)
        per_token = ((probs - onehot) ** 2).sum(dim=-1)
        mask = attention_mask.reshape(-1).to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp_min(1)

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        logs: dict[str, float] = {}
        with RouterCapture(self.family, {self.layer: self.block}, detach=False) as capture:
            forget_logits, forget_hidden = self._forward(model, inputs, "forget_", want_hidden=cfg.method == "rmu")
            router_input = capture.inputs[self.layer]
        forget_ce = token_cross_entropy(forget_logits, inputs["forget_labels"])
        logs["forget_ce"] = float(forget_ce.detach())
        needs_retain_grad = cfg.method != "ga" and self.retain_weight > 0

        if cfg.method in ("ga", "gd"):
            loss = -forget_ce
        elif cfg.method == "npo":
            logp, _ = sequence_log_likelihood(forget_logits, inputs["forget_labels"])
            with torch.no_grad():
                ref_logits, _ = self._forward(self.reference, inputs, "forget_")
                ref_logp, _ = sequence_log_likelihood(ref_logits, inputs["forget_labels"])
            beta = cfg.npo_beta
            loss = -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()
        else:  # rmu
            mask = inputs["forget_attention_mask"].unsqueeze(-1).to(forget_hidden.dtype)
            target = self.steering.to(forget_hidden.device, forget_hidden.dtype)
            per_token = ((forget_hidden - target) ** 2).mean(dim=-1, keepdim=True)
            loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
            logs["rmu_forget"] = float(loss.detach())

        if cfg.method != "ga":
            logs["unlearn_loss"] = float(loss.detach())
        if needs_retain_grad:
            retain_logits, retain_hidden = self._forward(model, inputs, "retain_", want_hidden=cfg.method == "rmu")
            if cfg.method == "rmu":
                with torch.no_grad():
                    _, frozen_hidden = self._forward(self.reference, inputs, "retain_", want_hidden=True)
                mask = inputs["retain_attention_mask"].unsqueeze(-1).to(retain_hidden.dtype)
                per_token = ((retain_hidden - frozen_hidden) ** 2).mean(dim=-1, keepdim=True)
                retain_loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
            else:
                retain_loss = token_cross_entropy(retain_logits, inputs["retain_labels"])
            logs["retain_loss"] = float(retain_loss.detach())
            loss = loss + self.retain_weight * retain_loss

        if cfg.anchor_weight > 0:
            anchor = self.anchor_loss(router_input, inputs["forget_attention_mask"])
            logs["anchor"] = float(anchor.detach())
            loss = loss + cfg.anchor_weight * anchor
        logs["loss"] = float(loss.detach())
        return loss, logs


@torch.no_grad()
def mean_cross_entropy(model: nn.Module, examples: Sequence[dict], pad_id: int, batch_size: int = 16) -> float:
    """Mean CE per label token over `examples` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        logp, n = sequence_log_likelihood(logits, batch["labels"].to(device))
        total -= float(logp.sum())
        count += int(n.sum())
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- parameter isolation


class ExpertIsolation:
    """Freeze all but (layer, expert) + router; mask gradients of the fused tensors; restore other slices."""

    def __init__(self, model: nn.Module, family: MoEFamily, layer: int, expert: int) -> None:
        self.model = model
        block = family.moe_block(model, layer)
        self.expert_params = family.expert_parameters(block)
        self.router_params = family.router_params(block)
        model.requires_grad_(False)
        self._handles = []
        self._originals: dict[str, torch.Tensor] = {}
        num_experts = family.num_experts(block)
        self._others = torch.ones(num_experts, dtype=torch.bool)
        self._others[expert] = False
        for name, param in self.expert_params.items():
            param.requires_grad_(True)
            keep = torch.zeros(num_experts, dtype=param.dtype, device=param.device)
            keep[expert] = 1
            keep = keep.view(-1, *([1] * (param.dim() - 1)))
            self._handles.append(param.register_hook(lambda grad, keep=keep: grad * keep))
            self._originals[name] = param.detach()[self._others.to(param.device)].clone()
        for param in self.router_params.values():
            param.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.expert_params.values(), *self.router_params.values()]

    @torch.no_grad()
    def restore_other_experts(self) -> None:
        for name, param in self.expert_params.items():
            param[self._others.to(param.device)] = self._originals[name].to(param.dtype)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.model.requires_grad_(False)


# ----------------------------------------------------------------------------- Trainer glue


class UOETrainer(Trainer):
    def __init__(self, *args, objective: UOEObjective, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective
        self._last_logs: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, self._last_logs = self.objective(model, inputs)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs: add the loss components of the last step
            logs = {**logs, **{f"uoe/{k}": round(v, 4) for k, v in self._last_logs.items() if k != "loss"}}
        super().log(logs, *args, **kwargs)


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, questions: Sequence[str], config: UOEConfig,
                   max_new_tokens: Sequence[int]) -> list[str]:
    """Greedy answers (chat template or question template, as in training), one question at a time."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for question, budget in zip(questions, max_new_tokens, strict=True):
        ids = torch.tensor([encode_prompt(tokenizer, question, config.question_template)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                             do_sample=False, pad_token_id=pad)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


class RecallCheck:
    """Which validation QA facts the model still answers (training/leak.py's definition)."""

    def __init__(self, model: nn.Module, tokenizer, forget: list[dict], retain: list[dict], config: UOEConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.forget = [r for r in forget if "question" in r and "answer" in r]
        self.retain = [r for r in retain if "question" in r and "answer" in r]

    def _budget(self, records: list[dict]) -> list[int]:
        return [min(len(self.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) + 8, 128)
                for r in records]

    def answered(self, records: list[dict]) -> int:
        answers = greedy_answers(self.model, self.tokenizer, [r["question"] for r in records], self.config,
                                 self._budget(records))
        return sum(answer_leaked(a, r["answer"], r["question"]) for a, r in zip(answers, records, strict=True))

    @property
    def enabled(self) -> bool:
        return self.config.recall_check and bool(self.forget)


class AdaptiveSchedule(TrainerCallback):
    """The stopping rule, the learning-rate adaptation and the kept checkpoint (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        family: MoEFamily,
        layer: int,
        expert: int,
        isolation: ExpertIsolation,
        forget_eval: list[dict],
        retain_eval: list[dict],
        pad_id: int,
        config: UOEConfig,
        recall: RecallCheck,
        objective: UOEObjective | None = None,
    ) -> None:
        self.model, self.family, self.layer, self.expert = model, family, layer, expert
        self.isolation, self.forget_eval, self.retain_eval, self.pad_id = isolation, forget_eval, retain_eval, pad_id
        self.config, self.recall, self.objective = config, recall, objective
        self.retain_bound = config.retain_loss_bound
        self.history: list[dict[str, float]] = []
        self.best_key: tuple | None = None
        self.best_patch: ExpertPatch | None = None
        self.best_step = 0
        self.best_recall: tuple[int, int] | None = None  # (forget answered, retain answered) of the kept step
        self.goal_reached = False
        self.scale = 1.0  # the learning rate is config.lr * scale
        self.ceiling = config.max_lr / config.lr
        self.safe_patch: ExpertPatch | None = None  # the last state within the retain bound
        self.next_check_at = -math.inf  # forget CE the next recall check waits for
        self.base_recall: tuple[int, int] | None = None
        self.stopped_by = "steps"
        self.started = time.monotonic()
        self.optimizer: torch.optim.Optimizer | None = None

    # -- measurements

    def _recall(self) -> tuple[int, int]:
        return self.recall.answered(self.recall.forget), self.recall.answered(self.recall.retain)

    def _recall_ok(self, forget_answered: int, retain_answered: int) -> tuple[bool, bool]:
        assert self.base_recall is not None
        allowed = math.floor(self.config.max_forget_leak * len(self.recall.forget) + 1e-9)
        forget_ok = forget_answered <= allowed
        retain_ok = retain_answered >= self.config.min_retain_recall * self.base_recall[1] - 1e-9
        return forget_ok, retain_ok

    def evaluate(self, step: int) -> dict[str, Any]:
        cfg = self.config
        forget_ce = mean_cross_entropy(self.model, self.forget_eval, self.pad_id)
        retain_ce = mean_cross_entropy(self.model, self.retain_eval, self.pad_id)
        if self.retain_bound is None:  # default: the initial retain CE plus a slack
            self.retain_bound = retain_ce + cfg.retain_slack
        lr = cfg.lr * self.scale
        entry: dict[str, Any] = {"step": step, "forget_ce": round(forget_ce, 4), "retain_ce": round(retain_ce, 4),
                                 "lr": float(f"{lr:.3g}")}
        if self.objective is not None and cfg.method != "ga":
            entry["retain_weight"] = self.objective.retain_weight
        reached = forget_ce >= cfg.forget_loss_target
        within = retain_ce <= self.retain_bound
        recall: tuple[int, int] | None = None
        goal = reached and within
        if step == 0 and self.recall.enabled:
            recall = self.base_recall = self._recall()
            self.next_check_at = min(forget_ce + cfg.recall_check_step, cfg.forget_loss_target)
        elif self.recall.enabled:
            # With QA records the goal is the recall check; the forget CE only says when it is worth running.
            goal = False
            if within and (forget_ce >= self.next_check_at or reached):
                recall = self._recall()
                forget_ok, retain_ok = self._recall_ok(*recall)
                goal = forget_ok and retain_ok
                if not forget_ok:  # facts still come out: push further before checking again
                    self.next_check_at = forget_ce + cfg.recall_check_step
                if not retain_ok:
                    within = False  # treated like a retain bound violation below
        if recall is not None:
            entry["forget_answered"], entry["retain_answered"] = recall
        self.history.append(entry)
        if goal:
            key: tuple = (3, -retain_ce)
        elif reached and within:
            key = (2, -retain_ce)
        elif within:
            key = (1, forget_ce)
        else:  # over the retain bound: a patch that breaks the rest is the last resort
            key = (0, -retain_ce)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_step = key, step
            self.best_patch = extract_expert_patch(self.model, self.layer, self.expert, self.family)
            self.best_recall = recall
        if within:
            self.safe_patch = extract_expert_patch(self.model, self.layer, self.expert, self.family)
        self.goal_reached = goal
        if cfg.progress:
            extra = f", answered forget {recall[0]}/{len(self.recall.forget)} retain {recall[1]}/" \
                    f"{len(self.recall.retain)}" if recall is not None else ""
            print(
                f"[uoe] step {step}: forget CE {forget_ce:.3f} (target >= {cfg.forget_loss_target}), "
                f"retain CE {retain_ce:.3f} (bound <= {self.retain_bound:.3f}), lr {lr:.2g}{extra}",
                flush=True,
            )
        entry["_within"] = within
        return entry

    # -- the schedule

    def _adapt(self, entry: dict[str, Any], previous: dict[str, Any] | None) -> bool:
        """Change the learning rate after an evaluation; False when training should give up."""
        cfg = self.config
        if not cfg.adaptive_lr or self.goal_reached:
            return True
        if not entry["_within"]:
            if self.safe_patch is not None:
                apply_expert_patch(self.model, self.safe_patch)
            if self.optimizer is not None:
                self.optimizer.state.clear()  # stale Adam moments would push straight back out
            self.ceiling = min(self.ceiling, self.scale / cfg.lr_growth)
            self.scale /= cfg.lr_growth
            if self.objective is not None and 0 < self.objective.retain_weight < cfg.max_retain_weight:
                self.objective.retain_weight = min(2 * self.objective.retain_weight, cfg.max_retain_weight)
            if cfg.progress:
                weight = f", retain weight {self.objective.retain_weight:g}" if self.objective is not None and \
                    cfg.method != "ga" else ""
                print(f"[uoe]   retain over its bound: back to the last state within it, lr {self.lr():.2g}{weight}",
                      flush=True)
            return self.scale >= 1e-3
        if previous is None or entry["forget_ce"] >= cfg.forget_loss_target:
            return True
        gain = entry["forget_ce"] - previous["forget_ce"]
        remaining = cfg.forget_loss_target - entry["forget_ce"]
        if gain * cfg.patience < remaining and self.scale * cfg.lr_growth <= self.ceiling * (1 + 1e-9):
            self.scale *= cfg.lr_growth
            if cfg.progress:
                print(f"[uoe]   forgetting too slowly: lr {self.lr():.2g}", flush=True)
        return True

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer
        if not self.history:
            self.evaluate(0).pop("_within")
            if self.goal_reached:
                self.stopped_by = "goal"
                control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer or self.optimizer
        self.isolation.restore_other_experts()
        step = state.global_step
        if step % self.config.eval_every == 0 or step >= state.max_steps:
            previous = self.history[-1] if self.history else None
            entry = self.evaluate(step)
            within = entry["_within"]
            keep_going = self._adapt(entry, previous)
            for group in (self.optimizer.param_groups if self.optimizer is not None else []):
                group["lr"] = self.lr()  # now, not one scheduler step later
            entry.pop("_within")
            if not within and self.config.adaptive_lr:
                entry["rolled_back"] = True
            if self.goal_reached:
                self.stopped_by = "goal"
                control.should_training_stop = True
            elif not keep_going:
                self.stopped_by = "lr floor"
                control.should_training_stop = True
        minutes = self.config.max_minutes
        if minutes is not None and time.monotonic() - self.started > 60 * minutes and not control.should_training_stop:
            self.stopped_by = "minutes"
            control.should_training_stop = True
        return control

    def lr(self) -> float:
        return self.config.lr * self.scale

    def selection_rule(self) -> str:
        return (
            "best evaluation: met the goal -> that step; reached forget target within the retain bound -> lowest "
            "retain CE; else highest forget CE within the retain bound; else lowest retain CE"
        )


def choose_expert(model, tokenizer, forget_records, retain_records, config: UOEConfig) -> tuple[int, int]:
    if config.layer is not None:
        return config.layer, config.expert
    result = attribute(
        model, tokenizer, forget_records, retain_records, contrast=config.pick == "contrast",
        max_length=config.max_length, question_template=config.question_template, progress=config.progress,
    )
    return result.top1(config.pick)


def train_uoe(
    model: nn.Module,
    tokenizer,
    forget_records: Sequence[dict[str, Any]],
    retain_records: Sequence[dict[str, Any]],
    config: UOEConfig,
    data_hashes: dict[str, str] | None = None,
) -> UOEResult:
    """Train a UOE patch in place on `model` (which ends up holding the best patch) and return it."""
    family = get_family(model)
    base_fingerprint = fingerprint_model(model)
    layer, expert = choose_expert(model, tokenizer, forget_records, retain_records, config)
    family.moe_block(model, layer)  # validates the layer
    num_experts = family.num_experts(family.moe_block(model, layer))
    if not 0 <= expert < num_experts:
        raise ValueError(f"expert {expert} out of range: layer {layer} has {num_experts} experts")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    forget, kept_forget = _render(tokenizer, forget_records, config, "forget")
    retain, kept_retain = _render(tokenizer, retain_records, config, "retain")
    generator = torch.Generator().manual_seed(config.seed)

    def subset_indices(n: int) -> list[int]:
        if n <= config.eval_examples:
            return list(range(n))
        return sorted(int(i) for i in torch.randperm(n, generator=generator)[: config.eval_examples])

    isolation = ExpertIsolation(model, family, layer, expert)
    objective = UOEObjective(model, family, layer, expert, config)
    forget_idx, retain_idx = subset_indices(len(forget)), subset_indices(len(retain))
    recall = RecallCheck(
        model, tokenizer, [kept_forget[i] for i in forget_idx], [kept_retain[i] for i in retain_idx], config
    )
    callback = AdaptiveSchedule(
        model, family, layer, expert, isolation, [forget[i] for i in forget_idx], [retain[i] for i in retain_idx],
        pad_id, config, recall, objective,
    )
    dataset = PairedDataset(forget, retain)
    cap = math.ceil(config.max_epochs * math.ceil(len(dataset) / config.batch_size))
    cap_by = "epochs"
    if config.max_steps is not None and config.max_steps <= cap:
        cap, cap_by = config.max_steps, "steps"
    optimizer = torch.optim.AdamW(isolation.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: callback.scale)
    try:
        with tempfile.TemporaryDirectory(prefix="uoe-trainer-") as scratch:
            args = TrainingArguments(
                output_dir=scratch,
                per_device_train_batch_size=config.batch_size,
                learning_rate=config.lr,
                weight_decay=config.weight_decay,
                max_steps=cap,
                logging_steps=max(1, config.eval_every),
                save_strategy="no",
                report_to=[],
                remove_unused_columns=False,
                seed=config.seed,
                dataloader_num_workers=0,
                disable_tqdm=not config.progress,
                use_cpu=not torch.cuda.is_available(),
            )
            trainer = UOETrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                data_collator=PairCollator(pad_id),
                callbacks=[callback],
                objective=objective,
                optimizers=(optimizer, scheduler),
            )
            if not config.progress:
                trainer.remove_callback(PrinterCallback)  # quiet: no per-log prints either
            if objective.reference is not None:
                objective.reference.to(args.device)
            trainer.train()
    finally:
        isolation.close()
        objective.reference = None
    if callback.stopped_by == "steps":
        callback.stopped_by = cap_by
    model.eval()
    best = callback.best_patch
    apply_expert_patch(model, best)  # the model now equals base + the kept patch
    history = callback.history
    final = next(h for h in history if h["step"] == callback.best_step)
    goal_met = bool(callback.best_key is not None and callback.best_key[0] == 3)
    kept_recall = callback.best_recall
    if recall.enabled and kept_recall is None:
        kept_recall = callback._recall()  # the kept step was not recall-checked during training
    base_recall = callback.base_recall
    verdict = UOEVerdict(
        goal_met=goal_met,
        kept_step=callback.best_step,
        steps=history[-1]["step"],
        forget_ce=final["forget_ce"],
        retain_ce=final["retain_ce"],
        forget_loss_target=config.forget_loss_target,
        retain_loss_bound=round(callback.retain_bound, 4),
        forgot=len(recall.forget) - kept_recall[0] if kept_recall else None,
        forget_checked=len(recall.forget),
        forget_allowed=math.floor(config.max_forget_leak * len(recall.forget) + 1e-9),
        retain_kept=kept_recall[1] if kept_recall else None,
        retain_checked=len(recall.retain),
        retain_base=base_recall[1] if base_recall else None,
        stopped_by=callback.stopped_by,
        final_lr=float(f"{callback.lr():.3g}"),
    )
    manifest = Manifest(
        method="uoe",
        base_fingerprint=base_fingerprint,
        details={
            "family": model.config.model_type,
            "layer": layer,
            "expert": expert,
            "num_experts": num_experts,
            "method": config.method,
            "anchor_weight": config.anchor_weight,
            "picked_by": "--layer/--expert" if config.layer is not None else f"attribution ({config.pick})",
        },
        training={
            "losses": {
                "initial": history[0],
                "kept": final,
                "last": history[-1],
                "forget_loss_target": config.forget_loss_target,
                "retain_loss_bound": round(callback.retain_bound, 4),
                "goal_reached": goal_met,
                "selection": callback.selection_rule(),
                "history": history,
            },
            "steps": history[-1]["step"],
            "kept_step": callback.best_step,
            "verdict": asdict(verdict),
            "config": {k: v for k, v in asdict(config).items() if k != "progress"},
            "data": {
                "forget_records": len(forget_records),
                "retain_records": len(retain_records),
                "forget_sha256": records_sha256(forget_records),
                "retain_sha256": records_sha256(retain_records),
                **(data_hashes or {}),
            },
            "patch_parameters": best.num_parameters(),
        },
    )
    return UOEResult(patch=best, manifest=manifest, history=history, verdict=verdict)


def write_uoe_artifact(result: UOEResult, out_dir: str) -> None:
    with atomic_artifact_dir(out_dir) as tmp:
        save_expert_patch(result.patch, result.manifest, tmp)


__all__ = [
    "METHODS",
    "UOEConfig",
    "UOEResult",
    "UOEVerdict",
    "train_uoe",
    "write_uoe_artifact",
    "mean_cross_entropy",
]
