"""Access control (issue 12) against a real uvicorn server and the official `openai` client: per-key models,
the weaken rule, admin scope, 401s, the audit log, the key_name metric label, chat-template hardening; and the
`serve` start-up checks of a key file.

One server (module scope): a tiny model `tiny`, two ULD artifacts, a key file with a limited key (`bot`: only
`forget-a`, no admin, may not weaken), an admin key stored as sha256 (`ops`), and an audit log.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import run_server
from peft import get_peft_model
from unlearn_serve.server.app import ServerState, build_app
from unlearn_serve.server.audit import AuditConfig
from unlearn_serve.server.config import ServerConfig
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.policy import AccessPolicy, KeyEntry, check_unlearning

from unlearn_serve.artifact import fingerprint_model
from unlearn_serve.assistant import assistant_lora_config
from unlearn_serve.cli import main as cli_main
from unlearn_serve.cli.serve import install_key_reload
from unlearn_serve.errors import ConfigError
from unlearn_serve.tiny import build_tiny_model, save_tiny
from unlearn_serve.uld_artifact import save_uld_artifact

MODEL = "tiny"
A, B = "forget-a", "forget-b"
A_ALPHA, A_FILTER = 1.0, 0.1  # forget-a's serving defaults (its manifest)
BOT_KEY = "sk-bot-0123456789"
OPS_KEY = "sk-ops-9876543210"
SECRET_PROMPT = "Zanzibar quokka marmalade"  # must never reach the audit log
CHAT_TIMEOUT_S = 1.0


def make_artifact(model, out: Path, seed: int, defaults: dict | None = None) -> Path:
    peft_model = get_peft_model(copy.deepcopy(model), assistant_lora_config(model, 1, rank=2, alpha=4))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    details = {"assistant_layers": 1, "lora_rank": 2, "lora_alpha": 4}
    return save_uld_artifact(peft_model, out, fingerprint_model(model), details, {}, defaults=defaults)


@pytest.fixture(scope="module")
def world(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    model = build_tiny_model("llama", tokenizer, seed=0)
    artifacts = root / "artifacts"
    make_artifact(model, artifacts / "a", 1, {"alpha": A_ALPHA, "filter": A_FILTER})
    make_artifact(model, artifacts / "b", 2)
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"name": "bot", "key": BOT_KEY, "models": [A]},
        {"name": "ops", "key_sha256": hashlib.sha256(OPS_KEY.encode()).hexdigest(), "models": ["*"],
         "admin": True, "can_weaken": True},
    ]}))
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=4, max_model_len=64), model_name=MODEL)
    engine.load_uld(A, artifacts / "a")
    engine.load_uld(B, artifacts / "b")
    audit = root / "audit.jsonl"
    config = ServerConfig(
        served_model_name=MODEL, key_policy=AccessPolicy.from_file(keys), audit=AuditConfig(str(audit)),
        artifact_root=str(artifacts), chat_template_timeout_s=CHAT_TIMEOUT_S,
    )
    app = build_app(config, engine=engine)
    with run_server(app) as url:
        yield {"url": url, "root": root, "audit": audit, "app": app}


@pytest.fixture(scope="module")
def bot(world):
    return openai.OpenAI(base_url=f"{world['url']}/v1", api_key=BOT_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ops(world):
    return openai.OpenAI(base_url=f"{world['url']}/v1", api_key=OPS_KEY, max_retries=0, timeout=60)


def complete(client, model: str, unlearning: dict | None = None, prompt: str = "Alice likes"):
    extra = {"unlearning": unlearning} if unlearning is not None else None
    return client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, extra_body=extra)


def post(url: str, path: str, key: str | None, body: dict | bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(f"{url}{path}", content=body, headers={**headers, "content-type": "application/json"},
                          timeout=60)
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# --------------------------------------------------------------------------------------------- models


def test_a_limited_key_lists_only_its_models_and_no_paths(world, bot, ops):
    assert [m.id for m in bot.models.list().data] == [A]
    assert sorted(m.id for m in ops.models.list().data) == sorted([MODEL, A, B])
    for client in (bot, ops):
        for card in client.models.list().data:
            assert card.model_extra["root"] == card.id
    body = httpx.get(f"{world['url']}/v1/models", headers={"Authorization": f"Bearer {OPS_KEY}"}).text
    assert str(world["root"]) not in body and "/tmp" not in body


def test_other_models_are_404_exactly_like_unknown_ones(world, bot):
    for name in (MODEL, B, "no-such-model"):
        with pytest.raises(openai.NotFoundError):
            complete(bot, name)
    errors = [error_of(post(world["url"], "/v1/completions", BOT_KEY, {"model": n, "prompt": "x", "max_tokens": 1}),
                       404) for n in (B, "no-such-model")]
    assert errors[0]["message"].replace(B, "?") == errors[1]["message"].replace("no-such-model", "?")
    assert errors[0]["code"] == errors[1]["code"] == "model_not_found"
    assert complete(bot, A).choices[0].text is not None


# --------------------------------------------------------------------------------------------- the weaken rule


@pytest.mark.parametrize(("unlearning", "param", "bound"), [
    ({"alpha": A_ALPHA / 2}, "unlearning.alpha", A_ALPHA),
    ({"alpha": 0.0}, "unlearning.alpha", A_ALPHA),
    ({"filter": 1.0}, "unlearning.filter", A_FILTER),
    ({"alpha": A_ALPHA * 2, "filter": A_FILTER * 2}, "unlearning.filter", A_FILTER),
])
def test_weakening_without_can_weaken_is_403(world, bot, unlearning, param, bound):
    with pytest.raises(openai.PermissionDeniedError) as info:
        complete(bot, A, unlearning)
    error = info.value.body
    assert error["code"] == "permission_denied" and error["param"] == param, error
    assert f"{bound:g}" in error["message"], error


@pytest.mark.parametrize("unlearning", [{"alpha": A_ALPHA * 3}, {"alpha": A_ALPHA}, {"filter": A_FILTER / 10},
                                        {"alpha": A_ALPHA + 0.5, "filter": 0.0}])
def test_strengthening_is_allowed(bot, unlearning):
    assert complete(bot, A, unlearning).usage.completion_tokens >= 1


@pytest.mark.parametrize("raw", [b"-3", b"-0.01", b"NaN", b"Infinity", b"-Infinity", b"1e999", b"true", b'"2"'])
def test_alpha_must_be_finite_and_non_negative_for_everybody(world, raw):
    body = b'{"model": "%s", "prompt": "x", "max_tokens": 1, "unlearning": {"alpha": %s}}' % (A.encode(), raw)
    for key in (BOT_KEY, OPS_KEY):
        error = error_of(post(world["url"], "/v1/completions", key, body), 400)
        assert error["param"] == "unlearning.alpha", error


@pytest.mark.parametrize(
    "field",
    [
        b'"margin": 100',
        b'"rule": "difference"',
        b'"refilter": false',
        b'"floor": 0',
        b'"floor": null',
        b'"gate": null',
    ],
)
def test_engine_level_settings_are_not_request_fields(world, field):
    """The combination rule, its margin, floor, the refilter and the early-exit gate are the artifact's (or the
    operator's engine-level choice): a request that names one, which could switch most of the unlearning off (or, the
    gate, change what it removes), gets a 400 for everybody."""
    body = b'{"model": "%s", "prompt": "x", "max_tokens": 1, "unlearning": {%s}}' % (A.encode(), field)
    for key in (BOT_KEY, OPS_KEY):
        error = error_of(post(world["url"], "/v1/completions", key, body), 400)
        assert error["param"].startswith("unlearning."), error


def test_the_admin_key_may_weaken_and_use_every_model(ops):
    assert complete(ops, A, {"alpha": 0.0, "filter": 1.0}).usage.completion_tokens >= 1
    assert complete(ops, B, {"alpha": 0.1}).usage.completion_tokens >= 1
    assert complete(ops, MODEL).usage.completion_tokens >= 1


# --------------------------------------------------------------------------------------------- admin, 401


def test_admin_routes_need_an_admin_key(world):
    url = world["url"]
    for path, body in (("/v1/unlearning/load", {"name": "c", "path": "a"}), ("/v1/unlearning/unload", {"name": B})):
        error = error_of(post(url, path, BOT_KEY, body), 403)
        assert error["code"] == "permission_denied" and error["type"] == "PermissionDeniedError"
    assert B in {m["id"] for m in httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {OPS_KEY}"})
                 .json()["data"]}  # the refused unload did nothing


def test_an_admin_key_loads_and_unloads(world, ops):
    url = world["url"]
    r = post(url, "/v1/unlearning/load", OPS_KEY, {"name": "forget-c", "path": "b"})
    assert r.status_code == 200, r.text
    assert "forget-c" in {m.id for m in ops.models.list().data}
    r = post(url, "/v1/unlearning/unload", OPS_KEY, {"name": "forget-c"})
    assert r.status_code == 200, r.text
    assert "forget-c" not in {m.id for m in ops.models.list().data}
    # a refused load names no filesystem path
    error = error_of(post(url, "/v1/unlearning/load", OPS_KEY, {"name": "x", "path": "missing"}), 400)
    assert str(world["root"]) not in error["message"], error


@pytest.mark.parametrize("header", [None, "Bearer wrong-key-123", f"Basic {BOT_KEY}", f"Bearer {BOT_KEY}x",
                                    f"Bearer {hashlib.sha256(OPS_KEY.encode()).hexdigest()}"])
def test_wrong_or_missing_key_is_401(world, header):
    headers = {"Authorization": header} if header else {}
    r = httpx.get(f"{world['url']}/v1/models", headers=headers)
    assert error_of(r, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{world['url']}/v1", api_key="nope", max_retries=0).models.list()


# --------------------------------------------------------------------------------------------- audit, metrics


def audit_lines(path: Path, ids: set[str], timeout: float = 20.0) -> list[dict]:
    """The audit lines of these request ids (the writer thread is asynchronous: wait for all of them)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line]
        mine = [line for line in lines if line["request_id"] in ids]
        if {line["request_id"] for line in mine} == ids or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def test_the_audit_log_has_one_line_per_request_and_no_text(world):
    url = world["url"]
    body = {"model": A, "prompt": SECRET_PROMPT, "max_tokens": 3, "ignore_eos": True, "temperature": 0}
    calls = [
        ("ok", BOT_KEY, "/v1/completions", {**body, "unlearning": {"alpha": 2.5}}),
        ("default", BOT_KEY, "/v1/completions", body),
        ("stream", BOT_KEY, "/v1/completions", {**body, "stream": True}),
        ("weaken", BOT_KEY, "/v1/completions", {**body, "unlearning": {"alpha": 0.1}}),
        ("base", BOT_KEY, "/v1/completions", {**body, "model": MODEL}),
        ("unknown", BOT_KEY, "/v1/completions", {**body, "model": SECRET_PROMPT}),
        ("nokey", None, "/v1/completions", body),
        ("chat", OPS_KEY, "/v1/chat/completions",
         {"model": B, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 2, "ignore_eos": True}),
    ]
    ids = {}
    for label, key, path, payload in calls:
        r = post(url, path, key, payload)
        ids[label] = r.headers["x-request-id"]
    lines = audit_lines(world["audit"], set(ids.values()))
    assert sorted(line["request_id"] for line in lines) == sorted(ids.values())  # exactly one line each
    by = {label: next(line for line in lines if line["request_id"] == rid) for label, rid in ids.items()}
    assert by["ok"] | {"time": None} == by["ok"] | {
        "time": None, "key": "bot", "endpoint": "/v1/completions", "method": "POST", "model": A, "artifact": A,
        "alpha": 2.5, "filter": A_FILTER, "status": 200, "completion_tokens": 3,
    }
    assert by["ok"]["prompt_tokens"] > 0 and by["ok"]["time"].endswith("Z")
    assert (by["default"]["alpha"], by["default"]["filter"], by["default"]["status"]) == (A_ALPHA, A_FILTER, 200)
    assert (by["stream"]["status"], by["stream"]["artifact"], by["stream"]["completion_tokens"]) == (200, A, 3)
    assert (by["weaken"]["status"], by["weaken"]["artifact"], by["weaken"]["completion_tokens"]) == (403, None, 0)
    assert (by["base"]["status"], by["base"]["model"], by["base"]["key"]) == (404, MODEL, "bot")
    assert (by["unknown"]["status"], by["unknown"]["model"]) == (404, None)  # a client's string is not logged
    assert (by["nokey"]["status"], by["nokey"]["key"]) == (401, None)
    assert (by["chat"]["key"], by["chat"]["artifact"], by["chat"]["endpoint"], by["chat"]["completion_tokens"]) == (
        "ops", B, "/v1/chat/completions", 2)
    text = world["audit"].read_text()
    assert SECRET_PROMPT not in text and "Zanzibar" not in text


