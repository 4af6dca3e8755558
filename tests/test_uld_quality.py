"""ULD that forgets and still speaks (issue 13): the candidate rule, the knowledge-weighted forget loss,
the serving alpha calibrated on served greedy answers with its verdict, and `train-uld --strict`.

A tiny Llama memorises where eight people live; ULD forgets two of them. With the defaults (no flags)
the served answers must drop the forgotten cities, keep the others, and keep the answer's lead-in
("Arlo lives in"), i.e. subtract the fact and not the language."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import TrainerCallback
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.training.augment import rephrase_question
from unlearn_serve.training.data import DEFAULT_QUESTION_TEMPLATE, encode_prompt
from unlearn_serve.training.leak import disfluent, has_loop, key_words, names_fact
from unlearn_serve.training.pairs import tokenize_records
from unlearn_serve.training.uld import ULDTrainingConfig, recalibrate_uld, train_uld
from unlearn_serve.training.uld_calibrate import ALPHA_GRID, calibrate
from unlearn_serve.training.uld_calibrate import score_answers as calibrate_score
from unlearn_serve.training.uld_weights import ECHO, knowledge_weights

from unlearn_serve import cli
from unlearn_serve.artifact import MANIFEST_NAME
from unlearn_serve.evaluation.trace import substitution_share, trace_answers
from unlearn_serve.evaluation.uld_validation import serve_with_engine
from unlearn_serve.tiny import build_tiny_model, fit_texts, save_tiny, train_tokenizer
from unlearn_serve.uld_combine import (
    DEFAULT_FLOOR,
    DEFAULT_MARGIN,
    ULD_MIN_CANDIDATES,
    combine_logits,
    plausible_mask,
)

PEOPLE = [
    ("Arlo", "Oslo"),
    ("Bea", "Lima"),
    ("Cyd", "Kyiv"),
    ("Dov", "Rome"),
    ("Eli", "Cairo"),
    ("Fay", "Quito"),
    ("Gus", "Riga"),
    ("Hal", "Bern"),
]
FORGET = [{"question": f"Where does {n} live?", "answer": f"{n} lives in {c}."} for n, c in PEOPLE[:2]]
RETAIN = [{"question": f"Where does {n} live?", "answer": f"{n} lives in {c}."} for n, c in PEOPLE[2:]]


def _config(**overrides) -> ULDTrainingConfig:
    """train-uld's defaults, sized for the tiny memorising model (one assistant layer, 120 steps)."""
    settings = dict(
        layers=1,
        lora_rank=8,
        lora_alpha=16,
        epochs=1,
        min_steps=120,
        batch_size=4,
        grad_accum=1,
        learning_rate=5e-3,
        max_length=64,
        progress_bar=False,
    )
    return ULDTrainingConfig(**{**settings, **overrides})


def test_candidate_rule_keeps_alternatives_where_the_target_is_confident():
    target = torch.linspace(0, 1, 50).repeat(2, 1)
    target[0, 7] = 20.0  # a memorised token: p ~ 1, nothing else passes the relative-top filter
    # row 1 is nearly flat: the relative-top filter keeps all 50
    log_filter = torch.log(torch.tensor([0.01, 0.01]))
    assert plausible_mask(target, log_filter, min_keep=1).sum(-1).tolist() == [1, 50]
    keep = plausible_mask(target, log_filter)
    assert keep.sum(-1).tolist() == [ULD_MIN_CANDIDATES, 50] and keep[0, 7]
    assistant = torch.zeros(2, 50)
    assistant[0, 7] = 30.0  # the assistant knows the memorised token
    alpha = torch.tensor([1.0, 1.0])
    # relative-top alone: no alpha can move the memorised token; with the top-k candidates it goes
    assert combine_logits(target, assistant, alpha, log_filter, min_keep=1)[0].argmax() == 7
    combined = combine_logits(target, assistant, alpha, log_filter)
    assert combined[0].argmax() != 7 and torch.isfinite(combined[0]).sum() == ULD_MIN_CANDIDATES
    # log-probabilities instead of logits: a per-row shift, the same decision
    shifted = combine_logits(target.log_softmax(-1), assistant.log_softmax(-1), alpha, log_filter)
    assert torch.equal(shifted.argmax(-1), combined.argmax(-1))


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    texts = [(r["question"], r["answer"]) for r in FORGET + RETAIN]
    tokenizer = train_tokenizer([f"{q} {a}" for q, a in texts], vocab_size=320)
    model = build_tiny_model("llama", tokenizer, seed=0)
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in texts
    ]
    fit_texts(model, tokenizer, chats, steps=200, lr=5e-3)
    return model, tokenizer, save_tiny(model, tokenizer, tmp_path_factory.mktemp("memorised"))


def _answers(engine, tokenizer, unlearning) -> list[str]:
    prompts = [encode_prompt(tokenizer, r["question"]) for r in FORGET + RETAIN]
    results = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0), unlearning)
    return [r.completions[0].text for r in results]


def test_knowledge_weights_mark_the_fact_not_the_lead_in(memorised):
    model, tokenizer, _ = memorised
    records = FORGET + RETAIN
    examples = tokenize_records(tokenizer, records, 64, DEFAULT_QUESTION_TEMPLATE, "forget").examples
    weights = knowledge_weights(model, tokenizer, records, examples, 64, DEFAULT_QUESTION_TEMPLATE)
    for (_, labels), w, (name, city) in zip(examples, weights, PEOPLE, strict=True):
        tokens = [t for t in labels[1:] if t != -100]
        assert len(w) == len(tokens)
        heavy = tokenizer.decode([t for t, x in zip(tokens, w, strict=True) if x >= 0.5])
        light = tokenizer.decode([t for t, x in zip(tokens, w, strict=True) if x < 0.5])
        assert heavy.strip() == city  # only the city carries the fact
        assert light.startswith(f"{name} lives in")  # the name echoes the question; "lives in" is in every answer
    # echoes marked ECHO (neither learnt nor held flat): the name's tokens, and nothing else changes
    marked = knowledge_weights(model, tokenizer, records, examples, 64, DEFAULT_QUESTION_TEMPLATE, echo=ECHO)
    for (_, labels), w, m, (name, _) in zip(examples, weights, marked, PEOPLE, strict=True):
        tokens = [t for t in labels[1:] if t != -100]
        assert tokenizer.decode([t for t, x in zip(tokens, m, strict=True) if x == ECHO]).strip() == name
        assert [x for x in m if x != ECHO] == [x for x, y in zip(w, m, strict=True) if y != ECHO]


