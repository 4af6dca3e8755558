"""The repeat guard: where the unlearning replaced the target's best token, the substitute never completes an n-gram
the answer already holds, and (the engine's default) from there on neither does any later token of that answer; every
answer the unlearning never changed, and every answer without unlearning, is untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from test_uld_serving import make_random_assistant
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.repeat_guard import guard_substitutions, repeat_completions, substituted_rows
from unlearn_serve.server.engine.sampler import row_argmax
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Selection

from unlearn_serve.evaluation.trace import trace_served

PROMPTS = ["The capital of France is", "Once upon a time", "Hello", "A B C D E F G H", "the the the", "Paris is"]


def _banned(history: list[list[int]], lengths: list[int], n: int) -> list[set[int]]:
    followers, repeats = repeat_completions(torch.tensor(history), torch.tensor(lengths), n)
    return [set(f[r].tolist()) for f, r in zip(followers, repeats, strict=True)]


def test_repeat_completions_lists_the_tokens_that_would_repeat_an_ngram():
    history = [[5, 6, 7, 5, 6, 0, 0], [1, 2, 3, 4, 0, 0, 0], [5, 7, 3, 7, 5, 0, 0], [4, 0, 0, 0, 0, 0, 0]]
    lengths = [5, 4, 5, 1]
    # trigram: row 0 ends "5 6" and "5 6 7" was written; padding past the length never counts
    assert _banned(history, lengths, 3) == [{7}, set(), set(), set()]
    assert _banned(history, lengths, 2) == [{7}, set(), {7}, set()]  # bigram: row 2 ends with 5, "5 7" was written
    assert _banned(history, lengths, 1)[1] == {1, 2, 3, 4}  # unigram: every token already written
    assert _banned(history, lengths, 8) == [set()] * 4  # longer than the history


def test_repeat_completions_bans_a_third_copy_of_one_token():
    """ "fantasy fantasy" must not become "fantasy fantasy fantasy" (a loop by `has_loop`) although no trigram repeats
    yet; one copy, or two apart, is no run."""
    history = [[4, 9, 9, 0, 0, 0], [9, 9, 4, 0, 0, 0], [9, 0, 0, 0, 0, 0], [7, 7, 7, 7, 0, 0]]
    lengths = [3, 3, 1, 2]  # row 3: only "7 7" is real
    assert _banned(history, lengths, 3) == [{9}, set(), set(), {7}]
    assert _banned(history, lengths, 2)[0] == {9}


def test_the_guard_acts_only_where_the_unlearning_changed_the_winner():
    inf = float("inf")
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 3.0, 2.0, 1.0], [0.0, 3.0, -inf, -inf], [0.0, 3.0, 2.0, 1.0]])
    target_best = torch.tensor([1, 0, 0, 0])  # row 0: the target's own choice; rows 1-3: substituted
    # token 1 follows in a repeating window everywhere; row 3 also lists it in a window that does not repeat (and
    # after it, so a last-write-wins scatter would lose the ban); row 2 lists token 0 too: nothing finite would be left
    followers = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]])
    repeats = torch.tensor([[True, False], [True, False], [True, True], [True, False]])
    guarded = guard_substitutions(logits.clone(), target_best, followers, repeats)
    assert torch.equal(guarded[0], logits[0])  # not substituted: untouched, though token 1 would repeat
    assert guarded[1].argmax() == 2 and guarded[1, 1] == -inf  # the repeat removed, the next one wins
    assert torch.equal(guarded[2], logits[2])  # every finite candidate would repeat: the row keeps its logits
    assert torch.equal(guarded[3], guarded[1])


def test_a_diverged_row_is_guarded_at_every_later_position():
    """`diverged`: a row the unlearning changed earlier is guarded though its winner is now the target's own; the
    state is updated in place with this step's substitutions, and a row never changed stays untouched."""
    inf = float("-inf")
    logits = torch.tensor([[0.0, 3.0, 2.0], [0.0, 3.0, 2.0], [0.0, 3.0, 2.0]])
    target_best = torch.tensor([1, 1, 0])  # rows 0, 1: the target's own winner; row 2: substituted now
    followers = torch.tensor([[1], [1], [1]])
    repeats = torch.tensor([[True], [True], [True]])
    diverged = torch.tensor([True, False, False])
    guarded = guard_substitutions(logits.clone(), target_best, followers, repeats, diverged)
    assert guarded[0, 1] == inf and guarded[0].argmax() == 2  # changed before: the target's own repeat is removed
    assert torch.equal(guarded[1], logits[1])  # never changed: the target's own answer
    assert guarded[2, 1] == inf
    assert diverged.tolist() == [True, False, True]
    assert substituted_rows(logits, target_best).tolist() == [False, False, True]


