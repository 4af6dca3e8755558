"""`unlearn-serve eval`: TOFU metrics for a model and its unlearning artifacts, through the serving engine."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from unlearn_serve.evaluation.attacks import ATTACKS
    from unlearn_serve.evaluation.runner import MAX_NEW_TOKENS, ULD_EVAL_OPTIONS
    from unlearn_serve.training.data import DEFAULT_QUESTION_TEMPLATE

    parser.add_argument("--model", required=True, help="base (target) model: hub id or local directory")
    parser.add_argument("--uld", action="append", default=[], metavar="NAME=DIR", help="a ULD artifact (repeatable)")
    parser.add_argument("--uoe", action="append", default=[], metavar="NAME=DIR", help="a UOE patch (repeatable)")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another whole model to evaluate alongside, e.g. a train-baseline output (repeatable)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="DIR|SPLIT=FILE",
        help="a TOFU directory, or forget=F [retain=F real_authors=F world_facts=F] perturbed files",
    )
    parser.add_argument(
        "--forget-split", default="forget10", help="forget file of a TOFU directory (default: %(default)s)"
    )
    parser.add_argument("--retain-reference", help="metrics.json of the retain-only model (for forget quality)")
    parser.add_argument("--alpha", help="ULD alphas to sweep, comma-separated (default: the artifact's alpha)")
    parser.add_argument(
        "--uld-options",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="score every ULD artifact and alpha with these settings instead of the manifest's (keys: "
        + ", ".join(ULD_EVAL_OPTIONS)
        + "); repeatable, one set of rows per use, e.g. --uld-options margin=0 --uld-options floor=1",
    )
    parser.add_argument("--out", required=True, help="report directory (metrics.json, report.md, PNG plots)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions of each split")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--question-template", default=DEFAULT_QUESTION_TEMPLATE)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="engine batch size")
    parser.add_argument(
        "--attacks",
        default="all",
        help="attacks on every method row, comma-separated, 'all' (default) or 'none': "
        + ", ".join(ATTACKS) + " (quant8/quant4 on UOE rows only)",
    )
    parser.add_argument("--relearn-k", type=int, default=3, help="in-context relearning: QA pairs shown (default 3)")
    parser.add_argument(
        "--subject-size", type=int, default=20,
        help="relearning subjects when records have no subject/author field: blocks of N consecutive forget "
        "questions (default 20, TOFU's questions per author; 0: all one subject)",
    )
    parser.add_argument(
        "--sample-n", type=int, default=20,
        help="sampling attack: answers sampled per forget question at temperature 1 (default 20)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def parse_uld_options(texts: list[str]) -> list[dict]:
    from unlearn_serve.cli import CliError
    from unlearn_serve.evaluation.runner import parse_uld_options as parse

    try:
        return parse(texts)
    except ValueError as exc:
        raise CliError(f"--uld-options {exc}") from None


def parse_alphas(text: str | None) -> list[float] | None:
    from unlearn_serve.cli import CliError

    if text is None:
        return None
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise CliError(f"--alpha {text!r}: write numbers separated by commas, e.g. 0,0.25,0.5,0.75,1") from None
    if not alphas or any(a != a or a in (float("inf"), float("-inf")) for a in alphas):
        raise CliError(f"--alpha {text!r}: need at least one finite number")
    return alphas


def parse_attacks(args: argparse.Namespace):
    from unlearn_serve.cli import CliError
    from unlearn_serve.evaluation.attacks import ATTACKS, AttackConfig

    text = args.attacks.strip()
    if text == "none":
        return None
    names = ATTACKS if text == "all" else tuple(a.strip() for a in text.split(",") if a.strip())
    try:
        return AttackConfig(
            attacks=names, relearn_k=args.relearn_k, subject_size=args.subject_size, sample_n=args.sample_n
        )
    except ValueError as exc:
        raise CliError(f"--attacks/--relearn-k/--subject-size/--sample-n: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from unlearn_serve.cli import CliError, parse_named_dirs
    from unlearn_serve.evaluation import runner as E

    if args.max_new_tokens < 1 or args.max_num_seqs < 1 or (args.limit is not None and args.limit < 1):
        raise CliError("--max-new-tokens, --max-num-seqs and --limit must be >= 1")
    ulds = parse_named_dirs(args.uld, "--uld", must_exist=True)
    uoes = parse_named_dirs(args.uoe, "--uoe", must_exist=True)
    compares = parse_named_dirs(args.compare, "--compare", must_exist=True)
    alphas = parse_alphas(args.alpha)
    option_sets = parse_uld_options(args.uld_options) or [{}]
    attack_config = parse_attacks(args)
    files = E.resolve_data(args.data, args.forget_split)
    data = E.load_eval_data(files, args.limit)
    reference = E.load_reference(args.retain_reference) if args.retain_reference else None

    from unlearn_serve.loading import load_model_and_tokenizer
    from unlearn_serve.server.engine.engine import Engine, EngineConfig

    config = EngineConfig(max_num_seqs=args.max_num_seqs)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(model, tokenizer, config, model_name=args.model)
    methods = [E.Method("base", "base")]
    for name, path in ulds:
        engine.load_uld(name, path)
        for options in option_sets:
            try:  # a bad value is refused before any scoring, naming the option
                engine.resolve(E.Method(name, "uld", name, None, options).selection(scoring=False))
            except ValueError as exc:
                raise CliError(f"--uld-options {E.options_label(options)}: {exc}") from None
            for alpha in alphas or [None]:
                label = " ".join(
                    p for p in (name, None if alpha is None else f"α={alpha:g}", E.options_label(options)) if p
                )
                methods.append(E.Method(label, "uld", name, alpha, options))
    for name, path in uoes:
        engine.load_uoe(name, path)
        methods.append(E.Method(name, "uoe", name))
    extra = []
    for name, path in compares:
        other_model, other_tok = load_model_and_tokenizer(str(path), dtype=args.dtype, device=args.device)
        if other_tok.get_vocab() != tokenizer.get_vocab():
            raise CliError(f"--compare {name}: its tokenizer differs from --model's; fluency needs the same one")
        extra.append((E.Method(name, "model"), Engine(other_model, other_tok, config, model_name=name)))

    eval_config = E.EvalConfig(args.max_new_tokens, args.question_template, args.progress, attack_config)
    metrics = E.evaluate(engine, methods, data, eval_config, reference, extra)
    written = E.write_outputs(args.out, metrics)
    from unlearn_serve.evaluation.report import attack_columns, attack_findings, summary_table

    rows = [(m["label"], m["summary"]) for m in metrics["methods"]]
    print(summary_table(rows))
    if attack_columns(metrics["methods"]):
        print()
        print(summary_table(rows, attack_columns(metrics["methods"])))
        for line in attack_findings(metrics["methods"]):
            print(line.replace("**", ""))
    print(f"wrote {written.metrics}, {written.report}, " + ", ".join(str(p) for p in written.plots))
    return 0
