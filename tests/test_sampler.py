"""Batched sampler: every row has its own parameters, applied as tensor ops."""

from __future__ import annotations

import math

import pytest
import torch
from host_sync import forbid_host_sync
from unlearn_serve.server.engine.sampler import (
    SamplingBatch,
    apply_penalties,
    gather_logprobs,
    sample,
    seeded_exponential,
)
from unlearn_serve.server.engine.sampling_params import SamplingParams, SamplingParamsError

V = 8
# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 and ~0 for the last three tokens.
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 1e-9, 1e-9, 1e-9])
LOGITS = PROBS.log()


def batch_of(params: list[SamplingParams | None], seeds=None, steps=None, vocab: int = V) -> SamplingBatch:
    return SamplingBatch.build(params, seeds or [None] * len(params), vocab, torch.device("cpu"), steps)


def draws(params: SamplingParams, rows: int = 4000, seed: int = 0) -> set[int]:
    """The set of tokens sampled over `rows` independent rows with identical logits."""
    torch.manual_seed(seed)
    tokens = sample(LOGITS.expand(rows, V).clone(), batch_of([params] * rows))
    return set(tokens.tolist())


def test_greedy_rows_are_argmax_and_deterministic():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1))
    batch = batch_of([SamplingParams(temperature=0.0)] * 6)
    assert batch.all_greedy
    first = sample(logits, batch)
    assert torch.equal(first, logits.argmax(-1))
    assert torch.equal(sample(logits, batch), first)


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = LOGITS.expand(200, V).clone()
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.0) for i in range(200)]
    torch.manual_seed(0)
    tokens = sample(logits, batch_of(params))
    assert set(tokens[0::2].tolist()) == {0}  # greedy rows never move
    assert len(set(tokens[1::2].tolist())) > 1  # sampled rows do


def test_seeded_rows_reproduce_whatever_the_global_rng():
    params = [SamplingParams(temperature=1.0, seed=7)] * 3

    def run(global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)
        batch = batch_of(params, [7, 8, 9])
        out = []
        for _ in range(20):  # one batch, many steps: each call draws the next token's noise
            out += sample(LOGITS.expand(3, V).clone(), batch).tolist()
        return out

    a, b = run(0), run(12345)
    assert a == b
    assert len(set(a)) > 1  # really sampling, not argmax


def test_top_k_keeps_only_the_k_best():
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_k=3)) == {0, 1, 2}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # 0.4 + 0.3 = 0.7 >= 0.65: tokens 0 and 1 only
    assert draws(SamplingParams(temperature=1.0, top_p=0.65)) == {0, 1}
    # 0.4 < 0.5: the second token is needed; 0.7 >= 0.5 so not a third
    assert draws(SamplingParams(temperature=1.0, top_p=0.5)) == {0, 1}
    # the top token always stays, even with a tiny p
    assert draws(SamplingParams(temperature=1.0, top_p=0.01)) == {0}
    assert draws(SamplingParams(temperature=1.0, top_p=0.9)) == {0, 1, 2, 3}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    # threshold 0.5 * 0.4 = 0.2: tokens 0 (0.4) and 1 (0.3)
    assert draws(SamplingParams(temperature=1.0, min_p=0.5)) == {0, 1}
    # threshold 0.3 * 0.4 = 0.12: adds token 2 (0.15)
    assert draws(SamplingParams(temperature=1.0, min_p=0.3)) == {0, 1, 2}


