"""Fuzzing: schemathesis generates requests from the server's own /openapi.json and sends them to a real uvicorn
server (tiny model, an API key, a key file with a limited key, a loaded ULD artifact). Positive (schema-valid) and
negative (schema-violating) cases for every operation; no response may be a 5xx, every /v1 error must have the
OpenAI shape, and the server must still answer a normal request afterwards.

Generation is derandomized (the same cases every run). To keep generation cheap the context is small and
max_tokens values that fit the context are clamped to 4 tokens; values beyond the context are sent as
generated, so the limit checks are still fuzzed.
"""

from __future__ import annotations

import collections
import copy
import json
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from conftest import run_server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from schemathesis import GenerationMode
from unlearn_serve.server.app import build_app
from unlearn_serve.server.config import ServerConfig
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.policy import AccessPolicy

from unlearn_serve.artifact import fingerprint_model
from unlearn_serve.assistant import assistant_lora_config
from unlearn_serve.tiny import build_tiny_model
from unlearn_serve.uld_artifact import save_uld_artifact

MODEL = "tiny"
ARTIFACT = "forget-a"
API_KEY = "fuzz-key"
MAX_MODEL_LEN = 24
# examples per operation: (positive, negative). Operations without parameters have one case each.
EXAMPLES = {
    "POST /v1/completions": (150, 110),
    "POST /v1/chat/completions": (100, 100),
    "POST /v1/unlearning/load": (30, 20),
    "POST /v1/unlearning/unload": (20, 15),
}
MIN_REQUESTS = 500
LIMITED_KEY = "fuzz-limited-key"  # from a key file: only ARTIFACT, no admin, may not weaken (403s and 404s)
AUTH = st.sampled_from(
    [{"Authorization": f"Bearer {API_KEY}"}] * 6 + [{"Authorization": f"Bearer {LIMITED_KEY}"}] * 2
    + [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}]
)



@pytest.fixture(scope="module")
def fuzz_server(tokenizer, tmp_path_factory):
    model = build_tiny_model("llama", tokenizer, seed=0)
    root = tmp_path_factory.mktemp("fuzz-artifacts")
    # a real ULD artifact, so requests naming it (and its `unlearning` options) reach the ULD path
    peft_model = get_peft_model(copy.deepcopy(model), assistant_lora_config(model, 1, rank=2, alpha=4))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    details = {"assistant_layers": 1, "lora_rank": 2, "lora_alpha": 4}
    save_uld_artifact(peft_model, root / "good", fingerprint_model(model), details, {})
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=8, max_model_len=MAX_MODEL_LEN), model_name=MODEL)
    engine.load_uld(ARTIFACT, root / "good")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "limited", "key": LIMITED_KEY, "models": [ARTIFACT]}]}))
    config = ServerConfig(served_model_name=MODEL, api_keys=[API_KEY], key_policy=AccessPolicy.from_file(keys),
                          max_queue=64, artifact_root=str(root))
    with run_server(build_app(config, engine=engine)) as url:
        yield url, root


GENERATE = {"POST /v1/completions", "POST /v1/chat/completions"}


def steer(label: str, body, model: str | None, path: str | None):
    """Point most schema-valid bodies at models and paths that exist (else nearly all would be 404s)."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if path is not None and "path" in body:
        body["path"] = path
    if label not in GENERATE:
        return body
    if model is not None:
        body["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and 4 < body[key] <= MAX_MODEL_LEN:
            body[key] = 4
    return body


def openai_error_shape(response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


def fuzz_operation(url: str, root: Path, op, mode: GenerationMode, count: int, sent, failures: list[str]) -> None:
    """Send `count` generated cases for one operation; record what was sent and what failed."""
    steering = st.tuples(
        st.sampled_from([MODEL] * 3 + [ARTIFACT, None]),
        st.sampled_from(["good", "missing", str(Path(root).parent), None]),
    )

    @given(case=op.as_strategy(generation_mode=mode), steer_to=steering, headers=AUTH)
    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case, steer_to, headers):
        if mode is GenerationMode.POSITIVE and case.body is not None:
            case.body = steer(op.label, case.body, *steer_to)
        response = case.call(base_url=url, headers=headers, timeout=60)
        sent[op.label, response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"{response.status_code} {response.text[:300]}\n  {case.as_curl_command()}")
        elif response.status_code >= 400 and op.path.startswith("/v1/") and not openai_error_shape(response):
            failures.append(f"not an OpenAI error: {response.text[:200]}\n  {case.as_curl_command()}")

    run()


@pytest.mark.slow  # ~500 requests
def test_fuzz_every_endpoint_no_5xx(fuzz_server):
    url, root = fuzz_server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert set(EXAMPLES) <= labels and {"GET /health", "GET /ready", "GET /metrics", "GET /v1/models"} <= labels

    sent: collections.Counter[tuple[str, int]] = collections.Counter()  # (operation, status) -> requests
    failures: list[str] = []
    session = httpx.Client(timeout=60)  # for the follow-up checks only; cases use schemathesis' transport

    for op in operations:
        positive, negative = EXAMPLES.get(op.label, (1, 0))
        for mode, count in ((GenerationMode.POSITIVE, positive), (GenerationMode.NEGATIVE, negative)):
            if count:
                fuzz_operation(url, root, op, mode, count, sent, failures)

    total = sum(sent.values())
    assert not failures, f"{len(failures)} of {total} requests failed:\n" + "\n".join(failures[:10])
    assert total >= MIN_REQUESTS, sent
    per_operation = collections.Counter(label for label, _ in sent.elements())
    assert set(per_operation) == labels, sent
    # the fuzzing reached the generation and artifact code, not only the validation errors
    # (how many generated cases are valid enough to generate varies with hypothesis' internal state: bounds are loose)
    assert all(sent[label, 200] >= 1 and sent[label, 400] >= 10 for label in GENERATE), sent
    assert sum(sent[label, 200] for label in GENERATE) >= 20, sent
    assert sent["POST /v1/unlearning/load", 200] >= 1, sent
    # the server's own count agrees: no 5xx was answered to anyone
    metrics = session.get(f"{url}/metrics").text
    assert not [line for line in metrics.splitlines() if line.startswith("unlearn:http_requests_total") and
                'status="5' in line]
    # and it still serves normally
    ok = session.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": "The capital", "max_tokens": 3, "ignore_eos": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 3
    assert session.get(f"{url}/ready").status_code == 200
