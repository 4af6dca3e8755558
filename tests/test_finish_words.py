"""ULD's `finish_words` option (uld_combine.finish_begun_words): where the row's last token ends inside a word, the
candidates that continue that word take no penalty, so a word begun under the unlearning is finished as the target
would ("Victor Hu" -> "go", not "Victor Hual"). Issue 13."""

from __future__ import annotations

import pytest
import torch
from test_uld_serving import (
    OPTS,
    assert_follows_reference,
    make_random_assistant,
    reference_combined_logprobs,
)
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.errors import EngineInputError
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Selection

from unlearn_serve.token_prefixes import TokenPrefixes, surface_text
from unlearn_serve.uld_combine import (
    CombineOptionError,
    CombineOptions,
    CombineSettings,
    combine_logits,
    combine_on_candidates,
    finish_begun_words,
    plausible_mask,
)

# id:      0     1      2     3    4         5     6      7
TEXTS = ["", " Hu", "go", ".", " wrote", "12", "-x", " Hugo"]
FINISH = {"finish_words": True}


def test_word_piece_flags_read_the_surface_text():
    prefixes = TokenPrefixes.from_texts(TEXTS)
    assert prefixes.starts_in_word.tolist() == [False, False, True, False, False, True, False, False]
    assert prefixes.ends_in_word.tolist() == [False, True, True, False, True, True, True, True]
    # ids beyond the texts (a padded LM head) neither start nor end inside a word
    padded = TokenPrefixes.from_texts(TEXTS, vocab_size=10)
    assert padded.starts_in_word[8:].tolist() == [False, False] and padded.ends_in_word[8:].tolist() == [False, False]


class _SentencePieceLike:
    """Decodes like a sentencepiece tokenizer: "▁" is a space, and a text's leading space is dropped."""

    pieces = ["a", "▁Hugo", "go", "<unk>"]
    unk_token_id = 3

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.pieces.index(token) if token in self.pieces else self.unk_token_id

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").lstrip(" ")


def test_surface_text_keeps_the_leading_space_a_lone_decode_drops():
    tok = _SentencePieceLike()
    assert tok.decode([1]) == "Hugo"  # what TokenPrefixes would have read before: a word start looks like a piece
    assert surface_text(tok, 1) == " Hugo" and surface_text(tok, 2) == "go"


def test_surface_texts_of_a_real_tokenizer_spell_the_text(tokenizer):
    text = "Bob plays the guitar in Paris"
    ids = tokenizer.encode(text)
    assert "".join(surface_text(tokenizer, i) for i in ids) == text
    prefixes = TokenPrefixes.from_tokenizer(tokenizer, len(tokenizer))
    # a word split in pieces: each later piece starts inside the word, the word's first piece does not
    pieces = [surface_text(tokenizer, i) for i in ids]
    assert any(p[:1].isalnum() for p in pieces[1:]), pieces  # the test needs a word in several pieces
    for i, piece in zip(ids[1:], pieces[1:], strict=True):
        assert bool(prefixes.starts_in_word[i]) == piece[:1].isalnum()


def _rows():
    """Two rows, both sure of "go" (2), whose assistant prefers "go" as much as its early exit does (a crude LM's
    word ending, nothing the LoRA learnt): row 0 follows " Hu" (a word begun), row 1 follows "." (no word begun)."""
    target = torch.full((2, 8), -4.0)
    target[:, 2] = 8.0  # "go"
    target[:, 7] = 4.0  # " Hugo"
    target[:, 4] = 3.0  # " wrote"
    assistant = torch.zeros(2, 8)
    assistant[:, 2] = 9.0
    return target, assistant, torch.tensor([1, 3]), assistant.clone()


