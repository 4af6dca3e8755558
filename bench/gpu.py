"""GPU measurement: this engine vs transformers on random-weight Llama-3-shaped models, one table out.

    python bench/gpu.py                 # on a GPU host: 8B- and 1B-shaped models, bf16 (< 8 minutes)
    python bench/gpu.py --models 1b     # one shape only
    python bench/gpu.py --smoke         # a tiny model on CPU in well under a minute (run by the test suite)

No downloads: the models are built from their configs with random weights, and the tokenizer is a
word-level vocabulary that covers every id (decoding random tokens needs no real one). The engine is
driven in-process (`unlearn_serve.server.engine.engine.Engine`), so the host needs only torch,
transformers, peft and accelerate (+ this package installed with --no-deps).

For each model, at 1, 32 and 128 concurrent requests (512-token prompts, 128 new tokens, greedy):
  * this engine, plain (decode steps of plain rows replay CUDA graphs on a GPU) and with `--enforce-eager`
    (no graphs; the same engine with its graph runner switched off); and with a random ULD assistant
    (LoRA on the first K = N/4 layers), all rows unlearned and half of them (at 32 and 128 concurrent);
  * transformers `generate` with a static cache (one batch of the same prompts);
  * transformers continuous batching (`generate_batch`, the engine behind
    `transformers serve --continuous-batching`), where it imports;
  * the bandwidth bound: weight bytes / measured device copy bandwidth (one decode step must read
    every weight once, so batch-1 tok/s cannot exceed it).
TTFT is from submission to the first token; decode tok/s counts the tokens after each request's
first, over the time after the last first token (for `generate`: full run minus a 1-token run).
Goals (issue 15, H100/H200 class, 8B-shaped): batch-1 decode >= 60% of the bound; 128 concurrent
>= 2x transformers continuous batching; ULD all-on >= 0.8x, mixed >= 0.9x of plain.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SHAPES: dict[str, dict] = {
    # Llama-3-8B: 32 layers, GQA 32/8 heads, 14336 MLP, 128256 vocabulary, untied head
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    # Llama-3.2-1B: 16 layers, head_dim 64, tied embeddings
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "smoke": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
}


@dataclass
class Row:
    model: str
    system: str
    concurrency: int
    ttft_ms: float | None = None
    decode_tok_s: float | None = None
    output_tok_s: float | None = None
    ratio: float | None = None  # see `ratio_of`
    ratio_of: str = ""
    note: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.started = time.monotonic()
        self.rows: list[Row] = []
        self.last_tokens: list[list[int]] | None = None  # the last engine run's outputs (sync-vs-async check)
        self.checks: list[str] = []  # token comparisons that failed

    # ------------------------------------------------------------------ helpers
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def emit(self, row: Row) -> None:
        """Keep `row` and print it at once: a run cut short (a host's time limit) still shows what it measured."""
        self.rows.append(row)
        fields = {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(row).items() if v not in (None, "")}
        print(f"row {fields}", flush=True)

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.args.budget_s

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def build_model(self, shape: str):
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            **SHAPES[shape], max_position_embeddings=max(4096, self.args.prompt_len + self.args.max_tokens + 64)
        )
        config.eos_token_id, config.bos_token_id, config.pad_token_id = 1, 2, 0
        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, attn_implementation="sdpa")
        model.eval()
        model.generation_config.eos_token_id = None  # every system generates exactly max_tokens
        model.generation_config.pad_token_id = 0
        return model

    def copy_bandwidth(self) -> float:
        """Bytes/s of a device-to-device copy (each byte read once and written once)."""
        n = (1 << 30) if self.device.type == "cuda" else (32 << 20)
        src = torch.empty(n, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        self.sync()
        iters = 20 if self.device.type == "cuda" else 5
        started = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        self.sync()
        elapsed = time.perf_counter() - started
        del src, dst
        return 2 * n * iters / elapsed

    def graph_standin(self) -> dict:
        """--smoke: drive the graphed decode path on CPU with the tests' record-and-replay stand-in for
        CUDA-graph capture (tests/graph_standin.py), so the graph rows' code runs in the suite too."""
        if not self.args.smoke:
            return {}
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from graph_standin import RecordedGraphs

        return {"graph_capture": RecordedGraphs()}

    # ------------------------------------------------------------------ systems
    def run_engine(
        self, engine, prompts: list[list[int]], selections: list[str | None], max_tokens: int | None = None
    ) -> tuple[float, float, float]:
        from unlearn_serve.server.engine.sampling_params import SamplingParams
        from unlearn_serve.server.engine.sequence import Request, Selection

        params = SamplingParams(max_tokens=max_tokens or self.args.max_tokens, temperature=0.0, ignore_eos=True)
        self.sync()
        t0 = time.monotonic()
        requests = []
        for ids, sel in zip(prompts, selections, strict=True):
            request = Request(engine.new_request_id(), ids, params, Selection(sel) if sel else None)
            engine.add_request(request)
            requests.append(request)
        while engine.has_work():
            engine.step()
        self.sync()
        t1 = time.monotonic()
        self.last_tokens = [list(s.output_ids) for r in requests for s in r.sequences]  # for the sync-vs-async check
        generated = sum(len(s.output_ids) for r in requests for s in r.sequences)
        first = [r.first_token_time - t0 for r in requests]
        decode_time = max(t1 - t0 - max(first), 1e-9)
        return 1000 * statistics.mean(first), (generated - len(requests)) / decode_time, generated / (t1 - t0)

    def run_generate(self, model, prompts: list[list[int]]) -> tuple[float, float, float]:
        """transformers `generate`, static cache, one batch (all prompts have the same length: no padding)."""
        from transformers import GenerationConfig

        ids = torch.tensor(prompts, device=self.device)

        def timed(new_tokens: int) -> float:
            config = GenerationConfig(
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=0,
                eos_token_id=None,
            )
            if hasattr(config, "disable_compile"):
                config.disable_compile = not self.args.hf_compile
            self.sync()
            started = time.perf_counter()
            out = model.generate(ids, generation_config=config)
            self.sync()
            assert out.shape[1] == ids.shape[1] + new_tokens
            return time.perf_counter() - started

        timed(2)  # warm-up (cache allocation, kernels)
        ttft = timed(1)
        full = timed(self.args.max_tokens)
        n, t = len(prompts), self.args.max_tokens
        return 1000 * ttft, n * (t - 1) / max(full - ttft, 1e-9), n * t / full

    def run_continuous_batching(self, model, prompts: list[list[int]]) -> tuple[float, float, float]:
        from transformers import GenerationConfig

        try:
            from transformers import ContinuousBatchingConfig
        except ImportError:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

        # CPU (smoke): a small cache; on a GPU the defaults, as `transformers serve` uses them
        cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=512) if self.device.type == "cpu" else None
        config = GenerationConfig(max_new_tokens=self.args.max_tokens, do_sample=False, pad_token_id=0)
        # no separate warm-up: each call starts its own manager (and warms it up, CUDA graphs included)
        # before the requests are created, and the times below start at each request's creation
        out = model.generate_batch(prompts, config, continuous_batching_config=cb, record_timestamps=True)
        results = list(out.values())
        if len(results) != len(prompts) or any(r.error or not r.timestamps for r in results):
            raise RuntimeError("continuous batching returned incomplete results")
        start = min(r.created_time for r in results)
        first = [r.timestamps[0] - r.created_time for r in results]
        last_first = max(r.timestamps[0] for r in results)
        end = max(r.timestamps[-1] for r in results)
        generated = sum(len(r.generated_tokens) for r in results)
        return (
            1000 * statistics.mean(first),
            (generated - len(results)) / max(end - last_first, 1e-9),
            generated / max(end - start, 1e-9),
        )

    # ------------------------------------------------------------------ one model
    def measure(self, shape: str) -> None:
        args = self.args
        name = shape
        model = self.build_model(shape)
        vocab = model.config.vocab_size
        tokenizer = word_level_tokenizer(vocab)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        bandwidth = self.copy_bandwidth()
        bound = bandwidth / weight_bytes
        self.emit(
            Row(
                name,
                "bandwidth bound",
                1,
                decode_tok_s=bound,
                note=f"{weight_bytes / 1e6:,.0f} MB weights / {bandwidth / 1e9:,.0f} GB/s copy",
            )
        )
        gen = torch.Generator().manual_seed(0)
        top = max(args.concurrency)
        prompts = torch.randint(3, vocab, (top, args.prompt_len), generator=gen).tolist()

        def add(system: str, c: int, fn, *fn_args) -> Row:
            row = Row(name, system, c)
            if self.over_budget():
                row.note = "skipped: time budget"
            else:
                try:
                    row.ttft_ms, row.decode_tok_s, row.output_tok_s = fn(*fn_args)
                except Exception as exc:  # a baseline that does not run here must not sink the table
                    row.note = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                self.free()
            self.emit(row)
            return row

        # generate first, on the untouched model; then the engine (its attention and LoRA hooks are
        # undone after it); continuous batching last, as its start-up (cache sizing, graph capture) is the
        # slowest part and the time budget should cut it rather than the engine's rows
        for c in args.concurrency:
            add("transformers generate (static cache)", c, self.run_generate, model, prompts[:c])

        from unlearn_serve.server.engine.engine import Engine, EngineConfig

        from unlearn_serve.artifact import fingerprint_model

        attn_implementation = model.config._attn_implementation
        k = max(1, model.config.num_hidden_layers // 4)
        engine_rows: list[Row] = []
        engine_tokens: dict[int, list | None] = {}
        uld_rows: list[tuple[Row, int]] = []
        with tempfile.TemporaryDirectory() as tmp:
            artifact = write_random_assistant(model, Path(tmp) / "uld", k, args.rank, fingerprint_model(model))
            options = dict(max_num_seqs=top, max_model_len=args.prompt_len + args.max_tokens + 8)
            if "assistant_kv_layers" in getattr(EngineConfig, "__dataclass_fields__", {}):
                options["assistant_kv_layers"] = k
            if args.smoke and "async_output" in getattr(EngineConfig, "__dataclass_fields__", {}):
                options["async_output"] = True  # the CUDA default, so that the CPU check runs its path too
            engine = Engine(model, tokenizer, EngineConfig(**options), "bench", **self.graph_standin())
            engine.load_uld("forget", artifact)  # before any request: its KV rows are part of the start-up budget
        self.run_engine(engine, prompts[:2], [None, "forget"])  # warm-up
        graphs = getattr(engine, "graphs", None)  # CUDA graphs (None: eager, as on CPU or with --enforce-eager)
        for c in args.concurrency:
            if graphs is not None and not self.over_budget():  # capture this batch size's graphs untimed
                self.run_engine(engine, prompts[:c], [None] * c, max_tokens=2)
            engine_rows.append(add("unlearn-serve engine", c, self.run_engine, engine, prompts[:c], [None] * c))
            engine_tokens[c] = self.last_tokens
            if args.smoke:
                engine_rows[-1].note = "graphs: the tests' CPU stand-in (Python replay, slow; not a speed)"
        # the same engine with asynchronous output processing off: its speed, and whether its tokens are the same
        sync_rows: list[Row] = []
        async_default = getattr(engine, "async_output", False)
        for c in [c for c in args.concurrency if c <= 32]:
            engine.async_output = False
            try:
                self.last_tokens = None
                row = add("engine, synchronous output", c, self.run_engine, engine, prompts[:c], [None] * c)
            finally:
                engine.async_output = async_default
            if self.last_tokens is not None and engine_tokens.get(c) is not None:
                equal = self.last_tokens == engine_tokens[c]
                row.note = f"async output {'on' if async_default else 'off'} above; tokens " + (
                    "equal" if equal else "DIFFER"
                )
                if not equal:
                    self.checks.append(f"{name} engine at {c}: tokens differ with synchronous output")
                print(f"  {row.system} at {c}: {row.note}", flush=True)
            sync_rows.append(row)
        eager_rows: list[Row] = []
        for c in args.concurrency:
            if graphs is None:
                note = "no CUDA graphs: the rows above are eager"
                self.emit(Row(name, "engine --enforce-eager", c, note=note))
                continue
            engine.builder.graphs = None  # what --enforce-eager does, on the same engine (no second KV cache)
            engine.builder.invalidate()
            try:
                eager_rows.append(add("engine --enforce-eager", c, self.run_engine, engine, prompts[:c], [None] * c))
            finally:
                engine.builder.graphs = graphs
                engine.builder.invalidate()
        for c in args.uld_concurrency:
            for label, selections in (
                ("all rows", ["forget"] * c),
                ("half the rows", ["forget" if i % 2 else None for i in range(c)]),
            ):
                if graphs is not None and not self.over_budget():  # capture this composition's graphs untimed
                    self.run_engine(engine, prompts[:c], selections, max_tokens=2)
                row = add(f"engine + ULD (K={k}), {label}", c, self.run_engine, engine, prompts[:c], selections)
                if c == min(args.uld_concurrency) and label == "half the rows" and not self.over_budget():
                    unlearned_tokens, engine.async_output = self.last_tokens, False  # the same, output synchronous
                    try:
                        self.run_engine(engine, prompts[:c], selections)
                    finally:
                        engine.async_output = async_default
                    same = "equal" if self.last_tokens == unlearned_tokens else "DIFFER"
                    if same == "DIFFER":
                        self.checks.append(f"{name} {row.system} at {c}: tokens differ with synchronous output")
                    print(f"  {row.system} at {c}: tokens with synchronous output {same}", flush=True)
                if graphs is not None and not row.note:  # whether its steps were graph replays
                    uld_graphs = sum(len(key) == 6 for key in graphs.graphs)
                    row.note = f"{uld_graphs} ULD graphs" if graphs.enabled else "graph capture failed: eager"
                    print(f"  {row.system} at {c}: {row.note}", flush=True)
                uld_rows.append((row, c))
        done = engine.unload("forget")  # removes the LoRA hooks once nothing uses the assistant
        while not done.is_set() and engine.has_work():
            engine.step()
        engine.step()
        del engine
        model.config._attn_implementation = attn_implementation  # the engine's slot attention is its own
        self.free()

        cb: dict[int, float] = {}
        if not args.skip_cb:
            for c in args.concurrency:
                row = add("transformers continuous batching", c, self.run_continuous_batching, model, prompts[:c])
                cb[c] = row.decode_tok_s or 0.0
        plain = {row.concurrency: row.decode_tok_s for row in engine_rows}
        for row in engine_rows:
            if row.concurrency == 1 and row.decode_tok_s:
                row.ratio, row.ratio_of = row.decode_tok_s / bound, "of bound"
            elif cb.get(row.concurrency) and row.decode_tok_s:
                row.ratio, row.ratio_of = row.decode_tok_s / cb[row.concurrency], "x transformers CB"
        for row, c in uld_rows:
            if plain.get(c) and row.decode_tok_s:
                row.ratio, row.ratio_of = row.decode_tok_s / plain[c], "x plain engine"
        for row in eager_rows:
            if plain.get(row.concurrency) and row.decode_tok_s:
                row.ratio, row.ratio_of = row.decode_tok_s / plain[row.concurrency], "x graphed engine"
        for row in sync_rows:
            if plain.get(row.concurrency) and row.decode_tok_s:
                row.ratio, row.ratio_of = row.decode_tok_s / plain[row.concurrency], "x engine above"
        del model
        self.free()

    def goals(self) -> list[str]:
        """The throughput goals (docs/benchmarks.md, GPU measurement) as measured: one line each, MET or MISSED."""
        lines = []
        for r in self.rows:
            if r.ratio is None:
                continue
            if r.ratio_of == "of bound":
                goal = ("batch-1 decode vs the bandwidth bound", 0.6)
            elif r.ratio_of == "x transformers CB" and r.concurrency == 128:
                goal = ("128 streams vs transformers continuous batching", 2.0)
            elif r.ratio_of == "x plain engine":
                goal = (r.system, 0.8 if "all rows" in r.system else 0.9)
            else:
                continue
            verdict = "MET" if r.ratio >= goal[1] else f"MISSED (short by {goal[1] - r.ratio:.2f})"
            lines.append(f"{r.model} {goal[0]} at {r.concurrency}: {r.ratio:.2f} (goal >= {goal[1]}): {verdict}")
        return lines + [f"{check}: MISSED" for check in self.checks]

    def table(self) -> str:
        header = (
            f"{'model':<6} {'system':<38} {'conc':>4} {'TTFT ms':>9} {'decode tok/s':>13} "
            f"{'output tok/s':>13} {'ratio':>20}  note"
        )
        lines = [header, "-" * len(header)]

        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        for r in self.rows:
            ratio = "" if r.ratio is None else f"{r.ratio:.2f} {r.ratio_of}"
            lines.append(
                f"{r.model:<6} {r.system:<38} {r.concurrency:>4} {num(r.ttft_ms, '.1f'):>9} "
                f"{num(r.decode_tok_s, '.1f'):>13} {num(r.output_tok_s, '.1f'):>13} {ratio:>20}  {r.note}"
            )
        return "\n".join(lines)


def word_level_tokenizer(vocab_size: int):
    """A tokenizer whose vocabulary is the ids themselves ("t0" ... "tN"): decodes any id, needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="t0", pad_token="t0", eos_token="t1", bos_token="t2"
    )


def write_random_assistant(model, out: Path, num_layers: int, rank: int, fingerprint: dict) -> Path:
    """A ULD artifact with random LoRA (rank `rank`) on every linear of the first `num_layers` layers.

    Written directly in peft's file layout (no peft model, no copy of the base): its serving cost does
    not depend on what it learnt.
    """
    from safetensors.torch import save_file

    from unlearn_serve.artifact import Manifest, save_manifest
    from unlearn_serve.uld_artifact import ULD_DEFAULTS

    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    targets = set()
    for module_name, module in model.named_modules():
        layer = re.search(r"\.layers\.(\d+)\.", f".{module_name}.")
        if layer is None or int(layer.group(1)) >= num_layers or not isinstance(module, torch.nn.Linear):
            continue
        targets.add(module_name.rsplit(".", 1)[-1])
        prefix = f"base_model.model.{module_name}"
        tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=gen) * 0.02).to(
            model.dtype
        )
        tensors[f"{prefix}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=gen) * 0.02).to(
            model.dtype
        )
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(targets),
        "layers_to_transform": list(range(num_layers)),
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    save_manifest(
        Manifest(
            method="uld",
            base_fingerprint=fingerprint,
            # what train-uld writes today (prefer rule, refilter, margin, floor, the early-exit gate), so that the
            # measured cost is a new artifact's; runs 1-6 (2026-12-04) used alpha/filter only: the legacy rule, ungated
            defaults={**ULD_DEFAULTS, "gate": "early_exit"},
            details={"assistant_layers": num_layers, "lora_rank": rank, "lora_alpha": rank},
        ),
        out,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds (the test suite runs it)")
    parser.add_argument("--models", default="8b,1b", help="comma-separated shapes: 8b, 1b")
    parser.add_argument("--concurrency", default="1,32,128")
    parser.add_argument("--uld-concurrency", default="32,128", help="concurrencies of the ULD ratio runs")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the random ULD assistant")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--hf-compile",
        action="store_true",
        help="let `generate` torch.compile its static-cache forward (minutes per shape)",
    )
    parser.add_argument("--skip-cb", action="store_true", help="leave out transformers continuous batching")
    parser.add_argument("--budget-s", type=float, default=420, help="skip what would start after this many seconds")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.device, args.dtype = "smoke", "cpu", "float32"
        args.concurrency, args.uld_concurrency = "1,4", "4"
        args.prompt_len, args.max_tokens, args.rank, args.budget_s = 16, 4, 4, 150
        torch.set_num_threads(1)  # a tiny model: one thread is fastest, and steady on a shared machine
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.uld_concurrency = [int(c) for c in str(args.uld_concurrency).split(",") if c]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU host, or use --smoke for the CPU check", file=sys.stderr)
        return 2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network; never let a library try
    bench = Bench(args)
    import transformers

    device_name = torch.cuda.get_device_name() if bench.device.type == "cuda" else "CPU"
    print(
        f"device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{args.dtype}; prompts {args.prompt_len} tokens, {args.max_tokens} new tokens, greedy"
    )
    for shape in args.models.split(","):
        bench.measure(shape.strip())
        if args.json:  # after each model: a run cut short keeps the models it finished
            Path(args.json).write_text(json.dumps([asdict(r) for r in bench.rows], indent=1))
    print(bench.table())
    goals = bench.goals()
    header = "goals (--smoke: a CPU stand-in, not a speed)" if args.smoke else "goals (the 8B shape counts)"
    print("\n".join([f"{header}:", *goals]))
    missed = sum("MISSED" in line for line in goals)
    print(f"GOALS: {'all met' if not missed else f'{missed} MISSED'} ({len(goals)} measured)")
    print(f"total {time.monotonic() - bench.started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in bench.rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
