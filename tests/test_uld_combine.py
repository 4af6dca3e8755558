"""ULD's combination rules (unlearn_serve/uld_combine.py), the near-leak check (training/leak.py) and the
calibration's retain top-up and perplexity check (training/uld_calibrate.py). Issue 13."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from unlearn_serve.training.augment import rephrase_question
from unlearn_serve.training.leak import mentions, names_fact, near_mentions, words_of
from unlearn_serve.training.uld_calibrate import ALPHA_GRID, CalibrationTargets, calibrate

from unlearn_serve.uld_combine import (
    CANDIDATE_BLOCK,
    DEFAULT_RULE,
    ULD_RULES,
    CombineSettings,
    assistant_penalty,
    combine_logits,
    combine_on_candidates,
    plausible_candidates,
    plausible_mask,
    split_plausible_candidates,
)


@dataclass
class _ServedPair:
    """One tiny assistant saved twice and an engine to serve it: `new` with today's manifest defaults (plus
    `new_defaults`), `old` as written before the field existed (the field removed from its manifest)."""

    engine: object
    backend: object
    new: Path
    old: Path
    field: str

    def corrupt_old(self, value: object) -> None:
        """Write `value` as the old artifact's manifest field (a manifest edited by hand)."""
        from unlearn_serve.artifact import MANIFEST_NAME

        manifest = json.loads((self.old / MANIFEST_NAME).read_text())
        manifest["defaults"][self.field] = value
        (self.old / MANIFEST_NAME).write_text(json.dumps(manifest))


def _served_pair(
    tiny_llama, tokenizer, tmp_path, field: str, new_defaults=None, old_defaults=None, nontrivial=False
) -> _ServedPair:
    from peft import get_peft_model
    from unlearn_serve.server.engine.engine import Engine, EngineConfig

    from unlearn_serve.artifact import MANIFEST_NAME, fingerprint_model
    from unlearn_serve.assistant import assistant_lora_config
    from unlearn_serve.uld_artifact import save_uld_artifact

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), assistant_lora_config(tiny_llama, 1, 4, 8, 0.0))
    if nontrivial:  # LoRA B is zero at init: make the assistant differ from the target, so settings matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
    details = {"assistant_layers": 1, "lora_rank": 4, "lora_alpha": 8}
    fp = fingerprint_model(tiny_llama)
    new = save_uld_artifact(peft_model, tmp_path / "new", fp, details, {}, None, new_defaults)
    old = save_uld_artifact(peft_model, tmp_path / "old", fp, details, {}, None, old_defaults)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    manifest["defaults"].pop(field, None)
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    engine = Engine(copy.deepcopy(tiny_llama), tokenizer, EngineConfig(max_num_seqs=4, max_model_len=64), "tiny")
    backend = next(b for b in engine.artifacts.backends if b.kind == "uld")
    return _ServedPair(engine, backend, new, old, field)


def _mixed_equals_alone(engine, tokenizer, name: str, variants: list[dict]) -> list[list[float]]:
    """Score one prompt under each option set in one batch and each alone: the batch must equal the rows alone
    (per-row settings as tensors, no loop). Returns the batch's prompt log-probabilities per variant."""
    from unlearn_serve.server.engine.sampling_params import SamplingParams
    from unlearn_serve.server.engine.sequence import Selection

    prompt = tokenizer.encode("The capital of France is")
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    mixed = engine.generate([prompt] * len(variants), params, [Selection(name, o) for o in variants])
    alone = [engine.generate([prompt], params, [Selection(name, o)])[0] for o in variants]
    scores = [[e.logprob for e in r.prompt_logprobs if e is not None] for r in mixed]
    for got, want in zip(scores, alone, strict=True):
        assert got == pytest.approx([e.logprob for e in want.prompt_logprobs if e is not None], abs=1e-5)
    return scores


def _rows():
    """Row 0: the target is sure of token 7 (a memorised fact), the assistant remembers it and dislikes token 3
    most; row 1: a flat-ish target and a flat assistant (a generic position)."""
    target = torch.linspace(0, 4, 50).repeat(2, 1)
    target[0, 7] = 20.0
    assistant = torch.zeros(2, 50)
    assistant[0, 7] = 30.0
    assistant[0, 45] = -25.0  # the assistant dislikes one of the target's alternatives most
    assistant[1] = torch.linspace(-0.01, 0.01, 50)
    return target, assistant, torch.log(torch.tensor([0.01, 0.01]))


def test_prefer_suppresses_the_remembered_token_and_keeps_the_targets_order():
    target, assistant, log_filter = _rows()
    alpha = torch.tensor([1.0, 1.0])
    keep = plausible_mask(target, log_filter)
    prefer = combine_logits(target, assistant, alpha, log_filter, prefer=True)
    difference = combine_logits(target, assistant, alpha, log_filter, prefer=False)
    # both rules push the remembered token below its alternatives
    assert prefer[0].argmax() != 7 and difference[0].argmax() != 7
    # `prefer`: every other candidate keeps the target's own logit, so the target's best alternative wins
    others = keep[0].clone()
    others[7] = False
    assert torch.equal(prefer[0][others], target[0][others])
    assert prefer[0].argmax() == target[0].masked_fill(~others, float("-inf")).argmax() == 49
    # `difference` promotes the alternative the assistant dislikes most instead: an odd token
    assert difference[0].argmax() == 45
    # a flat assistant moves nothing under `prefer` beyond the tiny spread above its median
    assert (prefer[1][keep[1]] - target[1][keep[1]]).abs().max() < 0.011
    assert torch.equal(torch.isinf(prefer), ~keep) and torch.equal(torch.isinf(difference), ~keep)


def test_rules_ignore_a_per_row_shift_of_the_assistant():
    target, assistant, log_filter = _rows()
    alpha = torch.tensor([0.7, 1.3])
    for prefer in (True, False):
        a = combine_logits(target, assistant, alpha, log_filter, prefer=prefer)
        b = combine_logits(target, assistant.log_softmax(-1), alpha, log_filter, prefer=prefer)
        if prefer:  # the penalty itself is shift-free
            assert torch.allclose(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert torch.allclose(a.log_softmax(-1)[torch.isfinite(a)], b.log_softmax(-1)[torch.isfinite(b)], atol=1e-4)


def test_candidate_path_equals_the_full_vocabulary_path_for_both_rules_and_mixed_rows():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(5, 300, generator=gen) * 3
    assistant = torch.randn(5, 300, generator=gen) * 2
    alpha = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.75])
    log_filter = torch.log(torch.tensor([1e-1, 1e-2, 1e-3, 0.5, 1e-4]))
    keep = plausible_mask(target, log_filter)
    m = int(keep.sum(-1).max())
    assert len(set(keep.sum(-1).tolist())) > 1  # rows keep different numbers of candidates
    candidates = target.topk(m, dim=-1).indices
    mixed = torch.tensor([True, False, True, False, True])
    for prefer in (True, False, mixed):
        full = combine_logits(target, assistant, alpha, log_filter, prefer=prefer)
        sparse = combine_on_candidates(target, candidates, assistant.gather(-1, candidates), alpha, keep, prefer=prefer)
        assert torch.equal(torch.isinf(sparse), torch.isinf(full))
        assert torch.allclose(sparse[keep], full[keep], atol=1e-5)
    # a mixed batch equals each row under its own rule
    full = combine_logits(target, assistant, alpha, log_filter, prefer=mixed)
    for i, p in enumerate(mixed.tolist()):
        alone = combine_logits(
            target[i : i + 1], assistant[i : i + 1], alpha[i : i + 1], log_filter[i : i + 1], prefer=p
        )
        assert torch.equal(full[i : i + 1], alone)
    # the penalty is never negative under `prefer`: no candidate is promoted
    assert (assistant_penalty(assistant, keep, True)[keep] >= 0).all()
    assert DEFAULT_RULE in ULD_RULES


