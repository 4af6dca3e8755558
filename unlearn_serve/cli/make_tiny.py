"""`unlearn-serve make-tiny`: write a tiny random model of a family (for docs, tests and benchmarks)."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from unlearn_serve.tiny import FAMILIES

    parser.add_argument("--family", default="llama", choices=FAMILIES)
    parser.add_argument("--out", required=True, help="output directory (Hugging Face layout)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--corpus", help="text file to train the tokenizer on (default: a built-in corpus)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from unlearn_serve.cli import CliError
    from unlearn_serve.tiny import build_tiny_model, save_tiny, train_tokenizer

    if args.hidden_size < 4 or args.hidden_size % 4:
        raise CliError(f"--hidden-size {args.hidden_size}: must be a positive multiple of 4 (the attention heads)")
    if args.layers < 1 or args.vocab_size < 1:
        raise CliError("--layers and --vocab-size must be 1 or more")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out}: is a file, not a directory")
    texts = None
    if args.corpus:
        try:
            with open(args.corpus, encoding="utf-8") as f:
                texts = [line for line in f if line.strip()]
        except OSError as exc:
            raise CliError(f"{args.corpus}: cannot read corpus ({exc.strerror})") from None
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
    model = build_tiny_model(
        args.family, tokenizer, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers
    )
    out = save_tiny(model, tokenizer, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote tiny {args.family} ({n:,} parameters) to {out}")
    return 0
