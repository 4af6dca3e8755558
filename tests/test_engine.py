"""The generation engine without HTTP: batching, stops, n, logprobs, penalties, continuous batching."""

from __future__ import annotations

import pytest
import torch
import unlearn_serve.server.engine.engine as engine_module
from unlearn_serve.server.engine.engine import Engine, EngineConfig, EngineInputError, UnknownArtifactError
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Request

PROMPTS = [
    "The capital of",
    "Alice likes",
    "Bob plays the",
    "Water boils at one hundred",
    "The quick brown fox jumps over the lazy",
]


@pytest.fixture(scope="module")
def engine(tiny_llama, tokenizer):
    return Engine(tiny_llama, tokenizer, EngineConfig(max_num_seqs=8, max_model_len=96))


def greedy(max_tokens: int = 10, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Reference: transformers' own greedy generate, truncated after the first EOS."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id) + 1]
    return out


def run_to_completion(engine: Engine, request_ids: set[str]) -> dict[str, list]:
    outputs: dict[str, list] = {r: [] for r in request_ids}
    while any(not o or not o[-1].finished for o in outputs.values()):
        for out in engine.step():
            if out.request_id in outputs:
                outputs[out.request_id].append(out)
    return outputs


def test_greedy_matches_transformers_generate(engine, tiny_llama, tokenizer):
    results = engine.generate(PROMPTS[:3], greedy(12))
    for prompt, result in zip(PROMPTS[:3], results, strict=True):
        assert result.completions[0].token_ids == hf_greedy(tiny_llama, tokenizer, prompt, 12)
    assert results[0].completions[0].text.startswith(" France is Paris")
    assert results[0].completions[0].finish_reason == "stop"  # EOS after the memorised fact


def test_batched_greedy_equals_one_at_a_time(engine):
    params = greedy(16, ignore_eos=True)  # long enough to decode past every prompt's EOS
    batched = engine.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, batched, strict=True):
        alone = engine.generate([prompt], params)[0]
        assert result.completions[0].token_ids == alone.completions[0].token_ids
        assert len(alone.completions[0].token_ids) == 16
        assert result.completions[0].finish_reason == "length"


def test_a_request_joining_mid_decode(engine, tokenizer):
    params = greedy(12, ignore_eos=True)
    solo = {p: engine.generate([p], params)[0].completions[0].token_ids for p in PROMPTS[:2]}
    early = Request("early", tokenizer.encode(PROMPTS[0]), params)
    engine.add_request(early)
    for _ in range(4):  # prefill + 3 decode steps
        engine.step()
    assert len(early.sequences[0].output_ids) == 4
    late = Request("late", tokenizer.encode(PROMPTS[1]), params)
    engine.add_request(late)
    engine.step()  # the late request is prefilled while "early" is mid-decode
    assert engine.num_running() == 2 and len(early.sequences[0].output_ids) == 4
    assert len(late.sequences[0].output_ids) == 1
    run_to_completion(engine, {"late"})
    assert early.finished and late.finished
    assert early.sequences[0].output_ids == solo[PROMPTS[0]]
    assert late.sequences[0].output_ids == solo[PROMPTS[1]]