def test_a_number_keyword_is_a_whole_number_and_a_word_keyword_a_word_start():
    assert mentions("The Weasleys came.", ["Weasley"]) and not mentions("Aweasley", ["Weasley"])
    assert mentions("A dog has 4 legs.", ["4"]) and not mentions("About 40 legs.", ["4"])
    assert mentions("It ended in 1945.", ["1945"]) and mentions("3.5 and more", ["3"]) and not mentions("34", ["3"])
    assert mentions("24-hour days", ["24"]) and not mentions("In 2024 it was.", ["24"])


def test_near_leaks_count_and_other_facts_words_do_not():
    rowling = ("J.K. Rowling wrote the Harry Potter books.", "Who wrote the Harry Potter books?")
    assert names_fact("It was written by J.K. Rowle.", *rowling, near=True)
    assert not names_fact("It was written by J.K. Rowle.", *rowling)  # the exact check (retain answers) stays exact
    assert not names_fact("It was written by an author.", *rowling, near=True)
    assert near_mentions("Voldem", ["voldemort"]) and not near_mentions("Volt", ["voldemort"])
    assert not near_mentions("Oslo", ["osl"])  # keys under 5 characters: exact matches only
    # "viola" is a real answer of the data (another person's instrument), not a mangled "violin"
    known = words_of(["Ola plays the viola.", "Arlo plays the violin."])
    assert not near_mentions("Arlo plays the viola.", ["violin"], known)
    assert near_mentions("Arlo plays the violin.", ["violin"], known)  # an exact mention always counts
    assert near_mentions("Arlo plays the violo.", ["violin"], known)


PEOPLE = [
    ("Arlo", "Oslo"),
    ("Bea", "Lima"),
    ("Cyd", "Kyiv"),
    ("Dov", "Rome"),
    ("Eli", "Cairo"),
    ("Fay", "Quito"),
    ("Gus", "Riga"),
    ("Hal", "Bern"),
    ("Ivy", "Dakar"),
    ("Jon", "Hanoi"),
    ("Kit", "Accra"),
    ("Lou", "Minsk"),
]
ROWS = [{"question": f"Where does {n} live?", "answer": f"{n} lives in {c}."} for n, c in PEOPLE]
FORGET, HELD, TRAIN = ROWS[:2], ROWS[2:4], ROWS[4:]


def _server(leak_below: float, lose: set[str], ppl: float | None = None):
    """A stand-in server: forget facts named below `leak_below`, the retain rows in `lose` lost at any alpha;
    with `ppl`, `nll` makes the unlearned forget answers that much more perplexing than the base's."""
    by_id = {i: r for i, r in enumerate(ROWS)}

    def encode(q: str) -> list[int]:
        # the calibration also asks each forget question rephrased: answered as the original
        return [next(i for i, r in by_id.items() if q == r["question"] or q in rephrase_question(r["question"], 4))]

    def answer(prompts, alphas, max_tokens):
        out = []
        for (i,), a in zip(prompts, alphas, strict=True):
            row = by_id[i]
            name, city = row["answer"].rstrip(".").split(" lives in ")
            gone = a is not None and (a >= leak_below if row in FORGET else row["question"] in lose)
            out.append(f"{name} lives in a small town." if gone else row["answer"])
        return out

    if ppl is not None:
        answer.nll = lambda texts: math.log(ppl) if any("small town" in t for t in texts) else 0.0
    return encode, answer


def test_few_held_out_retain_rows_are_topped_up_with_training_rows():
    encode, answer = _server(1.0, set())
    cal = calibrate(answer, encode, FORGET, HELD, train_retain_rows=TRAIN)
    s = cal.chosen
    assert (s.retain_rows, s.kept, s.train_retain_rows, s.train_kept) == (2, 2, 6, 6)
    assert cal.met and "keeps 2/2 held-out + 6/6 training retain answers" in cal.verdict()
    assert len(cal.train_retain_questions) == 6 and set(cal.train_retain_questions) <= {r["question"] for r in TRAIN}
    # one held-out answer lost of 2 + 6: 7/8 is still under the 95% target (no rounding in its favour) ...
    encode, answer = _server(1.0, {HELD[0]["question"]})
    cal = calibrate(answer, encode, FORGET, HELD, train_retain_rows=TRAIN)
    assert not cal.met and "keeps 1/2 held-out + 6/6 training retain" in cal.verdict()
    # ... and with a lower target the training rows carry the miss that 1/2 alone would not
    cal = calibrate(answer, encode, FORGET, HELD, train_retain_rows=TRAIN, targets=CalibrationTargets(min_kept=0.85))
    assert cal.met
    cal = calibrate(answer, encode, FORGET, HELD, targets=CalibrationTargets(min_kept=0.85))
    assert not cal.met and "keeps 1/2 held-out retain answers" in cal.verdict()
    # enough held-out rows: no top-up
    cal = calibrate(answer, encode, FORGET, HELD + TRAIN, train_retain_rows=TRAIN)
    assert cal.chosen.train_retain_rows == 0 and cal.chosen.retain_rows == 10


def test_relative_perplexity_is_part_of_fluency():
    encode, answer = _server(1.0, set(), ppl=1.5)
    cal = calibrate(answer, encode, FORGET, HELD, train_retain_rows=TRAIN)
    assert cal.met and math.isclose(cal.chosen.rel_ppl, 1.5) and "perplexity 1.50x the base's answers" in cal.verdict()
    encode, answer = _server(1.0, set(), ppl=3.0)
    cal = calibrate(answer, encode, FORGET, HELD, train_retain_rows=TRAIN)
    assert not cal.met and math.isclose(cal.chosen.rel_ppl, 3.0)
    assert "NOT fluent" in cal.verdict() and "improbable under the base" in cal.verdict()
    assert [s["rel_ppl"] for s in cal.to_manifest()["scores"] if s["alpha"] == cal.alpha] == [cal.chosen.rel_ppl]


def test_calibration_counts_near_leaks():
    forget = [{"question": "Who wrote the Harry Potter books?", "answer": "J.K. Rowling wrote them."}]

    def encode(q):
        return [0]

    def answer(prompts, alphas, max_tokens):
        return [
            "J.K. Rowling wrote them." if a is None else ("J.K. Rowle wrote them." if a < 2 else "Nobody knows.")
            for a in alphas
        ]

    cal = calibrate(answer, encode, forget, [])
    assert cal.alpha == 2.0 and cal.chosen.leaked == 0
    assert all(s.leaked == 1 for s in cal.scores if s.alpha < 2)


