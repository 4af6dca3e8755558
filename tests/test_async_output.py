"""Asynchronous output processing: a decode step is launched from the previous step's tokens while they are still
on the device, and those tokens are processed (detokenised, stop rules, emitted) after the launch. On CPU nothing
overlaps (the host runs the device's work), but the bookkeeping is the same as on CUDA, so these tests run the
async engine on CPU and require every output to equal the synchronous engine's: tokens, text, logprobs, finish
reasons, with rows finishing by EOS, stop tokens, stop strings, max_tokens and aborts, while new requests arrive,
with ULD rows (and the repeat guard) and with the CUDA-graph stand-in."""

from __future__ import annotations

import copy

import pytest
from graph_standin import RecordedGraphs
from test_cuda_graphs import PROMPTS as GRAPH_PROMPTS
from test_uld_serving import make_random_assistant
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Request

PROMPTS = GRAPH_PROMPTS[:8]  # mixed lengths; more prompts than the 4 slots


def _engine(model, tokenizer, async_output: bool, graphs=None, **config) -> Engine:
    config = {"max_model_len": 64, "max_num_seqs": 4, "async_output": async_output, **config}
    return Engine(copy.deepcopy(model), tokenizer, EngineConfig(**config), "tiny", graph_capture=graphs)


def _outputs(results) -> list[tuple]:
    return [
        (c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs and [e.logprob for e in c.logprobs])
        for r in results
        for c in r.completions
    ]


def _count_chained(engine: Engine) -> list[int]:
    """Wrap the engine's decode launches; the returned list gets 1 per chained launch, 0 per other one."""
    chained: list[int] = []
    inner = engine._launch

    def launch(state, previous):
        chained.append(int(previous is not None))
        return inner(state, previous)

    engine._launch = launch
    return chained


def _varied_params(greedy_tokens: list[list[int]], tokenizer) -> list[SamplingParams]:
    """Params that finish rows in every way: a stop token the greedy answer reaches mid-way, a stop string cut from
    a greedy text, EOS allowed, max_tokens, seeded sampling with penalties, logprobs, n > 1."""
    stop_token = greedy_tokens[1][5]
    stop_text = tokenizer.decode(greedy_tokens[3][6:8]).strip() or "e"
    return [
        SamplingParams(max_tokens=20, temperature=0.0),
        SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=9, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.3),
        SamplingParams(max_tokens=25, temperature=0.0, stop=[stop_text]),
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, frequency_penalty=0.5),
        SamplingParams(max_tokens=14, temperature=1.0, seed=3, n=2),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=17, temperature=0.0, presence_penalty=0.4, ignore_eos=True),
    ]


@pytest.mark.parametrize("graphed", [False, True])
def test_async_outputs_equal_the_synchronous_engines(tiny_llama, tokenizer, graphed):
    greedy = _engine(tiny_llama, tokenizer, False).generate(
        PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )
    params = _varied_params([c.token_ids for r in greedy for c in r.completions], tokenizer)
    sync = _engine(tiny_llama, tokenizer, False, RecordedGraphs() if graphed else None)
    engine = _engine(tiny_llama, tokenizer, True, RecordedGraphs() if graphed else None)
    chained = _count_chained(engine)
    want = _outputs(sync.generate(PROMPTS, params))
    got = _outputs(engine.generate(PROMPTS, params))
    assert got == want
    assert {w[2] for w in want} >= {"stop", "length"}  # rows ended by stop rules and by length
    # most decode steps were chained onto the previous one's device tokens (the others follow a change of the
    # running set: an arrival, a finish)
    assert sum(chained) >= 0.5 * len(chained) and len(chained) >= 20, chained
    assert not engine.has_work() and engine._pending is None


