"""The early-exit gate (uld_combine.py): the penalty only where the assistant prefers a candidate by more than the
target cut after the assistant's K layers does. Checked against a two-model reference (the early exit computed by
the peft assistant with its adapter disabled), through both heads, decode and prefill, eager and graphed."""

from __future__ import annotations

import pytest
import torch
from graph_standin import RecordedGraphs
from test_cuda_graphs import PROMPTS as GRAPH_PROMPTS
from test_cuda_graphs import _engine, _params, _tokens
from test_uld_serving import (
    OPTS,
    assert_follows_reference,
    assert_scores_follow_reference,
    make_random_assistant,
    reference_combined_logprobs,
)
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Selection

from unlearn_serve.uld_combine import (
    CombineOptionError,
    CombineOptions,
    CombineSettings,
    assistant_penalty,
)

GATED = {"gate": "early_exit"}


def test_gated_penalty_only_where_the_lora_added_a_preference():
    keep = torch.ones(2, 5, dtype=torch.bool)
    assistant = torch.tensor([[0.0, 5.0, 5.0, 0.0, 0.0], [0.0, 5.0, 5.0, 0.0, 0.0]])
    # the early exit already prefers token 1 as much (a generic word the K layers predict): only token 2 is learnt
    early = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0, 0.0]])
    ungated = assistant_penalty(assistant, keep, True, 1.0)
    assert ungated[:, 1].tolist() == [4.0, 4.0] and ungated[:, 2].tolist() == [4.0, 4.0]
    gated = assistant_penalty(assistant, keep, True, 1.0, early, True)
    assert gated[:, 1].tolist() == [0.0, 0.0] and gated[:, 2].tolist() == [4.0, 4.0]
    # per-row gate: row 0 gated, row 1 not
    mixed = assistant_penalty(assistant, keep, True, 1.0, early, torch.tensor([True, False]))
    assert torch.equal(mixed[0], gated[0]) and torch.equal(mixed[1], ungated[1])


def test_gate_option_is_checked_and_reaches_the_settings():
    opts = CombineOptions().updated({"rule": "prefer", "gate": "early_exit"})
    assert opts.gate == "early_exit"
    with pytest.raises(CombineOptionError) as caught:
        CombineOptions().updated({"rule": "prefer", "gate": "sideways"})
    assert caught.value.key == "gate" and "early_exit" in str(caught.value)
    with pytest.raises(CombineOptionError) as caught:  # the gate reads the prefer rule's preference
        CombineOptions().updated({"rule": "difference", "gate": "early_exit"})
    assert caught.value.key == "gate"
    # a gated artifact scored under the difference rule (eval --uld-options rule=difference) drops its gate
    assert opts.updated({"rule": "difference"}).gate is None and opts.updated({"margin": 2}).gate == "early_exit"
    settings = CombineSettings.of_rows([opts, CombineOptions(rule="prefer")], [0.01, 0.01], "cpu")
    assert settings.gate.tolist() == [True, False] and settings.any_gate
    assert not CombineSettings.of_rows([CombineOptions()], [0.01], "cpu").any_gate


@pytest.fixture(scope="module")
def gated_artifacts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("gated")
    return {
        "g1": make_random_assistant(tiny_llama, root / "g1", num_layers=1, seed=1, defaults=GATED),
        "g2": make_random_assistant(tiny_llama, root / "g2", num_layers=2, seed=2, defaults=GATED),
        "u1": make_random_assistant(tiny_llama, root / "u1", num_layers=1, seed=1),  # g1's weights, ungated
    }