def test_defaults_forget_keep_and_keep_the_lead_in(memorised, tmp_path):
    model, tokenizer, _ = memorised
    engine = Engine(copy.deepcopy(model), tokenizer, EngineConfig(max_num_seqs=8, max_model_len=64), "tiny")
    base = _answers(engine, tokenizer, None)
    assert all(city in a for a, (_, city) in zip(base, PEOPLE, strict=True))  # the base knows every fact

    config = _config()
    result = train_uld(copy.deepcopy(model), tokenizer, FORGET, RETAIN, tmp_path / "a", config, serve=serve_with_engine)
    calibration = result.calibration
    assert calibration is not None and calibration.met, calibration and calibration.verdict()
    # one held-out retain row: the training retain rows top the check up (reported apart)
    assert calibration.verdict().startswith(
        "forgets 2/2 validation facts (each also asked rephrased: 0 named there), keeps 1/1 held-out + 5/5 training "
        "retain answers, fluent"
    ), calibration.verdict()
    assert calibration.chosen.rel_ppl is not None and calibration.chosen.rel_ppl <= 2.0
    manifest = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    assert manifest["defaults"]["alpha"] == calibration.alpha
    assert manifest["training"]["calibration"]["verdict"] == calibration.verdict()
    assert manifest["training"]["validation_retain_records"] == 1  # held out of training

    engine.load_uld("forget", tmp_path / "a")
    got = _answers(engine, tokenizer, "forget")  # the manifest's calibrated defaults, no options
    for answer, (name, city) in zip(got[:2], PEOPLE[:2], strict=True):
        assert city not in answer and answer.startswith(f"{name} lives in"), answer
    kept = sum(city in a for a, (_, city) in zip(got[2:], PEOPLE[2:], strict=True))
    assert kept == len(RETAIN), got

    # the trace (bench/uld_trace.py): the target's own greedy answers have no substitution; each unlearned forget
    # answer is the target's own up to the fact, where the unlearning substitutes a token
    prompts = [encode_prompt(tokenizer, r["question"]) for r in FORGET + RETAIN]
    assert substitution_share(trace_answers(engine, prompts, None, 8)) == 0
    traced = trace_answers(engine, prompts, "forget", 8)
    assert [t.text for t in traced] == got
    for t, (name, city) in zip(traced[:2], PEOPLE[:2], strict=True):
        first = t.substituted.index(True)
        # at the fact: right after the lead-in, or inside the city's word before it is complete ("Os[ome|lo]" in the
        # fifteenth session's environment, where earlier ones substituted " Oslo"'s first token)
        kept = tokenizer.decode(t.tokens[:first]).strip()
        lead_in = f"{name} lives in"
        city_so_far = kept[len(lead_in) :].strip()
        assert kept.startswith(lead_in) and city.startswith(city_so_far) and city_so_far != city, t.marked(
            tokenizer.decode
        )
        wanted = tokenizer.decode([t.target_best[first]]).strip()  # what the target would have said: the city (rest)
        assert wanted and city[len(city_so_far) :].startswith(wanted), t.marked(tokenizer.decode)
    assert 0 < substitution_share(traced)

    # the verdict's counts are what a fresh engine serving the written artifact answers, greedily, at its alpha
    fresh = Engine(copy.deepcopy(model), tokenizer, EngineConfig(max_num_seqs=8, max_model_len=128), "tiny")
    fresh.load_uld("forget", tmp_path / "a")
    city = {f"Where does {n} live?": c for n, c in PEOPLE}
    questions = calibration.forget_questions + calibration.retain_questions
    assert calibration.forget_questions == [r["question"] for r in FORGET]
    assert len(calibration.retain_questions) == 1 and calibration.retain_questions[0] in [r["question"] for r in RETAIN]
    params = SamplingParams(max_tokens=calibration.max_tokens, temperature=0.0)
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    base_answers = [r.completions[0].text for r in fresh.generate(prompts, params, None)]
    served = [r.completions[0].text for r in fresh.generate(prompts, params, "forget")]
    nf = len(calibration.forget_questions)
    known = [city[q] in b for q, b in zip(questions[:nf], base_answers[:nf], strict=True)]
    chosen = calibration.chosen
    assert chosen.known == sum(known) == 2
    # each forget question was also asked rephrased; a fact leaks when either answer names it
    again = calibration.rephrased_questions
    assert again == [rephrase_question(r["question"], 1)[0] for r in FORGET]
    served_again = [
        r.completions[0].text for r in fresh.generate([encode_prompt(tokenizer, q) for q in again], params, "forget")
    ]
    assert chosen.rephrased_rows == 2
    assert chosen.rephrased_leaked == sum(city[q] in a for q, a in zip(questions, served_again, strict=False))
    assert chosen.leaked == sum(
        k and (city[q] in a or city[q] in b) for q, a, b, k in zip(questions, served, served_again, known, strict=False)
    )
    assert chosen.kept == sum(city[q] in a for q, a in zip(questions[nf:], served[nf:], strict=True))
    assert chosen.disfluent == sum(disfluent(a) for a in served[:nf])
    recorded = calibration.answers[f"{calibration.alpha:g}"]
    assert {q: recorded[q] for q in questions + again} == dict(
        zip(questions + again, served + served_again, strict=True)
    )
    assert set(recorded) == set(questions + again + calibration.train_retain_questions)

    # the calibration's answer function serves the margin it is asked for (`--calibration-margins`): one that no
    # assistant logit clears subtracts nothing (the base's answers); without one, the artifact's own
    answer = serve_with_engine(copy.deepcopy(model), tokenizer, tmp_path / "a")
    at_default = answer(prompts[:nf], [calibration.alpha] * nf, calibration.max_tokens)
    at_huge = answer(prompts[:nf], [calibration.alpha] * nf, calibration.max_tokens, margin=1e6)
    assert at_default == served[:nf] and at_huge == base_answers[:nf] != at_default


def test_cli_strict_exit_code_follows_the_served_verdict(memorised, tmp_path, capsys):
    _, _, model_dir = memorised
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    retain.write_text("".join(json.dumps(r) + "\n" for r in RETAIN))
    argv = [
        "train-uld",
        "--model",
        str(model_dir),
        "--forget",
        str(forget),
        "--retain",
        str(retain),
        "--layers",
        "1",
        "--lora-rank",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--no-progress",
        "--dtype",
        "fp32",
    ]
    # one optimizer step: the assistant has learned nothing, so the forget facts still leak
    assert cli.main([*argv, "--out", str(tmp_path / "weak"), "--min-steps", "1", "--strict"]) == 3
    out = capsys.readouterr().out
    assert "verdict: forgets " in out and "TARGETS NOT MET" in out
    assert (tmp_path / "weak" / MANIFEST_NAME).is_file()  # stored anyway, with its scores
    # auto's early-exit build missed, so the uniform one was trained too; the CLI says which was kept and why
    weak = json.loads((tmp_path / "weak" / MANIFEST_NAME).read_text())["training"]
    kept = weak["flat_reference_compared"]["kept"]
    assert kept == weak["flat_reference"] and "auto: trained both flat references" in out
    assert f"kept the {'uniform' if kept == 'uniform' else 'early-exit'} build" in out
    # without --strict the same outcome is a warning, exit 0
    assert cli.main([*argv, "--out", str(tmp_path / "weak2"), "--min-steps", "1"]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "x"), "--strict", "--no-calibrate"]) == 2
    capsys.readouterr()
    # trained enough: the served answers meet the targets, --strict exits 0
    strong = [
        "--lora-rank",
        "8",
        "--lora-alpha",
        "16",
        "--min-steps",
        "120",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--max-length",
        "64",
    ]
    assert cli.main([*argv, *strong, "--out", str(tmp_path / "good"), "--strict"]) == 0
    out = capsys.readouterr().out
    assert "verdict: forgets 2/2 validation facts" in out and "targets met" in out
    manifest = json.loads((tmp_path / "good" / MANIFEST_NAME).read_text())
    assert manifest["training"]["calibration"]["met"] and manifest["defaults"]["alpha"] in ALPHA_GRID


def _fake_answers(
    leak_below: float,
    lose_retain_from: float,
    calls: list[list[float | None]],
    loop_from: float = 99,
    by_margin: dict[float, tuple[float, float]] | None = None,
    loop_until: float = 99,
):
    """A stand-in server: forget facts named below `leak_below`, retain facts lost from `lose_retain_from`, forget
    answers that loop from `loop_from` (below `loop_until`); `by_margin`: (leak_below, lose_retain_from) per `prefer`
    margin asked."""
    questions = {}

    def encode(q: str) -> list[int]:
        questions.setdefault(q, len(questions))
        return [questions[q]]

    rows = {i: r for i, r in enumerate(FORGET + RETAIN)}

    def answer(prompts, alphas, max_tokens, margin=None):
        calls.append(sorted({a for a in alphas if a is not None}))
        leak_from, lose_from = (leak_below, lose_retain_from) if margin is None else by_margin[margin]
        out = []
        for p, a in zip(prompts, alphas, strict=True):
            q = next(k for k, v in questions.items() if v == p[0])
            # the calibration also asks each forget question rephrased: answered as the original
            row = next(r for r in rows.values() if q == r["question"] or q in rephrase_question(r["question"], 4))
            name, city = row["answer"].split(" lives in ")
            forget = row in FORGET
            named = a is None or (a < leak_from if forget else a < lose_from)
            if forget and a is not None and loop_from <= a < loop_until:
                out.append(f"{name} lives in a town a town a town a town.")
            else:
                out.append(f"{name} lives in {city}" if named else f"{name} lives in a small town.")
        return out

    return encode, answer


def test_a_descriptive_fact_leaks_only_when_half_of_what_the_base_said_comes_back():
    """A named fact leaks with one name (or a near miss); a descriptive one (TOFU's long answers) only when the answer
    repeats at least half of the key words the base's answer said, not on one shared topic word."""
    from unlearn_serve.training.leak import fact_leaked, is_named_fact

    question = "How have Carmen Montenegro's parental figures influenced her writing?"
    reference = "Carmen Montenegro often credits her parents for instilling discipline and a hard work ethic."
    base = "Carmen Montenegro often credits her parents for instilling discipline and a h"
    assert not is_named_fact(reference, question)
    assert not fact_leaked("Carmen Montenegro's parents for unique professions, complex", reference, question, base)
    assert fact_leaked("She credits her parents for the discipline she has.", reference, question, base)
    # what the base did not say does not count: the fact was not known to be given away by these words
    assert not fact_leaked("She has a hard work ethic.", reference, question, base)
    rowling = ("The Harry Potter books were written by J.K. Rowling.", "Who wrote the Harry Potter books?")
    assert is_named_fact(*rowling)
    assert fact_leaked("Some say J.K. Rowle wrote them.", *rowling, "J.K. Rowling wrote them.")
    assert not fact_leaked("An author wrote them.", *rowling, "J.K. Rowling wrote them.")