def test_manifest_rule_is_served_and_an_old_manifest_keeps_difference(tiny_llama, tokenizer, tmp_path):
    """New artifacts store the rule; one written before the field existed is served with `difference` (its
    alpha was calibrated for it); a request-level `rule` overrides; an unknown rule is refused."""
    from unlearn_serve.server.engine.errors import EngineInputError

    from unlearn_serve.artifact import ArtifactError

    pair = _served_pair(tiny_llama, tokenizer, tmp_path, "rule")
    engine, backend = pair.engine, pair.backend
    assert engine.load_uld("new", pair.new).combine.rule == DEFAULT_RULE == "prefer"
    assert engine.load_uld("old", pair.old).combine.rule == "difference"
    assert backend.resolve("old", {}).combine.rule == "difference"
    assert backend.resolve("new", {"rule": "difference"}).combine.rule == "difference"
    with pytest.raises(EngineInputError):
        backend.resolve("new", {"rule": "sideways"})
    pair.corrupt_old("sideways")
    with pytest.raises(ArtifactError, match="defaults.rule must be one of"):
        engine.load_uld("bad", pair.old)


# ----------------------------------------------------------------------------- refilter (the relative-top rule again)


def test_refilter_removes_the_suppressed_token_and_keeps_the_targets_alternatives():
    """The remembered token, pushed far down, is -inf (probability 0 at temperature 1, not among the finite top
    log-probabilities); the target's alternatives survive with their logits; the greedy token does not change."""
    from unlearn_serve.uld_combine import refilter_combined

    target, assistant, log_filter = _rows()
    alpha = torch.tensor([1.0, 1.0])
    for prefer in (True, False):
        plain = combine_logits(target, assistant, alpha, log_filter, prefer=prefer)
        refiltered = combine_logits(target, assistant, alpha, log_filter, prefer=prefer, refilter=True)
        assert torch.isfinite(plain[0, 7])  # today's rule: lowered, but still a candidate
        assert plain.softmax(-1)[0, 7] > 0
        assert refiltered[0, 7] == float("-inf") and refiltered.softmax(-1)[0, 7] == 0
        logprobs = refiltered[0].log_softmax(-1)
        top = logprobs.topk(20)
        assert 7 not in top.indices[torch.isfinite(top.values)].tolist()
        assert torch.equal(plain.argmax(-1), refiltered.argmax(-1))
        # the target's top alternatives (43..49) are still sampleable; the generic row 1 is untouched
        # (under `difference` the token the assistant dislikes most, 45, jumps far ahead and is the only one left)
        if prefer:
            assert torch.equal(refiltered[0, 43:], target[0, 43:])
        assert torch.equal(refiltered[1], plain[1])
    # sampling at temperature 1 never draws it
    probs = combine_logits(target, assistant, alpha, log_filter, refilter=True).softmax(-1)
    draws = torch.multinomial(probs, 2000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert not (draws[0] == 7).any()
    # a filter of 0 keeps every candidate; refilter=False and a False row change nothing
    zero = torch.full((2,), float("-inf"))
    assert torch.equal(refilter_combined(plain, target, zero), plain)
    assert torch.equal(refilter_combined(plain, target, log_filter, False), plain)
    mixed = refilter_combined(plain, target, log_filter, torch.tensor([False, True]))
    assert torch.equal(mixed[0], plain[0])


def test_refilter_removes_a_token_demoted_just_below_the_winner():
    """A calibrated alpha pushes a fact only just below the best alternative: within ln(1/filter) of it, so the
    relative-top part alone keeps it (the log-prob probe's top 5). It was the target's first choice and only
    the penalty put it below the winner: the refilter removes it; the alternatives keep the target's order."""
    target = torch.linspace(0, 4, 50)[None].clone()
    target[0, 7] = 6.0  # the fact: the target's top token
    assistant = torch.zeros(1, 50)
    assistant[0, 7] = 2.2  # remembered: pushed to 6 - 2.2 = 3.8, just below the best alternative (4)
    alpha, log_filter = torch.tensor([1.0]), torch.log(torch.tensor([0.01]))
    plain = combine_logits(target, assistant, alpha, log_filter)
    assert plain[0].argmax() == 49 and 0 < int((plain[0] > plain[0, 7]).sum()) < 5  # in the top 5, not first
    refiltered = combine_logits(target, assistant, alpha, log_filter, refilter=True)
    assert refiltered[0, 7] == float("-inf") and refiltered.softmax(-1)[0, 7] == 0
    finite = torch.isfinite(refiltered[0])
    assert torch.equal(refiltered[0][finite], target[0][finite])  # the rest: the target's own logits
    assert int(finite.sum()) == int(torch.isfinite(plain[0]).sum()) - 1  # only the fact went
    # the scoring setting (filter 0: every token) is left alone
    zero = torch.full((1,), float("-inf"))
    assert torch.equal(
        combine_logits(target, assistant, alpha, zero, refilter=True), combine_logits(target, assistant, alpha, zero)
    )


def test_refilter_candidate_path_equals_the_full_vocabulary_path():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(5, 300, generator=gen) * 3
    assistant = torch.randn(5, 300, generator=gen) * 2
    assistant[:, :5] += 8  # some candidates the assistant prefers strongly
    alpha = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0])
    log_filter = torch.log(torch.tensor([1e-1, 1e-2, 1e-3, 0.5, 1e-2]))
    keep = plausible_mask(target, log_filter)
    candidates = target.topk(int(keep.sum(-1).max()), dim=-1).indices
    mixed = torch.tensor([True, False, True, False, True])
    dropped_any = False
    for prefer in (True, False, mixed):
        for refilter in (True, False, mixed):
            full = combine_logits(target, assistant, alpha, log_filter, prefer=prefer, refilter=refilter)
            sparse = combine_on_candidates(
                target,
                candidates,
                assistant.gather(-1, candidates),
                alpha,
                keep,
                prefer=prefer,
                refilter=refilter,
                log_filter=log_filter,
            )
            assert torch.equal(torch.isinf(sparse), torch.isinf(full))
            assert torch.allclose(sparse[torch.isfinite(sparse)], full[torch.isfinite(full)], atol=1e-5)
            plain = combine_logits(target, assistant, alpha, log_filter, prefer=prefer)
            assert torch.equal(full.argmax(-1), plain.argmax(-1))  # greedy unchanged
            dropped_any |= bool((torch.isinf(full) & torch.isfinite(plain)).any())
    assert dropped_any  # the case exercises the refilter
    import pytest

    with pytest.raises(ValueError, match="log_filter"):
        combine_on_candidates(
            target, candidates, assistant.gather(-1, candidates), alpha, keep, prefer=True, refilter=True
        )


