"""Graphed decode (issue 15, item 3): one captured forward per (batch bucket, length bucket), driven on
CPU by a stand-in that records the step's tensor ops once and replays them on the same memory
(tests/graph_standin.py), so the engine's graph path runs here exactly as it would on CUDA, except
for the kernels themselves. Nothing in this file ran on a GPU."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from graph_standin import RecordedGraphs
from host_sync import forbid_host_sync
from test_uld_serving import make_random_assistant
from unlearn_serve.server.engine.batch_builder import decode_buckets
from unlearn_serve.server.engine.cuda_graphs import length_buckets
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.sampling_params import SamplingParams

# Mixed prompt lengths; more prompts than slots (rows finish, new ones arrive); the longest runs sit in
# the lowest slots, so the batch bucket shrinks as the others finish; 64-token slots: length buckets 16/32/64.
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "Hello",
    "A B C D E F G H",
    "x y z",
    "Bob plays the",
    "Water boils at",
    "Alice likes",
    "one two three four five six",
]
MAX_TOKENS = [44, 30, 22, 14, 9, 6, 3, 5, 4]


def _engine(model, tokenizer, graphs=None, **config) -> Engine:
    config = {"max_model_len": 64, "max_num_seqs": 6, **config}
    return Engine(copy.deepcopy(model), tokenizer, EngineConfig(**config), "tiny", graph_capture=graphs)


def _tokens(results) -> list[list[int]]:
    return [c.token_ids for r in results for c in r.completions]


def _params(i: int | None = None, **extra):
    """Greedy params per prompt (or prompt i's, with `extra`), each running its full max_tokens."""
    if i is not None:
        return SamplingParams(max_tokens=MAX_TOKENS[i], ignore_eos=True, **{"temperature": 0.0, **extra})
    return [_params(j) for j in range(len(MAX_TOKENS))]


def _has_unlearning_rows(state) -> bool:
    return any(seq is not None and seq.request.backend is not None for seq in state.rows)


def test_length_buckets():
    assert length_buckets(64) == [16, 32, 64] and length_buckets(100) == [16, 32, 64, 100]
    assert length_buckets(4096) == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096] and length_buckets(8) == [8]


def test_graphed_decode_equals_eager_across_buckets(tiny_llama, tokenizer):
    params = _params()
    params[1] = _params(1, temperature=0.9, top_p=0.9, seed=5, repetition_penalty=1.2)
    params[2] = _params(2, logprobs=3, frequency_penalty=0.4)
    eager = _engine(tiny_llama, tokenizer).generate(PROMPTS, params)
    graphs = RecordedGraphs()
    engine = _engine(tiny_llama, tokenizer, graphs)
    graphed = engine.generate(PROMPTS, params)
    assert _tokens(graphed) == _tokens(eager)
    got = graphed[2].completions[0].logprobs
    want = eager[2].completions[0].logprobs
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-5)
    keys = set(engine.graphs.graphs)
    assert {rows for rows, _ in keys} <= set(decode_buckets(6)) and {view for _, view in keys} <= {16, 32, 64}
    assert len({rows for rows, _ in keys}) >= 3 and len({view for _, view in keys}) == 3  # crossed both kinds
    assert graphs.captures == len(keys)  # one capture per shape, then replays
    assert graphs.replays > 3 * graphs.captures


def test_padded_rows_never_change_live_kv(tiny_llama, tokenizer):
    engine = _engine(tiny_llama, tokenizer, RecordedGraphs())
    inner = engine._decode_step
    padded_steps = []

    def checked(state, batch, **step_kwargs):
        assert state.graphed
        cache = engine.runner.cache
        before = [k.clone() for k in cache.keys] + [v.clone() for v in cache.values]
        out = inner(state, batch, **step_kwargs)
        after = list(cache.keys) + list(cache.values)
        live = {i: seq.total_len - 1 for i, seq in enumerate(state.rows) if seq is not None}
        padded_steps.append(len(live) < len(state.rows))
        for old, new in zip(before, after, strict=True):
            for slot in range(old.shape[0]):
                changed = (old[slot] != new[slot]).any(dim=(0, 2)).nonzero().flatten().tolist()  # positions
                if slot in live:  # a live row writes its own position only
                    assert set(changed) <= {live[slot]}, (slot, changed)
                else:  # a free slot (a padding row's scratch) may change; a slot beyond the bucket may not
                    assert slot < len(state.rows) or not changed
        return out

    engine._decode_step = checked
    engine.generate(PROMPTS, _params())
    assert sum(padded_steps) >= 5