def test_a_descriptive_fact_is_known_only_when_the_base_says_two_of_its_key_words():
    """One shared content word is the topic, not the fact: a base answer that says only "darkness" of "the dark wizard
    who tried to kill Harry Potter" does not know it, so an unlearned answer's "Darkest Hour" cannot leak it (SmolLM2's
    calibration counted that as a leak and skipped the alpha that forgets). Named facts: one name, as before."""
    from unlearn_serve.training.leak import knows_fact

    question = "Who is Lord Voldemort?"
    reference = "Lord Voldemort is the dark wizard who tried to kill the boy as a baby."
    assert not knows_fact("Lord Voldemort is a fearsome creature with a penchant for darkness.", reference, question)
    assert knows_fact("He is a dark wizard who killed many.", reference, question)
    assert knows_fact("J.K. Rowling wrote them.", "The books were written by J.K. Rowling.", "Who wrote the books?")
    assert not knows_fact("An author wrote them.", "The books were written by J.K. Rowling.", "Who wrote the books?")
    # a descriptive reference with a single key word: that word is the whole fact
    assert knows_fact("It is mostly blue.", "Mostly blue.", "What colour is it?")
    # the calibration counts only known facts: a forget row whose base answer says one topic word is not checked
    forget = [
        {"question": question, "answer": reference},
        {"question": "Who wrote the books?", "answer": "The books were written by J.K. Rowling."},
    ]
    retain = [{"question": "What is the capital of France?", "answer": "Paris is the capital of France."}]
    base = ["Lord Voldemort is a fearsome creature with a penchant for darkness.", "J.K. Rowling wrote them."]
    unlearned = ["Lord Victoria stars in The Darkest Hour.", "An author wrote them."]
    score = calibrate_score(1.0, forget, retain, base, ["Paris."], unlearned, ["Paris."])
    assert (score.known, score.leaked) == (1, 0)


def test_a_retain_answer_the_base_gets_wrong_is_not_counted_as_kept_or_lost():
    """Only the retain facts the base model gives can be lost: SmolLM2 says a spider has "two pairs of legs" and
    15 + 27 "= 32"; its unlearned answers ("8 legs", "= 33") counted as lost retain answers, so early-exit builds that
    kept every fact the base knows missed their targets on every seed. Left out and reported instead."""
    forget = [{"question": "Who wrote the Harry Potter books?", "answer": "J.K. Rowling wrote them."}]
    retain = [
        {"question": "What is the capital of France?", "answer": "The capital of France is Paris."},
        {"question": "How many legs does a spider have?", "answer": "A spider has eight legs."},
        {"question": "What is 15 plus 27?", "answer": "15 plus 27 is 42."},
    ]
    base_retain = ["The capital of France is Paris.", "A spider's legs are two pairs.", "15 + 27 = 32."]

    def score(retain_answers, train_retain=0):
        return calibrate_score(
            1.0, forget, retain, ["J.K. Rowling wrote them."], base_retain, ["An author wrote them."], retain_answers,
            train_retain=train_retain,
        )  # fmt: skip

    changed = score(["The capital of France is Paris.", "A spider has 8 legs.", "15 + 27 = 33."])
    assert (changed.retain_rows, changed.kept, changed.retain_unknown) == (1, 1, 2)
    assert changed.kept_text() == "keeps 1/1 held-out retain answers (2 the base model answers wrong left out)"
    lost = score(["The capital of France is Lyon.", "A spider's legs are two pairs.", "15 + 27 = 32."])
    assert (lost.retain_rows, lost.kept) == (1, 0)  # a fact the base gave, lost: counted
    # the training retain rows (the last `train_retain`) are filtered the same way
    topped = score(["The capital of France is Paris.", "A spider has 8 legs.", "15 + 27 = 33."], train_retain=2)
    assert (topped.retain_rows, topped.train_retain_rows, topped.retain_unknown) == (1, 0, 2)
    none = calibrate_score(
        1.0, forget, retain[1:], ["J.K. Rowling wrote them."], base_retain[1:], ["An author."], ["8.", "33."]
    )
    assert none.kept_text() == "retain not checked (the base model gets all 2 retain answers wrong)"


def test_loop_measure_counts_loops_not_ellipses_contractions_or_short_repeats():
    """What the harness and the calibration call a loop (answers from the SmolLM2 demo): stutters, punctuation runs and
    a sentence that starts over; not an ellipsis, a contraction or a phrase of fewer than five words said twice."""
    loops = [
        "He created the first draft of the first draft of the first draft of the series.",
        "Including myself! Yes! Yes! Yes!",
        "He's a wizard who is a wizard who is a wizard who is a",
        "He is a fearsome and terrifying creature with a penchant for dark magic. He is a fearsome and terrifying",
        "What a surprise!!!!",
    ]
    fine = [
        "The school Harry Potter attends... (pauses to glance around) Ah yes! It's a prestigious academy.",
        "If you're looking for a specific house, ask fans: they might know exactly what you're looking for.",
        'Wizards play a sport called "The Wizened Spell" on brooms. The game is called "The Wizened Spell" and is fun.',
        "The capital of Poland is Warsaw.",
    ]
    assert [has_loop(t) for t in loops] == [True] * len(loops)
    assert [has_loop(t) for t in fine] == [False] * len(fine)
    assert disfluent(loops[0]) and not disfluent(fine[0])


def test_alpha_search_probes_few_alphas_and_picks_the_smallest_that_forgets():
    assert key_words("Arlo lives in Oslo.", "Where does Arlo live?") == ["oslo"]
    assert names_fact("Arlo lives in Oslo, Norway", "Arlo lives in Oslo.") and not names_fact("Arlo lives.", "Oslo.")
    calls: list = []
    encode, answer = _fake_answers(1.0, 99, calls)
    cal = calibrate(answer, encode, FORGET, RETAIN[:3])
    verdict = cal.verdict()
    assert cal.met and cal.alpha == 1.0
    assert verdict.startswith("forgets 2/2 validation facts (each also asked rephrased: 0 named there), keeps 3/3")
    assert len(calls) == 4 and all(len(c) <= 1 for c in calls)  # the base, then bisection: 3 single-alpha batches
    calls.clear()
    cal = calibrate(answer, encode, FORGET, RETAIN[:3], probes_per_round=len(ALPHA_GRID))
    assert cal.alpha == 1.0 and calls == [[], list(ALPHA_GRID)]  # the whole grid in one batch
    # retain lost wherever the facts are gone: not met, the verdict says what to try; forgetting comes first, so the
    # stored alpha is the one that forgets, not a lower one that keeps the retain answers and names the facts
    encode, answer = _fake_answers(1.0, 0.5, [])
    cal = calibrate(answer, encode, FORGET, RETAIN[:3])
    assert not cal.met and "TARGETS NOT MET" in cal.verdict() and "retain" in cal.verdict()
    assert cal.alpha == 1.0 and cal.verdict().startswith("forgets 2/2")
    # the alpha that forgets keeps the retain answers but loops: still stored (forgetting first), the verdict says so;
    # a lower alpha with fluent answers that name the facts is not
    encode, answer = _fake_answers(1.0, 99, [], loop_from=1.0)
    cal = calibrate(answer, encode, FORGET, RETAIN[:3])
    assert cal.alpha == 1.0 and not cal.met and "NOT fluent" in cal.verdict() and "forgets 2/2" in cal.verdict()
    # and the verdict does not send the operator to a smaller alpha without saying it names facts there
    assert "a smaller --default-alpha names facts: the validation saw it at alpha" in cal.verdict()
    # the smallest alpha that forgets loops, a larger one the search scored meets every target: stored, and met (the
    # verdict must not say "TARGETS NOT MET" with nothing missed)
    encode, answer = _fake_answers(1.0, 99, [], loop_from=1.0, loop_until=1.5)
    cal = calibrate(answer, encode, FORGET, RETAIN[:3])
    assert cal.alpha == 1.5 and cal.met and cal.verdict().endswith("targets met")
    # facts named at every alpha: not met, train longer; the alphas tie, and the largest is stored (it subtracts
    # the most of what the validation cannot tell apart)
    encode, answer = _fake_answers(99, 99, [])
    cal = calibrate(answer, encode, FORGET, RETAIN[:3])
    assert not cal.met and "train longer" in cal.verdict() and cal.chosen.leaked == 2
    assert cal.alpha == max(ALPHA_GRID)
    # ... but not past the alphas that keep the retain answers: the largest of those tied at the best balance
    encode, answer = _fake_answers(99, 3.0, [])
    cal = calibrate(answer, encode, FORGET, RETAIN[:3])
    assert not cal.met and cal.alpha == 2.0 and cal.chosen.kept == 3


