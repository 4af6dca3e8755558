"""The OpenAI-compatible HTTP API on a real uvicorn server, called with the official `openai` client."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
import unlearn_serve.server.policy as policy_module
from conftest import run_server
from unlearn_serve.server.app import build_app
from unlearn_serve.server.config import ServerConfig
from unlearn_serve.server.engine.engine import Engine, EngineConfig

from unlearn_serve.cli import main as cli_main

KEY = "sk-test-key"
MODEL = "tiny"
MAX_LEN = 128


@pytest.fixture(scope="module")
def engine(tiny_llama, tokenizer):
    # its own tokenizer copy: one test removes the chat template
    return Engine(tiny_llama, copy.deepcopy(tokenizer), EngineConfig(max_num_seqs=8, max_model_len=MAX_LEN))


@pytest.fixture(scope="module")
def url(engine):
    app = build_app(ServerConfig(served_model_name=MODEL, api_keys=["other-key", KEY]), engine=engine)
    with run_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def aclient(url):
    """A factory: an AsyncOpenAI client binds its connections to the event loop that first uses it."""
    return lambda: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def post(url: str, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={**headers, "content-type": "application/json"})
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            total += float(m.group(3))
    return total


# ----------------------------------------------------------------------------- completions


def test_completion_string_prompt_and_usage(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt="The capital of", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.text == " France is Paris." and choice.finish_reason == "stop"
    prompt_tokens = len(tokenizer.encode("The capital of"))
    # the EOS token counts as a completion token (as in vLLM)
    completion_tokens = len(tokenizer.encode(" France is Paris.")) + 1
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == completion_tokens
    assert r.usage.total_tokens == prompt_tokens + completion_tokens


def test_completion_list_and_token_id_prompts(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=["The capital of", "Alice likes"], max_tokens=10, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == " France is Paris." and r.choices[1].text == " green apples."
    ids = tokenizer.encode("Alice likes")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == " green apples." and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(
        model=MODEL, prompt=[ids, tokenizer.encode("The capital of")], max_tokens=10, temperature=0
    )
    assert [c.text for c in r.choices] == [" green apples.", " France is Paris."]


def test_echo_with_logprobs_gives_prompt_logprobs(client, tiny_llama, tokenizer):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == prompt + " Paris."
    ids = tokenizer.encode(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 2
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # the prompt part is log p(token | preceding tokens) (lm-eval-harness loglikelihood)
    with torch.no_grad():
        ref = tiny_llama(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-5)
    # the top 2, plus the scored token itself when it is not among them (OpenAI: up to logprobs + 1)
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True):
        assert token in top and len(top) in (2, 3)
        if len(top) == 3:  # added: then it is the least likely of the three
            assert min(top.values()) == top[token]
    # greedy: every generated token is the best of its top list
    for token, top in zip(lp.tokens[len(ids):], lp.top_logprobs[len(ids):], strict=True):
        assert max(top, key=top.get) == token
    # logprobs=0 with echo and max_tokens=0: scoring only, nothing generated
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    # logprobs=0 still lists the scored token itself
    tops = r.choices[0].logprobs.top_logprobs[1:]
    assert [list(top) for top in tops] == [[t] for t in r.choices[0].logprobs.tokens[1:]]


def test_no_logprobs_unless_asked(client):
    r = client.completions.create(model=MODEL, prompt="Alice likes", max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].logprobs is None


def test_n_and_seed(client):
    kwargs = dict(model=MODEL, prompt="The", max_tokens=8, temperature=2.0, n=3, seed=42)
    first = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    assert len({c.text for c in first.choices}) > 1
    other = client.completions.create(**{**kwargs, "seed": 43})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]


def test_stop(client):
    r = client.completions.create(model=MODEL, prompt="The capital of", max_tokens=10, temperature=0, stop="Paris")
    assert r.choices[0].text == " France is " and r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model=MODEL, prompt="The capital of", max_tokens=10, temperature=0, stop=["zzz", "is P"]
    )
    assert r.choices[0].text == " France "


def test_streaming_completion_with_usage(client):
    kwargs = dict(model=MODEL, prompt="Alice likes", max_tokens=10, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed, token by token
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_echo_with_logprobs_matches_non_streaming(client):
    kwargs = dict(model=MODEL, prompt="Bob plays the", max_tokens=4, temperature=0, echo=True, logprobs=1)
    full = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == full.text
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert tokens == full.logprobs.tokens
    assert values[0] is None and values[1:] == pytest.approx(full.logprobs.token_logprobs[1:], abs=1e-5)


def test_streaming_without_usage_and_done_marker(url):
    body = {"model": MODEL, "prompt": "Alice likes", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(p["object"] == "text_completion" and "usage" not in p or p["usage"] is None for p in payloads)


async def _async_completions(make_client, prompts):
    async with make_client() as aclient:
        return await asyncio.gather(
            *[aclient.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0) for p in prompts]
        )


def test_async_client_concurrent_requests(aclient, client):
    prompts = ["The capital of", "Alice likes", "Bob plays the", "Water boils at"] * 2
    results = asyncio.run(_async_completions(aclient, prompts))
    for prompt, r in zip(prompts, results, strict=True):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == alone.choices[0].text


def test_async_streaming_chat(aclient):
    async def run():
        async with aclient() as c:
            stream = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=6, stream=True, temperature=0
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- chat


def test_chat_logprobs_and_max_completion_tokens(client, tokenizer):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"}],
        max_completion_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    content = choice.logprobs.content
    assert len(content) == 4 == r.usage.completion_tokens
    # logprob tokens are raw token strings (special tokens included); the message skips special tokens
    assert "".join(c.token for c in content).replace("<|im_end|>", "") == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.bytes == list(entry.token.encode())
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 3


def test_chat_streaming_deltas_and_done(client, url):
    messages = [{"role": "user", "content": "Tell me about Alice."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, n=2,
    )
    chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        deltas = [ch for c in chunks for ch in c.choices if ch.index == index]
        assert deltas[0].delta.role == "assistant"
        assert "".join(d.delta.content or "" for d in deltas) == full.choices[0].message.content
        assert [d.finish_reason for d in deltas if d.finish_reason] == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == 2 * full.usage.completion_tokens
    body = {"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_without_template_is_400(url, engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    error = assert_openai_error(r, 400, "messages")
    assert "chat template" in error["message"]


# ----------------------------------------------------------------------------- models, health, metrics


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == MAX_LEN


def test_health_needs_no_key(url):
    r = httpx.get(f"{url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert httpx.get(f"{url}/ready").status_code == 200


def test_ready_is_503_until_the_model_is_loaded(tiny_llama, tokenizer):
    release = threading.Event()

    def factory() -> Engine:
        release.wait(30)
        return Engine(tiny_llama, tokenizer, EngineConfig(max_num_seqs=2, max_model_len=MAX_LEN))

    app = build_app(ServerConfig(served_model_name=MODEL), engine_factory=factory)
    with run_server(app) as base:
        r = httpx.get(f"{base}/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert httpx.get(f"{base}/health").status_code == 200
        assert_openai_error(post(base, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=None), 503)
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/ready").status_code != 200:
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.05)
        r = post(base, "/v1/completions", {"model": MODEL, "prompt": "Alice likes", "max_tokens": 3}, key=None)
        assert r.status_code == 200


def test_metrics(client, url, tokenizer):
    before = httpx.get(f"{url}/metrics").text
    r = client.completions.create(model=MODEL, prompt="Bob plays the", max_tokens=5, temperature=0)
    list(client.completions.create(model=MODEL, prompt="Alice likes", max_tokens=4, stream=True))
    after = httpx.get(f"{url}/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    text = after.text
    labels = {"model_name": MODEL, "artifact": "none"}
    for name in (
        "unlearn:time_to_first_token_seconds_count",
        "unlearn:inter_token_latency_seconds_count",
        "unlearn:e2e_request_latency_seconds_count",
        "unlearn:request_queue_time_seconds_count",
    ):
        assert metric(text, name, **labels) > metric(before, name, **labels), name
    assert "unlearn:e2e_request_latency_seconds_bucket{" in text
    for gauge in ("unlearn:num_requests_running", "unlearn:num_requests_waiting"):
        assert re.search(rf"^{gauge} 0\.0$", text, re.M), gauge
    gen = metric(text, "unlearn:generation_tokens_total", **labels) - metric(
        before, "unlearn:generation_tokens_total", **labels
    )
    assert gen >= r.usage.completion_tokens + 1
    prompt = metric(text, "unlearn:prompt_tokens_total", **labels) - metric(
        before, "unlearn:prompt_tokens_total", **labels
    )
    assert prompt == r.usage.prompt_tokens + len(tokenizer.encode("Alice likes"))
    assert metric(text, "unlearn:request_success_total", **labels) >= 2
    assert metric(text, "unlearn:http_requests_total", endpoint="/v1/completions", status="200") >= 2


# ----------------------------------------------------------------------------- auth


def test_api_key_required_on_v1(url):
    for key in (None, "wrong-key"):
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=key)
        error = assert_openai_error(r, 401)
        assert error["type"] == "AuthenticationError" and error["code"] == "invalid_api_key"
    assert_openai_error(httpx.get(f"{url}/v1/models"), 401)
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Basic " + KEY})
    assert_openai_error(r, 401)
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_api_key_compared_in_constant_time_against_every_key(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(policy_module.hmac, "compare_digest", spy)
    policy = ServerConfig(served_model_name="m", api_keys=["k1", "k2"]).access_policy()
    assert policy.authenticate("k1").name == "api-key-1"
    assert len(calls) == 2  # no early exit on the first match
    assert all(len(a) == len(b) == 32 for a, b in calls)  # sha256 digests: equal lengths whatever the key


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "the " * 200}, "prompt"),  # longer than the context
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": "x", "stop": 5}, None),  # unknown stop type
        ({"prompt": "x", "stop": {"a": 1}}, None),
        ({"prompt": "x", "max_tokens": MAX_LEN}, "max_tokens"),  # prompt + max_tokens over the context
        ({"prompt": [], "max_tokens": 2}, "prompt"),
        ({"prompt": [10**7]}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": 5}, None),
        ({}, None),
    ],
)
def test_completion_errors_are_400(url, body, param):
    assert_openai_error(post(url, "/v1/completions", {"model": MODEL, **body}), 400, param)


def test_chat_errors(url):
    msgs = [{"role": "user", "content": "hi"}]
    assert_openai_error(post(url, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400)
    assert_openai_error(post(url, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": -3}), 400)
    assert_openai_error(
        post(url, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "top_logprobs": 2}), 400, "top_logprobs"
    )
    long = [{"role": "user", "content": "the " * 200}]
    assert_openai_error(post(url, "/v1/chat/completions", {"model": MODEL, "messages": long}), 400, "prompt")


def test_unknown_model_is_404(url, client):
    error = assert_openai_error(post(url, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert error["type"] == "NotFoundError"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_openai_client_sees_bad_request_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert info.value.status_code == 400 and "max_tokens" in info.value.message


def test_malformed_json_is_400(url):
    assert_openai_error(post(url, "/v1/completions", b"{not json"), 400)
    assert_openai_error(post(url, "/v1/completions", b"[1, 2]"), 400)


def test_unknown_extra_fields_are_accepted(client):
    r = client.completions.create(
        model=MODEL, prompt="Alice likes", max_tokens=10, temperature=0,
        extra_body={"some_future_field": {"x": 1}, "top_k": 1, "min_p": 0.1, "priority": 3},
    )
    assert r.choices[0].text == " green apples."


def test_server_keeps_serving_after_bad_requests(url, client):
    for body in (b"{", b'{"model": "tiny", "prompt": "x", "max_tokens": -5}', b'{"model": "tiny", "prompt": {"a": 1}}'):
        assert 400 <= post(url, "/v1/completions", body).status_code < 500
    r = client.completions.create(model=MODEL, prompt="The capital of", max_tokens=10, temperature=0)
    assert r.choices[0].text == " France is Paris."
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "unlearn:http_requests_total", status="500") == 0


def test_client_disconnect_mid_stream_frees_the_slot(url, engine):
    aborted_before = metric(httpx.get(f"{url}/metrics").text, "unlearn:request_success_total", finished_reason="abort")
    body = {
        "model": MODEL, "prompt": "Alice likes", "max_tokens": MAX_LEN - 10, "stream": True, "ignore_eos": True,
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        next(lines)
    # the stream closed after one chunk, long before max_tokens: the engine aborts the request
    deadline = time.monotonic() + 20
    while engine.num_running() or engine.requests:
        assert time.monotonic() < deadline, "the aborted request kept its slot"
        time.sleep(0.02)
    assert engine.scheduler.target_slots.free == engine.config.max_num_seqs
    aborted = metric(httpx.get(f"{url}/metrics").text, "unlearn:request_success_total", finished_reason="abort")
    assert aborted == aborted_before + 1  # it ended by abort, not by running to max_tokens


# ----------------------------------------------------------------------------- serve CLI


def test_serve_quantization_on_cpu_is_a_clear_error(tiny_llama_dir, capsys):
    code = cli_main(["serve", "--model", str(tiny_llama_dir), "--quantization", "4bit", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--quantization 4bit" in err and "CUDA" in err and len(err.strip().splitlines()) == 1


def test_loaded_models_never_swap_in_hub_kernels(tiny_llama_dir, monkeypatch):
    """transformers 5.2x loads with Hub kernels on by default, and `.train()` on a GPU then fetches them: offline a
    GPU host's `train-uld` stopped with "Version 2 of 'kernels-community/rotary' is not available in the local
    cache" (2026-12-04). The loader turns them off, for serving and training alike."""
    import transformers.modeling_utils as modeling_utils

    from unlearn_serve.loading import load_model_and_tokenizer

    calls = []
    monkeypatch.setattr(modeling_utils, "kernelize", lambda *a, **k: calls.append(k), raising=False)
    model, _ = load_model_and_tokenizer(str(tiny_llama_dir), device="cpu")
    assert not model.use_kernels and model.kernels_mode is None
    model.train()  # what the trainers do: must not (re)kernelize
    model.eval()
    assert calls == [] and not model.use_kernels


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "/no/such/model/dir"], "no such model directory"),
        (["--device", "cuda:0"], "no CUDA GPU"),
        (["--dtype", "float64"], "invalid choice"),
        (["--gguf-file", "missing.gguf"], "no such GGUF file"),
    ],
)
def test_serve_bad_arguments_exit_2(tiny_llama_dir, capsys, args, needle):
    argv = ["serve", "--model", str(tiny_llama_dir), *args] if args[0] != "--model" else ["serve", *args]
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse choices
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
