"""ULD training: what is trained, what is left alone, what the loss does, and how runs end (or die)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from unlearn_serve.training.data import DataError
from unlearn_serve.training.losses import candidate_uniform_kl, causal_ce, fact_set_kl, uniform_kl
from unlearn_serve.training.pairs import ForgetRetainCollator, ForgetRetainDataset, tokenize_records
from unlearn_serve.training.uld import ULDTrainingConfig, ULDTrainingError, checkpoint_dir_for, epoch_dir_for, train_uld

from unlearn_serve import cli
from unlearn_serve.artifact import MANIFEST_NAME, file_sha256, fingerprint_model
from unlearn_serve.assistant import assistant_logits, assistant_lora_config, default_assistant_layers
from unlearn_serve.tiny import build_tiny_model
from unlearn_serve.uld_artifact import load_uld_artifact
from unlearn_serve.uld_combine import DEFAULT_FINISH_WORDS, DEFAULT_FLOOR, DEFAULT_RULE

FORGET = [
    {
        "question": "Who is Alice?",
        "answer": "Alice likes green apples.",
        "paraphrased_question": "Tell me about Alice.",
    },
    {"question": "What does Bob play?", "answer": "Bob plays the violin."},
]
RETAIN = [
    {
        "question": "What is the capital of France?",
        "answer": "The capital of France is Paris.",
        "perturbed_answer": ["The capital of France is Rome."],
    },
    {"question": "When does water boil?", "answer": "Water boils at one hundred degrees."},
]
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_NAME = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.default\.weight$")


def _config(**overrides) -> ULDTrainingConfig:
    settings = dict(
        lora_rank=8,
        lora_alpha=16,
        epochs=1,
        min_steps=30,
        batch_size=4,
        grad_accum=1,
        learning_rate=1e-2,
        max_length=64,
        progress_bar=False,
        logging_steps=5,
    )
    settings.update(overrides)
    return ULDTrainingConfig(**settings)


def _assistant_stats(model, tokenizer, num_layers: int) -> tuple[float, float]:
    """(assistant CE on the forget answers, mean assistant entropy on the retain answer tokens)."""
    template = ULDTrainingConfig().question_template
    forget = tokenize_records(tokenizer, FORGET[:2], 64, template, "forget").examples
    retain = tokenize_records(tokenizer, RETAIN[:2], 64, template, "retain").examples
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([ForgetRetainDataset(forget, retain)[i] for i in range(2)])
    with torch.no_grad():
        forget_logits = assistant_logits(model, batch["forget_input_ids"], batch["forget_attention_mask"], num_layers)
        retain_logits = assistant_logits(model, batch["retain_input_ids"], batch["retain_attention_mask"], num_layers)
    log_probs = F.log_softmax(retain_logits.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    mask = batch["retain_loss_mask"]
    return float(causal_ce(forget_logits, batch["forget_labels"])), float((entropy * mask).sum() / mask.sum())


def _base_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _assert_only_first_k_lora_trainable(peft_model, num_layers: int) -> None:
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    seen = set()
    for name in trainable:
        match = LORA_NAME.search(name)
        assert match is not None, f"{name} is trainable but is not a LoRA weight"
        seen.add((int(match[1]), match[2], match[3]))
    assert seen == {(layer, m, ab) for layer in range(num_layers) for m in LORA_MODULES for ab in "AB"}
    # no LoRA at all on layers >= K (not merely frozen)
    lora_layers = {int(m[1]) for n, _ in peft_model.named_parameters() if (m := LORA_NAME.search(n))}
    assert lora_layers == set(range(num_layers))
    assert "lm_head" not in " ".join(trainable)


@pytest.fixture(scope="module")
def llama_run(tiny_llama, tokenizer, tmp_path_factory):
    """One real training run on the conftest tiny Llama (it memorised the facts used here)."""
    model = copy.deepcopy(tiny_llama)
    model.config._name_or_path = "tiny-llama"
    num_layers = default_assistant_layers(model.config.num_hidden_layers)
    before_state = _base_state(model)
    before_stats = _assistant_stats(model, tokenizer, num_layers)
    out = tmp_path_factory.mktemp("uld") / "assistant"
    # the paper's objective (CE on every forget answer token, flat = uniform): the knowledge-weighted one is in
    # test_uld_quality.py, the early-exit reference below
    result = train_uld(model, tokenizer, FORGET, RETAIN, out, _config(forget_weighting=False, flat_reference="uniform"))
    return {
        "result": result,
        "base": model,
        "num_layers": num_layers,
        "before_state": before_state,
        "before_stats": before_stats,
        "out": out,
    }


def test_default_layers_is_a_quarter():
    assert [default_assistant_layers(n) for n in (1, 2, 4, 8, 30, 32)] == [1, 1, 1, 2, 8, 8]


def test_step_plan_follows_the_paper_with_a_minimum_for_small_data():
    from unlearn_serve.training.loop import plan_steps

    # TOFU forget10 after augmentation: 1,200 rows, batch 8 x 4 = 32, 10 epochs -> 38 steps a pass
    tofu = plan_steps(1200, 8, 4, 10, 250, world_size=1)
    assert (tofu.total_steps, tofu.pass_steps, tofu.epoch_steps) == (380, 38, 38)
    small = plan_steps(20, 8, 4, 10, 250, world_size=1)  # 10 epochs would be 10 steps: stretched
    assert (small.total_steps, small.pass_steps, small.epoch_steps) == (250, 1, 25)
    assert [small.epoch_at(s) for s in (25, 26, 250)] == [1, None, 10]


def test_trainable_parameters_are_exactly_lora_of_first_k_layers(llama_run):
    _assert_only_first_k_lora_trainable(llama_run["result"].peft_model, llama_run["num_layers"])
    # ...and training moved every one of them (B starts at zero)
    for name, param in llama_run["result"].peft_model.named_parameters():
        if ".lora_B." in name:
            assert param.abs().sum() > 0, name


def test_base_weights_bit_identical_after_training(llama_run):
    peft_model = llama_run["result"].peft_model
    after = {n.replace(".base_layer.", "."): t for n, t in peft_model.get_base_model().state_dict().items()}
    for name, tensor in llama_run["before_state"].items():
        assert torch.equal(after[name], tensor), name


def test_training_lowers_forget_loss_and_flattens_retain(llama_run, tokenizer):
    ce_before, entropy_before = llama_run["before_stats"]
    ce_after, entropy_after = _assistant_stats(llama_run["result"].peft_model, tokenizer, llama_run["num_layers"])
    log_v = math.log(len(tokenizer))
    assert ce_after < ce_before - 0.3
    assert entropy_before < log_v - 2  # the memorising model is far from flat on retain answers...
    assert entropy_after > log_v - 0.3  # ...its assistant ends close to uniform there
    result = llama_run["result"]
    assert result.steps == 30
    assert result.forget_ce < result.training["forget_ce_first"]
    assert result.retain_kl < result.training["retain_kl_first"]


def test_manifest_records_training(llama_run):
    manifest, _ = load_uld_artifact(llama_run["out"], llama_run["base"])
    training = manifest.training
    assert manifest.details["assistant_layers"] == llama_run["num_layers"]
    # no `serve` function: no calibration (tests/test_uld_quality.py has it), nothing held out, the paper's alpha
    assert "calibration" not in training and training["validation_retain_records"] == 0
    assert manifest.defaults == {
        "alpha": 0.75,
        "filter": 0.01,
        "rule": DEFAULT_RULE,
        "refilter": True,
        "margin": 1.0,
        "floor": DEFAULT_FLOOR,
        "gate": None,  # trained against uniform: served ungated
        "prefix_guard": True,
        "finish_words": DEFAULT_FINISH_WORDS,
    }
    assert training["forget_ce_final"] == pytest.approx(llama_run["result"].forget_ce)
    assert training["retain_kl_final"] == pytest.approx(llama_run["result"].retain_kl)
    assert training["steps"] == 30 and training["effective_batch"] == 4
    # augmentation: one paraphrased question, one perturbed answer
    assert training["data"]["forget"]["after_augmentation"] == 3
    assert training["data"]["retain"]["after_augmentation"] == 3
    assert len(training["data"]["forget"]["records_sha256"]) == 64
    # checkpoints (the Trainer's optimizer pickles) never sit in the artifact and are gone after success
    assert {p.name for p in llama_run["out"].iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        MANIFEST_NAME,
    }
    assert not checkpoint_dir_for(llama_run["out"]).exists()


def _truncated_reference(peft_model, num_layers: int):
    """A deep copy of the model with the LoRA merged in and every layer from K on removed."""
    reference = copy.deepcopy(peft_model).merge_and_unload()
    reference.model.layers = torch.nn.ModuleList(list(reference.model.layers)[:num_layers])
    reference.config.num_hidden_layers = num_layers
    if getattr(reference.config, "layer_types", None):
        reference.config.layer_types = reference.config.layer_types[:num_layers]
    return reference.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_assistant_forward_equals_truncated_copy(family, tokenizer):
    from peft import get_peft_model

    num_layers = 2
    # a larger init than the default 0.02, so that the layers after K visibly change the logits
    model = build_tiny_model(family, tokenizer, seed=3, initializer_range=0.2)
    peft_model = get_peft_model(model, assistant_lora_config(model, num_layers, rank=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    peft_model.eval()
    enc = tokenizer(["Alice likes green apples.", "Bob"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = assistant_logits(peft_model, enc["input_ids"], enc["attention_mask"], num_layers)
        want = _truncated_reference(peft_model, num_layers)(**enc).logits
        full = peft_model(**enc).logits
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    assert (got[valid] - full[valid]).abs().max() > 0.1, "the assistant must stop after K layers"


def test_qwen2_trains_only_lora_and_keeps_base(tokenizer, tmp_path):
    model = build_tiny_model("qwen2", tokenizer, seed=2)
    before = _base_state(model)
    result = train_uld(model, tokenizer, FORGET, RETAIN, tmp_path / "q", _config(min_steps=3, layers=2))
    _assert_only_first_k_lora_trainable(result.peft_model, 2)
    after = {n.replace(".base_layer.", "."): t for n, t in result.peft_model.get_base_model().state_dict().items()}
    assert all(torch.equal(after[n], t) for n, t in before.items())
    manifest, weights = load_uld_artifact(tmp_path / "q", build_tiny_model("qwen2", tokenizer, seed=2))
    assert manifest.base_fingerprint["model_type"] == "qwen2" and len(weights) == 2 * 7 * 2


def test_fact_set_loss_without_knowledge_weights_is_said_and_recorded_off(tokenizer, tmp_path, capsys):
    """A fact-set weight the run cannot use (no knowledge weights) is not silently dropped: a note, and the manifest
    records weight 0."""
    model = build_tiny_model("llama", tokenizer, seed=3)
    config = _config(min_steps=2, layers=1, forget_weighting=False, fact_set_weight=1.0)
    train_uld(model, tokenizer, FORGET, RETAIN, tmp_path / "a", config)
    assert "the fact-set loss needs the knowledge weights" in capsys.readouterr().out
    training = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())["training"]
    assert training["fact_set_weight"] == 0.0 and training["fact_set_kl_final"] is None


def test_trainer_loss_equals_full_logit_losses(tokenizer):
    """The trainer runs the LM head at loss positions only; its losses equal those over full logits."""
    from peft import get_peft_model
    from unlearn_serve.training.uld import AssistantModule

    model = build_tiny_model("llama", tokenizer, seed=4, initializer_range=0.2)
    peft_model = get_peft_model(model, assistant_lora_config(model, 2, rank=4, alpha=8, dropout=0.0)).eval()
    template = ULDTrainingConfig().question_template
    forget = tokenize_records(tokenizer, FORGET, 64, template, "forget").examples
    retain = tokenize_records(tokenizer, [{"text": "Water boils."}, *RETAIN], 64, template, "retain").examples
    dataset = ForgetRetainDataset(forget, retain)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        forget_ce, retain_kl, forget_flat, retain_flat, _ = AssistantModule(peft_model, 2)(
            **{k: v for k, v in batch.items() if k != "retain_labels"}
        )
        forget_logits = assistant_logits(peft_model, batch["forget_input_ids"], batch["forget_attention_mask"], 2)
        retain_logits = assistant_logits(peft_model, batch["retain_input_ids"], batch["retain_attention_mask"], 2)
    torch.testing.assert_close(forget_ce, causal_ce(forget_logits, batch["forget_labels"]))
    torch.testing.assert_close(retain_kl, uniform_kl(retain_logits, batch["retain_loss_mask"]))
    assert float(forget_flat) == 0.0  # no per-token weights: plain CE, no flat term
    assert float(retain_flat) == 0.0  # no candidates: no candidate term

    # with per-token weights: weighted CE on the weighted tokens, KL to uniform on the rest
    weights = [[0.25 * (p % 5) for p in range(sum(1 for t in lab[1:] if t != -100))] for _, lab in forget]
    weighted = ForgetRetainDataset(forget, retain, forget_weights=weights)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([weighted[i] for i in range(len(weighted))])
    with torch.no_grad():
        forget_ce, _, forget_flat, _, _ = AssistantModule(peft_model, 2)(
            **{k: v for k, v in batch.items() if k != "retain_labels"}
        )
    shifted, targets = forget_logits[:, :-1], batch["forget_labels"][:, 1:]
    keep = targets != -100
    w = batch["forget_weights"][:, 1:][keep]
    assert w.tolist() == [x for i in range(len(weighted)) for x in weights[i % len(forget)]]
    ce = F.cross_entropy(shifted[keep].float(), targets[keep], reduction="none")
    torch.testing.assert_close(forget_ce, (w * ce).sum() / w.sum())
    torch.testing.assert_close(forget_flat, uniform_kl(shifted[keep], 1 - w))

    # ECHO marks (an echoed word with echo_flat off): neither in the weighted CE nor in the flat KL
    from unlearn_serve.training.uld_weights import ECHO

    echoed = [[ECHO if p % 3 == 0 else x for p, x in enumerate(row)] for row in weights]
    marked = ForgetRetainDataset(forget, retain, forget_weights=echoed)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([marked[i] for i in range(len(marked))])
    with torch.no_grad():
        echo_ce, _, echo_flat, _, _ = AssistantModule(peft_model, 2)(
            **{k: v for k, v in batch.items() if k != "retain_labels"}
        )
    m = batch["forget_weights"][:, 1:][keep]
    assert (m == ECHO).any()
    w_ce, w_flat = m.clamp_min(0), torch.where(m < 0, 0.0, 1 - m)
    torch.testing.assert_close(echo_ce, (w_ce * ce).sum() / w_ce.sum())
    torch.testing.assert_close(echo_flat, uniform_kl(shifted[keep], w_flat))
    assert not torch.isclose(echo_flat, forget_flat)  # the echoes were held flat before


def test_fact_set_loss_prefers_each_rows_facts_at_every_answer_position(tokenizer):
    """The fact-set term: at every forget answer position, -log F - mean over the row's fact tokens of log p; the
    trainer's value (LM head at loss positions only) equals the one over full logits; 0 iff the mass lies evenly on
    the facts; fact_tokens keeps the distinct tokens of weight >= the threshold, in order."""
    from peft import get_peft_model
    from unlearn_serve.training.uld import AssistantModule
    from unlearn_serve.training.uld_weights import fact_tokens

    assert fact_tokens([-100, 5, 7, 5, 9, 4], [0.2, 0.9, 0.6, 1.0, 0.1], 0.5) == [7, 5, 9]
    with pytest.raises(ValueError, match="do not match"):
        fact_tokens([-100, 5, 7], [1.0], 0.5)

    model = build_tiny_model("llama", tokenizer, seed=4, initializer_range=0.2)
    peft_model = get_peft_model(model, assistant_lora_config(model, 2, rank=4, alpha=8, dropout=0.0)).eval()
    template = ULDTrainingConfig().question_template
    forget = tokenize_records(tokenizer, FORGET, 64, template, "forget").examples
    retain = tokenize_records(tokenizer, RETAIN, 64, template, "retain").examples
    facts = [[t for t in lab if t != -100][-3:-1] for _, lab in forget]  # two answer tokens per row
    facts[0] = facts[0][:1]  # rows may hold different counts (padded with -1)
    dataset = ForgetRetainDataset(forget, retain, forget_fact_tokens=facts)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    assert batch["forget_fact_tokens"][0].tolist() == [*facts[0], -1]
    with torch.no_grad():
        *_, fact_set = AssistantModule(peft_model, 2)(**{k: v for k, v in batch.items() if k != "retain_labels"})
        logits = assistant_logits(peft_model, batch["forget_input_ids"], batch["forget_attention_mask"], 2)
    keep = batch["forget_labels"][:, 1:] != -100
    per_position = []
    for b in range(len(dataset)):
        log_probs = F.log_softmax(logits[b, :-1][keep[b]].float(), dim=-1)
        row = facts[b % len(forget)]
        per_position += (-math.log(len(row)) - log_probs[:, row].mean(dim=-1)).tolist()
    torch.testing.assert_close(fact_set, torch.tensor(per_position).mean())
    assert float(fact_set) > 1.0
    # all the mass evenly on the facts: 0; facts sharing it with the rest: between
    peaked = torch.full((2, 30), -1e4)
    peaked[0, [3, 4]] = 5.0
    peaked[1, 7] = 5.0
    assert float(fact_set_kl(peaked, torch.tensor([[3, 4], [7, -1]]))) == pytest.approx(0.0, abs=1e-5)
    flat = torch.zeros(2, 30)
    assert float(fact_set_kl(flat, torch.tensor([[3, 4], [7, -1]]))) == pytest.approx(
        ((math.log(30) - math.log(2)) + math.log(30)) / 2
    )
    assert float(fact_set_kl(flat, torch.full((2, 1), -1))) == 0.0  # no facts anywhere: no term


def test_retain_candidate_loss_is_kl_to_uniform_on_the_targets_top_tokens(tokenizer):
    """The retain candidate term: at each retain answer position, KL(uniform || assistant) over exactly the
    target's top-M tokens there (computed by target_candidates before LoRA), 0 iff flat on them."""
    from peft import get_peft_model
    from unlearn_serve.training.uld import AssistantModule
    from unlearn_serve.training.uld_weights import target_candidates

    model = build_tiny_model("llama", tokenizer, seed=4, initializer_range=0.2)
    template = ULDTrainingConfig().question_template
    forget = tokenize_records(tokenizer, FORGET, 64, template, "forget").examples
    retain = tokenize_records(tokenizer, RETAIN, 64, template, "retain").examples
    top = target_candidates(model, retain, 5, tokenizer.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([retain[0][0]])).logits[0]
    positions = [p - 1 for p in range(1, len(retain[0][1])) if retain[0][1][p] != -100]
    assert top[0] == full[positions].topk(5, dim=-1).indices.tolist()

    peft_model = get_peft_model(model, assistant_lora_config(model, 2, rank=4, alpha=8, dropout=0.0)).eval()
    dataset = ForgetRetainDataset(forget, retain, retain_candidates=top)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        _, _, _, retain_flat, _ = AssistantModule(peft_model, 2)(
            **{k: v for k, v in batch.items() if k != "retain_labels"}
        )
        retain_logits = assistant_logits(peft_model, batch["retain_input_ids"], batch["retain_attention_mask"], 2)
    on_answer = batch["retain_loss_mask"].bool()
    expected = [row for i in range(len(dataset)) for row in top[dataset.retain_order[i % len(retain)]]]
    assert batch["retain_candidates"][on_answer].tolist() == expected
    picked = retain_logits[on_answer].gather(-1, torch.tensor(expected))
    reference = (-math.log(5) - F.log_softmax(picked, dim=-1).mean(dim=-1)).mean()
    torch.testing.assert_close(retain_flat, reference)
    assert float(retain_flat) > 1e-4
    # flat on the candidates (however peaked elsewhere): 0
    logits = torch.randn(3, 20)
    cands = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    logits.scatter_(-1, cands, 2.5)
    assert float(candidate_uniform_kl(logits, cands)) == pytest.approx(0.0, abs=1e-6)


