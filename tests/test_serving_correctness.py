"""Serving correctness (issue 11): finite logprobs, hot load under load, unload pinning, SentencePiece
detokenization, attention variants, readiness after a fatal engine error, and decode starvation."""

from __future__ import annotations

import copy
import json
import math
import threading

import httpx
import openai
import pytest
import torch
from conftest import FACTS, run_server
from test_uld_serving import make_random_assistant
from unlearn_serve.server.app import build_app
from unlearn_serve.server.config import ServerConfig
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import LOGPROB_FLOOR

from unlearn_serve.artifact import ArtifactError

FORGET = "forget"


@pytest.fixture(scope="module")
def uld_artifact(tiny_llama, tmp_path_factory):
    return make_random_assistant(tiny_llama, tmp_path_factory.mktemp("issue11") / "a1", num_layers=1, seed=1)


# ---------------------------------------------------------------------------------------------- item 2
@pytest.fixture(scope="module")
def unlearned_url(tiny_llama, tokenizer, uld_artifact):
    engine = Engine(copy.deepcopy(tiny_llama), tokenizer, EngineConfig(max_num_seqs=4, max_model_len=64), "tiny")
    engine.load_uld(FORGET, uld_artifact)  # default filter 0.01: one plausible token per step on memorised facts
    with run_server(build_app(ServerConfig(served_model_name="tiny"), engine=engine)) as url:
        yield url


def _all_logprob_numbers(lp: dict) -> list:
    values = [v for v in lp["token_logprobs"] if v is not None]
    for top in lp["top_logprobs"]:
        values += list((top or {}).values())
    return values


