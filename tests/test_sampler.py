"""Batched sampler: every row has its own parameters, applied as tensor ops."""

from __future__ import annotations

import math

import pytest
import torch
from unlearn_serve.server.engine.sampler import SamplingBatch, apply_penalties, gather_logprobs, sample
from unlearn_serve.server.engine.sampling_params import SamplingParams, SamplingParamsError

V = 8
# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 and ~0 for the last three tokens.
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 1e-9, 1e-9, 1e-9])
LOGITS = PROBS.log()


def batch_of(params: list[SamplingParams], generators=None) -> SamplingBatch:
    return SamplingBatch.build(params, generators or [None] * len(params), V, torch.device("cpu"))


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
        gens = [torch.Generator().manual_seed(7 + i) for i in range(3)]
        out = []
        for _ in range(20):
            out += sample(LOGITS.expand(3, V).clone(), batch_of(params, gens)).tolist()
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