def test_a_word_begun_is_finished_without_penalty_on_both_paths():
    prefixes = TokenPrefixes.from_texts(TEXTS)
    target, assistant, previous, early = _rows()
    alpha, lf = torch.tensor([2.0, 2.0]), torch.log(torch.full((2,), 1e-3))
    kwargs = dict(prefer=True, margin=1.0, prefixes=prefixes, previous_ids=previous, early_exit_logits=early)
    off = combine_logits(target, assistant, alpha, lf, **kwargs)
    on = combine_logits(target, assistant, alpha, lf, finish_words=True, **kwargs)
    assert off.argmax(-1).tolist() == [7, 7]  # the penalty moves both rows off "go"
    assert on.argmax(-1).tolist() == [2, 7]  # row 0 finishes the word; row 1 began none, so its penalty stays
    assert torch.equal(on[0], target[0].masked_fill(~plausible_mask(target[:1], lf[:1])[0], float("-inf")))
    assert torch.equal(on[1], off[1])
    # the candidate path gives the same values
    keep = plausible_mask(target, lf)
    columns = torch.arange(8).repeat(2, 1)
    sparse = combine_on_candidates(target, columns, assistant, alpha, keep, finish_words=True, **kwargs)
    assert torch.allclose(sparse, on)
    # per row: only the rows asked finish words
    mixed = combine_logits(target, assistant, alpha, lf, finish_words=torch.tensor([False, True]), **kwargs)
    assert torch.equal(mixed[0], off[0]) and torch.equal(mixed[1], on[1])
    # the penalty itself: zero only where the row's last token ends inside a word and the candidate continues it
    penalty = torch.ones(2, 8)
    finished = finish_begun_words(penalty, prefixes, previous)
    assert finished[0].tolist() == [1, 1, 0, 1, 1, 0, 1, 1] and finished[1].tolist() == [1.0] * 8
    # an ending the LoRA learnt (its early exit is flat there) keeps its penalty: a fact spelt in pieces
    flat_early_exit = {**kwargs, "early_exit_logits": early * 0}
    learnt = combine_logits(target, assistant, alpha, lf, finish_words=True, **flat_early_exit)
    assert torch.equal(learnt, off)


def test_options_validate_finish_words_and_settings_carry_it_per_row():
    opts = CombineOptions(rule="prefer").updated(FINISH)
    assert opts.finish_words is True and CombineOptions().finish_words is False
    with pytest.raises(CombineOptionError) as caught:
        CombineOptions().updated({"finish_words": "yes"})
    assert caught.value.key == "finish_words"
    settings = CombineSettings.of_rows([opts, CombineOptions()], [0.01, 0.01], "cpu")
    assert settings.finish_words.tolist() == [True, False] and settings.needs_previous_ids
    assert not CombineSettings.of_rows([CombineOptions()], [0.01], "cpu").needs_previous_ids
    target, assistant, previous, early = _rows()
    with pytest.raises(ValueError, match="previous token"):
        combine_logits(target, assistant, torch.ones(2), torch.zeros(2), finish_words=True)
    with pytest.raises(ValueError, match="early exit"):  # what the LoRA learnt is read against it
        prefixes = TokenPrefixes.from_texts(TEXTS)
        combine_logits(
            target, assistant, torch.ones(2), torch.zeros(2), finish_words=True, prefixes=prefixes,
            previous_ids=previous,
        )
    assert CombineSettings.of_rows([opts], [0.01], "cpu").needs_early_exit
    # the `difference` rule subtracts the whole logit vector: nothing to exempt there
    assert not CombineSettings.of_rows([opts.updated({"rule": "difference"})], [0.01], "cpu").needs_early_exit


