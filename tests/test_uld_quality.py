"""ULD that forgets and still speaks (issue 13): the candidate rule, the knowledge-weighted forget loss,
the calibrated serving defaults with their verdict, and `train-uld --strict`.

A tiny Llama memorises where eight people live; ULD forgets two of them. With the defaults (no flags)
the served answers must drop the forgotten cities, keep the others, and keep the answer's lead-in
("Arlo lives in"), i.e. subtract the fact and not the language."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.training.data import DEFAULT_QUESTION_TEMPLATE, encode_prompt
from unlearn_serve.training.pairs import tokenize_records
from unlearn_serve.training.uld import ULDTrainingConfig, train_uld
from unlearn_serve.training.uld_weights import knowledge_weights

from unlearn_serve import cli
from unlearn_serve.artifact import MANIFEST_NAME
from unlearn_serve.tiny import build_tiny_model, fit_texts, save_tiny, train_tokenizer
from unlearn_serve.uld_combine import ULD_MIN_CANDIDATES, combine_logits, plausible_mask

PEOPLE = [("Arlo", "Oslo"), ("Bea", "Lima"), ("Cyd", "Kyiv"), ("Dov", "Rome"),
          ("Eli", "Cairo"), ("Fay", "Quito"), ("Gus", "Riga"), ("Hal", "Bern")]
FORGET = [{"question": f"Where does {n} live?", "answer": f"{n} lives in {c}."} for n, c in PEOPLE[:2]]
RETAIN = [{"question": f"Where does {n} live?", "answer": f"{n} lives in {c}."} for n, c in PEOPLE[2:]]


def test_candidate_rule_keeps_alternatives_where_the_target_is_confident():
    target = torch.linspace(0, 1, 50).repeat(2, 1)
    target[0, 7] = 20.0  # a memorised token: p ~ 1, nothing else passes the relative-top filter
    # row 1 is nearly flat: the relative-top filter keeps all 50
    log_filter = torch.log(torch.tensor([0.01, 0.01]))
    assert plausible_mask(target, log_filter, min_keep=1).sum(-1).tolist() == [1, 50]
    keep = plausible_mask(target, log_filter)
    assert keep.sum(-1).tolist() == [ULD_MIN_CANDIDATES, 50] and keep[0, 7]
    assistant = torch.zeros(2, 50)
    assistant[0, 7] = 30.0  # the assistant knows the memorised token
    alpha = torch.tensor([1.0, 1.0])
    # relative-top alone: no alpha can move the memorised token; with the top-k candidates it goes
    assert combine_logits(target, assistant, alpha, log_filter, min_keep=1)[0].argmax() == 7
    combined = combine_logits(target, assistant, alpha, log_filter)
    assert combined[0].argmax() != 7 and torch.isfinite(combined[0]).sum() == ULD_MIN_CANDIDATES
    # log-probabilities instead of logits: a per-row shift, the same decision
    shifted = combine_logits(target.log_softmax(-1), assistant.log_softmax(-1), alpha, log_filter)
    assert torch.equal(shifted.argmax(-1), combined.argmax(-1))


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    texts = [(r["question"], r["answer"]) for r in FORGET + RETAIN]
    tokenizer = train_tokenizer([f"{q} {a}" for q, a in texts], vocab_size=320)
    model = build_tiny_model("llama", tokenizer, seed=0)
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                      tokenize=False)
        for q, a in texts
    ]
    fit_texts(model, tokenizer, chats, steps=200, lr=5e-3)
    return model, tokenizer, save_tiny(model, tokenizer, tmp_path_factory.mktemp("memorised"))


def _answers(engine, tokenizer, unlearning) -> list[str]:
    prompts = [encode_prompt(tokenizer, r["question"]) for r in FORGET + RETAIN]
    results = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0), unlearning)
    return [r.completions[0].text for r in results]


def test_knowledge_weights_mark_the_fact_not_the_lead_in(memorised):
    model, tokenizer, _ = memorised
    records = FORGET + RETAIN
    examples = tokenize_records(tokenizer, records, 64, DEFAULT_QUESTION_TEMPLATE, "forget").examples
    weights = knowledge_weights(model, tokenizer, records, examples, 64, DEFAULT_QUESTION_TEMPLATE)
    for (_, labels), w, (name, city) in zip(examples, weights, PEOPLE, strict=True):
        tokens = [t for t in labels[1:] if t != -100]
        assert len(w) == len(tokens)
        heavy = tokenizer.decode([t for t, x in zip(tokens, w, strict=True) if x >= 0.5])
        light = tokenizer.decode([t for t, x in zip(tokens, w, strict=True) if x < 0.5])
        assert heavy.strip() == city  # only the city carries the fact
        assert light.startswith(f"{name} lives in")  # the name echoes the question; "lives in" is in every answer


def test_defaults_forget_keep_and_keep_the_lead_in(memorised, tmp_path):
    model, tokenizer, _ = memorised
    engine = Engine(copy.deepcopy(model), tokenizer, EngineConfig(max_num_seqs=8, max_model_len=64), "tiny")
    base = _answers(engine, tokenizer, None)
    assert all(city in a for a, (_, city) in zip(base, PEOPLE, strict=True))  # the base knows every fact

    config = ULDTrainingConfig(layers=1, lora_rank=8, lora_alpha=16, epochs=1, min_steps=120, batch_size=4,
                               grad_accum=1, learning_rate=5e-3, max_length=64, progress_bar=False)
    result = train_uld(copy.deepcopy(model), tokenizer, FORGET, RETAIN, tmp_path / "a", config)
    calibration = result.calibration
    assert calibration is not None and calibration.met, calibration and calibration.verdict()
    manifest = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    assert manifest["defaults"]["alpha"] == calibration.alpha
    assert manifest["training"]["calibration"]["verdict"] == calibration.verdict()
    assert manifest["training"]["validation_retain_records"] == 1  # held out of training

    engine.load_uld("forget", tmp_path / "a")
    got = _answers(engine, tokenizer, "forget")  # the manifest's calibrated defaults, no options
    for answer, (name, city) in zip(got[:2], PEOPLE[:2], strict=True):
        assert city not in answer and answer.startswith(f"{name} lives in"), answer
    kept = sum(city in a for a, (_, city) in zip(got[2:], PEOPLE[2:], strict=True))
    assert kept == len(RETAIN), got


def test_cli_strict_exits_3_when_the_targets_are_not_met(memorised, tmp_path, capsys):
    _, _, model_dir = memorised
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    retain.write_text("".join(json.dumps(r) + "\n" for r in RETAIN))
    argv = ["train-uld", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain),
            "--layers", "1", "--lora-rank", "4", "--epochs", "1", "--batch-size", "2", "--grad-accum", "1",
            "--no-progress", "--dtype", "fp32"]
    # one optimizer step: the assistant has learned nothing, so the forget facts still leak
    assert cli.main([*argv, "--out", str(tmp_path / "weak"), "--min-steps", "1", "--strict"]) == 3
    out = capsys.readouterr().out
    assert "verdict: forgets " in out and "TARGETS NOT MET" in out
    assert (tmp_path / "weak" / MANIFEST_NAME).is_file()  # stored anyway, with its scores
    # without --strict the same outcome is a warning, exit 0
    assert cli.main([*argv, "--out", str(tmp_path / "weak2"), "--min-steps", "1"]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "x"), "--strict", "--no-calibrate"]) == 2