def test_masks_apply_per_row():
    rows = 3000
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_k=3)] * (rows // 2)
    torch.manual_seed(0)
    tokens = sample(LOGITS.expand(rows, V).clone(), batch_of(params))
    assert set(tokens[0::2].tolist()) == {0}
    assert set(tokens[1::2].tolist()) == {0, 1, 2}


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    rows = 20000
    tokens = sample(LOGITS.expand(rows, V).clone(), batch_of([SamplingParams(temperature=1.0)] * rows))
    freq = torch.bincount(tokens, minlength=V).float() / rows
    assert torch.allclose(freq[:5], PROBS[:5], atol=0.02)


def test_low_temperature_sharpens():
    torch.manual_seed(0)
    rows = 4000
    tokens = sample(LOGITS.expand(rows, V).clone(), batch_of([SamplingParams(temperature=0.1)] * rows))
    assert (tokens == 0).float().mean() > 0.9


def test_logit_bias_is_added_per_row():
    logits = torch.zeros(2, V)
    params = [SamplingParams(temperature=0.0, logit_bias={5: 10.0}), SamplingParams(temperature=0.0)]
    batch = batch_of(params)
    out = apply_penalties(logits, batch, None, None)
    assert out[0, 5] == 10.0 and out[1, 5] == 0.0
    assert out[0].sum() == 10.0
    logits = torch.randn(2, V)
    out = apply_penalties(logits, batch_of([SamplingParams(temperature=0.0, logit_bias={3: 100.0})] * 2), None, None)
    assert sample(out, batch_of([SamplingParams(temperature=0.0)] * 2)).tolist() == [3, 3]


def test_penalties_match_their_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0, 0.0, 0.0, 0.0]])
    counts = torch.zeros(1, V, dtype=torch.int32)
    counts[0, 0] = 3  # token 0 generated three times
    counts[0, 1] = 1
    prompt = torch.zeros(1, V, dtype=torch.bool)
    prompt[0, 2] = True  # token 2 seen in the prompt only

    rep = apply_penalties(logits, batch_of([SamplingParams(repetition_penalty=2.0)]), prompt, counts)
    # positive logits divided, negative multiplied; prompt tokens count for repetition
    assert rep[0, :5].tolist() == [1.0, -4.0, 0.5, 0.5, 3.0]

    freq = apply_penalties(logits, batch_of([SamplingParams(frequency_penalty=0.5)]), prompt, counts)
    assert freq[0, :5].tolist() == [0.5, -2.5, 1.0, 0.5, 3.0]  # prompt tokens are not penalised

    pres = apply_penalties(logits, batch_of([SamplingParams(presence_penalty=1.0)]), prompt, counts)
    assert pres[0, :5].tolist() == [1.0, -3.0, 1.0, 0.5, 3.0]


def test_penalties_leave_other_rows_alone():
    logits = torch.randn(2, V)
    counts = torch.ones(2, V, dtype=torch.int32)
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams()]
    out = apply_penalties(logits, batch_of(params), torch.zeros(2, V, dtype=torch.bool), counts)
    assert torch.allclose(out[0], logits[0] - 1.0)
    assert torch.equal(out[1], logits[1])


def test_gather_logprobs_returns_chosen_and_top():
    logprobs = LOGITS.log_softmax(-1).expand(2, V)
    chosen, top_v, top_i = gather_logprobs(logprobs, torch.tensor([1, 4]), 2)
    assert chosen.tolist() == pytest.approx([math.log(0.3), math.log(0.05)], abs=1e-5)
    assert top_i.tolist() == [[0, 1], [0, 1]]
    assert top_v[0].tolist() == pytest.approx([math.log(0.4), math.log(0.3)], abs=1e-5)
    assert gather_logprobs(logprobs, torch.tensor([1, 4]), 0)[1] is None


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(n=17), "n"),
        (dict(logprobs=21), "logprobs"),
        (dict(logit_bias={V: 1.0}), "logit_bias"),
        (dict(logit_bias={1: 101.0}), "logit_bias"),
    ],
)
def test_invalid_params_name_the_field(kwargs, param):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs).validate(vocab_size=V)
    assert info.value.param == param


# ---------------------------------------------------------------------------- seeded rows, batched


def test_a_seeded_row_draws_the_same_whatever_else_is_in_the_batch():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    seeded = SamplingParams(temperature=1.0, seed=42)

    def tokens_of_seeded_row(others: int, position: int, steps: int = 30) -> list[int]:
        params = [SamplingParams(temperature=1.0)] * others
        params.insert(position, seeded)
        seeds: list = [None] * others
        seeds.insert(position, 42)
        batch = batch_of(params, seeds, vocab=64)
        return [sample(logits.expand(others + 1, 64).clone(), batch)[position].item() for _ in range(steps)]

    alone = tokens_of_seeded_row(0, 0)
    assert tokens_of_seeded_row(5, 3) == alone
    assert tokens_of_seeded_row(9, 9) == alone
    assert len(set(alone)) > 3  # sampling, not a constant