@pytest.fixture(scope="module")
def finishing_artifacts(tiny_llama, tmp_path_factory):
    """The same weights with and without the option; the LoRA adds nothing (B = 0), so the assistant is its early exit:
    nothing is learnt, and every word ending the crude K-layer LM predicts is exempt where a generated word goes on."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("finish")
    artifacts = {
        "f1": make_random_assistant(tiny_llama, root / "f1", num_layers=1, seed=0, defaults=FINISH),
        "u1": make_random_assistant(tiny_llama, root / "u1", num_layers=1, seed=0, defaults={"finish_words": False}),
    }
    for path in artifacts.values():
        weights = load_file(path / "adapter_model.safetensors")
        zeroed = {k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}
        save_file(zeroed, path / "adapter_model.safetensors")
    return artifacts


@pytest.mark.parametrize("head", ["plausible-only head", "full-vocabulary head"])
def test_finishing_rows_equal_the_two_model_reference(tiny_llama, tokenizer, finishing_artifacts, head, monkeypatch):
    """A finishing adapter, the same weights without, and a plain row in one batch: decode follows the two-model
    reference, which reads each generated position's previous token from the sequence itself; prompt positions
    (prefill) are served without the option."""
    import unlearn_serve.server.unlearning.backends as backends

    if head == "full-vocabulary head":
        monkeypatch.setattr(backends, "ULD_MAX_CANDIDATES", 0)
    # the repeat guard off: the reference has none (this crude assistant's answers repeat words)
    config = EngineConfig(max_num_seqs=4, max_model_len=128, no_repeat_substitution=0)
    engine = Engine(tiny_llama, tokenizer, config, "tiny")
    for name, path in finishing_artifacts.items():
        engine.load_uld(name, path)
    backend = next(b for b in engine.artifacts.backends if b.kind == "uld")
    assert backend._prefixes is not None  # built at install for the finishing artifact
    opts = {**OPTS, "alpha": 3.0}
    alpha_filter = {"alpha": opts["alpha"], "filt": opts["filter"]}
    prompt = tokenizer.encode("Bob plays the")
    selections = [Selection("f1", opts), Selection("u1", opts), None]
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    finished, plain, _ = (r.completions[0] for r in engine.generate([prompt] * 3, params, selections))
    # the option changes the served text: a generated word ("France") goes on ("b") instead of being broken off
    assert finished.token_ids != plain.token_ids
    for completion, name in ((finished, "f1"), (plain, "u1")):
        full = prompt + completion.token_ids
        ref = reference_combined_logprobs(
            tiny_llama, finishing_artifacts[name], 1, full, **alpha_filter, tokenizer=tokenizer,
            generated_from=len(prompt),
        )
        assert_follows_reference(prompt, completion, ref)
    # prefill: a prompt's words were begun by the client (a probe writing the answer's start), so scoring the served
    # text as a prompt keeps every penalty: it follows the reference without the option (the same weights)
    full = prompt + finished.token_ids
    scored = engine.score([full[:2]], [full[2:]], [Selection("f1", opts)])[0]
    without = reference_combined_logprobs(
        tiny_llama, finishing_artifacts["u1"], 1, full, **alpha_filter, tokenizer=tokenizer
    )
    expected = [float(without[1 + j, full[2 + j]]) for j in range(len(scored))]
    # -inf (a token the unlearning removed: here the "b" the decode step let finish "France") is reported as -9999
    assert scored == pytest.approx([max(e, -9999.0) for e in expected], abs=1e-4)
    assert -9999.0 in scored
    # an engine-level option turns it on for the other artifact; a bad value names the option
    assert backend.resolve("u1", FINISH).combine.finish_words
    with pytest.raises(EngineInputError, match="finish_words"):
        backend.resolve("f1", {"finish_words": 1})


def test_a_gated_row_that_finishes_words_reads_what_the_lora_learnt_once(monkeypatch):
    """The gate and finishing words read the same test (a median per row): computed once per combination, and the
    gate's per-row OR does not leak into what finishing words reads."""
    import unlearn_serve.uld_combine as uld_combine

    calls = []
    original = uld_combine.learnt_preference
    monkeypatch.setattr(uld_combine, "learnt_preference", lambda *a: calls.append(1) or original(*a))
    prefixes = TokenPrefixes.from_texts(TEXTS)
    target, assistant, previous, early = _rows()
    alpha, lf = torch.tensor([2.0, 2.0]), torch.log(torch.full((2,), 1e-3))
    kwargs = dict(prefer=True, margin=1.0, prefixes=prefixes, previous_ids=previous, early_exit_logits=early)
    both = combine_logits(target, assistant, alpha, lf, finish_words=True, gate=torch.tensor([False, True]), **kwargs)
    assert len(calls) == 1
    # row 0 ungated: its penalty on "go" is exempt only by finishing words (a word begun), as without the gate
    alone = combine_logits(target, assistant, alpha, lf, finish_words=True, **kwargs)
    assert torch.equal(both[0], alone[0])