def test_request_metrics_carry_the_key_name(world, bot):
    complete(bot, A)
    metrics = httpx.get(f"{world['url']}/metrics").text
    lines = [line for line in metrics.splitlines() if line.startswith("unlearn:generation_tokens_total{")]
    assert any('key_name="bot"' in line and f'artifact="{A}"' in line for line in lines), lines


# --------------------------------------------------------------------------------------------- chat templates


LOOP = "{% for i in range(1000000) %}{% for j in range(1000000) %}x{% endfor %}{% endfor %}"


@pytest.mark.parametrize(("kwargs", "ok"), [
    ({"chat_template": LOOP}, False),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, False),
    ({"enable_thinking": {"nested": True}}, False),
    ({"reasoning_effort": "x" * 1000}, False),
    ({"enable_thinking": False, "reasoning_effort": "low"}, True),
])
def test_chat_template_kwargs_allow_list(world, kwargs, ok):
    body = {"model": A, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "chat_template_kwargs": kwargs}
    started = time.monotonic()
    r = post(world["url"], "/v1/chat/completions", OPS_KEY, body)
    if ok:
        assert r.status_code == 200, r.text
    else:
        assert error_of(r, 400)["param"] == "chat_template_kwargs"
        assert time.monotonic() - started < 10  # refused up front, never rendered


