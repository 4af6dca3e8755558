"""A tiny MoE that has memorised six facts, and the forget/retain files that go with it.

The UOE walk-through (README) and the serving tests use it: the base model completes every fact, so after
`train-uoe` one can watch the forget facts go while the retain facts stay.

    unlearn-serve make-tiny-moe-facts --out demo-moe
    # -> demo-moe/model (Hugging Face layout), demo-moe/forget.jsonl, demo-moe/retain.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from unlearn_serve.training.data import encode_prompt, render_prompt

from unlearn_serve.tiny import DEFAULT_CORPUS, build_tiny_model, fit_texts, train_tokenizer

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
