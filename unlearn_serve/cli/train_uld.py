"""`unlearn-serve train-uld`: train a ULD assistant (LoRA on the target's first K layers)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from unlearn_serve.training.data import DEFAULT_QUESTION_TEMPLATE

    parser.add_argument("--model", required=True, help="target model: Hugging Face hub id or local directory")
    parser.add_argument("--forget", required=True, help="forget set, JSON Lines (text / question+answer / messages)")
    parser.add_argument("--retain", required=True, help="retain set, JSON Lines (same shapes)")
    parser.add_argument("--out", required=True, help="artifact directory to write (replaced atomically)")
    parser.add_argument("--layers", type=int, help="assistant layers K (default: round(N/4), at least 1)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--retain-weight", type=float, default=6.5, help="beta: weight of KL(flat || assistant)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--min-steps", type=int, default=250, help="train at least this many optimizer steps (small data sets)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8, help="per device; effective batch = x grad-accum")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (truncated on the right)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--restarts",
        type=int,
        default=0,
        choices=range(0, 10),
        metavar="N",
        help="when the kept build misses its calibration targets, train again with the next seed (--seed + 1, …), "
        "up to N more times, and keep the build whose validation answers are best (default 0; docs/uld.md)",
    )
    parser.add_argument(
        "--question-template",
        default=DEFAULT_QUESTION_TEMPLATE,
        help="QA prompt when the tokenizer has no chat template (default: %(default)r)",
    )
    parser.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="do not add paraphrased forget pairs / perturbed retain pairs from TOFU-style fields",
    )
    parser.add_argument("--save-every-epoch", action="store_true", help="also write OUT-epoch-N artifacts")
    parser.add_argument("--resume", action="store_true", help="continue from OUT.checkpoints/ of an interrupted run")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a capable GPU, else fp32), fp32, bf16, fp16")
    parser.add_argument("--gguf-file", help="GGUF file inside --model to load (dequantized; needs `gguf`)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--default-alpha", type=float, help="serving default alpha stored in the manifest (default: 0.75, the paper's)"
    )
    parser.add_argument(
        "--default-filter", type=float, help="serving default plausibility filter in [0, 1] (default: 0.01)"
    )
    parser.add_argument(
        "--default-rule",
        choices=["prefer", "difference"],
        help="serving combination rule stored in the manifest (default: prefer; docs/uld.md)",
    )
    parser.add_argument(
        "--flat-reference",
        choices=["auto", "early_exit", "uniform"],
        default="auto",
        help="what the assistant is trained flat against where it must know nothing: the target cut after its K "
        "layers, served gated by it, or the paper's uniform distribution; auto (default): the early exit unless it "
        "already predicts the forget answers, and when that build misses its calibration targets the uniform one is "
        "trained too and the better kept (docs/uld.md)",
    )
    parser.add_argument(
        "--default-margin",
        type=float,
        help="the prefer rule's margin stored in the manifest, in assistant logits >= 0 (default: 1; docs/uld.md)",
    )
    parser.add_argument(
        "--calibration-margins",
        help="prefer-rule margins the calibration chooses from, in order of preference, comma-separated, e.g. 1,2: "
        "each is calibrated until one meets every target, else the one that forgets with the best balance is "
        "stored (default: 1 only; ignored with --default-margin; docs/uld.md)",
    )
    parser.add_argument(
        "--default-floor",
        help="the penalty's floor stored in the manifest: a number >= 0 (target logits below the best unpenalised "
        "candidate) or 'off' (default: 10; docs/uld.md)",
    )
    parser.add_argument(
        "--no-prefix-guard",
        dest="default_prefix_guard",
        action="store_const",
        const=False,
        help="store prefix_guard false in the manifest (default: true: a candidate whose text begins a penalised "
        "one's is penalised too, so a fact pushed down is not spelt by its first letters; docs/uld.md)",
    )
    parser.add_argument(
        "--no-finish-words",
        dest="default_finish_words",
        action="store_const",
        const=False,
        help="store finish_words false in the manifest (default: true: a word the unlearned answer began is finished "
        "as the target would, unless the LoRA learnt its ending; docs/uld.md)",
    )
    parser.add_argument(
        "--no-calibration-gate",
        dest="calibration_gate",
        action="store_false",
        help="never serve a uniform-reference build gated by the early exit (default: when the ungated calibration "
        "misses a target and the gated one meets every target, the manifest stores gate early_exit; docs/uld.md)",
    )
    parser.add_argument(
        "--no-forget-weighting",
        dest="forget_weighting",
        action="store_false",
        help="plain forget CE on every answer token (default: weight the knowledge-carrying tokens, docs/uld.md)",
    )
    parser.add_argument(
        "--fact-set-weight",
        type=float,
        help="weight of the fact-set loss: each forget answer's fact tokens preferred at every answer position, "
        "0 = off (default: the trainer's; docs/uld.md)",
    )
    parser.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="do not pick the serving alpha from served answers on a validation slice (then alpha is --default-alpha "
        "or 0.75)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="share of the retain records held out of training to calibrate on (default: %(default)s, at most 16)",
    )
    parser.add_argument(
        "--validation-max-tokens",
        type=int,
        help="new tokens per greedy validation answer (default: the trainer's, 24); longer answers catch facts named "
        "late, e.g. in a list (the demo uses 48; docs/uld.md)",
    )
    parser.add_argument(
        "--topic",
        action="store_true",
        help="the forget set is one topic (a book series, a person): a validation forget answer that names another "
        "forget fact counts as a leak too, e.g. the author's initials in an answer about the characters (docs/uld.md)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with code 3 when the served validation answers miss the forget, retain or fluency targets",
    )


def run(args: argparse.Namespace) -> int:
    from unlearn_serve.cli import CliError
    from unlearn_serve.evaluation.uld_validation import serve_with_engine
    from unlearn_serve.loading import load_model_and_tokenizer
    from unlearn_serve.training.data import load_records
    from unlearn_serve.training.uld import ULDTrainingConfig, gated_retain_hint, restarts_summary, train_uld

    for flag in ("epochs", "batch_size", "grad_accum", "max_length", "lora_rank"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.min_steps < 0 or args.lr <= 0 or args.retain_weight < 0 or not 0 <= args.lora_dropout < 1:
        raise CliError("--min-steps, --retain-weight must be >= 0, --lr > 0, --lora-dropout in [0, 1)")
    if args.default_alpha is not None and args.default_alpha < 0:
        raise CliError("--default-alpha must be >= 0")
    if args.default_filter is not None and not 0 <= args.default_filter <= 1:
        raise CliError("--default-filter must be in [0, 1]")
    from unlearn_serve.uld_combine import is_floor, is_margin

    if args.default_margin is not None and not is_margin(args.default_margin):
        raise CliError("--default-margin must be a number >= 0")
    calibration_margins = None
    if args.calibration_margins is not None:
        try:
            calibration_margins = tuple(float(m) for m in args.calibration_margins.split(","))
        except ValueError:
            calibration_margins = None
        if not calibration_margins or not all(is_margin(m) for m in calibration_margins):
            raise CliError(
                f"--calibration-margins {args.calibration_margins!r}: write numbers >= 0 separated by commas, e.g. 1,2"
            )
    default_floor = None
    if args.default_floor is not None:
        try:
            default_floor = float("inf") if args.default_floor == "off" else float(args.default_floor)
        except ValueError:
            raise CliError(f"--default-floor {args.default_floor!r}: write a number >= 0 or 'off'") from None
        if args.default_floor != "off" and not is_floor(default_floor):  # "inf" is no number here: 'off' is off
            raise CliError(f"--default-floor {args.default_floor!r}: write a number >= 0 or 'off'")
    if not 0 <= args.validation_fraction < 1:
        raise CliError("--validation-fraction must be in [0, 1)")
    if args.fact_set_weight is not None and args.fact_set_weight < 0:
        raise CliError("--fact-set-weight must be >= 0 (0 = off)")
    if args.fact_set_weight and not args.forget_weighting:
        raise CliError("--fact-set-weight needs the knowledge weights (drop --no-forget-weighting or set it to 0)")
    if args.validation_max_tokens is not None and args.validation_max_tokens < 1:
        raise CliError("--validation-max-tokens must be >= 1")
    if args.strict and not args.calibrate:
        raise CliError("--strict needs the calibration (drop --no-calibrate)")

    # Data first: a malformed file fails in seconds, before the model loads.
    forget = load_records(args.forget)
    retain = load_records(args.retain)
    model, tokenizer = load_model_and_tokenizer(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device="auto")

    # flags whose default is the trainer's own (None: not given)
    optional = {
        name: getattr(args, name)
        for name in ("fact_set_weight", "validation_max_tokens")
        if getattr(args, name) is not None
    }
    config = ULDTrainingConfig(
        layers=args.layers,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        retain_weight=args.retain_weight,
        epochs=args.epochs,
        min_steps=args.min_steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        question_template=args.question_template,
        augment=args.augment,
        save_every_epoch=args.save_every_epoch,
        resume=args.resume,
        progress_bar=args.progress,
        default_alpha=args.default_alpha,
        default_filter=args.default_filter,
        default_rule=args.default_rule,
        default_margin=args.default_margin,
        calibration_margins=calibration_margins,
        default_floor=default_floor,
        default_prefix_guard=args.default_prefix_guard,
        default_finish_words=args.default_finish_words,
        calibration_gate=args.calibration_gate,
        restarts=args.restarts,
        forget_weighting=args.forget_weighting,
        flat_reference=args.flat_reference,
        **optional,
        calibrate=args.calibrate,
        validation_fraction=args.validation_fraction,
        validation_topic=args.topic,
    )
    result = train_uld(
        model,
        tokenizer,
        forget,
        retain,
        args.out,
        config,
        data_files={"forget": args.forget, "retain": args.retain},
        serve=serve_with_engine if args.calibrate else None,
    )
    t = result.training
    flat = "early exit" if t.get("flat_reference") == "early_exit" else "uniform"
    print(
        f"trained ULD assistant: {t['steps']} steps in {t['wall_time_s']:.1f}s; "
        f"forget CE {_num(t['forget_ce_first'])} -> {_num(t['forget_ce_final'])} (lower: remembers the forget set), "
        f"retain KL({flat}||assistant) {_num(t['retain_kl_first'])} -> {_num(t['retain_kl_final'])} "
        "(near 0: flat on the retain set; if not, train longer with --min-steps)"
    )
    compared = t.get("flat_reference_compared")
    if compared:
        times = " + ".join(f"{compared[k]['wall_time_s']:.1f}s" for k in ("early_exit", "uniform"))
        kept = "uniform" if compared["kept"] == "uniform" else "early-exit"
        print(f"auto: trained both flat references ({times}); kept the {kept} build: {compared['why']}")
    if (restarts := restarts_summary(t)) is not None:
        print(restarts)
    for path in result.epoch_dirs:
        print(f"wrote {path}")
    print(f"wrote {result.out_dir}")
    calibration = result.calibration
    if calibration is None:
        if args.calibrate:
            print(
                "verdict: not calibrated (no question/answer forget rows to validate on); serving alpha "
                f"{args.default_alpha if args.default_alpha is not None else 0.75}"
            )
            return 3 if args.strict else 0
        return 0
    print(f"verdict: {calibration.verdict()}")
    if args.default_alpha is not None and args.default_alpha != calibration.alpha:
        print(
            f"note: the manifest keeps your --default-alpha {args.default_alpha:g} "
            f"(calibration picked {calibration.alpha:g})"
        )
    hint = gated_retain_hint(calibration, result.training)
    if hint is not None:
        print(f"note: {hint}")
    if not calibration.met:
        print(
            "the assistant is stored anyway; try the hints above, or serve with a request-level "
            "`unlearning.alpha` after checking answers yourself"
        )
        return 3 if args.strict else 0
    return 0


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