def test_a_slow_chat_template_times_out_while_the_server_keeps_serving(world, monkeypatch):
    """A render that never ends (here: blocked until the test releases it) gets 400 after the time limit;
    meanwhile /health and other requests are answered, i.e. rendering is off the event loop."""
    serving = world["app"].state.server.serving
    entered, release = threading.Event(), threading.Event()

    def stuck_render(*args, **kwargs):
        entered.set()
        release.wait(60)
        return "never used"

    monkeypatch.setattr(serving.tokenizer, "apply_chat_template", stuck_render)
    url = world["url"]
    result: dict = {}

    def send():
        body = {"model": A, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        result["response"] = post(url, "/v1/chat/completions", OPS_KEY, body)

    started = time.monotonic()
    thread = threading.Thread(target=send)
    thread.start()
    try:
        assert entered.wait(20), "the template was never rendered"
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        r = post(url, "/v1/completions", OPS_KEY, {"model": MODEL, "prompt": "Alice", "max_tokens": 1})
        assert r.status_code == 200, r.text
        thread.join(30)
        error = error_of(result["response"], 400)
        assert error["code"] == "chat_template_timeout" and error["param"] == "messages", error
        assert time.monotonic() - started < 20  # "within seconds": the limit is CHAT_TIMEOUT_S
    finally:
        release.set()
        thread.join(30)


# --------------------------------------------------------------------------------------------- policy units


def test_keys_are_held_as_digests_and_every_entry_is_compared(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - name: a\n    key: {BOT_KEY}\n    models: [m]\n"
                 f"  - name: b\n    key_sha256: {hashlib.sha256(OPS_KEY.encode()).hexdigest()}\n    models: ['*']\n")
    policy = AccessPolicy.from_file(f)
    assert [e.name for e in policy.entries] == ["a", "b"] and policy.has_plain_keys
    assert BOT_KEY not in repr(policy)
    assert policy.authenticate(BOT_KEY).name == "a" and policy.authenticate(OPS_KEY).name == "b"
    assert policy.authenticate("") is None and policy.authenticate(BOT_KEY[:-1]) is None
    assert AccessPolicy().authenticate("anything").admin  # open: full access


def test_check_unlearning_bounds():
    limited = KeyEntry("k", b"", frozenset({"a"}))
    check_unlearning(limited, "a", {"alpha": 1.0, "filter": 0.1}, 1.0, 0.1)  # the defaults themselves
    for opts in ({"alpha": 0.999}, {"filter": 0.1001}, {"alpha": math.nan}):
        with pytest.raises(Exception, match="weaken"):
            check_unlearning(limited, "a", opts, 1.0, 0.1)
    check_unlearning(KeyEntry("w", b"", can_weaken=True), "a", {"alpha": 0.0, "filter": 1.0}, 1.0, 0.1)


# --------------------------------------------------------------------------------------------- serve start-up


BAD_FILES = {
    "unknown field": ({"keys": [{"name": "x", "key": BOT_KEY, "models": ["*"], "adm": True}]}, ["'x'", "adm"]),
    "duplicate name": ({"keys": [{"name": "x", "key": BOT_KEY, "models": ["*"]},
                                 {"name": "x", "key": OPS_KEY, "models": ["*"]}]}, ["keys[1]", "'x'", "duplicate"]),
    "duplicate key": ({"keys": [{"name": "x", "key": BOT_KEY, "models": ["*"]},
                                {"name": "y", "key_sha256": hashlib.sha256(BOT_KEY.encode()).hexdigest(),
                                 "models": ["*"]}]}, ["'y'", "same key"]),
    "model not served": ({"keys": [{"name": "x", "key": BOT_KEY, "models": ["nope"]}]}, ["'x'", "'nope'"]),
    "both key forms": ({"keys": [{"name": "x", "key": BOT_KEY, "key_sha256": "0" * 64, "models": ["*"]}]}, ["'x'"]),
    "not a list": ({"keys": {"name": "x"}}, ["keys"]),
    "empty": ({"keys": []}, ["no keys"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_serve_refuses_a_bad_key_file_in_one_line(tmp_path, capsys, case):
    data, phrases = BAD_FILES[case]
    f = tmp_path / "keys.json"
    f.write_text(json.dumps(data))
    code = cli_main(["serve", "--model", str(tmp_path / "no-model"), "--api-keys", str(f)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert all(p in err for p in phrases), err


def test_serve_warns_about_readable_plain_keys_and_open_public_servers(tmp_path, caplog):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"keys": [{"name": "x", "key": BOT_KEY, "models": ["*"]}]}))
    os.chmod(f, 0o644)
    missing = str(tmp_path / "no-model")  # start-up stops at the model load, after the key checks
    assert cli_main(["serve", "--model", missing, "--api-keys", str(f)]) == 2
    assert any("readable by group/others" in r.getMessage() for r in caplog.records)
    caplog.clear()
    os.chmod(f, 0o600)
    assert cli_main(["serve", "--model", missing, "--api-keys", str(f), "--host", "0.0.0.0"]) == 2
    assert not any("readable" in r.getMessage() or "no API keys" in r.getMessage() for r in caplog.records)
    assert cli_main(["serve", "--model", missing, "--host", "0.0.0.0"]) == 2
    assert any("no API keys" in r.getMessage() for r in caplog.records)
    caplog.clear()
    assert cli_main(["serve", "--model", missing, "--host", "127.0.0.1"]) == 2
    assert not any("no API keys" in r.getMessage() for r in caplog.records)


def test_config_error_is_a_library_error():
    with pytest.raises(ConfigError):
        AccessPolicy.from_keys(["k1"]).merged(AccessPolicy([KeyEntry("api-key-1", b"x")]))


def test_sighup_reloads_the_key_file_and_keeps_the_old_keys_on_a_bad_one(tmp_path):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"keys": [{"name": "old", "key": BOT_KEY, "models": ["*"]}]}))
    state = ServerState(ServerConfig(served_model_name=MODEL, api_keys=["flag-key-1"],
                                     key_policy=AccessPolicy.from_file(f)))
    previous = signal.getsignal(signal.SIGHUP)
    try:
        install_key_reload(state, str(f))
        f.write_text(json.dumps({"keys": [{"name": "new", "key": OPS_KEY, "models": [MODEL], "admin": True}]}))
        os.kill(os.getpid(), signal.SIGHUP)
        assert state.policy.authenticate(BOT_KEY) is None and state.policy.authenticate(OPS_KEY).name == "new"
        assert state.policy.authenticate("flag-key-1").admin  # the flags stay
        f.write_text(json.dumps({"keys": [{"name": "broken", "key": BOT_KEY, "models": ["not-served"]}]}))
        os.kill(os.getpid(), signal.SIGHUP)
        assert state.policy.authenticate(OPS_KEY).name == "new" and state.policy.authenticate(BOT_KEY) is None
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_serve_flags_reach_the_server(tokenizer, tmp_path, monkeypatch):
    """`serve --api-keys --audit-log --chat-template-timeout` configure the app it would run."""
    import unlearn_serve.server.draining as draining

    model_dir = save_tiny(build_tiny_model("llama", tokenizer, seed=0), tokenizer, tmp_path / "model")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "bot", "key": BOT_KEY, "models": [MODEL]}]}))
    os.chmod(keys, 0o600)
    built = {}

    class NotServing:
        def run(self):
            return None

    def capture(app, *args, **kwargs):
        built["app"] = app
        return NotServing()

    monkeypatch.setattr(draining, "draining_server", capture)
    previous = signal.getsignal(signal.SIGHUP)
    try:
        code = cli_main(["serve", "--model", str(model_dir), "--served-model-name", MODEL, "--device", "cpu",
                         "--api-keys", str(keys), "--audit-log", str(tmp_path / "audit.jsonl"),
                         "--audit-log-max-bytes", "0", "--chat-template-timeout", "2.5"])
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert code == 0
    state = built["app"].state.server
    assert state.policy.authenticate(BOT_KEY).name == "bot" and state.policy.authenticate("other-key") is None
    assert (state.config.audit.path, state.config.audit.max_bytes) == (str(tmp_path / "audit.jsonl"), 0)
    assert state.config.chat_template_timeout_s == 2.5


def test_ready_after_a_failed_load_names_no_path():
    # /ready is unauthenticated: a failed model load reports the error's kind, never its message.
    from fastapi.testclient import TestClient

    from unlearn_serve.errors import ModelLoadError

    def factory():
        raise ModelLoadError("/srv/secret-models/llama-internal: no config.json")

    app = build_app(ServerConfig(served_model_name="m"), engine_factory=factory)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/ready").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        resp = client.get("/ready")
        assert resp.status_code == 503
        assert resp.json()["status"] == "load failed"
        assert "ModelLoadError" in resp.json()["error"]
        assert "/srv" not in resp.text and "secret-models" not in resp.text
