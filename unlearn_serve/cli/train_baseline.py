"""`unlearn-serve train-baseline`: whole-model GA / GD / NPO / RMU unlearning (for comparison with ULD and UOE)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from unlearn_serve.training.data import DEFAULT_QUESTION_TEMPLATE

    parser.add_argument(
        "--method", required=True, choices=("ga", "gd", "npo", "rmu"),
        help="ga, gd (ga + retain CE), npo, rmu (steer one layer's forget activations to a random direction)",
    )
    parser.add_argument("--model", required=True, help="model to unlearn from: hub id or local directory")
    parser.add_argument("--forget", required=True, help="forget set, JSON Lines")
    parser.add_argument("--retain", required=True, help="retain set, JSON Lines (gd, npo; ga ignores it)")
    parser.add_argument("--out", required=True, help="output model directory (replaced atomically)")
    parser.add_argument("--retain-weight", type=float, help="weight of the retain CE (default: 0 ga, 1 gd/npo)")
    parser.add_argument("--beta", type=float, default=0.1, help="NPO beta (default: %(default)s)")
    parser.add_argument("--rmu-layer", type=int, help="RMU: decoder layer to steer (default: the middle one)")
    parser.add_argument("--rmu-steering", type=float, default=6.5, help="RMU steering scale c (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--min-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--question-template", default=DEFAULT_QUESTION_TEMPLATE)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from unlearn_serve.cli import CliError
    from unlearn_serve.loading import load_model_and_tokenizer
    from unlearn_serve.training.baselines import BaselineConfig, train_baseline
    from unlearn_serve.training.data import load_records

    for flag in ("epochs", "batch_size", "grad_accum", "max_length"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.beta <= 0 or args.min_steps < 0 or (args.retain_weight or 0) < 0:
        raise CliError("--lr and --beta must be > 0, --min-steps and --retain-weight >= 0")
    forget = load_records(args.forget)
    retain = load_records(args.retain)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    config = BaselineConfig(
        method=args.method,
        retain_weight=args.retain_weight,
        beta=args.beta,
        rmu_layer=args.rmu_layer,
        rmu_steering=args.rmu_steering,
        epochs=args.epochs,
        min_steps=args.min_steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        question_template=args.question_template,
        progress_bar=args.progress,
    )
    result = train_baseline(model, tokenizer, forget, retain, args.out, config)
    t = result.training
    print(
        f"trained {args.method.upper()} baseline: {t['steps']} steps in {t['wall_time_s']:.1f}s; "
        f"forget CE {t['forget_ce_first']} -> {t['forget_ce_final']}"
    )
    print(f"wrote {result.out_dir}")
    return 0
