"""Whole-model unlearning baselines on the same Trainer base as ULD: GA, GD, NPO and RMU.

    GA   loss = -CE(forget)                                     (gradient ascent)
    GD   loss = -CE(forget) + retain_weight * CE(retain)         (gradient difference)
    NPO  loss = -(2/beta) * mean log sigmoid(-beta * (log p_theta(y|x) - log p_ref(y|x)))  on forget
               + retain_weight * CE(retain)

NPO follows Zhang et al. (2024) and open-unlearning's `trainer/unlearn/npo.py` (sequence log-prob
of the answer under the model and a frozen copy of the starting model, beta = 0.1, plus the
retain NLL term their NPO adds; `--retain-weight 0` gives pure NPO). Every weight of the model is
trained, which is the point of comparison: ULD never touches the target.

    RMU  loss = mean over forget tokens ||h^l - c*u||^2 + retain_weight * mean over retain tokens ||h^l - h^l_ref||^2
         (Li et al., 2024: h^l the output of decoder layer l, u a fixed random unit vector, c = rmu_steering;
         the same formulation as UOE's rmu, here with every weight trainable - the whole-model counterpart)
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from unlearn_serve.training.data import DEFAULT_QUESTION_TEMPLATE
from unlearn_serve.training.loop import UnlearningTrainer, make_training_args, plan_steps
from unlearn_serve.training.losses import causal_ce, sequence_log_prob
from unlearn_serve.training.pairs import ForgetRetainCollator, ForgetRetainDataset, tokenize_records

from unlearn_serve.artifact import atomic_artifact_dir, fingerprint_model
from unlearn_serve.errors import ConfigError

METHODS = ("ga", "gd", "npo", "rmu")
RUN_FILE = "baseline.json"


@dataclass
class BaselineConfig:
    method: str = "gd"
    retain_weight: float | None = None  # None: 0 for ga, 1 for gd / npo
    beta: float = 0.1  # NPO temperature
    rmu_layer: int | None = None  # RMU: decoder layer whose output is steered (None: the middle one)
    rmu_steering: float = 6.5
    epochs: int = 5
    min_steps: int = 0
    learning_rate: float = 1e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    batch_size: int = 8
    grad_accum: int = 4
    max_length: int = 256
    seed: int = 0
    question_template: str = DEFAULT_QUESTION_TEMPLATE
    progress_bar: bool = True
    logging_steps: int | None = None

    def effective_retain_weight(self) -> float:
        if self.retain_weight is not None:
            return self.retain_weight
        return 0.0 if self.method == "ga" else 1.0


@dataclass
class BaselineResult:
    out_dir: Path
    steps: int
    wall_time_s: float
    training: dict[str, Any]


class BaselineModule(nn.Module):
    """One forward over the forget and the retain batch (DDP/FSDP wrap this module as a whole)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, forget_input_ids, forget_attention_mask, retain_input_ids, retain_attention_mask,
                hidden_layer: int | None = None):
        if hidden_layer is not None:  # RMU: decoder layer outputs (hidden_states[0] is the embedding output)
            forget = self.model(input_ids=forget_input_ids, attention_mask=forget_attention_mask,
                                output_hidden_states=True)
            retain = self.model(input_ids=retain_input_ids, attention_mask=retain_attention_mask,
                                output_hidden_states=True)
            return (forget.logits, forget.hidden_states[hidden_layer + 1]), retain.hidden_states[hidden_layer + 1]
        forget = self.model(input_ids=forget_input_ids, attention_mask=forget_attention_mask).logits
        retain = self.model(input_ids=retain_input_ids, attention_mask=retain_attention_mask).logits
        return forget, retain