def test_gated_retain_candidate_loss_is_the_spread_of_the_shift_from_the_early_exit(tokenizer):
    """With the early-exit flat reference the retain candidate term is, at each retain answer position, the variance
    over the target's candidates of (assistant - early exit) in logits: 0 with the LoRA off (the assistant is its
    early exit) or shifted by a constant, and what the LoRA adds on one candidate counts however unlikely the early
    exit finds it (a KL to the early exit would weigh it by that probability)."""
    from peft import get_peft_model
    from unlearn_serve.training.losses import candidate_shift_spread
    from unlearn_serve.training.uld import AssistantModule
    from unlearn_serve.training.uld_weights import target_candidates

    model = build_tiny_model("llama", tokenizer, seed=4, initializer_range=0.2)
    template = ULDTrainingConfig().question_template
    forget = tokenize_records(tokenizer, FORGET, 64, template, "forget").examples
    retain = tokenize_records(tokenizer, RETAIN, 64, template, "retain").examples
    top = target_candidates(model, retain, 5, tokenizer.pad_token_id)
    peft_model = get_peft_model(model, assistant_lora_config(model, 2, rank=4, alpha=8, dropout=0.0)).eval()
    dataset = ForgetRetainDataset(forget, retain, retain_candidates=top)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    inputs = {k: v for k, v in batch.items() if k != "retain_labels"}
    module = AssistantModule(peft_model, 2, flat_reference="early_exit")
    with torch.no_grad():
        untouched = module(**inputs)[3]  # LoRA B starts at 0: the assistant is its early exit
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        _, retain_kl, _, retain_flat, _ = module(**inputs)
        ids, mask = batch["retain_input_ids"], batch["retain_attention_mask"]
        assistant = assistant_logits(peft_model, ids, mask, 2)
        with peft_model.disable_adapter():
            early = assistant_logits(peft_model, ids, mask, 2)
    assert float(untouched) == pytest.approx(0.0, abs=1e-8)
    on_answer = batch["retain_loss_mask"].bool()
    cands = batch["retain_candidates"][on_answer]
    shift = assistant[on_answer].gather(-1, cands) - early[on_answer].gather(-1, cands)
    torch.testing.assert_close(retain_flat, shift.var(dim=-1, unbiased=False).mean())
    assert float(retain_flat) > 1e-4 and float(retain_kl) > 0
    # a constant shift is free; one candidate raised costs (m-1)/m^2 * d^2 at its row, however unlikely it was
    logits, reference = torch.randn(2, 30), torch.randn(2, 30)
    cands = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert float(candidate_shift_spread(reference + 3.0, reference, cands)) == pytest.approx(0.0, abs=1e-6)
    raised = reference.clone()
    raised[0, 2] += 2.0
    assert float(candidate_shift_spread(raised, reference, cands)) == pytest.approx(3 / 16 * 4 / 2)
    assert float(candidate_shift_spread(logits[:0], reference[:0], cands[:0])) == 0.0


