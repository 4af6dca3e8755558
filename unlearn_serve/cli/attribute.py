"""`unlearn-serve attribute`: rank MoE experts by router affinity to the forget data."""

from __future__ import annotations

import argparse

from unlearn_serve.cli.uoe_common import add_data_options, add_model_options


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--forget", required=True, help="forget set, JSON Lines (text / question+answer / messages)")
    parser.add_argument("--retain", help="retain set, JSON Lines: adds retain affinities to the table")
    parser.add_argument(
        "--contrast", action="store_true", help="also rank by forget minus retain affinity (needs --retain)"
    )
    parser.add_argument("--top", type=int, default=10, help="rows of each ranking to show (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the rankings as JSON instead of a table")
    add_data_options(parser)


def run(args: argparse.Namespace) -> int:
    import json

    from unlearn_serve.cli import CliError
    from unlearn_serve.cli.uoe_common import load_moe_model
    from unlearn_serve.training.data import load_records
    from unlearn_serve.training.uoe_attribution import attribute, format_table

    if args.top < 1 or args.batch_size < 1 or args.max_length < 1:
        raise CliError("--top, --batch-size and --max-length must be >= 1")
    if args.contrast and not args.retain:
        raise CliError("--contrast needs --retain")
    forget = load_records(args.forget)
    retain = load_records(args.retain) if args.retain else None
    model, tokenizer, _ = load_moe_model(args)
    try:
        result = attribute(
            model,
            tokenizer,
            forget,
            retain,
            contrast=args.contrast,
            max_length=args.max_length,
            question_template=args.question_template,
            batch_size=args.batch_size,
            progress=args.progress,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(result.to_dict(top=args.top), indent=2))
        return 0
    print(format_table(result, "forget", args.top))
    if "contrast" in result.rankings:
        print()
        print(format_table(result, "contrast", args.top))
        c_layer, c_expert = result.top1("contrast")
        print(f"contrast top-1: layer {c_layer}, expert {c_expert}")
    layer, expert = result.top1("forget")
    print(f"pick (forget affinity top-1): layer {layer}, expert {expert}")
    print(f"next: unlearn-serve train-uoe --layer {layer} --expert {expert} ...")
    return 0
