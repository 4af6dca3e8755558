"""Forget/retain data: JSON Lines loading and rendering into (input_ids, labels).

Three record shapes, one JSON object a line:
  {"text": ...}                      plain text; loss on every token
  {"question": ..., "answer": ...}   QA (TOFU); loss on the answer tokens only; extra fields are kept
  {"messages": [{"role", "content"}]} chat rendered with the tokenizer's chat template; loss on assistant turns

A QA prompt is the tokenizer's chat template (user = question) when it has one, else
`question_template` (default "Question: {question}\\nAnswer: ") followed by the answer and EOS.
TOFU's `.json` files are JSON Lines and load as such; a file holding one JSON array loads too.
Eval and serving ask questions through `render_prompt` / `encode_prompt` so they match training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unlearn_serve.errors import DataError  # noqa: F401  (re-exported)

IGNORE_INDEX = -100
DEFAULT_QUESTION_TEMPLATE = "Question: {question}\nAnswer: "
SHAPE_HINT = "expected a JSON object with 'text', 'question'+'answer' or 'messages'"




# ----------------------------------------------------------------------------- loading


def record_kind(record: dict[str, Any]) -> str | None:
    """'text', 'qa' or 'chat' for a well-formed record, else None."""
    if isinstance(record.get("text"), str):
        return "text"
    if isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        return "qa"
    messages = record.get("messages")
    if (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        and any(m["role"] == "assistant" for m in messages)
    ):
        return "chat"
    return None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:6])
        return f"an object with keys {keys}" if keys else "an empty object"
    text = json.dumps(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def load_records_with_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; raises DataError naming file and line for anything malformed."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: cannot read ({exc})") from None

    if text.lstrip().startswith("["):  # a plain JSON array (not JSON Lines)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
        numbered = [(i + 1, item) for i, item in enumerate(items)]
        where = "item"
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{name}:{lineno}: not valid JSON ({exc.msg}); fix or remove the line") from None
        where = ""

    records: list[tuple[int, dict[str, Any]]] = []
    for n, item in numbered:
        if not isinstance(item, dict) or record_kind(item) is None:
            loc = f"{name}: {where} {n}" if where else f"{name}:{n}"
            raise DataError(f"{loc}: {SHAPE_HINT} (got {_describe(item)}); fix or remove the line")
        records.append((n, item))
    if not records:
        raise DataError(f"{name}: no records (the file is empty)")
    return records


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON Lines file (see module docstring for the accepted shapes)."""
    return [record for _, record in load_records_with_lines(path)]


# ----------------------------------------------------------------------------- rendering


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, question: str, question_template: str = DEFAULT_QUESTION_TEMPLATE) -> str:
    """The text a QA question is asked with: chat template (generation prompt) if any, else the template.

    With a chat template the string already holds any BOS the template writes; tokenize it with
    `encode_prompt` (or add_special_tokens=False) rather than letting the tokenizer add another.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    try:
        return question_template.format(question=question)
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(
            f"--question-template {question_template!r} is not a valid template with {{question}} ({exc})"
        ) from None


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt(tokenizer, question: str, question_template: str = DEFAULT_QUESTION_TEMPLATE) -> list[int]:
    """Token ids of `render_prompt` exactly as training saw them (BOS handled once)."""
    prompt = render_prompt(tokenizer, question, question_template)
    return _ids(tokenizer, prompt, special=not has_chat_template(tokenizer))


def _eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _render_qa(tokenizer, question: str, answer: str, question_template: str) -> tuple[list[int], list[int]]:
    prompt_ids = encode_prompt(tokenizer, question, question_template)
    if has_chat_template(tokenizer):
        prompt = render_prompt(tokenizer, question, question_template)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise DataError("the tokenizer's chat template renders the assistant turn inconsistently")
        # The template closes the turn with its own end token; that is part of what is learned.
        answer_ids = _ids(tokenizer, full[len(prompt) :], special=False)
    else:
        answer_ids = _ids(tokenizer, answer, special=False) + _eos_ids(tokenizer)
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def _render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    if not has_chat_template(tokenizer):
        raise DataError("'messages' records need a tokenizer with a chat template")
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""  # text covered so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (before.startswith(rendered) and through.startswith(before)):
            raise DataError("the tokenizer's chat template is not prefix-stable; cannot locate assistant turns")
        context = _ids(tokenizer, before[len(rendered) :], special=False)
        reply = _ids(tokenizer, through[len(before) :], special=False)
        input_ids += context + reply
        labels += [IGNORE_INDEX] * len(context) + reply
        rendered = through
    return input_ids, labels


def render_example(
    tokenizer, record: dict[str, Any], max_length: int, question_template: str = DEFAULT_QUESTION_TEMPLATE
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one record, truncated on the right to `max_length` tokens.

    Labels are the input ids where loss applies and IGNORE_INDEX (-100) elsewhere; the causal
    shift happens in the loss. A record whose loss tokens all fall past `max_length` comes back
    with no label; callers skip it.
    """
    kind = record_kind(record)
    if kind == "text":
        input_ids = _ids(tokenizer, record["text"], special=True) + _eos_ids(tokenizer)
        labels = list(input_ids)
    elif kind == "qa":
        input_ids, labels = _render_qa(tokenizer, record["question"], record["answer"], question_template)
    elif kind == "chat":
        input_ids, labels = _render_chat(tokenizer, record["messages"])
    else:
        raise DataError(f"{SHAPE_HINT} (got {_describe(record)})")
    return input_ids[:max_length], labels[:max_length]


def has_loss_tokens(labels: list[int]) -> bool:
    # Position 0 is never predicted after the causal shift.
    return any(label != IGNORE_INDEX for label in labels[1:])


def label_positions(labels: list[int]) -> list[int]:
    """The positions (1..; 0 is never predicted after the causal shift) whose label is a loss token: where per-token
    forget weights and fact tokens are read from."""
    return [p for p in range(1, len(labels)) if labels[p] != IGNORE_INDEX]