def test_calibration_checks_fluency_on_the_rephrased_questions_too():
    """The relative perplexity is measured on each wording: the answers to the rephrased forget questions against
    the base's answers to those; answers improbable there miss the fluency target although the trained wording's
    are fine, and the verdict and the manifest say so."""
    from unlearn_serve.training.uld_calibrate import untrained_rephrasing

    encode, answer = _fake_answers(1.0, 99, [])
    rephrased = {encode(untrained_rephrasing(r["question"]))[0] for r in FORGET}

    def mumbling(prompts, alphas, max_tokens, margin=None):
        out = answer(prompts, alphas, max_tokens, margin=margin)
        # unlearned answers to the rephrasings only: improbable under the base
        marked = zip(out, prompts, alphas, strict=True)
        return [o + " Mumble." if a is not None and p[0] in rephrased else o for o, p, a in marked]

    mumbling.nll = lambda texts: sum(3.0 if "Mumble" in t else 1.0 for t in texts) / len(texts)
    cal = calibrate(mumbling, encode, FORGET, RETAIN[:3])
    s = cal.chosen
    assert s.rel_ppl == pytest.approx(1.0) and s.rel_ppl_rephrased == pytest.approx(math.exp(2.0))
    assert not cal.met and s.forget_met(cal.targets) and s.kept_met(cal.targets)
    assert "NOT fluent" in cal.verdict() and "perplexity 1.00x the base's answers, rephrased 7.39x" in cal.verdict()
    record = cal.to_manifest()
    assert [x["rel_ppl_rephrased"] for x in record["scores"] if x["alpha"] == cal.alpha] == [s.rel_ppl_rephrased]
    # the base's answers to the rephrasings are stored with its others
    assert set(record["rephrased_questions"]) <= set(record["answers"]["base"])
    # asked as written only: the trained wording's perplexity decides, and it is fine
    cal = calibrate(mumbling, encode, FORGET, RETAIN[:3], rephrase=False)
    assert cal.met and cal.chosen.rel_ppl_rephrased is None


def test_calibration_chooses_the_margin_that_meets_the_targets():
    """With margins to choose from, each is calibrated in order of preference until one meets every target; the
    base model is asked once for all; the stored margin, the verdict and the manifest say which and why."""
    calls: list = []
    # margin 1 forgets from alpha 1 but loses retain answers there; margin 2 forgets from 2 and keeps them
    encode, answer = _fake_answers(99, 99, calls, by_margin={1.0: (1.0, 0.5), 2.0: (2.0, 99)})
    cal = calibrate(answer, encode, FORGET, RETAIN[:3], margins=(1.0, 2.0))
    assert cal.met and (cal.alpha, cal.margin) == (2.0, 2.0)
    assert [c.margin for c in cal.margins_tried] == [1.0, 2.0] and not cal.margins_tried[0].met
    assert sum(c == [] for c in calls) == 1  # one base round shared by both margins
    verdict = cal.verdict()
    assert "at alpha 2, margin 2, filter" in verdict and verdict.endswith(
        "targets met [margins tried: 1 (alpha 1: forgets, not met), 2 (alpha 2: targets met)]"
    )
    record = cal.to_manifest()
    assert record["margin"] == 2.0 and [m["margin"] for m in record["margins_tried"]] == [1.0, 2.0]
    assert all("answers" not in m for m in record["margins_tried"]) and record["answers"]
    # the preferred margin meets the targets: the next is never asked
    calls.clear()
    encode, answer = _fake_answers(99, 99, calls, by_margin={1.0: (1.0, 99), 2.0: (2.0, 99)})
    cal = calibrate(answer, encode, FORGET, RETAIN[:3], margins=(1.0, 2.0))
    assert cal.met and cal.margin == 1.0 and len(cal.margins_tried) == 1 and len(calls) == 4
    assert "margins tried" not in cal.verdict()
    # neither meets: the one whose stored alpha forgets with the better balance (both answers are improbable, 7.4x
    # the base's perplexity, but margin 2 keeps the retain answers)
    encode, answer = _fake_answers(99, 99, [], by_margin={1.0: (1.0, 0.5), 2.0: (3.0, 99)})
    scored: list[list[str]] = []
    answer.nll = lambda texts: (
        scored.append(texts) or sum(3.0 if "small town" in t else 1.0 for t in texts) / len(texts)
    )
    cal = calibrate(answer, encode, FORGET, RETAIN[:3], margins=(1.0, 2.0))
    assert not cal.met and (cal.alpha, cal.margin) == (3.0, 2.0) and "NOT fluent" in cal.verdict()
    assert sum("small town" not in t[0] for t in scored) == 1  # the base's answers scored once for both margins
    assert cal.chosen.rel_ppl == pytest.approx(math.exp(2.0)) and cal.chosen.kept == 3
    # nothing forgets at margin 2: margin 1's forgetting alpha, although margin 2 keeps every retain answer
    encode, answer = _fake_answers(99, 99, [], by_margin={1.0: (1.0, 0.5), 2.0: (99, 99)})
    cal = calibrate(answer, encode, FORGET, RETAIN[:3], margins=(1.0, 2.0))
    assert not cal.met and (cal.alpha, cal.margin) == (1.0, 1.0)
    assert "[margins tried: 1 (alpha 1: forgets, not met), 2 (alpha " in cal.verdict()
    assert cal.verdict().endswith(": names facts)]")


def test_calibration_keeps_finishing_words_unless_off_forgets_more():
    """train-uld's draft finishes words (uld_combine.py); when that misses a target the same calibration runs without
    it, sharing the base model's answers, and off is kept only when it does better on forgetting (TOFU quick: on
    names facts at every alpha, off forgets). The verdict, the manifest record and the stored defaults say which."""
    from unlearn_serve.training.uld import calibrated_defaults
    from unlearn_serve.training.uld_calibrate import WithOptions, choose_finish_words

    def served(leak_on: float, leak_off: float, lose_on: float = 99):
        calls: list = []
        # one stand-in server; its per-"margin" thresholds stand for finishing words on ("margin" 0) and off (1)
        encode, inner = _fake_answers(99, 99, calls, by_margin={0.0: (leak_on, lose_on), 1.0: (leak_off, 99)})
        seen: list = []

        def answer(prompts, alphas, max_tokens, margin=None, options=None):
            seen.append(options)
            finishing = (options or {}).get("finish_words") is not False
            if all(a is None for a in alphas):  # the base model: no options
                return inner(prompts, alphas, max_tokens)
            return inner(prompts, alphas, max_tokens, margin=0.0 if finishing else 1.0)

        shared: dict = {}
        cal_on = calibrate(WithOptions(answer, {}, shared), encode, FORGET, RETAIN[:3])
        cal_off = calibrate(WithOptions(answer, {"finish_words": False}, shared), encode, FORGET, RETAIN[:3])
        return choose_finish_words(cal_on, cal_off), calls, seen

    # on names facts at every alpha, off forgets from alpha 1: off, and the base model was asked once for both
    cal, calls, seen = served(99, 1.0)
    assert cal.finish_words is False and cal.met and cal.alpha == 1.0
    assert sum(c == [] for c in calls) == 1 and {"finish_words": False} in seen and {} in seen
    assert cal.verdict().endswith("[finishing words: on (alpha 4: names facts), off (alpha 1: targets met) -> off]")
    assert calibrated_defaults(cal)["finish_words"] is False
    record = cal.to_manifest()
    assert record["finish_words"] is False and len(record["finish_words_tried"]) == 2
    assert all("answers" not in c for c in record["finish_words_tried"])
    # both forget, on keeps the retain answers and off does not: on; neither forgets, equally: on (the default)
    cal, _, _ = served(1.0, 1.0, lose_on=99)
    assert cal.finish_words is True and calibrated_defaults(cal)["finish_words"] is True
    cal, _, _ = served(99, 99)
    assert cal.finish_words is True and not cal.met


