"""`unlearn-serve` command line: one subcommand per module, each with `configure(parser)` and `run(args)`.

Command modules keep heavy imports (torch, transformers) inside `run` so `--help` stays fast.
A `CliError` (or an ArtifactError / DataError raised by a command) is printed as one clear line
on stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from unlearn_serve.errors import UnlearnServeError

# subcommand -> module implementing configure(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("unlearn_serve.cli.serve", "Serve a model (and unlearning artifacts) over an OpenAI-compatible API."),
    "demo": ("unlearn_serve.cli.demo", "Train (once, cached) and serve the SmolLM2 forget-a-topic demo."),
    "train-uld": ("unlearn_serve.cli.train_uld", "Train a ULD assistant (LoRA on the first K layers)."),
    "attribute": ("unlearn_serve.cli.attribute", "Rank MoE experts by router affinity to forget data."),
    "train-uoe": ("unlearn_serve.cli.train_uoe", "Unlearn one MoE expert; write an expert patch."),
    "export": ("unlearn_serve.cli.export", "Merge an expert patch into a full Hugging Face checkpoint."),
    "eval": ("unlearn_serve.cli.eval", "TOFU metrics for a base model and its unlearning artifacts."),
    "train-baseline": ("unlearn_serve.cli.train_baseline", "Whole-model GA / GD / NPO unlearning baselines."),
    "make-tiny": ("unlearn_serve.cli.make_tiny", "Write a tiny random model + tokenizer of a given family."),
    "make-tiny-moe-facts": (
        "unlearn_serve.cli.make_tiny_moe_facts",
        "Write a tiny MoE that knows six facts, plus forget/retain sets.",
    ),
}


DESCRIPTION = "Inference-time unlearning server for LLMs (ULD assistants, UOE expert patches)."


class CliError(UnlearnServeError):
    """A bad command line: printed without a traceback, exit code 2."""


def parse_named_dirs(values: list[str], flag: str, must_exist: bool = False) -> list[tuple[str, Path]]:
    """`NAME=DIR` flag values (--uld, --uoe, --compare) as (name, path); names unique."""
    pairs: list[tuple[str, Path]] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise CliError(f"{flag} {value!r}: expected NAME=DIR")
        if must_exist and not Path(path).is_dir():
            raise CliError(f"{flag} {value}: {path} is not a directory")
        pairs.append((name, Path(path)))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise CliError(f"{flag}: names must be unique")
    return pairs


NO_COMMAND = ""  # build_parser(NO_COMMAND): the top-level parser only, no subcommand module imported


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; `only` configures just that subcommand (None: all of them, which imports them all)."""
    from unlearn_serve import __version__

    parser = argparse.ArgumentParser(prog="unlearn-serve", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"unlearn-serve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and module_name.startswith(exc.name):
                    sp.set_defaults(_module=None)
                    continue
                raise
            module.configure(sp)
            sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Configure only the command asked for: `--help`/`--version` and each command stay fast, since a
    # command module may import torch when it configures its flags.
    only = next((a for a in argv if a in COMMANDS), NO_COMMAND)
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = getattr(args, "_module", None)
    if module is None:
        print(f"unlearn-serve: command {args.command!r} is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except UnlearnServeError as exc:
        print(f"unlearn-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
