"""ULD at serving time: the single-pass stacked path against a reference two-model computation,
mixed batches, the plausibility filter, and artifact loading in the engine."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from server.engine.engine import Engine, EngineConfig, UnknownArtifactError
from server.engine.sampling_params import SamplingParams
from server.unlearning.uld import combine_logits
from unlearn_serve.artifact import ArtifactError, fingerprint_model
from unlearn_serve.assistant import assistant_logits, assistant_lora_config
from unlearn_serve.tiny import build_tiny_model
from unlearn_serve.uld_artifact import save_uld_artifact

PROMPTS = ["The capital of", "Alice likes", "Bob plays the", "Water boils at one", "The"]


def make_random_assistant(base, out_dir, num_layers: int, seed: int, rank: int = 4):
    """A ULD artifact with random (non-zero) LoRA weights on the first `num_layers` layers of `base`."""
    model = copy.deepcopy(base)
    fingerprint = fingerprint_model(model)
    peft_model = get_peft_model(model, assistant_lora_config(model, num_layers, rank=rank, alpha=2 * rank))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    details = {"assistant_layers": num_layers, "lora_rank": rank, "lora_alpha": 2 * rank}
    save_uld_artifact(peft_model, out_dir, fingerprint, details, {})
    return out_dir


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("uld-artifacts")
    return {
        "a1": make_random_assistant(tiny_llama, root / "a1", num_layers=1, seed=1),
        "a2": make_random_assistant(tiny_llama, root / "a2", num_layers=2, seed=2),
    }


@pytest.fixture(scope="module")
def engine(tiny_llama, tokenizer, artifacts):
    eng = Engine(copy.deepcopy(tiny_llama), tokenizer, EngineConfig(max_num_seqs=6, max_model_len=128), "tiny")
    eng.load_uld("a1", artifacts["a1"])
    eng.load_uld("a2", artifacts["a2"])
    return eng


def reference_combined_logprobs(base, tokenizer, artifact_dir, num_layers, ids, alpha, filt):
    """Two separate models: the target's full forward, and a peft assistant truncated after K layers."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        target = base(ids_t).logits[0]
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(artifact_dir))
        assistant = assistant_logits(peft_model, ids_t, None, num_layers)[0]
    log_filter = torch.full((len(ids),), float(torch.tensor(filt).log()))
    combined = combine_logits(target, assistant, torch.full((len(ids),), alpha), log_filter)
    return combined.log_softmax(-1)


@pytest.mark.parametrize("name,num_layers", [("a1", 1), ("a2", 2)])
def test_single_pass_equals_two_model_reference(engine, tiny_llama, tokenizer, artifacts, name, num_layers):
    prompt = tokenizer.encode("The capital of France is")
    # decode path: greedy generation with logprobs, checked by teacher forcing through the reference
    result = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True), name)[0]
    completion = result.completions[0]
    full = prompt + completion.token_ids
    ref = reference_combined_logprobs(tiny_llama, tokenizer, artifacts[name], num_layers, full, 0.75, 0.01)
    for step, entry in enumerate(completion.logprobs):
        row = ref[len(prompt) - 1 + step]
        assert entry.token_id == int(row.argmax())
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
    # prefill path: prompt log-probs (score) under the combined distribution
    scored = engine.score([prompt[:2]], [prompt[2:]], name)[0]
    for j, value in enumerate(scored):
        assert value == pytest.approx(float(ref[1 + j, prompt[2 + j]]), abs=1e-4)


def test_alpha_zero_equals_base_exactly(engine, tokenizer):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)
    base = engine.generate(PROMPTS, params)
    from server.engine.sequence import Selection

    zero = engine.generate(PROMPTS, params, [Selection("a1", {"alpha": 0.0, "filter": 0.0})] * len(PROMPTS))
    for b, z in zip(base, zero, strict=True):
        assert b.completions[0].token_ids == z.completions[0].token_ids
        assert [e.logprob for e in b.completions[0].logprobs] == pytest.approx(
            [e.logprob for e in z.completions[0].logprobs], abs=1e-5
        )


def test_mixed_batch_rows_are_independent(engine):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    selections = [None, "a1", "a2", None, "a2", "a1"]
    prompts = PROMPTS + ["Alice"]
    together = engine.generate(prompts, params, selections)
    alone = [engine.generate([p], params, s)[0] for p, s in zip(prompts, selections, strict=True)]
    assert [r.completions[0].token_ids for r in together] == [r.completions[0].token_ids for r in alone]
    # and unlearning changes something, or this test would prove nothing
    plain = engine.generate(prompts, params)
    assert any(
        t.completions[0].token_ids != p.completions[0].token_ids
        for t, p, s in zip(together, plain, selections, strict=True)
        if s
    )


def test_filter_masked_tokens_never_sampled(engine, tiny_llama, tokenizer):
    from server.engine.sequence import Selection

    filt = 0.05
    prompt = tokenizer.encode("Alice likes")
    params = SamplingParams(max_tokens=10, temperature=1.5, seed=3, ignore_eos=True, n=4)
    result = engine.generate([prompt], params, Selection("a2", {"alpha": 2.0, "filter": filt}))[0]
    for completion in result.completions:
        ids = prompt + completion.token_ids
        with torch.no_grad():
            logp = tiny_llama(torch.tensor([ids])).logits[0].log_softmax(-1)
        for step, token in enumerate(completion.token_ids):
            row = logp[len(prompt) - 1 + step]
            assert float(row[token]) >= float(row.max()) + float(torch.tensor(filt).log()) - 1e-5


def test_unknown_artifact_and_bad_options(engine, tokenizer):
    from server.engine.engine import EngineInputError
    from server.engine.sequence import Request, Selection

    with pytest.raises(UnknownArtifactError):
        engine.add_request(Request("x", [1, 2], SamplingParams(), Selection("nope")))
    with pytest.raises(EngineInputError):
        engine.add_request(Request("y", [1, 2], SamplingParams(), Selection("a1", {"filter": 2.0})))


def test_wrong_base_refused_naming_both(tokenizer, tiny_llama, artifacts):
    other = build_tiny_model("llama", tokenizer, seed=123)
    eng = Engine(other, tokenizer, EngineConfig(max_num_seqs=2, max_model_len=64), "other-model")
    with pytest.raises(ArtifactError) as err:
        eng.load_uld("a1", artifacts["a1"])
    assert "other-model" in str(err.value) and str(artifacts["a1"]) in str(err.value)


def test_unload_waits_for_in_flight(engine, tokenizer):
    from server.engine.sequence import Request, Selection

    rid = engine.new_request_id()
    engine.add_request(Request(rid, tokenizer.encode("Bob"), SamplingParams(max_tokens=5, ignore_eos=True),
                               Selection("a1")))
    engine.step()  # prefill: the request is running
    done = engine.unload("a1")
    assert "a1" not in engine.artifact_names()  # no new requests may pick it
    assert not done.is_set()  # but the in-flight one keeps it
    while engine.has_work():
        engine.step()
    assert done.is_set() and "a1" not in engine.assistants.assistants