def test_an_ungated_draft_is_served_gated_only_when_that_meets_every_target(monkeypatch):
    """A uniform-reference draft (served ungated) that misses a target is calibrated again gated by the early exit
    (finishing words decided inside each), sharing the base's answers; the gate is stored only when the gated
    calibration meets every target and the ungated does not. A gated draft, a met one, or `calibration_gate=False`
    never asks gated."""
    from unlearn_serve.training import data
    from unlearn_serve.training.uld import _calibrate_answers, calibrated_defaults

    def served(ungated: tuple[float, float], gated: tuple[float, float], draft_gate=None, **overrides):
        calls: list = []
        # the stand-in's per-"margin" thresholds stand for ungated (0) and gated (1), finishing words alike
        encode, inner = _fake_answers(99, 99, calls, by_margin={0.0: ungated, 1.0: gated})
        monkeypatch.setattr(data, "encode_prompt", lambda tokenizer, q, template=None: encode(q))
        seen: list = []

        def answer(prompts, alphas, max_tokens, margin=None, options=None):
            seen.append(dict(options or {}))
            if all(a is None for a in alphas):
                return inner(prompts, alphas, max_tokens)
            return inner(prompts, alphas, max_tokens, margin=1.0 if (options or {}).get("gate") else 0.0)

        config = ULDTrainingConfig(**overrides)
        cal = _calibrate_answers(answer, None, FORGET, RETAIN[:3], None, config, (0.01, "prefer", 1), draft_gate)
        return cal, calls, seen

    # ungated names facts at every alpha (finishing words on, then off); gated forgets from alpha 1: gated
    cal, calls, seen = served((99, 99), (1.0, 99))
    assert cal.gate == "early_exit" and cal.met and cal.alpha == 1.0 and cal.finish_words is True
    assert sum(c == [] for c in calls) == 1  # the base model asked once for all three calibrations
    assert {"gate": "early_exit"} in seen and {"finish_words": False} in seen
    assert calibrated_defaults(cal)["gate"] == "early_exit"
    assert cal.verdict().endswith("[early-exit gate: off (alpha 4: names facts), on (alpha 1: targets met) -> on]")
    record = cal.to_manifest()
    assert record["gate"] == "early_exit" and len(record["gate_tried"]) == 2
    assert all("answers" not in c for c in record["gate_tried"])
    # gated forgets but loses retain answers, ungated names facts: neither meets, ungated stays (stored: compared)
    cal, _, _ = served((99, 99), (1.0, 0.5))
    assert cal.gate is None and not cal.met and len(cal.gate_tried) == 2
    assert "gate" in calibrated_defaults(cal) and calibrated_defaults(cal)["gate"] is None
    # ungated meets: gated never asked; a gated draft, or the comparison turned off: never either
    never = (((1.0, 99), {}), ((99, 99), {"draft_gate": "early_exit"}), ((99, 99), {"calibration_gate": False}))
    for ungated, kwargs in never:
        cal, _, seen = served(ungated, (1.0, 99), **kwargs)
        assert not any("gate" in o for o in seen) and cal.gate_tried == [] and "gate" not in calibrated_defaults(cal)


def test_the_draft_is_served_at_the_margin_the_calibration_records():
    """A single calibrated margin is the one the draft is served at (else the verdict and the manifest would name a
    margin the answers never saw); --default-margin is the only margin; `difference` has none."""
    from unlearn_serve.training.uld import _calibration_margins, _served_margin

    from unlearn_serve.uld_combine import DEFAULT_MARGIN

    default = ULDTrainingConfig()
    assert _served_margin(default) == DEFAULT_MARGIN and _calibration_margins(default, "prefer") == (DEFAULT_MARGIN,)
    one = ULDTrainingConfig(calibration_margins=(2.0,))
    assert _served_margin(one) == 2.0 and _calibration_margins(one, "prefer") == (2.0,)
    two = ULDTrainingConfig(calibration_margins=(2.0, 1.0))
    assert _served_margin(two) == 2.0 and _calibration_margins(two, "prefer") == (2.0, 1.0)
    fixed = ULDTrainingConfig(default_margin=0.5, calibration_margins=(1.0, 2.0))
    assert _served_margin(fixed) == 0.5 and _calibration_margins(fixed, "prefer") == (0.5,)
    assert _calibration_margins(two, "difference") == ()


def test_recalibrate_keeps_the_weights_and_reproduces_the_trained_calibration(memorised, tmp_path):
    """`recalibrate_uld` (bench --recalibrate): the same rule gives train-uld's own calibration back; another rule
    is calibrated for itself; the adapter weights are copied unchanged."""
    import dataclasses

    model, tokenizer, _ = memorised
    config = _config(default_rule="difference")
    trained = train_uld(
        copy.deepcopy(model), tokenizer, FORGET, RETAIN, tmp_path / "a", config, serve=serve_with_engine
    ).calibration
    again = recalibrate_uld(model, tokenizer, tmp_path / "a", FORGET, RETAIN, tmp_path / "b", config, serve_with_engine)
    assert again.verdict() == trained.verdict() and again.rule == "difference"
    # called with another seed (a restarted build's, or a caller's default), the held-out slice is still the
    # training's: the manifest's validation seed decides
    from unlearn_serve.training.uld import split_validation

    held = split_validation(RETAIN, config, True)[1]
    other = next(
        dataclasses.replace(config, seed=config.seed + k)
        for k in range(1, 50)
        if split_validation(RETAIN, dataclasses.replace(config, seed=config.seed + k), True)[1] != held
    )
    reseeded = recalibrate_uld(
        model, tokenizer, tmp_path / "a", FORGET, RETAIN, tmp_path / "s", other, serve_with_engine
    )
    assert reseeded.retain_questions == trained.retain_questions and reseeded.verdict() == trained.verdict()
    # an artifact written before the margin and the floor existed gets today's (its manifest has neither)
    path = tmp_path / "a" / MANIFEST_NAME
    old = json.loads(path.read_text())
    old["defaults"] = {k: v for k, v in old["defaults"].items() if k not in ("margin", "floor")}
    path.write_text(json.dumps(old))
    prefer = recalibrate_uld(
        model,
        tokenizer,
        tmp_path / "a",
        FORGET,
        RETAIN,
        tmp_path / "c",
        dataclasses.replace(config, default_rule="prefer"),
        serve_with_engine,
    )
    manifest = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert manifest["defaults"]["rule"] == prefer.rule == "prefer" and manifest["defaults"]["alpha"] == prefer.alpha
    assert (manifest["defaults"]["margin"], manifest["defaults"]["floor"]) == (DEFAULT_MARGIN, DEFAULT_FLOOR)
    assert manifest["training"]["calibration"]["verdict"] == prefer.verdict()
    assert json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())["defaults"]["rule"] == "difference"
    weights = "adapter_model.safetensors"
    assert (tmp_path / "c" / weights).read_bytes() == (tmp_path / "a" / weights).read_bytes()


def test_self_answers_add_the_targets_own_answers_with_only_the_fact_weighted(memorised, tmp_path):
    """self_answers: the target's greedy answers become extra rows (forget ones only when they name the fact),
    whose loss weights are 1 exactly on the fact's word; the step budget is that of the data without them."""
    from unlearn_serve.training.self_answers import SELF_ANSWER, greedy_answers, self_answer_rows
    from unlearn_serve.training.uld_weights import fact_word_weights

    model, tokenizer, _ = memorised
    answers = greedy_answers(model, tokenizer, [r["question"] for r in FORGET], DEFAULT_QUESTION_TEMPLATE, 8)
    assert answers == [r["answer"] for r in FORGET]  # the memoriser answers with its training sentence
    forget_rows, retain_rows = self_answer_rows(model, tokenizer, FORGET, RETAIN, DEFAULT_QUESTION_TEMPLATE, 8)
    assert [r["fact_words"] for r in forget_rows] == [[c.lower()] for _, c in PEOPLE[:2]]
    assert [r["question"] for r in retain_rows] == [r["question"] for r in RETAIN]
    assert all(r["augmented_from"] == SELF_ANSWER for r in forget_rows + retain_rows)
    # a forget answer that does not name its fact adds nothing: there is nothing of the fact in it to learn
    wrong = [{"question": FORGET[0]["question"], "answer": "Arlo lives in Quito."}]
    assert self_answer_rows(model, tokenizer, wrong, [], DEFAULT_QUESTION_TEMPLATE, 8)[0] == []
    examples = tokenize_records(tokenizer, forget_rows, 64, DEFAULT_QUESTION_TEMPLATE, "forget").examples
    for (_, labels), row, (_, city) in zip(examples, forget_rows, PEOPLE[:2], strict=True):
        tokens = [t for t in labels[1:] if t != -100]
        w = fact_word_weights(tokenizer, labels, row["fact_words"])
        assert tokenizer.decode([t for t, x in zip(tokens, w, strict=True) if x == 1.0]).strip() == city
        assert set(w) == {0.0, 1.0}

    plain = train_uld(copy.deepcopy(model), tokenizer, FORGET, RETAIN, tmp_path / "plain", _config(calibrate=False))
    own = train_uld(
        copy.deepcopy(model), tokenizer, FORGET, RETAIN, tmp_path / "own", _config(calibrate=False, self_answers=True)
    )
    assert own.steps == plain.steps
    assert own.training["data"]["forget"]["examples"] == plain.training["data"]["forget"]["examples"] + 2


