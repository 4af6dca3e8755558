"""Packaging and layering: one installed namespace, imports pointing one way.

* A wheel built from the source tree holds `unlearn_serve/` and its `.dist-info` only, with every module
  of the mapped folders (`server/` -> `unlearn_serve/server/`, `training/` -> `unlearn_serve/training/`),
  the bundled data, and the `unlearn-serve = unlearn_serve.cli:main` console script.
* Installed (non-editable) into a fresh venv, it works from a directory outside the repository:
  `unlearn-serve --version`, `unlearn-serve demo --help`, `import unlearn_serve.server`.
* Layers (an AST scan of every module, lazy imports included): core (`unlearn_serve/*.py`) <- training,
  server <- evaluation <- cli. No module outside `unlearn_serve/cli/` (and `python -m unlearn_serve`'s
  `__main__`) imports the CLI; nothing imports the pre-namespace top-level `server` / `training`.

The wheel is built once per run from a copy of the package sources (so a stale `build/` in the checkout
cannot leak into it): about 5 s, plus about 5 s for the venv checks.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIRS: dict[str, str] = SETUPTOOLS.get("package-dir", {"unlearn_serve": "unlearn_serve"})
TOP = "unlearn_serve"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")


# ------------------------------------------------------------------------------------------- sources


def source_modules() -> dict[str, Path]:
    """Installed module name -> source file, following the package-dir mapping."""
    out: dict[str, Path] = {}
    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: len(kv[0])):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            out[name] = path
    return out


def wheel_path_of(module: str, path: Path) -> str:
    return module.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module or module.name) for every import statement, lazy ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != TOP:
        return "external"
    if len(parts) == 1 or parts[1] in ("__main__",):
        return "entry" if parts[-1] == "__main__" else "core"
    if parts[1] in ("server", "training", "evaluation", "cli"):
        return parts[1]
    return "core"


# may import (besides external packages and itself)
ALLOWED = {
    "core": {"core"},
    "training": {"core", "training"},
    "server": {"core", "server"},
    "evaluation": {"core", "server", "training", "evaluation"},
    "cli": {"core", "server", "training", "evaluation", "cli"},
    "entry": {"core", "cli"},
}


def imported_layer(name: str, known: set[str]) -> str:
    """The layer of an imported name (`unlearn_serve.training.data.load_records` -> training)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in known:
            return layer_of(candidate)
    return layer_of(name)


def test_layering_points_one_way():
    modules = source_modules()
    known = set(modules)
    problems = []
    for module, path in modules.items():
        layer = layer_of(module)
        for line, name in imports_of(module, path):
            if not name.startswith(TOP + ".") and name != TOP:
                continue
            target = imported_layer(name, known)
            if target not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {layer} module {module} imports {name} ({target})")
    assert not problems, "imports must point down (core <- training, server <- evaluation <- cli):\n" + "\n".join(
        sorted(set(problems))
    )


def test_only_the_cli_imports_the_cli():
    problems = []
    for module, path in source_modules().items():
        if module.startswith(f"{TOP}.cli") or module == f"{TOP}.__main__":
            continue
        for line, name in imports_of(module, path):
            if name == f"{TOP}.cli" or name.startswith(f"{TOP}.cli."):
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    assert not problems, "\n".join(problems)


def test_layering_check_is_effective():
    assert layer_of("unlearn_serve.server.engine.engine") == "server"
    assert layer_of("unlearn_serve.artifact") == "core"
    assert layer_of("unlearn_serve.__main__") == "entry"
    known = set(source_modules())
    assert imported_layer("unlearn_serve.training.data.load_records", known) == "training"
    assert "training" not in ALLOWED["server"] and "server" not in ALLOWED["training"]
    assert "cli" not in ALLOWED["core"] | ALLOWED["evaluation"]