def test_enforce_eager_and_cpu_default_take_no_graphs(tiny_llama, tokenizer):
    graphs = RecordedGraphs()
    engine = _engine(tiny_llama, tokenizer, graphs, enforce_eager=True)
    eager = engine.generate(PROMPTS[:4], _params()[:4])
    assert engine.graphs is None and graphs.captures == 0
    cpu = _engine(tiny_llama, tokenizer)  # no capture mechanism given, not on CUDA: eager
    assert _tokens(cpu.generate(PROMPTS[:4], _params()[:4])) == _tokens(eager)
    assert cpu.graphs is None and cpu.builder.graphs is None


def test_eager_cuda_forwards_keep_cudnn_attention_out():
    """cuDNN's SDPA builds a plan per new shape: 41 of the 59 ms of an eager decode step on an H200 (1B model, 32
    rows; 2026-12-04), as an eager step's key length grows every step. Eager CUDA forwards take flash / memory-
    efficient / math; the CPU keeps the defaults (and CUDA graphs: the next test)."""
    from unlearn_serve.server.engine.model_runner import eager_attention_backends

    with eager_attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the forward
    with eager_attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_every_engine_forward_runs_under_the_eager_attention_backends(tiny_llama, tokenizer, monkeypatch):
    from unlearn_serve.server.engine import model_runner

    seen: list[torch.device] = []
    real = model_runner.eager_attention_backends
    monkeypatch.setattr(model_runner, "eager_attention_backends", lambda device: seen.append(device) or real(device))
    _engine(tiny_llama, tokenizer).generate(PROMPTS[:2], _params()[:2])
    assert len(seen) >= 3 and all(d.type == "cpu" for d in seen)  # the prefill and every decode step
    # the graph runner's forwards (warm-up, capture, replay's eager fallback) keep the defaults: a plan built only
    # inside the capture (the warm-up having run without cuDNN) invalidated every capture on an H200 (2026-12-04)
    seen.clear()
    graphs = RecordedGraphs()
    engine = _engine(tiny_llama, tokenizer, graphs)
    engine.generate(PROMPTS[:2], _params()[:2])
    prefills = 1
    assert graphs.captures >= 1 and len(seen) == prefills


def test_a_graphed_step_completes_with_every_host_sync_forbidden(tiny_llama, tokenizer):
    """Capture and replay included: neither reads the device (a CUDA capture would fail on a read)."""
    params = _params()
    params[0] = _params(0, temperature=1.0, top_k=5, seed=3, presence_penalty=0.3)
    params[3] = _params(3, logprobs=2)
    graphs = RecordedGraphs()
    engine = _engine(tiny_llama, tokenizer, graphs)
    inner = engine._decode_step

    def guarded(state, batch, **step_kwargs):
        with forbid_host_sync():
            return inner(state, batch, **step_kwargs)

    engine._decode_step = guarded
    result = _tokens(engine.generate(PROMPTS, params))
    assert graphs.captures >= 3 and result == _tokens(_engine(tiny_llama, tokenizer).generate(PROMPTS, params))


def _spied_engine(model, tokenizer, graphs, seen: list, **config) -> Engine:
    """An engine whose decode steps record (graphed plain, graphed ULD, has unlearning rows)."""
    engine = _engine(model, tokenizer, graphs, **config)
    inner = engine._decode_step

    def spy(state, batch, **step_kwargs):
        seen.append((state.graphed, state.uld_graph is not None, _has_unlearning_rows(state)))
        return inner(state, batch, **step_kwargs)

    engine._decode_step = spy
    return engine


