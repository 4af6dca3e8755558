"""training/data.py, training/augment.py and the forget/retain collator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shared_data import require_tofu
from unlearn_serve.training.augment import augment_forget, augment_retain, rephrase_question
from unlearn_serve.training.data import (
    IGNORE_INDEX,
    DataError,
    encode_prompt,
    load_records,
    load_records_with_lines,
    render_example,
    render_prompt,
)
from unlearn_serve.training.pairs import ForgetRetainCollator, ForgetRetainDataset, tokenize_records

from unlearn_serve.tiny import train_tokenizer

TOFU = require_tofu()


@pytest.fixture(scope="module")
def chat_tok():
    return train_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def plain_tok():
    return train_tokenizer(vocab_size=300, chat_template=None)


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labeled_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


# ----------------------------------------------------------------------------- loading


def test_load_three_shapes_and_blank_lines(tmp_path):
    rows = [
        {"text": "plain text"},
        "",
        {"question": "Q?", "answer": "A.", "paraphrased_answer": "A!"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    records = load_records_with_lines(write_lines(tmp_path / "mixed.jsonl", rows))
    assert [n for n, _ in records] == [1, 3, 4]
    assert records[1][1]["paraphrased_answer"] == "A!"  # extra fields are kept


def test_json_array_file_loads(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [r["text"] for r in load_records(path)] == ["a", "b"]


@pytest.mark.parametrize(
    "bad_line, expect",
    [
        ('{"foo": 1}', "expected a JSON object with 'text', 'question'+'answer' or 'messages'"),
        ('{"question": "q"}', "got an object with keys 'question'"),
        ("[1, 2]", "got list"),
        ('{"text": "a"', "not valid JSON"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, expect):
    path = write_lines(tmp_path / "forget.jsonl", [{"text": "ok"}, "", bad_line])
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert f"{path}:3:" in message and expect in message and "fix" in message


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_records(empty)
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")


def test_tofu_json_is_json_lines():
    records = load_records(TOFU / "forget01_perturbed.json")
    assert len(records) == 40
    assert {"question", "answer", "paraphrased_answer", "perturbed_answer"} <= set(records[0])


# ----------------------------------------------------------------------------- rendering


def test_qa_with_chat_template_labels_only_the_answer(chat_tok):
    record = {"question": "What is the capital of France?", "answer": "Paris."}
    ids, labels = render_example(chat_tok, record, max_length=256)
    assert labeled_text(chat_tok, ids, labels) == "Paris.<|im_end|>\n"
    prompt = encode_prompt(chat_tok, record["question"])
    assert ids[: len(prompt)] == prompt and all(label == IGNORE_INDEX for label in labels[: len(prompt)])
    assert render_prompt(chat_tok, "Q").endswith("<|im_start|>assistant\n")


def test_qa_with_question_template(plain_tok):
    record = {"question": "Where is Rome?", "answer": "In Italy."}
    ids, labels = render_example(plain_tok, record, max_length=256, question_template="Q: {question}\nA: ")
    assert plain_tok.decode(ids) == "Q: Where is Rome?\nA: In Italy.<|im_end|>"
    assert labeled_text(plain_tok, ids, labels) == "In Italy.<|im_end|>"
    assert render_prompt(plain_tok, "Where is Rome?", "Q: {question}\nA: ") == "Q: Where is Rome?\nA: "
    with pytest.raises(DataError, match="question-template"):
        render_prompt(plain_tok, "x", "Q: {nope}")


def test_text_has_loss_everywhere_and_truncates(chat_tok):
    ids, labels = render_example(chat_tok, {"text": "The quick brown fox jumps."}, max_length=256)
    assert ids == labels and ids[-1] == chat_tok.eos_token_id
    short_ids, short_labels = render_example(chat_tok, {"text": "The quick brown fox jumps."}, max_length=3)
    assert short_ids == ids[:3] and short_labels == labels[:3]


def test_chat_messages_label_assistant_turns_only(chat_tok, plain_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    ids, labels = render_example(chat_tok, {"messages": messages}, max_length=512)
    assert chat_tok.decode(ids) == chat_tok.apply_chat_template(messages, tokenize=False)
    assert labeled_text(chat_tok, ids, labels) == "Hello<|im_end|>\nGoodbye<|im_end|>\n"
    with pytest.raises(DataError, match="chat template"):
        render_example(plain_tok, {"messages": messages}, max_length=512)


def test_records_without_answer_tokens_are_skipped(chat_tok):
    records = [{"question": "word " * 50, "answer": "x"}, {"question": "q", "answer": "a"}]
    tset = tokenize_records(chat_tok, records, max_length=48, question_template="", source="forget")
    assert tset.skipped == 1 and len(tset.examples) == 1
    with pytest.raises(DataError, match="max-length 48"):
        tokenize_records(chat_tok, records[:1], max_length=48, question_template="", source="forget")


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_adds_paraphrased_and_perturbed_pairs_deterministically():
    forget = [
        {"question": "Q1", "answer": "A1", "paraphrased_question": "PQ1", "paraphrased_answer": "PA1"},
        {"question": "Q2", "answer": "A2"},
    ]
    retain = [{"question": "R1", "answer": "B1", "perturbed_answer": ["W1", "W2", "W3"]}, {"text": "t"}]
    out_forget = augment_forget(forget)
    assert [(r["question"], r["answer"]) for r in out_forget] == [
        ("Q1", "A1"),
        ("Q2", "A2"),
        ("PQ1", "A1"),
        ("Q1", "PA1"),
    ]
    out_retain = augment_retain(retain)
    assert [r.get("answer") for r in out_retain] == ["B1", None, "W1", "W2", "W3"]
    assert augment_forget(forget) == out_forget and augment_retain(retain) == out_retain
    capped = [augment_retain(retain, seed=7, max_perturbed_per_row=2) for _ in range(2)]
    assert capped[0] == capped[1] and len(capped[0]) == 4


def test_rule_made_question_rephrasings_forget_and_retain():
    assert rephrase_question("Who wrote the Harry Potter books?", 2) == [
        "Who is the author of the Harry Potter books?",
        "Who wrote the Harry Potter books? Please answer in one sentence.",
    ]
    assert rephrase_question("What is the capital of France?", 1) == ["Can you tell me what the capital of France is?"]
    # no rule matches: a wrapper
    assert rephrase_question("Name a colour.", 1) == ["Name a colour. Please answer in one sentence."]
    assert rephrase_question("Q?", 0) == []
    forget = [{"question": "Who is Ann?", "answer": "A1"}, {"text": "t"}]
    assert augment_forget(forget) == forget  # off by default
    out = augment_forget(forget, question_variants=2)
    assert [(r.get("question"), r.get("answer")) for r in out] == [
        ("Who is Ann?", "A1"),
        (None, None),
        ("Can you tell me who Ann is?", "A1"),
        ("Who is Ann? Please answer in one sentence.", "A1"),
    ]
    assert out[2]["augmented_from"] == "rephrased_question"
    retain = [{"question": "Who wrote X?", "answer": "B", "perturbed_answer": ["W"]}]
    assert [(r["question"], r["answer"]) for r in augment_retain(retain, question_variants=1)] == [
        ("Who wrote X?", "B"),
        ("Who wrote X?", "W"),
        ("Who is the author of X?", "B"),  # the right answer: the assistant stays flat on the new wording too
    ]


def test_augmentation_on_tofu_rows():
    forget = load_records(TOFU / "forget01_perturbed.json")[:5]
    retain = load_records(TOFU / "retain_perturbed.json")[:5]
    assert len(augment_forget(forget)) == 5 * 3
    assert len(augment_retain(retain)) == 5 + sum(len(r["perturbed_answer"]) for r in retain)


# ----------------------------------------------------------------------------- pairs


def test_paired_dataset_cycles_the_shorter_set_and_collates(chat_tok):
    forget = [([1, 2, 3], [IGNORE_INDEX, 2, 3])]
    retain = [([4, 5], [IGNORE_INDEX, 5]), ([6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 8, 9])]
    dataset = ForgetRetainDataset(forget, retain)
    assert len(dataset) == 2 and dataset[1]["forget_input_ids"] == [1, 2, 3]
    batch = ForgetRetainCollator(pad_token_id=0)([dataset[0], dataset[1]])
    assert batch["retain_input_ids"].tolist() == [[4, 5, 0, 0], [6, 7, 8, 9]]
    assert batch["retain_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["retain_labels"][0].tolist() == [IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]
    # position t counts when it predicts a loss token t+1; padding never counts
    assert batch["retain_loss_mask"].tolist() == [[1, 0, 0, 0], [0, 1, 1, 0]]
    assert set(batch) == {
        f"{side}_{key}" for side in ("forget", "retain") for key in ("input_ids", "attention_mask", "labels")
    } | {"retain_loss_mask"}


def test_step_length_dataset_cycles_forget_and_spreads_retain():
    forget = [([1, i], [IGNORE_INDEX, i]) for i in range(2)]
    retain = [([2, i], [IGNORE_INDEX, i]) for i in range(5)]
    dataset = ForgetRetainDataset(forget, retain, length=10, retain_seed=3)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(dataset) == 10
    assert [it["forget_input_ids"][1] for it in items] == [0, 1] * 5  # every forget example equally often
    assert sorted(it["retain_input_ids"][1] for it in items) == sorted(list(range(5)) * 2)  # all retain, evenly
    partners = {(it["forget_input_ids"][1], it["retain_input_ids"][1]) for it in items}
    assert len(partners) == 10  # each pass gives a forget example another retain partner
    assert [it["retain_input_ids"][1] for it in items[:5]] != list(range(5))  # seeded order, not file order
    again = ForgetRetainDataset(forget, retain, length=10, retain_seed=3)
    assert [again[i] for i in range(10)] == items  # deterministic
    with pytest.raises(IndexError):
        dataset[10]
