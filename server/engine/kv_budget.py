"""The KV memory budget: how many sequences the KV cache holds, decided once at start-up.

The cache is slot-based (one slot = one sequence of up to max_model_len tokens, see kv_cache.py),
so the budget sets the number of slots: budget // bytes per slot, where a slot's bytes count the
target's K/V on every layer plus the ULD assistant region on the layers < the reserved K. The
whole cache is allocated before the first request; admission waits for a free slot (a request
queues, it never allocates KV). Paged blocks (memory per token held, not per max-length slot) are
not built: with slots a sequence costs max_model_len tokens whatever its length.

Budget: `kv_cache_memory` bytes when given (the CPU flag); on CUDA, gpu_memory_utilization x the
device's memory, less what is allocated after loading the model, less an activation estimate.

`python -m unlearn_serve.server.engine.kv_budget` prints the capacity table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from unlearn_serve.errors import ModelLoadError

GiB = 1 << 30


class KVBudgetError(ModelLoadError):
    """The KV budget cannot hold one max-length sequence (start-up is refused with the numbers)."""


@dataclass
class KVLayout:
    """Bytes of KV per token, per layer (K and V, the cache dtype), and the assistant region's depth."""

    bytes_per_token: list[int]
    max_model_len: int
    assistant_layers: int = 0

    @property
    def target_bytes_per_seq(self) -> int:
        return sum(self.bytes_per_token) * self.max_model_len

    @property
    def assistant_bytes_per_seq(self) -> int:
        return sum(self.bytes_per_token[: self.assistant_layers]) * self.max_model_len

    @property
    def bytes_per_seq(self) -> int:
        return self.target_bytes_per_seq + self.assistant_bytes_per_seq


def parse_memory(text: str) -> int:
    """'8GiB', '512MiB', '2.5G', '1e9' -> bytes (binary units for K/M/G/T, with or without 'iB')."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": GiB, "t": 1 << 40}.get(value[-1:], 1)
    if scale != 1:
        value = value[:-1]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (examples: 8GiB, 512MiB, 2000000000)") from None
    if number <= 0:
        raise ValueError(f"{text!r}: the size must be positive")
    return int(number * scale)


def fmt(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} bytes"


def cuda_budget(device: torch.device, utilization: float, activation_bytes: int) -> int:
    """KV bytes on a CUDA device: utilization x its memory, less what is allocated now (weights), less
    an activation estimate. Not measured on a GPU in this project's tests (no GPU there)."""
    total = torch.cuda.get_device_properties(device).total_memory
    return int(utilization * total) - torch.cuda.memory_allocated(device) - activation_bytes


def activation_estimate(
    max_prefill_tokens: int, hidden_size: int, vocab_size: int, max_num_seqs: int, elem: int, graphs: bool = False
) -> int:
    """A rough upper bound of a step's activations: a prefill's hidden-sized intermediates (MLP ~ 4x)
    and float32 logits for every decode row (several copies: softmax, penalties, sampling). With CUDA
    graphs, also their memory pool, which stays reserved: the largest graph's LM-head output and its
    float32 copy, and the persistent logits buffer (~12 bytes per row and vocabulary entry)."""
    graph_pool = max_num_seqs * vocab_size * 12 if graphs else 0
    return max_prefill_tokens * 12 * hidden_size * elem + max_num_seqs * vocab_size * 4 * 4 + graph_pool


def plan_slots(layout: KVLayout, budget: int | None, max_num_seqs: int, source: str) -> int:
    """Slots the budget holds, at most max_num_seqs; KVBudgetError when it holds none."""
    if budget is None:  # no budget given (CPU default): one slot per --max-num-seqs, as sized
        return max_num_seqs
    slots = max(budget, 0) // layout.bytes_per_seq
    if slots < 1:
        assistant = (
            f" + assistant KV on {layout.assistant_layers} layers {fmt(layout.assistant_bytes_per_seq)}"
            if layout.assistant_layers
            else ""
        )
        raise KVBudgetError(
            f"the KV cache budget ({source}: {fmt(max(budget, 0))}) cannot hold one sequence of "
            f"{layout.max_model_len} tokens, which needs {fmt(layout.bytes_per_seq)} (target "
            f"{fmt(layout.target_bytes_per_seq)}{assistant}); raise the budget or lower --max-model-len"
            + (" / --assistant-kv-layers" if layout.assistant_layers else "")
        )
    return min(slots, max_num_seqs)


def capacity(
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    kv_bytes: int,
    seq_len: int,
    assistant_layers: int = 0,
) -> int:
    """Concurrent sequences of `seq_len` tokens that `kv_bytes` of KV holds (slots of seq_len tokens)."""
    per_layer = 2 * kv_heads * head_dim * dtype_bytes
    return kv_bytes // (per_layer * (num_layers + assistant_layers) * seq_len)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="KV capacity of an 8B-shaped (Llama-3-8B) model, bf16")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GB of device memory")
    parser.add_argument("--utilization", type=float, default=0.9)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
    layers, kv_heads, head_dim, hidden, vocab, params = 32, 8, 128, 4096, 128256, 8.03e9
    weights = int(params * 2)
    activations = activation_estimate(8192, hidden, vocab, 256, 2, graphs=True)  # CUDA graphs on (the default)
    kv = int(args.utilization * args.gpu_memory * 1e9) - weights - activations
    print(
        f"device {args.gpu_memory:.0f} GB x {args.utilization}: weights {fmt(weights)}, activations "
        f"(estimate) {fmt(activations)}, KV {fmt(kv)}; KV per token {2 * kv_heads * head_dim * 2 * layers} bytes"
    )
    print("| max_model_len (slot size) | ULD assistant KV layers | concurrent sequences |")
    print("|---|---|---|")
    for slot_len in (args.seq_len, 4096):
        for assistant in (0, layers // 4):
            n = capacity(layers, kv_heads, head_dim, 2, kv, slot_len, assistant)
            print(f"| {slot_len} | {assistant} | {n} |")


if __name__ == "__main__":
    main()
