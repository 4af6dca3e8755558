"""GPU end to end: a tiny memorising model unlearned by `train-uld` on the GPU and served on CUDA, one table out.

    python bench/gpu_e2e.py                                  # on a GPU host: about 3 minutes (H200: the ULD part 140 s)
    python bench/gpu_e2e.py --device cpu --dtype float32     # the same steps on CPU (no graphs; the suite runs it)

What a user does, step by step, each step timed and printed as it ends:
  1. the tiny memorising Llama of `bench/uld_quality.py` (its base fitted on the CPU once, cached): recalls its facts;
  2. `unlearn-serve train-uld` with its defaults (on the GPU where there is one: bf16 where supported), its verdict;
  3. `unlearn-serve serve --device DEVICE --dtype DTYPE --uld forget=...` (CUDA graphs on), queried with the
     official `openai` client: every forget question (and its paraphrase) and retain question, asked to the base and
     to the unlearned model, 32 at a time (base and unlearned rows mixed in one batch), greedy; then each streamed
     and compared with the non-streamed text;
  4. on CUDA: the same server with `--enforce-eager` (no CUDA graphs): its answers compared with the graphed ones;
  5. on CUDA: the server on the CPU in float32: its answers compared (bf16 on the GPU vs fp32 on the CPU).
Goals printed at the end: the base recalls its forget facts; unlearned forget leak <= 10% (questions and
paraphrases, pooled); retain >= 95% of the base; streamed == non-streamed; graphed == eager.
Exit code 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from throughput import Server as ServerSpec  # noqa: E402
from throughput import free_port, start, stop  # noqa: E402

MAX_TOKENS = 16


def cli(*argv: str) -> list[str]:
    # -P: the working directory (the checkout, whose unlearn_serve/ is not the installed package) not on sys.path
    return [sys.executable, "-P", "-m", "unlearn_serve", *argv]


@contextmanager
def serving(argv: list[str], log: Path) -> Iterator[tuple[str, float]]:
    """`unlearn-serve serve ARGV` on 127.0.0.1 (bench/throughput.py's start / stop): (its URL, seconds to ready)."""
    port = free_port()
    spec = ServerSpec("unlearn-serve", cli("serve", *argv, "--host", "127.0.0.1", "--port", str(port)), port,
                      "/ready", "base", {})  # fmt: skip
    started = time.monotonic()
    proc = start(spec, dict(os.environ), log, timeout=240)
    try:
        yield f"http://127.0.0.1:{port}", time.monotonic() - started
    finally:
        stop(proc)


def ask_all(url: str, jobs: list[tuple[str, str]], stream: bool = False, workers: int = 32) -> list[str]:
    """Greedy chat answers of (model, question) jobs, `workers` at a time, with the official openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def one(job: tuple[str, str]) -> str:
        model, question = job
        messages = [{"role": "user", "content": question}]
        if not stream:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
            return reply.choices[0].message.content or ""
        parts = []
        for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, help="write logs and answers (JSON) here (default: a temporary dir)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import importlib

    import torch

    # the installed package first: uld_quality puts the checkout on sys.path, whose unlearn_serve/ lacks training/
    importlib.import_module("unlearn_serve.training")
    from uld_quality import names, tiny_suite

    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU host, or use --device cpu --dtype float32", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-e2e-work-"))
    print(f"device {torch.cuda.get_device_name() if on_cuda else 'CPU'}; torch {torch.__version__}; {args.dtype}")
    results: dict = {"device": args.device, "dtype": args.dtype, "steps": {}}

    def step(name: str, started: float, **fields) -> None:
        results["steps"][name] = {"seconds": round(time.monotonic() - started, 1), **fields}
        print(f"[{name}] {results['steps'][name]}", flush=True)

    # 1. the base
    started = time.monotonic()
    suite = tiny_suite("llama")
    model, tokenizer = suite.model_loader()
    base = work / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    del model
    step("base", started, model=suite.name)
    for kind, records in (("forget", suite.forget_records), ("retain", suite.retain_records)):
        (work / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def run_cli(tag: str, *argv: str) -> str | None:
        """One `unlearn-serve` command, on the GPU when there is one; its output (None: it failed, printed)."""
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") if on_cuda else ""}
        proc = subprocess.run(cli(*argv), capture_output=True, text=True, env=env)
        (out / f"{tag}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"{tag}: exit code {proc.returncode}", proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            return None
        return proc.stdout + proc.stderr

    def verdict_of(log: str) -> list[str]:
        lines = log.splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("verdict")), len(lines))
        return [line.strip() for line in lines[first : first + 5]]

    # 2. train-uld with its defaults
    started = time.monotonic()
    uld = work / "uld"
    log = run_cli("train-uld", "train-uld", "--model", str(base), "--forget", str(work / "forget.jsonl"),
                  "--retain", str(work / "retain.jsonl"), "--out", str(uld), "--no-progress")  # fmt: skip
    if log is None:
        print("\nGOALS: MISSED: train-uld failed (its output above and in train-uld.log); nothing was served")
        return 1
    from unlearn_serve.artifact import MANIFEST_NAME

    manifest = json.loads((uld / MANIFEST_NAME).read_text())
    step("train-uld", started, defaults=manifest.get("defaults"), verdict=verdict_of(log)[:1])

    # 3. serve and ask
    questions = [c.question for c in suite.forget_checks] + [c.paraphrase for c in suite.forget_checks]
    questions += [c.question for c in suite.retain_checks]
    jobs = [(model_name, q) for q in questions for model_name in ("base", "forget")]  # base and unlearned interleaved

    def serve_and_ask(tag: str, device: str, dtype: str, *extra: str, stream_check: bool = False) -> list[str]:
        started = time.monotonic()
        with serving(
            ["--model", str(base), "--served-model-name", "base", "--device", device, "--dtype", dtype, "--uld",
             f"forget={uld}", "--max-num-seqs", "32", "--max-model-len", "256", *extra],
            out / f"serve-{tag}.log",
        ) as (url, start_s):  # fmt: skip
            answers = ask_all(url, jobs)
            fields: dict = {"server_start_s": round(start_s, 1), "requests": len(jobs)}
            if stream_check:
                streamed = ask_all(url, jobs, stream=True)
                fields["streamed_equal"] = sum(a == b for a, b in zip(answers, streamed, strict=True))
            metrics = httpx.get(url + "/metrics", timeout=10).text
            fields["metrics_lines"] = sum(1 for line in metrics.splitlines() if line.startswith("unlearn:"))
        step(f"serve {tag}", started, **fields)
        return answers

    graphed = serve_and_ask(args.device, args.device, args.dtype, stream_check=True)
    by_job = dict(zip(jobs, graphed, strict=True))
    n_f = len(suite.forget_checks)

    def rate(model_name: str, checks, question_of) -> tuple[int, int]:
        hits = sum(names(by_job[(model_name, question_of(c))], c) for c in checks)
        return hits, len(checks)

    base_recall = rate("base", suite.forget_checks, lambda c: c.question)
    leak_orig = rate("forget", suite.forget_checks, lambda c: c.question)
    leak_para = rate("forget", suite.forget_checks, lambda c: c.paraphrase)
    base_retain = rate("base", suite.retain_checks, lambda c: c.question)
    kept = rate("forget", suite.retain_checks, lambda c: c.question)
    results["quality"] = dict(
        base_recall=base_recall, leak_orig=leak_orig, leak_para=leak_para, base_retain=base_retain, retain_kept=kept
    )
    streamed_equal = results["steps"][f"serve {args.device}"]["streamed_equal"]
    goals = {
        "base recalls its forget facts": base_recall[0] >= 0.9 * n_f,
        # pooled over both wordings, as bench/uld_quality.py's goal for the tiny models
        "forget leak <= 10% (questions + paraphrases)": leak_orig[0] + leak_para[0] <= 0.1 * 2 * n_f,
        "retain >= 95% of base": kept[0] >= 0.95 * base_retain[0],
        "streamed == non-streamed": streamed_equal == len(jobs),
    }
    results["goals"] = goals
    results["answers"] = [{"model": m, "question": q, "answer": a} for (m, q), a in zip(jobs, graphed, strict=True)]

    def save() -> None:  # after every part: a run cut short (a host's time limit) keeps what it measured
        (out / "gpu_e2e.json").write_text(json.dumps(results, indent=1))

    save()
    print(f"\nULD quality ({args.device}, {args.dtype}; greedy, {MAX_TOKENS} tokens):")
    print(
        f"  base recalls {base_recall[0]}/{base_recall[1]} forget facts, "
        f"answers {base_retain[0]}/{base_retain[1]} retain"
    )
    print(
        f"  unlearned: leaks {leak_orig[0]}/{n_f} (questions) {leak_para[0]}/{n_f} (paraphrases), "
        f"keeps {kept[0]}/{kept[1]}"
    )
    print(f"  streamed == non-streamed: {streamed_equal}/{len(jobs)}")
    for q, a in list(by_job.items())[: 2 * n_f : 2]:
        print(f"  {q[1]!r}: base {a!r} | unlearned {by_job[('forget', q[1])]!r}")
    print(flush=True)
    if on_cuda:
        eager = serve_and_ask("eager", args.device, args.dtype, "--enforce-eager")
        same = sum(a == b for a, b in zip(graphed, eager, strict=True))
        results["graphed_equal_eager"] = same
        goals["graphed == eager"] = same == len(jobs)
        print(f"  graphed == eager: {same}/{len(jobs)}", flush=True)
        cpu = serve_and_ask("cpu-fp32", "cpu", "float32")
        results["gpu_equal_cpu_fp32"] = sum(a == b for a, b in zip(graphed, cpu, strict=True))
        print(f"  GPU {args.dtype} == CPU float32: {results['gpu_equal_cpu_fp32']}/{len(jobs)} (informative; no goal)")
        save()
    # 6. UOE: a tiny MoE that knows six facts, its one-expert patch trained with the defaults, served
    started = time.monotonic()
    moe = work / "moe"
    log = run_cli("make-tiny-moe-facts", "make-tiny-moe-facts", "--out", str(moe))
    log = log and run_cli("train-uoe", "train-uoe", "--model", str(moe / "model"), "--forget",
                          str(moe / "forget.jsonl"), "--retain", str(moe / "retain.jsonl"), "--out",
                          str(moe / "uoe"), "--no-progress")  # fmt: skip
    if log is None:
        goals["UOE patch trained"] = False
    else:
        step("train-uoe", started, verdict=verdict_of(log))
        records = {
            kind: [json.loads(line) for line in (moe / f"{kind}.jsonl").read_text().splitlines()]
            for kind in ("forget", "retain")
        }
        started = time.monotonic()
        with serving(
            ["--model", str(moe / "model"), "--served-model-name", "base", "--device", args.device, "--dtype",
             args.dtype, "--uoe", f"forget={moe / 'uoe'}", "--max-num-seqs", "32", "--max-model-len", "128"],
            out / "serve-uoe.log",
        ) as (url, _):  # fmt: skip
            moe_jobs = [
                (m, r["question"]) for kind in ("forget", "retain") for r in records[kind] for m in ("base", "forget")
            ]
            moe_answers = dict(zip(moe_jobs, ask_all(url, moe_jobs), strict=True))

        def recalled(model_name: str, kind: str) -> int:  # the answer's last word ("green") in the reply
            return sum(
                r["answer"].rstrip(".").split()[-1].lower() in moe_answers[(model_name, r["question"])].lower()
                for r in records[kind]
            )

        uoe = {f"{m} {k}": recalled(m, k) for m in ("base", "forget") for k in ("forget", "retain")}
        step("serve uoe", started, **uoe, of=len(records["forget"]))
        results["uoe"] = uoe
        goals["UOE: forget recall <= 10%"] = uoe["forget forget"] <= 0.1 * len(records["forget"])
        goals["UOE: retain >= 95% of base"] = uoe["forget retain"] >= 0.95 * uoe["base retain"]
        goals["UOE: the base recalls its forget facts"] = uoe["base forget"] == len(records["forget"])
    save()
    missed = [g for g, ok in goals.items() if not ok]
    print("\nGOALS: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 0 if not missed else 1


if __name__ == "__main__":
    raise SystemExit(main())
