"""UOE end to end on tiny MoE models: attribution, one-expert training, patch serving, export, CLI."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from unlearn_serve.server.unlearning.uoe import ExpertPatchSet
from unlearn_serve.training.data import render_prompt
from unlearn_serve.training.leak import answer_leaked
from unlearn_serve.training.uoe_attribution import RouterCapture, attribute
from unlearn_serve.training.uoe_tiny_facts import FORGET_QA, RETAIN_QA
from unlearn_serve.training.uoe_trainer import (
    ExpertIsolation,
    PairCollator,
    UOEConfig,
    UOEObjective,
    train_uoe,
    write_uoe_artifact,
)

from unlearn_serve.artifact import ArtifactError
from unlearn_serve.cli import main as cli_main
from unlearn_serve.expert_patch import load_expert_patch, merge_patch_into
from unlearn_serve.families import get_family, registered_families
from unlearn_serve.tiny import DEFAULT_CORPUS, build_tiny_model, save_tiny, train_tokenizer, write_random_expert_patch

FORGET = [{"question": q, "answer": a} for q, a in FORGET_QA]
RETAIN = [{"question": q, "answer": a} for q, a in RETAIN_QA]
# Methods spread over the families so every loss runs once.
METHOD_FOR = {"qwen2_moe": "gd", "qwen3_moe": "npo", "mixtral": "rmu", "olmoe": "ga", "deepseek_v3": "npo"}



@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(DEFAULT_CORPUS + [f"{q} {a}" for q, a in FORGET_QA + RETAIN_QA], vocab_size=400)
    tok.padding_side = "left"
    return tok


def tiny(family: str, tokenizer, seed: int = 0):
    model = build_tiny_model(family, tokenizer, num_layers=2, seed=seed)
    return model, get_family(model)


def forget_ids(tokenizer) -> torch.Tensor:
    return tokenizer([render_prompt(tokenizer, q) + a for q, a in FORGET_QA], return_tensors="pt", padding=True)


@torch.no_grad()
def plant(model, family, layer: int, expert: int, tokenizer, strength: float = 40.0) -> None:
    """Make the forget tokens strongly prefer `expert` at `layer` (router weight along their mean input)."""
    block = family.moe_block(model, layer)
    with RouterCapture(family, {layer: block}) as capture:
        model(**forget_ids(tokenizer))
    mean = capture.inputs[layer].float().mean(dim=0)
    weight = family.router_params(block)["weight"]
    weight[expert] += (strength * mean / mean.norm() ** 2).to(weight.dtype)


# ----------------------------------------------------------------------------- attribution


@pytest.mark.parametrize("family_name", registered_families())
def test_attribution_ranks_the_planted_expert_first(family_name, tokenizer):
    model, family = tiny(family_name, tokenizer)
    layer = max(family.moe_layers(model))
    assert attribute(model, tokenizer, FORGET, progress=False).top1("forget") != (layer, 5)  # not by chance
    plant(model, family, layer, 5, tokenizer)
    result = attribute(model, tokenizer, FORGET, RETAIN, contrast=True, progress=False)
    assert result.top1("forget") == (layer, 5)
    top, runner_up = [r for r in result.rankings["forget"] if r.layer == layer][:2]
    # Clearly ahead of the next expert of its layer (DeepSeek-V3's sigmoid scores, renormalised over all
    # experts, cannot approach 1 like a softmax), and picked by the router on nearly every token (k=2).
    assert top.forget_affinity > 1.5 * runner_up.forget_affinity and top.forget_topk_share > 0.45
    assert {(r.layer, r.expert) for r in result.rankings["contrast"]} == {
        (r.layer, r.expert) for r in result.rankings["forget"]
    }


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("family_name", registered_families())
def test_training_moves_only_the_chosen_expert_and_router(family_name, tokenizer, tmp_path):
    model, family = tiny(family_name, tokenizer)
    layer = max(family.moe_layers(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    config = UOEConfig(
        layer=layer, expert=2, method=METHOD_FOR.get(family_name, "rmu"), lr=1e-2, batch_size=3, max_steps=3,
        eval_every=1, forget_loss_target=1e9, weight_decay=0.1, progress=False,  # decay must not leak either
        recall_check=False,  # the CE rule alone (a random model "answers" nothing: the recall goal is trivial)
    )
    result = train_uoe(model, tokenizer, FORGET, RETAIN, config)
    block = family.moe_block(model, layer)
    expert_names = {f"model.layers.{layer}.mlp.experts.{n}" for n in family.expert_parameters(block)}
    router_prefix = f"model.layers.{layer}.mlp.{family.router_attr}."
    others = torch.arange(8) != 2
    for name, param in model.named_parameters():
        if name in expert_names:
            assert torch.equal(param[others], before[name][others]), name
        elif not name.startswith(router_prefix):
            assert torch.equal(param, before[name]), name
    for name, buf in model.named_buffers():
        assert torch.equal(buf, buffers[name]), name
    moved = [n for n in expert_names if not torch.equal(dict(model.named_parameters())[n][2], before[n][2])]
    assert moved, "the chosen expert did not move"
    assert all(not p.requires_grad for p in model.parameters())

    # artifact round trip: what was written is exactly the kept expert + router, and is small
    write_uoe_artifact(result, tmp_path / "patch")
    base = copy.deepcopy(model)
    for name, param in base.named_parameters():
        param.data.copy_(before[name])
    loaded, manifest = load_expert_patch(tmp_path / "patch", base)
    assert manifest.details == {
        "family": family_name, "layer": layer, "expert": 2, "num_experts": 8,
        "method": config.method, "anchor_weight": 1.0, "picked_by": "--layer/--expert",
    }
    assert {"losses", "steps", "data"} <= set(manifest.training)
    # unreachable forget target: the kept step is the highest forget CE within the retain bound (both logged)
    losses = manifest.training["losses"]
    assert not losses["goal_reached"] and [h["step"] for h in losses["history"]] == [0, 1, 2, 3]
    within = [h for h in losses["history"] if h["retain_ce"] <= losses["retain_loss_bound"]]
    assert losses["kept"] == max(within, key=lambda h: h["forget_ce"])
    assert manifest.training["kept_step"] == losses["kept"]["step"]
    for key, value in result.patch.tensors().items():
        assert torch.equal(loaded.tensors()[key], value), key
    total = sum(p.numel() for p in model.parameters())
    assert loaded.num_parameters() < total / 10


# ----------------------------------------------------------------------------- serving


@pytest.mark.parametrize("family_name", registered_families())
def test_mixed_batch_equals_each_request_alone_and_the_merged_model(family_name, tokenizer, tmp_path):
    model, family = tiny(family_name, tokenizer)
    layers = sorted(family.moe_layers(model))
    specs = {"a": (layers[-1], 1), "b": (layers[0], 2), "c": (layers[-1], 1)}  # c: same layer+expert as a
    patch_set = ExpertPatchSet(model, "tiny-base")
    ids = {}
    for i, (name, (layer, expert)) in enumerate(specs.items()):
        write_random_expert_patch(model, layer, expert, tmp_path / name, seed=i)
        ids[name] = patch_set.add(name, tmp_path / name)
    other_base, _ = tiny(family_name, tokenizer, seed=1)  # same architecture, other weights
    with pytest.raises(ArtifactError, match="trained on base model"):
        ExpertPatchSet(other_base, "other-base").add("a", tmp_path / "a")
    assert patch_set.names() == ["a", "b", "c"]
    row_patches = ["a", None, "b", "c", "a"]
    input_ids = torch.randint(0, len(tokenizer), (len(row_patches), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids).logits
        with patch_set.rows(row_patches):
            mixed = model(input_ids).logits
        assert patch_set._row_ids is None  # the context restores "no rows"
        alone = []
        for row, name in enumerate(row_patches):
            with patch_set.rows(torch.tensor([ids[name] if name else -1])):
                alone.append(model(input_ids[row : row + 1]).logits[0])
        merged = {}
        for name in specs:
            merged[name] = copy.deepcopy(model)
            merged[name].requires_grad_(False)
            merge_patch_into(merged[name], tmp_path / name)
    for row, name in enumerate(row_patches):
        torch.testing.assert_close(mixed[row], alone[row], rtol=1e-4, atol=1e-5)
        expected = base[row] if name is None else merged[name](input_ids[row : row + 1]).logits[0]
        torch.testing.assert_close(mixed[row], expected, rtol=1e-4, atol=1e-5)
    assert (mixed[0] - base[0]).abs().max() > 1e-3, "patch a had no effect"
    assert (mixed[2] - base[2]).abs().max() > 1e-3, "patch b had no effect"

    # exported checkpoint (standard HF layout, reloaded by transformers) equals the patched-row path
    merged["a"].save_pretrained(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids[:1]).logits[0], mixed[0], rtol=1e-4, atol=1e-5)

    patch_set.remove("b")
    assert patch_set.names() == ["a", "c"]
    with pytest.raises(ValueError, match="unknown expert patch"):
        patch_set.set_rows([ids["b"]])
    patch_set.close()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, base)


def test_patch_refuses_another_base_and_corrupted_files(tokenizer, tmp_path):
    model, family = tiny("qwen2_moe", tokenizer)
    artifact = write_random_expert_patch(model, 1, 3, tmp_path / "patch", seed=0)
    other, _ = tiny("qwen2_moe", tokenizer, seed=1)
    with pytest.raises(ArtifactError, match=r"trained on base model .* loaded model is other-base.*mismatched"):
        ExpertPatchSet(other, "other-base").add("p", artifact)

    patch_set = ExpertPatchSet(model)
    weights = artifact / "expert_patch.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated
    with pytest.raises(ArtifactError, match="corrupted"):
        patch_set.add("p", artifact)
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(ArtifactError, match="corrupted"):
        patch_set.add("p", artifact)
    (artifact / "unlearning.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        patch_set.add("p", artifact)
    assert patch_set.names() == []


# ----------------------------------------------------------------------------- CLI


@pytest.fixture()
def tiny_dir(tokenizer, tmp_path) -> Path:
    model, family = tiny("qwen2_moe", tokenizer)
    plant(model, family, 1, 6, tokenizer)
    save_tiny(model, tokenizer, tmp_path / "tiny")
    for name, records in (("forget", FORGET), ("retain", RETAIN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_cli_attribute_train_export(tiny_dir, capsys):
    d = tiny_dir
    common = ["--model", str(d / "tiny"), "--device", "cpu", "--no-progress"]
    assert cli_main(["attribute", *common, "--forget", str(d / "forget.jsonl"), "--retain",
                     str(d / "retain.jsonl"), "--contrast", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "full softmax, not top-k masked" in out
    assert "rank  layer  expert" in out and "forget minus retain" in out
    assert "pick (forget affinity top-1): layer 1, expert 6" in out
    contrast_pick = re.search(r"contrast top-1: layer (\d+), expert (\d+)", out).groups()
    assert contrast_pick != ("1", "6")  # retain routes to the planted expert too: the contrast looks elsewhere

    # --json keeps stdout machine-readable; the progress bar goes to stderr
    assert cli_main(["attribute", *common[:4], "--forget", str(d / "forget.jsonl"), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["pick"] == {"layer": 1, "expert": 6} and "full softmax" in report["affinity"]
    assert report["rankings"]["forget"][0]["forget_topk_share"] > 0.45
    assert "forget affinity" in captured.err  # tqdm bar over the data

    assert cli_main(["train-uoe", *common, "--forget", str(d / "forget.jsonl"), "--retain",
                     str(d / "retain.jsonl"), "--out", str(d / "uoe"), "--max-steps", "2", "--lr", "1e-2",
                     "--pick", "forget"]) == 0
    assert "layer 1 expert 6" in capsys.readouterr().out
    assert cli_main(["train-uoe", *common, "--forget", str(d / "forget.jsonl"), "--retain", str(d / "retain.jsonl"),
                     "--out", str(d / "uoe-contrast"), "--max-steps", "1", "--contrast"]) == 0
    assert "layer {} expert {}".format(*contrast_pick) in capsys.readouterr().out
    assert cli_main(["export", *common[:4], "--uoe", str(d / "uoe"), "--out", str(d / "merged")]) == 0

    base = AutoModelForCausalLM.from_pretrained(d / "tiny", dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(d / "merged", dtype=torch.float32).eval()
    patch_set = ExpertPatchSet(base)
    pid = patch_set.add("p", d / "uoe")
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), patch_set.rows([pid, pid]):
        torch.testing.assert_close(base(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-5)
    assert (d / "merged" / "tokenizer.json").is_file()


def test_cli_user_errors_exit_2_without_traceback(tiny_dir, capsys):
    d = tiny_dir
    assert cli_main(["attribute", "--model", str(d / "tiny"), "--forget", str(d / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "Traceback" not in err
    assert cli_main(["attribute", "--model", str(d / "nope"), "--forget", str(d / "forget.jsonl")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert cli_main(["export", "--model", str(d / "tiny"), "--uoe", str(d / "nope"), "--out", str(d / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (d / "dense").mkdir()
    save_tiny(build_tiny_model("llama", train_tokenizer(vocab_size=300), num_layers=1), train_tokenizer(vocab_size=300),
              d / "dense")
    assert cli_main(["attribute", "--model", str(d / "dense"), "--forget", str(d / "forget.jsonl")]) == 2
    assert "not a supported mixture-of-experts" in capsys.readouterr().err


def test_npo_reference_is_a_frozen_copy(tokenizer):
    """NPO's reference model must stay the initial model: no gradients, no shared storage with the student."""
    model, family = tiny("qwen2_moe", tokenizer)
    isolation = ExpertIsolation(model, family, 1, 2)
    objective = UOEObjective(model, family, 1, 2, UOEConfig(layer=1, expert=2, method="npo", progress=False))
    reference = objective.reference
    assert reference is not None and not reference.training
    student = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        assert not param.requires_grad and param.data_ptr() != student[name].data_ptr(), name
    batch = PairCollator(tokenizer.pad_token_id)(
        [{"forget": {"input_ids": ids, "labels": ids}, "retain": {"input_ids": ids, "labels": ids}}
         for ids in forget_ids(tokenizer)["input_ids"].tolist()]
    )
    loss, logs = objective(model, batch)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert student["model.layers.1.mlp.gate.weight"].grad is not None
    isolation.close()


