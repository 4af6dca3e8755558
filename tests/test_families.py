"""MoE family adapters: layouts, routing and registry, checked against the real transformers modules."""

from __future__ import annotations

import pytest
import torch

from unlearn_serve.families import ExpertSlices, NotMoEError, get_family, registered_families
from unlearn_serve.tiny import build_tiny_model, train_tokenizer

REQUIRED = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss")



@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(vocab_size=300)


@pytest.fixture(scope="module", params=registered_families())
def moe(request, tokenizer):
    model = build_tiny_model(request.param, tokenizer, num_layers=2, seed=1)
    return request.param, model, get_family(model)


def test_required_families_registered():
    assert set(REQUIRED) <= set(registered_families())


def test_dense_model_is_refused(tokenizer):
    with pytest.raises(NotMoEError, match="not a supported mixture-of-experts"):
        get_family(build_tiny_model("llama", tokenizer, num_layers=1))


def test_moe_layers_and_counts(moe):
    name, model, family = moe
    layers = family.moe_layers(model)
    # deepseek_v3's first_k_dense_replace=1 makes layer 0 a dense MLP
    assert sorted(layers) == ([1] if name == "deepseek_v3" else [0, 1])
    block = layers[1]
    assert family.num_experts(block) == 8 and family.top_k(block) == 2
    assert family.router_params(block)["weight"].shape == (8, model.config.hidden_size)
    assert ("bias" in family.router_params(block)) == (name == "gpt_oss")
    with pytest.raises(ValueError, match="not an MoE layer"):
        family.moe_block(model, 7)


def test_expert_forward_matches_the_fused_module(moe):
    _, model, family = moe
    block = family.moe_layers(model)[1]
    experts = family.experts(block)
    x = torch.randn(6, model.config.hidden_size)
    with torch.no_grad():
        for expert in (0, 5):
            fused = experts(x, torch.full((6, 1), expert), torch.ones(6, 1))
            alone = family.expert_forward(experts, x, family.get_expert(block, expert))
            torch.testing.assert_close(alone, fused, rtol=1e-5, atol=1e-6)


def test_set_expert_round_trips_and_touches_one_slice(moe):
    _, model, family = moe
    block = family.moe_layers(model)[1]
    before = {n: p.detach().clone() for n, p in family.expert_parameters(block).items()}
    original = family.get_expert(block, 3).clone()
    new = ExpertSlices.from_tensors({k: torch.randn_like(v) for k, v in original.tensors().items()})
    family.set_expert(block, 3, new)
    try:
        got = family.get_expert(block, 3)
        for key, value in new.tensors().items():
            assert torch.equal(got.tensors()[key], value), key
        others = torch.arange(8) != 3
        for name, param in family.expert_parameters(block).items():
            assert torch.equal(param[others], before[name][others]), name
            assert not torch.equal(param[3], before[name][3]), name
    finally:
        family.set_expert(block, 3, original)
    for name, param in family.expert_parameters(block).items():
        assert torch.equal(param, before[name])


def test_router_probs_are_full_distributions_and_topk_is_the_router_choice(moe):
    _, model, family = moe
    block = family.moe_layers(model)[1]
    x = torch.randn(2, 5, model.config.hidden_size)  # [B, T, H] is flattened like the MoE blocks do
    probs = family.router_probs(block, x)
    assert probs.shape == (10, 8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))
    assert (probs > 0).all()  # full softmax: no expert masked out
    chosen = family.topk_indices(block, x)
    assert chosen.shape == (10, 2)
    assert torch.equal(chosen, family.router(block)(x.reshape(10, -1))[2])
