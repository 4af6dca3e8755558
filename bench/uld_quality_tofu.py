"""TOFU quick as a model of the ULD quality harness: `python bench/uld_quality.py --models tofu-quick`.

The base model is bench/tofu.py's quick target (a 4-layer Llama that memorised the QA of 10 TOFU authors
plus 40 real-author and 40 world-fact QA; trained once and cached under ~/.cache/unlearn-serve/tofu-bench/,
shared with `python bench/tofu.py --quick`). ULD forgets the last author (20 QA, forget10's last author),
with bench/tofu.py's retain rows and sizing (`BenchConfig.uld_settings`: K = 2 of 4 layers, LoRA 16, lr 2e-3,
5 epochs); the rest is train-uld's default, as for the other models.

Checks:
- forget: the author's 20 questions, and their `paraphrased_question` from forget10_perturbed.json. bench/tofu.py
  trains on those paraphrases (the augmentation); here the forget rows drop `paraphrased_question` (they keep
  `paraphrased_answer`), so the paraphrase column is held out as it is for the other models;
- retain: 20 questions of the retain authors (in the ULD retain set, as in bench/tofu.py) and 10 real-author and 10
  world-fact questions (never seen by ULD training);
- "names the fact" (leak on a forget answer, right on a retain answer), for TOFU's sentence-long answers:
  `training/leak.answer_leaked`, i.e. more than half of the reference answer's tokens that are not in the
  question come back, in order (ROUGE-L recall on those content tokens > 0.5). On a one-word fact ("Paris",
  "lives in Oslo") that is the keyword rule of the other rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOFU_RETAIN_CHECKS = 20  # TOFU retain-author questions checked
TOFU_GENERAL_CHECKS = 10  # real-author and world-fact questions checked (each)
TOFU_MAX_TOKENS = 96  # the quick target's answers: 20-70 tokens of its 1024-token BPE


def tofu_checks(eval_sets: dict[str, list[dict[str, Any]]], check_cls) -> tuple[list[Any], list[Any]]:
    """(forget checks, retain checks) from bench/tofu.py's eval splits; `check_cls` is uld_quality.Check."""
    forget = [
        check_cls(r["question"], (), r.get("paraphrased_question") or None, reference=r["answer"])
        for r in eval_sets["forget"]
    ]
    rows = (
        eval_sets["retain"][:TOFU_RETAIN_CHECKS]
        + eval_sets["real_authors"][:TOFU_GENERAL_CHECKS]
        + eval_sets["world_facts"][:TOFU_GENERAL_CHECKS]
    )
    retain = [check_cls(r["question"], (), reference=r["answer"]) for r in rows]
    return forget, retain


def held_out_paraphrases(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The forget rows without `paraphrased_question` (checked, so not trained on)."""
    return [{k: v for k, v in r.items() if k != "paraphrased_question"} for r in records]


def tofu_quick_suite(suite_cls, check_cls, tofu_dir: Path | None = None, cache: Path | None = None):
    """The harness Suite for TOFU quick (bench/uld_quality.py passes its Suite and Check classes)."""
    import tofu  # bench/tofu.py (bench/ is on sys.path when the harness runs)

    cfg = tofu.BenchConfig.quick()
    data = tofu.select_data(cfg, tofu_dir or tofu.TOFU)
    forget_checks, retain_checks = tofu_checks(data["eval"], check_cls)

    def load():
        from unlearn_serve.loading import load_model_and_tokenizer

        target_dir, _, _ = tofu.ensure_models(cfg, data, cache or tofu.CACHE, retrain=False)
        return load_model_and_tokenizer(str(target_dir), dtype="float32", device="cpu")

    training = {**cfg.uld_settings()}
    return suite_cls(
        "tofu-quick",
        held_out_paraphrases(data["forget"]),
        data["uld_retain"],
        forget_checks,
        retain_checks,
        TOFU_MAX_TOKENS,
        load,
        training,
    )
