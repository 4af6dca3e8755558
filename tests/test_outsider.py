"""Regression tests for defects an outsider QA pass found by using the product (CLI and API) as a user would."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import run_server
from peft import get_peft_model
from unlearn_serve.server.app import build_app
from unlearn_serve.server.audit import AuditConfig
from unlearn_serve.server.config import ServerConfig
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.sampling_params import SamplingParams, SamplingParamsError
from unlearn_serve.server.policy import AccessPolicy

from unlearn_serve.artifact import fingerprint_model
from unlearn_serve.assistant import assistant_lora_config
from unlearn_serve.cli import main
from unlearn_serve.tiny import build_tiny_model
from unlearn_serve.uld_artifact import save_uld_artifact

MODEL, ARTIFACT = "tiny", "forget-a"
BOT_KEY, OPS_KEY = "sk-bot-0123456789", "sk-ops-0123456789"


def _one_line_error(capsys, argv: list[str], expect: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"unlearn-serve {argv[0]}: error: ") and expect in lines[0], err


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--port", "99999"], "--port 99999"),  # was: OverflowError traceback from uvicorn after loading the model
        (["--log-level", "bogus"], "--log-level bogus"),  # was: ValueError traceback from logging.basicConfig
        (["--max-num-seqs", "0"], "--max-num-seqs 0"),  # was: a server that started and could never run a request
        (["--max-model-len", "-1"], "--max-model-len -1"),
        (["--max-prefill-tokens", "0"], "--max-prefill-tokens 0"),
        (["--assistant-kv-layers", "-1"], "--assistant-kv-layers -1"),
        (["--artifact-root", "/nonexistent-root"], "--artifact-root /nonexistent-root"),  # was: found at a load
    ],
)
def test_serve_bad_flag_values_are_one_line_errors(capsys, tmp_path, flags, expect):
    # checked before anything loads, so no model is needed to see the error
    _one_line_error(capsys, ["serve", "--model", str(tmp_path / "nope"), *flags], expect)


@pytest.mark.parametrize(("flags", "expect"), [(["--port", "99999"], "--port 99999"),
                                               (["--max-num-seqs", "0"], "--max-num-seqs 0")])
def test_demo_bad_flag_values_fail_before_training(capsys, flags, expect):
    # was: a traceback only after minutes of converting SmolLM2 and training the assistant
    _one_line_error(capsys, ["demo", *flags], expect)


def test_serve_log_level_is_case_insensitive(tmp_path, capsys):
    # `--log-level INFO` passed the old check only to crash uvicorn (its levels are lower-case): now it reaches
    # the model loading, which fails on the missing directory with the usual one line
    _one_line_error(capsys, ["serve", "--model", str(tmp_path / "nope"), "--log-level", "INFO"], "nope")


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--hidden-size", "0"], "--hidden-size 0"),  # was: ZeroDivisionError traceback inside transformers
        (["--hidden-size", "6"], "--hidden-size 6"),
        (["--layers", "0"], "--layers"),  # was: wrote a model with no layers, exit 0
        (["--vocab-size", "0"], "--vocab-size"),
    ],
)
def test_make_tiny_bad_sizes_are_one_line_errors(capsys, tmp_path, flags, expect):
    _one_line_error(capsys, ["make-tiny", "--out", str(tmp_path / "m"), *flags], expect)
    assert not (tmp_path / "m").exists()


def test_make_tiny_out_is_a_file(capsys, tmp_path):
    # was: FileExistsError traceback after building the model
    (tmp_path / "f").write_text("x")
    _one_line_error(capsys, ["make-tiny", "--out", str(tmp_path / "f")], "is a file")


# ------------------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def world(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("outsider")
    model = build_tiny_model("llama", tokenizer, seed=0)
    peft_model = get_peft_model(copy.deepcopy(model), assistant_lora_config(model, 1, rank=2, alpha=4))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    details = {"assistant_layers": 1, "lora_rank": 2, "lora_alpha": 4}
    save_uld_artifact(peft_model, root / "a", fingerprint_model(model), details, {})
    keys = root / "keys.json"  # the shape of docs/security.md's example
    keys.write_text(json.dumps({"keys": [
        {"name": "bot", "key": BOT_KEY, "models": [ARTIFACT]},
        {"name": "ops", "key": OPS_KEY, "models": ["*"], "admin": True, "can_weaken": True},
    ]}))
    keys.chmod(0o600)
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=4, max_model_len=64), model_name=MODEL)
    engine.load_uld(ARTIFACT, root / "a")
    audit = root / "audit.jsonl"
    config = ServerConfig(served_model_name=MODEL, key_policy=AccessPolicy.from_file(keys),
                          audit=AuditConfig(str(audit)), artifact_root=str(root))
    with run_server(build_app(config, engine=engine)) as url:
        yield {"url": url, "audit": audit}


def client(world, key: str = OPS_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{world['url']}/v1", api_key=key, max_retries=0, timeout=60)


def test_a_seed_beyond_64_bits_is_a_400_and_cannot_stop_the_engine(world):
    # was: 500 "engine error: ValueError" for the whole batch (torch.Generator.manual_seed overflowed inside the
    # engine step), and the third such request stopped the engine: /health 503 until a restart
    ops = client(world)
    for model in (MODEL, ARTIFACT):
        for _ in range(4):
            with pytest.raises(openai.BadRequestError) as err:
                ops.completions.create(model=model, prompt="hi", max_tokens=2, seed=2**64)
            assert err.value.body["param"] == "seed"
    assert httpx.get(f"{world['url']}/health").status_code == 200
    for seed in (2**63 - 1, -(2**63)):  # the edges of the range work, with n > 1 (seed + choice index)
        r = ops.completions.create(model=MODEL, prompt="hi", max_tokens=2, seed=seed, n=2)
        assert len(r.choices) == 2
    with pytest.raises(SamplingParamsError):  # the Python API checks the same
        SamplingParams(seed=-(2**63) - 1).validate()


def test_a_tiny_temperature_is_greedy_not_nan(world):
    # was: 1e-300 became 0 in the float32 temperature tensor and logits / 0 sampled token 0 every step
    ops = client(world)
    greedy = ops.completions.create(model=MODEL, prompt="Alice", max_tokens=6, temperature=0)
    for temperature in (1e-300, 1e-45):
        r = ops.completions.create(model=MODEL, prompt="Alice", max_tokens=6, temperature=temperature, seed=3)
        assert r.choices[0].text == greedy.choices[0].text


def test_bad_stop_values_name_their_field(world):
    ops = client(world)
    with pytest.raises(openai.BadRequestError) as err:  # was: "logit_bias"
        ops.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"stop_token_ids": [10**6]})
    assert err.value.body["param"] == "stop_token_ids"
    with pytest.raises(openai.BadRequestError) as err:  # was: accepted, and every completion ended at once
        ops.completions.create(model=MODEL, prompt="hi", max_tokens=4, stop="")
    assert err.value.body["param"] == "stop"


def test_the_audit_log_names_the_model_of_a_body_refused_by_validation(world):
    # was: an attempt to invert unlearning (alpha < 0) was logged with model null, hiding its target
    r = httpx.post(f"{world['url']}/v1/completions", headers={"Authorization": f"Bearer {BOT_KEY}"},
                   json={"model": ARTIFACT, "prompt": "hi", "max_tokens": 2, "unlearning": {"alpha": -1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "unlearning.alpha"
    unknown = httpx.post(f"{world['url']}/v1/completions", headers={"Authorization": f"Bearer {BOT_KEY}"},
                         json={"model": "x<script>", "prompt": "hi", "n": 0})
    assert unknown.status_code == 400
    ids = {r.headers["x-request-id"]: ARTIFACT, unknown.headers["x-request-id"]: None}
    deadline = time.monotonic() + 20
    while True:
        lines = [json.loads(line) for line in Path(world["audit"]).read_text().splitlines() if line]
        mine = {line["request_id"]: line for line in lines if line["request_id"] in ids}
        if len(mine) == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {rid: line["model"] for rid, line in mine.items()} == ids
    assert all(line["key"] == "bot" and line["status"] == 400 for line in mine.values())


def test_generate_with_a_short_unlearning_list_queues_nothing(tokenizer):
    # was: zip(strict=True) raised only after the first prompts were added, leaving them queued in the engine
    engine = Engine(build_tiny_model("llama", tokenizer, seed=0), tokenizer,
                    EngineConfig(max_num_seqs=2, max_model_len=32), model_name=MODEL)
    with pytest.raises(ValueError, match="2 prompts"):
        engine.generate(["Alice", "Bob"], SamplingParams(max_tokens=2), unlearning=[None])
    assert engine.num_waiting() == 0
    assert len(engine.generate(["Alice"], SamplingParams(max_tokens=2, temperature=0))) == 1


def test_an_alpha_beyond_float32_is_a_400_not_nan_logits(world):
    # was: any key (a larger alpha is stronger unlearning) could send alpha 1e39: it became inf in float32, every
    # logit NaN, and the answer special tokens with logprob -9999
    bot = client(world, BOT_KEY)
    with pytest.raises(openai.BadRequestError) as err:
        bot.completions.create(model=ARTIFACT, prompt="Alice", max_tokens=2, extra_body={"unlearning": {"alpha": 1e39}})
    assert err.value.body["param"] == "unlearning.alpha"
    r = bot.completions.create(model=ARTIFACT, prompt="Alice", max_tokens=3, temperature=0, logprobs=1,
                               extra_body={"unlearning": {"alpha": 1e6}})
    assert all(lp > -9999.0 for lp in r.choices[0].logprobs.token_logprobs)