@pytest.mark.parametrize("vocab", [512, 1000, 49152])
def test_row_argmax_is_argmax(vocab):
    x = torch.randn(12, vocab, generator=torch.Generator().manual_seed(vocab))
    x[1] = 0.0  # all tied: the first index
    x[2, vocab - 1] = 100.0  # the last column
    x[3] = float("-inf")
    x[4, 300 % vocab] = x[4, 10] = 50.0  # a tie across blocks: the first one
    x[5, 7] = float("inf")
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert torch.equal(row_argmax(x[::2]), x[::2].argmax(dim=-1))  # every other row: not contiguous
    assert torch.equal(row_argmax(x.t().contiguous().t()), x.argmax(dim=-1))  # column-major


def _substituted_repeats(trace, n: int) -> int:
    """Substituted positions whose n-gram (ending there) already occurs earlier in the answer."""
    tokens, count = trace.tokens, 0
    for i, changed in enumerate(trace.substituted):
        gram = tokens[i - n + 1 : i + 1]
        if changed and i >= n - 1 and any(tokens[j : j + n] == gram for j in range(i - n + 1)):
            count += 1
    return count


@pytest.fixture(scope="module")
def strong_assistant(tiny_llama, tmp_path_factory):
    """A random assistant subtracted hard (raw difference, alpha 20): it changes many tokens of every answer."""
    defaults = {"alpha": 20.0, "rule": "difference", "refilter": False}
    return make_random_assistant(tiny_llama, tmp_path_factory.mktemp("guard") / "a", 2, seed=0, defaults=defaults)


def _repeats_after_first_substitution(trace, n: int) -> int:
    """Positions after the answer's first substitution (itself included) whose n-gram already occurs earlier in the
    answer, or that write one token a third time in a row."""
    tokens, count = trace.tokens, 0
    first = next((i for i, changed in enumerate(trace.substituted) if changed), len(tokens))
    for i in range(first, len(tokens)):
        gram = tokens[i - n + 1 : i + 1]
        repeat = i >= n - 1 and any(tokens[j : j + n] == gram for j in range(i - n + 1))
        count += repeat or (i >= 2 and tokens[i] == tokens[i - 1] == tokens[i - 2])
    return count


@pytest.fixture(scope="module")
def weak_assistant(tiny_llama, tmp_path_factory):
    """A random assistant subtracted lightly (alpha 3): it changes four of the six answers, at a few positions, and the
    tiny target then repeats itself on its own."""
    defaults = {"alpha": 3.0, "rule": "difference", "refilter": False}
    return make_random_assistant(tiny_llama, tmp_path_factory.mktemp("weak") / "a", 2, seed=0, defaults=defaults)


def _serve(model, tokenizer, artifact, n: int, selection, after_substitution: bool = True):
    config = EngineConfig(
        max_model_len=96, max_num_seqs=8, no_repeat_substitution=n, repeat_guard_after_substitution=after_substitution
    )
    engine = Engine(copy.deepcopy(model), tokenizer, config)
    engine.load_uld("a", artifact)
    prompts = [engine.encode_prompt(p) for p in PROMPTS]
    results = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0), selection)
    return engine, prompts, [r.completions[0] for r in results]


@pytest.mark.parametrize("n", [2, 3])
def test_served_substitutions_never_repeat_an_ngram(tiny_llama, tokenizer, strong_assistant, n):
    repeats = {}
    for size in (0, n):
        engine, prompts, completions = _serve(tiny_llama, tokenizer, strong_assistant, size, "a")
        traces = trace_served(engine, prompts, completions)
        assert sum(sum(t.substituted) for t in traces) > 20  # the unlearning does act on these answers
        repeats[size] = sum(_substituted_repeats(t, n) for t in traces)
    assert repeats[0] > 0  # without the guard the substitutes repeat the answer (so the check below can fail)
    assert repeats[n] == 0


