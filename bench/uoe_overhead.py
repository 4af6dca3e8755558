"""UOE serving overhead: decode tok/s with an expert patch on vs off, measured in one run on one engine.

    python bench/uoe_overhead.py                      # tiny Qwen2-MoE built in-process (CPU or GPU)
    python bench/uoe_overhead.py --hidden-size 512 --layers 8 --requests 32 --max-tokens 64

One engine holds the base model with one patch loaded. Three request mixes are timed, interleaved over
`--repeats` rounds in rotating order (best round kept, so background load hurts every mix alike):
  off      every request on the base model (the patch is loaded, unused: rows pay nothing)
  on       every request names the patch (worst case: all rows re-routed)
  mixed    half the requests name the patch, in the same batches as the others
and, as the baseline, an engine on the same weights with no patch loaded at all ("none").
Goal: on / none >= 0.95. Also prints the patch size and the fraction of model parameters it holds.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearn_serve.server.engine.engine import Engine, EngineConfig  # noqa: E402
from unlearn_serve.server.engine.sampling_params import SamplingParams  # noqa: E402

from unlearn_serve.families import get_family  # noqa: E402
from unlearn_serve.tiny import build_tiny_model, train_tokenizer, write_random_expert_patch  # noqa: E402


def timed(engine: Engine, prompts: list[list[int]], params: SamplingParams, choice: list) -> tuple[float, float]:
    """Generated tokens per wall-clock second and per CPU second of this process, for one batch of requests
    (prefill included, as a client sees it). On a shared CPU the CPU-second figure is the steadier one."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    results = engine.generate(prompts, params, choice)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(len(r.completions[0].token_ids) for r in results)
    return tokens / wall, tokens / max(cpu, 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_moe")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = train_tokenizer(vocab_size=512)
    model = build_tiny_model(
        args.family, tok, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4, num_kv_heads=2
    )
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    family = get_family(model)
    layer = max(family.moe_layers(model))
    config = EngineConfig(max_num_seqs=args.requests, max_model_len=args.prompt_len + args.max_tokens + 8)

    with tempfile.TemporaryDirectory() as tmp:
        artifact = write_random_expert_patch(model, layer, 0, Path(tmp) / "patch", noise=1.0)
        patch_bytes = (artifact / "expert_patch.safetensors").stat().st_size
        plain = Engine(copy.deepcopy(model), tok, config, "base")
        engine = Engine(model, tok, config, "base")
        engine.load_uoe("p", artifact)
        patch_params = engine.patches.describe("p")["patch_parameters"]

    total_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (args.prompt_len,), generator=gen).tolist() for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    n = args.requests
    mixes = {
        "none": (plain, [None] * n),
        "off": (engine, [None] * n),
        "on": (engine, ["p"] * n),
        "mixed": (engine, ["p" if i % 2 else None for i in range(n)]),
    }
    for eng, choice in mixes.values():  # warm-up (allocations, kernels)
        timed(eng, prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), choice[:2])
    best = {name: 0.0 for name in mixes}
    best_cpu = {name: 0.0 for name in mixes}
    names = list(mixes)
    for round_ in range(args.repeats):
        # rotate the order every round so that no mix always runs first (or right after another)
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            eng, choice = mixes[name]
            wall, cpu = timed(eng, prompts, params, choice)
            best[name], best_cpu[name] = max(best[name], wall), max(best_cpu[name], cpu)

    on_gpu = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"model: tiny {args.family}, hidden {args.hidden_size}, {args.layers} layers, "
          f"{family.num_experts(family.moe_block(model, layer))} experts, {total_params:,} parameters, "
          f"{args.dtype} on {device}")
    print(f"batch: {n} requests x {args.prompt_len} prompt tokens -> {args.max_tokens} new tokens, "
          f"best of {args.repeats} rounds")
    print(f"  {'':<34} {'tok/s':>10}  {'ratio':>6}  {'tok/CPU-s':>10}  {'ratio':>6}")
    for name, label in (("none", "no patch loaded"), ("off", "patch loaded, requests unpatched"),
                        ("on", "every request patched"), ("mixed", "half the requests patched")):
        print(f"  {label:<34} {best[name]:>10.1f}  {best[name] / best['none']:>5.3f}x  "
              f"{best_cpu[name]:>10.1f}  {best_cpu[name] / best_cpu['none']:>5.3f}x")
    print(f"patched / unpatched throughput: {best['on'] / best['none']:.3f}x wall-clock"
          + ("" if on_gpu else f", {best_cpu['on'] / best_cpu['none']:.3f}x per CPU second") + " (goal >= 0.95x)")
    print(f"patch size: {patch_bytes:,} bytes; {patch_params:,} parameters = "
          f"{100 * patch_params / total_params:.3f}% of the model's {total_params:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
