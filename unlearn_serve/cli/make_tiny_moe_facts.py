"""`unlearn-serve make-tiny-moe-facts`: write a tiny MoE that knows six facts, plus forget/retain sets."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory: model/, forget.jsonl, retain.jsonl")
    parser.add_argument("--family", default="qwen2_moe", help="MoE family of unlearn_serve.tiny (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="full-batch training steps on the facts")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """`unlearn-serve make-tiny-moe-facts`: exit 0 when the model completes every fact, else 1."""
    from unlearn_serve.tiny import save_tiny
    from unlearn_serve.training.uoe_tiny_facts import FORGET_QA, RETAIN_QA, build_facts_model, recall, write_jsonl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_facts_model(args.family, steps=args.steps, seed=args.seed)
    save_tiny(model, tokenizer, out / "model")
    write_jsonl(out / "forget.jsonl", FORGET_QA)
    write_jsonl(out / "retain.jsonl", RETAIN_QA)
    qa = FORGET_QA + RETAIN_QA
    answers = recall(model, tokenizer, qa)
    known = sum(got == want for got, (_, want) in zip(answers, qa, strict=True))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/model (tiny {args.family}, {n:,} parameters; completes {known}/{len(qa)} facts), "
          f"{out}/forget.jsonl (Alice), {out}/retain.jsonl (Bob)")
    return 0 if known == len(qa) else 1