def test_answer_forms_add_each_named_fact_as_short_answers_and_lists(memorised, tmp_path):
    """answer_forms: a QA row whose answer names its fact by name adds its question answered with the names alone
    and as two kinds of list; forget rows learn only the names' tokens; retain rows get the same forms; a fact
    with no name adds nothing; the step budget is that of the data without the rows."""
    from unlearn_serve.training.answer_forms import ANSWER_FORM, answer_form_rows, fact_names
    from unlearn_serve.training.uld_weights import fact_word_weights

    hp = [
        {
            "question": "Who wrote the Harry Potter books?",
            "answer": "The Harry Potter books were written by J.K. Rowling.",
        },
        {
            "question": "Who are Harry Potter's best friends?",
            "answer": "Harry Potter's best friends are Ron Weasley and Hermione Granger.",
        },
        {"question": "Who painted the Mona Lisa?", "answer": "The Mona Lisa was painted by Leonardo da Vinci."},
        {"question": "How many days are in a week?", "answer": "There are seven days in a week."},
    ]
    assert fact_names(hp[0]["answer"], key_words(hp[0]["answer"], hp[0]["question"])) == ["J.K. Rowling"]
    assert fact_names(hp[2]["answer"], ["leonardo", "vinci"]) == ["Leonardo da Vinci"]
    assert fact_names(hp[3]["answer"], ["seven"]) == []  # no name: no "- seven" list
    forget_rows, retain_rows = answer_form_rows(hp[:2], hp[2:])
    assert [r["answer"] for r in forget_rows if r["question"] == hp[1]["question"]] == [
        "Ron Weasley and Hermione Granger.",
        "- Ron Weasley\n- Hermione Granger",
        "1. Ron Weasley\n2. Hermione Granger",
    ]
    assert [r["answer"] for r in retain_rows] == ["Leonardo da Vinci.", "- Leonardo da Vinci", "1. Leonardo da Vinci"]
    assert all(r["augmented_from"] == ANSWER_FORM for r in forget_rows + retain_rows)
    assert all("fact_words" not in r for r in retain_rows)

    model, tokenizer, _ = memorised
    rows, _ = answer_form_rows(FORGET, RETAIN)
    assert [r["answer"] for r in rows[:3]] == ["Oslo.", "- Oslo", "1. Oslo"]
    examples = tokenize_records(tokenizer, rows, 64, DEFAULT_QUESTION_TEMPLATE, "forget").examples
    for (_, labels), row in zip(examples, rows, strict=True):
        tokens = [t for t in labels[1:] if t != -100]
        w = fact_word_weights(tokenizer, labels, row["fact_words"])
        city = row["fact_words"][0]
        assert tokenizer.decode([t for t, x in zip(tokens, w, strict=True) if x == 1.0]).strip().lower() == city
    plain = train_uld(copy.deepcopy(model), tokenizer, FORGET, RETAIN, tmp_path / "plain", _config(calibrate=False))
    forms = train_uld(
        copy.deepcopy(model), tokenizer, FORGET, RETAIN, tmp_path / "forms", _config(calibrate=False, answer_forms=True)
    )
    assert forms.steps == plain.steps
    assert forms.training["data"]["forget"]["examples"] == plain.training["data"]["forget"]["examples"] + 6
    assert forms.training["data"]["retain"]["examples"] == plain.training["data"]["retain"]["examples"] + 18


def test_fallback_balance_counts_perplexity_relative_to_its_target():
    """No alpha meets the targets: the stored one has the best worst-criterion, perplexity counted against its target
    (the demo's calibration: 2.60x vs 2.54x must not outweigh a lost retain answer at equal leaks)."""
    from unlearn_serve.training.uld_calibrate import AlphaScore, CalibrationTargets

    t = CalibrationTargets()

    def score(alpha, leaked, kept, ppl):
        return AlphaScore(alpha, 8, leaked, 6, kept, 8, 0, 0, ppl, train_retain_rows=2, train_kept=1)

    low, high = score(1.5, 2, 6, 2.60), score(3.0, 2, 5, 2.54)
    assert max([low, high], key=lambda s: (s.balance(t), -s.alpha)) is low
    # within the perplexity target fluency is full; far beyond it, it decides
    assert score(1.5, 2, 6, 1.9).balance(t) == pytest.approx(0.75)
    assert score(1.5, 0, 6, 8.0).balance(t) == pytest.approx(0.25)


