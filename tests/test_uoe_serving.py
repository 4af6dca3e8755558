"""UOE through the engine and the real HTTP server: a tiny MoE memorises facts, `train-uoe` unlearns the
forget facts in one expert, and the patch is served per request next to unpatched requests in shared batches.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from conftest import run_server
from transformers import AutoModelForCausalLM
from unlearn_serve.server.app import build_app
from unlearn_serve.server.config import ServerConfig
from unlearn_serve.server.engine.engine import Engine, EngineConfig, EngineInputError
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Selection
from unlearn_serve.training.data import encode_prompt
from unlearn_serve.training.uoe_tiny_facts import FORGET_QA, RETAIN_QA, build_facts_model, recall, write_jsonl

from unlearn_serve.artifact import ArtifactError
from unlearn_serve.cli import main as cli_main
from unlearn_serve.cli import serve as cli_serve
from unlearn_serve.families import get_family
from unlearn_serve.tiny import build_tiny_model, save_tiny, write_random_expert_patch

QUESTIONS = [q for q, _ in FORGET_QA + RETAIN_QA]
ANSWERS = [a for _, a in FORGET_QA + RETAIN_QA]
FORGET_WORDS = ["green", "Oslo", "chess"]
BASE = "tiny-moe"


class RowRecorder:
    """A row hook that only records which patch ids each forward saw (to prove batches were mixed)."""

    def __init__(self) -> None:
        self.batches: list[set[int]] = []

    def set_rows(self, row_ids: torch.Tensor | None) -> None:
        if row_ids is not None:
            self.batches.append(set(row_ids.tolist()))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Base checkpoint that knows all six facts, a trained UOE patch (CLI), a random patch, and the export."""
    root = tmp_path_factory.mktemp("uoe-serving")
    model, tok = build_facts_model()  # what `python -m training.uoe_tiny_facts` writes
    assert recall(model, tok, FORGET_QA + RETAIN_QA) == ANSWERS, "the base model must know every fact"
    save_tiny(model, tok, root / "base")
    write_jsonl(root / "forget.jsonl", FORGET_QA)
    write_jsonl(root / "retain.jsonl", RETAIN_QA)
    common = ["--model", str(root / "base"), "--device", "cpu", "--no-progress"]
    # layer/expert come from attribution (no --layer/--expert); the stopping rule ends training
    assert cli_main([
        "train-uoe", *common, "--forget", str(root / "forget.jsonl"), "--retain", str(root / "retain.jsonl"),
        "--out", str(root / "uoe"), "--method", "gd", "--lr", "1e-2", "--batch-size", "3", "--max-steps", "80",
        "--eval-every", "2", "--forget-loss-target", "3", "--retain-loss-bound", "0.15",
    ]) == 0
    assert cli_main(["export", *common[:4], "--uoe", str(root / "uoe"), "--out", str(root / "merged")]) == 0
    manifest = json.loads((root / "uoe" / "unlearning.json").read_text())
    layer = manifest["details"]["layer"]
    # a second patch elsewhere (other layer), so several patches are loaded at once
    other_layer = [i for i in get_family(model).moe_layers(model) if i != layer][0]
    write_random_expert_patch(model, other_layer, 2, root / "other", seed=7)
    return SimpleNamespace(root=root, tok=tok, model=model, manifest=manifest)


def make_engine(world, *patches: str) -> Engine:
    """An engine built the way `unlearn-serve serve --uoe NAME=DIR ...` builds it."""
    parser = argparse.ArgumentParser()
    cli_serve.configure(parser)
    argv = ["--model", str(world.root / "base"), "--device", "cpu", "--dtype", "float32", "--max-num-seqs", "16"]
    for name in patches:
        argv += ["--uoe", f"{name}={world.root / name}"]
    return cli_serve.build_engine(parser.parse_args(argv))


def test_training_met_the_stopping_rule(world):
    losses = world.manifest["training"]["losses"]
    assert losses["goal_reached"] and losses["kept"]["retain_ce"] <= 0.15
    verdict = world.manifest["training"]["verdict"]  # the goal is the recall check on the validation facts
    assert verdict["forgot"] == verdict["forget_checked"] == 3 and verdict["retain_kept"] == verdict["retain_base"]
    assert world.manifest["method"] == "uoe" and world.manifest["details"]["family"] == "qwen2_moe"
    size = (world.root / "uoe" / "expert_patch.safetensors").stat().st_size
    total = sum(p.numel() for p in world.model.parameters()) * 4
    assert size < total / 10, "the patch is one expert + one router, a small part of the model"


