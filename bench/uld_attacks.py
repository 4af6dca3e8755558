"""ULD under simple attacks: no attack vs the log-prob probe vs sampling, with and without the refilter.

    python bench/uld_attacks.py --models tiny                     # the two tiny memorising models (~2 min)
    python bench/uld_attacks.py --models smollm2 --artifact DIR   # e.g. the demo's assistant
    python bench/uld_attacks.py --models tofu-quick               # bench/tofu.py --quick's target, last author

Per model it serves the ULD assistant (bench/uld_quality.py's cached `new` assistant, or --artifact) with the
serving Engine twice, once per `refilter` setting (engine-level `unlearning` option, uld_combine.py), and runs
unlearn_serve/evaluation/attacks.py on the forget questions: `none` (greedy), `paraphrase`, `logprob` (the
reference token in the top 5 where the greedy answer leaves the reference) and `sample` (20 answers at
temperature 1 per question, a leak when any names the fact). The leak check is the suites' keyword match
(the record's `keywords`: "Oslo", "Rowling"), exact words only (no near-leaks); TOFU's sentence-long answers use
the project's rule (training/leak.answer_leaked). The base model is scored too, and, as the cost side, the share
of temperature-1 samples of the retain questions that still name their fact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ATTACKS = ("paraphrase", "logprob", "sample")
COLUMNS = ("none", "paraphrase", "logprob", "sample")


def records_for(suite) -> list[dict]:
    """Forget records with the checks' keywords and paraphrases; the reference answer is the training row's."""
    answers = {r["question"]: r["answer"] for r in suite.forget_records}
    out = []
    for check in suite.forget_checks:
        out.append(
            {
                "question": check.question,
                "answer": check.reference or answers.get(check.question, " ".join(check.keywords)),
                # TOFU's sentence-long answers: no keywords, the project's leak rule on the reference
                "keywords": [] if check.reference else list(check.keywords),
                "paraphrased_question": check.paraphrase,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="tiny", help="comma list: tiny, tiny-llama, tiny-qwen2, smollm2, tofu-quick"
    )
    parser.add_argument("--artifact", default=None, help="serve this assistant (one model) instead of the cached one")
    parser.add_argument("--samples", type=int, default=20, help="answers per question for the sampling attack")
    parser.add_argument("--no-base", action="store_true", help="skip the base model's row")
    parser.add_argument("--no-retain", action="store_true", help="skip sampling the retain questions (the cost side)")
    parser.add_argument("--json", default=None, help="also write all rows (per-question results) to this file")
    args = parser.parse_args(argv)

    from uld_quality import smollm2_suite, tiny_suite, train_cached
    from unlearn_serve.server.engine.engine import Engine, EngineConfig
    from unlearn_serve.training.data import encode_prompt

    from unlearn_serve.evaluation import runner as E
    from unlearn_serve.evaluation.attacks import AttackConfig, leaked, run_attacks, sample_answers

    @dataclasses.dataclass
    class WithOptions(E.Method):
        """A ULD row with engine-level `unlearning` options (here: refilter) on top of the artifact's defaults."""

        options: dict = dataclasses.field(default_factory=dict)

        def selection(self, scoring: bool):
            sel = super().selection(scoring)
            return None if sel is None else type(sel)(sel.name, {**sel.options, **self.options})

    suites = []
    for name in args.models.split(","):
        if name in ("tiny", "tiny-llama"):
            suites.append(tiny_suite("llama"))
        if name in ("tiny", "tiny-qwen2"):
            suites.append(tiny_suite("qwen2"))
        if name == "smollm2":
            suites.append(smollm2_suite())
        if name == "tofu-quick":
            from uld_quality import Check, Suite
            from uld_quality_tofu import tofu_quick_suite

            suites.append(tofu_quick_suite(Suite, Check))
    if args.artifact is not None and len(suites) != 1:
        parser.error("--artifact needs exactly one model")
    config = AttackConfig(attacks=ATTACKS, sample_n=args.samples, max_new_tokens=48)
    rows, dump = [], []
    for suite in suites:
        model, tokenizer = suite.model_loader()
        artifact = Path(args.artifact) if args.artifact else train_cached(suite, "new", model, tokenizer, False, {})[0]
        engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=32, max_model_len=512), "base")
        assistant = engine.load_uld("forget", artifact)
        records = records_for(suite)
        retain = [
            {"question": c.question, "answer": c.reference or "", "keywords": [] if c.reference else list(c.keywords)}
            for c in suite.retain_checks
        ]
        retain_budget = suite.max_tokens if any(c.reference for c in suite.retain_checks) else min(suite.max_tokens, 24)
        retain_prompts = [encode_prompt(tokenizer, r["question"]) for r in retain]
        settings = [] if args.no_base else [("base", E.Method("base", "base"))]
        for refilter in (False, True):
            label = f"refilter {'on' if refilter else 'off'}"
            settings.append((label, WithOptions(label, "uld", "forget", options={"refilter": refilter})))
        for label, method in settings:
            started = time.monotonic()
            out = run_attacks(engine, method, records, config)
            s = out["summary"]
            # the cost side: how often samples at temperature 1 still name the retain facts
            retain_share = None
            if not args.no_retain:
                sel = method.selection(scoring=False)
                got = sample_answers(engine, sel, retain_prompts, [retain_budget] * len(retain), config)
                retain_share = sum(leaked(t, r) for g, r in zip(got, retain, strict=True) for t in g) / (
                    config.sample_n * len(retain)
                )
            row = {
                "model": suite.name,
                "artifact": str(artifact),
                "alpha": assistant.alpha,
                "rule": assistant.combine.rule,
                "setting": label,
                "n": len(records),
                **{c: s.get(f"attack_{c}_leak") for c in COLUMNS},
                "logprob_top20": s.get("attack_logprob_top20"),
                "sample_share": s.get("attack_sample_share"),
                "retain_sample_right": retain_share,
                "seconds": round(time.monotonic() - started, 1),
            }
            rows.append(row)
            dump.append({**row, "per_question": out["per_question"]})
            print(json.dumps(row), flush=True)
        del engine

    def frac(v, n):
        return "-" if v is None else f"{round(v * n)}/{n}"

    print()
    print(
        "| model | alpha, rule | setting | no attack | paraphrase | log-prob probe (top 5) | in top 20 "
        f"| sampling (any of {args.samples}) | leaking samples | retain samples right | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["n"]
        share = "-" if r["sample_share"] is None else f"{r['sample_share']:.2f}"
        kept = "-" if r["retain_sample_right"] is None else f"{r['retain_sample_right']:.2f}"
        print(
            f"| {r['model']} | {r['alpha']:g}, {r['rule']} | {r['setting']} | {frac(r['none'], n)} | "
            f"{frac(r['paraphrase'], n)} | {frac(r['logprob'], n)} | {frac(r['logprob_top20'], n)} | "
            f"{frac(r['sample'], n)} | {share} | {kept} | {r['seconds']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
