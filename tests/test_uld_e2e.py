"""End to end: a tiny model that memorised a few facts, the real `train-uld` on two of them, and a real
uvicorn server answering the openai client for the base model and the unlearned one in one batch.
Also hot load/unload over HTTP, 404 for an unknown artifact, and fingerprint mismatches."""

from __future__ import annotations

import argparse
import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import run_server
from peft import get_peft_model
from unlearn_serve.server.app import build_app
from unlearn_serve.server.config import ServerConfig

from unlearn_serve.artifact import fingerprint_model
from unlearn_serve.assistant import assistant_lora_config
from unlearn_serve.cli import main as cli_main
from unlearn_serve.cli.serve import build_engine
from unlearn_serve.cli.serve import configure as configure_serve
from unlearn_serve.tiny import build_tiny_model, fit_texts, save_tiny
from unlearn_serve.uld_artifact import save_uld_artifact

# A tiny model that knows two endings for the first two prompts (like a real model that knows
# several plausible answers) and one for the others. The forget set holds the base model's own
# greedy ending of the first two; unlearned, it should give the other ending.
BOTH = {"Alice likes": (" green apples", " red apples"), "Bob plays the": (" violin", " drums")}
RETAIN = {"The capital of France is": " Paris", "Water boils at one": " hundred degrees"}
KEY = "sk-test"
UNLEARN = None  # the artifact's defaults (alpha 0.75, filter 0.01)


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The two-answer model, saved; and its greedy ending of each BOTH prompt (what gets forgotten)."""
    model = build_tiny_model("llama", tokenizer, seed=1)
    texts = [p + e + "." for p, ends in BOTH.items() for e in ends] + [p + a + "." for p, a in RETAIN.items()]
    fit_texts(model, tokenizer, texts, steps=120)
    forget = {}
    for prompt, ends in BOTH.items():
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1] :])
        forget[prompt] = next(e for e in ends if text.startswith(e))
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("uld-e2e-base")), forget


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory) -> Path:
    """The real `unlearn-serve train-uld` (CLI entry point) on the forget facts."""
    root = tmp_path_factory.mktemp("uld-e2e")
    forget, retain = root / "forget.jsonl", root / "retain.jsonl"
    model_dir, remembered = base_dir
    forget.write_text("".join(json.dumps({"text": p + a + "."}) + "\n" for p, a in remembered.items()))
    retain.write_text("".join(json.dumps({"text": p + a + "."}) + "\n" for p, a in RETAIN.items()))
    out = root / "artifacts" / "forget-alice-bob"
    rc = cli_main([
        "train-uld", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain),
        "--out", str(out), "--layers", "1", "--epochs", "1", "--min-steps", "80", "--batch-size", "2",
        "--grad-accum", "1", "--lr", "3e-3", "--lora-rank", "8", "--lora-alpha", "16", "--no-augment",
        "--no-progress", "--dtype", "fp32",
    ])
    assert rc == 0
    # the model's first layer already predicts the forget text (it memorised it): `auto` trains against uniform and
    # serves ungated, since the early-exit gate would see nothing to remove (docs/uld.md 2g)
    manifest = json.loads((out / "unlearning.json").read_text())
    assert manifest["training"]["flat_reference"] == "uniform" and manifest["training"]["early_exit_forget_ce"] <= 1.0
    assert manifest["defaults"]["gate"] is None
    return out


@pytest.fixture(scope="module")
def foreign_artifact(tokenizer, trained) -> Path:
    """A valid ULD artifact made for a different base model (same architecture, other weights)."""
    other = build_tiny_model("llama", tokenizer, seed=123)
    fingerprint = fingerprint_model(other)
    peft_model = get_peft_model(copy.deepcopy(other), assistant_lora_config(other, 1, rank=4, alpha=8))
    out = trained.parent / "foreign"  # inside the server's artifact root: refused for its fingerprint only
    return save_uld_artifact(peft_model, out, fingerprint, {"assistant_layers": 1}, {})


def serve_args(model_dir: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_serve(parser)
    return parser.parse_args(["--model", str(model_dir), "--served-model-name", "tiny", "--max-num-seqs", "8", *extra])


@pytest.fixture(scope="module")
def server(base_dir, trained):
    engine = build_engine(serve_args(base_dir[0], "--uld", f"tiny-forget={trained}"))
    config = ServerConfig(served_model_name="tiny", api_keys=[KEY], artifact_root=str(trained.parent.parent))
    with run_server(build_app(config, engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def complete(client: openai.OpenAI, model: str, prompt: str, extra: dict | None = None) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
    return out.choices[0].text


def test_unlearned_model_forgets_and_base_remembers_in_one_batch(client, base_dir):
    remembered = base_dir[1]
    prompts = [*BOTH, *RETAIN]
    jobs = [("tiny", p, None) for p in prompts] + [("tiny-forget", p, UNLEARN) for p in prompts]
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: the engine batches them together
        answers = list(pool.map(lambda job: complete(client, *job), jobs))
    base = dict(zip(prompts, answers[: len(prompts)], strict=True))
    unlearned = dict(zip(prompts, answers[len(prompts) :], strict=True))
    for prompt, ending in remembered.items():
        assert base[prompt].startswith(ending), (prompt, base[prompt])
        assert not unlearned[prompt].startswith(ending[:4]), (prompt, unlearned[prompt])
        other = next(e for e in BOTH[prompt] if e != ending)
        assert unlearned[prompt].startswith(other), (prompt, unlearned[prompt])  # still fluent, other answer
    for prompt, ending in RETAIN.items():
        assert base[prompt].startswith(ending) and unlearned[prompt].startswith(ending), (prompt, unlearned[prompt])


def test_models_list_and_metrics_label(client, server):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "tiny-forget"}
    assert models["tiny-forget"].model_extra["parent"] == "tiny"
    complete(client, "tiny-forget", "Alice likes")
    metrics = httpx.get(f"{server}/metrics").text
    assert 'artifact="tiny-forget"' in metrics and 'artifact="none"' in metrics


def test_unknown_artifact_is_404(client):
    with pytest.raises(openai.NotFoundError):
        complete(client, "no-such-artifact", "Alice likes")


def test_hot_load_use_unload(client, server, base_dir, trained, foreign_artifact, tmp_path):
    headers = {"Authorization": f"Bearer {KEY}"}
    post = lambda route, body: httpx.post(f"{server}/v1/unlearning/{route}", json=body, headers=headers, timeout=60)  # noqa: E731
    r = post("load", {"name": "again", "path": str(trained)})
    assert r.status_code == 200, r.text
    assert "again" in {m.id for m in client.models.list().data}
    prompt, ending = next(iter(base_dir[1].items()))
    assert not complete(client, "again", prompt, UNLEARN).startswith(ending[:4])
    # in-flight requests finish before the unload completes
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client.completions.create, model="again", prompt="Bob plays the", max_tokens=200, temperature=0,
            extra_body={"ignore_eos": True},
        )
        deadline = time.monotonic() + 30
        while "unlearn:num_requests_running 1.0" not in httpx.get(f"{server}/metrics").text:
            assert not pending.done() and time.monotonic() < deadline
            time.sleep(0.01)
        r = post("unload", {"name": "again"})
        assert r.status_code == 200 and r.json()["status"] == "unloaded"
        assert pending.result().choices[0].finish_reason == "length"
    assert "again" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        complete(client, "again", "Alice likes")
    assert post("unload", {"name": "again"}).status_code == 404
    # bad loads: traversal, outside the root, a directory that is no artifact, another base model
    assert post("load", {"name": "x", "path": "../etc"}).status_code == 400
    assert post("load", {"name": "x", "path": str(tmp_path)}).status_code == 400
    (trained.parent / "empty").mkdir(exist_ok=True)
    assert post("load", {"name": "x", "path": str(trained.parent / "empty")}).status_code == 400
    r = post("load", {"name": "x", "path": str(foreign_artifact)})
    assert r.status_code == 400 and "trained on base model" in r.text
    assert "x" not in {m.id for m in client.models.list().data}


def test_fingerprint_mismatch_stops_start_up(base_dir, foreign_artifact, capsys):
    rc = cli_main(["serve", "--model", str(base_dir[0]), "--uld", f"foreign={foreign_artifact}", "--port", "9"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(foreign_artifact) in err and "trained on base model" in err and "Traceback" not in err
