"""Shell commands and links in the Markdown docs, for tests/test_docs.py and tests/test_deploy.py.

* `fenced_blocks(path)`: the fenced code blocks of a Markdown file, with their language and first line.
* `shell_commands(path)`: every simple command of the shell blocks (``bash``, ``sh``, ``shell``,
  ``console``), one logical line at a time: `\\` continuations joined, comments dropped, `$( ... )`
  replaced by one placeholder word, split at `|`, `&&`, `||`, `;`; each with the file line it starts on.
* `unlearn_serve_argv(words)`: the arguments an `unlearn-serve ...`, `python -m unlearn_serve ...` or
  `docker run ... IMAGE ...` command passes to the CLI (the image's ENTRYPOINT is `unlearn-serve`).
* `parse_cli(argv)`: parse with the real parser (`unlearn_serve.cli.build_parser`); returns an error
  message instead of exiting.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the first line inside the fence
    lines: list[str]


def fenced_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    current: Block | None = None
    fence = ""
    indent = 0
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        m = _FENCE.match(raw)
        if current is None:
            if m:
                current, fence, indent = Block(m["lang"].lower(), n + 1, []), m["fence"], len(m["indent"])
            continue
        if m and m["fence"][0] == fence[0] and len(m["fence"]) >= len(fence) and not m["lang"]:
            blocks.append(current)
            current = None
            continue
        current.lines.append(raw[indent:] if not raw[:indent].strip() else raw.lstrip())
    return blocks


def _replace_substitutions(text: str) -> str:
    """`$( ... )` (nested, quote-aware) and backquoted commands -> the word SUBST."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$(", i) and not text.startswith("$((", i):
            depth, j, quote = 1, i + 2, ""
            while j < len(text) and depth:
                c = text[j]
                if quote:
                    if c == quote:
                        quote = ""
                elif c in "'\"":
                    quote = c
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                j += 1
            out.append("SUBST")
            i = j
        else:
            out.append(text[i])
            i += 1
    return re.sub(r"`[^`]*`", "SUBST", "".join(out))


def _split_simple(line: str) -> list[list[str]]:
    lexer = shlex.shlex(_replace_substitutions(line), posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
            continue
        if token and set(token) <= set(";&|"):
            commands.append([])
        elif token and set(token) <= set("<>&"):
            skip_next = True  # a redirection and its target
            if commands[-1] and commands[-1][-1].isdigit():
                commands[-1].pop()  # 2> file
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def shell_commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line, words) for every simple command in the shell blocks of a Markdown file."""
    out: list[tuple[int, list[str]]] = []
    for block in fenced_blocks(path):
        if block.lang not in SHELL_LANGS:
            continue
        logical, start = "", 0
        for k, raw in enumerate(block.lines):
            line = raw
            if block.lang == "console":
                if not logical:
                    if not line.startswith("$ "):
                        continue  # output
                    line = line[2:]
            if not logical:
                start = block.line + k
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical += line
            try:
                commands = _split_simple(logical)
            except ValueError as exc:  # a quote still open: the string goes on on the next line
                if k + 1 < len(block.lines):
                    logical += "\n"
                    continue
                raise ValueError(f"{path}:{start}: cannot split shell line ({exc}): {logical}") from None
            out.extend((start, words) for words in commands)
            logical = ""
    return out


_ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_IMAGE = re.compile(r"^unlearn-serve(:[^\s]+)?$")


def unlearn_serve_argv(words: list[str]) -> list[str] | None:
    """The CLI arguments of a command that runs unlearn-serve, else None."""
    i = 0
    while i < len(words) and _ENV_ASSIGN.match(words[i]):
        i += 1
    words = words[i:]
    if not words:
        return None
    prog = words[0].rsplit("/", 1)[-1]
    if prog == "unlearn-serve":
        return words[1:]
    if re.fullmatch(r"python3?(\.\d+)?", prog) and words[1:3] in (["-m", "unlearn_serve"], ["-m", "unlearn_serve.cli"]):
        return words[3:]
    if prog == "docker" and len(words) > 1 and words[1] == "run":
        for k, word in enumerate(words[2:], start=2):
            if _IMAGE.match(word) and ":" in word:
                return words[k + 1 :]
    return None


@cache
def cli_parser(subcommand: str | None) -> argparse.ArgumentParser:
    from unlearn_serve.cli import build_parser

    return build_parser(subcommand)


def subparser(subcommand: str) -> argparse.ArgumentParser:
    parser = cli_parser(subcommand)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[subcommand]


def parse_cli(argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """Parse `unlearn-serve ARGV` with the real parser. Returns (namespace, None) or (None, error)."""
    from unlearn_serve.cli import COMMANDS

    command = next((a for a in argv if a in COMMANDS), None)
    parser = cli_parser(command)
    if command is not None and subparser(command).get_default("_module") is None:
        return None, f"the `{command}` subcommand could not be imported"
    if command is not None:  # exact option names only (argparse would accept abbreviations)
        options = subparser(command)._option_string_actions
        for word in argv[argv.index(command) + 1 :]:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag != "--" and flag not in options:
                return None, f"`unlearn-serve {command}` has no option {flag}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(argv), None
        except SystemExit as exc:
            if exc.code == 0 and ({"--help", "-h", "--version"} & set(argv)):
                return argparse.Namespace(command=command), None
            return None, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"


def cli_commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line, argv) for every command in the file's shell blocks that runs unlearn-serve."""
    out = []
    for line, words in shell_commands(path):
        argv = unlearn_serve_argv(words)
        if argv is not None:
            out.append((line, argv))
    return out
