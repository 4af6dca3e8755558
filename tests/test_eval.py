"""TOFU metrics against hand-computed values, and `unlearn-serve eval` end to end on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from shared_data import require_tofu

from unlearn_serve.evaluation import metrics as M

TOFU = require_tofu()
LN = math.log



# ----------------------------------------------------------------------------- metrics, by hand


def test_probability_is_exp_of_minus_mean_nll():
    assert M.probability([LN(0.5), LN(0.5)]) == pytest.approx(0.5)
    # geometric mean per token: sqrt(0.25 * 1) = 0.5
    assert M.probability([LN(0.25), LN(1.0)]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.probability([])


def test_normalised_option_probability():
    # p(correct) = 0.5, wrong 0.25 + 0.25 -> 0.5 / 1.0
    assert M.normalised_option_probability([LN(0.5)], [[LN(0.25)], [LN(0.25)]]) == pytest.approx(0.5, abs=1e-8)


def test_truth_ratio_from_known_probabilities():
    # wrong answers at 0.25 and 0.0625 per token: mean loss (ln4 + ln16)/2 = ln 8 -> 0.125; correct 0.5
    tr = M.truth_ratio([LN(0.5), LN(0.5)], [[LN(0.25)], [LN(0.0625), LN(0.0625)]])
    assert tr == pytest.approx(0.25, rel=1e-6)
    assert M.truth_ratio_forget([0.25, 4.0]) == pytest.approx(0.25)  # mean of min(tr, 1/tr)
    assert M.truth_ratio_forget([1.0]) == pytest.approx(1.0)
    assert M.truth_ratio_utility([0.25, 4.0]) == pytest.approx(0.375)  # mean of max(0, 1 - tr)
    with pytest.raises(ValueError):
        M.truth_ratio([LN(0.5)], [])


def test_forget_quality_ks_p_value():
    values = [0.1, 0.5, 0.9, 1.3, 0.7]
    assert M.forget_quality(values, list(values)) == pytest.approx(1.0)
    far = M.forget_quality([0.01 * i for i in range(30)], [10 + 0.01 * i for i in range(30)])
    assert far < 1e-10


def test_harmonic_mean_and_model_utility():
    assert M.harmonic_mean([1, 2, 4]) == pytest.approx(12 / 7)
    assert M.harmonic_mean([0.5, 0.0, 1.0]) == 0.0
    assert M.model_utility({"a": 0.5, "b": 0.5, "c": 0.5}) == pytest.approx(0.5)


def test_rouge_l_recall():
    assert M.rouge_l_recall("The author was born in Paris.", "The author was born in Paris.") == pytest.approx(1.0)
    assert M.rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert M.rouge_l_recall("cats running", "cat run") == pytest.approx(1.0)  # stemming
    assert M.rouge_l_recall("", "anything at all") == 0.0


def test_exact_memorization_and_extraction_strength():
    assert M.exact_memorization([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(0.75)
    assert M.extraction_strength([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert M.extraction_strength([9, 2, 3], [1, 2, 3]) == pytest.approx(2 / 3)  # suffix from k = 1
    assert M.extraction_strength([1, 9, 3, 4], [1, 2, 3, 4]) == pytest.approx(0.5)  # k = 2
    # open-unlearning's loop leaves k = n - 1 when nothing matches
    assert M.extraction_strength([9, 9, 9], [1, 2, 3]) == pytest.approx(1 / 3)


def test_ngram_loop_detector_and_perplexity():
    assert M.has_ngram_loop("the the the cat")
    assert M.has_ngram_loop("He is a writer is a writer is a writer of books")
    assert M.has_ngram_loop("abcabcabcabc")
    assert not M.has_ngram_loop("The author was born in Paris, and the author writes poems.")
    assert not M.has_ngram_loop("")
    assert M.loop_share(["a a a", "a b c", "x y z", "no loop here"]) == pytest.approx(0.25)
    assert M.perplexity([[LN(0.5)], [LN(0.5), LN(0.5)]]) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- end to end


def _slice(tmp: Path, n: int = 2) -> list[str]:
    names = {
        "forget": "forget10_perturbed.json",
        "retain": "retain_perturbed.json",
        "real_authors": "real_authors_perturbed.json",
        "world_facts": "world_facts_perturbed.json",
    }
    entries = []
    for split, name in names.items():
        lines = (TOFU / name).read_text().splitlines()[:n]
        path = tmp / f"{split}.json"
        path.write_text("\n".join(lines) + "\n")
        entries.append(f"{split}={path}")
    return entries


@pytest.fixture(scope="module")
def uld_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A ULD assistant trained for a few steps on the tiny model (enough to be a valid artifact)."""
    from unlearn_serve.training.uld import ULDTrainingConfig, train_uld

    from unlearn_serve.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_llama_dir), dtype="float32")
    forget = [{"question": "Where is the capital of France?", "answer": "The capital of France is Paris."}]
    retain = [{"question": "What does Bob play?", "answer": "Bob plays the violin."}]
    out = tmp_path_factory.mktemp("uld") / "uld"
    cfg = ULDTrainingConfig(epochs=1, min_steps=2, batch_size=1, grad_accum=1, lora_rank=4, progress_bar=False)
    train_uld(model, tok, forget, retain, out, cfg)
    return out