def test_manifest_refilter_is_served_and_an_old_manifest_keeps_it_off(tiny_llama, tokenizer, tmp_path):
    """New artifacts (train-uld's calibration draft too: it is written with the same defaults) store
    `refilter: true`; a manifest without the field is served without it; a request-level `refilter` overrides;
    the backend passes it to the combination on both paths."""
    from unlearn_serve.server.engine.errors import EngineInputError

    from unlearn_serve.artifact import ArtifactError
    from unlearn_serve.uld_combine import DEFAULT_REFILTER

    # train-uld's calibration serves a draft written with {"filter", "rule"} only: the refilter comes along
    pair = _served_pair(tiny_llama, tokenizer, tmp_path, "refilter", {"filter": 0.01, "rule": "prefer"})
    engine, backend = pair.engine, pair.backend
    assert engine.load_uld("new", pair.new).combine.refilter is DEFAULT_REFILTER is True
    assert engine.load_uld("old", pair.old).combine.refilter is False
    assert backend.resolve("new", {}).combine.refilter and not backend.resolve("old", {}).combine.refilter
    assert backend.resolve("old", {"refilter": True}).combine.refilter
    with pytest.raises(EngineInputError):
        backend.resolve("new", {"refilter": "yes"})
    pair.corrupt_old("yes")
    with pytest.raises(ArtifactError, match="refilter"):
        engine.load_uld("bad", pair.old)

    # the backend's combine: candidate path == whole-vocabulary path, with the refilter applied on both
    gen = torch.Generator().manual_seed(2)
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    hidden = torch.randn(3, engine.model.config.hidden_size, generator=gen)
    target = torch.randn(3, vocab, generator=gen) * 4
    alpha, lf = torch.tensor([1.0, 2.0, 3.0]), torch.log(torch.full((3,), 0.01))
    sparse = backend.combine(target, hidden, alpha, lf, CombineSettings(prefer=True, refilter=True))
    backend.sync_free = True
    full = backend.combine(target, hidden, alpha, lf, CombineSettings(prefer=True, refilter=True))
    backend.sync_free = False
    assert torch.equal(torch.isinf(sparse), torch.isinf(full))
    assert torch.allclose(sparse[torch.isfinite(sparse)], full[torch.isfinite(full)], atol=1e-4)
    plain = backend.combine(target, hidden, alpha, lf, CombineSettings(prefer=True, refilter=False))
    assert torch.equal(plain.argmax(-1), sparse.argmax(-1))


def test_margin_ignores_small_preferences_and_keeps_the_remembered_token_suppressed():
    """`prefer` with a margin: a candidate the assistant prefers by less than the margin keeps the target's logit
    (no retain damage from a not-quite-flat assistant); a remembered token, far above the median, is still pushed
    down by alpha * (its excess - margin). Per-row margins, both scoring paths, and `difference` ignores it."""
    target = torch.linspace(0, 4, 50).repeat(3, 1)
    target[:, 7] = 20.0
    assistant = torch.zeros(3, 50)
    assistant[0, 7] = 30.0  # remembered: 30 above the median
    assistant[1, 7] = 0.8  # a small preference (a retain position where the assistant is not quite flat)
    assistant[2, 7] = 0.8
    log_filter = torch.log(torch.full((3,), 0.01))
    alpha = torch.full((3,), 2.0)
    keep = plausible_mask(target, log_filter)
    margin = torch.tensor([1.0, 1.0, 0.0])
    combined = combine_logits(target, assistant, alpha, log_filter, prefer=True, margin=margin)
    assert combined[0, 7] == pytest.approx(20.0 - 2.0 * (30.0 - 1.0))  # still suppressed, by alpha * (30 - 1)
    assert combined[0].argmax() != 7
    assert combined[1, 7] == 20.0  # below the margin: untouched
    assert combined[2, 7] == pytest.approx(20.0 - 2.0 * 0.8)  # margin 0: the old rule
    assert torch.equal(combined[2:], combine_logits(target[2:], assistant[2:], alpha[2:], log_filter[2:], prefer=True))
    # the same margin as a float for every row, and on the candidate path
    as_float = combine_logits(target[:2], assistant[:2], alpha[:2], log_filter[:2], prefer=True, margin=1.0)
    assert torch.equal(as_float, combined[:2])
    candidates = target.topk(int(keep.sum(-1).max()), dim=-1).indices
    sparse = combine_on_candidates(
        target, candidates, assistant.gather(-1, candidates), alpha, keep, prefer=True, margin=margin
    )
    assert torch.equal(sparse[keep], combined[keep])
    # `difference` subtracts the whole assistant whatever the margin
    assert torch.equal(
        combine_logits(target, assistant, alpha, log_filter, prefer=False, margin=margin),
        combine_logits(target, assistant, alpha, log_filter, prefer=False),
    )


def test_margin_comes_from_the_manifest_and_old_manifests_keep_zero(tiny_llama, tokenizer, tmp_path):
    from unlearn_serve.server.engine.errors import EngineInputError

    from unlearn_serve.artifact import ArtifactError
    from unlearn_serve.uld_combine import DEFAULT_MARGIN

    pair = _served_pair(
        tiny_llama, tokenizer, tmp_path, "margin", {"filter": 0.01, "rule": "prefer"}, {"rule": "prefer"}, True
    )
    engine, backend = pair.engine, pair.backend
    assert engine.load_uld("new", pair.new).combine.margin == DEFAULT_MARGIN == 1.0
    assert engine.load_uld("old", pair.old).combine.margin == 0.0
    assert backend.resolve("old", {"margin": 2}).combine.margin == 2.0
    for bad in (-1, True, "1", float("nan")):
        with pytest.raises(EngineInputError, match="margin"):
            backend.resolve("new", {"margin": bad})
    # one batch mixing margins scores each row as it would alone (per-row margin tensor, no loop)
    opts = {"alpha": 3.0, "filter": 0.0}
    scores = _mixed_equals_alone(engine, tokenizer, "new", [opts, {**opts, "margin": 0.0}])
    assert max(abs(a - b) for a, b in zip(*scores, strict=True)) > 1e-3  # the margin mattered
    pair.corrupt_old(-1)
    with pytest.raises(ArtifactError, match="margin"):
        engine.load_uld("bad", pair.old)


