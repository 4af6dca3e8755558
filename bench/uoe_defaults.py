"""Does `train-uoe` reach its goal on its defaults? Tiny memorising MoEs of several families and seeds.

    python bench/uoe_defaults.py                                  # qwen2_moe, olmoe, mixtral, qwen3_moe x 4 seeds
    python bench/uoe_defaults.py --families qwen2_moe --seeds 0,1

Each run builds the six-fact MoE of `unlearn-serve make-tiny-moe-facts` (family, seed), lets attribution pick
the expert and trains with UOEConfig() and nothing else (the CLI's defaults), then greedy-answers all six
questions with the kept patch: forget recall (Alice's facts still answered, training/leak.py) must be <= 10%
and retain recall >= 95% of the base model's. One Markdown row per run, and the totals.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="qwen2_moe,olmoe,mixtral,qwen3_moe")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pick", help="attribution ranking (forget | contrast; default: UOEConfig's)")
    args = parser.parse_args(argv)
    import torch
    from unlearn_serve.training.leak import answer_leaked
    from unlearn_serve.training.uoe_tiny_facts import FORGET_QA, RETAIN_QA, build_facts_model, recall
    from unlearn_serve.training.uoe_trainer import UOEConfig, train_uoe

    torch.set_num_threads(args.threads)
    forget = [{"question": q, "answer": a} for q, a in FORGET_QA]
    retain = [{"question": q, "answer": a} for q, a in RETAIN_QA]

    def answered(model, tok, qa) -> int:
        return sum(answer_leaked(g, a, q) for g, (q, a) in zip(recall(model, tok, qa), qa, strict=True))

    print("| family | seed | goal met | forget recall | retain recall (base) | kept step | stopped by | peak lr "
          "| time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    met = runs = 0
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            model, tok = build_facts_model(family, seed=seed)
            base_retain = answered(model, tok, RETAIN_QA)
            t0 = time.monotonic()
            result = train_uoe(model, tok, forget, retain, UOEConfig(seed=seed, progress=False,
                                                                         **({"pick": args.pick} if args.pick else {})))
            seconds = time.monotonic() - t0
            f_rec = answered(model, tok, FORGET_QA) / len(FORGET_QA)
            r_rec = answered(model, tok, RETAIN_QA)
            ok = f_rec <= 0.1 and r_rec >= 0.95 * base_retain
            met += ok
            runs += 1
            v = result.verdict
            peak = max(h["lr"] for h in result.history)
            print(f"| {family} | {seed} | {'yes' if ok else 'NO'} | {f_rec:.2f} | {r_rec}/{len(RETAIN_QA)} "
                  f"({base_retain}/{len(RETAIN_QA)}) | {v.kept_step} | {v.stopped_by} | {peak:.2g} | {seconds:.1f} |",
                  flush=True)
    print(f"\ngoal met in {met}/{runs} runs (forget recall <= 10%, retain >= 95% of base)")
    return 0 if met == runs else 1


if __name__ == "__main__":
    sys.exit(main())