def test_stop_string_across_token_boundaries(engine, tokenizer):
    full = engine.generate([PROMPTS[0]], greedy(12))[0].completions[0]
    pieces = [tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of token 1 and the start of token 2
    assert len(pieces[1]) >= 2 and len(pieces[2]) >= 2
    stop = pieces[1][-2:] + pieces[2][:2]
    cut = full.text.index(stop)
    assert cut < len(pieces[0]) + len(pieces[1])  # really spans a boundary

    result = engine.generate([PROMPTS[0]], greedy(12, stop=[stop, "never appears"]))[0].completions[0]
    assert result.text == full.text[:cut]  # streamed deltas never leaked part of the stop string
    assert result.finish_reason == "stop" and result.stop_reason == stop

    kept = engine.generate([PROMPTS[0]], greedy(12, stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.completions[0].text == full.text[: cut + len(stop)]


def test_stop_token_ids(engine):
    full = engine.generate([PROMPTS[0]], greedy(12))[0].completions[0]
    stop_id = full.token_ids[2]
    result = engine.generate([PROMPTS[0]], greedy(12, stop_token_ids=[stop_id]))[0].completions[0]
    assert result.token_ids == full.token_ids[:3]
    assert result.finish_reason == "stop" and result.stop_reason == stop_id


def test_eos_stops_unless_ignored(engine, tokenizer):
    stopped = engine.generate([PROMPTS[0]], greedy(30))[0].completions[0]
    assert stopped.token_ids[-1] == tokenizer.eos_token_id and len(stopped.token_ids) < 30
    ignored = engine.generate([PROMPTS[0]], greedy(30, ignore_eos=True))[0].completions[0]
    assert len(ignored.token_ids) == 30 and ignored.finish_reason == "length"


def test_n_choices_are_seeded_and_reproducible(engine):
    params = SamplingParams(max_tokens=8, temperature=2.0, n=4, seed=123, ignore_eos=True)
    first = engine.generate([PROMPTS[1]], params)[0].completions
    assert [c.index for c in first] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in first)
    assert len({tuple(c.token_ids) for c in first}) > 1  # each choice samples on its own
    # same seed -> same choices, even when other requests share the batch
    again = engine.generate([PROMPTS[0], PROMPTS[1]], [greedy(8), params])[1].completions
    assert [c.token_ids for c in again] == [c.token_ids for c in first]
    other = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=2.0, n=4, seed=124))[0]
    assert [c.token_ids for c in other.completions] != [c.token_ids for c in first]


def test_logprobs_only_for_requests_that_ask(engine, tiny_llama, tokenizer, monkeypatch):
    rows_seen = []
    original = engine_module.gather_logprobs

    def spy(logprobs, tokens, top_n):
        rows_seen.append(logprobs.shape[0])
        return original(logprobs, tokens, top_n)

    monkeypatch.setattr(engine_module, "gather_logprobs", spy)
    results = engine.generate(PROMPTS[:3], [greedy(6), greedy(6, logprobs=3), greedy(6)])
    assert rows_seen and set(rows_seen) == {1}  # one row (of three) ever reaches the logprob code
    assert results[0].completions[0].logprobs is None and results[2].completions[0].logprobs is None
    entries = results[1].completions[0].logprobs
    tokens = results[1].completions[0].token_ids
    assert [e.token_id for e in entries] == tokens
    # compare with a plain forward of prompt + generated tokens
    prompt = tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        ref = tiny_llama(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
    for j, entry in enumerate(entries):
        row = ref[len(prompt) - 1 + j]
        assert entry.logprob == pytest.approx(row[tokens[j]].item(), abs=1e-4)
        assert len(entry.top) == 3
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert entry.top[0][0] == tokens[j]  # greedy picks the best token


def test_prompt_logprobs_and_score(engine, tiny_llama, tokenizer):
    prompt = tokenizer.encode("The capital of France is Paris.")
    result = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2, temperature=0.0))[0]
    assert result.completions[0].token_ids == [] and result.completions[0].finish_reason == "length"
    lp = result.prompt_logprobs
    assert len(lp) == len(prompt) and lp[0] is None
    with torch.no_grad():
        ref = tiny_llama(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for i in range(1, len(prompt)):
        assert lp[i].token_id == prompt[i]
        assert lp[i].logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        assert len(lp[i].top) == 2
    context, continuation = prompt[:4], prompt[4:]
    scores = engine.score([context, context], [continuation, continuation[:1]])
    assert scores[0] == pytest.approx([e.logprob for e in lp[4:]], abs=1e-5)
    assert len(scores[1]) == 1


def test_repetition_penalty_matches_transformers(engine, tiny_llama, tokenizer):
    ids = torch.tensor([tokenizer.encode(PROMPTS[2])])
    with torch.no_grad():
        ref = tiny_llama.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, repetition_penalty=3.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
        )[0, ids.shape[1]:].tolist()
    plain = engine.generate([PROMPTS[2]], greedy(10, ignore_eos=True))[0].completions[0].token_ids
    params = greedy(10, repetition_penalty=3.0, ignore_eos=True)
    # a penalised request next to an unpenalised one, twice (the second reuses slots with stale counts)
    for _ in range(2):
        penalised = engine.generate([PROMPTS[0], PROMPTS[2]], [greedy(10), params])[1].completions[0].token_ids
        assert penalised == ref and len(penalised) == 10
    assert penalised != plain