def test_nothing_imports_the_old_top_level_packages():
    """`server`, `training`, `evaluation` exist only as unlearn_serve.*: code, tests and bench use those names."""
    old = {"server", "training", "evaluation"}
    files = [p for d in ("unlearn_serve", "server", "training", "tests", "bench") for p in (ROOT / d).rglob("*.py")]
    problems = []
    for path in files:
        if "__pycache__" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] in old:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {name}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a clean copy of what the build reads (pyproject, readme, mapped folders)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    shutil.copy2(ROOT / PYPROJECT["project"]["readme"], src)
    for folder in sorted(set(PACKAGE_DIRS.values())):
        shutil.copytree(ROOT / folder, src / folder, ignore=IGNORE)
    dist = work / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    proc = subprocess.run(
        [*cmd, "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300, check=False, cwd=work
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = dist.glob("*.whl")
    return whl


def wheel_names(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def test_wheel_has_one_top_level_package(wheel):
    top = {name.split("/")[0] for name in wheel_names(wheel)}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("unlearn_serve-")
    assert top - dist_info == {TOP}, f"the wheel installs more than `{TOP}`: {sorted(top - dist_info)}"


def test_wheel_holds_every_module_and_the_data(wheel):
    names = set(wheel_names(wheel))
    for needed in (
        "unlearn_serve/server/engine/engine.py",
        "unlearn_serve/server/unlearning/uld.py",
        "unlearn_serve/training/uld.py",
        "unlearn_serve/evaluation/runner.py",
        "unlearn_serve/cli/__init__.py",
        "unlearn_serve/__main__.py",
    ):
        assert needed in names, f"{needed} is not in the wheel"
    data = sorted(p.name for p in (ROOT / "unlearn_serve" / "data").glob("*.jsonl"))
    assert data, "no bundled data in unlearn_serve/data"
    for name in data:
        assert f"unlearn_serve/data/{name}" in names, f"unlearn_serve/data/{name} is not in the wheel"
    # every source module (a subpackage missing from [tool.setuptools] packages would be dropped silently)
    missing = [
        f"{path.relative_to(ROOT)} -> {wheel_path_of(module, path)}"
        for module, path in source_modules().items()
        if wheel_path_of(module, path) not in names
    ]
    assert not missing, "modules missing from the wheel (add their package to pyproject.toml):\n" + "\n".join(missing)


def test_wheel_entry_point(wheel):
    with zipfile.ZipFile(wheel) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(info).decode()
    section, scripts = None, {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "console_scripts":
            key, value = (s.strip() for s in line.split("=", 1))
            scripts[key] = value
    assert scripts == {"unlearn-serve": "unlearn_serve.cli:main"}, text
    assert PYPROJECT["project"]["scripts"] == {"unlearn-serve": "unlearn_serve.cli:main"}


def test_installed_wheel_works_outside_the_repository(wheel, tmp_path):
    """pip install the wheel (non-editable) into a fresh venv; run it from a directory outside the repo.

    The venv has no pip and no dependencies of its own: a .pth file lends it this environment's
    site-packages (torch, transformers, ...), where an editable install of the checkout is not active
    (.pth files on a path added that way are not processed), so `unlearn_serve` can only come from the wheel.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_lent_dependencies.pth").write_text("\n".join(sorted(lent)) + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # a folder with its own server.py / training.py on sys.path must not shadow anything
    (outside / "server.py").write_text("raise SystemExit('imported the wrong server module')\n")
    (outside / "training.py").write_text("raise SystemExit('imported the wrong training module')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def run(*args: str) -> str:
        p = subprocess.run(list(args), cwd=outside, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert p.returncode == 0, f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}"
        return p.stdout

    script = str(venv / "bin" / "unlearn-serve")
    assert run(script, "--version").strip() == f"unlearn-serve {PYPROJECT['project']['version']}"
    assert "--train-only" in run(script, "demo", "--help")
    assert "--train-only" in run(str(python), "-m", "unlearn_serve", "demo", "--help")
    where = run(
        str(python),
        "-c",
        "import unlearn_serve, unlearn_serve.server, unlearn_serve.server.engine, unlearn_serve.training, "
        "unlearn_serve.evaluation; print(unlearn_serve.__file__)",
    ).strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"imported {where}, not the installed wheel"