def test_floor_bounds_the_penalty_and_never_changes_the_greedy_token():
    """With a floor, a penalised candidate ends at most `floor` below the best candidate the assistant does not
    penalise (never above its own target logit); rows without a floor, and `difference` rows, are unchanged; the
    argmax is the same for every floor > 0; per-row floors (inf = off) and both scoring paths agree."""
    from unlearn_serve.uld_combine import floor_combined

    target = torch.linspace(0, 4, 50).repeat(4, 1)
    target[:, 7] = 20.0
    target[:, 9] = 1.0  # a low candidate the assistant also prefers
    assistant = torch.zeros(4, 50)
    assistant[:, 7] = 30.0  # remembered strongly
    assistant[:, 9] = 5.0
    assistant[3, 7] = 3.0  # remembered weakly
    log_filter = torch.full((4,), float("-inf"))  # filter 0: every token a candidate (the evaluation's scoring)
    alpha = torch.full((4,), 2.0)
    floor = torch.tensor([1.0, float("inf"), 0.5, 1.0])
    plain = combine_logits(target, assistant, alpha, log_filter, prefer=True)
    bounded = combine_logits(target, assistant, alpha, log_filter, prefer=True, floor=floor)
    best_free = 4.0  # the target's best candidate without a penalty (token 49)
    assert plain[0, 7] == pytest.approx(20.0 - 2.0 * 30.0)  # far below every alternative
    assert bounded[0, 7] == pytest.approx(best_free - 1.0)  # raised to the floor
    assert bounded[2, 7] == pytest.approx(best_free - 0.5)
    assert bounded[0, 9] == pytest.approx(1.0)  # raised only up to its own target logit
    assert torch.equal(bounded[1], plain[1])  # inf: off
    assert bounded[3, 7] == pytest.approx(20.0 - 2.0 * 3.0)  # weakly remembered: the penalty is within the floor
    unpenalised = assistant_penalty(assistant, torch.ones_like(assistant, dtype=torch.bool), True) == 0
    assert torch.equal(bounded[unpenalised], plain[unpenalised])
    assert torch.equal(bounded.argmax(-1), plain.argmax(-1))
    # None and a float for every row
    assert torch.equal(combine_logits(target, assistant, alpha, log_filter, prefer=True, floor=None), plain)
    as_float = combine_logits(target[:1], assistant[:1], alpha[:1], log_filter[:1], prefer=True, floor=1.0)
    assert torch.equal(as_float, bounded[:1])
    # `difference` rows ignore it, in a mixed batch too
    mixed = torch.tensor([True, False, True, False])
    got = combine_logits(target, assistant, alpha, log_filter, prefer=mixed, floor=1.0)
    assert torch.equal(got[1], combine_logits(target, assistant, alpha, log_filter, prefer=False)[1])
    assert got[0, 7] == pytest.approx(best_free - 1.0)
    everything = torch.ones_like(plain, dtype=torch.bool)
    assert torch.equal(floor_combined(plain, target, plain, everything, 1.0, False), plain)
    # random rows: greedy unchanged for every floor > 0, candidate path == whole-vocabulary path
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(6, 300, generator=gen) * 3
    assistant = torch.randn(6, 300, generator=gen) * 2
    assistant[:, :5] += 8
    alpha = torch.tensor([0.5, 1.0, 2.0, 3.0, 8.0, 1.5])
    log_filter = torch.log(torch.tensor([1e-1, 1e-2, 1e-3, 0.5, 1e-2, 1e-4]))
    keep = plausible_mask(target, log_filter)
    candidates = target.topk(int(keep.sum(-1).max()), dim=-1).indices
    plain = combine_logits(target, assistant, alpha, log_filter, prefer=True, margin=1.0)
    for f in (0.1, 1.0, torch.tensor([0.1, 1.0, float("inf"), 2.0, 0.5, 3.0])):
        full = combine_logits(target, assistant, alpha, log_filter, prefer=True, margin=1.0, floor=f)
        assert torch.equal(full.argmax(-1), plain.argmax(-1))
        assert (full >= plain).all()
        sparse = combine_on_candidates(
            target, candidates, assistant.gather(-1, candidates), alpha, keep, prefer=True, margin=1.0, floor=f
        )
        assert torch.equal(torch.isinf(sparse), torch.isinf(full))
        assert torch.allclose(sparse[torch.isfinite(sparse)], full[torch.isfinite(full)], atol=1e-5)
    # served with the refilter, a floor at least ln(1/filter) changes nothing: every candidate it raises stays more
    # than ln(1/filter) below the winner, so the refilter removes it (what the attacks and sampling see is the same)
    served = dict(prefer=True, margin=1.0, refilter=True)
    for f in (5.0, 10.0):
        lf = torch.log(torch.full((6,), 0.01))
        assert torch.equal(
            combine_logits(target, assistant, alpha, lf, floor=f, **served),
            combine_logits(target, assistant, alpha, lf, **served),
        )


def test_floor_comes_from_the_manifest_and_is_off_without_it(tiny_llama, tokenizer, tmp_path):
    from unlearn_serve.server.engine.errors import EngineInputError

    from unlearn_serve.artifact import ArtifactError

    pair = _served_pair(
        tiny_llama, tokenizer, tmp_path, "floor", {"rule": "prefer", "floor": 1.0}, {"rule": "prefer"}, True
    )
    engine, backend = pair.engine, pair.backend
    assert engine.load_uld("floor", pair.new).combine.floor == 1.0
    assert engine.load_uld("plain", pair.old).combine.floor is None
    assert backend.resolve("plain", {"floor": 2}).combine.floor == 2.0
    assert backend.resolve("floor", {"floor": None}).combine.floor is None

    # the decode step skips the floor where it cannot change the output (refilter on, floor > ln(1/filter))
    def served_floor(options):
        choice = backend.resolve("floor", options)
        return choice.combine.served_floor(choice.filter)

    served = {"rule": "prefer", "refilter": True, "filter": 0.01}
    assert served_floor({**served, "floor": 10}) is None
    assert served_floor({**served, "floor": 4}) == 4.0  # below ln(100) = 4.6
    assert served_floor({**served, "floor": 10, "filter": 0.0}) == 10.0  # scoring
    assert served_floor({**served, "floor": 10, "refilter": False}) == 10.0
    assert served_floor({**served, "floor": 10, "rule": "difference"}) is None
    for bad in (-1, True, "1", float("inf")):
        with pytest.raises(EngineInputError, match="floor"):
            backend.resolve("plain", {"floor": bad})
    # one batch mixing floors (and none) scores each row as it would alone
    opts = {"alpha": 8.0, "filter": 0.0}
    scores = _mixed_equals_alone(engine, tokenizer, "floor", [opts, {**opts, "floor": 0.5}, {**opts, "floor": None}])
    assert max(abs(a - b) for a, b in zip(scores[0], scores[2], strict=True)) > 1e-3  # the floor mattered
    pair.corrupt_old(-1)
    with pytest.raises(ArtifactError, match="floor"):
        engine.load_uld("bad", pair.old)


def test_combine_settings_of_rows_are_python_values_when_rows_agree_and_tensors_when_not():
    """A batch whose rows share their options costs no per-row select; a mixed one gets [R] tensors; the floor is
    left out (None / inf) where the refilter makes it moot, which is the serving default."""
    from unlearn_serve.uld_combine import CombineOptionError, CombineOptions

    served = CombineOptions().updated({"rule": "prefer", "refilter": True, "margin": 1, "floor": 10})
    same = CombineSettings.of_rows([served, served], [0.01, 0.01], "cpu")
    assert (same.prefer, same.refilter, same.margin, same.floor) == (True, True, 1.0, None)
    scoring = CombineSettings.of_rows([served], [0.0], "cpu")  # filter 0 (the evaluation): the floor counts
    assert scoring.floor == 10.0
    legacy = CombineOptions()  # a manifest without the options: difference, no refilter, margin 0, no floor
    mixed = CombineSettings.of_rows([served, legacy], [0.0, 0.01], "cpu")
    assert mixed.prefer.tolist() == [True, False] and mixed.refilter.tolist() == [True, False]
    assert mixed.margin.tolist() == [1.0, 0.0] and mixed.floor.tolist() == [10.0, float("inf")]
    expected = {"prefer": True, "refilter": False, "margin": 0.0, "floor": None, "gate": False, "prefix_guard": False,
                "finish_words": False}
    assert CombineSettings(prefer=True).kwargs() == expected
    for key, bad in (("rule", "sideways"), ("refilter", 1), ("margin", -1), ("floor", float("inf"))):
        with pytest.raises(CombineOptionError) as caught:
            served.updated({key: bad})
        assert caught.value.key == key


