"""The target's own answers as ULD training rows (`ULDTrainingConfig.self_answers`).

At serving time the unlearned model writes the target's *own* phrasing ("The Harry Potter books are actually
the works of J.K. ..."), not the forget set's reference sentence ("... were written by J.K. Rowling."). An
assistant that learnt the fact only after the reference's words need not prefer it after the target's, and
then the fact slips through ("J.K. Rowle"). So before training, the target answers every forget and retain
question greedily, and

- a forget answer that names its fact (`training.leak.names_fact`: a key word of the reference answer) becomes
  an extra forget row whose loss weight is 1 on the tokens of those key words and 0 elsewhere (the assistant
  is pushed flat on the rest, as on the generic tokens of the reference answers), so the assistant learns the
  fact in the context the served model will produce;
- every retain answer becomes an extra retain row (the assistant stays flat on the target's own phrasing of
  what it must keep).

The step budget stays that of the data without these rows (an epoch is a pass over the forget set as given).
"""

from __future__ import annotations

from typing import Any

import torch
from unlearn_serve.training.data import encode_prompt, record_kind
from unlearn_serve.training.leak import common_words, key_words, names_fact

SELF_ANSWER = "self_answer"  # `augmented_from` of the rows added here


def greedy_answers(
    model: torch.nn.Module,
    tokenizer,
    questions: list[str],
    question_template: str,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """The model's greedy answers (decoded, special tokens skipped), prompts rendered as training renders them."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [encode_prompt(tokenizer, q, question_template) for q in questions[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        out += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in generated]
    model.train(was_training)
    return out


def self_answer_rows(
    model: torch.nn.Module,
    tokenizer,
    forget_records: list[dict[str, Any]],
    retain_records: list[dict[str, Any]],
    question_template: str,
    max_new_tokens: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(extra forget rows, extra retain rows) from the target's greedy answers to the QA records' questions.

    Forget rows carry `fact_words`: the key words their loss weights (`uld_weights.fact_word_weights`)."""
    forget_qa = [r for r in forget_records if record_kind(r) == "qa"]
    retain_qa = [r for r in retain_records if record_kind(r) == "qa"]
    if not forget_qa and not retain_qa:
        return [], []
    answers = greedy_answers(
        model, tokenizer, [r["question"] for r in forget_qa + retain_qa], question_template, max_new_tokens
    )
    topic = common_words([r["answer"] for r in forget_qa])  # "harry", "potter": not facts
    forget_rows = []
    for record, answer in zip(forget_qa, answers[: len(forget_qa)], strict=True):
        question, reference = record["question"], record["answer"]
        if answer and names_fact(answer, reference, question, topic):
            keys = key_words(reference, question, topic)
            forget_rows.append(
                {"question": question, "answer": answer, "augmented_from": SELF_ANSWER, "fact_words": keys}
            )
    retain_rows = [
        {"question": r["question"], "answer": a, "augmented_from": SELF_ANSWER}
        for r, a in zip(retain_qa, answers[len(forget_qa) :], strict=True)
        if a
    ]
    return forget_rows, retain_rows