def _masked_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_token = ((hidden.float() - target.float()) ** 2).mean(dim=-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def npo_loss(policy_logp: torch.Tensor, reference_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2/beta) * mean log sigmoid(-beta * (log p_theta - log p_ref)) over the batch (Zhang et al., 2024)."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (policy_logp - reference_logp)).mean()


class BaselineTrainer(UnlearningTrainer):
    def __init__(self, *args, method: str, retain_weight: float, beta: float, reference: nn.Module | None,
                 rmu_layer: int | None = None, steering: torch.Tensor | None = None, **kw):
        super().__init__(*args, **kw)
        self.method = method
        self.retain_weight = retain_weight
        self.beta = beta
        self.reference = reference
        self.rmu_layer = rmu_layer
        self.steering = steering

    def _rmu_loss(self, model, inputs):
        (forget_logits, forget_hidden), retain_hidden = model(
            forget_input_ids=inputs["forget_input_ids"],
            forget_attention_mask=inputs["forget_attention_mask"],
            retain_input_ids=inputs["retain_input_ids"],
            retain_attention_mask=inputs["retain_attention_mask"],
            hidden_layer=self.rmu_layer,
        )
        target = self.steering.to(forget_hidden.device, forget_hidden.dtype)
        forget_loss = _masked_mse(forget_hidden, target.expand_as(forget_hidden), inputs["forget_attention_mask"])
        with torch.no_grad():
            frozen = self.reference(input_ids=inputs["retain_input_ids"],
                                    attention_mask=inputs["retain_attention_mask"],
                                    output_hidden_states=True).hidden_states[self.rmu_layer + 1]
        retain_loss = _masked_mse(retain_hidden, frozen, inputs["retain_attention_mask"])
        loss = forget_loss + self.retain_weight * retain_loss
        self.record(forget_ce=causal_ce(forget_logits, inputs["forget_labels"]).detach(), rmu_forget=forget_loss,
                    rmu_retain=retain_loss)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.method == "rmu":
            loss = self._rmu_loss(model, inputs)
            return (loss, None) if return_outputs else loss
        forget_logits, retain_logits = model(
            forget_input_ids=inputs["forget_input_ids"],
            forget_attention_mask=inputs["forget_attention_mask"],
            retain_input_ids=inputs["retain_input_ids"],
            retain_attention_mask=inputs["retain_attention_mask"],
        )
        forget_ce = causal_ce(forget_logits, inputs["forget_labels"])
        if self.method == "npo":
            assert self.reference is not None
            with torch.no_grad():
                ref_logits = self.reference(
                    input_ids=inputs["forget_input_ids"], attention_mask=inputs["forget_attention_mask"]
                ).logits
            forget_loss = npo_loss(
                sequence_log_prob(forget_logits, inputs["forget_labels"]),
                sequence_log_prob(ref_logits, inputs["forget_labels"]),
                self.beta,
            )
        else:
            forget_loss = -forget_ce
        loss = forget_loss
        parts = {"forget_ce": forget_ce}
        if self.retain_weight:
            retain_ce = causal_ce(retain_logits, inputs["retain_labels"])
            loss = loss + self.retain_weight * retain_ce
            parts["retain_ce"] = retain_ce
        self.record(**parts)
        return (loss, (forget_logits, retain_logits)) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        pass  # the model dir is written by train_baseline, atomically, once training finished


def train_baseline(
    model: nn.Module,
    tokenizer,
    forget_records: list[dict[str, Any]],
    retain_records: list[dict[str, Any]],
    out_dir: str | Path,
    config: BaselineConfig | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> BaselineResult:
    """Unlearn the forget set from every weight of `model` (in place) and save a Hugging Face model dir."""
    config = config or BaselineConfig()
    if config.method not in METHODS:
        raise ConfigError(f"--method {config.method!r}: choose one of {', '.join(METHODS)}")
    if config.beta <= 0:
        raise ConfigError("--beta must be > 0")
    started = time.monotonic()
    base_fingerprint = fingerprint_model(model)
    retain_weight = config.effective_retain_weight()

    forget_set = tokenize_records(tokenizer, forget_records, config.max_length, config.question_template, "forget")
    retain_set = tokenize_records(tokenizer, retain_records, config.max_length, config.question_template, "retain")
    # GA sees only the forget set: pair it with itself so the dataset is as long as the forget set.
    retain_examples = retain_set.examples if retain_weight else forget_set.examples
    dataset = ForgetRetainDataset(forget_set.examples, retain_examples)
    plan = plan_steps(len(dataset), config.batch_size, config.grad_accum, config.epochs, config.min_steps)

    reference = None
    rmu_layer, steering = None, None
    if config.method == "rmu":
        num_layers = model.config.num_hidden_layers
        rmu_layer = config.rmu_layer if config.rmu_layer is not None else num_layers // 2
        if not 0 <= rmu_layer < num_layers:
            raise ConfigError(f"--rmu-layer {rmu_layer}: the model has {num_layers} decoder layers")
        generator = torch.Generator().manual_seed(config.seed)
        direction = torch.rand(model.config.hidden_size, generator=generator)  # as in RMU: U(0,1), normalised
        steering = config.rmu_steering * direction / direction.norm()
    if config.method in ("npo", "rmu"):
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)

    out = Path(out_dir).resolve()
    work = out.parent / f".{out.name}.trainer"
    args = make_training_args(
        str(work),
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        max_steps=plan.total_steps,
        seed=config.seed,
        warmup_ratio=config.warmup_ratio,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        progress_bar=config.progress_bar,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = BaselineTrainer(
        model=BaselineModule(model),
        args=args,
        train_dataset=dataset,
        data_collator=ForgetRetainCollator(pad),
        callbacks=callbacks,
        method=config.method,
        retain_weight=retain_weight,
        beta=config.beta,
        reference=reference,
        rmu_layer=rmu_layer,
        steering=steering,
    )
    if reference is not None:
        reference.to(args.device)
    try:
        trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model.eval()

    forget_trace = trainer.metric_trace("forget_ce")
    summary: dict[str, Any] = {
        "method": config.method,
        "retain_weight": retain_weight,
        "beta": config.beta if config.method == "npo" else None,
        "rmu_layer": rmu_layer,
        "steps": trainer.state.global_step,
        "wall_time_s": round(time.monotonic() - started, 2),
        "forget_ce_first": forget_trace[0] if forget_trace else None,
        "forget_ce_final": forget_trace[-1] if forget_trace else None,
        "forget_records": len(forget_records),
        "retain_records": len(retain_records),
        "base_fingerprint": base_fingerprint,
        "config": asdict(config),
    }
    if trainer.args.should_save:
        with atomic_artifact_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / RUN_FILE).write_text(json.dumps(summary, indent=1, default=str))
    return BaselineResult(out, summary["steps"], summary["wall_time_s"], summary)
