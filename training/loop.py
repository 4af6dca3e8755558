"""What the ULD and baseline trainers share: the step plan, TrainingArguments, metric logging, epoch hooks.

Both run on `transformers.Trainer`, so accelerate / DDP / FSDP / DeepSpeed launchers work unchanged.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps of a run. An "epoch" is total_steps / epochs steps, which is one pass over the
    data (ULD: the forget set, as in the paper) unless --min-steps stretched the schedule for a
    small data set."""

    total_steps: int
    pass_steps: int  # optimizer steps of one pass over the data
    epoch_steps: int
    epochs: int

    def epoch_end(self, epoch: int) -> int:
        return min(epoch * self.epoch_steps, self.total_steps)

    def epoch_at(self, step: int) -> int | None:
        """The epoch that ends at `step`, if one does."""
        for epoch in range(1, self.epochs + 1):
            if self.epoch_end(epoch) == step:
                return epoch
        return None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def plan_steps(
    num_pairs: int, batch_size: int, grad_accum: int, epochs: int, min_steps: int, world_size: int | None = None
) -> StepPlan:
    """`num_pairs` examples make one pass ("epoch"); at least `min_steps` optimizer steps in all.

    The paper's 10 epochs over TOFU forget10 (1,200 rows after augmentation, batch 32) are ~375
    steps; 10 epochs over a user's 20 rows would be 10, far too few for the assistant to become
    flat on the retain set, hence the minimum.
    """
    if min(batch_size, grad_accum, epochs) < 1 or min_steps < 0:
        raise ValueError("batch size, grad accumulation and epochs must be >= 1, min steps >= 0")
    world = world_size or world_size_from_env()
    pass_steps = math.ceil(num_pairs / (batch_size * grad_accum * world))
    total = max(min_steps, epochs * pass_steps, 1)
    return StepPlan(total, pass_steps, math.ceil(total / epochs), epochs)


def make_training_args(
    output_dir: str,
    *,
    learning_rate: float,
    batch_size: int,
    grad_accum: int,
    max_steps: int,
    seed: int,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    logging_steps: int | None = None,
    progress_bar: bool = True,
) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=warmup_ratio,  # a float in [0, 1) is a ratio of max_steps
        lr_scheduler_type="linear",
        optim="adamw_torch",
        max_steps=max_steps,
        seed=seed,
        data_seed=seed,
        logging_steps=logging_steps or max(1, min(50, max_steps // 25)),
        save_strategy="no",  # our epoch callback asks for resume checkpoints; artifacts we write ourselves
        save_total_limit=1,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        disable_tqdm=not progress_bar,
    )


class UnlearningTrainer(Trainer):
    """A Trainer whose compute_loss returns per-micro-batch means and records named loss parts.

    Recorded parts are averaged over each logging window (and across processes), added to the
    Trainer's log (so they reach tqdm and `state.log_history`) and shown as the bar's postfix.
    """

    loss_is_scaled_for_ga = False  # per-batch means: the Trainer divides by the accumulation steps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._window: dict[str, list[torch.Tensor]] = defaultdict(list)

    def record(self, **parts: torch.Tensor) -> None:
        if self.model.training:
            for name, value in parts.items():
                self._window[name].append(value.detach().float())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window:
            names = list(self._window)
            for name, values in self._window.items():
                mean = torch.stack(values).mean()
                logs[name] = float(self.accelerator.reduce(mean.to(self.args.device), reduction="mean"))
            self._window.clear()
            bar = next(
                (cb.training_bar for cb in self.callback_handler.callbacks if isinstance(cb, ProgressCallback)),
                None,
            )
            if bar is not None:
                bar.set_postfix({name: f"{logs[name]:.4g}" for name in names})
        super().log(logs, start_time)

    def metric_trace(self, name: str) -> list[float]:
        """Logged window means of a recorded part, in order (survives --resume via log_history)."""
        return [entry[name] for entry in self.state.log_history if name in entry]


class EpochCallback(TrainerCallback):
    """At each epoch end: log, ask for a (resume) checkpoint, then call `on_epoch_saved(epoch, step)`."""

    def __init__(self, plan: StepPlan, on_epoch_saved: Callable[[int, int], None] | None = None):
        self.plan = plan
        self.on_epoch_saved = on_epoch_saved

    def on_step_end(self, args, state, control, **kwargs):
        if self.plan.epoch_at(state.global_step) is not None:
            control.should_log = True
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        epoch = self.plan.epoch_at(state.global_step)
        if epoch is not None and self.on_epoch_saved is not None:
            self.on_epoch_saved(epoch, state.global_step)
        return control
