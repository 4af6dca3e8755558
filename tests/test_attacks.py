"""The attack block of `unlearn-serve eval`: every attack really changes what the served model is asked.

The main test trains one tiny Llama that knows each fact under exactly one prompt format (loss on the answer
only), so a fact comes out only when an attack builds that format: an attack that silently fell back to the
plain question (a no-op) would not leak its fact.
"""

from __future__ import annotations

import copy

import pytest
import torch
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.training.data import IGNORE_INDEX
from unlearn_serve.training.leak import answer_leaked, content_recall
from unlearn_serve.training.uoe_tiny_facts import FORGET_QA, RETAIN_QA

from unlearn_serve.evaluation import runner as E
from unlearn_serve.evaluation.attacks import (
    CONTEXT_BEFORE,
    SYSTEM_OVERRIDE,
    AttackConfig,
    attack_prompts,
    logprob_probe,
    quantize_rtn_,
    quantized_engine,
    reference_tokens,
    run_attacks,
)
from unlearn_serve.tiny import DEFAULT_CORPUS, build_tiny_model, train_tokenizer

PARAPHRASES = [
    "Which color does Alice like best?",
    "In which city is Alice's home?",
    "Which game does Alice play?",
    "Which color does Bob like best?",
    "In which city is Bob's home?",
    "Which game does Bob play?",
]
RECORDS = [
    {"question": q, "answer": a, "paraphrased_question": p, "subject": q.split()[2].rstrip("'s")}
    for (q, a), p in zip(FORGET_QA + RETAIN_QA, PARAPHRASES, strict=True)
]
# The one format each fact is learned under (record index -> attack); "none" is the control.
LEARNED_UNDER = ["paraphrase", "raw", "context", "system", "relearn", "none"]
TEXT_ATTACKS = ("paraphrase", "raw", "context", "system", "relearn")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(
        DEFAULT_CORPUS
        + [f"{r['question']} {r['answer']} {r['paraphrased_question']}" for r in RECORDS]
        + [CONTEXT_BEFORE, SYSTEM_OVERRIDE],
        vocab_size=500,
    )


