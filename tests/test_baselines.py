"""Whole-model baselines change the model's weights; ULD leaves the target's weights untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from unlearn_serve.training.baselines import BaselineConfig, npo_loss, train_baseline

from unlearn_serve.loading import load_model_and_tokenizer

FORGET = [
    {"question": "Where is the capital of France?", "answer": "The capital of France is Paris."},
    {"question": "What does Alice like?", "answer": "Alice likes green apples."},
]
RETAIN = [
    {"question": "What does Bob play?", "answer": "Bob plays the violin."},
    {"question": "When does water boil?", "answer": "Water boils at one hundred degrees."},
]



def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _forget_ce(model, tok) -> float:
    from unlearn_serve.training.losses import causal_ce
    from unlearn_serve.training.pairs import tokenize_records

    examples = tokenize_records(tok, FORGET, 128, "Question: {question}\nAnswer: ", "forget").examples
    total = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids])).logits
            total += float(causal_ce(logits, torch.tensor([labels])))
    return total / len(examples)


def test_npo_loss_by_hand():
    # equal policy and reference: -(2/beta) * log sigmoid(0) = (2/beta) * ln 2
    zero = torch.zeros(3)
    assert float(npo_loss(zero, zero, 0.1)) == pytest.approx(20 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    # lowering the policy's log-prob below the reference lowers the loss
    assert float(npo_loss(zero - 5, zero, 0.1)) < float(npo_loss(zero, zero, 0.1))


@pytest.mark.parametrize("method", ["ga", "gd", "npo", "rmu"])
def test_baseline_changes_weights_and_forgets(method, tiny_llama_dir, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir), dtype="float32")
    before = _state(model)
    ce_before = _forget_ce(model, tok)
    cfg = BaselineConfig(
        method=method, epochs=1, min_steps=4, learning_rate=5e-3, batch_size=2, grad_accum=1, progress_bar=False
    )
    result = train_baseline(model, tok, FORGET, RETAIN, tmp_path / method, cfg)
    assert result.steps == 4
    saved, _ = load_model_and_tokenizer(str(tmp_path / method), dtype="float32")
    after = _state(saved)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "a whole-model baseline trains (almost) every weight"
    assert _forget_ce(saved, tok) > ce_before, "unlearning raises the loss on the forget answers"
    assert (tmp_path / method / "baseline.json").is_file()
    assert not any(p.name.startswith(f".{method}") for p in tmp_path.iterdir()), "no temp dirs left behind"


def test_uld_leaves_target_untouched(tiny_llama_dir, tmp_path):
    from unlearn_serve.training.uld import ULDTrainingConfig, train_uld

    def digest(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}

    on_disk = digest(tiny_llama_dir)
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir), dtype="float32")
    before = _state(model)
    cfg = ULDTrainingConfig(epochs=1, min_steps=3, batch_size=2, grad_accum=1, lora_rank=4, progress_bar=False)
    result = train_uld(model, tok, FORGET, RETAIN, tmp_path / "uld", cfg)
    base = result.peft_model.get_base_model()
    after = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before), "ULD must not change a target weight"
    assert digest(tiny_llama_dir) == on_disk
    trained = [n for n, p in result.peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_train_baseline_cli(tiny_llama_dir, tmp_path, capsys):
    import json

    from unlearn_serve.cli import main

    forget = tmp_path / "forget.json"
    retain = tmp_path / "retain.json"
    forget.write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    retain.write_text("".join(json.dumps(r) + "\n" for r in RETAIN))
    rc = main(["train-baseline", "--method", "ga", "--model", str(tiny_llama_dir), "--forget", str(forget),
               "--retain", str(retain), "--out", str(tmp_path / "ga"), "--epochs", "1", "--batch-size", "2",
               "--grad-accum", "1", "--no-progress"])
    assert rc == 0 and (tmp_path / "ga" / "config.json").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json\n")
    rc = main(["train-baseline", "--method", "gd", "--model", str(tiny_llama_dir), "--forget", str(bad),
               "--retain", str(retain), "--out", str(tmp_path / "gd")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.json:1" in err and "Traceback" not in err
