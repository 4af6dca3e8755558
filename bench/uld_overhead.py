"""ULD serving overhead, one run, same load: output tok/s with unlearning off, all on, and 50/50 mixed;
resident memory before and after loading an assistant.

    python bench/uld_overhead.py                          # a small random Llama built in-process
    python bench/uld_overhead.py --model DIR [--uld DIR]  # a real model (and a trained assistant)

Without --uld a random-weight assistant (LoRA on the first K = N/4 layers) is made for the model:
its cost does not depend on what it learnt. Goals: on >= 0.75x off, mixed >= 0.85x off, resident
memory with the assistant <= base + adapter (+ its KV cache) + 5%.
"""

from __future__ import annotations

import argparse
import copy
import gc
import resource
import tempfile
import time
import types
from pathlib import Path

import torch


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to the peak from getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def small_model(layers: int, hidden: int):
    from unlearn_serve.tiny import build_tiny_model, train_tokenizer

    tok = train_tokenizer(vocab_size=2048)
    model = build_tiny_model(
        "llama", tok, seed=0, hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=4,
        intermediate_size=hidden * 3, max_position_embeddings=2048,
    )
    return model, tok


def random_assistant(model, out: Path, num_layers: int, rank: int) -> Path:
    from peft import get_peft_model

    from unlearn_serve.artifact import fingerprint_model
    from unlearn_serve.assistant import assistant_lora_config
    from unlearn_serve.uld_artifact import save_uld_artifact

    fingerprint = fingerprint_model(model)
    peft_model = get_peft_model(copy.deepcopy(model), assistant_lora_config(model, num_layers, rank=rank, alpha=rank))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    # gated by the early exit, with the prefix guard and finishing words, as train-uld's artifacts are by default
    # (`--gate-ab` / `--prefix-guard-ab` / `--finish-words-ab` time them without)
    details = {"assistant_layers": num_layers, "lora_rank": rank}
    save_uld_artifact(peft_model, out, fingerprint, details, {}, None, {"gate": "early_exit"})
    del peft_model
    gc.collect()
    return out


