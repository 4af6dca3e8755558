"""The CLI dispatcher: fast top-level help/version, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import contextlib, io, sys
from unlearn_serve.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main({argv!r})
    except SystemExit:
        pass
print(out.getvalue().strip().splitlines()[0])
print("torch" in sys.modules)
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["make-tiny-moe-facts", "--help"]])
def test_top_level_help_and_version_do_not_import_torch(argv):
    # `unlearn-serve --help` must not pay for torch/transformers imports of every subcommand.
    res = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first, torch_loaded = res.stdout.strip().splitlines()[-2:]
    assert first.startswith(("unlearn-serve ", "usage: unlearn-serve"))
    assert torch_loaded == "False"


def test_unknown_command_is_a_one_line_usage_error():
    res = subprocess.run([sys.executable, "-m", "unlearn_serve", "bogus"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "invalid choice: 'bogus'" in res.stderr and "Traceback" not in res.stderr