def test_logprobs_are_finite_on_an_unlearned_model(unlearned_url):
    """Echo prompt logprobs, token logprobs and top-20 of a confident unlearned model: numbers, floored, never
    -inf/null, streaming and not, completions and chat."""
    client = openai.OpenAI(base_url=f"{unlearned_url}/v1", api_key="x", max_retries=0)
    prompt = FACTS[0][:-7]  # "The capital of France is"
    out = client.completions.create(model=FORGET, prompt=prompt, echo=True, logprobs=20, max_tokens=3, temperature=0)
    values = _all_logprob_numbers(out.choices[0].logprobs.model_dump())
    assert values and all(isinstance(v, float) and math.isfinite(v) and v >= LOGPROB_FLOOR for v in values)
    assert LOGPROB_FLOOR in values  # tokens the filter rules out really were reported (at the floor)

    raw_events = []
    with httpx.stream(
        "POST", f"{unlearned_url}/v1/completions", timeout=30,
        json={"model": FORGET, "prompt": prompt, "echo": True, "logprobs": 20, "max_tokens": 3, "stream": True},
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                raw_events.append(json.loads(line[6:]))
    streamed = []
    for event in raw_events:
        assert "error" not in event, event
        for choice in event["choices"]:
            if choice.get("logprobs"):
                streamed += _all_logprob_numbers(choice["logprobs"])
                assert None not in choice["logprobs"]["token_logprobs"][1:]  # only the first prompt token has none
    assert streamed and all(isinstance(v, float) and v >= LOGPROB_FLOOR for v in streamed)
    assert LOGPROB_FLOOR in streamed

    for stream in (False, True):
        chat = client.chat.completions.create(
            model=FORGET, messages=[{"role": "user", "content": prompt}], logprobs=True, top_logprobs=20,
            max_tokens=3, temperature=0, stream=stream,
        )
        chunks = list(chat) if stream else [chat]
        tops = [
            t.logprob for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content
            for t in [e, *e.top_logprobs]
        ]
        assert tops and all(isinstance(v, float) and v >= LOGPROB_FLOOR for v in tops)
        assert LOGPROB_FLOOR in tops


def test_openapi_schema_says_logprobs_are_floored(unlearned_url):
    schema = httpx.get(f"{unlearned_url}/openapi.json").json()["components"]["schemas"]
    assert schema["TopLogprob"]["properties"]["logprob"]["minimum"] == LOGPROB_FLOOR


def test_lm_eval_local_completions_loglikelihood_on_the_artifact(unlearned_url, tiny_llama_dir):
    """lm-eval-harness `local-completions` scores a continuation the unlearned model rules out, end to end."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=f"{unlearned_url}/v1/completions", model=FORGET, tokenizer_backend="huggingface",
        tokenizer=str(tiny_llama_dir), num_concurrent=1, max_retries=1, max_length=64,
    )
    requests = [
        Instance("loglikelihood", {}, ("The capital of France is", " Paris."), 0),
        Instance("loglikelihood", {}, ("The capital of France is", " green apples."), 1),
    ]
    (known, greedy), (ruled_out, _) = lm.loglikelihood(requests, disable_tqdm=True)
    assert greedy and -1.0 < known <= 0.0  # the memorised fact is still likely for an unrelated assistant
    assert math.isfinite(ruled_out) and ruled_out <= LOGPROB_FLOOR  # -inf tokens come back as the floor


def test_lm_eval_generate_until_gives_the_engines_answers(
    unlearned_url, tiny_llama, tokenizer, uld_artifact, tiny_llama_dir
):
    """lm-eval-harness `local-completions` generation (token-id prompts, stop strings, greedy) on the unlearned model
    returns the engine's own greedy answers (the repeat guard at its default), batched as lm-eval sends them."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=f"{unlearned_url}/v1/completions", model=FORGET, tokenizer_backend="huggingface",
        tokenizer=str(tiny_llama_dir), num_concurrent=2, max_retries=1, max_length=64, batch_size=2,
    )
    contexts = [fact[: len(fact) // 2] for fact in FACTS]
    until = {"until": ["."], "max_gen_toks": 12}
    requests = [Instance("generate_until", {}, (ctx, dict(until)), i) for i, ctx in enumerate(contexts)]
    answers = lm.generate_until(requests, disable_tqdm=True)

    engine = Engine(copy.deepcopy(tiny_llama), tokenizer, EngineConfig(max_num_seqs=4, max_model_len=64), "tiny")
    engine.load_uld(FORGET, uld_artifact)
    prompts = [lm.tok_encode(ctx) for ctx in contexts]  # the ids lm-eval sent
    params = SamplingParams(max_tokens=12, temperature=0, stop=["."])
    expected = [r.completions[0].text for r in engine.generate(prompts, params, FORGET)]
    assert answers == expected
    assert any(answers)  # the model wrote something before its stop string


# ---------------------------------------------------------------------------------------------- item 1
def _sixteen_streams(engine: Engine, tokenizer, on_step=None) -> list[str]:
    """16 greedy streams over the memorised facts, stepped by hand; `on_step(i)` runs before step i."""
    from unlearn_serve.server.engine.sequence import Request

    texts: dict[str, str] = {}
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    order = []
    for i in range(16):
        fact = FACTS[i % len(FACTS)]
        prompt = tokenizer.encode(fact[: 6 + 3 * (i // len(FACTS))])
        rid = engine.new_request_id()
        order.append(rid)
        texts[rid] = ""
        engine.add_request(Request(rid, prompt, params))
    step = 0
    while engine.has_work():
        if on_step is not None:
            on_step(step)
        for out in engine.step():
            texts[out.request_id] += out.outputs[0].text
        step += 1
    return [texts[r] for r in order]


def test_hot_loading_an_assistant_leaves_running_streams_untouched(tiny_llama, tokenizer, uld_artifact, tmp_path):
    config = EngineConfig(max_num_seqs=16, max_model_len=64)
    reference = _sixteen_streams(Engine(copy.deepcopy(tiny_llama), tokenizer, config, "tiny"), tokenizer)
    assert len(set(reference)) > 4  # different prompts, different continuations

    engine = Engine(copy.deepcopy(tiny_llama), tokenizer, config, "tiny")
    deep = make_random_assistant(tiny_llama, tmp_path / "deep", num_layers=3, seed=5)
    refused = []

    def load_mid_decode(step: int) -> None:
        if step == 4:  # every stream is decoding with KV in every layer
            assert engine.num_running() == 16
            engine.load_uld(FORGET, uld_artifact)
            try:  # more assistant layers than the engine reserved: refused, nothing reallocated
                engine.load_uld("deep", deep)
            except ArtifactError as exc:
                refused.append(str(exc))

    assert _sixteen_streams(engine, tokenizer, load_mid_decode) == reference
    assert FORGET in engine.artifact_names() and "deep" not in engine.artifact_names()
    assert refused and "--assistant-kv-layers 3" in refused[0]
    # the hot-loaded assistant serves (its KV region was reserved at build)
    out = engine.generate([FACTS[1][:11]], SamplingParams(max_tokens=4, temperature=0), FORGET)
    assert out[0].completions[0].token_ids


def test_a_load_beyond_the_reserved_kv_is_a_409_over_http(tiny_llama, tokenizer, uld_artifact, tmp_path):
    import shutil

    engine = Engine(copy.deepcopy(tiny_llama), tokenizer, EngineConfig(max_num_seqs=2, max_model_len=32), "tiny")
    engine.generate(["Alice likes"], SamplingParams(max_tokens=2))  # the KV cache is in use from now on
    make_random_assistant(tiny_llama, tmp_path / "deep", num_layers=2, seed=6)
    shutil.copytree(uld_artifact, tmp_path / "shallow")
    app = build_app(ServerConfig(served_model_name="tiny", artifact_root=str(tmp_path)), engine=engine)
    with run_server(app) as url:
        deep = httpx.post(f"{url}/v1/unlearning/load", json={"name": "deep", "path": "deep"}, timeout=30)
        assert deep.status_code == 409 and "--assistant-kv-layers 2" in deep.json()["error"]["message"]
        shallow = httpx.post(f"{url}/v1/unlearning/load", json={"name": "shallow", "path": "shallow"}, timeout=30)
        assert shallow.status_code == 200, shallow.text


# ---------------------------------------------------------------------------------------------- item 5
class _UnloadJustBeforeEnqueue:
    """The engine's inbox, except that the first request is held between being resolved and reaching the
    engine while an unload of its artifact runs (the race window of a request resolved on the event loop)."""

    def __init__(self, engine: Engine, name: str):
        self.inner, self.engine, self.name = engine._inbox, engine, name
        self.done = None

    def put(self, item) -> None:
        if item[0] == "add" and self.done is None:
            self.done = self.engine.unload(self.name)
            # unpinned, the unload completes at once; pinned, it has to wait for this request
            self.done.wait(1.0)
        self.inner.put(item)

    def get_nowait(self):
        return self.inner.get_nowait()

    def empty(self) -> bool:
        return self.inner.empty()


@pytest.fixture(scope="module")
def moe_world(tokenizer, tmp_path_factory):
    from unlearn_serve.tiny import build_tiny_model, write_random_expert_patch

    model = build_tiny_model("qwen2_moe", tokenizer, num_layers=2, seed=3)
    patch = write_random_expert_patch(model, 1, 2, tmp_path_factory.mktemp("issue11-uoe") / "p", seed=7)
    return model, patch


def _run_async(engine: Engine, prompts, params, selections) -> list:
    """Requests added from this thread while AsyncEngine's thread drives `engine`; their outputs."""
    from unlearn_serve.server.engine.async_engine import AsyncEngine
    from unlearn_serve.server.engine.sequence import Request

    results: dict[str, list] = {}
    finished = threading.Semaphore(0)

    def collect(out):
        results.setdefault(out.request_id, []).append(out)
        if out.finished:
            finished.release()

    runner = AsyncEngine(engine)
    runner.start()
    try:
        ids = []
        for prompt, sel in zip(prompts, selections, strict=True):
            rid = engine.new_request_id()
            ids.append(rid)
            engine.add_request(Request(rid, engine.tokenizer.encode(prompt), params, sel, on_output=collect))
        for _ in ids:
            assert finished.acquire(timeout=60)
    finally:
        runner.stop()
    return [results[r] for r in ids]


def _tokens_and_logprobs(outputs) -> tuple[list[int], list[float]]:
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    tokens = [t for o in outputs for t in o.outputs[0].token_ids]
    logprobs = [e.logprob for o in outputs for e in (o.outputs[0].logprobs or [])]
    return tokens, logprobs


@pytest.mark.parametrize("kind", ["uld", "uoe"])
def test_unload_waits_for_a_request_resolved_just_before_it(kind, tiny_llama, tokenizer, uld_artifact, moe_world):
    """A request that resolved its artifact before an unload is served with it; nothing else in the batch fails."""
    from unlearn_serve.server.engine.sequence import Selection

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    if kind == "uld":
        base, selection = tiny_llama, Selection(FORGET, {"alpha": 0.75, "filter": 1e-4})
    else:
        base, selection = moe_world[0], Selection(FORGET)
    prompts = ["Alice likes", "The capital of"]  # the second one runs without unlearning, in the same batch

    def fresh() -> Engine:
        engine = Engine(copy.deepcopy(base), tokenizer, EngineConfig(max_num_seqs=4, max_model_len=64), "tiny")
        (engine.load_uld if kind == "uld" else engine.load_uoe)(FORGET, uld_artifact if kind == "uld" else moe_world[1])
        return engine

    reference = fresh().generate(prompts, params, [selection, None])
    expected = [(r.completions[0].token_ids, [e.logprob for e in r.completions[0].logprobs]) for r in reference]
    plain = fresh().generate(prompts[:1], params, None)[0].completions[0]
    assert [e.logprob for e in plain.logprobs] != pytest.approx(expected[0][1], abs=1e-3)  # the artifact matters

    engine = fresh()
    inbox = engine._inbox = _UnloadJustBeforeEnqueue(engine, FORGET)
    outputs = _run_async(engine, prompts, params, [selection, None])
    for got, (tokens, logprobs) in zip(outputs, expected, strict=True):
        got_tokens, got_logprobs = _tokens_and_logprobs(got)
        assert got_tokens == tokens
        assert got_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert inbox.done.wait(10)  # and then the unload completed
    assert FORGET not in engine.artifact_names()


def test_uoe_patch_files_are_read_off_the_engine_thread(moe_world, tokenizer, monkeypatch):
    import unlearn_serve.server.unlearning.uoe as uoe_module
    from unlearn_serve.server.engine.async_engine import AsyncEngine

    readers = []
    original = uoe_module.load_expert_patch
    monkeypatch.setattr(
        uoe_module, "load_expert_patch", lambda *a, **k: readers.append(threading.current_thread()) or original(*a, **k)
    )
    engine = Engine(copy.deepcopy(moe_world[0]), tokenizer, EngineConfig(max_num_seqs=2, max_model_len=32), "tiny")
    runner = AsyncEngine(engine)
    runner.start()
    try:
        engine.load_uoe(FORGET, moe_world[1])
        assert readers and engine.engine_thread not in readers
        assert FORGET in engine.artifact_names()
    finally:
        runner.stop()


# ---------------------------------------------------------------------------------------------- item 7
def test_arrivals_every_step_do_not_starve_running_decodes(tiny_llama, tokenizer):
    from unlearn_serve.server.engine.sequence import Request

    engine = Engine(tiny_llama, tokenizer, EngineConfig(max_num_seqs=32, max_model_len=64))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompt = tokenizer.encode(FACTS[0][:11])
    running = []
    for _ in range(8):
        rid = engine.new_request_id()
        running.append(rid)
        engine.add_request(Request(rid, prompt, params))
    engine.step()  # one prefill admits all eight
    assert engine.num_running() == 8
    generated = dict.fromkeys(running, 1)
    history = []
    for _ in range(16):
        engine.add_request(Request(engine.new_request_id(), prompt, SamplingParams(max_tokens=30)))  # a newcomer
        for out in engine.step():
            if out.request_id in generated:
                generated[out.request_id] += len(out.outputs[0].token_ids)
        history.append(dict(generated))
    # every running stream gains a token in every window of two steps
    for before, after in zip(history, history[2:], strict=False):
        assert all(after[r] > before[r] for r in running), (before, after)
    assert engine.num_running() > 8  # and the newcomers were admitted meanwhile


# ---------------------------------------------------------------------------------------------- item 6
def test_ready_and_health_fail_after_a_fatal_engine_error(tiny_llama, tokenizer, monkeypatch):
    engine = Engine(tiny_llama, tokenizer, EngineConfig(max_num_seqs=2, max_model_len=64))
    original_step = engine.step
    failures = {"kind": None}

    def step():
        kind, failures["kind"] = failures["kind"], None if failures["kind"] == "once" else failures["kind"]
        outputs = original_step()  # the failure comes mid-step, with the requests admitted
        if kind == "once":
            raise ValueError("a one-off failure")
        if kind == "cuda":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return outputs

    monkeypatch.setattr(engine, "step", step)
    with run_server(build_app(ServerConfig(served_model_name="tiny"), engine=engine)) as url:
        body = {"model": "tiny", "prompt": "Alice likes", "max_tokens": 2}
        failures["kind"] = "once"  # one failed step: that batch gets an error, the server stays in rotation
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 500
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 200

        failures["kind"] = "cuda"  # sticky device error: every step would fail from now on
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 500
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "engine failed" and "CUDA error" in ready.json()["error"]
        assert httpx.get(f"{url}/health").status_code == 503
        late = httpx.post(f"{url}/v1/completions", json=body, timeout=30)  # refused at once, not queued forever
        assert late.status_code == 503 and late.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- item 3
def sentencepiece_tokenizer():
    """A Llama/Mistral-style tokenizer: "▁" marks a word start, and decoding strips the first one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from unlearn_serve.tiny import DEFAULT_CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(DEFAULT_CORPUS + FACTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_completions_keep_their_leading_space():
    from unlearn_serve.tiny import build_tiny_model

    tok = sentencepiece_tokenizer()
    ids = tok.encode("Alice likes")
    assert tok.convert_ids_to_tokens(ids)[-1].startswith("▁")
    assert tok.decode(ids[-1:]) == tok.decode(ids[-1:]).lstrip()  # decoded alone, a token loses its "▁": the trap
    engine = Engine(build_tiny_model("llama", tok, seed=2), tok, EngineConfig(max_num_seqs=4, max_model_len=64))
    prompts = ["The capital of France is", "Alice likes green", "Bob plays the", "One two three four"]
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(prompts))]
    results = engine.generate(prompts, params)
    starts_with_space = 0
    for result in results:
        completion = result.completions[0]
        whole = tok.decode(result.prompt_token_ids + completion.token_ids, skip_special_tokens=True)
        prompt_text = tok.decode(result.prompt_token_ids, skip_special_tokens=True)
        assert prompt_text + completion.text == whole  # so echo (prompt text + completion) is right too
        starts_with_space += completion.text.startswith(" ")
    assert starts_with_space  # the case that used to lose its space was exercised


# ---------------------------------------------------------------------------------------------- item 4
def _attention_variant(family: str, tok, features: bool):
    """A tiny random model of `family` with its attention features on (or, for the control, off)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from unlearn_serve.tiny import tiny_config

    base = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False)
    if family == "mistral":
        config = AutoConfig.for_model("mistral", **base, sliding_window=4 if features else None)
    elif family == "gemma2":
        config = AutoConfig.for_model(
            "gemma2", **base, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
            attn_logit_softcapping=1.0 if features else None, final_logit_softcapping=2.0 if features else None,
        )
    elif family == "gemma3_text":  # local layers: sliding window and their own RoPE base; global layers
        config = AutoConfig.for_model(
            "gemma3_text", **base, head_dim=16, query_pre_attn_scalar=16, sliding_window=4 if features else 128,
            layer_types=["sliding_attention", "full_attention"] * 2 if features else ["full_attention"] * 4,
            final_logit_softcapping=2.0 if features else None,
        )
    elif family == "gpt_oss":
        config = tiny_config("gpt_oss", len(tok), max_position_embeddings=128, sliding_window=4 if features else 128)
    else:
        config = AutoConfig.for_model(family, **base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)  # sharp attention scores, so soft-capping really changes them
            if name.endswith("sinks"):
                p.copy_(torch.linspace(-1, 2, p.numel()) if features else torch.full_like(p, -torch.inf))
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3_text", "gpt_oss"])
def test_attention_variants_match_transformers(family, tokenizer):
    """Echo prompt logprobs and decoded-token logprobs equal transformers' eager forward (fp32, 1e-4)."""
    model = _attention_variant(family, tokenizer, features=True)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "eager"
    prompts = [tokenizer.encode(FACTS[0] + " " + FACTS[1]), tokenizer.encode(FACTS[2])]  # longer than the window
    assert min(len(p) for p in prompts) > 4
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=2, max_model_len=64))
    params = SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
    results = engine.generate(prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        completion = result.completions[0]
        full = prompt + completion.token_ids
        with torch.no_grad():
            ref = reference(torch.tensor([full])).logits[0].log_softmax(-1)
        served = [e.logprob for e in result.prompt_logprobs[1:]] + [e.logprob for e in completion.logprobs]
        expected = [float(ref[i, full[i + 1]]) for i in range(len(full) - 1)]
        assert served == pytest.approx(expected, abs=1e-4)
        assert completion.token_ids[0] == int(ref[len(prompt) - 1].argmax())
    if family != "llama":  # the features change the numbers, so the comparison above tests them
        control = _attention_variant(family, tokenizer, features=False)
        control.config._attn_implementation = "eager"
        with torch.no_grad():
            off = control(torch.tensor([prompts[0]])).logits[0].log_softmax(-1)
            on = reference(torch.tensor([prompts[0]])).logits[0].log_softmax(-1)
        assert (on - off).abs().max() > 1e-2


def test_unimplemented_attention_features_are_refused_at_start_up(tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from unlearn_serve.errors import ModelLoadError

    config = AutoConfig.for_model(  # Llama-4: chunked local attention
        "llama4_text", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=64, intermediate_size_mlp=64, num_local_experts=2,
        max_position_embeddings=128,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with pytest.raises(ModelLoadError) as refused:
        Engine(model, tokenizer, EngineConfig(max_num_seqs=1, max_model_len=32))
    message = str(refused.value)
    assert "\n" not in message and "chunked local attention" in message and "llama4_text" in message
