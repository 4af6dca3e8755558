"""Which forget tokens carry the knowledge: per-token weights for the ULD forget loss.

An assistant trained with plain cross-entropy learns *every* answer token, the generic ones ("The",
"of", "is") included; subtracting it then suppresses those too and the unlearned answer leaves the
language from its first token. So each forget answer token gets a weight in [0, 1]:

- rarity among all training answers (forget and retain): w = clamp(1 - df / `common`, 0, 1), df the
  share of answers holding the token. "The", "is", ".", the end-of-turn token: ~0; a name that
  appears in one answer: ~1;
- echo: a token that is part of a word of the question ("Harry" in "Harry Potter attends ...",
  "Hogwarts" in "The headmaster of Hogwarts is ...") carries no fact: 0. The first answer token is
  usually such an echo or a generic word, so the answer's lead-in stays untouched.
- optionally (`contrasts` > 0) the contrast max(w, clamp((log p_target(tok | question) - mean_j log
  p_target(tok | other question_j)) / tau, 0, 1)). Off by default: measured on SmolLM2 it gave weight
  ~1 to lead-ins that follow from the question's form ("were written by" after "Who wrote ...") and
  to the end-of-turn token, exactly the tokens that must stay untouched (docs/uld.md).

The trainer learns the weighted tokens (CE) and stays flat (KL to uniform) on the rest.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from unlearn_serve.training.data import IGNORE_INDEX, label_positions, record_kind, render_example


def _batched_next_logits(
    model: torch.nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
):
    """Per right-padded batch of `examples`: (the batch, [B, T-1, V] next-token logits, [B, T-1] labels shifted to
    them). The model runs in eval mode without gradients; its training mode is restored after."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in chunk], device=device)
            labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in chunk], device=device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            yield chunk, logits, labels[:, 1:]
    finally:
        model.train(was_training)


def _answer_log_probs(
    model: torch.nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
) -> list[torch.Tensor]:
    """Per example: log p(label token) at each label position (positions 1.., labels != -100)."""
    out: list[torch.Tensor] = []
    for chunk, logits, targets in _batched_next_logits(model, examples, pad_id, batch_size):
        picked = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        for row in range(len(chunk)):
            out.append(picked[row][targets[row] != IGNORE_INDEX].cpu())
    return out


def target_candidates(
    model: torch.nn.Module,
    examples: list[tuple[list[int], list[int]]],
    count: int,
    pad_id: int,
    batch_size: int = 8,
) -> list[list[list[int]]]:
    """Per example, per label position 1.. (the positions the retain loss covers): the target's `count` most
    likely next tokens there. The trainer keeps the assistant flat on them (losses.candidate_uniform_kl): they
    are the candidates ULD's combination will pick from at serving time."""
    out: list[list[list[int]]] = []
    for chunk, logits, targets in _batched_next_logits(model, examples, pad_id, batch_size):
        top = logits.topk(min(count, logits.shape[-1]), dim=-1).indices.cpu()
        for row in range(len(chunk)):
            out.append(top[row][(targets[row] != IGNORE_INDEX).cpu()].tolist())
    return out


# the weight of an echoed token (a word the question contains) when echoes are held neither to the facts nor to the
# flat reference (`knowledge_weights(echo=ECHO)`): the loss ignores it (training/uld.py AssistantModule)
ECHO = -1.0