def test_engine_mixed_batch_equals_each_alone_and_the_exported_checkpoint(world):
    engine = make_engine(world, "uoe", "other")
    prompts = [encode_prompt(world.tok, q) for q in QUESTIONS]
    choice = ["uoe", None, "other", "uoe", None, "other"]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=1, ignore_eos=True)
    mixed = engine.generate(prompts, params, choice)
    alone = [engine.generate([p], params, c)[0] for p, c in zip(prompts, choice, strict=True)]
    for m, a in zip(mixed, alone, strict=True):
        assert m.completions[0].token_ids == a.completions[0].token_ids
        for x, y in zip(m.completions[0].logprobs, a.completions[0].logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
    base_rows = engine.generate(prompts, params, None)
    assert mixed[1].completions[0].token_ids == base_rows[1].completions[0].token_ids
    assert mixed[0].completions[0].token_ids != base_rows[0].completions[0].token_ids, "patch had no effect"
    assert mixed[2].completions[0].logprobs[0].logprob != pytest.approx(base_rows[2].completions[0].logprobs[0].logprob)

    # Rows served with the patch score exactly like the exported (merged, reloaded) checkpoint.
    merged = AutoModelForCausalLM.from_pretrained(world.root / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(world.root / "base", dtype=torch.float32).eval()
    for row, reference in ((0, merged), (3, merged), (1, base), (4, base)):
        full = prompts[row] + mixed[row].completions[0].token_ids
        with torch.no_grad():
            logprobs = reference(torch.tensor([full])).logits[0].log_softmax(-1)
        for step, entry in enumerate(mixed[row].completions[0].logprobs):
            expected = logprobs[len(prompts[row]) - 1 + step]
            assert entry.token_id == int(expected.argmax())
            assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-4)

    with pytest.raises(EngineInputError, match="no `unlearning` options"):
        engine.generate([prompts[0]], params, [Selection("uoe", {"alpha": 1.0})])


def chat(client: openai.OpenAI, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0
    )
    return reply.choices[0].message.content.strip()


def test_http_server_forgets_only_for_patched_requests_in_shared_batches(world):
    engine = make_engine(world, "uoe")
    recorder = RowRecorder()
    engine.runner.row_hooks.append(recorder)
    pid = engine.patches.lookup("uoe")
    app = build_app(ServerConfig(served_model_name=BASE, artifact_root=str(world.root)), engine=engine)
    with run_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        jobs = [(model, q) for q in QUESTIONS for model in ("uoe", BASE)] * 2
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: chat(client, *job), jobs))
        by_job: dict[tuple[str, str], set[str]] = {}
        for job, answer in zip(jobs, answers, strict=True):
            by_job.setdefault(job, set()).add(answer)
        for question, fact in zip(QUESTIONS, ANSWERS, strict=True):
            assert by_job[(BASE, question)] == {fact}, "unpatched requests are unchanged"
        for question, fact, word in zip(QUESTIONS, ANSWERS, FORGET_WORDS, strict=False):
            (patched,) = by_job[("uoe", question)]
            assert patched != fact and word not in patched, f"patched request still completes {fact!r}"
        for question, fact in zip(QUESTIONS[3:], ANSWERS[3:], strict=True):
            assert by_job[("uoe", question)] == {fact}, "retain facts still complete with the patch"
        assert any({pid, -1} <= rows for rows in recorder.batches), "no forward mixed patched and plain rows"

        models = {m.id: m for m in client.models.list().data}
        card = models["uoe"].model_extra["unlearning"]
        assert card["method"] == "uoe" and (card["layer"], card["expert"]) == (
            world.manifest["details"]["layer"], world.manifest["details"]["expert"])
        # a second patch loaded at run time, then unloaded
        response = httpx.post(f"{url}/v1/unlearning/load", json={"name": "other", "path": str(world.root / "other")})
        assert response.status_code == 200 and response.json()["method"] == "uoe"
        assert isinstance(chat(client, "other", QUESTIONS[3]), str)
        assert {"uoe", "other"} <= {m.id for m in client.models.list().data}
        response = httpx.post(f"{url}/v1/unlearning/unload", json={"name": "other"})
        assert response.status_code == 200
        with pytest.raises(openai.NotFoundError):
            chat(client, "other", QUESTIONS[0])
        bad = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "uoe", "messages": [{"role": "user", "content": "hi"}], "unlearning": {"alpha": 2.0}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "unlearning"


def test_serving_refuses_a_patch_for_another_base(world, tmp_path):
    other_tok = world.tok
    other = build_tiny_model("qwen2_moe", other_tok, num_layers=2, seed=3)
    save_tiny(other, other_tok, tmp_path / "other-base")
    parser = argparse.ArgumentParser()
    cli_serve.configure(parser)
    args = parser.parse_args(["--model", str(tmp_path / "other-base"), "--device", "cpu",
                              "--uoe", f"x={world.root / 'uoe'}"])
    with pytest.raises(ArtifactError, match="trained on base model"):
        cli_serve.build_engine(args)
    dense = build_tiny_model("llama", other_tok, num_layers=1)
    engine = Engine(dense, other_tok, EngineConfig(max_num_seqs=2, max_model_len=64), "dense")
    with pytest.raises(ArtifactError, match="not a supported mixture-of-experts"):
        engine.load_uoe("x", Path(world.root / "uoe"))
    assert engine.artifact_names() == []


def test_make_tiny_moe_facts_command(tmp_path, capsys):
    """The README's first UOE step: the CLI writes a model that completes all six facts, and the data."""
    from unlearn_serve.cli import main as cli_main

    assert cli_main(["make-tiny-moe-facts", "--out", str(tmp_path / "demo-moe")]) == 0
    assert "completes 6/6 facts" in capsys.readouterr().out
    assert (tmp_path / "demo-moe/model/config.json").is_file()
    lines = (tmp_path / "demo-moe/forget.jsonl").read_text().splitlines()
    assert [json.loads(line)["question"] for line in lines] == [q for q, _ in FORGET_QA]