def test_a_rebuilt_batch_continues_the_seeded_stream_from_its_step():
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=2)]
    batch = batch_of(params, [1, 2], vocab=64)
    straight = [sample(logits.clone(), batch).tolist() for _ in range(6)]
    rebuilt = [sample(logits.clone(), batch_of(params, [1, 2], steps=[s, s], vocab=64)).tolist() for s in range(6)]
    assert rebuilt == straight
    # a different seed gives a different stream
    other = [sample(logits.clone(), batch_of(params, [1, 3], steps=[s, s], vocab=64))[1].item() for s in range(6)]
    assert other != [row[1] for row in straight]


def test_seeded_noise_is_exponential_and_seeded_rows_follow_the_distribution():
    keys = torch.arange(200, dtype=torch.long) * 7919
    noise = seeded_exponential(keys, torch.zeros(200, dtype=torch.long), 1000)
    assert noise.min() > 0
    assert abs(noise.mean().item() - 1.0) < 0.01 and abs(noise.var().item() - 1.0) < 0.03
    rows = 20000
    params = [SamplingParams(temperature=1.0)] * rows
    tokens = sample(LOGITS.expand(rows, V).clone(), batch_of(params, list(range(rows))))
    freq = torch.bincount(tokens, minlength=V).float() / rows
    assert torch.allclose(freq[:5], PROBS[:5], atol=0.02)


# ---------------------------------------------------------------------------- filters without a full sort


def reference_filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Per row, full sort: top-k, then top-p on the renormalised top-k distribution (vLLM/HF order)."""
    out = []
    for row, p in zip(logits, params, strict=True):
        values, idx = row.sort(descending=True)
        k = p.top_k if 0 < p.top_k < row.numel() else row.numel()
        values = values.clone()
        values[k:] = float("-inf")
        probs = values.softmax(-1)
        values[(probs.cumsum(-1) - probs) >= p.top_p] = float("-inf")
        out.append(torch.full_like(row, float("-inf")).scatter(0, idx, values))
    return torch.stack(out)


@pytest.mark.parametrize(
    "mix",
    [
        "top_k only",  # bounded topk over the filtering rows
        "top_k and top_p",  # top-p rows all have a top-k: sort only the top-k candidates
        "top_p only",  # full sort, but only of the rows that ask
    ],
)
def test_filters_match_the_full_sort_reference(mix):
    vocab = 500
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, vocab, generator=gen) * 3
    plain = SamplingParams(temperature=1.0)
    rows = {
        "top_k only": [SamplingParams(temperature=1.0, top_k=k) for k in (1, 5, 40)],
        "top_k and top_p": [
            SamplingParams(temperature=1.0, top_k=k, top_p=p) for k, p in ((3, 0.5), (50, 0.9), (7, 1.0))
        ],
        "top_p only": [SamplingParams(temperature=1.0, top_p=p) for p in (0.3, 0.8)] + [SamplingParams(top_k=9)],
    }[mix]
    params = [plain, *rows[:2], SamplingParams(temperature=0.0, top_k=2), rows[2], plain]
    batch = batch_of(params, vocab=vocab)
    assert batch.filter_rows is not None and batch.filter_rows.tolist() == [1, 2, 4]  # greedy/plain rows skip
    if mix != "top_p only":
        assert batch.filter_width < vocab  # no full-vocabulary sort
    # the filter result, read back through a temperature-1 softmax: a row's kept set is where p > 0
    from unlearn_serve.server.engine.sampler import _filter_top_k_top_p

    filtered = _filter_top_k_top_p(logits.clone(), batch)
    expected = reference_filter(logits, params)
    for i in (1, 2, 4):
        assert torch.equal(filtered[i], expected[i])
    for i in (0, 3, 5):
        assert torch.equal(filtered[i], logits[i])


def test_sampling_and_penalties_need_no_host_sync():
    vocab = 300
    params = [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, logit_bias={4: 5.0}),
        SamplingParams(temperature=1.2, top_p=0.5, min_p=0.05, frequency_penalty=0.5, presence_penalty=0.3),
        None,
    ]
    batch = batch_of(params, [3, None, None, None], vocab=vocab)
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(4, vocab, dtype=torch.int32)
    prompt = torch.zeros(4, vocab, dtype=torch.bool)
    with forbid_host_sync():
        for _ in range(3):
            tokens = sample(apply_penalties(logits, batch, prompt, counts), batch)
            counts[torch.arange(4), tokens] += 1
    assert tokens.shape == (4,)
