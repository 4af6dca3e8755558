"""Load test: N concurrent streaming completions against a real `unlearn-serve serve` process on loopback.

    python bench/load.py                          # 256 concurrent streams x 32 tokens, 3 rounds, tiny model
    python bench/load.py --concurrency 512 --rounds 5 --max-tokens 64
    python bench/load.py --model DIR              # any local model directory

Starts the server as a subprocess (so its resident memory is its own), warms it up (the slot KV cache is
allocated on first use), records its RSS, then fires `--rounds` rounds of `--concurrency` concurrent
streaming requests — a bounded loop, every request on 127.0.0.1 — and checks:
  * 0 errors: every stream returns 200, ends with `data: [DONE]`, and its final usage counts the asked tokens;
  * the server's RSS after each round is within 10% of the pre-load value (no per-request leak);
  * the server is idle afterwards (running and waiting gauges 0 on /metrics).
Prints the figures (and exits 1 if a check fails). With more streams than `--max-num-seqs`, the rest wait in the
server's queue (`--max-queue` is set to the concurrency so none is refused).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from unlearn_serve.testing import free_port

READY_TIMEOUT_S = 300
RSS_TOLERANCE = 0.10


def build_tiny(out: Path) -> Path:
    from unlearn_serve.tiny import build_tiny_model, save_tiny, train_tokenizer

    tokenizer = train_tokenizer()
    model = build_tiny_model("llama", tokenizer, seed=0)
    return save_tiny(model, tokenizer, out)



@dataclass
class Round:
    wall_s: float = 0.0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    peak_rss: int = 0
    rss_after: int = 0


async def one_stream(client: httpx.AsyncClient, url: str, body: dict, result: Round) -> None:
    started = time.monotonic()
    first = None
    usage = None
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.errors.append(f"stream error: {event['error']}")
                    return
                if first is None and any(c.get("text") for c in event.get("choices", [])):
                    first = time.monotonic() - started
                if event.get("usage"):
                    usage = event["usage"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if not done or usage is None or usage["completion_tokens"] != body["max_tokens"]:
        result.errors.append(f"incomplete stream (done={done}, usage={usage})")
        return
    result.ok += 1
    result.tokens += usage["completion_tokens"]
    if first is not None:
        result.ttft_s.append(first)


async def run_round(url: str, proc: psutil.Process, concurrency: int, max_tokens: int) -> Round:
    result = Round()
    body = {
        "model": "load", "prompt": "The capital of France is", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sampling = True

    async def sample_rss() -> None:
        while sampling:
            result.peak_rss = max(result.peak_rss, proc.memory_info().rss)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample_rss())
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as client:
        await asyncio.gather(*(one_stream(client, url, body, result) for _ in range(concurrency)))
    result.wall_s = time.monotonic() - started
    sampling = False
    await sampler
    return result


def gauge(url: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{url}/metrics", timeout=10).text, re.M)
    return float(m.group(1)) if m else float("nan")


def settle_rss(proc: psutil.Process, seconds: float = 2.0) -> int:
    """RSS once the server is idle (a short wait lets finished requests' buffers be freed)."""
    time.sleep(seconds)
    return proc.memory_info().rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local model directory (default: a tiny random Llama)")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server (OMP_NUM_THREADS)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="unlearn-load-")
    model = Path(args.model) if args.model else build_tiny(Path(tmp.name) / "model")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "unlearn_serve.cli", "serve", "--model", str(model), "--served-model-name", "load",
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
        "--max-queue", str(args.concurrency), "--max-model-len", "256", "--log-level", "warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "UNLEARN_API_KEY": ""}
    log = Path(tmp.name) / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    failed: list[str] = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if server.poll() is not None:
                print(log.read_text(), file=sys.stderr)
                return 2
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        proc = psutil.Process(server.pid)
        # warm-up: allocates the KV cache and the batch buffers for a full batch
        warm = asyncio.run(run_round(url, proc, args.max_num_seqs, args.max_tokens))
        if warm.errors:
            failed.append(f"warm-up errors: {warm.errors[:3]}")
        rss0 = settle_rss(proc)
        print(f"server: pid {server.pid}, {args.threads} torch thread(s), max-num-seqs {args.max_num_seqs}, "
              f"model {model}")
        print(f"RSS after warm-up (pre-load): {rss0 / 2**20:.1f} MiB")
        print(f"{'round':>5} {'streams':>7} {'ok':>5} {'errors':>6} {'wall s':>7} {'tok/s':>8} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'peak MiB':>9} {'after MiB':>9} {'after/pre':>9}")
        for i in range(1, args.rounds + 1):
            r = asyncio.run(run_round(url, proc, args.concurrency, args.max_tokens))
            r.rss_after = settle_rss(proc)
            ttft = sorted(r.ttft_s) or [float("nan")]
            p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
            ratio = r.rss_after / rss0
            print(f"{i:>5} {args.concurrency:>7} {r.ok:>5} {len(r.errors):>6} {r.wall_s:>7.2f} "
                  f"{r.tokens / r.wall_s:>8.0f} {statistics.median(ttft):>9.3f} {p99:>9.3f} "
                  f"{r.peak_rss / 2**20:>9.1f} {r.rss_after / 2**20:>9.1f} {ratio:>9.3f}")
            if r.errors:
                failed.append(f"round {i}: {len(r.errors)} errors, e.g. {r.errors[:3]}")
            if abs(ratio - 1) > RSS_TOLERANCE:
                failed.append(f"round {i}: RSS {ratio:.3f}x the pre-load value (limit +-{RSS_TOLERANCE:.0%})")
        running, waiting = gauge(url, "unlearn:num_requests_running"), gauge(url, "unlearn:num_requests_waiting")
        print(f"after the load: running={running:.0f} waiting={waiting:.0f}")
        if running or waiting:
            failed.append("the server is not idle after the load")
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        tmp.cleanup()
    print("PASS" if not failed else "FAIL:\n  " + "\n  ".join(failed))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
