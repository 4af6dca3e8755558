"""Engine v2 (issue 15): the KV budget and admission by free KV, a decode step with no host sync,
decode shapes within the batch-size buckets, mask-free attention where lengths allow."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from host_sync import forbid_host_sync
from test_uld_serving import make_random_assistant
from unlearn_serve.server.engine.batch_builder import decode_buckets
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.kv_budget import KVBudgetError, parse_memory
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Selection
from unlearn_serve.server.unlearning.base import UnlearningBackend

PROMPTS = ["The capital of France is", "Once upon a time", "Hello", "A B C D E F G H"]


def _engine(model, tokenizer, **config) -> Engine:
    return Engine(copy.deepcopy(model), tokenizer, EngineConfig(max_model_len=64, **config), "tiny")


def _tokens(results) -> list[list[int]]:
    return [c.token_ids for r in results for c in r.completions]


@pytest.fixture(scope="module")
def per_sequence_bytes(tiny_llama, tokenizer) -> int:
    return _engine(tiny_llama, tokenizer, max_num_seqs=1, assistant_kv_layers=0).kv_layout().bytes_per_seq


# ---------------------------------------------------------------------------------------------- item 2
def test_admission_waits_when_the_kv_budget_is_full(tiny_llama, tokenizer, per_sequence_bytes):
    budget = 2 * per_sequence_bytes + per_sequence_bytes // 2  # two sequences, not three
    engine = _engine(tiny_llama, tokenizer, max_num_seqs=8, assistant_kv_layers=0, kv_cache_memory=budget)
    assert engine.num_slots == 2
    params = [SamplingParams(max_tokens=4 + i, temperature=0.0) for i in range(len(PROMPTS))]
    running = []
    original = engine.step

    def step():
        out = original()
        running.append(engine.num_running())
        return out

    engine.step = step
    engine.allocate_kv()
    allocated = engine.runner.cache.nbytes()
    assert 0 < allocated <= budget
    results = engine.generate(PROMPTS, params)
    assert max(running) == 2 and engine.num_waiting() == 0  # the others waited for a slot, then ran
    assert engine.runner.cache.nbytes() == allocated  # serving allocated no KV
    free = _engine(tiny_llama, tokenizer, max_num_seqs=8).generate(PROMPTS, params)
    assert _tokens(results) == _tokens(free)


def test_assistant_kv_counts_in_the_budget(tiny_llama, tokenizer, per_sequence_bytes):
    budget = 2 * per_sequence_bytes + per_sequence_bytes // 2
    engine = _engine(
        tiny_llama,
        tokenizer,
        max_num_seqs=8,
        assistant_kv_layers=tiny_llama.config.num_hidden_layers,
        kv_cache_memory=budget,
    )
    assert engine.num_slots == 1  # each sequence now also holds an assistant region on every layer


def test_a_budget_below_one_sequence_is_refused_with_the_numbers(tiny_llama, tokenizer, per_sequence_bytes):
    with pytest.raises(KVBudgetError) as err:
        _engine(tiny_llama, tokenizer, assistant_kv_layers=0, kv_cache_memory=per_sequence_bytes - 1)
    message = str(err.value)
    assert "cannot hold one sequence of 64 tokens" in message and "KiB" in message and "\n" not in message


def test_the_cli_refuses_a_too_small_budget_in_one_line(tiny_llama_dir, capsys):
    from unlearn_serve.cli import main

    code = main(["serve", "--model", str(tiny_llama_dir), "--max-model-len", "64", "--kv-cache-memory", "1KiB"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (progress bars aside)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("unlearn-serve serve: error: the KV cache budget")
    assert "--kv-cache-memory: 1.00 KiB" in errors[0] and "cannot hold one sequence of 64 tokens" in errors[0]


def test_memory_sizes_parse():
    assert parse_memory("8GiB") == 8 << 30 and parse_memory("512MiB") == 512 << 20 and parse_memory("1e9") == 10**9
    with pytest.raises(ValueError):
        parse_memory("lots")


# ---------------------------------------------------------------------------------------------- item 3
def test_a_decode_step_completes_with_every_host_sync_forbidden(tiny_llama, tokenizer, tmp_path):
    """Penalties, seeds, top-p, logprobs, an assistant row: the step itself never reads the device."""
    artifact = make_random_assistant(tiny_llama, tmp_path / "a", num_layers=1, seed=3)
    params = [
        SamplingParams(max_tokens=6, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=7, repetition_penalty=1.3),
        SamplingParams(max_tokens=6, temperature=0.0, frequency_penalty=0.5),
        SamplingParams(max_tokens=6, temperature=1.0, top_k=5, seed=3),
    ]
    selections = [None, Selection("a"), Selection("a"), None]
    outputs = []
    for forbid in (False, True):
        engine = _engine(tiny_llama, tokenizer, max_num_seqs=4, sync_free_decode=True)
        engine.load_uld("a", artifact)
        steps = []
        inner = engine._decode_step

        def guarded(state, batch, inner=inner, steps=steps, forbid=forbid, **step_kwargs):
            steps.append(1)
            if not forbid:
                return inner(state, batch, **step_kwargs)
            with forbid_host_sync():
                return inner(state, batch, **step_kwargs)

        engine._decode_step = guarded
        outputs.append(_tokens(engine.generate(PROMPTS, params, selections)))
        assert len(steps) >= 5
    assert outputs[0] == outputs[1]


def test_a_decode_step_with_expert_patch_rows_reads_nothing_from_the_device(tokenizer, tmp_path):
    from unlearn_serve.tiny import build_tiny_model, write_random_expert_patch

    model = build_tiny_model("qwen2_moe", tokenizer, num_layers=2, seed=3)
    patch = write_random_expert_patch(model, 1, 2, tmp_path / "p", seed=7)
    params = SamplingParams(max_tokens=5, temperature=0.0)
    outputs = []
    for forbid in (False, True):
        engine = _engine(model, tokenizer, max_num_seqs=4)
        engine.load_uoe("p", patch)
        inner = engine._decode_step

        def guarded(state, batch, inner=inner, forbid=forbid, **step_kwargs):
            if not forbid:
                return inner(state, batch, **step_kwargs)
            with forbid_host_sync():
                return inner(state, batch, **step_kwargs)

        engine._decode_step = guarded
        outputs.append(_tokens(engine.generate(PROMPTS, params, ["p", None, "p", None])))
    assert outputs[0] == outputs[1]


def test_sync_free_uld_equals_the_candidate_path(tiny_llama, tokenizer, tmp_path):
    artifact = make_random_assistant(tiny_llama, tmp_path / "a", num_layers=2, seed=4)
    results = []
    for sync_free in (False, True):
        engine = _engine(tiny_llama, tokenizer, max_num_seqs=4, sync_free_decode=sync_free)
        engine.load_uld("a", artifact)
        results.append(_tokens(engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0), "a")))
    assert results[0] == results[1]


def test_decode_shapes_stay_within_the_buckets(tiny_llama, tokenizer):
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20] and decode_buckets(4) == [1, 2, 4]
    engine = _engine(tiny_llama, tokenizer, max_num_seqs=6)
    assert decode_buckets(6) == [1, 2, 4, 6]
    shapes = []
    forward = engine.runner.forward

    def spy(batch, lora_rows):
        if not batch.prefill:
            shapes.append((batch.n_target, batch.input_ids.shape[0]))
        return forward(batch, lora_rows)

    engine.runner.forward = spy
    prompts = PROMPTS + ["x y z"]
    engine.generate(prompts, [SamplingParams(max_tokens=2 + 3 * i, temperature=0.0) for i in range(len(prompts))])
    assert {n for n, _ in shapes} - {1, 2, 4, 6} == set() and len({n for n, _ in shapes}) > 1
    assert all(rows == n for n, rows in shapes)


# ---------------------------------------------------------------------------------------------- item 4
def test_attention_is_mask_free_where_lengths_allow(tiny_llama, tokenizer, monkeypatch):
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[2], attn_mask is None, kwargs.get("is_causal", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    engine = _engine(tiny_llama, tokenizer, max_num_seqs=4)
    prompt = tokenizer.encode(PROMPTS[0])
    result = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert calls and all(no_mask for _, no_mask, _ in calls)  # one sequence: no mask tensor, ever
    assert any(q > 1 and causal for q, _, causal in calls)  # its prefill ran as is_causal
    with torch.no_grad():
        ref = tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)[0, len(prompt) :]
    assert result.completions[0].token_ids == ref.tolist()
    calls.clear()
    engine.generate(PROMPTS[:2], SamplingParams(max_tokens=3, temperature=0.0))  # different lengths: masked
    assert any(not no_mask for _, no_mask, _ in calls)


def test_grouped_query_decode_attention_folds_heads_exactly():
    """Decode GQA folds each KV head's query heads into the query length instead of `enable_gqa` (which on
    CUDA, with a mask, only the math kernel supports): the same attention."""
    import torch.nn.functional as F
    from unlearn_serve.server.engine.kv_cache import _decode_gqa, decode_mask

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 1, 8, 16, generator=gen).transpose(1, 2)  # [rows, heads, 1, dim], strided as HF's
    k, v = torch.randn(2, 3, 2, 10, 16, generator=gen)
    for mask in (None, decode_mask(torch.tensor([2, 9, 5]), 10)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert torch.allclose(_decode_gqa(q, k, v, mask, None), want, atol=1e-6)


# ---------------------------------------------------------------------------------------------- item 1
@dataclass
class _Ban:
    name: str
    token: int
    uses_assistant: bool = False


class _BanTokenBackend(UnlearningBackend):
    """A third unlearning method, for the test only: its artifact is a token id its rows never emit."""

    kind = "ban"

    def __init__(self) -> None:
        self.banned: dict[str, int] = {}
        self.unloading: set[str] = set()

    def names(self) -> list[str]:
        return list(self.banned)

    def resolve(self, name, options):
        return _Ban(name, self.banned[name]) if name in self.banned and name not in self.unloading else None

    def read(self, name, path):
        return name, int(path)

    def install(self, prepared):
        self.banned[prepared[0]] = prepared[1]

    def remove(self, name):
        del self.banned[name]
        self.unloading.discard(name)

    def mark_unloading(self, name):
        self.unloading.add(name)

    def is_unloading(self, name):
        return name in self.unloading

    def prepare(self, rows, batch):
        hits = [(j, rows.choices[t].token) for j, (t, _) in enumerate(rows.logit_rows) if rows.choices[t]]
        if not hits:
            return None
        return tuple(torch.tensor(v, device=rows.device) for v in zip(*hits, strict=True))

    def process_logits(self, plan, logits, assistant_hidden, early_exit_hidden=None):
        rows, tokens = plan
        return logits.index_put((rows, tokens), torch.tensor(float("-inf"), device=logits.device))


def test_a_third_unlearning_method_plugs_in_without_engine_changes(tiny_llama, tokenizer):
    engine = _engine(tiny_llama, tokenizer, max_num_seqs=4)
    engine.artifacts.backends.append(_BanTokenBackend())
    params = SamplingParams(max_tokens=6, temperature=0.0)
    plain = _tokens(engine.generate(PROMPTS[:2], params))
    banned = plain[0][1]  # a token the first prompt's greedy output uses (at its second step: a decode step)
    engine.artifacts.load("ban", "no-x", str(banned))
    assert "no-x" in engine.artifact_names()
    mixed = _tokens(engine.generate(PROMPTS[:2], params, ["no-x", None]))
    assert banned not in mixed[0] and mixed[0][:1] == plain[0][:1] and mixed[1] == plain[1]
    assert engine.unload("no-x").is_set() and engine.artifact_names() == []