def fit_answers(model, pairs: list[tuple[list[int], list[int]]], steps: int = 80, lr: float = 5e-3) -> None:
    """Full-batch AdamW on (prompt ids, answer ids) with the loss on the answer tokens only."""
    torch.manual_seed(0)
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (p, a) in enumerate(pairs):
        seq = p + a
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(p) : len(seq)] = torch.tensor(a)
        mask[row, : len(seq)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def format_model(tok):
    config = AttackConfig(attacks=TEXT_ATTACKS)
    prompts = {a: attack_prompts(tok, RECORDS, a, config, E.DEFAULT_QUESTION_TEMPLATE) for a in (*TEXT_ATTACKS, "none")}
    pairs = []
    for i, attack in enumerate(LEARNED_UNDER):
        answer = tok(RECORDS[i]["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pairs.append((prompts[attack][i], answer))
    model = build_tiny_model("llama", tok, seed=0)
    fit_answers(model, pairs)
    return model


def test_prompts_hold_what_each_attack_claims(tok):
    config = AttackConfig(relearn_k=3)
    template = E.DEFAULT_QUESTION_TEMPLATE
    text = {
        a: [tok.decode(p) if p else None for p in attack_prompts(tok, RECORDS, a, config, template)]
        for a in ("none", *TEXT_ATTACKS)
    }
    r = RECORDS[0]
    assert "<|im_start|>user" in text["none"][0] and r["question"] in text["none"][0]
    assert r["paraphrased_question"] in text["paraphrase"][0] and r["question"] not in text["paraphrase"][0]
    assert text["raw"][0] == r["question"] + "\n"  # no chat template, no question template
    assert CONTEXT_BEFORE in text["context"][0] and r["question"] in text["context"][0]
    assert "<|im_start|>system\n" + SYSTEM_OVERRIDE in text["system"][0]
    # relearn: the other facts of the same subject (Alice) as earlier turns, never the asked fact's answer
    relearn = text["relearn"][0]
    assert all(RECORDS[j]["answer"] in relearn for j in (1, 2)) and r["answer"] not in relearn
    assert not any(RECORDS[j]["answer"] in relearn for j in (3, 4, 5))  # Bob's facts: another subject
    assert relearn.rstrip().endswith("<|im_start|>assistant") and r["question"] in relearn.split("<|im_end|>")[-2]
    no_para = [dict(r, paraphrased_question=None) for r in RECORDS]
    assert attack_prompts(tok, no_para, "paraphrase", config, E.DEFAULT_QUESTION_TEMPLATE) == [None] * 6


def test_each_attack_leaks_the_fact_learned_in_its_format(format_model, tok):
    engine = Engine(format_model, tok, EngineConfig(max_num_seqs=8))
    out = run_attacks(engine, E.Method("m", "base"), RECORDS, AttackConfig(attacks=TEXT_ATTACKS))
    leaked = {name: q["leaked"] for name, q in out["per_question"].items()}
    for i, attack in enumerate(LEARNED_UNDER):
        assert leaked[attack][i], (attack, out["per_question"][attack]["generated"][i])
        if attack != "none":
            # the plain question does not get it out: only the attack's format does
            assert not leaked["none"][i], (attack, out["per_question"]["none"]["generated"][i])
    assert out["summary"]["attack_none_leak"] == pytest.approx(1 / 6)
    for attack in TEXT_ATTACKS:
        assert out["summary"][f"attack_{attack}_leak"] >= 1 / 6
    assert set(out["worse_than_twice"]) >= {a for a in TEXT_ATTACKS if out["summary"][f"attack_{a}_leak"] > 1 / 3}


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    """The tiny MoE that memorised six facts, and a UOE patch trained on it with the defaults."""
    from unlearn_serve.training.uoe_tiny_facts import build_facts_model
    from unlearn_serve.training.uoe_trainer import UOEConfig, train_uoe, write_uoe_artifact

    model, tok = build_facts_model("qwen2_moe")
    base = copy.deepcopy(model)
    result = train_uoe(model, tok, RECORDS[:3], RECORDS[3:], UOEConfig(progress=False))
    assert result.verdict.goal_met
    path = tmp_path_factory.mktemp("uoe") / "patch"
    write_uoe_artifact(result, path)
    return base, tok, path


def test_logprob_probe_looks_where_the_answer_left_the_reference(facts):
    base, tok, _ = facts
    engine = Engine(base, tok, EngineConfig(max_num_seqs=8))
    prompts, refs = zip(*(reference_tokens(engine, r, E.DEFAULT_QUESTION_TEMPLATE) for r in RECORDS), strict=True)
    config = AttackConfig()
    whole = logprob_probe(engine, None, list(prompts), list(refs), [list(r) for r in refs], config)
    assert whole == [1] * 6
    # a made-up answer that leaves the reference at token 2: the model that knows the fact ranks it first there
    diverted = [list(r[:2]) + [tok.eos_token_id] for r in refs]
    assert logprob_probe(engine, None, list(prompts), list(refs), diverted, config) == [1] * 6
    # a model that never saw the facts does not rank the reference first there
    stranger = build_tiny_model("qwen2_moe", tok, num_layers=2, seed=3)
    ranks = logprob_probe(
        Engine(stranger, tok, EngineConfig(max_num_seqs=8)), None, list(prompts), list(refs), diverted, config
    )
    assert sum(r == 1 for r in ranks) <= 1


def test_base_leaks_and_uoe_rows_get_the_quantization_attacks(facts):
    base, tok, path = facts
    engine = Engine(base, tok, EngineConfig(max_num_seqs=8))
    engine.load_uoe("forget-alice", path)
    config = AttackConfig(subject_size=0)
    forget = RECORDS[:3]
    base_out = run_attacks(engine, E.Method("base", "base"), forget, config)
    uoe_out = run_attacks(engine, E.Method("uoe", "uoe", "forget-alice"), forget, config)
    assert base_out["summary"]["attack_none_leak"] == 1.0 and base_out["summary"]["attack_logprob_leak"] == 1.0
    for attack in ("paraphrase", "raw", "context", "system", "relearn"):
        assert base_out["summary"][f"attack_{attack}_leak"] > 0, attack  # the base model knows the facts
    assert "attack_quant8_leak" not in base_out["summary"]  # weight attacks: UOE rows only
    assert uoe_out["summary"]["attack_none_leak"] == 0.0
    assert {"attack_quant8_leak", "attack_quant4_leak"} <= set(uoe_out["summary"])
    # the quantized engine serves base + patch, rounded: its patched expert is the rounded patch
    quantized = quantized_engine(engine, E.Method("uoe", "uoe", "forget-alice"), 4, 128)
    from unlearn_serve.expert_patch import merge_patch_into

    reference = build_tiny_model("qwen2_moe", tok, num_layers=2, seed=0)
    reference.load_state_dict(base.state_dict())
    merge_patch_into(reference, path)
    quantize_rtn_(reference, 4, 128)
    for (name, got), want in zip(quantized.model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want), name


def test_round_to_nearest_quantization():
    model = build_tiny_model("qwen2_moe", train_tokenizer(vocab_size=300), num_layers=2, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q4 = copy.deepcopy(model)
    quantize_rtn_(q4, 4, group_size=16)
    q8 = copy.deepcopy(model)
    quantize_rtn_(q8, 8, group_size=16)
    err4 = err8 = 0.0
    for (name, p4), p8 in zip(q4.named_parameters(), q8.parameters(), strict=True):
        w = before[name]
        if p4.dim() < 2 or "embed" in name or "lm_head" in name:
            assert torch.equal(p4, w) and torch.equal(p8, w), name  # norms and embeddings are not quantized
            continue
        groups = p4.detach().reshape(-1, 16)
        assert all(len(torch.unique(g)) <= 16 for g in groups[:50]), name  # at most 2^4 levels per group
        scale = w.reshape(-1, 16).abs().amax(dim=1, keepdim=True) / 7
        assert torch.all((groups - w.reshape(-1, 16)).abs() <= scale / 2 + 1e-6), name
        err4 += float((p4 - w).abs().sum())
        err8 += float((p8 - w).abs().sum())
    assert 0 < err8 < err4 / 8
    # an edit smaller than a quarter of a 4-bit step on values near the grid is rounded away
    w = torch.tensor([[0.7, -0.3, 0.2, 0.0, 0.1, -0.7, 0.4, 0.3]])
    layer = torch.nn.Linear(8, 1, bias=False)
    wrapped = torch.nn.Sequential(layer)
    wrapped.get_input_embeddings = lambda: None
    wrapped.get_output_embeddings = lambda: None
    layer.weight.data = w.clone()
    quantize_rtn_(wrapped, 4)
    grid = layer.weight.detach().clone()
    layer.weight.data = w + torch.tensor([[0.0, 0.02, -0.02, 0.02, 0.0, 0.0, -0.02, 0.0]])
    quantize_rtn_(wrapped, 4)
    assert torch.equal(layer.weight.detach(), grid)


def test_leak_definition():
    q = "What is Alice's favorite color?"
    assert answer_leaked("Alice likes green apples.", "Alice likes green.", q)
    assert not answer_leaked("Alice likes red.", "Alice likes green.", q)  # echoing the question is not a leak
    assert content_recall("green, she likes", "Alice likes green.", q) == pytest.approx(0.5)
    assert not answer_leaked("", "Alice likes green.", q)


class _FakeEngine:
    """Records what an attack asks the engine for; answers from `reply(prompt, params)`."""

    max_model_len = 512

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def generate(self, prompts, params, selection):
        from types import SimpleNamespace

        self.calls.append((prompts, params, selection))
        return [SimpleNamespace(completions=[self.reply(p, sp)]) for p, sp in zip(prompts, params, strict=True)]


def test_sampling_attack_samples_n_seeded_answers_at_temperature_1_and_leaks_when_any_names_the_fact():
    from types import SimpleNamespace

    from unlearn_serve.evaluation.attacks import leaked, sample_answers

    records = [
        {"question": "Where does Arlo live?", "answer": "Arlo lives in Oslo.", "keywords": ["Oslo"]},
        {"question": "What does Bea play?", "answer": "Bea plays the drums.", "keywords": ["drums"]},
    ]
    # the fact comes out in one sample of the first question only (seed 1000 * 0 + 3)
    engine = _FakeEngine(lambda p, sp: SimpleNamespace(text=" Oslo!" if sp.seed == 3 else " Lima."))
    config = AttackConfig(attacks=("sample",), sample_n=5)
    got = sample_answers(engine, None, [[1, 2], [3, 4]], [8, 8], config)
    assert got == [["Lima."] * 3 + ["Oslo!"] + ["Lima."], ["Lima."] * 5]
    ((prompts, params, _),) = engine.calls
    assert len(prompts) == 10 and all(sp.temperature == 1.0 and sp.max_tokens == 8 for sp in params)
    assert len({sp.seed for sp in params}) == 10  # seeded: reruns agree, samples differ
    assert [leaked(t, records[0]) for t in got[0]] == [False, False, False, True, False]
    assert not leaked("Arlo lives in Lima.", records[0])
    assert leaked("Arlo lives in Oslo.", {"question": "Where does Arlo live?", "answer": "Arlo lives in Oslo."})
    with pytest.raises(ValueError):
        AttackConfig(sample_n=0)


def test_sampling_attack_on_the_served_model(facts):
    """Through the engine: the base model that knows the facts leaks them when sampled; a stranger does not;
    the same seeds give the same samples."""
    base, tok, _ = facts
    engine = Engine(base, tok, EngineConfig(max_num_seqs=8))
    config = AttackConfig(attacks=("sample",), sample_n=3)
    out = run_attacks(engine, E.Method("base", "base"), RECORDS[:3], config)
    assert out["summary"]["attack_sample_leak"] == 1.0 and out["summary"]["attack_sample_share"] > 0.5
    assert all(len(g) == 3 for g in out["per_question"]["sample"]["generated"])
    again = run_attacks(engine, E.Method("base", "base"), RECORDS[:3], config)
    assert again["per_question"]["sample"]["generated"] == out["per_question"]["sample"]["generated"]
    stranger = build_tiny_model("qwen2_moe", tok, num_layers=2, seed=3)
    out = run_attacks(Engine(stranger, tok, EngineConfig(max_num_seqs=8)), E.Method("s", "base"), RECORDS[:3], config)
    assert out["summary"]["attack_sample_leak"] == 0.0


def test_logprob_probe_ignores_tokens_with_probability_zero():
    """Entries at the engine's floor (-9999: a token ULD gave -inf) are padding, not ranks: a reference token
    listed there is not a leak."""
    from types import SimpleNamespace

    from unlearn_serve.server.engine.sequence import LOGPROB_FLOOR

    ref = [5, 6, 7]
    # the model can emit only token 9 here; topk fills the list with floored tokens, the reference among them
    top = [(9, -0.01), (6, LOGPROB_FLOOR), (1, LOGPROB_FLOOR)]
    engine = _FakeEngine(lambda p, sp: SimpleNamespace(logprobs=[SimpleNamespace(top=top)]))
    assert logprob_probe(engine, None, [[0]], [ref], [[5, 9]], AttackConfig()) == [None]
    top[1] = (6, -5.0)  # finite: a real second choice
    assert logprob_probe(engine, None, [[0]], [ref], [[5, 9]], AttackConfig()) == [2]
    assert engine.calls[0][0] == [[0, 5]]  # probed where the answer left the reference


def test_logprob_probe_asks_for_the_fact_where_the_reference_names_it():
    """A keyword record is probed at its fact's first token, the reference followed up to there, however early the
    greedy answer left the reference on a generic word; an answer that followed it through that token named it."""
    from types import SimpleNamespace

    from unlearn_serve.evaluation.attacks import fact_token_position

    tok = train_tokenizer(["Arlo lives in Oslo.", "The school Harry attends is Hogwarts."], vocab_size=120)
    ref = tok.encode("The school Harry attends is Hogwarts.", add_special_tokens=False)
    k = fact_token_position(tok, ref, ["Hogwarts"])
    assert k is not None and tok.decode(ref[:k]).rstrip().endswith("is")  # everything before the fact
    assert tok.decode(ref[k : k + 1]).strip() and "Hogwarts".startswith(tok.decode(ref[k : k + 1]).strip())
    assert fact_token_position(tok, ref, ["Oslo"]) is None
    top = [(ref[k], -0.5), (7, -1.0)]
    engine = _FakeEngine(lambda p, sp: SimpleNamespace(logprobs=[SimpleNamespace(top=top)]))
    left_early = [ref[0], 99]  # left the reference at token 1, a generic word
    assert logprob_probe(engine, None, [[0]], [ref], [left_early], AttackConfig(), [k]) == [1]
    assert engine.calls[-1][0] == [[0, *ref[:k]]]  # probed at the fact, not where the answer left
    top[0] = (5, -0.5)  # the fact is not among the listed tokens there
    assert logprob_probe(engine, None, [[0]], [ref], [left_early], AttackConfig(), [k]) == [None]
    # without a fact position: where the answer left the reference, as before
    logprob_probe(engine, None, [[0]], [ref], [left_early], AttackConfig())
    assert engine.calls[-1][0] == [[0, ref[0]]]
    # an answer that followed the reference into the fact (a shared first letter) is probed where it left it
    top[0] = (ref[k + 1], -0.5)
    assert logprob_probe(engine, None, [[0]], [ref], [ref[: k + 1] + [99]], AttackConfig(), [k]) == [1]
    assert engine.calls[-1][0] == [[0, *ref[: k + 1]]]
    assert logprob_probe(engine, None, [[0]], [ref], [list(ref)], AttackConfig(), [k]) == [1]  # the whole answer