# ----------------------------------------------------------------------------- the defaults reach the goal


@pytest.mark.parametrize("family_name", ["qwen2_moe", "olmoe"])
def test_defaults_forget_the_facts_and_keep_the_rest(family_name):
    """Two tiny memorising MoE families: UOE with nothing but its defaults (attribution picks the expert, the
    paper's starting lr 1e-4) forgets every forget fact and keeps every retain fact the base model knew."""
    from unlearn_serve.training.uoe_tiny_facts import build_facts_model, recall

    model, tok = build_facts_model(family_name)
    base_forget = recall(model, tok, FORGET_QA)
    base_retain = recall(model, tok, RETAIN_QA)
    assert base_forget == [a for _, a in FORGET_QA] and base_retain == [a for _, a in RETAIN_QA]
    result = train_uoe(model, tok, FORGET, RETAIN, UOEConfig(progress=False))
    verdict = result.verdict
    assert verdict.goal_met and verdict.stopped_by == "goal"
    assert verdict.forgot == 3 and verdict.retain_kept == verdict.retain_base == 3
    # The model now holds the kept patch: checked again here, independently of the trainer's own check.
    forget_now = recall(model, tok, FORGET_QA)
    assert not any(answer_leaked(g, a, q) for g, (q, a) in zip(forget_now, FORGET_QA, strict=True))
    assert recall(model, tok, RETAIN_QA) == base_retain
    # The schedule adapted: 1e-4 alone barely moves a tiny model (the 0.015 -> 0.72 in 200 steps).
    assert max(h["lr"] for h in result.history) > UOEConfig().lr
    assert result.manifest.training["verdict"]["goal_met"] is True
    assert result.manifest.training["losses"]["goal_reached"] is True


