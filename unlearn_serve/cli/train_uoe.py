"""`unlearn-serve train-uoe`: unlearn one MoE expert (SEUF) and write an expert patch artifact."""

from __future__ import annotations

import argparse
import sys

from unlearn_serve.cli.uoe_common import add_data_options, add_model_options


def configure(parser: argparse.ArgumentParser) -> None:
    from unlearn_serve.training.uoe_trainer import METHODS, UOEConfig

    d = UOEConfig()
    add_model_options(parser)
    parser.add_argument("--forget", required=True, help="forget set, JSON Lines (text / question+answer / messages)")
    parser.add_argument("--retain", required=True, help="retain set, JSON Lines (same shapes)")
    parser.add_argument("--out", required=True, help="artifact directory to write (replaced atomically)")
    parser.add_argument("--layer", type=int, help="MoE layer to unlearn (default: attribution's top-1)")
    parser.add_argument("--expert", type=int, help="expert to unlearn (default: attribution's top-1)")
    parser.add_argument(
        "--pick", choices=("contrast", "forget"), default=d.pick,
        help="without --layer/--expert: the attribution ranking that picks the expert: contrast (forget minus "
        "retain affinity, the default) or forget (forget affinity alone, the paper's)",
    )
    parser.add_argument(
        "--contrast", dest="pick", action="store_const", const="contrast", help="same as --pick contrast"
    )
    parser.add_argument("--method", choices=METHODS, default=d.method, help="unlearning loss (default: %(default)s)")
    parser.add_argument("--anchor-weight", type=float, default=d.anchor_weight, help="router anchor loss weight")
    parser.add_argument("--retain-weight", type=float, default=d.retain_weight, help="gd/npo/rmu retain term")
    parser.add_argument(
        "--lr", type=float, default=d.lr,
        help="starting learning rate (default: %(default)s, the paper's); the adaptive schedule raises it while "
        "forgetting is too slow and lowers it when the retain bound breaks",
    )
    parser.add_argument(
        "--fixed-lr", dest="adaptive_lr", action="store_false", help="keep --lr for the whole run (no adaptation)"
    )
    parser.add_argument("--max-lr", type=float, default=d.max_lr, help="ceiling of the adaptive rate")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument(
        "--max-epochs", type=float, default=d.max_epochs,
        help="cap: passes over the larger of the two sets (default: %(default)s; the goal usually stops it first)",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=d.max_minutes, help="cap on wall time (default: %(default)s)"
    )
    parser.add_argument("--max-steps", type=int, default=d.max_steps, help="optional cap on optimizer steps")
    parser.add_argument(
        "--forget-loss-target", type=float, default=d.forget_loss_target,
        help="stop once forget CE (nats/answer token) reaches this (default: %(default)s) ...",
    )
    parser.add_argument(
        "--retain-loss-bound", type=float,
        help=f"... while retain CE stays at or below this (default: initial retain CE + {d.retain_slack})",
    )
    parser.add_argument(
        "--max-forget-leak", type=float, default=d.max_forget_leak,
        help="goal: at most this share of the validation forget facts still answered (default: %(default)s)",
    )
    parser.add_argument(
        "--min-retain-recall", type=float, default=d.min_retain_recall,
        help="goal: validation retain facts answered, relative to the base model (default: %(default)s)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with code 3 when the goal is not met (default: a warning)"
    )
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between stopping-rule checks")
    parser.add_argument("--eval-examples", type=int, default=d.eval_examples, help="examples per set for the check")
    parser.add_argument("--npo-beta", type=float, default=d.npo_beta)
    parser.add_argument("--rmu-steering", type=float, default=d.rmu_steering, help="RMU steering scale c")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--seed", type=int, default=d.seed)
    add_data_options(parser)


def run(args: argparse.Namespace) -> int:
    from unlearn_serve.artifact import file_sha256
    from unlearn_serve.cli import CliError
    from unlearn_serve.cli.uoe_common import load_moe_model
    from unlearn_serve.training.data import load_records
    from unlearn_serve.training.uoe_trainer import UOEConfig, train_uoe, write_uoe_artifact

    for flag in ("batch_size", "max_steps", "eval_every", "eval_examples", "max_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.anchor_weight < 0 or args.retain_weight < 0 or args.weight_decay < 0:
        raise CliError("--lr must be > 0; --anchor-weight, --retain-weight, --weight-decay >= 0")
    try:
        config = UOEConfig(
            layer=args.layer, expert=args.expert, pick=args.pick,
            method=args.method, anchor_weight=args.anchor_weight,
            retain_weight=args.retain_weight, lr=args.lr, batch_size=args.batch_size, max_steps=args.max_steps,
            adaptive_lr=args.adaptive_lr, max_lr=max(args.max_lr, args.lr), max_epochs=args.max_epochs,
            max_minutes=args.max_minutes, max_forget_leak=args.max_forget_leak,
            min_retain_recall=args.min_retain_recall,
            forget_loss_target=args.forget_loss_target, retain_loss_bound=args.retain_loss_bound,
            eval_every=args.eval_every, eval_examples=args.eval_examples, npo_beta=args.npo_beta,
            rmu_steering=args.rmu_steering, weight_decay=args.weight_decay, max_length=args.max_length,
            question_template=args.question_template, seed=args.seed, progress=args.progress,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    # Data first: a malformed file fails in seconds, before the model loads.
    forget = load_records(args.forget)
    retain = load_records(args.retain)
    model, tokenizer, _ = load_moe_model(args)
    try:
        result = train_uoe(
            model, tokenizer, forget, retain, config,
            data_hashes={"forget_file_sha256": file_sha256(args.forget),
                         "retain_file_sha256": file_sha256(args.retain)},
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    write_uoe_artifact(result, args.out)
    losses = result.manifest.training["losses"]
    first, kept = losses["initial"], losses["kept"]
    print(
        f"unlearned layer {result.patch.layer} expert {result.patch.expert} ({args.method}): "
        f"{result.manifest.training['steps']} steps, kept step {result.manifest.training['kept_step']}; "
        f"forget CE {first['forget_ce']:.4f} -> {kept['forget_ce']:.4f}, "
        f"retain CE {first['retain_ce']:.4f} -> {kept['retain_ce']:.4f}"
    )
    print(f"wrote {args.out} ({result.patch.num_parameters():,} parameters)")
    verdict = result.verdict
    for line in verdict.lines():
        print(line)
    if verdict.goal_met:
        return 0
    print(
        "WARNING: the unlearning goal was NOT met; the patch holds the best step found. Try another --method, "
        "a larger --max-epochs / --max-minutes, or a looser --forget-loss-target / --retain-loss-bound"
        + ("" if args.strict else " (--strict makes this exit code 3)"),
        file=sys.stderr,
    )
    return 3 if args.strict else 0