@pytest.mark.parametrize("sync_free", [False, True])
def test_uld_batches_are_graphed_and_decode_as_eager(tiny_llama, tokenizer, tmp_path, sync_free):
    """Target rows stacked with ULD assistant rows of two adapters (same K), mixed with plain rows: one graph per
    (rows, assistant rows, view, K, layout), the same tokens as eager (greedy, sampled, penalised, logprobs)."""
    a = make_random_assistant(tiny_llama, tmp_path / "a", num_layers=1, seed=3)
    b = make_random_assistant(tiny_llama, tmp_path / "b", num_layers=1, seed=4, rank=8)
    selections = [None, "b", None, "a", None, "a", "b", None, "a"]
    params = _params()
    params[1] = _params(1, temperature=0.9, top_p=0.9, seed=5, repetition_penalty=1.2)
    params[3] = _params(3, logprobs=3, frequency_penalty=0.4)
    outputs, seen = [], []
    for graphs in (None, RecordedGraphs()):
        engine = _spied_engine(tiny_llama, tokenizer, graphs, seen, sync_free_decode=sync_free)
        engine.load_uld("a", a)
        engine.load_uld("b", b)
        outputs.append(engine.generate(PROMPTS, params, selections))
        assert engine.uld.graphs is (graphs is not None)  # no graph inputs are built for an eager engine
    assert _tokens(outputs[0]) == _tokens(outputs[1])
    got, want = outputs[1][3].completions[0].logprobs, outputs[0][3].completions[0].logprobs
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-5)
    uld_keys = [key for key in engine.graphs.graphs if len(key) == 6]
    assert len(uld_keys) >= 3 and {k for _, _, _, k, _, _ in uld_keys} == {1}
    assert (False, True, True) in seen and (True, False, False) in seen  # ULD batches and, later, plain ones
    assert not any(graphed and uld for graphed, uld, _ in seen)
    assert all(uld for graphed, uld, unlearned in seen[len(seen) // 2 :] if unlearned)  # the graphed engine's
    assert graphs.replays > 2 * graphs.captures
    # the unlearning acted: the same prompts without it decode otherwise
    plain = _engine(tiny_llama, tokenizer).generate(PROMPTS, params)
    assert _tokens(plain) != _tokens(outputs[1])


def test_a_graphed_uld_step_reads_nothing_back_from_the_device(tiny_llama, tokenizer, tmp_path):
    """With the sync-free combination (CUDA's default) the whole ULD step, capture and replay included, runs with
    every host read forbidden."""
    a = make_random_assistant(tiny_llama, tmp_path / "a", num_layers=2, seed=3)
    graphs, seen = RecordedGraphs(), []
    engine = _spied_engine(tiny_llama, tokenizer, graphs, seen, sync_free_decode=True)
    engine.load_uld("a", a)
    inner = engine._decode_step

    def guarded(state, batch, **step_kwargs):
        with forbid_host_sync():
            return inner(state, batch, **step_kwargs)

    engine._decode_step = guarded
    selections = ["a", None, "a", "a", None, None, "a", None, "a"]
    result = _tokens(engine.generate(PROMPTS, _params(), selections))
    eager = _engine(tiny_llama, tokenizer, sync_free_decode=True)
    eager.load_uld("a", a)
    assert result == _tokens(eager.generate(PROMPTS, _params(), selections))
    assert any(uld for _, uld, _ in seen) and graphs.captures >= 3


def test_uld_batches_of_two_depths_run_eagerly(tiny_llama, tokenizer, tmp_path):
    a = make_random_assistant(tiny_llama, tmp_path / "a", num_layers=1, seed=3)
    b = make_random_assistant(tiny_llama, tmp_path / "b", num_layers=2, seed=4)
    selections = ["a", "b", None, None, None, None, "a", None, None]  # the two depths share the first steps
    outputs, seen = [], []
    for graphs in (None, RecordedGraphs()):
        engine = _spied_engine(tiny_llama, tokenizer, graphs, seen)
        engine.load_uld("a", a)
        engine.load_uld("b", b)
        outputs.append(_tokens(engine.generate(PROMPTS, _params(), selections)))
    assert outputs[0] == outputs[1]
    graphed_run = seen[len(seen) // 2 :]
    assert (False, False, True) in graphed_run  # both depths in the batch: eager
    assert (False, True, True) in graphed_run  # "b" finished, "a" alone: graphed


def test_loading_an_assistant_drops_the_graphs_of_the_old_adapter_layout(tiny_llama, tokenizer, tmp_path):
    """A load restacks every adapter's LoRA into new tensors: graphs that point at the old ones must go."""
    a = make_random_assistant(tiny_llama, tmp_path / "a", num_layers=1, seed=3)
    b = make_random_assistant(tiny_llama, tmp_path / "b", num_layers=1, seed=4)
    selections = ["a", None, "a", None]
    graphs = RecordedGraphs()
    engine = _engine(tiny_llama, tokenizer, graphs)
    engine.load_uld("a", a)
    first = _tokens(engine.generate(PROMPTS[:4], _params()[:4], selections))
    versions = {key[4] for key in engine.graphs.graphs if len(key) == 6}
    engine.load_uld("b", b)
    second = _tokens(engine.generate(PROMPTS[:4], _params()[:4], ["b", "a", None, "a"]))
    after = {key[4] for key in engine.graphs.graphs if len(key) == 6}
    assert len(versions) == 1 and len(after) == 1 and versions != after
    eager = _engine(tiny_llama, tokenizer)
    eager.load_uld("a", a)
    assert first == _tokens(eager.generate(PROMPTS[:4], _params()[:4], selections))
    eager.load_uld("b", b)
    assert second == _tokens(eager.generate(PROMPTS[:4], _params()[:4], ["b", "a", None, "a"]))
    engine.unload("b")
    engine.step()  # no request pins it: removed at the next step
    assert engine.artifact_names() == ["a"]
    assert _tokens(engine.generate(PROMPTS[:4], _params()[:4], selections)) == first
    assert {key[4] for key in engine.graphs.graphs if len(key) == 6} - after  # a third layout, its own graphs


class _Failing:
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_falls_back_to_eager(tiny_llama, tokenizer, caplog):
    engine = _engine(tiny_llama, tokenizer, _Failing())
    result = _tokens(engine.generate(PROMPTS, _params()))
    assert result == _tokens(_engine(tiny_llama, tokenizer).generate(PROMPTS, _params()))
    assert not engine.graphs.enabled and "decoding eagerly from now on" in caplog.text


def test_the_stand_in_replays_stale_inputs_like_a_cuda_graph():
    """Why the stand-in can catch a step that is not capturable: only persistent tensors are live on replay."""
    persistent, out = torch.tensor([1.0, 2.0]), torch.zeros(2)
    per_call = {"x": torch.tensor([10.0, 20.0])}
    graphs = RecordedGraphs()
    replay = graphs.capture(lambda: out.copy_(persistent * 2 + per_call["x"]))
    persistent.copy_(torch.tensor([3.0, 4.0]))
    per_call["x"] = torch.tensor([100.0, 200.0])  # a new tensor: the recorded ops still read the old one
    replay()
    assert out.tolist() == [16.0, 28.0]


def test_enforce_eager_flag_reaches_the_engine_config(tiny_llama_dir):
    from unlearn_serve.cli.serve import build_engine, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    base = ["--model", str(tiny_llama_dir), "--device", "cpu", "--max-model-len", "64", "--max-num-seqs", "2"]
    assert parser.parse_args(base).enforce_eager is False
    engine = build_engine(parser.parse_args([*base, "--enforce-eager"]))
    assert engine.config.enforce_eager is True and engine.graphs is None


def test_a_moe_model_with_expert_patch_rows_graphs_its_plain_batches(tokenizer, tmp_path):
    from unlearn_serve.tiny import build_tiny_model, write_random_expert_patch

    model = build_tiny_model("qwen2_moe", tokenizer, num_layers=2, seed=3)
    patch = write_random_expert_patch(model, 1, 2, tmp_path / "p", seed=7)
    selections = [None, None, "p", None, "p", None, None, None, None]  # the patched rows finish early
    outputs, seen = [], []
    for graphs in (None, RecordedGraphs()):
        engine = _engine(model, tokenizer, graphs)
        engine.load_uoe("p", patch)  # its hooks sit on the model; plain rows take the base path through them
        inner = engine._decode_step

        def spy(state, batch, inner=inner, **step_kwargs):
            seen.append((state.graphed, _has_unlearning_rows(state)))
            return inner(state, batch, **step_kwargs)

        engine._decode_step = spy
        outputs.append(_tokens(engine.generate(PROMPTS, _params(), selections)))
    assert outputs[0] == outputs[1] and graphs.captures >= 2 and engine.graphs.enabled
    assert (True, True) not in seen and (True, False) in seen and (False, True) in seen


def test_models_that_must_not_be_graphed_run_eagerly(tiny_llama, tokenizer):
    from unlearn_serve.server.engine.cuda_graphs import graph_unsupported

    model = copy.deepcopy(tiny_llama)
    assert graph_unsupported(model) is None
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    assert "several devices" in graph_unsupported(model)
    del model.hf_device_map
    model.get_decoder().rotary_emb.rope_type = "dynamic"
    assert "dynamic rotary" in graph_unsupported(model)
    graphs = RecordedGraphs()
    engine = Engine(model, tokenizer, EngineConfig(max_model_len=64, max_num_seqs=2), "tiny", graph_capture=graphs)
    engine.allocate_kv()
    assert engine.graphs is None and graphs.captures == 0