def test_fixed_paper_lr_does_not_reach_the_goal_in_the_same_steps():
    """The adaptation is what makes the defaults work: the same run at a fixed 1e-4 misses the goal."""
    from unlearn_serve.training.uoe_tiny_facts import build_facts_model

    model, tok = build_facts_model("qwen2_moe")
    result = train_uoe(model, tok, FORGET, RETAIN, UOEConfig(adaptive_lr=False, max_steps=60, progress=False))
    assert not result.verdict.goal_met and result.verdict.stopped_by == "steps"
    assert result.verdict.forgot < 3
    assert "GOAL NOT MET" in result.verdict.lines()[0]


def test_cli_walkthrough_defaults_and_strict(tmp_path, capsys):
    """The docs' walk-through with no special flags ends with a met goal; --strict exits 3 on a missed one."""
    d = tmp_path / "facts"
    assert cli_main(["make-tiny-moe-facts", "--out", str(d)]) == 0
    common = ["--model", str(d / "model"), "--forget", str(d / "forget.jsonl"), "--retain", str(d / "retain.jsonl"),
              "--no-progress"]
    capsys.readouterr()
    assert cli_main(["train-uoe", *common, "--out", str(tmp_path / "uoe")]) == 0
    out = capsys.readouterr().out
    assert "verdict: goal met" in out and "forgot 3/3 validation forget facts" in out
    assert "kept 3/3 validation retain facts (base model: 3/3)" in out

    missed = [*common, "--out", str(tmp_path / "uoe-missed"), "--max-steps", "1"]
    assert cli_main(["train-uoe", *missed]) == 0  # a loud warning, exit 0
    captured = capsys.readouterr()
    assert "GOAL NOT MET" in captured.out and "WARNING" in captured.err and "--strict" in captured.err
    assert cli_main(["train-uoe", *missed, "--strict"]) == 3
    assert (tmp_path / "uoe-missed" / "unlearning.json").is_file()  # the best step is still written