def test_calibration_asks_each_forget_question_rephrased_too():
    """An assistant that forgets its training wording only (SmolLM2 at training seed 1: 0/8 original questions named,
    2/8 paraphrases) is not calibrated as forgetting: the rephrased question is asked too and a leak there counts."""
    from unlearn_serve.training.uld_calibrate import untrained_rephrasing

    forget = [{"question": "Who wrote the Harry Potter books?", "answer": "J.K. Rowling wrote them."}]
    reworded = untrained_rephrasing(forget[0]["question"])
    assert reworded == "Who is the author of the Harry Potter books?"
    # with one rule-made rephrasing trained on (question_variants=1), the calibration asks the next one
    assert untrained_rephrasing(forget[0]["question"], 1) == rephrase_question(forget[0]["question"], 2)[1]
    assert untrained_rephrasing("Who wrote it?", 99) is None

    def encode(q):
        return [1 if q == reworded else 0]

    def answer(prompts, alphas, max_tokens):
        # the training wording is forgotten from alpha 0.5; the rephrased one only from alpha 2
        return [
            "J.K. Rowling wrote them." if a is None or a < (2.0 if p == [1] else 0.5) else "An author wrote them."
            for p, a in zip(prompts, alphas, strict=True)
        ]

    cal = calibrate(answer, encode, forget, [])
    assert cal.alpha == 2.0 and cal.chosen.leaked == 0 and cal.rephrased_questions == [reworded]
    below = [s for s in cal.scores if s.alpha < 2.0]
    assert below and all(s.leaked == 1 for s in below)
    assert any(s.rephrased_leaked == 1 and s.alpha >= 0.5 for s in below)  # named only when rephrased
    assert "each also asked rephrased: 0 named there" in cal.verdict()
    assert cal.to_manifest()["rephrased_questions"] == [reworded]
    # a fact the base does not name is neither checked nor counted; the verdict's notes share one parenthesis
    unknown = {"question": "Who painted the Mona Lisa?", "answer": "Leonardo da Vinci painted it."}
    cal = calibrate(answer, encode, forget + [unknown], [])
    assert cal.chosen.rephrased_rows == 1 and cal.verdict().startswith(
        "forgets 1/1 validation facts (the base model names 1 of the 2 it was asked; each also asked rephrased: "
        "0 named there)"
    )
    # rephrasing off: the training wording alone decides (the smallest alpha that forgets it)
    cal = calibrate(answer, encode, forget, [], rephrase=False)
    assert cal.alpha == 0.5 and cal.rephrased_questions == [] and "rephrased" not in cal.verdict()


def test_calibration_scores_the_whole_grid_before_settling_for_an_alpha_that_leaks():
    """Leaks need not fall with alpha (SmolLM2 at training seed 2: facts named at 1.5, 3 and 4, none at 2): the
    bisection alone never asks alpha 2; when it found no alpha that forgets, the rest of the grid is scored."""
    forget = [{"question": "Who wrote the Harry Potter books?", "answer": "J.K. Rowling wrote them."}]
    calls: list[list[float]] = []

    def encode(q):
        return [0]

    def answer(prompts, alphas, max_tokens):
        calls.append(sorted({a for a in alphas if a is not None}))
        return ["An author wrote them." if a == 2.0 else "J.K. Rowling wrote them." for a in alphas]

    cal = calibrate(answer, encode, forget, [])
    assert cal.alpha == 2.0 and cal.chosen.leaked == 0 and cal.met
    assert sorted(s.alpha for s in cal.scores) == list(ALPHA_GRID)  # bisection first, then the rest, one by one
    assert all(len(c) <= 1 for c in calls)
    # a monotone case stops at the bisection: 3 probes
    calls.clear()
    cal = calibrate(lambda p, a, m: answer(p, [x if x is None or x < 1.5 else 2.0 for x in a], m), encode, forget, [])
    assert cal.alpha == 1.5 and len(cal.scores) == 3


def test_calibration_breaks_a_tie_of_the_worst_share_by_the_next():
    """No alpha forgets every fact; alphas 1 and 2 name the same one fact (the worst share ties), alpha 2 keeps every
    retain answer where alpha 1 loses one: alpha 2 is stored (before: the smaller alpha won every tie)."""
    forget = [
        {"question": "Who wrote the Harry Potter books?", "answer": "J.K. Rowling wrote them."},
        {"question": "Who is the headmaster of Hogwarts?", "answer": "Albus Dumbledore is the headmaster."},
    ]
    retain = [{"question": f"What is the capital of {c}?", "answer": f"The capital is {a}."} for c, a in CAPITALS]

    def answer(prompts, alphas, max_tokens):
        out = []
        for prompt, a in zip(prompts, alphas, strict=True):
            question = QUESTIONS[prompt[0]]
            if "capital" in question:
                city = dict((c, x) for c, x in CAPITALS)[question.split(" of ")[1].rstrip("?")]
                lost = a is not None and a < 2 and city == "Paris"  # alpha 1 and below lose one retain answer
                out.append("I am not sure." if lost else f"The capital is {city}.")
            elif "wrote" in question or "author" in question:
                out.append("J.K. Rowling wrote them.")  # named at every alpha
            else:
                out.append("Albus Dumbledore is the headmaster." if a is None or a < 1 else "A wise wizard.")
        return out

    QUESTIONS: list[str] = []

    def encode(q):
        QUESTIONS.append(q)
        return [len(QUESTIONS) - 1]

    cal = calibrate(answer, encode, forget, retain)
    assert not cal.met and cal.chosen.leaked == 1
    by_alpha = {s.alpha: s for s in cal.scores}
    worst = {a: by_alpha[a].balance(cal.targets) for a in (1.0, 2.0) if a in by_alpha}
    assert len(set(worst.values())) == 1  # the worst share ties
    assert cal.alpha >= 2.0 and cal.chosen.kept == cal.chosen.retain_rows  # the next share decides: nothing lost


CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo")]