def knowledge_weights(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    examples: list[tuple[list[int], list[int]]],
    max_length: int,
    question_template: str,
    contrasts: int = 0,
    tau: float = 1.0,
    batch_size: int = 8,
    reference_labels: list[list[int]] | None = None,
    common: float = 0.25,
    echo: float = 0.0,
) -> list[list[float]] | None:
    """Weights in [0, 1] for each example's label positions (1..), in the order of `examples`.

    `examples[i]` must be `records[i]` rendered. Non-QA records (plain text, chat) get weight 1
    everywhere (no question to tell the fact from the lead-in); None when there is no QA record at all. A token of a
    word the question contains gets `echo`: 0 (held flat, as a generic token) or ECHO (ignored).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ones = [[1.0] * len(label_positions(lab)) for _, lab in examples]
    answers = [{t for t in lab if t != IGNORE_INDEX} for lab in (reference_labels or [lab for _, lab in examples])]
    df: dict[int, float] = {}
    for tokens in answers:
        for t in tokens:
            df[t] = df.get(t, 0.0) + 1.0 / len(answers)
    qa = [i for i, r in enumerate(records) if record_kind(r) == "qa"]
    questions = sorted({records[i]["question"] for i in qa})
    if not qa:
        return None
    was_training = model.training
    model.eval()
    own = _answer_log_probs(model, [examples[i] for i in qa], pad, batch_size) if contrasts else []
    others: list[list[torch.Tensor | None]] = [[] for _ in qa]
    for c in range(1, contrasts + 1 if len(questions) > 1 else 1):
        swapped, where = [], []
        for j, i in enumerate(qa):
            q = records[i]["question"]
            k = (questions.index(q) + c * max(1, len(questions) // (contrasts + 1))) % len(questions)
            if questions[k] == q:
                k = (k + 1) % len(questions)
            ids, labels = render_example(
                tokenizer, {"question": questions[k], "answer": records[i]["answer"]}, max_length, question_template
            )
            swapped.append((ids, labels))
            where.append(j)
        for j, lp in zip(where, _answer_log_probs(model, swapped, pad, batch_size), strict=True):
            others[j].append(lp if len(lp) == len(own[j]) else None)
    model.train(was_training)
    weights = list(ones)
    for j, i in enumerate(qa):
        alts = [a for a in others[j] if a is not None]
        if alts and len(own[j]) == len(weights[i]):
            gain = own[j] - torch.stack(alts).mean(dim=0)
            w = (gain / tau).clamp(0.0, 1.0).tolist()
        else:
            w = [0.0] * len(weights[i])
        _, labels = examples[i]
        tokens = [labels[p] for p in label_positions(labels)]
        words = re.findall(r"\w+", records[i]["question"].lower())
        echoed = _echo_tokens(tokenizer, tokens, set(words))
        for p, tok in enumerate(tokens):
            rare = min(1.0, max(0.0, 1.0 - df.get(tok, 0.0) / common))
            w[p] = echo if echoed[p] else max(w[p], rare)
        weights[i] = w
    return weights


def fact_word_weights(tokenizer, labels: list[int], words: list[str]) -> list[float]:
    """Per label position 1..: 1 for a token that is part of one of `words` (lower-case), else 0. The weights of a
    row the target wrote itself (training/self_answers.py): only its fact's words are learnt."""
    tokens = [labels[p] for p in label_positions(labels)]
    return [1.0 if hit else 0.0 for hit in _echo_tokens(tokenizer, tokens, set(words))]


def _echo_tokens(tokenizer, tokens: list[int], question_words: set[str]) -> list[bool]:
    """Per token: is it part of a word that also appears in the question ("H" + "arry" of "Harry")?"""
    spans, text = [], ""
    for p in range(len(tokens)):
        through = tokenizer.decode(tokens[: p + 1])
        spans.append((len(text), len(through)))
        text = through
    echo = [False] * len(tokens)
    for word in re.finditer(r"\w+", text):
        if word.group().lower() not in question_words:
            continue
        for p, (start, end) in enumerate(spans):
            if start < word.end() and end > word.start():
                echo[p] = True
    return echo


def fact_tokens(labels: list[int], weights: list[float], min_weight: float) -> list[int]:
    """The distinct label tokens (positions 1.., in order) whose knowledge weight is at least `min_weight`: the
    tokens that carry a forget answer's fact, for the fact-set loss (training/losses.py `fact_set_kl`)."""
    tokens = [labels[p] for p in label_positions(labels)]
    if len(tokens) != len(weights):
        raise ValueError("forget weights do not match the example's label tokens")
    return list(dict.fromkeys(t for t, w in zip(tokens, weights, strict=True) if w >= min_weight))
