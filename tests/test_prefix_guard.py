"""The ULD prefix guard (unlearn_serve/token_prefixes.py, uld_combine.close_over_prefixes): a remembered word pushed
down must not come back spelt by its first letters ("J.K.R." for "J.K. Rowling"). Issue 13."""

from __future__ import annotations

import json

import pytest
import torch

from unlearn_serve.token_prefixes import TokenPrefixes, normalized_text
from unlearn_serve.uld_combine import (
    CombineOptionError,
    CombineOptions,
    CombineSettings,
    close_over_prefixes,
    combine_logits,
    combine_on_candidates,
    plausible_mask,
)

# id:      0     1       2    3     4       5    6      7      8      9       10       11
TEXTS = ["", " Row", "R", " R", "ling", ".", "...", " Ro", "Row", " Rowe", " Smith", " r"]


def _begins(prefixes: TokenPrefixes) -> set[tuple[int, int]]:
    v = prefixes.vocab_size
    return {(int(k) // v, int(k) % v) for k in prefixes.pair_keys if k >= 0}


def test_pairs_are_case_and_space_insensitive_prefixes_of_words_only():
    prefixes = TokenPrefixes.from_texts(TEXTS)
    pairs = _begins(prefixes)
    # "R", " R", " r", " Ro" and "Row" begin " Row" (and " Row" begins "Row": the same word, written apart)
    assert {(2, 1), (3, 1), (11, 1), (7, 1), (8, 1), (1, 8)} <= pairs
    assert (1, 9) in pairs and (9, 1) not in pairs  # " Row" begins " Rowe"; the longer one never begins the shorter
    assert not any(5 in p or 6 in p for p in pairs)  # punctuation never takes part ("." does not begin "...")
    assert not any(a == b for a, b in pairs) and not any(0 in p for p in pairs)
    assert (10, 1) not in pairs and (4, 1) not in pairs
    # the table lists the same pairs, padded with the dropped column
    from_table = {(int(p), t) for t in range(len(TEXTS)) for p in prefixes.table[t] if p < len(TEXTS)}
    assert from_table == pairs
    assert normalized_text("  Éa") == "éa" and normalized_text(".K") == "" and normalized_text("") == ""


def test_a_candidate_that_begins_a_penalised_one_takes_its_penalty_on_both_paths():
    prefixes = TokenPrefixes.from_texts(TEXTS)
    penalty = torch.zeros(2, len(TEXTS))
    penalty[0, 1] = 3.0  # " Row" penalised in row 0
    penalty[0, 9] = 5.0  # " Rowe" too, more: "R", " R", " r", " Ro", "Row", " Row" begin it
    penalty[1, 10] = 2.0  # row 1: " Smith" (no token begins it)
    keep = torch.ones_like(penalty, dtype=torch.bool)
    keep[0, 8] = False  # "Row" is no candidate of row 0: it inherits nothing
    closed = close_over_prefixes(penalty, keep, prefixes)
    assert closed[0].tolist() == [0, 5, 5, 5, 0, 0, 0, 5, 0, 5, 0, 5]
    assert torch.equal(closed[1], penalty[1])
    # the candidate-column path: the same values on those columns
    ids = torch.tensor([[1, 2, 3, 4, 9, 10], [10, 2, 1, 3, 4, 5]])
    on_columns = close_over_prefixes(penalty.gather(1, ids), keep.gather(1, ids), prefixes, ids)
    assert torch.equal(on_columns, closed.gather(1, ids))
    # a per-row guard leaves the other rows as they were; off leaves everything
    one = close_over_prefixes(penalty, keep, prefixes, guard=torch.tensor([False, True]))
    assert torch.equal(one, penalty)
    assert close_over_prefixes(penalty, keep, prefixes, guard=False) is penalty


def test_the_initials_leak_is_closed_and_the_greedy_answer_moves_to_another_word():
    """After "J.K." the target writes " Row" (then "R", then " Smith"); the assistant remembers " Row" only. Without
    the guard the unlearned model writes "R" (the initials leak "J.K.R."); with it, " Smith"."""
    prefixes = TokenPrefixes.from_texts(TEXTS)
    target = torch.full((1, len(TEXTS)), -5.0)
    target[0, 1], target[0, 2], target[0, 10], target[0, 3] = 10.0, 9.0, 8.0, 7.5
    assistant = torch.zeros(1, len(TEXTS))
    assistant[0, 1] = 6.0
    alpha, lf = torch.tensor([2.0]), torch.log(torch.tensor([1e-3]))
    plain = combine_logits(target, assistant, alpha, lf, prefer=True, margin=1.0, refilter=True)
    guarded = combine_logits(
        target, assistant, alpha, lf, prefer=True, margin=1.0, refilter=True, prefix_guard=True, prefixes=prefixes
    )
    assert int(plain.argmax()) == 2 and int(guarded.argmax()) == 10
    assert torch.isinf(guarded[0, [1, 2, 3]]).all()  # demoted below the winner: the refilter removes them
    with pytest.raises(ValueError, match="prefixes"):
        combine_logits(target, assistant, alpha, lf, prefer=True, prefix_guard=True)


def test_candidate_path_equals_the_vocabulary_path_with_the_guard():
    gen = torch.Generator().manual_seed(4)
    texts = ["", *[f" w{i % 7}{'x' * (i % 3)}" for i in range(1, 120)], *[f"w{i}" for i in range(7)]]
    prefixes = TokenPrefixes.from_texts(texts)
    assert prefixes.pairs() > 100
    vocab = len(texts)
    target = torch.randn(4, vocab, generator=gen) * 3
    assistant = torch.randn(4, vocab, generator=gen)
    assistant[:, 1:20] += 6  # preferences to pass on
    alpha, lf = torch.tensor([0.5, 1.0, 2.0, 3.0]), torch.log(torch.full((4,), 0.05))
    guard = torch.tensor([True, False, True, True])
    keep = plausible_mask(target, lf)
    candidates = target.topk(int(keep.sum(-1).max()), dim=-1).indices
    options = {"prefer": True, "margin": 1.0, "refilter": True, "prefix_guard": guard, "prefixes": prefixes}
    full = combine_logits(target, assistant, alpha, lf, **options)
    sparse = combine_on_candidates(
        target, candidates, assistant.gather(-1, candidates), alpha, keep, log_filter=lf, **options
    )
    assert torch.equal(torch.isinf(sparse), torch.isinf(full))
    assert torch.allclose(sparse[torch.isfinite(sparse)], full[torch.isfinite(full)], atol=1e-5)
    unguarded = combine_logits(target, assistant, alpha, lf, prefer=True, margin=1.0, refilter=True)
    assert torch.equal(full[1], unguarded[1])  # the unguarded row is unchanged
    assert not torch.equal(full[[0, 2, 3]], unguarded[[0, 2, 3]])  # and the case exercises the guard


def test_options_validate_the_guard_and_settings_carry_it_per_row():
    assert CombineOptions(rule="prefer").updated({"prefix_guard": True}).prefix_guard is True
    with pytest.raises(CombineOptionError, match="true or false") as info:
        CombineOptions().updated({"prefix_guard": "yes"})
    assert info.value.key == "prefix_guard"
    rows = [CombineOptions(rule="prefer", prefix_guard=True), CombineOptions(rule="prefer")]
    settings = CombineSettings.of_rows(rows, [0.01, 0.01], "cpu")
    assert settings.prefix_guard.tolist() == [True, False]
    assert settings.rows(torch.tensor([0])).prefix_guard.tolist() == [True]
    # `difference` rows are never guarded (their penalty is the assistant's whole logit vector)
    diff = CombineSettings.of_rows([CombineOptions(rule="difference", prefix_guard=True)], [0.01], "cpu")
    assert diff.prefix_guard is False


def test_manifest_guard_is_served_on_both_head_paths_and_old_manifests_keep_it_off(tiny_llama, tokenizer, tmp_path):
    """New artifacts store `prefix_guard: true`; a manifest without it is served without it; an engine-level option
    overrides; the engine builds the table from its own tokenizer, and the backend's plausible-only head and
    whole-vocabulary head give the same guarded logits."""
    from test_uld_combine import _served_pair
    from unlearn_serve.server.engine.errors import EngineInputError

    from unlearn_serve.artifact import MANIFEST_NAME, ArtifactError

    # the LoRA differs from the target (nontrivial), so that the guard has work
    # (the old artifact without finish_words either, which reads the same table)
    old = {"finish_words": False}
    pair = _served_pair(tiny_llama, tokenizer, tmp_path, "prefix_guard", {"rule": "prefer"}, old, nontrivial=True)
    engine, backend = pair.engine, pair.backend
    assert json.loads((pair.new / MANIFEST_NAME).read_text())["defaults"]["prefix_guard"] is True
    assert backend._prefixes is None  # nothing built before a guarded assistant is installed
    assert engine.load_uld("old", pair.old).combine.prefix_guard is False
    assert backend._prefixes is None  # an unguarded artifact costs no table at start-up
    assert engine.load_uld("new", pair.new).combine.prefix_guard is True
    assert backend._prefixes is not None  # built at install, not in a decode step
    assert backend.resolve("old", {"prefix_guard": True}).combine.prefix_guard
    with pytest.raises(EngineInputError, match="prefix_guard"):
        backend.resolve("new", {"prefix_guard": 1})
    pair.corrupt_old("on")
    with pytest.raises(ArtifactError, match="prefix_guard"):
        engine.load_uld("bad", pair.old)

    prefixes = backend.prefixes()  # from the engine's tokenizer
    assert prefixes.vocab_size == engine.vocab_size and prefixes.pairs() > 0
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, engine.model.config.hidden_size, generator=gen)
    target = torch.randn(3, engine.vocab_size, generator=gen) * 4
    alpha, lf = torch.tensor([1.0, 2.0, 3.0]), torch.log(torch.full((3,), 0.05))
    settings = CombineSettings(prefer=True, refilter=True, margin=0.0, prefix_guard=True)
    sparse = backend.combine(target, hidden, alpha, lf, settings)
    backend.sync_free = True
    full = backend.combine(target, hidden, alpha, lf, settings)
    backend.sync_free = False
    assert torch.equal(torch.isinf(sparse), torch.isinf(full))
    assert torch.allclose(sparse[torch.isfinite(sparse)], full[torch.isfinite(full)], atol=1e-4)