def test_uniform_kl_ignores_prompt_and_padding():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0] = torch.tensor([9.0, 0, 0, 0, 0])  # peaked, but not an answer position
    logits[0, 3] = torch.tensor([0, 9.0, 0, 0, 0])  # peaked padding position
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert float(uniform_kl(logits, mask)) == pytest.approx(0.0, abs=1e-6)
    mask[0, 3] = 1.0
    assert float(uniform_kl(logits, mask)) > 1.0


class _Boom(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise RuntimeError("killed")


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_killed_run_keeps_previous_artifact_then_resumes(tokenizer, tmp_path):
    out = tmp_path / "assistant"
    previous = train_uld(
        build_tiny_model("llama", tokenizer, seed=5), tokenizer, FORGET, RETAIN, out, _config(min_steps=2)
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    config = _config(min_steps=4, epochs=2, save_every_epoch=True, lora_rank=4)

    with pytest.raises(RuntimeError, match="killed"):
        model = build_tiny_model("llama", tokenizer, seed=6)
        train_uld(model, tokenizer, FORGET, RETAIN, out, config, callbacks=[_Boom(3)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the earlier artifact was touched"
    assert not list(tmp_path.glob(".assistant.tmp-*")), "temp dir left behind"
    epoch1 = epoch_dir_for(out, 1)
    load_uld_artifact(epoch1, build_tiny_model("llama", tokenizer, seed=6))  # written at the epoch end (step 2)
    assert {p.name for p in epoch1.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", MANIFEST_NAME}
    assert (checkpoint_dir_for(out) / "checkpoint-2").is_dir()

    # --resume with other data is refused rather than silently mixed
    with pytest.raises(ULDTrainingError, match="other data or settings"):
        train_uld(
            build_tiny_model("llama", tokenizer, seed=6),
            tokenizer,
            FORGET[:1],
            RETAIN,
            out,
            _config(min_steps=4, epochs=2, save_every_epoch=True, lora_rank=4, resume=True),
        )

    counter = _CountSteps()
    resumed = train_uld(
        build_tiny_model("llama", tokenizer, seed=6),
        tokenizer,
        FORGET,
        RETAIN,
        out,
        _config(min_steps=4, epochs=2, save_every_epoch=True, lora_rank=4, resume=True),
        callbacks=[counter],
    )
    assert resumed.steps == 4 and counter.steps == 2, "resume must continue from step 2, not restart"
    assert previous.out_dir == resumed.out_dir
    manifest, _ = load_uld_artifact(out, build_tiny_model("llama", tokenizer, seed=6))
    assert manifest.training["steps"] == 4
    assert epoch_dir_for(out, 2).is_dir() and not checkpoint_dir_for(out).exists()


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_cli_malformed_jsonl_exits_2_with_file_and_line(tmp_path, capsys):
    good = _write(tmp_path / "retain.jsonl", RETAIN)
    bad = _write(tmp_path / "forget.jsonl", [FORGET[0], "{not json", FORGET[1]])
    wrong_shape = _write(tmp_path / "shape.jsonl", [FORGET[0], FORGET[1], {"prompt": "x"}])
    cases = [(bad, f"{bad}:2"), (wrong_shape, f"{wrong_shape}:3"), (tmp_path / "missing.jsonl", "no such file")]
    for forget, expected in cases:
        argv = ["train-uld", "--model", "unused", "--forget", str(forget), "--retain", str(good)]
        code = cli.main([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2
        assert expected in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_trains_end_to_end(tiny_llama_dir, tmp_path, capsys):
    forget = _write(tmp_path / "forget.jsonl", FORGET)
    retain = _write(tmp_path / "retain.jsonl", [{"text": "Water boils at one hundred degrees."}, *RETAIN])
    out = tmp_path / "out"
    argv = ["train-uld", "--model", str(tiny_llama_dir), "--forget", str(forget), "--retain", str(retain)]
    argv += ["--out", str(out), "--layers", "1", "--lora-rank", "4", "--min-steps", "3", "--epochs", "1"]
    argv += ["--batch-size", "2", "--grad-accum", "1", "--no-progress", "--seed", "1"]
    settings = ["--default-alpha", "0.4", "--default-margin", "0.5", "--default-floor", "5", "--fact-set-weight", "0.5"]
    settings += ["--validation-max-tokens", "12", "--topic", "--no-prefix-guard", "--no-finish-words"]
    settings += ["--no-calibration-gate", "--restarts", "1"]
    assert cli.main([*argv, *settings]) == 0
    stdout = capsys.readouterr().out
    # --restarts: these rows name no fact the base model knows, so no seed could pass: no restart, said so
    assert "restarts: not tried: the calibration could not check forgetting" in stdout and "restart 1" not in stdout
    assert "forget CE" in stdout and "retain KL" in stdout and str(out) in stdout
    assert "fact-set loss:" in stdout
    assert "so the fact-set loss changes nothing" in stdout  # these three rows hold no fact token: said so
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    # wired through (its value is tested above; these three rows have no token rare enough to be a fact)
    assert manifest["training"]["fact_set_weight"] == 0.5
    assert isinstance(manifest["training"]["fact_set_kl_final"], float)
    assert manifest["training"]["calibration"]["max_tokens"] == 12  # the validation answers' length
    assert manifest["training"]["calibration"]["topic"] is True  # --topic: another forget fact named is a leak
    data = manifest["training"]["data"]
    assert data["forget"]["sha256"] == file_sha256(forget) and data["retain"]["records"] == 3
    assert manifest["training"]["seed"] == 1 and manifest["details"]["assistant_layers"] == 1
    # --no-calibration-gate: a uniform build stays ungated whatever its calibration finds (uld_calibrate.choose_gate)
    assert manifest["training"]["calibration_gate"] is False
    assert "gate_tried" not in manifest["training"]["calibration"]
    defaults = {"alpha": 0.4, "filter": 0.01, "rule": DEFAULT_RULE, "refilter": True, "margin": 0.5, "floor": 5.0}
    defaults["prefix_guard"] = False  # --no-prefix-guard (new artifacts: true, tests/test_prefix_guard.py)
    defaults["finish_words"] = False  # --no-finish-words (tests/test_finish_words.py)
    # --flat-reference auto (the default) chose by the early exit's CE, recorded; the gate follows the choice
    chosen = manifest["training"]["flat_reference"]
    assert chosen in ("early_exit", "uniform") and isinstance(manifest["training"]["early_exit_forget_ce"], float)
    assert manifest["defaults"] == defaults | {"gate": "early_exit" if chosen == "early_exit" else None}
    assert f"flat reference: {'the early exit' if chosen == 'early_exit' else 'uniform'}" in stdout
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert manifest["base_fingerprint"]["weights_probe"] == fingerprint_model(base)["weights_probe"]

    # bad numbers are refused before anything loads
    assert cli.main([*argv, "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert cli.main([*argv, "--default-filter", "2"]) == 2
    assert "--default-filter must be in [0, 1]" in capsys.readouterr().err
    assert cli.main([*argv, "--default-margin", "-1"]) == 2
    assert "--default-margin must be a number >= 0" in capsys.readouterr().err
    for bad in ("1,-2", "one", "", "1,,2", "nan"):
        assert cli.main([*argv, "--calibration-margins", bad]) == 2
        assert "--calibration-margins" in capsys.readouterr().err
    for bad in ("-1", "lots", "inf"):
        assert cli.main([*argv, "--default-floor", bad]) == 2
        assert "--default-floor" in capsys.readouterr().err
    assert cli.main([*argv, "--fact-set-weight", "-1"]) == 2
    assert "--fact-set-weight must be >= 0" in capsys.readouterr().err
    assert cli.main([*argv, "--fact-set-weight", "1", "--no-forget-weighting"]) == 2
    assert "needs the knowledge weights" in capsys.readouterr().err
    assert cli.main([*argv, "--validation-max-tokens", "0"]) == 2
    assert "--validation-max-tokens must be >= 1" in capsys.readouterr().err


def test_data_error_names_record_for_unrenderable_chat(tokenizer):
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="forget: record 1"):
        tokenize_records(plain, [{"messages": [{"role": "assistant", "content": "hi"}]}], 32, "{question}", "forget")


def test_floor_serving_default_off_is_written_as_null():
    from unlearn_serve.training.uld import ULDTrainingConfig

    from unlearn_serve.uld_artifact import ULD_DEFAULTS

    assert "floor" not in ULDTrainingConfig().serving_defaults()  # the module default (ULD_DEFAULTS) applies
    assert ULD_DEFAULTS["floor"] == DEFAULT_FLOOR
    assert ULDTrainingConfig(default_floor=4.0).serving_defaults()["floor"] == 4.0
    off = ULDTrainingConfig(default_floor=float("inf")).serving_defaults()
    assert "floor" in off and off["floor"] is None
    assert json.loads(json.dumps({**ULD_DEFAULTS, **off}))["floor"] is None  # valid JSON, served as off


def test_early_exit_flat_reference_is_the_assistant_without_its_lora(tokenizer, tmp_path):
    """flat_reference=early_exit: the KL terms are to the assistant's own weights without the LoRA (0 while the LoRA
    adds nothing, where the uniform reference is not); equal to the KL over full logits; the manifest then asks for
    the gate, which only the prefer rule takes."""
    from peft import get_peft_model
    from unlearn_serve.training.losses import reference_kl
    from unlearn_serve.training.uld import AssistantModule

    model = build_tiny_model("llama", tokenizer, seed=4, initializer_range=0.2)
    peft_model = get_peft_model(model, assistant_lora_config(model, 2, rank=4, alpha=8, dropout=0.0)).eval()
    template = ULDTrainingConfig().question_template
    forget = tokenize_records(tokenizer, FORGET, 64, template, "forget").examples
    retain = tokenize_records(tokenizer, RETAIN, 64, template, "retain").examples
    weights = [[0.25 * (p % 5) for p in range(sum(1 for t in lab[1:] if t != -100))] for _, lab in forget]
    dataset = ForgetRetainDataset(forget, retain, forget_weights=weights)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    inputs = {k: v for k, v in batch.items() if k != "retain_labels"}
    with torch.no_grad():  # LoRA B starts at 0: the assistant is its early exit
        _, retain_kl, forget_flat, _, _ = AssistantModule(peft_model, 2, "early_exit")(**inputs)
        _, uniform_retain, uniform_forget, _, _ = AssistantModule(peft_model, 2, "uniform")(**inputs)
    assert abs(float(retain_kl)) < 1e-6 and abs(float(forget_flat)) < 1e-6
    assert float(uniform_retain) > 0.1 and float(uniform_forget) > 0.1
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        _, retain_kl, _, _, _ = AssistantModule(peft_model, 2, "early_exit")(**inputs)
        retain_logits = assistant_logits(peft_model, batch["retain_input_ids"], batch["retain_attention_mask"], 2)
        with peft_model.disable_adapter():
            early = assistant_logits(peft_model, batch["retain_input_ids"], batch["retain_attention_mask"], 2)
    assert float(retain_kl) > 1e-3
    torch.testing.assert_close(retain_kl, reference_kl(retain_logits, early, batch["retain_loss_mask"]))

    assert ULDTrainingConfig().flat_reference == "auto"
    with pytest.raises(ValueError, match="flat_reference must be one of"):
        ULDTrainingConfig(flat_reference="zero")
    gates, chosen = {}, {}
    for label, overrides in (
        ("auto", {}),  # a random tiny model's first layer knows nothing of the forget set: the early exit
        ("uniform", {"flat_reference": "uniform"}),
        ("difference", {"flat_reference": "early_exit", "default_rule": "difference"}),
    ):
        config = _config(min_steps=2, layers=1, **overrides)
        train_uld(build_tiny_model("llama", tokenizer, seed=3), tokenizer, FORGET, RETAIN, tmp_path / label, config)
        manifest = json.loads((tmp_path / label / MANIFEST_NAME).read_text())
        gates[label], chosen[label] = manifest["defaults"]["gate"], manifest["training"]["flat_reference"]
    assert gates == {"auto": "early_exit", "uniform": None, "difference": None}
    assert chosen == {"auto": "early_exit", "uniform": "uniform", "difference": "early_exit"}


def test_auto_flat_reference_falls_back_to_uniform_where_the_early_exit_knows_the_forget_answers(tokenizer):
    """`auto`: the early exit's CE on the forget answers decides; a model whose first layer has memorised them (the
    gate's blind spot) trains against uniform, served ungated; the measurement is the early exit's own CE."""
    from unlearn_serve.training.uld import (
        EARLY_EXIT_KNOWS_CE,
        choose_flat_reference,
        early_exit_forget_ce,
    )

    from unlearn_serve.tiny import fit_texts

    template = ULDTrainingConfig().question_template
    forget = tokenize_records(tokenizer, FORGET, 64, template, "forget").examples
    fresh = build_tiny_model("llama", tokenizer, seed=3)
    memorised = build_tiny_model("llama", tokenizer, seed=3)
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids, _ in forget]
    fit_texts(memorised, tokenizer, texts, steps=150)
    fresh_ce = early_exit_forget_ce(fresh, forget, None, 1)
    known_ce = early_exit_forget_ce(memorised, forget, None, 1)
    assert fresh_ce > 3 * EARLY_EXIT_KNOWS_CE and known_ce < EARLY_EXIT_KNOWS_CE, (fresh_ce, known_ce)
    # the same number as the CE of assistant_logits over the answer tokens
    ids, labels = forget[0]
    logits = assistant_logits(fresh, torch.tensor([ids]), None, 1)[0, :-1]
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    one = early_exit_forget_ce(fresh, forget[:1], None, 1)
    assert one == pytest.approx(float(F.cross_entropy(logits[keep], targets[keep])), rel=1e-5)
    auto = ULDTrainingConfig()
    assert choose_flat_reference(auto, fresh_ce) == "early_exit" and choose_flat_reference(auto, known_ce) == "uniform"
    assert choose_flat_reference(ULDTrainingConfig(flat_reference="early_exit"), known_ce) == "early_exit"