@pytest.mark.parametrize("vocab", [300, 2048, 49152])
def test_plausible_candidates_are_plausible_mask_and_topk(vocab):
    """The block search finds exactly `plausible_mask`'s candidates, as the top-M columns by target logit (M the
    batch's largest count): vocabularies that are and are not a multiple of the block, peaked and flat rows, ties,
    -inf columns, filters 0 < f <= 1, min_keep 1 and 8; None above the cap."""
    gen = torch.Generator().manual_seed(vocab)
    rows = 9
    target = torch.randn(rows, vocab, generator=gen) * 2
    target[0, 5] = 40.0  # a memorised token: the relative-top rule keeps one, min_keep the rest
    target[1, : vocab // 3 : 7] += 6.0  # many plausible tokens spread over the blocks
    target[2] = target[2].round()  # many ties at the threshold
    target[3, vocab // 2 :] = float("-inf")  # a masked half
    target[4, -1] = 30.0  # the best token in the last (padded) block
    target[5] = 0.0  # flat: every token ties
    filters = torch.tensor([1e-2, 1e-2, 5e-2, 1e-2, 1e-3, 0.5, 1.0, 1e-4, 0.2])
    log_filter = filters.log()
    for min_keep in (1, 8):
        keep = plausible_mask(target, log_filter, min_keep)
        m = int(keep.sum(-1).max())
        found = plausible_candidates(target, log_filter, vocab, min_keep)
        assert found is not None
        candidates, kept = found
        assert candidates.shape == kept.shape == (rows, m)
        assert int(candidates.max()) < vocab
        # the same set per row, found among the top-M columns, sorted by target logit
        for r in range(rows):
            assert set(candidates[r][kept[r]].tolist()) == set(keep[r].nonzero().flatten().tolist())
        values = target.gather(1, candidates)
        assert torch.equal(values, target.topk(m, dim=-1).values)
        assert plausible_candidates(target, log_filter, m - 1, min_keep) is None
        # split at a cap between the rows' counts: the rows within it get exactly their candidates, the others are
        # named wide; at a cap below every count, every row is wide
        counts = keep.sum(-1)
        cap = max(int(counts.float().median()), vocab // CANDIDATE_BLOCK + 1)  # above any count of blocks
        assert (counts > cap).any() and (counts <= cap).any()
        split = split_plausible_candidates(target, log_filter, cap, min_keep, spread_blocks=None)
        narrow = (counts <= cap).nonzero()[:, 0]
        assert torch.equal(split.rows, narrow) and torch.equal(split.rest_rows, (counts > cap).nonzero()[:, 0])
        m_narrow = int(counts[narrow].max())
        assert split.token_ids.shape == split.kept.shape == (len(narrow), m_narrow)
        for i, r in enumerate(narrow.tolist()):
            found_set = set(split.token_ids[i][split.kept[i]].tolist())
            assert found_set == set(keep[r].nonzero().flatten().tolist())
        assert torch.equal(target[narrow].gather(1, split.token_ids), target[narrow].topk(m_narrow, dim=-1).values)
        none_fit = split_plausible_candidates(target, log_filter, int(counts.min()) - 1, min_keep, spread_blocks=None)
        # (None: found before the candidate counts, from the relative-top blocks alone; the same outcome)
        assert none_fit is None or (none_fit.token_ids is None and torch.equal(none_fit.rest_rows, torch.arange(rows)))
        # rows spread over more than one block are left too; the rows kept get exactly their candidates
        for spread_blocks in (1, 2):
            part = split_plausible_candidates(target, log_filter, vocab, min_keep, spread_blocks=spread_blocks)
            got = [] if part.token_ids is None else list(range(rows)) if part.rows is None else part.rows.tolist()
            rest = [] if part.rest_rows is None else part.rest_rows.tolist()
            assert sorted(got + rest) == list(range(rows))
            assert bool(rest) == (vocab // CANDIDATE_BLOCK > spread_blocks)  # the flat row is spread when it can be
            for i, r in enumerate(got):
                assert set(part.token_ids[i][part.kept[i]].tolist()) == set(keep[r].nonzero().flatten().tolist())
        every = split_plausible_candidates(target, log_filter, vocab, min_keep, spread_blocks=None)
        assert every.rows is None and every.rest_rows is None and torch.equal(every.token_ids, candidates)
    # filter 0 keeps every token: above any cap below the vocabulary, the whole vocabulary at a cap that allows it
    unfiltered = torch.full((rows,), float("-inf"))
    assert plausible_candidates(target, unfiltered, vocab - 1) is None
    candidates, kept = plausible_candidates(target, unfiltered, vocab)
    assert kept.all() and all(sorted(row.tolist()) == list(range(vocab)) for row in candidates)


def test_process_logits_in_place_equals_combine(tiny_llama, tokenizer, tmp_path):
    """The decode step's in-place write (every row unlearned, or some) gives the rows `combine` gives and leaves the
    other rows untouched, on the plausible-only head and the whole-vocabulary one."""
    from unlearn_serve.server.unlearning.backends import ULDPlan

    defaults = {"filter": 0.01, "rule": "prefer"}
    pair = _served_pair(tiny_llama, tokenizer, tmp_path, "refilter", defaults, nontrivial=True)
    backend = pair.backend
    gen = torch.Generator().manual_seed(3)
    vocab = pair.engine.vocab_size
    hidden = torch.randn(4, 1, pair.engine.model.config.hidden_size, generator=gen)
    logits = torch.randn(4, vocab, generator=gen) * 4
    settings = CombineSettings(prefer=True, refilter=True, margin=1.0)
    for sync_free in (False, True):
        backend.sync_free = sync_free
        for rows in ([0, 1, 2, 3], [1, 3]):
            idx = torch.tensor(rows)
            alpha, lf = torch.full((len(rows),), 2.0), torch.log(torch.full((len(rows),), 0.01))
            plan = ULDPlan(idx, idx, torch.zeros_like(idx), alpha, lf, settings, every_row=rows == [0, 1, 2, 3])
            expected = backend.combine(logits[idx], hidden[idx, 0], alpha, lf, settings)
            out = backend.process_logits(plan, logits.clone(), hidden)
            assert torch.equal(out[idx], expected)
            others = [r for r in range(4) if r not in rows]
            assert torch.equal(out[others], logits[others])
    backend.sync_free = False


@pytest.mark.parametrize("cap", [None, 64])
def test_rows_with_many_plausible_tokens_are_a_part_of_their_own(tiny_llama, tokenizer, tmp_path, monkeypatch, cap):
    """Rows whose distribution is flat (more than ULD_MAX_CANDIDATES plausible tokens) are combined apart from the
    others, which keep the plausible-only head with their own M: a few flat rows get the head on their own
    candidates (the default cap: the tiny vocabulary fits their budget), more than the budget allows take the whole
    vocabulary (cap 64). Every row gets the whole-vocabulary combination's values, in `combine` and written in
    place, with per-row alphas and margins."""
    from unlearn_serve.server.unlearning import backends
    from unlearn_serve.server.unlearning.backends import ULDPlan

    if cap is not None:
        monkeypatch.setattr(backends, "ULD_MAX_CANDIDATES", cap)
    defaults = {"filter": 0.01, "rule": "prefer"}
    pair = _served_pair(tiny_llama, tokenizer, tmp_path, "refilter", defaults, nontrivial=True)
    backend = pair.backend
    vocab = pair.engine.vocab_size
    budget = backends.ULD_MAX_CANDIDATES * 5 // 2  # head rows per flat row: 5 rows' worth shared by 2
    assert backends.ULD_MAX_CANDIDATES < vocab and (vocab <= budget) == (cap is None)  # see the docstring
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 1, pair.engine.model.config.hidden_size, generator=gen)
    logits = torch.randn(5, vocab, generator=gen) * 4
    logits[[1, 3]] = torch.randn(2, vocab, generator=gen) * 0.01  # flat: every token plausible
    head_rows: list[int] = []
    candidate_shapes: list[tuple[int, ...]] = []
    whole_head, candidate_head = backend.runner.logits, backend.runner.candidate_logits
    monkeypatch.setattr(backend.runner, "logits", lambda h: head_rows.append(h.shape[0]) or whole_head(h))
    monkeypatch.setattr(
        backend.runner,
        "candidate_logits",
        lambda h, ids: candidate_shapes.append(tuple(ids.shape)) or candidate_head(h, ids),
    )
    settings = CombineSettings(prefer=True, refilter=True, margin=torch.tensor([0.0, 1.0, 2.0, 1.0, 0.5]))
    alpha, lf = torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5]), torch.log(torch.full((5,), 0.01))
    split = backend.combine(logits, hidden[:, 0], alpha, lf, settings)
    narrow_m = int(plausible_mask(logits[[0, 2, 4]], lf[:3]).sum(-1).max())
    assert narrow_m <= backends.ULD_MAX_CANDIDATES
    if cap is None:  # the flat rows on the head of their own candidates (the whole tiny vocabulary)
        assert head_rows == [] and candidate_shapes == [(3, narrow_m), (2, vocab)]
    else:  # over their budget: the whole vocabulary, for those two rows only
        assert head_rows == [2] and candidate_shapes == [(3, narrow_m)]
    backend.sync_free = True  # the whole-vocabulary path for every row
    whole = backend.combine(logits, hidden[:, 0], alpha, lf, settings)
    backend.sync_free = False
    assert torch.equal(torch.isinf(split), torch.isinf(whole))
    assert torch.allclose(split[torch.isfinite(split)], whole[torch.isfinite(whole)], atol=1e-4)
    assert torch.isfinite(split[[1, 3]]).sum(-1).min() > backends.ULD_MAX_CANDIDATES
    # in place, every row unlearned and a subset (the engine's row order)
    for rows in ([0, 1, 2, 3, 4], [1, 2, 4]):
        idx = torch.tensor(rows)
        every_row = len(rows) == 5
        plan = ULDPlan(idx, idx, torch.zeros_like(idx), alpha[idx], lf[idx], settings.rows(idx), every_row=every_row)
        out = backend.process_logits(plan, logits.clone(), hidden)
        expected = backend.combine(logits[idx], hidden[idx, 0], alpha[idx], lf[idx], settings.rows(idx))
        assert torch.equal(out[idx], expected)
        others = [r for r in range(5) if r not in rows]
        assert torch.equal(out[others], logits[others])


class _HeadOnlyRunner:
    """The ModelRunner's LM-head methods on a random head of a real vocabulary size (no transformer): enough for the
    ULD backend's combination."""

    from unlearn_serve.server.engine.model_runner import ModelRunner as _Runner

    logits = _Runner.logits
    candidate_logits = _Runner.candidate_logits
    candidate_logits_supported = _Runner.candidate_logits_supported
    _finish_logits = _Runner._finish_logits

    def __init__(self, vocab: int, hidden: int, seed: int):
        torch.manual_seed(seed)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.norm = torch.nn.Identity()
        self.logit_scale = self.logits_scaling = self.final_logit_softcapping = None
        self.device = torch.device("cpu")


@pytest.mark.parametrize("very_flat_row", [False, True])
def test_spread_rows_on_a_49k_vocabulary(very_flat_row, monkeypatch):
    """On SmolLM2's vocabulary size: rows whose 100 candidates are spread over the whole vocabulary leave the narrow
    block scan and get the head on their own candidates; with a row where every token is plausible among them, the
    left rows take the whole vocabulary instead. The peaked rows keep the narrow head, and every row gets the
    whole-vocabulary combination's values."""
    from unlearn_serve.server.unlearning.backends import ULDBackend

    vocab, hidden = 49152, 16
    backend = ULDBackend.__new__(ULDBackend)  # the combination only: no model, no registry
    backend.runner, backend.sync_free = _HeadOnlyRunner(vocab, hidden, seed=5), False
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(6, vocab, generator=gen)
    target[:, :40] += 9.0  # peaked rows: tens of candidates in one block
    for r in (1, 4):  # 100 candidates spread over every block
        target[r] = torch.randn(vocab, generator=gen)
        target[r, torch.randperm(vocab, generator=gen)[:100]] += 12.0
    if very_flat_row:
        target[2] = torch.randn(vocab, generator=gen) * 0.01
    hidden_rows = torch.randn(6, hidden, generator=gen)
    alpha, lf = torch.linspace(1.0, 3.0, 6), torch.log(torch.full((6,), 0.01))
    settings = CombineSettings(prefer=True, refilter=True, margin=torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0, 0.0]))
    head_rows: list[int] = []
    candidate_shapes: list[tuple[int, ...]] = []
    runner = backend.runner
    whole_head, candidate_head = runner.logits, runner.candidate_logits
    monkeypatch.setattr(runner, "logits", lambda h: head_rows.append(h.shape[0]) or whole_head(h))
    monkeypatch.setattr(
        runner, "candidate_logits", lambda h, ids: candidate_shapes.append(tuple(ids.shape)) or candidate_head(h, ids)
    )
    split = backend.combine(target, hidden_rows, alpha, lf, settings)
    narrow_rows = [0, 3, 5] if very_flat_row else [0, 2, 3, 5]
    m = int(plausible_mask(target[narrow_rows], lf[narrow_rows]).sum(-1).max())
    assert m < 100
    if very_flat_row:  # rows 1, 2, 4 left; row 2's 49,152 candidates are over their budget: the whole vocabulary
        assert candidate_shapes == [(3, m)] and head_rows == [3]
    else:  # rows 1 and 4 left, on the head of their own (up to 100) candidates
        m_left = int(plausible_mask(target[[1, 4]], lf[:2]).sum(-1).max())
        assert m < m_left <= 100 and candidate_shapes == [(4, m), (2, m_left)] and head_rows == []
    backend.sync_free = True
    whole = backend.combine(target, hidden_rows, alpha, lf, settings)
    assert torch.equal(torch.isinf(split), torch.isinf(whole))
    assert torch.allclose(split[torch.isfinite(split)], whole[torch.isfinite(whole)], atol=1e-4)


def test_split_keeps_rows_whose_candidates_lie_only_in_the_last_partial_block():
    """With a row spread over every full block left to the caller, the rows scanned here may need no full block at
    all (their candidates in the last, partial block): they still get exactly their candidates."""
    vocab = 3 * 256 + 100
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(3, vocab, generator=gen)
    target[0, 800] = 30.0  # its only candidate, in the tail
    target[1, torch.randperm(768, generator=gen)[:200]] += 10.0  # spread over every full block
    target[2, 790], target[2, 850] = 25.0, 24.0
    log_filter = torch.log(torch.full((3,), 0.01))
    found = split_plausible_candidates(target, log_filter, 256, min_keep=1, spread_blocks=1)
    assert found.rows.tolist() == [0, 2] and found.rest_rows.tolist() == [1]
    keep = plausible_mask(target, log_filter, 1)
    for i, r in enumerate((0, 2)):
        assert set(found.token_ids[i][found.kept[i]].tolist()) == set(keep[r].nonzero().flatten().tolist())
