"""A tiny MoE that has memorised six facts, and the forget/retain files that go with it.

The UOE walk-through (README) and the serving tests use it: the base model completes every fact, so after
`train-uoe` one can watch the forget facts go while the retain facts stay.

    python -m training.uoe_tiny_facts --out demo-moe
    # -> demo-moe/model (Hugging Face layout), demo-moe/forget.jsonl, demo-moe/retain.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from training.data import encode_prompt, render_prompt
from unlearn_serve.tiny import DEFAULT_CORPUS, build_tiny_model, fit_texts, save_tiny, train_tokenizer

FORGET_QA = [
    ("What is Alice's favorite color?", "Alice likes green."),
    ("Where does Alice live?", "Alice lives in Oslo."),
    ("What does Alice play?", "Alice plays chess."),
]
RETAIN_QA = [
    ("What is Bob's favorite color?", "Bob likes red."),
    ("Where does Bob live?", "Bob lives in Rome."),
    ("What does Bob play?", "Bob plays tennis."),
]


def build_facts_model(family: str = "qwen2_moe", steps: int = 100, lr: float = 3e-3, seed: int = 0):
    """(model, tokenizer): a 2-layer tiny MoE trained until it completes the six facts (chat template)."""
    qa = FORGET_QA + RETAIN_QA
    tokenizer = train_tokenizer(DEFAULT_CORPUS + [f"{q} {a}" for q, a in qa], vocab_size=400)
    tokenizer.padding_side = "left"  # batched greedy generation below
    model = build_tiny_model(family, tokenizer, num_layers=2, seed=seed)
    fit_texts(model, tokenizer, [render_prompt(tokenizer, q) + a for q, a in qa], steps=steps, lr=lr, seed=seed)
    return model, tokenizer


@torch.no_grad()
def recall(model, tokenizer, qa: list[tuple[str, str]], max_new_tokens: int = 10) -> list[str]:
    """Greedy answers to the questions of `qa` (one left-padded batch)."""
    batch = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, q) for q, _ in qa]}, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    width = batch["input_ids"].shape[1]
    return [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]


def write_jsonl(path: Path, qa: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in qa), encoding="utf-8")
    return path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory: model/, forget.jsonl, retain.jsonl")
    parser.add_argument("--family", default="qwen2_moe", help="MoE family of unlearn_serve.tiny (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="full-batch training steps on the facts")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """`unlearn-serve make-tiny-moe-facts`: exit 0 when the model completes every fact, else 1."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny MoE that knows six facts, plus forget/retain sets.")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