def test_async_uld_rows_with_the_repeat_guard_equal_the_synchronous_engines(tiny_llama, tokenizer, tmp_path):
    a = make_random_assistant(tiny_llama, tmp_path / "a", num_layers=1, seed=3)
    b = make_random_assistant(tiny_llama, tmp_path / "b", num_layers=2, seed=4)
    selections = ["a", None, "b", "a", None, "a", "b", None]
    params = [SamplingParams(max_tokens=10 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(len(PROMPTS))]
    params[2] = SamplingParams(max_tokens=16, temperature=0.8, seed=11, ignore_eos=True, logprobs=2)
    results = []
    for async_output in (False, True):
        for graphs in (None, RecordedGraphs()):
            engine = _engine(tiny_llama, tokenizer, async_output, graphs, no_repeat_substitution=2)
            engine.load_uld("a", a)
            engine.load_uld("b", b)
            chained = _count_chained(engine)
            results.append(_outputs(engine.generate(PROMPTS, params, selections)))
            assert bool(sum(chained)) == async_output
    assert results[0] == results[1] == results[2] == results[3]
    plain = _outputs(_engine(tiny_llama, tokenizer, False).generate(PROMPTS, params))
    assert plain != results[0]  # the unlearning changed the answers


def test_an_abort_between_steps_drops_the_pending_token_of_the_aborted_row(tiny_llama, tokenizer):
    """The pending step computed a token for the aborted row: it is never appended; the other rows go on as in the
    synchronous engine."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = []
    for async_output in (False, True):
        engine = _engine(tiny_llama, tokenizer, async_output)
        ids = [engine.new_request_id() for _ in range(3)]
        for rid, prompt in zip(ids, PROMPTS, strict=False):
            engine.add_request(Request(rid, engine.encode_prompt(prompt), params, None))
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        finish: dict[str, str | None] = {}
        steps = 0
        while engine.has_work():
            for out in engine.step():
                tokens[out.request_id].extend(out.outputs[0].token_ids)
                if out.finished:
                    finish[out.request_id] = out.outputs[0].finish_reason
            steps += 1
            if steps == 6:
                engine.abort(ids[1])
        runs.append(([tokens[rid] for rid in ids], [finish[rid] for rid in ids]))
    (sync_tokens, sync_finish), (async_tokens, async_finish) = runs
    assert sync_finish == async_finish == ["length", "abort", "length"]
    assert async_tokens[0] == sync_tokens[0] and async_tokens[2] == sync_tokens[2] and len(async_tokens[0]) == 24
    full = _engine(tiny_llama, tokenizer, False).generate([PROMPTS[1]], params)[0].completions[0].token_ids
    for aborted in (sync_tokens[1], async_tokens[1]):  # a prefix of the whole answer, cut short
        assert 0 < len(aborted) < 24 and full[: len(aborted)] == aborted


def test_async_output_is_on_by_default_on_cuda_only(tiny_llama, tokenizer):
    assert Engine(copy.deepcopy(tiny_llama), tokenizer, EngineConfig(max_model_len=64), "tiny").async_output is False
    assert _engine(tiny_llama, tokenizer, True).async_output is True


def test_new_requests_while_rows_decode_asynchronously(tiny_llama, tokenizer):
    """Arrivals flush the pending step before their prefill; with more requests than slots, rows finish, new ones
    take their slots, and every answer equals the synchronous engine's."""
    params = [SamplingParams(max_tokens=5 + 4 * (i % 3), temperature=0.0, ignore_eos=True) for i in range(len(PROMPTS))]
    outputs = []
    for async_output in (False, True):
        engine = _engine(tiny_llama, tokenizer, async_output, max_num_seqs=2)
        results: dict[str, list[int]] = {}
        order = []
        for i, prompt in enumerate(PROMPTS):
            rid = engine.new_request_id()
            engine.add_request(Request(rid, engine.encode_prompt(prompt), params[i], None))
            order.append(rid)
            results[rid] = []
            for out in engine.step():  # one step per arrival: prefills interleave with decodes
                results[out.request_id].extend(out.outputs[0].token_ids)
        while engine.has_work():
            for out in engine.step():
                results[out.request_id].extend(out.outputs[0].token_ids)
        outputs.append([results[rid] for rid in order])
    assert outputs[0] == outputs[1] and all(len(t) == p.max_tokens for t, p in zip(outputs[1], params, strict=True))


def test_a_real_server_streams_the_same_answers_with_async_output(tiny_llama, tokenizer, tmp_path):
    """uvicorn on 127.0.0.1, the official openai client, concurrent requests streamed and not, base and unlearned
    rows mixed: the async engine's answers equal the synchronous engine's."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from conftest import run_server
    from unlearn_serve.server.app import build_app
    from unlearn_serve.server.config import ServerConfig

    artifact = make_random_assistant(tiny_llama, tmp_path / "a", num_layers=1, seed=5)
    jobs = [(model, prompt) for prompt in PROMPTS for model in ("tiny", "forget")]
    answers = []
    for async_output in (False, True):
        engine = _engine(tiny_llama, tokenizer, async_output)
        engine.load_uld("forget", artifact)
        unlearned_steps = []
        inner = engine.uld.process_logits

        def counted(plan, logits, hidden, early=None, inner=inner, seen=unlearned_steps):
            seen.append(plan is not None)
            return inner(plan, logits, hidden, early)

        engine.uld.process_logits = counted
        with run_server(build_app(ServerConfig(served_model_name="tiny"), engine=engine)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

            def ask(job, stream: bool, client=client) -> str:
                model, prompt = job
                kwargs = dict(model=model, prompt=prompt, max_tokens=12, temperature=0)
                if not stream:
                    return client.completions.create(**kwargs).choices[0].text
                return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))

            with ThreadPoolExecutor(8) as pool:
                plain = list(pool.map(lambda j: ask(j, False), jobs))
                streamed = list(pool.map(lambda j: ask(j, True), jobs))
        assert plain == streamed and sum(unlearned_steps) >= 10  # the "forget" rows went through ULD
        answers.append(plain)
    assert answers[0] == answers[1]


def test_the_async_output_flag_reaches_the_engine(tiny_llama_dir):
    import argparse

    from unlearn_serve.cli.serve import build_engine, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    base = ["--model", str(tiny_llama_dir), "--device", "cpu", "--max-model-len", "64", "--max-num-seqs", "2"]
    assert build_engine(parser.parse_args(base)).async_output is False  # CPU default
    assert build_engine(parser.parse_args([*base, "--async-output"])).async_output is True
    assert build_engine(parser.parse_args([*base, "--no-async-output"])).async_output is False
