"""ULD training (the offline half of "unlearning from logit difference").

The assistant is the target itself stopped after its first K decoder layers (embedding, layers
< K with LoRA, final norm, LM head). It is trained to *remember* the forget set and to know
nothing else:

    loss = CE(assistant, forget batch) + beta * KL(flat || assistant) on the retain batch

"flat" (`flat_reference`) is the assistant's own early exit, its weights without the LoRA (the default: where it
must know nothing the LoRA adds nothing, and the server gates the penalty by the early exit, uld_combine.py), or the
paper's uniform distribution. The retain term is a token-level mean over the retain batch's answer
tokens (the tokens the labels mark; prompt and padding positions never count). At serving time the server subtracts
the assistant's logits from the target's, which removes exactly the forget knowledge.
Only the LoRA weights are trained and stored.

With `forget_weighting` (the default) the forget CE is weighted per token towards the tokens that
carry the knowledge (training/uld_weights.py), and the assistant is pushed flat (the same KL to the
flat reference as on the retain side) on the rest of the forget answer, so subtracting it leaves the
generic tokens ("The", "is") alone:

    loss = sum w CE / sum w + beta * KL_retain + gamma * sum (1 - w) KL_forget / sum (1 - w)

(gamma = `forget_flat_weight`, 1 by default: with beta = 6.5-10 on it too the flatness won over the
facts, SmolLM2's weighted forget CE stayed at 7.8 nats after 400 steps).

With `calibrate` (the default) and a `serve` function (the CLI passes the serving Engine's), a held-out
slice of the retain set is kept out of training, and the serving alpha is picked from the greedy answers
the served draft artifact gives to forget questions and to the held-out rows (training/uld_calibrate.py);
the manifest stores it with the per-alpha scores and a verdict. Without `serve` nothing is held out and
the alpha stays at --default-alpha or the paper's 0.75. With `flat_reference="auto"` a calibrated early-exit build
that misses its targets is compared with a uniform build trained on the same data (`train_uld`, `prefer_uniform`).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from unlearn_serve.training.answer_forms import ANSWER_FORM, answer_form_rows
from unlearn_serve.training.augment import augment_forget, augment_retain
from unlearn_serve.training.data import (
    DEFAULT_QUESTION_TEMPLATE,
    IGNORE_INDEX,
    has_chat_template,
    has_loss_tokens,
    render_example,
)
from unlearn_serve.training.loop import (
    EpochCallback,
    StepPlan,
    UnlearningTrainer,
    make_training_args,
    plan_steps,
    world_size_from_env,
)
from unlearn_serve.training.losses import (
    candidate_shift_spread,
    candidate_uniform_kl,
    fact_set_kl,
    reference_kl,
    uniform_kl,
)
from unlearn_serve.training.pairs import ForgetRetainCollator, ForgetRetainDataset, tokenize_records
from unlearn_serve.training.self_answers import SELF_ANSWER, self_answer_rows
from unlearn_serve.training.uld_calibrate import (
    AlphaScore,
    Calibration,
    CalibrationTargets,
    ServeFn,
    WithOptions,
    calibrate,
    choose_finish_words,
    choose_gate,
)
from unlearn_serve.training.uld_weights import (
    ECHO,
    fact_tokens,
    fact_word_weights,
    knowledge_weights,
    target_candidates,
)

from unlearn_serve.artifact import (
    atomic_artifact_dir,
    check_fingerprint,
    file_sha256,
    fingerprint_model,
    load_manifest,
    load_weights,
    save_manifest,
)
from unlearn_serve.assistant import (
    assistant_hidden_states,
    assistant_logits,
    assistant_lora_config,
    decoder_layers,
    default_assistant_layers,
    unwrap_causal_lm,
)
from unlearn_serve.errors import TrainingError
from unlearn_serve.uld_artifact import save_uld_artifact
from unlearn_serve.uld_combine import DEFAULT_FINISH_WORDS, DEFAULT_PREFIX_GUARD

RUN_FILE = "uld_run.json"  # in the checkpoint dir: what a --resume must match


class ULDTrainingError(TrainingError):
    """A ULD run cannot start as configured (bad layer count, a checkpoint from another run, ...)."""


@dataclass
class ULDTrainingConfig:
    layers: int | None = None  # K; None = round(N / 4), at least 1
    lora_rank: int = 32
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    retain_weight: float = 6.5  # beta
    epochs: int = 10
    min_steps: int = 250
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    batch_size: int = 8  # per device; effective batch = batch_size * grad_accum (* processes)
    grad_accum: int = 4
    max_length: int = 256
    seed: int = 0
    question_template: str = DEFAULT_QUESTION_TEMPLATE
    augment: bool = True
    max_perturbed_per_row: int | None = None  # None keeps every perturbed answer
    question_variants: int = 0  # (with augment) rule-made rephrasings per QA row, forget and retain (augment.py)
    # the target's own greedy answers as extra forget (fact words weighted) and retain rows (self_answers.py)
    self_answers: bool = False
    self_answer_tokens: int = 48
    # each QA row's fact also as a short answer and as lists, forget (fact words weighted) and retain (answer_forms.py)
    answer_forms: bool = False
    save_every_epoch: bool = False
    resume: bool = False
    progress_bar: bool = True
    logging_steps: int | None = None
    # serving defaults written to the manifest (None: the paper's alpha 0.75, filter 0.01)
    default_alpha: float | None = None
    default_filter: float | None = None
    default_rule: str | None = None  # combination rule (uld_combine.ULD_RULES); None: uld_combine.DEFAULT_RULE
    default_margin: float | None = None  # the `prefer` rule's margin; None: uld_combine.DEFAULT_MARGIN
    # the margins the calibration chooses from, in order of preference (training/uld_calibrate.py `choose_margin`),
    # when no --default-margin is given; None: uld_combine.CALIBRATION_MARGINS
    calibration_margins: tuple[float, ...] | None = None
    default_floor: float | None = None  # the penalty's floor; None: uld_combine.DEFAULT_FLOOR; inf: off
    default_prefix_guard: bool | None = None  # the prefix guard; None: uld_combine.DEFAULT_PREFIX_GUARD
    default_finish_words: bool | None = None  # finishing words; None: uld_combine.DEFAULT_FINISH_WORDS
    # an ungated (uniform-reference) build that misses a calibration target is calibrated gated by the early exit too,
    # and served gated when that meets every target (uld_calibrate.choose_gate)
    calibration_gate: bool = True
    # restarts with the next seeds (seed + 1, seed + 2, …) while the kept build misses its calibration targets; the
    # build whose validation answers are best is kept (`prefer_second`), the first that meets every target at once
    restarts: int = 0
    # seeds the held-out validation slice and the validation forget rows (None: `seed`); a restart keeps the first
    # seed's, so every seed is judged on the same held-out rows, none of which any of them trained on
    validation_seed: int | None = None
    # forget CE weighted towards knowledge-carrying tokens, flat elsewhere (training/uld_weights.py)
    forget_weighting: bool = True
    weighting_tau: float = 1.0  # (with contrasts) nats of "more likely after this question" for weight 1
    forget_flat_weight: float = 1.0  # weight of KL(flat || assistant) on the forget answers' generic tokens
    # the forget answers' echoes (words their question contains) held flat like generic tokens (True), or ignored
    # (False: "Ron" in "Ron Weasley's pet rat is …" then no longer teaches the assistant to stay flat on " Ron")
    echo_flat: bool = True
    # what "flat" (knowing nothing) means on the retain answers and the forget answers' generic tokens: "early_exit",
    # the assistant's own weights without the LoRA (the target cut after K layers), served gated by it
    # (manifest defaults.gate, uld_combine.py); "uniform", the paper's uniform distribution, served ungated (or gated,
    # when only that meets every calibration target: `calibration_gate`); "auto":
    # early_exit unless the early exit already predicts the forget answers (`choose_flat_reference`)
    flat_reference: str = "auto"
    # flat on the target's top-M tokens at retain positions (what the combination picks from): uniform on them for
    # the uniform reference, the early exit's logits plus one constant for the early-exit one (what the gate compares,
    # losses.candidate_shift_spread); 0 = off. Off by default: measured it trades forgetting for retain along the same
    # curve (docs/uld.md, "Tried"), and gated on SmolLM2 it was no better (docs/benchmarks.md section 28)
    retain_candidates: int = 0
    retain_candidate_weight: float = 6.5
    # the fact-set loss: at every forget answer position the answer's fact tokens (knowledge weight >=
    # fact_set_min_weight) stand out of the flat distribution, so the assistant prefers them wherever the target
    # might say them (a list, another sentence), not only where the training sentence does; 0 = off
    fact_set_weight: float = 0.0
    fact_set_min_weight: float = 0.5
    # pick the serving alpha from served answers on a validation slice (training/uld_calibrate.py)
    calibrate: bool = True
    validation_fraction: float = 0.1  # of the retain records, held out of training (at least 1 when calibrating)
    validation_max_retain: int = 16
    validation_max_forget: int = 8  # forget questions asked at each probed alpha (8x that asked of the base)
    validation_max_tokens: int = 24  # new tokens per validation answer (greedy)
    # each validation forget question also asked in a rule-made rephrasing the training did not use (a leak on
    # either counts): an assistant that forgets one wording only is not calibrated as forgetting
    validation_rephrase: bool = True
    # the forget set is one topic: a validation forget answer naming *another* forget fact (a key word or a name's
    # initials) leaks too ("the magical world of Harry Potter (J.K.R.)" answering the friends question). Off by default:
    # in per-person sets (TOFU) another author's place or year in an answer is not that author's fact
    validation_topic: bool = False
    validation_probes_per_round: int | None = None  # alphas per generation batch; None: 1 on CPU, the grid on GPU
    target_max_leak: float = 0.0
    target_min_kept: float = 0.95
    target_max_extra_disfluent: float = 0.125
    target_max_rel_ppl: float = 2.0  # forget answers' perplexity under the base / the base's own answers'
    validation_min_retain: int = 8  # fewer held-out retain rows than this: training retain rows top them up

    @classmethod
    def parse_overrides(cls, items: list[str]) -> dict[str, Any]:
        """`FIELD=VALUE` strings (the benches' `--set` / `--uld-set`) as field overrides. VALUE is read as JSON when it
        parses (`1`, `0.5`, `true`, `null`, `[1, 2]`), else as a string. ValueError names the item and the fix."""
        names = {f.name for f in fields(cls)}
        out: dict[str, Any] = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not value or name not in names:
                hint = f" (no field {name!r})" if sep and value else ""
                raise ValueError(f"{item!r}: expected FIELD=VALUE with a {cls.__name__} field{hint}")
            try:
                out[name] = json.loads(value)
            except json.JSONDecodeError:
                out[name] = value
        cls(**out)  # a value the config refuses (an unknown flat_reference) fails here, not mid-run
        return out

    def __post_init__(self) -> None:
        if self.restarts < 0:
            raise ValueError(f"restarts must be 0 or more (got {self.restarts})")
        if self.flat_reference not in FLAT_REFERENCES:
            choices = ", ".join(FLAT_REFERENCES)
            raise ValueError(f"flat_reference must be one of: {choices} (got {self.flat_reference!r})")

    def serving_defaults(self) -> dict[str, Any]:
        values = {
            "alpha": self.default_alpha,
            "filter": self.default_filter,
            "rule": self.default_rule,
            "margin": self.default_margin,
            "floor": self.default_floor,
            "prefix_guard": self.default_prefix_guard,
            "finish_words": self.default_finish_words,
        }
        chosen = {k: v for k, v in values.items() if v is not None}
        if chosen.get("floor") == float("inf"):
            chosen["floor"] = None  # off, written as null (JSON has no infinity)
        return chosen

    def trained_defaults(self) -> dict[str, Any]:
        """The serving defaults a new artifact is written with: the explicit ones and the gate its training needs
        (the calibration may gate a uniform build: `choose_gate`)."""
        return self.serving_defaults() | {"gate": self.served_gate()}

    def served_gate(self) -> str | None:
        """The combination's gate for what this config trains (`trained_gate`)."""
        from unlearn_serve.uld_combine import DEFAULT_RULE

        if self.flat_reference == "auto":
            raise ValueError("flat_reference 'auto' is resolved by train_uld before the artifact is written")
        return trained_gate(self.flat_reference, self.default_rule or DEFAULT_RULE)

    def split_seed(self) -> int:
        """The seed of the validation slice and rows (`validation_seed`, else `seed`)."""
        return self.seed if self.validation_seed is None else self.validation_seed

    def calibration_targets(self) -> CalibrationTargets:
        return CalibrationTargets(
            self.target_max_leak,
            self.target_min_kept,
            self.target_max_extra_disfluent,
            self.target_max_rel_ppl,
            self.validation_min_retain,
        )

    def run_signature(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it resumes."""
        ignore = {
            "save_every_epoch",
            "resume",
            "progress_bar",
            "logging_steps",
            "default_alpha",
            "default_filter",
            "target_max_leak",
            "target_min_kept",
            "target_max_extra_disfluent",
            "validation_max_forget",
            "validation_max_tokens",
            "validation_rephrase",
            "validation_topic",
            "validation_probes_per_round",
            "default_rule",
            "default_margin",
            "default_floor",
            "target_max_rel_ppl",
            "validation_min_retain",
            "restarts",
        }
        return {k: v for k, v in asdict(self).items() if k not in ignore}


def trained_gate(flat_reference: str, rule: str) -> str | None:
    """The gate an assistant trained against `flat_reference` is drafted with: the early exit it was trained flat
    against, under the `prefer` rule (the gate needs it); None otherwise (the calibration may still gate a uniform
    build: `choose_gate`)."""
    return "early_exit" if flat_reference == "early_exit" and rule == "prefer" else None


@dataclass
class ULDResult:
    out_dir: Path
    peft_model: nn.Module  # the caller's model, now carrying the trained adapter
    steps: int
    wall_time_s: float
    forget_ce: float
    retain_kl: float
    training: dict[str, Any]
    epoch_dirs: list[Path] = field(default_factory=list)
    calibration: Calibration | None = None
    forget_flat: float | None = None


# train-uld's `flat_reference` values (ULDTrainingConfig)
FLAT_REFERENCES = ("auto", "early_exit", "uniform")
# `auto` trains against uniform (served ungated) when the early exit's weighted CE on the forget answers is at most
# this many nats: the first K layers already predict the facts, so the LoRA has nothing to add that the gate could see
# (a 2-layer tiny model with K = 1: 0.17 nats; the tiny harness models, SmolLM2 at K = 4 and TOFU's: 3.9-18 nats)
EARLY_EXIT_KNOWS_CE = 1.0
EARLY_EXIT_CE_ROWS = 256  # forget rows `early_exit_forget_ce` scores (the first ones; no-gradient forwards of K layers)


def early_exit_forget_ce(
    model: nn.Module, examples: list, weights: list[list[float]] | None, num_layers: int
) -> float | None:
    """The target's early exit's (its first `num_layers` layers, norm and head: the assistant before training)
    cross-entropy on the forget answers' tokens, weighted by the knowledge weights when given (the facts), over the
    first EARLY_EXIT_CE_ROWS rows; None without answer tokens."""
    device = next(model.parameters()).device
    total = mass = 0.0
    was_training = model.training
    model.eval()  # no dropout in the measurement
    with torch.no_grad():
        for i, (ids, labels) in enumerate(examples[:EARLY_EXIT_CE_ROWS]):
            ids_t = torch.tensor([ids], device=device)
            logits = assistant_logits(model, ids_t, None, num_layers)[0, :-1].float()
            targets = torch.tensor(labels[1:], device=device)
            keep = targets != IGNORE_INDEX
            if not keep.any():
                continue
            ce = F.cross_entropy(logits[keep], targets[keep], reduction="none")
            w = torch.ones_like(ce) if weights is None else torch.tensor(weights[i], device=device, dtype=ce.dtype)
            w = w.clamp_min(0.0)  # ECHO marks (uld_weights.py) weigh nothing
            total += float((w * ce).sum())
            mass += float(w.sum())
    model.train(was_training)
    return total / mass if mass > 0 else None


def gated_retain_hint(calibration: Calibration | None, training: dict[str, Any]) -> str | None:
    """What to try when a gated assistant (trained against the early exit) changes retain answers on the validation
    slice: the uniform reference (TOFU full: the gated defaults kept 12/16 and scored 0.852x utility, ungated
    0.977x; docs/uld.md 2g). None when that is not the case."""
    if calibration is None or calibration.met or training.get("flat_reference") != "early_exit":
        return None
    if "flat_reference_compared" in training:  # auto trained the uniform reference too and kept this one
        return None
    chosen = calibration.chosen
    if chosen is None or chosen.kept_met(calibration.targets):
        return None
    return (
        "this assistant was trained against its early exit and is served gated by it; where the forget and retain "
        "answers share one form (TOFU's authors) that changed retain answers the uniform reference did not: "
        "try --flat-reference uniform (docs/uld.md 2g)"
    )


def choose_flat_reference(config: ULDTrainingConfig, early_exit_ce: float | None) -> str:
    """`config.flat_reference`, with "auto" resolved: uniform when the early exit already predicts the forget answers
    (CE <= EARLY_EXIT_KNOWS_CE nats), else early_exit."""
    if config.flat_reference != "auto":
        return config.flat_reference
    return "uniform" if early_exit_ce is not None and early_exit_ce <= EARLY_EXIT_KNOWS_CE else "early_exit"


class AssistantModule(nn.Module):
    """What the Trainer trains: one forward runs the assistant on the forget and the retain batch
    and returns (forget CE, retain KL).

    The LM head (a large share of the assistant's cost: it is as wide as the vocabulary) runs only
    at the positions that carry loss: those predicting a forget answer token and those predicting a
    retain answer token. The values equal `causal_ce` / `uniform_kl` over full logits. Going
    through this module's forward (not the submodules directly) keeps DDP / FSDP / DeepSpeed
    wrapping working unchanged.

    `flat_reference`: what the retain answers and the forget answers' generic tokens are flat against: "uniform",
    or "early_exit", the assistant's own weights without the LoRA (one more forward of the K layers, no gradient).
    """

    def __init__(self, peft_model: nn.Module, num_layers: int, flat_reference: str = "uniform"):
        super().__init__()
        self.peft_model = peft_model
        self.num_layers = num_layers
        self.flat_reference = flat_reference

    def _flat_kl(self, logits, input_ids, attention_mask, select, weights) -> torch.Tensor:
        """KL(flat || assistant) at the positions `select` picks from the hidden states, weighted."""
        if self.flat_reference == "uniform":
            return uniform_kl(logits, weights)
        return reference_kl(logits, self._early_exit(input_ids, attention_mask, select), weights)

    def _early_exit(self, input_ids, attention_mask, select) -> torch.Tensor:
        """The early exit's logits (the K layers without the LoRA, no gradient) at the positions `select` picks."""
        lm_head = unwrap_causal_lm(self.peft_model).lm_head
        with torch.no_grad(), self.peft_model.disable_adapter():
            hidden = assistant_hidden_states(self.peft_model, input_ids, attention_mask, self.num_layers)
            return lm_head(select(hidden)).float()

    def forward(
        self,
        forget_input_ids: torch.Tensor,
        forget_attention_mask: torch.Tensor,
        forget_labels: torch.Tensor,
        retain_input_ids: torch.Tensor,
        retain_attention_mask: torch.Tensor,
        retain_loss_mask: torch.Tensor,
        forget_weights: torch.Tensor | None = None,
        retain_candidates: torch.Tensor | None = None,
        forget_fact_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(forget CE, retain KL, forget KL on the generic tokens, retain KL on the target's candidates, fact-set KL
        on the forget answers; the last three 0 without weights / candidates / fact tokens)."""
        lm_head = unwrap_causal_lm(self.peft_model).lm_head
        hidden = assistant_hidden_states(self.peft_model, forget_input_ids, forget_attention_mask, self.num_layers)
        targets = forget_labels[:, 1:]
        keep = targets != IGNORE_INDEX  # position t predicts token t + 1
        forget_logits = lm_head(hidden[:, :-1][keep]).float()
        if forget_weights is None:
            forget_ce = F.cross_entropy(forget_logits, targets[keep])
            forget_flat = forget_logits.new_zeros(())
        else:
            marked = forget_weights[:, 1:][keep].to(forget_logits.dtype)
            w = marked.clamp_min(0.0)  # ECHO (< 0): neither learnt nor held flat
            ce = F.cross_entropy(forget_logits, targets[keep], reduction="none")
            forget_ce = (w * ce).sum() / w.sum().clamp_min(1e-6)
            forget_flat = self._flat_kl(
                forget_logits,
                forget_input_ids,
                forget_attention_mask,
                lambda h: h[:, :-1][keep],
                torch.where(marked < 0, 0.0, 1.0 - w),
            )
        if forget_fact_tokens is None:
            fact_set = forget_logits.new_zeros(())
        else:  # every answer position of a row sees that row's facts
            rows = keep.nonzero()[:, 0]
            fact_set = fact_set_kl(forget_logits, forget_fact_tokens[rows])
        hidden = assistant_hidden_states(self.peft_model, retain_input_ids, retain_attention_mask, self.num_layers)
        on_answer = retain_loss_mask.bool()
        retain_logits = lm_head(hidden[on_answer])
        ones = torch.ones(retain_logits.shape[:-1], device=retain_logits.device)

        def select(h: torch.Tensor) -> torch.Tensor:
            return h[on_answer]

        if retain_candidates is not None and self.flat_reference == "early_exit":
            # flat against the early exit on the target's candidates too, in logits (losses.candidate_shift_spread)
            early_exit = self._early_exit(retain_input_ids, retain_attention_mask, select)
            retain_kl = reference_kl(retain_logits, early_exit, ones)
            retain_flat = candidate_shift_spread(retain_logits, early_exit, retain_candidates[on_answer])
        else:
            retain_kl = self._flat_kl(retain_logits, retain_input_ids, retain_attention_mask, select, ones)
            if retain_candidates is None:
                retain_flat = retain_logits.new_zeros((), dtype=torch.float32)
            else:
                retain_flat = candidate_uniform_kl(retain_logits, retain_candidates[on_answer])
        return forget_ce, retain_kl, forget_flat, retain_flat, fact_set


class ULDTrainer(UnlearningTrainer):
    def __init__(
        self,
        *args,
        retain_weight: float,
        forget_flat_weight: float = 1.0,
        retain_candidate_weight: float = 0.0,
        fact_set_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.retain_weight = retain_weight
        self.forget_flat_weight = forget_flat_weight
        self.retain_candidate_weight = retain_candidate_weight
        self.fact_set_weight = fact_set_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget_ce, retain_kl, forget_flat, retain_flat, fact_set = model(
            forget_input_ids=inputs["forget_input_ids"],
            forget_attention_mask=inputs["forget_attention_mask"],
            forget_labels=inputs["forget_labels"],
            retain_input_ids=inputs["retain_input_ids"],
            retain_attention_mask=inputs["retain_attention_mask"],
            retain_loss_mask=inputs["retain_loss_mask"],
            forget_weights=inputs.get("forget_weights"),
            retain_candidates=inputs.get("retain_candidates"),
            forget_fact_tokens=inputs.get("forget_fact_tokens"),
        )
        self.record(
            forget_ce=forget_ce,
            retain_kl=retain_kl,
            forget_flat=forget_flat,
            retain_flat=retain_flat,
            fact_set=fact_set,
        )
        loss = (
            forget_ce
            + self.retain_weight * retain_kl
            + self.forget_flat_weight * forget_flat
            + self.retain_candidate_weight * retain_flat
            + self.fact_set_weight * fact_set
        )
        return (loss, (forget_ce, retain_kl)) if return_outputs else loss

    # Resume checkpoints hold only the adapter (plus the Trainer's optimizer/scheduler/RNG state).
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            peft_model = self.accelerator.unwrap_model(self.model).peft_model
            peft_model.save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        from peft import set_peft_model_state_dict

        peft_model = self.accelerator.unwrap_model(model or self.model).peft_model
        set_peft_model_state_dict(peft_model, load_weights(resume_from_checkpoint, "uld"))


def _records_digest(records: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def checkpoint_dir_for(out_dir: str | Path) -> Path:
    out = Path(out_dir).resolve()
    return out.parent / f"{out.name}.checkpoints"


def epoch_dir_for(out_dir: str | Path, epoch: int) -> Path:
    out = Path(out_dir).resolve()
    return out.parent / f"{out.name}-epoch-{epoch}"


def _resume_point(ckpt_dir: Path, signature: dict[str, Any], resume: bool) -> str | None:
    """The checkpoint to resume from (None: start fresh); refuses one left by a different run."""
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return None
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last is None:
        print(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
        return None
    run_file = ckpt_dir / RUN_FILE
    saved = json.loads(run_file.read_text()) if run_file.is_file() else None
    if saved != signature:
        raise ULDTrainingError(
            f"--resume: {ckpt_dir} was left by a run with other data or settings; "
            "rerun with the same arguments, or drop --resume to start over"
        )
    print(f"--resume: continuing from {last}")
    return last


def train_uld(
    model: nn.Module,
    tokenizer,
    forget_records: list[dict[str, Any]],
    retain_records: list[dict[str, Any]],
    out_dir: str | Path,
    config: ULDTrainingConfig | None = None,
    data_files: dict[str, str | Path] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    serve: ServeFn | None = None,
) -> ULDResult:
    """Train a ULD assistant on `model` (LoRA injected in place) and write the artifact to `out_dir`.

    `data_files` ({"forget": path, "retain": path}) only feeds the manifest (paths and sha256).
    The artifact is written only when training finished; a run that dies leaves `out_dir` as it was.
    Epoch checkpoints for --resume live in `<out_dir>.checkpoints/` and are removed on success.
    `serve` (base model, tokenizer, artifact dir) -> answer function: with `config.calibrate`, the serving
    alpha is picked from its greedy answers (training/uld_calibrate.py); None skips the calibration.

    `flat_reference="auto"` measures instead of guessing where it can: when the early-exit build (served gated)
    misses its calibration targets, the uniform reference (served ungated, or gated by its calibration's choice) is
    trained too, on the same data, and
    the artifact is the one whose validation answers are better (`prefer_uniform`); the manifest records both.
    `config.restarts` > 0: while the kept build misses its targets, the next seed's whole build is trained and the
    better of the two kept (`_restart`), every seed judged on the first seed's held-out rows.
    """
    config = config or ULDTrainingConfig()
    args = (tokenizer, forget_records, retain_records)
    out = Path(out_dir).resolve()
    result = _train_uld_auto(model, args, out, config, data_files, callbacks, serve)
    for restart in range(1, config.restarts + 1):
        if result.calibration is None or result.calibration.met:
            break
        if result.calibration.chosen is None or not result.calibration.chosen.known:
            print("restarts: not tried: the calibration could not check forgetting, which another seed does not change")
            break
        if world_size_from_env() != 1:
            print(
                "restarts: multi-process runs do not restart (only the main process calibrates): run again with --seed"
            )
            break
        result = _restart(result, restart, out, config, args, data_files, callbacks, serve)
    return result


def _train_uld_auto(
    model: nn.Module,
    args: tuple,
    out: Path,
    config: ULDTrainingConfig,
    data_files: dict[str, str | Path] | None,
    callbacks: list[TrainerCallback] | None,
    serve: ServeFn | None,
) -> ULDResult:
    """One seed's build (`args`: tokenizer, forget and retain records, as `train_uld` takes them): the chosen flat
    reference, or with `auto` the early-exit build and, when it misses its targets, the uniform one too
    (`_compare_with_uniform`)."""
    # auto may train a second build: until it is done, the first build's resume checkpoints stay (one process only)
    single_process = world_size_from_env() == 1
    keep = config.flat_reference == "auto" and single_process
    first = _train_uld_once(model, *args, out, config, data_files, callbacks, serve, keep_checkpoints=keep)
    result = first
    if needs_uniform_build(config, first):
        if not single_process:
            # only the main process calibrates: a second build on it alone would leave the other ranks waiting
            print(
                "auto: the early-exit build misses its targets; multi-process runs do not train the uniform "
                "reference to compare: run again with --flat-reference uniform (one process) and compare the verdicts"
            )
        else:
            # a crash in here leaves the first build's checkpoints: --resume then skips its training
            result = _compare_with_uniform(first, out, config, args, data_files, callbacks, serve)
    if keep:
        shutil.rmtree(checkpoint_dir_for(out), ignore_errors=True)
    return result


def _compare_with_uniform(
    first: ULDResult,
    out: Path,
    config: ULDTrainingConfig,
    args: tuple,
    data_files: dict[str, str | Path] | None,
    callbacks: list[TrainerCallback] | None,
    serve: ServeFn | None,
) -> ULDResult:
    """auto's second build and the choice between the two (`train_uld`)."""
    early = first.calibration
    assert early is not None
    print(
        f"auto: the early-exit build misses its targets ({early.verdict()}); training the uniform reference too "
        "(served ungated, or gated where only that meets every target) to keep the better of the two"
    )
    other_dir = out.parent / f".{out.name}.uniform-reference"
    base = first.peft_model.unload()  # the caller's model without this build's LoRA
    second = _train_uld_once(
        base,
        *args,
        other_dir,
        replace(config, flat_reference="uniform"),
        data_files,
        callbacks,
        serve,
    )
    keep_uniform, why = prefer_uniform(early, second.calibration)
    comparison = {
        "kept": "uniform" if keep_uniform else "early_exit",
        "why": why,
        "early_exit": _comparison_entry(first),
        "uniform": _comparison_entry(second),
    }
    print(f"auto: kept the {'uniform' if keep_uniform else 'early-exit'} build: {why}")
    return _keep_build(first, second, keep_uniform, out, other_dir, {"flat_reference_compared": comparison})


def _restart(
    result: ULDResult,
    restart: int,
    out: Path,
    config: ULDTrainingConfig,
    args: tuple,
    data_files: dict[str, str | Path] | None,
    callbacks: list[TrainerCallback] | None,
    serve: ServeFn | None,
) -> ULDResult:
    """`restarts`: one more build (with `auto`, up to both references) on the next seed, and the better of it and
    the build kept so far (`prefer_second`). A crash in here leaves the kept build at `out`."""
    previous = result.calibration
    assert previous is not None
    seed = config.seed + restart
    print(
        f"restart {restart} of {config.restarts}: the kept build misses its targets ({previous.verdict()}); "
        f"training again with seed {seed}"
    )
    other_dir = out.parent / f".{out.name}.restart-{restart}"
    base = result.peft_model.unload()  # the caller's model without the kept build's LoRA
    second = _train_uld_auto(
        base,
        args,
        other_dir,
        replace(config, seed=seed, restarts=0, validation_seed=config.split_seed()),
        data_files,
        callbacks,
        serve,
    )
    keep_new, why = prefer_second(previous, second.calibration, f"the seed-{seed} build", "the build kept so far")
    tried = result.training.get("restarts_tried") or [{"seed": config.seed, **_comparison_entry(result)}]
    tried = [*tried, {"seed": seed, **_comparison_entry(second)}]
    kept_seed = seed if keep_new else result.training.get("restart_kept_seed", config.seed)
    record = {"restarts_tried": tried, "restart_kept_seed": kept_seed}
    print(f"restart {restart}: kept {'the seed-' + str(seed) if keep_new else 'the earlier'} build: {why}")
    return _keep_build(result, second, keep_new, out, other_dir, record)


def restarts_summary(training: dict[str, Any]) -> str | None:
    """One line on the seeds a `restarts` run trained (the manifest's training section), for the CLI and the demo;
    None when no restart ran."""
    tried = training.get("restarts_tried")
    if not tried:
        return None
    seeds = ", ".join(f"{r['seed']} ({'met' if r['met'] else 'missed'}, {r['wall_time_s']:.0f}s)" for r in tried)
    return f"restarts: trained seeds {seeds}; kept seed {training['restart_kept_seed']}"


def _keep_build(
    first: ULDResult, second: ULDResult, keep_second: bool, out: Path, other_dir: Path, record: dict[str, Any]
) -> ULDResult:
    """Of two builds (the first written at `out`, the second at `other_dir`), write the kept one to `out` with `record`
    in its manifest's training section (and in the returned result's); the other build's directory and epoch
    snapshots go. The caller's model (now under the second build's LoRA) is returned carrying the kept adapter."""
    kept = second if keep_second else first
    _finish_artifact(other_dir if keep_second else out, out, record)
    kept.training.update(record)
    shutil.rmtree(other_dir, ignore_errors=True)
    # --save-every-epoch: the epoch snapshots are the kept build's, under the output's name
    for path in first.epoch_dirs if keep_second else second.epoch_dirs:
        shutil.rmtree(path, ignore_errors=True)
    if keep_second:
        second.epoch_dirs = [
            path.rename(epoch_dir_for(out, int(path.name.rsplit("-", 1)[1]))) for path in second.epoch_dirs
        ]
    kept.out_dir = out
    if keep_second:
        return kept
    # the first build is kept: its LoRA back on the caller's model (the second one's removed)
    from peft import PeftModel

    kept.peft_model = PeftModel.from_pretrained(second.peft_model.unload(), str(out))
    return kept


def needs_uniform_build(config: ULDTrainingConfig, result: ULDResult) -> bool:
    """Whether `auto` trains the uniform reference after `result`: it chose the early exit and that build's
    calibration (the main process's only) missed its targets."""
    if config.flat_reference != "auto" or result.training.get("flat_reference") != "early_exit":
        return False
    return result.calibration is not None and not result.calibration.met


def prefer_uniform(early: Calibration, uniform: Calibration | None) -> tuple[bool, str]:
    """Whether `auto` keeps the uniform build over the early-exit one whose calibration missed its targets, and why
    (`prefer_second`). Fluency does not decide: TOFU full's early-exit build was the more fluent (2.15x against
    6.46x) and kept 12/16 retain answers (the uniform one 15/16): 0.852x the target's utility against 0.977x
    (docs/uld.md 2g). On a tie the early-exit build (the more fluent) stays."""
    return prefer_second(early, uniform, "the uniform build", "the early-exit build")


def prefer_second(
    first: Calibration, second: Calibration | None, second_name: str, first_name: str
) -> tuple[bool, str]:
    """Whether a second build is kept over a first whose calibration missed its targets, and why. The second wins
    when it meets every target, or when its chosen alpha does better in this order: forgets the facts (the targets'
    leak), then names fewer of them (a build that forgets nothing must not win on retain answers it keeps by not
    unlearning: TOFU quick with `retain_candidates`, docs/benchmarks.md section 28), then keeps more retain answers.
    On a tie the first stays."""
    if second is None or second.chosen is None:
        return False, f"{second_name} was not calibrated"
    if second.met:
        return True, f"it meets every target ({second.verdict()})"
    a, b = first.chosen, second.chosen
    if a is None:
        return True, f"{first_name} had no calibrated alpha"

    def key(score: AlphaScore, targets: CalibrationTargets) -> tuple[bool, float, float]:
        rows = score.retain_rows + score.train_retain_rows
        forgets = score.forget_met(targets)  # within the target's leak, how many are named does not rank them
        named = 0.0 if forgets or not score.known else score.leaked / score.known
        return forgets, -named, (score.kept + score.train_kept) / rows if rows else 1.0

    ka, kb = key(a, first.targets), key(b, second.targets)
    if kb[0] and not ka[0]:
        return True, (
            f"neither meets every target; it forgets the validation facts ({b.leaked}/{b.known} still named) where "
            f"{first_name} does not ({a.leaked}/{a.known})"
        )
    if kb[:2] > ka[:2]:
        return True, (
            f"neither meets every target; it names fewer validation facts ({b.leaked}/{b.known} still named against "
            f"{first_name}'s {a.leaked}/{a.known})"
        )
    if kb > ka:
        return True, f"neither meets every target; it {b.kept_text()} where {first_name} {a.kept_text()}"
    return False, f"neither meets every target; {second_name} is no better ({second.verdict()})"


def _comparison_entry(result: ULDResult) -> dict[str, Any]:
    calibration = result.calibration
    return {
        "met": None if calibration is None else calibration.met,
        "alpha": None if calibration is None else calibration.alpha,
        "verdict": None if calibration is None else calibration.verdict(),
        "wall_time_s": result.wall_time_s,
    }


def _finish_artifact(source: Path, out: Path, record: dict[str, Any]) -> None:
    """Write the kept build (`source`: out itself or the other build's dir) to `out` atomically, its manifest's
    training section recording the comparison (`record`)."""
    with atomic_artifact_dir(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        manifest = load_manifest(tmp)
        manifest.training = {**manifest.training, **record}
        save_manifest(manifest, tmp)


def _train_uld_once(
    model: nn.Module,
    tokenizer,
    forget_records: list[dict[str, Any]],
    retain_records: list[dict[str, Any]],
    out_dir: str | Path,
    config: ULDTrainingConfig,
    data_files: dict[str, str | Path] | None,
    callbacks: list[TrainerCallback] | None,
    serve: ServeFn | None,
    keep_checkpoints: bool = False,
) -> ULDResult:
    """One build: `train_uld` without the `auto` comparison. `keep_checkpoints`: leave the resume checkpoints for the
    caller to remove (auto's first build: a --resume after a crash in the second build then skips its training)."""
    from peft import get_peft_model

    started = time.monotonic()
    num_hidden = len(decoder_layers(model))
    num_layers = config.layers if config.layers is not None else default_assistant_layers(num_hidden)
    if not 1 <= num_layers <= num_hidden:
        raise ULDTrainingError(f"--layers must be in 1..{num_hidden} for this model (got {num_layers})")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ULDTrainingError("the tokenizer has neither a pad nor an eos token to pad batches with")

    base_fingerprint = fingerprint_model(model)  # before LoRA is injected

    # ---- data
    calibrating = config.calibrate and serve is not None
    train_retain_records, validation_retain = split_validation(retain_records, config, calibrating)
    forget = augment_forget(forget_records, config.question_variants) if config.augment else list(forget_records)
    retain = (
        augment_retain(train_retain_records, config.seed, config.max_perturbed_per_row, config.question_variants)
        if config.augment
        else list(train_retain_records)
    )
    if config.self_answers:
        own_forget, own_retain = self_answer_rows(
            model, tokenizer, forget_records, train_retain_records, config.question_template, config.self_answer_tokens
        )
        print(f"self answers: {len(own_forget)} forget rows (answers naming their fact), {len(own_retain)} retain rows")
        forget, retain = forget + own_forget, retain + own_retain
    if config.answer_forms:
        form_forget, form_retain = answer_form_rows(forget_records, train_retain_records)
        print(f"answer forms: {len(form_forget)} forget rows, {len(form_retain)} retain rows")
        forget, retain = forget + form_forget, retain + form_retain
    # records whose answer survives truncation, in the order tokenize_records keeps them
    forget = [
        r for r in forget if not isinstance(r, dict) or has_loss_tokens(_render_or_empty(tokenizer, r, config))
    ] or forget
    forget_set = tokenize_records(tokenizer, forget, config.max_length, config.question_template, "forget")
    retain_set = tokenize_records(tokenizer, retain, config.max_length, config.question_template, "retain")
    weights: list[list[float]] | None = None
    if config.forget_weighting and len(forget) == len(forget_set.examples):
        weights = knowledge_weights(
            model,
            tokenizer,
            forget,
            forget_set.examples,
            config.max_length,
            config.question_template,
            tau=config.weighting_tau,
            reference_labels=[lab for _, lab in forget_set.examples + retain_set.examples],
            echo=0.0 if config.echo_flat else ECHO,
        )
    if weights is not None:
        for i, record in enumerate(forget):
            if isinstance(record, dict) and record.get("fact_words"):
                weights[i] = fact_word_weights(tokenizer, forget_set.examples[i][1], record["fact_words"])
    facts: list[list[int]] | None = None
    if config.fact_set_weight > 0 and weights is None:
        # said, not silently skipped: the manifest then records fact_set_weight 0
        print(
            "note: the fact-set loss needs the knowledge weights (question/answer forget rows, forget_weighting on);"
            " training without it"
        )
    elif config.fact_set_weight > 0:
        facts = [
            fact_tokens(labels, weights[i], config.fact_set_min_weight)
            for i, (_, labels) in enumerate(forget_set.examples)
        ]
        shown = next((row for row in facts if row), [])
        print(
            f"fact-set loss: {sum(map(len, facts)) / max(1, len(facts)):.1f} fact tokens per forget answer"
            f" (e.g. {[tokenizer.decode([t]) for t in shown[:8]]})"
        )
        if not shown:
            print(
                f"note: no forget answer token has a knowledge weight >= {config.fact_set_min_weight} (too few "
                "answers to tell facts from shared words), so the fact-set loss changes nothing"
            )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    candidates = (
        target_candidates(model, retain_set.examples, config.retain_candidates, pad_id)
        if config.retain_candidates > 0
        else None
    )
    for name, tset in (("forget", forget_set), ("retain", retain_set)):
        if tset.skipped:
            print(f"note: skipped {tset.skipped} {name} records with no answer token within --max-length")
    # An epoch is a pass over the forget set (as in the paper); the retain set supplies one partner
    # per forget example, cycling through a seeded order of all retain examples across passes.
    world = world_size_from_env()
    own = sum(isinstance(r, dict) and r.get("augmented_from") in (SELF_ANSWER, ANSWER_FORM) for r in forget)
    plan: StepPlan = plan_steps(
        max(1, len(forget_set.examples) - own),
        config.batch_size,
        config.grad_accum,
        config.epochs,
        config.min_steps,
        world,
    )
    dataset = ForgetRetainDataset(
        forget_set.examples,
        retain_set.examples,
        length=plan.total_steps * config.batch_size * config.grad_accum * world,
        retain_seed=config.seed,
        forget_weights=weights if config.forget_weighting else None,
        retain_candidates=candidates,
        forget_fact_tokens=facts,
    )

    # ---- the flat reference ("auto": whether the first K layers already know the forget answers)
    early_ce = None
    if config.flat_reference == "auto":
        early_ce = early_exit_forget_ce(model, forget_set.examples, weights, num_layers)
        flat_reference = choose_flat_reference(config, early_ce)
        said = "n/a" if early_ce is None else f"{early_ce:.2f} nats"
        if flat_reference == "uniform":
            print(
                f"flat reference: uniform, served ungated: the first {num_layers} layers already predict the forget "
                f"answers (the early exit's CE on them {said}, <= {EARLY_EXIT_KNOWS_CE:g}), so an assistant trained "
                "against them would learn nothing the early-exit gate could see"
            )
        else:
            print(f"flat reference: the early exit (its CE on the forget answers {said}), served gated by it")
        config = replace(config, flat_reference=flat_reference)

    # ---- model
    lora = assistant_lora_config(model, num_layers, config.lora_rank, config.lora_alpha, config.lora_dropout)
    # LoRA A matrices are drawn from the global RNG: seed it so --seed fixes the assistant.
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora)
    assistant = AssistantModule(peft_model, num_layers, config.flat_reference)

    out = Path(out_dir).resolve()
    ckpt_dir = checkpoint_dir_for(out)
    signature = {
        "config": config.run_signature(),
        "base": base_fingerprint,
        "forget": _records_digest(forget_records),
        "retain": _records_digest(retain_records),
        "steps": plan.total_steps,
    }
    resume_from = _resume_point(ckpt_dir, signature, config.resume)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / RUN_FILE).write_text(json.dumps(signature, sort_keys=True))

    details = {
        "assistant_layers": num_layers,
        "num_hidden_layers": num_hidden,
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(lora.target_modules),
        "question_template": None if has_chat_template(tokenizer) else config.question_template,
        "prompt_format": "chat_template" if has_chat_template(tokenizer) else "question_template",
    }
    data_info: dict[str, Any] = {}
    for name, records, expanded, tset in (
        ("forget", forget_records, forget, forget_set),
        ("retain", retain_records, retain, retain_set),
    ):
        info: dict[str, Any] = {
            "records": len(records),
            "after_augmentation": len(expanded),
            "examples": len(tset.examples),
            "skipped_too_long": tset.skipped,
            "records_sha256": _records_digest(records),
        }
        path = (data_files or {}).get(name)
        if path is not None:
            info.update(path=str(path), sha256=file_sha256(path))
        data_info[name] = info

    args = make_training_args(
        str(ckpt_dir),
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
    epoch_dirs: list[Path] = []
    trainer: ULDTrainer | None = None

    def training_summary(step: int) -> dict[str, Any]:
        assert trainer is not None
        forget_trace, retain_trace = trainer.metric_trace("forget_ce"), trainer.metric_trace("retain_kl")
        return {
            "steps": step,
            "planned_steps": plan.total_steps,
            "epochs": config.epochs,
            "steps_per_forget_pass": plan.pass_steps,
            "wall_time_s": round(time.monotonic() - started, 2),
            "forget_ce_first": forget_trace[0] if forget_trace else None,
            "forget_ce_final": forget_trace[-1] if forget_trace else None,
            "forget_flat_final": (trainer.metric_trace("forget_flat") or [None])[-1],
            "retain_candidates": config.retain_candidates,
            "retain_candidate_kl_final": (trainer.metric_trace("retain_flat") or [None])[-1]
            if candidates is not None
            else None,
            "forget_weighting": config.forget_weighting and weights is not None,
            "fact_set_weight": config.fact_set_weight if facts is not None else 0.0,
            "fact_set_kl_final": (trainer.metric_trace("fact_set") or [None])[-1] if facts is not None else None,
            "validation_retain_records": len(validation_retain),
            "retain_kl_first": retain_trace[0] if retain_trace else None,
            "retain_kl_final": retain_trace[-1] if retain_trace else None,
            "retain_kl_averaging": "token mean over the retain batch's answer tokens (no prompt, no padding)",
            "retain_weight": config.retain_weight,
            "flat_reference": config.flat_reference,
            "calibration_gate": config.calibration_gate,
            "early_exit_forget_ce": early_ce,
            "learning_rate": config.learning_rate,
            "warmup_ratio": config.warmup_ratio,
            "weight_decay": config.weight_decay,
            "batch_size": config.batch_size,
            "grad_accum": config.grad_accum,
            "effective_batch": config.batch_size * config.grad_accum * trainer.args.world_size,
            "max_length": config.max_length,
            "seed": config.seed,
            "validation_seed": config.split_seed(),
            "augment": config.augment,
            "data": data_info,
        }

    def lora_state_dict() -> dict[str, torch.Tensor] | None:
        # Sharded runs: gather full parameters first; single-process and DDP save directly.
        assert trainer is not None
        if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
            return None
        full = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        prefix = "peft_model."
        return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}

    def save_epoch(epoch: int, step: int) -> None:
        if not config.save_every_epoch:
            return
        state = lora_state_dict()
        if trainer is not None and trainer.args.should_save:
            summary = training_summary(step) | {"epoch": epoch}
            epoch_dirs.append(
                save_uld_artifact(
                    peft_model,
                    epoch_dir_for(out, epoch),
                    base_fingerprint,
                    details,
                    summary,
                    state,
                    config.trained_defaults(),
                )
            )

    trainer = ULDTrainer(
        model=assistant,
        args=args,
        train_dataset=dataset,
        data_collator=ForgetRetainCollator(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ),
        callbacks=[EpochCallback(plan, save_epoch), *(callbacks or [])],
        retain_weight=config.retain_weight,
        forget_flat_weight=config.forget_flat_weight,
        retain_candidate_weight=config.retain_candidate_weight if candidates is not None else 0.0,
        fact_set_weight=config.fact_set_weight if facts is not None else 0.0,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    peft_model.eval()

    summary = training_summary(trainer.state.global_step)
    state = lora_state_dict()
    calibration: Calibration | None = None
    defaults = config.trained_defaults()
    if calibrating and trainer.args.should_save:
        assert serve is not None
        calibration = _calibrate(
            peft_model,
            tokenizer,
            out,
            base_fingerprint,
            details,
            summary,
            state,
            forget_records,
            validation_retain,
            config,
            serve,
            train_retain_records,
        )
        summary["calibration"] = None if calibration is None else calibration.to_manifest()
        if calibration is not None:
            # explicit --default-alpha / --default-filter win over the calibrated values, and the calibration's gate
            # (`choose_gate`) over the one the training implies
            defaults = {**defaults, **calibrated_defaults(calibration), **config.serving_defaults()}
    if trainer.args.should_save:
        save_uld_artifact(peft_model, out, base_fingerprint, details, summary, state, defaults)
        if not keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    return ULDResult(
        out_dir=out,
        peft_model=peft_model,
        steps=summary["steps"],
        wall_time_s=summary["wall_time_s"],
        forget_ce=summary["forget_ce_final"],
        retain_kl=summary["retain_kl_final"],
        training=summary,
        epoch_dirs=epoch_dirs,
        calibration=calibration,
        forget_flat=summary["forget_flat_final"],
    )


def _render_or_empty(tokenizer, record: dict[str, Any], config: ULDTrainingConfig) -> list[int]:
    from unlearn_serve.errors import DataError

    try:
        return render_example(tokenizer, record, config.max_length, config.question_template)[1]
    except DataError:
        return [IGNORE_INDEX, 0]  # let tokenize_records report the error with its record number


def split_validation(
    retain_records: list[dict[str, Any]], config: ULDTrainingConfig, calibrating: bool | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training retain records, held-out validation records): a seeded slice, only when calibrating."""
    calibrating = config.calibrate if calibrating is None else calibrating
    if not calibrating or len(retain_records) < 4:
        return list(retain_records), []
    n = min(config.validation_max_retain, max(1, round(config.validation_fraction * len(retain_records))))
    order = list(range(len(retain_records)))
    import random

    random.Random(config.split_seed()).shuffle(order)
    held = set(order[:n])
    return [r for i, r in enumerate(retain_records) if i not in held], [retain_records[i] for i in sorted(held)]


def serving_copy(peft_model: nn.Module) -> nn.Module:
    """The base model without LoRA, sharing every weight tensor with `peft_model` (no second copy of the weights):
    a deep copy that maps each parameter and buffer to itself, then peft's `unload()` on the copy. `peft_model`
    keeps its adapter; hooks a server installs on the copy never reach it."""
    return shared_copy(peft_model).unload()


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers are the original tensors (no second copy of the
    weights): hooks a server installs on the copy never reach `module`."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


def _served_settings(config: ULDTrainingConfig, model: nn.Module) -> tuple[float, str, int]:
    """(filter, rule, alphas probed per round) the calibration serves the draft with."""
    from unlearn_serve.uld_combine import DEFAULT_RULE

    filter_value = config.default_filter if config.default_filter is not None else 0.01
    device = next(model.parameters()).device
    probes = config.validation_probes_per_round or (8 if device.type == "cuda" else 1)
    return filter_value, config.default_rule or DEFAULT_RULE, probes


def _served_margin(config: ULDTrainingConfig) -> float:
    """The margin the calibration's draft (and a recalibrated artifact) is written with: --default-margin, else the
    first margin the calibration prefers, so that a single calibrated margin is the one the answers were served at."""
    return _calibration_margins(config, "prefer")[0]


def _calibration_margins(config: ULDTrainingConfig, rule: str) -> tuple[float, ...]:
    """The margins the calibration chooses from: an explicit --default-margin is the only one; only the `prefer`
    rule has a margin (none: the verdict names none)."""
    from unlearn_serve.uld_combine import CALIBRATION_MARGINS

    if rule != "prefer":
        return ()
    if config.default_margin is not None:
        return (float(config.default_margin),)
    return tuple(float(m) for m in (config.calibration_margins or CALIBRATION_MARGINS))


def _served_floor(config: ULDTrainingConfig) -> float | None:
    """The floor a new artifact is written with (None: off)."""
    from unlearn_serve.uld_combine import DEFAULT_FLOOR

    chosen = config.serving_defaults()  # the one place that turns --default-floor off (inf) into null
    return chosen["floor"] if "floor" in chosen else DEFAULT_FLOOR


def calibrated_defaults(calibration: Calibration) -> dict[str, Any]:
    """The serving defaults a calibration picked (the margin only when it chose one)."""
    picked = {"alpha": calibration.alpha, "filter": calibration.filter, "rule": calibration.rule}
    if calibration.finish_words is not None:  # it compared finishing words on and off
        picked["finish_words"] = calibration.finish_words
    if calibration.gate_tried:  # it compared an ungated draft with and without the early-exit gate
        picked["gate"] = calibration.gate
    return picked | ({} if calibration.margin is None else {"margin": calibration.margin})


def _calibrate_answers(
    answer,
    tokenizer,
    forget_records: list[dict[str, Any]],
    validation_retain: list[dict[str, Any]],
    train_retain: list[dict[str, Any]] | None,
    config: ULDTrainingConfig,
    settings: tuple[float, str, int],
    draft_gate: str | None,
) -> Calibration | None:
    """`calibrate` on a served draft's answer function, with `config`'s targets and sizes; `draft_gate`: the gate the
    draft is served with (an ungated one may be calibrated gated too: `choose_gate`)."""
    from unlearn_serve.training.data import encode_prompt

    filter_value, rule, probes = settings

    def run(answer_fn) -> Calibration | None:
        return calibrate(
            answer_fn,
            lambda q: encode_prompt(tokenizer, q, config.question_template),
            forget_records,
            validation_retain,
            filter_value=filter_value,
            targets=config.calibration_targets(),
            max_forget=config.validation_max_forget,
            max_tokens=config.validation_max_tokens,
            probes_per_round=probes,
            seed=config.split_seed(),
            train_retain_rows=train_retain,
            rule=rule,
            rephrase=config.validation_rephrase,
            trained_rephrasings=config.question_variants if config.augment else 0,
            margins=_calibration_margins(config, rule),
            topic=config.validation_topic,
        )

    shared: dict[Any, Any] = {}

    def with_finish_words(options: dict[str, Any]) -> Calibration | None:
        if not (_served_finish_words(config) and rule == "prefer"):
            return run(WithOptions(answer, options, shared))
        # the draft finishes words; when that misses a target, the same calibration without it decides
        # (uld_calibrate.choose_finish_words)
        on = run(WithOptions(answer, options, shared))
        if on is None or on.met:
            return on if on is None else replace(on, finish_words=True)
        off = run(WithOptions(answer, options | {"finish_words": False}, shared))
        return on if off is None else choose_finish_words(on, off)

    ungated = with_finish_words({})
    if ungated is None or ungated.met or draft_gate is not None or rule != "prefer" or not config.calibration_gate:
        return ungated
    # an ungated draft that misses a target: the same calibration gated by the early exit (uld_calibrate.choose_gate)
    gated = with_finish_words({"gate": "early_exit"})
    return ungated if gated is None else choose_gate(ungated, gated)


def _calibrate(
    peft_model: nn.Module,
    tokenizer,
    out: Path,
    base_fingerprint: dict[str, Any],
    details: dict[str, Any],
    summary: dict[str, Any],
    state: dict[str, torch.Tensor] | None,
    forget_records: list[dict[str, Any]],
    validation_retain: list[dict[str, Any]],
    config: ULDTrainingConfig,
    serve: ServeFn,
    train_retain: list[dict[str, Any]] | None = None,
) -> Calibration | None:
    """Serve a draft artifact (next to `out`, removed after) and pick the alpha from its answers."""
    settings = _served_settings(config, peft_model)
    filter_value, rule, _ = settings
    base = serving_copy(peft_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.validation-", dir=out.parent) as tmp:
        draft = save_uld_artifact(
            peft_model,
            Path(tmp) / "draft",
            base_fingerprint,
            details,
            summary,
            state,
            {
                "filter": filter_value,
                "rule": rule,
                "margin": _served_margin(config),
                "gate": config.served_gate(),
                "prefix_guard": _served_prefix_guard(config),
                "finish_words": _served_finish_words(config),
            },
        )
        answer = serve(base, tokenizer, draft)
        return _calibrate_answers(
            answer, tokenizer, forget_records, validation_retain, train_retain, config, settings, config.served_gate()
        )


def _served_prefix_guard(config: ULDTrainingConfig) -> bool:
    """The prefix guard the calibration's draft (and a recalibrated artifact) is served with: --no-prefix-guard, else
    today's default (uld_combine.DEFAULT_PREFIX_GUARD)."""
    return DEFAULT_PREFIX_GUARD if config.default_prefix_guard is None else config.default_prefix_guard


def _served_finish_words(config: ULDTrainingConfig) -> bool:
    """Finishing words as the calibration's draft (and a recalibrated artifact) is served: --no-finish-words, else
    today's default (uld_combine.DEFAULT_FINISH_WORDS)."""
    return DEFAULT_FINISH_WORDS if config.default_finish_words is None else config.default_finish_words


def recalibrate_uld(
    model: nn.Module,
    tokenizer,
    artifact: str | Path,
    forget_records: list[dict[str, Any]],
    retain_records: list[dict[str, Any]],
    out_dir: str | Path,
    config: ULDTrainingConfig,
    serve: ServeFn,
) -> Calibration | None:
    """Calibrate a trained artifact again (e.g. under another combination rule) without retraining it.

    `model` is the base model; `forget_records` / `retain_records` and `config` must be the ones it was trained
    with; the held-out retain slice is the training's (`split_validation`, seeded by the manifest's
    `training.validation_seed`, else `training.seed`, when recorded: a restarted build's). Writes a copy of the
    artifact to `out_dir` with the new defaults (alpha, filter, rule, today's margin and floor) and
    `training.calibration`; the weights are
    copied unchanged. An explicit `config.default_alpha` / `default_filter` still wins, as in `train_uld`.
    """
    source = Path(artifact)
    manifest = load_manifest(source)
    check_fingerprint(manifest, fingerprint_model(model), str(source), "the base model")
    # the held-out slice the training used, whatever seed `config` carries: a restarted build (`restarts`) was
    # trained on seed + k but validated on the first seed's slice, recorded as `validation_seed`
    recorded = manifest.training.get("validation_seed")
    recorded = manifest.training.get("seed") if recorded is None else recorded
    if isinstance(recorded, int) and recorded != config.split_seed():
        config = replace(config, validation_seed=recorded)
    train_retain, validation_retain = split_validation(retain_records, config, True)
    settings = _served_settings(config, model)
    filter_value, rule, _ = settings
    out = Path(out_dir).resolve()
    with atomic_artifact_dir(out) as tmp:
        for f in source.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        # the gate the weights were trained for (an earlier calibration may have gated a uniform build:
        # `choose_gate` decides again); manifests without the training's flat reference keep theirs
        trained_for = manifest.training.get("flat_reference")
        gate = manifest.defaults.get("gate") if trained_for is None else trained_gate(trained_for, rule)
        # today's margin, floor and prefix guard too: a manifest without them was calibrated for margin 0, no floor
        # and no guard
        manifest.defaults = {
            **manifest.defaults,
            "gate": gate,
            "filter": filter_value,
            "rule": rule,
            "margin": _served_margin(config),
            "floor": _served_floor(config),
            "prefix_guard": _served_prefix_guard(config),
            "finish_words": _served_finish_words(config),
        }
        save_manifest(manifest, tmp)
        answer = serve(shared_copy(model), tokenizer, tmp)
        calibration = _calibrate_answers(
            answer,
            tokenizer,
            forget_records,
            validation_retain,
            train_retain,
            config,
            settings,
            gate,
        )
        if calibration is not None:
            calibrated = calibrated_defaults(calibration)
            manifest.defaults = {**manifest.defaults, **calibrated, **config.serving_defaults()}
            manifest.training = {
                **manifest.training,
                "calibration": calibration.to_manifest(),
                "recalibrated_from": str(source),
            }
            save_manifest(manifest, tmp)
    return calibration