def test_eval_end_to_end(tiny_llama_dir, uld_dir, tmp_path):
    from unlearn_serve.cli import main
    from unlearn_serve.evaluation.runner import load_reference

    data = _slice(tmp_path)
    reference = tmp_path / "ref.json"
    reference.write_text(json.dumps([0.5, 0.8]))
    out = tmp_path / "report"
    rc = main([
        "eval", "--model", str(tiny_llama_dir), "--uld", f"forget-fr={uld_dir}", "--alpha", "0.5,1",
        "--data", *data, "--retain-reference", str(reference), "--out", str(out),
        "--max-new-tokens", "8", "--no-progress",
    ])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    labels = [m["label"] for m in metrics["methods"]]
    assert labels == ["base", "forget-fr α=0.5", "forget-fr α=1"]
    for m in metrics["methods"]:
        s = m["summary"]
        assert 0.0 <= s["forget_quality"] <= 1.0
        assert s["model_utility"] is not None and 0.0 <= s["model_utility"] <= 1.0
        assert set(s["model_utility_parts"]) == {
            f"{split}_{part}"
            for split in ("retain", "real_authors", "world_facts")
            for part in ("probability", "rouge", "truth_ratio")
        }
        forget = m["splits"]["forget"]["per_question"]
        for key in ("probability", "rouge", "truth_ratio", "extraction_strength", "exact_memorization",
                    "generated", "ngram_loop"):
            assert len(forget[key]) == 2, key
        assert all(0.0 < p <= 1.0 for p in forget["probability"])
    # Different alphas really change the ULD distribution the engine scores with.
    tr = [m["splits"]["forget"]["per_question"]["truth_ratio"] for m in metrics["methods"]]
    assert tr[1] != tr[2]
    # The file written is itself a valid --retain-reference (the base model's forget truth ratios).
    assert load_reference(out / "metrics.json") == pytest.approx(tr[0])

    # The attack block ran for every row, through the engine: keys in the summary, a table, a plot.
    for m in metrics["methods"]:
        s = m["summary"]
        for attack in ("none", "paraphrase", "raw", "context", "system", "relearn", "logprob"):
            assert 0.0 <= s[f"attack_{attack}_leak"] <= 1.0, attack
            assert attack in m["attacks"]["per_question"]
        assert "attack_quant8_leak" not in s  # UOE rows only
    base = metrics["methods"][0]["summary"]
    assert base["attack_logprob_top20"] is not None

    report = (out / "report.md").read_text()
    assert "| method | FQ | MU |" in report and "forget-fr α=0.5" in report
    assert "## Attacks" in report and "| method | no attack | paraphrase | raw completion |" in report
    for png in ("fq_vs_mu.png", "uld_alpha.png", "attacks.png"):
        blob = (out / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 1000


def test_eval_scores_engine_level_uld_options(tiny_llama_dir, uld_dir, tmp_path, capsys):
    """`--uld-options` scores the same artifact under other settings (one set of rows per use); a bad value is
    refused before any scoring, with the option named."""
    from unlearn_serve.cli import main

    data = _slice(tmp_path)
    out = tmp_path / "report"
    common = ["eval", "--model", str(tiny_llama_dir), "--uld", f"u={uld_dir}", "--alpha", "4", "--data", *data,
              "--out", str(out), "--max-new-tokens", "4", "--attacks", "none", "--no-progress"]
    rc = main([*common, "--uld-options", "rule=prefer,margin=0", "--uld-options", "rule=prefer,margin=0,floor=0.5",
               "--uld-options", "rule=difference"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    labels = [m["label"] for m in metrics["methods"]]
    assert labels == [
        "base", "u α=4 rule=prefer margin=0", "u α=4 rule=prefer margin=0 floor=0.5", "u α=4 rule=difference"
    ]
    probs = [m["splits"]["forget"]["per_question"]["probability"] for m in metrics["methods"]]
    assert probs[1] != probs[2] != probs[3]  # the settings reached the engine
    capsys.readouterr()
    rc = main([*common, "--uld-options", "floor=-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--uld-options floor=-1" in err and "floor" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "nonsense.json"], "cannot tell the split"),
        (["--data", "forget=/no/such/file.json"], "no such file"),
        (["--data", "/"], "no forget10_perturbed.json"),
        (["--data", str(TOFU), "--alpha", "x,1"], "--alpha"),
        (["--data", str(TOFU), "--uld", "noequals"], "NAME=DIR"),
        (["--data", str(TOFU), "--retain-reference", "/no/such.json"], "no such file"),
        (["--data", str(TOFU), "--attacks", "paraphrase,bogus"], "unknown attack"),
        (["--data", str(TOFU), "--attacks", "sample", "--sample-n", "0"], "--sample-n"),
        (["--data", str(TOFU), "--uld-options", "strength=2"], "--uld-options"),
        (["--data", str(TOFU), "--uld-options", "margin"], "KEY=VALUE"),
    ],
)
def test_eval_cli_errors(args, message, capsys, tmp_path):
    from unlearn_serve.cli import main

    rc = main(["eval", "--model", "/no/model", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
