"""Where a decode step's time goes: wall time per step and a torch.profiler summary, per batch composition.

    python bench/gpu_profile.py                 # on a GPU host: the 1B shape, 32 rows, about a minute
    python bench/gpu_profile.py --smoke         # a tiny model on CPU, seconds

For one model (`bench/gpu.py`'s shapes, random weights) and one batch of N rows that started together, after the
prefill and a few warm-up steps: the wall time of one decode step (mean of 10, synchronised), then 3 steps under
torch.profiler: the ops with the most self CPU time, the most device time, and the host syncs
(`cudaStreamSynchronize`, `aten::item`, ...) per step. Compositions: plain rows (CUDA graphs where there are some),
plain rows with graphs off (`--enforce-eager`), every row unlearned by a random ULD assistant (K = N/4 layers), and
half the rows unlearned.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
            "aten::_local_scalar_dense", "cudaMemcpyAsync", "aten::nonzero")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--model", default="1b")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512)
    args = parser.parse_args(argv)
    import gpu
    from torch.profiler import ProfilerActivity, profile
    from unlearn_serve.server.engine.engine import Engine, EngineConfig
    from unlearn_serve.server.engine.sampling_params import SamplingParams
    from unlearn_serve.server.engine.sequence import Request, Selection

    from unlearn_serve.artifact import fingerprint_model

    device = "cpu" if args.smoke else "cuda"
    shape = "smoke" if args.smoke else args.model
    prompt_len = 16 if args.smoke else args.prompt_len
    bench = gpu.Bench(
        argparse.Namespace(device=device, dtype="float32" if args.smoke else "bfloat16", prompt_len=prompt_len,
                           max_tokens=64, smoke=args.smoke, budget_s=1e9)
    )  # fmt: skip
    model = bench.build_model(shape)
    vocab = model.config.vocab_size
    n = args.rows
    k = max(1, model.config.num_hidden_layers // 4)
    prompts = torch.randint(3, vocab, (n, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = gpu.write_random_assistant(model, Path(tmp) / "uld", k, 16, fingerprint_model(model))
        config = EngineConfig(max_num_seqs=n, max_model_len=prompt_len + 200, assistant_kv_layers=k)
        engine = Engine(model, gpu.word_level_tokenizer(vocab), config, "profile", **bench.graph_standin())
        engine.load_uld("forget", artifact)
    engine.allocate_kv()  # makes the batch builder and its graph runner
    graphs = engine.graphs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    print(f"model {shape}, {n} rows, prompts {prompt_len} tokens; torch {torch.__version__}", flush=True)
    for label, selections, graphed in (
        ("plain, graphs", [None] * n, True),
        ("plain, --enforce-eager", [None] * n, False),
        ("ULD all rows", ["forget"] * n, True),
        ("ULD half the rows", ["forget" if i % 2 else None for i in range(n)], True),
    ):
        engine.builder.graphs = graphs if graphed else None
        engine.builder.invalidate()
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        for ids, sel in zip(prompts, selections, strict=True):
            engine.add_request(Request(engine.new_request_id(), ids, params, Selection(sel) if sel else None))
        while engine.num_waiting():  # every prompt prefilled (long batches take several prefill steps; the
            # requests sit in the engine's inbox until its next step, so `scheduler.waiting` alone starts out empty)
            engine.step()
        for _ in range(4):  # warm-up decode steps (graph capture on first use)
            engine.step()
        bench.sync()
        started = time.perf_counter()
        for _ in range(10):
            engine.step()
        bench.sync()
        per_step = (time.perf_counter() - started) / 10
        with profile(activities=activities) as prof:
            for _ in range(3):
                engine.step()
            bench.sync()
        events = prof.key_averages()
        syncs = {e.key: e.count / 3 for e in events if e.key in SYNC_OPS}
        captured = "off" if graphs is None else f"{len(graphs.graphs)} captured, enabled={graphs.enabled}"
        print(f"\n=== {label}: {1000 * per_step:.2f} ms/step ({n / per_step:.0f} tok/s); per step: {syncs}; "
              f"graphs: {captured}")  # fmt: skip
        print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        if device == "cuda":
            print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
        while engine.has_work():
            engine.step()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
