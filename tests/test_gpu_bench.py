"""`bench/gpu.py --smoke`: the GPU measurement script runs end to end on CPU (so it never rots), with
only torch/transformers/peft/accelerate importable besides this package (as on a bare GPU host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The serving stack's other packages: a GPU host running the bench may not have them.
BLOCKED = ("fastapi", "uvicorn", "starlette", "pydantic", "prometheus_client", "rouge_score", "matplotlib", "openai")

RUNNER = f"""
import runpy, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed on a bare GPU host")
        return None

sys.meta_path.insert(0, Blocker())
sys.argv = ["bench/gpu.py", "--smoke", "--json", sys.argv[1]]
runpy.run_path("bench/gpu.py", run_name="__main__")
"""


def _run_bench(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    """A bench script from the repository root, one torch thread."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_gpu_bench_smoke_runs_with_only_the_ml_stack(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run_bench("-c", RUNNER, str(out), timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    systems = {(r["system"], r["concurrency"]): r for r in rows}
    assert systems[("bandwidth bound", 1)]["decode_tok_s"] > 0
    for c in (1, 4):
        for system in ("unlearn-serve engine", "transformers generate (static cache)"):
            row = systems[(system, c)]
            assert row["decode_tok_s"] > 0 and row["ttft_ms"] > 0 and row["output_tok_s"] > 0, row
        assert ("transformers continuous batching", c) in systems  # measured, or a row saying why not
    uld = [r for r in rows if r["system"].startswith("engine + ULD")]
    assert len(uld) == 2 and all(r["ratio"] and r["ratio_of"] == "x plain engine" for r in uld), uld
    assert systems[("unlearn-serve engine", 1)]["ratio_of"] == "of bound"
    for c in (1, 4):  # the graphed engine (CPU stand-in for the capture) against --enforce-eager
        row = systems[("engine --enforce-eager", c)]
        assert row["decode_tok_s"] > 0 and row["ratio_of"] == "x graphed engine", row
    assert "decode tok/s" in proc.stdout  # the table


def test_gpu_profile_smoke_times_every_batch_composition():
    """`bench/gpu_profile.py --smoke`: the profile script runs on CPU (it never rots) and reports each composition."""
    proc = _run_bench("bench/gpu_profile.py", "--smoke", "--rows", "4", timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    timed = [line for line in proc.stdout.splitlines() if line.startswith("=== ")]
    labels = ["plain, graphs", "plain, --enforce-eager", "ULD all rows", "ULD half the rows"]
    assert [line.split(":")[0][4:] for line in timed] == labels, timed
    assert all(float(line.split(": ")[1].split(" ms/step")[0]) > 0 for line in timed)
    assert "Self CPU" in proc.stdout  # the profiler's tables


def test_gpu_e2e_runs_end_to_end_on_cpu(tmp_path):
    """`bench/gpu_e2e.py --device cpu`: the GPU host's end-to-end script (train-uld, serve with the openai client,
    train-uoe and serve --uoe) runs here too, so it does not rot between GPU sessions; correctness parts asserted
    (every request answered, streamed == non-streamed, the base knows its facts), the unlearning quality is the
    harness's business."""
    out = tmp_path / "e2e"
    proc = _run_bench("bench/gpu_e2e.py", "--device", "cpu", "--dtype", "float32", "--out", str(out), timeout=400)
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-3000:]  # 1: a quality goal missed
    result = json.loads((out / "gpu_e2e.json").read_text())
    steps = result["steps"]
    assert {"base", "train-uld", "serve cpu", "train-uoe", "serve uoe"} <= set(steps), steps
    requests = steps["serve cpu"]["requests"]
    assert requests == len(result["answers"]) and steps["serve cpu"]["streamed_equal"] == requests
    assert steps["serve cpu"]["metrics_lines"] > 0
    assert result["goals"]["base recalls its forget facts"] and result["goals"]["streamed == non-streamed"]
    assert steps["serve uoe"]["base forget"] == steps["serve uoe"]["of"]
    assert "GOALS:" in proc.stdout
