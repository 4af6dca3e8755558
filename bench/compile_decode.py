"""Does `torch.compile` of the engine's decode step pay on CPU? The same engine and load, eager vs compiled.

    python bench/compile_decode.py            # random 8-layer Llama (hidden 512), 32 requests x 64 tokens, 1 thread

Alternates eager and compiled engines twice; prints the compiled engine's warm-up (compilation) time and
output tok/s (wall and per CPU second of the process) for each.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uld_overhead import small_model  # noqa: E402
from unlearn_serve.server.engine.engine import Engine, EngineConfig  # noqa: E402
from unlearn_serve.server.engine.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, tok = small_model(8, 512)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tok) - 10, (32,), generator=gen).tolist() for _ in range(32)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for mode in ("eager", "compiled", "eager", "compiled"):
        engine = Engine(model, tok, EngineConfig(max_num_seqs=32, max_model_len=256), "bench")
        if mode == "compiled":
            engine._decode_step = torch.compile(engine._decode_step, dynamic=True)
        started = time.perf_counter()
        engine.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up (compiles)
        warm = time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        results = engine.generate(prompts, params)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        n = sum(len(r.completions[0].token_ids) for r in results)
        print(f"{mode}: warm-up {warm:.1f}s, {n / wall:.1f} tok/s wall, {n / cpu:.1f} tok/s per CPU s", flush=True)


if __name__ == "__main__":
    main()