def test_after_the_first_substitution_no_position_repeats(tiny_llama, tokenizer, weak_assistant):
    """The engine's default reach: once the unlearning changed an answer, no later token (the target's own choices
    included) repeats an n-gram or writes a token a third time in a row; with the reach limited to the substituted
    positions the target's own repeats remain (so the check can fail). Answers never changed are the target's."""
    counts, changed = {}, {}
    for after in (False, True):
        engine, prompts, completions = _serve(tiny_llama, tokenizer, weak_assistant, 3, "a", after)
        traces = trace_served(engine, prompts, completions)
        counts[after] = sum(_repeats_after_first_substitution(t, 3) for t in traces)
        changed[after] = [any(t.substituted) for t in traces]
    assert counts[False] > 0 and counts[True] == 0
    plain = [c.token_ids for c in _serve(tiny_llama, tokenizer, weak_assistant, 0, None)[2]]
    served = [c.token_ids for c in _serve(tiny_llama, tokenizer, weak_assistant, 3, "a")[2]]
    assert not all(changed[True]) and any(changed[True])
    for was_changed, got, own in zip(changed[True], served, plain, strict=True):
        if not was_changed:
            assert got == own


def test_answers_without_unlearning_are_untouched(tiny_llama, tokenizer, strong_assistant):
    plain = [c.token_ids for c in _serve(tiny_llama, tokenizer, strong_assistant, 0, None)[2]]
    assert [c.token_ids for c in _serve(tiny_llama, tokenizer, strong_assistant, 3, None)[2]] == plain
    # mixed with unlearned rows in one batch: the base rows are still the target's own answers
    mixed = [None, "a"] * (len(PROMPTS) // 2)
    served = _serve(tiny_llama, tokenizer, strong_assistant, 3, mixed)[2]
    assert [c.token_ids for c, s in zip(served, mixed, strict=True) if s is None] == plain[::2]


def test_switching_the_guard_between_requests(tiny_llama, tokenizer, strong_assistant):
    """An engine built with the guard off, switched on between requests, serves what one built with it on serves;
    switching while a sequence runs is refused (its history would be incomplete), and so is a negative size."""
    from unlearn_serve.server.engine.sequence import Request

    guarded = [c.token_ids for c in _serve(tiny_llama, tokenizer, strong_assistant, 3, "a")[2]]
    engine, prompts, off = _serve(tiny_llama, tokenizer, strong_assistant, 0, "a")
    assert engine.no_repeat_substitution == 0 and [c.token_ids for c in off] != guarded
    engine.set_no_repeat_substitution(3)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    assert [r.completions[0].token_ids for r in engine.generate(prompts, params, "a")] == guarded
    with pytest.raises(ValueError, match=">= 0"):
        engine.set_no_repeat_substitution(-1)
    engine.add_request(Request(engine.new_request_id(), prompts[0], params))
    engine.step()  # admitted: it runs now
    with pytest.raises(RuntimeError, match="while no sequence runs"):
        engine.set_no_repeat_substitution(0)


def test_the_serve_flag_sets_the_guards_reach(tiny_llama_dir):
    import argparse

    from unlearn_serve.cli.serve import build_engine, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    base = ["--model", str(tiny_llama_dir), "--device", "cpu", "--max-model-len", "64", "--max-num-seqs", "2"]
    assert build_engine(parser.parse_args(base)).config.repeat_guard_after_substitution is True
    limited = build_engine(parser.parse_args([*base, "--repeat-guard-scope", "substitutions"]))
    assert limited.config.repeat_guard_after_substitution is False
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--repeat-guard-scope", "everywhere"])


def test_a_plain_answer_in_a_slot_an_unlearned_one_diverged_in_is_untouched(tiny_llama, tokenizer, strong_assistant):
    """Slot state must not leak between sequences: an unlearned answer marks its slot diverged; a plain request later
    prefilled into that slot in a batch without unlearned rows (no guard there), then decoded next to an unlearned
    row (the guard on), is still the target's own answer (which repeats itself: the check can fail)."""
    from unlearn_serve.server.engine.sequence import Request

    engine, prompts, _ = _serve(tiny_llama, tokenizer, strong_assistant, 3, "a")  # every answer changed: slots diverged
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # long plain answers that loop
    reference = _serve(tiny_llama, tokenizer, strong_assistant, 3, None)[0]
    plain = [r.completions[0].token_ids for r in reference.generate(prompts, params, None)]
    assert all(len(set(p)) < len(p) // 2 for p in plain)
    for i, prompt in enumerate(prompts):
        got: list[int] = []
        ids = [engine.new_request_id() for _ in range(2)]
        engine.add_request(Request(ids[0], prompt, params))
        outputs = engine.step()  # prefilled alone: a batch without unlearned rows
        engine.add_request(Request(ids[1], prompts[(i + 1) % len(prompts)], params, Selection("a")))
        while engine.has_work():
            outputs += engine.step()
        for out in outputs:
            if out.request_id == ids[0]:
                got += out.outputs[0].token_ids
        assert got == plain[i], i