def test_frequency_penalty_discourages_repeats(engine):
    params = greedy(24, ignore_eos=True)
    plain = engine.generate([PROMPTS[4]], params)[0].completions[0].token_ids
    assert len(set(plain)) < len(plain)  # the tiny model loops without a penalty
    penalised = engine.generate(
        [PROMPTS[4]], greedy(24, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    )[0].completions[0].token_ids
    assert len(set(penalised)) > len(set(plain))


def test_logit_bias_forces_a_token(engine):
    result = engine.generate([PROMPTS[0]], greedy(5, logit_bias={42: 100.0}, ignore_eos=True))[0]
    assert result.completions[0].token_ids == [42] * 5


def test_input_errors(engine, tokenizer):
    with pytest.raises(EngineInputError, match="maximum context length") as info:
        engine.check_request(list(range(1, 100)), SamplingParams(max_tokens=1))
    assert info.value.param == "prompt"
    with pytest.raises(EngineInputError) as info:
        engine.check_request([1, 2, 3], SamplingParams(max_tokens=95))
    assert info.value.param == "max_tokens"
    with pytest.raises(EngineInputError, match="empty"):
        engine.check_request([], SamplingParams())
    with pytest.raises(EngineInputError, match="outside the vocabulary"):
        engine.check_request([10**6], SamplingParams())
    with pytest.raises(UnknownArtifactError):
        engine.generate(["x"], greedy(2), unlearning="no-such-artifact")
    assert engine.num_running() == 0 and engine.num_waiting() == 0


def test_generation_stops_at_max_model_len(tiny_llama, tokenizer):
    small = Engine(tiny_llama, tokenizer, EngineConfig(max_num_seqs=2, max_model_len=12))
    prompt = tokenizer.encode(PROMPTS[4])
    assert len(prompt) < 12
    out = small.generate([prompt], greedy(12 - len(prompt), ignore_eos=True))[0].completions[0]
    assert len(prompt) + len(out.token_ids) == 12 and out.finish_reason == "length"


def test_a_failing_step_ends_every_request_and_frees_every_slot(engine, tokenizer, monkeypatch):
    params = greedy(8, ignore_eos=True)
    for i in range(3):
        engine.add_request(Request(f"fail-{i}", tokenizer.encode(PROMPTS[i]), params))
    engine.step()  # prefill
    monkeypatch.setattr(engine.runner, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        engine.step()
    outs = engine.fail_all("engine error: RuntimeError")
    assert sorted(o.request_id for o in outs) == ["fail-0", "fail-1", "fail-2"]
    assert all(o.finished and o.error == "engine error: RuntimeError" for o in outs)
    assert engine.num_running() == 0 and not engine.requests
    monkeypatch.undo()
    # the engine carries on afterwards
    assert engine.generate([PROMPTS[0]], greedy(12))[0].completions[0].text.startswith(" France is Paris")


def test_sync_generate_refuses_while_a_serving_thread_drives_the_engine(tiny_llama, tokenizer):
    from unlearn_serve.server.engine.async_engine import AsyncEngine

    served = AsyncEngine(Engine(tiny_llama, tokenizer, EngineConfig(max_num_seqs=2, max_model_len=32)))
    served.start()
    try:
        with pytest.raises(RuntimeError, match="AsyncEngine"):
            served.engine.generate([PROMPTS[0]], greedy(2))
    finally:
        served.stop()
    assert served.engine.generate([PROMPTS[0]], greedy(2))[0].completions[0].token_ids  # fine once stopped