@pytest.mark.parametrize("head", ["plausible-only head", "full-vocabulary head"])
def test_gated_rows_equal_the_two_model_reference(tiny_llama, tokenizer, gated_artifacts, head, monkeypatch):
    """Two gated adapters of different K, an ungated one and a plain row in one batch; decode and prefill."""
    import unlearn_serve.server.unlearning.backends as backends

    if head == "full-vocabulary head":
        monkeypatch.setattr(backends, "ULD_MAX_CANDIDATES", 0)
    engine = _engine(tiny_llama, tokenizer, max_model_len=128)
    for name, path in gated_artifacts.items():
        engine.load_uld(name, path)
    opts = {**OPTS, "alpha": 2.0}
    alpha_filter = {"alpha": opts["alpha"], "filt": opts["filter"]}
    prompts = [tokenizer.encode(p) for p in ("The capital of France is", "Alice likes", "Bob plays the", "The")]
    selections = [Selection("g1", opts), Selection("g2", opts), Selection("u1", opts), None]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    results = engine.generate(prompts, params, selections)
    outputs = {sel.name: r.completions[0] for sel, r in zip(selections, results, strict=True) if sel}
    for prompt, sel in zip(prompts[:2], selections[:2], strict=True):
        completion = outputs[sel.name]
        full = prompt + completion.token_ids
        k = {"g1": 1, "g2": 2}[sel.name]
        decode = {"tokenizer": tokenizer, "generated_from": len(prompt)}  # finishing words act past the prompt
        ref = reference_combined_logprobs(tiny_llama, gated_artifacts[sel.name], k, full, **alpha_filter, **decode)
        if sel.name == "g1":  # the gate must matter here: u1 is g1's weights, ungated
            ungated = reference_combined_logprobs(tiny_llama, gated_artifacts["u1"], k, full, **alpha_filter, **decode)
            assert (ref.exp() - ungated.exp()).abs().max() > 0.05
        assert_follows_reference(prompt, completion, ref)
    # prefill: prompt log-probs under the gated combination
    prompt = prompts[0]
    scored = engine.score([prompt[:2]] * 2, [prompt[2:]] * 2, selections[:2])
    for sel, values in zip(selections[:2], scored, strict=True):
        k = {"g1": 1, "g2": 2}[sel.name]
        ref = reference_combined_logprobs(
            tiny_llama, gated_artifacts[sel.name], k, prompt, **alpha_filter, tokenizer=tokenizer
        )
        assert_scores_follow_reference(prompt, values, ref)


def test_the_gate_removes_what_the_early_exit_already_predicts(tiny_llama, tokenizer, tmp_path):
    """An assistant whose LoRA adds nothing is its early exit: gated it changes no token and no log-probability,
    ungated the same weights do (the crude-LM preference the gate exists to leave alone)."""
    gated = make_random_assistant(tiny_llama, tmp_path / "g", num_layers=1, seed=0, defaults=GATED)
    ungated = make_random_assistant(tiny_llama, tmp_path / "u", num_layers=1, seed=0)
    for artifact in (gated, ungated):  # LoRA B = 0: the adapter's output is exactly zero
        from safetensors.torch import load_file, save_file

        weights = load_file(artifact / "adapter_model.safetensors")
        save_file(
            {k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, artifact / "adapter_model.safetensors"
        )
    engine = _engine(tiny_llama, tokenizer, max_model_len=128)
    engine.load_uld("gated", gated)
    engine.load_uld("ungated", ungated)
    prompts = [tokenizer.encode(p) for p in ("The capital of France is", "Alice likes", "Bob plays the")]
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)
    opts = {"alpha": 5.0, "filter": 0.0}  # no candidate filter: only the penalty can change anything
    plain = engine.generate(prompts, params)
    for name, same in (("gated", True), ("ungated", False)):
        out = engine.generate(prompts, params, [Selection(name, opts)] * len(prompts))
        equal = all(
            p.completions[0].token_ids == o.completions[0].token_ids
            and [e.logprob for e in p.completions[0].logprobs]
            == pytest.approx([e.logprob for e in o.completions[0].logprobs], abs=1e-5)
            for p, o in zip(plain, out, strict=True)
        )
        assert equal is same, name


def test_gated_decode_graphed_equals_eager(tiny_llama, tokenizer, gated_artifacts):
    """Gated and ungated rows in ULD graphs (the early exits' source rows in a persistent buffer) decode as eager."""
    selections = [None, "g1", "u1", "g1", None, "u1", "g1", None, "g1"]
    params = _params()
    params[1] = _params(1, temperature=0.9, top_p=0.9, seed=5)
    params[3] = _params(3, logprobs=3)
    outputs = []
    for graphs in (None, RecordedGraphs()):
        engine = _engine(tiny_llama, tokenizer, graphs)
        engine.load_uld("g1", gated_artifacts["g1"])
        engine.load_uld("u1", gated_artifacts["u1"])
        sel = [None if s is None else Selection(s, {"alpha": 2.0, "filter": 1e-4}) for s in selections]
        outputs.append(engine.generate(GRAPH_PROMPTS, params, sel))
    assert _tokens(outputs[0]) == _tokens(outputs[1])
    got, want = outputs[1][3].completions[0].logprobs, outputs[0][3].completions[0].logprobs
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-5)
    gated_keys = [key for key in engine.graphs.graphs if len(key) == 6 and key[5]]
    assert gated_keys  # the gated batches were graph replays, not eager fallbacks
