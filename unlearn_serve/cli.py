"""`unlearn-serve` command line: one subcommand per module, each with `configure(parser)` and `run(args)`.

Command modules keep heavy imports (torch, transformers) inside `run` so `--help` stays fast.
A `CliError` (or an ArtifactError / DataError raised by a command) is printed as one clear line
on stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module implementing configure(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.cli_serve", "Serve a model (and unlearning artifacts) over an OpenAI-compatible API."),
    "demo": ("server.demo", "Train (once, cached) and serve the SmolLM2 forget-a-topic demo."),
    "train-uld": ("training.uld_cli", "Train a ULD assistant (LoRA on the first K layers)."),
    "attribute": ("training.uoe_cli_attribute", "Rank MoE experts by router affinity to forget data."),
    "train-uoe": ("training.uoe_cli_train", "Unlearn one MoE expert; write an expert patch."),
    "export": ("training.uoe_cli_export", "Merge an expert patch into a full Hugging Face checkpoint."),
    "eval": ("training.eval_cli", "TOFU metrics for a base model and its unlearning artifacts."),
    "train-baseline": ("training.baselines_cli", "Whole-model GA / GD / NPO unlearning baselines."),
    "make-tiny": ("unlearn_serve.tiny_cli", "Write a tiny random model + tokenizer of a given family."),
    "make-tiny-moe-facts": ("training.uoe_tiny_facts", "Write a tiny MoE that knows six facts + forget/retain sets."),
}


class CliError(Exception):
    """A user error: printed without a traceback, exit code 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from unlearn_serve.artifact import ArtifactError

    types: list[type[BaseException]] = [CliError, ArtifactError]
    try:
        from training.data import DataError

        types.append(DataError)
    except ImportError:
        pass
    return tuple(types)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn-serve", description=__doc__.splitlines()[0])
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
    only = next((a for a in argv if a in COMMANDS), None)
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
    except _user_error_types() as exc:
        print(f"unlearn-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as `python -m unlearn_serve.cli`, this module is __main__; commands raise
    # unlearn_serve.cli.CliError, so dispatch through the imported module to catch it.
    from unlearn_serve.cli import main as _main

    sys.exit(_main())
