"""Output throughput of `unlearn-serve serve` vs `transformers serve --continuous-batching`, same model, same load.

    python bench/throughput.py                      # 1, 16, 64 concurrent chat streams x 64 new tokens
    python bench/throughput.py --concurrency 64 --threads 1 --skip-transformers

Builds a tiny random Llama (hidden 512, 8 layers, vocab 4096) in a temporary directory, then starts each
server in turn (never both at once, so they do not share the CPU), sends the same greedy chat load with the
`openai` async client and prints output tokens/s for both and the ratio. Tokens are counted from each stream's
final `usage` (both servers send it), so a stream that ends early at EOS is counted as what it produced.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from unlearn_serve.testing import free_port

SERVE_TIMEOUT_S = 300


def build_model(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A tiny random Llama and a byte-level BPE tokenizer of exactly `vocab` entries (with a chat template)."""
    from unlearn_serve.tiny import build_tiny_model, save_tiny, train_tokenizer

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + ["th", "st", "er", "an", "ing"]
    # enough distinct pseudo-words for BPE to reach the requested vocabulary
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60_000)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    tokenizer = train_tokenizer(lines, vocab_size=vocab)
    model = build_tiny_model("llama", tokenizer, seed=0, hidden_size=hidden, num_layers=layers)
    save_tiny(model, tokenizer, out)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: llama hidden={hidden} layers={layers} vocab={len(tokenizer)} params={params / 1e6:.1f}M -> {out}")
    return out



@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    ready_path: str
    model_name: str
    extra_body: dict


def start(server: Server, env: dict[str, str], log: Path, timeout: float = SERVE_TIMEOUT_S) -> subprocess.Popen:
    """Start `server` (its own process group, output to `log`) and wait until its ready path answers 200."""
    proc = subprocess.Popen(
        server.argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{server.port}{server.ready_path}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{server.name} did not become ready in {timeout:.0f}s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def one_stream(client: openai.AsyncOpenAI, server: Server, i: int, max_tokens: int) -> tuple[int, float]:
    """Stream one chat completion; returns (completion tokens, time to first content)."""
    started = time.perf_counter()
    first = None
    usage = None
    stream = await client.chat.completions.create(
        model=server.model_name,
        messages=[{"role": "user", "content": f"Request {i}: write a long story about the sea and the sky."}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=server.extra_body,
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            usage = chunk.usage
    if usage is None:
        raise RuntimeError(f"{server.name}: a stream ended without usage")
    return usage.completion_tokens, first or 0.0


async def run_load(server: Server, concurrency: int, max_tokens: int) -> tuple[float, int, float]:
    """(output tokens/s, tokens, median TTFT) for `concurrency` simultaneous streams."""
    http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4))
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", http_client=http, max_retries=0
    ) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*[one_stream(client, server, i, max_tokens) for i in range(concurrency)])
        elapsed = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    ttfts = sorted(r[1] for r in results)
    return tokens / elapsed, tokens, ttfts[len(ttfts) // 2]


def bench_server(server: Server, env, log: Path, levels: list[int], max_tokens: int) -> dict[int, float]:
    print(f"\n== {server.name}: {' '.join(server.argv[:3])} ...")
    t0 = time.monotonic()
    proc = start(server, env, log)
    print(f"ready in {time.monotonic() - t0:.1f}s")
    results = {}
    try:
        asyncio.run(run_load(server, 2, 8))  # warm-up (first-call allocations, lazy init)
        for c in levels:
            tps, tokens, ttft = asyncio.run(run_load(server, c, max_tokens))
            results[c] = tps
            print(f"{server.name:>22}  streams={c:>3}  {tps:8.1f} tok/s  ({tokens} tokens, median TTFT {ttft:.2f}s)")
    finally:
        stop(proc)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for both servers")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both servers)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both servers)")
    parser.add_argument("--skip-transformers", action="store_true", help="only measure unlearn-serve")
    parser.add_argument("--keep", action="store_true", help="keep the model directory and server logs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="unlearn-bench-"))
    try:
        model_dir = build_model(work / "model", args.hidden, args.layers, args.vocab)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        print(f"threads={args.threads} device={args.device} dtype={args.dtype} load={os.getloadavg()[0]:.1f} "
              f"(1-min load average before the run; other processes on the machine skew the figures)")
        max_seqs = max(args.concurrency)
        ours_port = free_port()
        ours = Server(
            "unlearn-serve",
            [sys.executable, "-m", "unlearn_serve.cli", "serve", "--model", str(model_dir), "--port", str(ours_port),
             "--served-model-name", "tiny", "--max-num-seqs", str(max_seqs), "--max-model-len", "512",
             "--device", args.device, "--dtype", args.dtype, "--log-level", "warning"],
            ours_port, "/ready", "tiny", {},
        )
        results = {"ours": bench_server(ours, env, work / "unlearn-serve.log", args.concurrency, args.max_tokens)}
        if not args.skip_transformers:
            hf_port = free_port()
            hf_cli = shutil.which("transformers") or "transformers"
            hf = Server(
                "transformers serve",
                [hf_cli, "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1", "--port",
                 str(hf_port), "--device", args.device, "--dtype", args.dtype],
                hf_port, "/health", str(model_dir), {},
            )
            results["hf"] = bench_server(hf, env, work / "transformers-serve.log", args.concurrency, args.max_tokens)
            print("\nstreams  unlearn-serve tok/s  transformers-serve tok/s  ratio")
            for c in args.concurrency:
                o, h = results["ours"][c], results["hf"][c]
                print(f"{c:>7}  {o:>19.1f}  {h:>24.1f}  {o / h:5.2f}x")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