def vocabulary_wide_process_logits(backend, plan, logits, hidden_a, early_a=None):
    """`ULDBackend.process_logits` as it was before the block search (2026-12-03, twelfth session), for
    --candidates-ab: the candidate set from vocabulary-wide max / compare / top-k (`plausible_mask` + `topk`), the
    unlearned rows gathered, combined into a new [S, V] tensor and written back. The same tokens (gated rows too)."""
    from unlearn_serve.server.unlearning.backends import ULD_MAX_CANDIDATES

    from unlearn_serve.uld_combine import combine_logits, combine_on_candidates, plausible_mask

    if plan is None:
        return logits
    hidden = hidden_a[plan.hidden_rows, plan.hidden_pos]
    early = early_a[plan.hidden_rows, plan.hidden_pos] if plan.settings.needs_early_exit else None
    previous = None if plan.inputs is None else plan.inputs.input_ids[plan.token_rows, plan.hidden_pos]
    target, kwargs = logits[plan.logit_rows], backend.combine_kwargs(plan.settings) | {"previous_ids": previous}
    keep = plausible_mask(target, plan.log_filter)
    m = int(keep.sum(dim=-1).max())
    head = None
    if m <= ULD_MAX_CANDIDATES:
        candidates = target.topk(m, dim=-1).indices
        head = backend.runner.candidate_logits(hidden, candidates)
    if head is not None:
        early_head = None if early is None else backend.runner.candidate_logits(early, candidates)
        combined = combine_on_candidates(
            target, candidates, head, plan.alpha, keep, log_filter=plan.log_filter, early_exit_logits=early_head,
            **kwargs,
        )
    else:
        early_head = None if early is None else backend.runner.logits(early)
        combined = combine_logits(
            target, backend.runner.logits(hidden), plan.alpha, plan.log_filter, early_exit_logits=early_head, **kwargs
        )
    logits[plan.logit_rows] = combined
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local model directory (default: a random 8-layer Llama, hidden 512)")
    parser.add_argument("--uld", help="a trained ULD artifact for --model (default: random LoRA, K = N/4)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16, help="requests per configuration (one batch)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--no-repeat-substitution",
        type=int,
        help="the engine's repeat guard n-gram size (0 = off; default: the engine's)",
    )
    parser.add_argument(
        "--guard-ab",
        action="store_true",
        help="also time the unlearned and mixed loads with the repeat guard switched off, interleaved in the same "
        "rounds (what the guard costs, free of run-to-run drift)",
    )
    parser.add_argument(
        "--guard-scope-ab",
        action="store_true",
        help="also time the unlearned and mixed loads with the repeat guard on the substituted positions only (not "
        "every position after an answer's first substitution), interleaved in the same rounds",
    )
    parser.add_argument(
        "--candidates-ab",
        action="store_true",
        help="also time the unlearned and mixed loads with the vocabulary-wide candidate search the engine used before "
        "the block search, interleaved in the same rounds",
    )
    parser.add_argument(
        "--split-ab",
        action="store_true",
        help="also time the unlearned and mixed loads with every row on the whole-vocabulary path whenever one row has "
        "more plausible tokens than the plausible-only head takes (the rule before rows were split), interleaved",
    )
    parser.add_argument(
        "--gate-ab",
        action="store_true",
        help="also time the unlearned and mixed loads without the early-exit gate (the request option gate=null), "
        "interleaved in the same rounds (what the gate's second LM head costs)",
    )
    parser.add_argument(
        "--prefix-guard-ab",
        action="store_true",
        help="also time the unlearned and mixed loads without the prefix guard (the engine option prefix_guard=false), "
        "interleaved in the same rounds (what the guard's prefix lookups cost)",
    )
    parser.add_argument(
        "--finish-words-ab",
        action="store_true",
        help="also time the unlearned and mixed loads with the engine option finish_words flipped, interleaved in the "
        "same rounds (what finishing words costs: the early exit's head call and a gather per unlearned row)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per configuration (best kept)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from unlearn_serve.server.engine.engine import Engine, EngineConfig
    from unlearn_serve.server.engine.sampling_params import SamplingParams

    if args.model:
        from unlearn_serve.loading import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(args.model, dtype="float32", device="cpu")
    else:
        model, tok = small_model(args.layers, args.hidden)
    n_layers = model.config.num_hidden_layers
    k = max(1, round(n_layers / 4))
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(args.uld) if args.uld else random_assistant(model, Path(tmp) / "uld", k, args.rank)
        config = EngineConfig(
            max_num_seqs=args.requests, max_model_len=1024, no_repeat_substitution=args.no_repeat_substitution
        )
        engine = Engine(model, tok, config, "bench")
        gc.collect()
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, len(tok) - 10, (args.prompt_len,), generator=gen).tolist()
                   for _ in range(args.requests)]
        engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm up
        rss_base = rss_bytes()
        assistant = engine.load_uld("forget", artifact)
        gc.collect()
        rss_loaded = rss_bytes()
        engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), "forget")  # warm up
        rss_used = rss_bytes()  # after the assistant's KV region has been touched

        def tok_s(selections) -> tuple[float, float]:
            """Generated tokens per wall-clock second and per CPU second of this process (the steadier
            figure when other jobs share the CPU)."""
            started, cpu = time.perf_counter(), time.process_time()
            results = engine.generate(prompts, params, selections)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            tokens = sum(len(r.completions[0].token_ids) for r in results)
            return tokens / elapsed, tokens / max(cpu, 1e-9)

        n = args.requests
        # interleaved rounds so that load drift on a shared machine hits every configuration alike
        runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": [], "mixed": []}
        guard_n = engine.no_repeat_substitution
        if args.guard_ab:
            runs |= {"on, guard off": [], "mixed, guard off": []}
        if args.guard_scope_ab:
            runs |= {"on, substitutions only": [], "mixed, substitutions only": []}
        if args.candidates_ab:
            runs |= {"on, vocabulary-wide": [], "mixed, vocabulary-wide": []}
        if args.split_ab:
            runs |= {"on, no split": [], "mixed, no split": []}
        if args.gate_ab:
            runs |= {"on, ungated": [], "mixed, ungated": []}
        if args.prefix_guard_ab:
            runs |= {"on, no prefix guard": [], "mixed, no prefix guard": []}
        if args.finish_words_ab:
            runs |= {"on, finish_words flipped": [], "mixed, finish_words flipped": []}
        from unlearn_serve.server.unlearning import backends

        split = backends.split_plausible_candidates

        def no_split(*call_args, **call_kwargs):
            """The rule before rows were split: one wide row sends every row to the whole vocabulary."""
            found = split(*call_args, **(call_kwargs | {"spread_blocks": None}))
            return None if found is not None and found.rest_rows is not None else found

        from unlearn_serve.server.engine.sequence import Selection

        def time_variant(variant: str, selection: str | Selection = "forget") -> None:
            """One round of the unlearned and the 50/50 mixed load, served with `selection`, under `variant`."""
            runs[f"on, {variant}"].append(tok_s([selection] * n))
            runs[f"mixed, {variant}"].append(tok_s([selection if i % 2 else None for i in range(n)]))

        for _ in range(args.rounds):
            runs["off"].append(tok_s([None] * n))
            runs["on"].append(tok_s(["forget"] * n))
            runs["mixed"].append(tok_s(["forget" if i % 2 else None for i in range(n)]))
            if args.guard_ab:
                engine.set_no_repeat_substitution(0)
                time_variant("guard off")
                engine.set_no_repeat_substitution(guard_n)
            if args.guard_scope_ab:
                engine.config.repeat_guard_after_substitution = False  # read each step; no sequence runs now
                time_variant("substitutions only")
                engine.config.repeat_guard_after_substitution = True
            if args.candidates_ab:
                engine.uld.process_logits = types.MethodType(vocabulary_wide_process_logits, engine.uld)
                time_variant("vocabulary-wide")
                del engine.uld.process_logits  # the class's own again
            if args.gate_ab:
                time_variant("ungated", Selection("forget", {"gate": None}))
            if args.prefix_guard_ab:
                time_variant("no prefix guard", Selection("forget", {"prefix_guard": False}))
            if args.finish_words_ab:
                flipped = Selection("forget", {"finish_words": not assistant.combine.finish_words})
                time_variant("finish_words flipped", flipped)
            if args.split_ab:
                backends.split_plausible_candidates = no_split
                time_variant("no split")
                backends.split_plausible_candidates = split
        best = {name: max(v[0] for v in values) for name, values in runs.items()}
        best_cpu = {name: max(v[1] for v in values) for name, values in runs.items()}

    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {n_layers} layers, {model_bytes / 2**20:.1f} MiB of weights; assistant K={assistant.num_layers}, "
          f"LoRA {assistant.nbytes / 2**20:.2f} MiB; {n} requests x {args.max_tokens} tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"output tok/s  off {best['off']:.1f}   on {best['on']:.1f} ({best['on'] / best['off']:.2f}x, goal >= 0.75x)"
          f"   mixed 50/50 {best['mixed']:.1f} ({best['mixed'] / best['off']:.2f}x, goal >= 0.85x)")
    print(f"per CPU second  off {best_cpu['off']:.1f}   on {best_cpu['on']:.1f} "
          f"({best_cpu['on'] / best_cpu['off']:.2f}x)   mixed 50/50 {best_cpu['mixed']:.1f} "
          f"({best_cpu['mixed'] / best_cpu['off']:.2f}x)   (best of {args.rounds} rounds)")
    def report(variant: str, label: str, ratio: str, suffix: str = "") -> None:
        """One A/B line: the variant's unlearned and mixed throughput, and the served configuration's over it."""
        on, mixed = best[f"on, {variant}"], best[f"mixed, {variant}"]
        print(f"{label}: on {on:.1f} ({on / best['off']:.2f}x)   mixed 50/50 {mixed:.1f} ({mixed / best['off']:.2f}x); "
              f"{ratio}: on {best['on'] / on:.3f}x, mixed {best['mixed'] / mixed:.3f}x{suffix}")

    without = " of its throughput without it"
    if args.guard_ab:
        report("guard off", f"repeat guard (n = {guard_n}) off", "the guard's cost", without)
    if args.guard_scope_ab:
        report("substitutions only", "repeat guard on substituted positions only", "every later position's cost")
    if args.candidates_ab:
        report("vocabulary-wide", "vocabulary-wide candidate search", "the block search's gain")
    if args.split_ab:
        report("no split", "no split of wide rows", "the split's gain")
    if args.gate_ab:
        report("ungated", "without the early-exit gate", "the gate's cost", without)
    if args.prefix_guard_ab:
        report("no prefix guard", "without the prefix guard", "the guard's cost", without)
    if args.finish_words_ab:
        flipped = "off" if assistant.combine.finish_words else "on"
        report("finish_words flipped", f"finish_words {flipped}", "served / flipped")
    print(f"assistant served {'gated by the early exit' if assistant.combine.gate else 'ungated'}")
    print(f"finish_words {'on' if assistant.combine.finish_words else 'off'}")
    print(f"prefix guard {'on' if assistant.combine.prefix_guard else 'off'}")
    allowed = assistant.nbytes + 0.05 * rss_base
    print(f"resident memory  base {rss_base / 2**20:.1f} MiB   with assistant loaded {rss_loaded / 2**20:.1f} MiB "
          f"(+{(rss_loaded - rss_base) / 2**20:.2f} MiB; adapter {assistant.nbytes / 2**20:.2f} MiB; "
          f"{'within' if rss_loaded - rss_base <= allowed else 'OVER'} base + adapter + 5%)   "
          f"after first unlearned batch {rss_used / 2**20:.1f} MiB (assistant KV rows for layers < K)")
    print(f"KV cache (target slots + assistant slots for layers < K): {engine.runner.cache.nbytes() / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