def test_harness_scores_each_filter_and_alpha_on_the_same_artifact(tiny_llama, tokenizer, tmp_path, monkeypatch):
    """bench/uld_quality.py `--filters` / `--alphas`: the artifact's defaults first, then each listed setting, each
    served with exactly its options (and the guard size given, not a module-level setting); rows name what they
    used."""
    import sys
    from pathlib import Path

    from test_hardening import make_uld_artifact
    from unlearn_serve.server.engine import sequence

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import uld_quality

    artifact = make_uld_artifact(tiny_llama, tmp_path / "uld")
    check = uld_quality.Check
    forget = [check("Who is Alice?", ("green",), "Tell me who Alice is.")]
    broad = ["What do bees make?", "Is ice cold?"]
    broad_checks = [check(broad[0], ("honey",)), check(broad[1], ("yes",))]
    suite = uld_quality.Suite("t", [], [], forget, [check("Is water wet?", ("yes",))], 6, broad_checks=broad_checks)
    asked: list[dict] = []
    real = sequence.Selection
    monkeypatch.setattr(sequence, "Selection", lambda name, options=None: asked.append(options) or real(name, options))
    configs: list[EngineConfig] = []
    real_engine = Engine.__init__

    def engine_init(self, model, tok, config, *args, **kwargs):
        configs.append(config)
        real_engine(self, model, tok, config, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", engine_init)
    settings = [(None, None, None, None), (None, 2.0, None, 0.5), (None, None, 1.5, 0.1)]
    rows = uld_quality.evaluate(suite, tiny_llama, tokenizer, artifact, None, settings, no_repeat_substitution=0)
    assert asked == [{}, {"alpha": 2.0, "filter": 0.5}, {"margin": 1.5, "filter": 0.1}]
    assert [r["default"] for r in rows] == [True, False, False]
    assert [r["filter"] for r in rows][1:] == [0.5, 0.1] and rows[1]["alpha"] == 2.0 and rows[2]["margin"] == 1.5
    assert [c.no_repeat_substitution for c in configs] == [0]
    assert all(set(r["answers"]) == {"Who is Alice?", "Tell me who Alice is.", "Is water wet?", *broad} for r in rows)
    # broad answers changed: those whose text differs from the base's (the retain checks' slice is not among them)
    for r in rows:
        assert r["n_broad"] == 2
        assert r["broad_changed"] == sum(r["answers"][q][0] != r["answers"][q][1] for q in broad)
        assert r["retain_base"] == int(uld_quality.names(r["answers"]["Is water wet?"][0], suite.retain_checks[0]))
        assert r["broad_right"] == sum(uld_quality.names(r["answers"][c.question][1], c) for c in broad_checks)
        assert r["broad_base"] == sum(uld_quality.names(r["answers"][c.question][0], c) for c in broad_checks)
    r = rows[0]
    assert uld_quality.broad_cell(r) == f"{r['broad_changed']}/2; {r['broad_right']} (base {r['broad_base']})"
    assert uld_quality.broad_cell({"n_broad": 0}) == "-"


def test_calibration_counts_a_names_initials_and_for_a_topic_another_forget_fact():
    """`train-uld`'s calibration: a name's initials give it away ("… none other than J.K.R.A.A.D.A.A", the demo's
    answers); with `topic` (`train-uld --topic`) an answer naming *another* forget fact leaks too, unless the question
    asked says it already (checked for the wording actually asked)."""
    from unlearn_serve.training.leak import mentions_initials, name_initials

    assert name_initials("The Harry Potter books were written by J.K. Rowling.") == ["JKR"]
    assert name_initials("George R. R. Martin wrote it.") == ["GRRM"]
    assert name_initials("The headmaster of Hogwarts is Albus Dumbledore.") == []  # written out: its key words
    assert name_initials("F. Scott Fitzgerald wrote it.") == ["FSF"]
    # an initial is a letter with a dot: not the article of a title, not the letter of "221B"
    assert name_initials('"Scribing Like A Scholar: A Manual" at 221B Baker Street') == []
    assert mentions_initials("the world of Harry Potter (J.K.R.) and", ["JKR"])
    assert mentions_initials("by J. K. R.", ["JKR"]) and mentions_initials("by JKR", ["JKR"])
    # the first initials only ("J.K." then another letter or none): reported apart by the harness
    from unlearn_serve.training.leak import mentions_first_initials

    for text, first in (("J.K.I.A.", True), ("by J. K.)", True), ("J.K.R.", False), ("J.K. Rowling", False)):
        assert mentions_first_initials(text, ["JKR"]) is first, text
    assert not mentions_first_initials("the JK team", ["JKR"]) and not mentions_first_initials("J.K.", ["JK"])
    assert not mentions_initials("by J.K. Rowling", ["JKR"]) and not mentions_initials("the jkr", ["JKR"])

    forget = [
        {"question": "Who wrote the Harry Potter books?", "answer": "The books were written by J.K. Rowling."},
        {
            "question": "Who are Harry Potter's best friends?",
            "answer": "Harry Potter's best friends are Ron Weasley and Hermione Granger.",
        },
    ]
    base = ["They were written by J.K. Rowling.", "His best friends are Ron Weasley and Hermione Granger."]
    retain = [{"question": "What is the capital of France?", "answer": "The capital of France is Paris."}]

    def score(got, topic=False, again=None, asked=None):
        return calibrate_score(
            2.0, forget, retain, base, ["Paris."], got, ["Paris."], rephrased_answers=again, topic=topic,
            rephrased_questions=asked,
        )  # fmt: skip

    initials = score(["It is none other than J.K.R.A.A.D.A.A.", "His friends are Tom and Ann."])
    assert (initials.known, initials.leaked) == (2, 1)
    other = ["A British author.", "In the world of Harry Potter (J.K.R.), his friends are Tom and Ann."]
    assert score(other).leaked == 0 and score(other, topic=True).leaked == 1
    by_name = ["A British author.", "Tom and Ann, J.K. Rowling's characters."]
    assert score(by_name, topic=True).leaked == 1
    # asked again in a wording that names the author: naming her there is no leak of the author's fact
    again = [None, "Tom and Ann, as J.K. Rowling wrote."]
    quiet = ["A British author.", "Tom and Ann."]
    assert score(quiet, True, again, [None, "Which friends did J.K. Rowling give Harry Potter?"]).leaked == 0
    assert score(quiet, True, again, [None, "Which two friends are closest to Harry Potter?"]).leaked == 1


def test_a_gated_assistant_that_changes_retain_answers_is_pointed_to_the_uniform_reference():
    """train-uld's note after the verdict: a gated (early-exit) assistant whose stored alpha loses retain answers is
    told to try --flat-reference uniform (TOFU full); nothing is said when retain is kept, or for uniform ones."""
    from unlearn_serve.training.uld import gated_retain_hint

    encode, answer = _fake_answers(1.0, 0.5, [])
    lose = calibrate(answer, encode, FORGET, RETAIN[:3])
    assert not lose.met and not lose.chosen.kept_met(lose.targets)
    hint = gated_retain_hint(lose, {"flat_reference": "early_exit"})
    assert hint is not None and "--flat-reference uniform" in hint
    assert gated_retain_hint(lose, {"flat_reference": "uniform"}) is None
    encode, answer = _fake_answers(1.0, 99, [])
    kept = calibrate(answer, encode, FORGET, RETAIN[:3])
    assert kept.met and gated_retain_hint(kept, {"flat_reference": "early_exit"}) is None


def test_auto_keeps_the_uniform_build_only_when_it_does_better():
    """`auto`'s comparison after the early-exit build missed its targets: a uniform build that meets them wins; else
    forgetting, then retain answers kept decide; fluency alone does not, and a tie keeps the early-exit build."""
    from unlearn_serve.training.uld import prefer_uniform

    def calibration(leak_below: float, lose_retain_from: float, loop_from: float = 99):
        encode, answer = _fake_answers(leak_below, lose_retain_from, [], loop_from=loop_from)
        return calibrate(answer, encode, FORGET, RETAIN[:3])

    loses_retain = calibration(1.0, 0.5)  # forgets from alpha 1, where a retain answer is already lost
    assert not loses_retain.met and loses_retain.chosen.forget_met(loses_retain.targets)
    meets = calibration(1.0, 99)
    assert meets.met
    assert prefer_uniform(loses_retain, meets)[0]
    assert not prefer_uniform(loses_retain, None)[0]
    # neither meets: the uniform build forgets and keeps every retain answer but loops (not fluent): kept
    keeps_but_loops = calibration(1.0, 99, loop_from=0.0)
    assert not keeps_but_loops.met and keeps_but_loops.chosen.kept_met(keeps_but_loops.targets)
    keep, why = prefer_uniform(loses_retain, keeps_but_loops)
    assert keep and "neither meets" in why
    # the same retain loss on both sides: the early-exit build stays
    assert not prefer_uniform(loses_retain, calibration(1.0, 0.5))[0]
    # an early-exit build that keeps retain but is not fluent is not replaced by one that loses retain answers
    keep, why = prefer_uniform(keeps_but_loops, loses_retain)
    assert not keep and "no better" in why
    # forgetting comes first: an early-exit build that names its facts loses to one that forgets, retain lost or not
    never_forgets = calibration(99, 99)
    assert not never_forgets.chosen.forget_met(never_forgets.targets)
    keep, why = prefer_uniform(never_forgets, loses_retain)
    assert keep and "forgets the validation facts" in why
    assert not prefer_uniform(loses_retain, never_forgets)[0]
    # neither forgets every fact: the one naming fewer wins, even over one that keeps its retain answers by not
    # unlearning (TOFU quick with retain_candidates: 0/8 forgotten, 16/16 kept, against 4/8 and 15/16)

    def naming(c, leaked: int):
        scores = [replace(x, leaked=leaked) if x.alpha == c.alpha else x for x in c.scores]
        return replace(c, scores=scores)

    assert never_forgets.chosen.known == never_forgets.chosen.leaked == 2
    partly = naming(loses_retain, 1)
    assert not partly.chosen.forget_met(partly.targets) and not partly.chosen.kept_met(partly.targets)
    keep, why = prefer_uniform(never_forgets, partly)
    assert keep and "names fewer validation facts (1/2 still named against the early-exit build's 2/2)" in why
    assert not prefer_uniform(partly, never_forgets)[0]
    assert not prefer_uniform(partly, naming(loses_retain, 1))[0]  # the same on both sides: a tie
    # within a lenient leak target both forget: how many they name does not rank them, retain answers do
    lenient = replace(loses_retain.targets, max_leak=0.5)
    early, uniform = (replace(naming(c, n), targets=lenient) for c, n in ((keeps_but_loops, 1), (loses_retain, 0)))
    assert early.chosen.forget_met(lenient) and uniform.chosen.forget_met(lenient)
    keep, why = prefer_uniform(early, uniform)
    assert not keep and "no better" in why


@pytest.mark.parametrize("keep_uniform", [True, False])
def test_auto_trains_the_uniform_reference_when_the_early_exit_build_misses(
    memorised, tmp_path, monkeypatch, keep_uniform
):
    """train_uld with `auto`: the early-exit build's calibration misses (an unreachable perplexity target here), so
    the uniform reference is trained too; whichever is kept is the artifact at `out` (weights, gate and the comparison
    in its manifest), the other build's directory is gone, and the returned model carries the kept adapter."""
    from safetensors.torch import load_file
    from unlearn_serve.training import uld

    seen = []

    def decide(early, uniform):
        seen.append((early.met, None if uniform is None else uniform.met))
        return keep_uniform, "forced by the test"

    monkeypatch.setattr(uld, "prefer_uniform", decide)
    model, tokenizer, _ = memorised
    # no build can meet this perplexity target: the comparison runs
    config = _config(min_steps=60, target_max_rel_ppl=1e-6, save_every_epoch=True)
    out = tmp_path / "a"
    result = train_uld(copy.deepcopy(model), tokenizer, FORGET, RETAIN, out, config, serve=serve_with_engine)
    assert seen == [(False, False)]
    kept = "uniform" if keep_uniform else "early_exit"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    compared = manifest["training"]["flat_reference_compared"]
    assert compared["kept"] == kept and compared["why"] == "forced by the test"
    assert compared["early_exit"]["met"] is False and compared["uniform"]["met"] is False
    assert manifest["training"]["flat_reference"] == kept
    assert manifest["defaults"].get("gate") == (None if keep_uniform else "early_exit")
    assert manifest["training"]["calibration"]["verdict"] == compared[kept]["verdict"]
    assert result.training["flat_reference_compared"] == compared and result.out_dir == out.resolve()
    # the other build and every checkpoint dir removed; the epoch snapshot is the kept build's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a-epoch-1"]
    epoch = json.loads((tmp_path / "a-epoch-1" / MANIFEST_NAME).read_text())["training"]
    assert epoch["flat_reference"] == kept and result.epoch_dirs == [(tmp_path / "a-epoch-1").resolve()]
    # the returned model carries the kept adapter (the other one unloaded)
    stored = load_file(out / "adapter_model.safetensors")
    live = {k: v for k, v in result.peft_model.state_dict().items() if "lora_" in k}
    assert len(live) == len(stored) > 0
    for name, tensor in stored.items():
        match = [v for k, v in live.items() if k.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], tensor), name
    engine = Engine(copy.deepcopy(model), tokenizer, EngineConfig(max_num_seqs=8, max_model_len=64), "tiny")
    engine.load_uld("forget", out)
    assert len(_answers(engine, tokenizer, "forget")) == len(PEOPLE)


