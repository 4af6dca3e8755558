"""ULD assistants and UOE expert patches loaded on one MoE engine: each row of a batch that mixes
assistant rows, patched rows and plain rows gets exactly what it would get alone."""

from __future__ import annotations

import copy

import pytest
from test_uld_serving import make_random_assistant, reference_combined_logprobs
from unlearn_serve.server.engine.engine import Engine, EngineConfig, UnknownArtifactError
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Selection

from unlearn_serve.families import get_family
from unlearn_serve.tiny import build_tiny_model, write_random_expert_patch

PROMPTS = ["The capital of", "Alice likes", "Bob plays the", "Water boils at one", "The", "Green apples"]
# loose filter: the random tiny MoE is not confident, but keep the test on the plausible-set path
ULD_OPTS = {"alpha": 1.0, "filter": 1e-3}


@pytest.fixture(scope="module")
def moe_engine(tokenizer, tmp_path_factory):
    model = build_tiny_model("qwen2_moe", tokenizer, num_layers=2, seed=3)
    family = get_family(model)
    root = tmp_path_factory.mktemp("together")
    # margin 0: this random assistant's preferences on the tiny MoE are all below the default margin of 1
    make_random_assistant(model, root / "uld", num_layers=1, seed=5, defaults={"margin": 0.0})
    layer = sorted(family.moe_layers(model))[-1]
    write_random_expert_patch(model, layer, 1, root / "uoe", seed=7)
    engine = Engine(copy.deepcopy(model), tokenizer, EngineConfig(max_num_seqs=8, max_model_len=64), "tiny-moe")
    engine.load_uld("forget-uld", root / "uld")
    engine.load_uoe("forget-uoe", root / "uoe")
    engine.reference = (model, root / "uld")  # for the two-model reference below
    return engine


def _run(engine, tokenizer, prompts, selections):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    results = engine.generate([tokenizer.encode(p) for p in prompts], params, selections)
    return [(r.completions[0].token_ids, [e.logprob for e in r.completions[0].logprobs]) for r in results]


def test_mixed_uld_uoe_and_base_rows_equal_each_alone(moe_engine, tokenizer):
    selections = [
        Selection("forget-uld", ULD_OPTS),
        Selection("forget-uoe"),
        None,
        Selection("forget-uoe"),
        Selection("forget-uld", ULD_OPTS),
        None,
    ]
    mixed = _run(moe_engine, tokenizer, PROMPTS, selections)
    alone = [_run(moe_engine, tokenizer, [p], [s])[0] for p, s in zip(PROMPTS, selections, strict=True)]
    base = _run(moe_engine, tokenizer, PROMPTS, [None] * len(PROMPTS))
    for (m_ids, m_lp), (a_ids, a_lp) in zip(mixed, alone, strict=True):
        assert m_ids == a_ids
        assert m_lp == pytest.approx(a_lp, abs=1e-4)
    # both kinds of unlearning really changed their rows, and plain rows are the base model's
    for i, sel in enumerate(selections):
        if sel is None:
            assert mixed[i][0] == base[i][0]
            assert mixed[i][1] == pytest.approx(base[i][1], abs=1e-4)
    changed = {
        name: any(
            mixed[i][1] != pytest.approx(base[i][1], abs=1e-3)
            for i, s in enumerate(selections)
            if s is not None and s.name == name
        )
        for name in ("forget-uld", "forget-uoe")
    }
    assert changed == {"forget-uld": True, "forget-uoe": True}


def test_uld_rows_on_moe_equal_two_model_reference(moe_engine, tokenizer):
    """The stacked assistant rows (LoRA on attention and the shared expert) against a peft assistant."""
    model, uld_dir = moe_engine.reference
    prompt = tokenizer.encode(PROMPTS[1])
    ids, logprobs = _run(moe_engine, tokenizer, [PROMPTS[1], PROMPTS[2]], [Selection("forget-uld", ULD_OPTS), None])[0]
    ref = reference_combined_logprobs(
        model, uld_dir, 1, prompt + ids, ULD_OPTS["alpha"], ULD_OPTS["filter"], tokenizer=tokenizer,
        generated_from=len(prompt),
    )
    for step, (token, value) in enumerate(zip(ids, logprobs, strict=True)):
        row = ref[len(prompt) - 1 + step]
        assert token == int(row.argmax())
        assert value == pytest.approx(float(row[token]), abs=1e-4)


def test_both_kinds_listed_and_unloaded_independently(moe_engine, tokenizer):
    assert set(moe_engine.artifact_names()) == {"forget-uld", "forget-uoe"}
    selections = [Selection("forget-uld", ULD_OPTS), None]
    before = _run(moe_engine, tokenizer, PROMPTS[:2], selections)
    moe_engine.unload("forget-uoe").wait(10)
    assert moe_engine.artifact_names() == ["forget-uld"]
    # removing the patch's hooks leaves the assistant rows and the base rows exactly as they were
    after = _run(moe_engine, tokenizer, PROMPTS[:2], selections)
    for (b_ids, b_lp), (a_ids, a_lp) in zip(before, after, strict=True):
        assert b_ids == a_ids
        assert b_lp == pytest.approx(a_lp, abs=1e-5)
    with pytest.raises(UnknownArtifactError, match="forget-uoe"):
        _run(moe_engine, tokenizer, PROMPTS[:1], [Selection("forget-uoe")])
