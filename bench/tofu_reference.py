"""TOFU's retain model judged by `train-uld`'s calibration: what a model that never saw the forget authors scores.

The calibration stores an alpha only when the served answers name none of its validation facts and stay about as
probable under the base model as the base's own answers (training/uld_calibrate.py). TOFU's forget quality instead
asks the unlearned model to look like the *retain model* (trained without the forget authors). This script asks the
retain model the calibration's own validation questions (same slice, same rephrasings, same measures) and prints
the calibration's counts for it: facts named (chance hits of a model that cannot know them), held-out retain answers
kept, answers that loop or leave the language, and the perplexity of its answers under the target relative to the
target's own. Where the two standards disagree, no stored alpha can meet both.

    python bench/tofu_reference.py            # TOFU full's cached target and retain models (bench/tofu.py)
    python bench/tofu_reference.py --quick    # TOFU quick's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="TOFU quick's models (default: TOFU full's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--show-answers", action="store_true", help="print each validation question's answers")
    args = parser.parse_args(argv)

    import tofu  # bench/tofu.py
    import torch
    from unlearn_serve.server.engine.engine import Engine, EngineConfig
    from unlearn_serve.server.engine.sampling_params import SamplingParams
    from unlearn_serve.training.data import encode_prompt
    from unlearn_serve.training.uld import ULDTrainingConfig, split_validation
    from unlearn_serve.training.uld_calibrate import calibrate

    from unlearn_serve.evaluation.fluency import answers_nll
    from unlearn_serve.loading import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    cfg = tofu.BenchConfig.quick() if args.quick else tofu.BenchConfig()
    data = tofu.select_data(cfg)
    target_dir, retain_dir, _ = tofu.ensure_models(cfg, data, tofu.CACHE, retrain=False)
    target, tokenizer = load_model_and_tokenizer(str(target_dir), dtype="float32", device="cpu")
    reference, _ = load_model_and_tokenizer(str(retain_dir), dtype="float32", device="cpu")
    engines = {
        name: Engine(m, tokenizer, EngineConfig(max_num_seqs=64, max_model_len=512), "base")
        for name, m in (("target", target), ("retain", reference))
    }

    def answer(prompts: list[list[int]], alphas: list[float | None], max_tokens: int, margin=None) -> list[str]:
        # alpha None is the calibration's base model (the target); any alpha stands for the retain model
        engine = engines["target" if alphas[0] is None else "retain"]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return [r.completions[0].text for r in engine.generate(prompts, params, [None] * len(prompts))]

    answer.nll = lambda texts: answers_nll(engines["target"], tokenizer, texts)  # type: ignore[attr-defined]
    config = ULDTrainingConfig(**cfg.uld_settings())
    train_retain, validation_retain = split_validation(data["uld_retain"], config, True)
    result = calibrate(
        answer,
        lambda q: encode_prompt(tokenizer, q, config.question_template),
        data["forget"],
        validation_retain,
        alphas=(1.0,),
        targets=config.calibration_targets(),
        max_forget=config.validation_max_forget,
        max_tokens=config.validation_max_tokens,
        seed=config.seed,
        train_retain_rows=train_retain,
        rephrase=config.validation_rephrase,
    )
    if result is None:
        print("no question/answer forget rows")
        return 1
    s = result.scores[0]
    print(f"TOFU {'quick' if args.quick else 'full'}: the retain model under train-uld's calibration measures")
    print(
        f"  facts named: {s.leaked}/{s.known} validation facts the target names "
        f"(rephrased questions: {s.rephrased_leaked}/{s.rephrased_rows})"
    )
    print(f"  held-out retain answers kept: {s.kept}/{s.retain_rows}")
    disfluent = f"{s.disfluent}/{s.forget_rows} (target: {s.base_disfluent})"
    print(f"  forget answers that loop or leave the language: {disfluent}")
    again = "" if s.rel_ppl_rephrased is None else f" (rephrased questions: {s.rel_ppl_rephrased:.2f}x)"
    print(f"  perplexity of its forget answers under the target, relative to the target's own: {s.rel_ppl:.2f}x{again}")
    t = result.targets
    ppl_over = s.worst_rel_ppl is not None and s.worst_rel_ppl > t.max_rel_ppl
    loops_over = not s.fluent_met(t) and not ppl_over
    if not s.fluent_met(t) or not s.forget_met(t):
        print(
            "  the calibration would NOT accept this model's answers: "
            + "; ".join(
                ([f"perplexity {s.worst_rel_ppl:.2f}x > {t.max_rel_ppl:g}x"] if ppl_over else [])
                + ([f"{s.disfluent} answers loop or leave the language"] if loops_over else [])
                + ([f"{s.leaked} fact(s) named"] if not s.forget_met(t) else [])
            )
            + " (where the calibration and TOFU's reference disagree)"
        )
    if args.show_answers:
        for q in result.forget_questions:
            print(f"- {q}\n    target: {result.answers['base'][q]!r}\n    retain: {result.answers['1'][q]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