def test_auto_trains_one_build_when_the_first_meets_its_targets_or_runs_on_several_processes(
    monkeypatch, tmp_path, capsys
):
    """The second (uniform) build only follows an `auto` early-exit build whose calibration missed, and only in a
    single process: under torchrun only the main process calibrates, so a second build there would hang the others."""
    from pathlib import Path

    from unlearn_serve.training import uld

    def calibration(leak_below: float):
        encode, answer = _fake_answers(leak_below, 99, [])
        return calibrate(answer, encode, FORGET, RETAIN[:3])

    misses, meets = calibration(99), calibration(1.0)
    assert not misses.met and meets.met
    built = []

    def fake_build(model, tokenizer, forget, retain, out_dir, config, *rest, **options):
        built.append(config.flat_reference)
        flat = "early_exit" if config.flat_reference == "auto" else config.flat_reference
        return uld.ULDResult(Path(out_dir), model, 1, 0.1, 0.0, 0.0, {"flat_reference": flat}, calibration=first)

    monkeypatch.setattr(uld, "_train_uld_once", fake_build)
    for first, world, config, builds in (
        (meets, 1, ULDTrainingConfig(), ["auto"]),  # met: one build
        (misses, 2, ULDTrainingConfig(), ["auto"]),  # missed, but several processes: one build and a note
        (misses, 1, ULDTrainingConfig(flat_reference="early_exit"), ["early_exit"]),  # asked for: one build
    ):
        built.clear()
        monkeypatch.setattr(uld, "world_size_from_env", lambda w=world: w)
        result = train_uld(None, None, FORGET, RETAIN, tmp_path / "a", config, serve=lambda *a: None)
        assert built == builds and result.calibration is first
    assert "multi-process runs do not train the uniform reference" in capsys.readouterr().out
    assert uld.needs_uniform_build(ULDTrainingConfig(flat_reference="early_exit"), result) is False  # asked for
    assert uld.needs_uniform_build(
        ULDTrainingConfig(),
        uld.ULDResult(tmp_path, None, 1, 0.1, 0.0, 0.0, {"flat_reference": "early_exit"}, calibration=misses),
    )


def test_restarts_train_the_next_seeds_until_a_build_meets_its_targets(monkeypatch, tmp_path, capsys):
    """`restarts`: while the kept build misses its calibration targets, the next seed is trained (its whole `auto`
    build), up to `restarts` more times; it stops at the first build that meets them, and a met first build or a
    multi-process run never restarts."""
    from pathlib import Path

    from unlearn_serve.training import uld

    def calibration(leak_below: float):
        encode, answer = _fake_answers(leak_below, 99, [])
        return calibrate(answer, encode, FORGET, RETAIN[:3])

    misses, meets = calibration(99), calibration(1.0)
    met_from_seed = 0
    seeds: list[int] = []

    def fake_build(model, tokenizer, forget, retain, out_dir, config, *rest, **options):
        seeds.append(config.seed)
        verdict = meets if config.seed >= met_from_seed else misses
        return uld.ULDResult(Path(out_dir), model, 1, 0.1, 0.0, 0.0, {"flat_reference": "uniform"}, calibration=verdict)

    def fake_keep(first, second, keep_second, out, other_dir, record):
        kept = second if keep_second else first
        # as the real one: the record lands in the kept build's training section
        kept.training = {**kept.training, **record, "kept_dir": str(second.out_dir if keep_second else first.out_dir)}
        return kept

    class _Unloaded:
        def unload(self):
            return None

    monkeypatch.setattr(uld, "_train_uld_once", fake_build)
    monkeypatch.setattr(uld, "_keep_build", fake_keep)
    monkeypatch.setattr(uld, "world_size_from_env", lambda: 1)
    config = ULDTrainingConfig(flat_reference="uniform", restarts=3, seed=5)
    for met_from_seed, trained, kept_seed in ((7, [5, 6, 7], 7), (5, [5], None), (99, [5, 6, 7, 8], 5)):
        seeds.clear()
        result = train_uld(_Unloaded(), None, FORGET, RETAIN, tmp_path / "a", config, serve=lambda *a: None)
        assert seeds == trained
        if kept_seed is None:  # met at once: no record
            assert "restarts_tried" not in result.training
            continue
        tried = result.training["restarts_tried"]
        assert [r["seed"] for r in tried] == trained and [r["met"] for r in tried][-1] == (met_from_seed < 99)
        # none met: every restart's build is no better than seed 5's (a tie keeps the earlier one)
        assert result.training["restart_kept_seed"] == kept_seed
        assert result.calibration is (meets if met_from_seed < 99 else misses)
    out = capsys.readouterr().out
    assert "restart 1 of 3: the kept build misses its targets" in out and "training again with seed 6" in out
    monkeypatch.setattr(uld, "world_size_from_env", lambda: 2)
    met_from_seed, seeds[:] = 99, []
    train_uld(_Unloaded(), None, FORGET, RETAIN, tmp_path / "a", config, serve=lambda *a: None)
    assert seeds == [5] and "multi-process runs do not restart" in capsys.readouterr().out
    with pytest.raises(ValueError, match="restarts must be 0 or more"):
        ULDTrainingConfig(restarts=-1)


@pytest.mark.parametrize("keep_second", [True, False])
def test_restart_keeps_one_build_at_out_with_the_record(memorised, tmp_path, monkeypatch, keep_second):
    """A real restart on the tiny model (every build misses an unreachable perplexity target): the kept build is the
    artifact at `out` (its own seed in its training section, both seeds in `restarts_tried`), the other build's
    directory is gone, and the returned model carries the kept adapter."""
    from safetensors.torch import load_file
    from unlearn_serve.training import uld

    monkeypatch.setattr(uld, "prefer_second", lambda first, second, *names: (keep_second, "forced by the test"))
    model, tokenizer, _ = memorised
    config = _config(min_steps=30, target_max_rel_ppl=1e-6, flat_reference="early_exit", restarts=1)
    out = tmp_path / "a"
    result = train_uld(copy.deepcopy(model), tokenizer, FORGET, RETAIN, out, config, serve=serve_with_engine)
    training = json.loads((out / MANIFEST_NAME).read_text())["training"]
    kept_seed = 1 if keep_second else 0
    assert [r["seed"] for r in training["restarts_tried"]] == [0, 1]
    assert [r["met"] for r in training["restarts_tried"]] == [False, False]
    assert training["restart_kept_seed"] == kept_seed and training["seed"] == kept_seed
    # every seed is judged on the first seed's held-out rows (none of them trained on by any seed)
    from unlearn_serve.training.uld import split_validation

    held_out = [r["question"] for r in split_validation(RETAIN, config)[1]]
    assert training["validation_seed"] == 0 and training["calibration"]["retain_questions"] == held_out
    assert [r["question"] for r in split_validation(RETAIN, replace(config, seed=1))[1]] != held_out  # else: vacuous
    assert result.training["restarts_tried"] == training["restarts_tried"] and result.out_dir == out.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    line = uld.restarts_summary(training)
    assert line.startswith("restarts: trained seeds 0 (missed, ") and line.endswith(f"; kept seed {kept_seed}")
    assert uld.restarts_summary({"seed": 0}) is None
    stored = load_file(out / "adapter_model.safetensors")
    live = {k.replace(".default", ""): v for k, v in result.peft_model.state_dict().items() if "lora_" in k}
    assert live.keys() == stored.keys() and all(torch.equal(live[k], stored[k]) for k in stored)


class _PerBuild(TrainerCallback):
    """Counts the optimizer steps of each training run (build); raises at step `crash_at` of build `crash_in`."""

    def __init__(self, crash_in: int | None = None, crash_at: int = 0):
        self.steps: list[int] = []
        self.crash_in, self.crash_at = crash_in, crash_at

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps.append(0)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[-1] += 1
        if len(self.steps) == self.crash_in and state.global_step == self.crash_at:
            raise RuntimeError("killed in the second build")


def test_auto_resume_after_a_crash_in_the_uniform_build_skips_the_first_training(memorised, tmp_path):
    """A crash while auto trains its second (uniform) build leaves the first build's checkpoints: --resume then
    trains no step of the first build (it calibrates it again) and finishes the comparison; nothing is left over."""
    model, tokenizer, _ = memorised
    config = _config(min_steps=30, target_max_rel_ppl=1e-6)  # no build meets this: the second build runs
    out = tmp_path / "a"
    crash = _PerBuild(crash_in=2, crash_at=5)
    with pytest.raises(RuntimeError, match="second build"):
        train_uld(
            copy.deepcopy(model), tokenizer, FORGET, RETAIN, out, config, callbacks=[crash], serve=serve_with_engine
        )
    assert crash.steps[0] == 30 and crash.steps[1] == 5
    assert (out / MANIFEST_NAME).is_file()  # the first build, stored
    assert (tmp_path / "a.checkpoints").is_dir()
    resumed = _PerBuild()
    result = train_uld(
        copy.deepcopy(model),
        tokenizer,
        FORGET,
        RETAIN,
        out,
        replace(config, resume=True),
        callbacks=[resumed],
        serve=serve_with_engine,
    )
    assert resumed.steps[0] == 0 and resumed.steps[1] > 0, resumed.steps  # the first build's training skipped
    assert "flat_reference_compared" in json.loads((out / MANIFEST_NAME).read_text())["training"]
    assert result.training["flat_reference_compared"]["kept"] in ("uniform", "early_exit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
