"""Options and model loading shared by the UOE commands (attribute, train-uoe, export)."""

from __future__ import annotations

import argparse


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="MoE base model: Hugging Face hub id or local directory")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a capable GPU, else fp32), fp32, bf16, fp16")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1")
    parser.add_argument("--gguf-file", help="GGUF file inside --model to load (dequantized; needs `gguf`)")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    from unlearn_serve.training.data import DEFAULT_QUESTION_TEMPLATE

    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (truncated on the right)")
    parser.add_argument(
        "--question-template",
        default=DEFAULT_QUESTION_TEMPLATE,
        help="QA prompt when the tokenizer has no chat template (default: %(default)r)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def load_moe_model(args: argparse.Namespace):
    """(model, tokenizer, family) or a CliError naming the model when it is not a supported MoE."""
    from unlearn_serve.cli import CliError
    from unlearn_serve.families import NotMoEError, get_family
    from unlearn_serve.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device
    )
    try:
        family = get_family(model)
    except NotMoEError as exc:
        raise CliError(f"{args.model}: {exc}") from None
    return model, tokenizer, family
