"""Batched ULD adapters: every assistant row of a mixed batch, whatever its adapter (ranks and target
modules differ), gets exactly the LoRA delta a peft model with only that adapter would give it, in one
gather + two matmuls per module; also after an unload restacks the rest, and with no host sync."""

from __future__ import annotations

import copy

import pytest
import torch
from host_sync import forbid_host_sync
from peft import LoraConfig, PeftModel, get_peft_model
from unlearn_serve.server.unlearning import uld
from unlearn_serve.server.unlearning.uld import AssistantRegistry

from unlearn_serve.artifact import fingerprint_model
from unlearn_serve.assistant import lora_target_modules
from unlearn_serve.tiny import build_tiny_model
from unlearn_serve.uld_artifact import save_uld_artifact

# (name, rank, layers, target modules or None = all of the assistant's usual targets)
ADAPTERS = [
    ("r2", 2, [0], None),
    ("r4-qv", 4, [0, 1], ["q_proj", "v_proj"]),
    ("r8", 8, [0, 1], None),
]


@pytest.fixture(scope="module")
def base(tokenizer):
    return build_tiny_model("llama", tokenizer, seed=0)


@pytest.fixture(scope="module")
def artifacts(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("batched-adapters")
    out = {}
    for seed, (name, rank, layers, targets) in enumerate(ADAPTERS):
        model = copy.deepcopy(base)
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=targets or lora_target_modules(model, len(layers)),
            layers_to_transform=layers,
            layers_pattern="layers",
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        details = {"assistant_layers": max(layers) + 1, "lora_rank": rank, "lora_alpha": 2 * rank}
        out[name] = save_uld_artifact(peft_model, root / name, fingerprint_model(base), details, {})
    return out


def reference_logits(base, artifact, ids: torch.Tensor) -> torch.Tensor:
    """One row through a peft model holding only its own adapter (or the base model)."""
    with torch.no_grad():
        if artifact is None:
            return base(ids[None]).logits[0]
        return PeftModel.from_pretrained(copy.deepcopy(base), str(artifact))(ids[None]).logits[0]


def registry_logits(registry: AssistantRegistry, model, ids: torch.Tensor, row_adapters: list[str | None]):
    groups: dict[int, list[int]] = {}
    for row, name in enumerate(row_adapters):
        if name is not None:
            groups.setdefault(registry.assistants[name].adapter_id, []).append(row)
    registry.rows.set([(a, torch.tensor(rows)) for a, rows in groups.items()], ids.shape[1])
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        registry.rows.clear()


@pytest.fixture
def served(base, artifacts):
    model = copy.deepcopy(base)
    registry = AssistantRegistry(model, fingerprint_model(model), "tiny")
    for name, path in artifacts.items():
        registry.add(registry.read(name, path))
    return registry, model


ROWS = ["r8", None, "r2", "r4-qv", "r2", "r8", None, "r4-qv"]


@pytest.mark.parametrize("path", ["masked concatenation", "per-row gather (BGMV)"])
def test_mixed_batch_equals_per_row_peft(base, artifacts, served, path, monkeypatch):
    if path == "per-row gather (BGMV)":
        monkeypatch.setattr(uld, "MASKED_MAX_ADAPTERS", 0)
    registry, model = served
    ids = torch.randint(10, 400, (len(ROWS), 6), generator=torch.Generator().manual_seed(0))
    got = registry_logits(registry, model, ids, ROWS)
    plan = registry.rows._plan
    assert plan.gather == (path != "masked concatenation")
    for row, name in enumerate(ROWS):
        want = reference_logits(base, artifacts[name] if name else None, ids[row])
        torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)


def test_single_adapter_batch_and_restack_after_unload(base, artifacts, served):
    registry, model = served
    ids = torch.randint(10, 400, (3, 5), generator=torch.Generator().manual_seed(1))
    got = registry_logits(registry, model, ids, ["r4-qv", None, "r4-qv"])  # one adapter: its columns only
    assert registry.rows._plan.columns is not None and registry.rows._plan.mask is None
    want = reference_logits(base, artifacts["r4-qv"], ids[0])
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)

    registry.remove("r2")  # the others move to new columns; their weights must follow
    assert registry.rows.layout.width == 4 + 8
    got = registry_logits(registry, model, ids, ["r8", "r4-qv", None])
    for row, name in enumerate(["r8", "r4-qv", None]):
        want = reference_logits(base, artifacts[name] if name else None, ids[row])
        torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)
    for name in ["r8", "r4-qv"]:
        registry.remove(name)
    assert not registry._hooks  # the model is the plain base model again
    torch.testing.assert_close(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("gather", [False, True])
def test_token_flattened_inputs_get_the_same_delta(served, gather, monkeypatch):
    """MoE shared experts see the batch as [rows * T, H]: the delta must match the [rows, T, H] one."""
    if gather:
        monkeypatch.setattr(uld, "MASKED_MAX_ADAPTERS", 0)
    registry, model = served
    module_name = "model.layers.0.self_attn.q_proj"  # targeted by r2 and r8
    in_features = model.get_submodule(module_name).in_features
    x = torch.randn(5, 3, in_features, generator=torch.Generator().manual_seed(2))
    registry.rows.set([(registry.assistants["r2"].adapter_id, torch.tensor([0, 3])),
                       (registry.assistants["r8"].adapter_id, torch.tensor([4]))], 3)
    plan = registry.rows.plan(x.dtype)
    rows3, delta3 = registry.delta(module_name, x, plan)
    rows2, delta2 = registry.delta(module_name, x.reshape(15, -1), plan)
    flat = torch.zeros(15, delta3.shape[-1]).index_add_(0, rows2, delta2)
    full = torch.zeros(5, 3, delta3.shape[-1]).index_add_(0, rows3, delta3)
    torch.testing.assert_close(flat.reshape(5, 3, -1), full)
    # and the per-row reference: x @ A^T @ B^T with each row's own adapter
    a, b = registry.assistants["r2"].lora[module_name]
    torch.testing.assert_close(full[3], x[3] @ a.t() @ b.t())
    assert torch.equal(full[1], torch.zeros_like(full[1]))
    registry.rows.clear()


@pytest.mark.parametrize("gather", [False, True])
def test_the_lora_hooks_need_no_host_sync(served, gather, monkeypatch):
    if gather:
        monkeypatch.setattr(uld, "MASKED_MAX_ADAPTERS", 0)
    registry, model = served
    layer = model.model.layers[0]
    x = torch.randn(4, 2, model.config.hidden_size)
    registry.rows.set([(registry.assistants["r2"].adapter_id, torch.tensor([1])),
                       (registry.assistants["r8"].adapter_id, torch.tensor([2, 3]))], 2)
    try:
        with torch.no_grad(), forbid_host_sync():
            for _ in range(2):  # plan built on the first call, reused on the second
                layer.self_attn.q_proj(x)
                layer.mlp(x)
    finally:
        registry.rows.clear()


# ---------------------------------------------------------------------------- UOE patched-expert rows


def test_uoe_patched_rows_need_no_host_sync_and_match_rows_run_alone(tokenizer, tmp_path):
    from unlearn_serve.server.unlearning.uoe import ExpertPatchSet

    from unlearn_serve.families import get_family
    from unlearn_serve.tiny import write_random_expert_patch

    model = build_tiny_model("qwen2_moe", tokenizer, seed=0)
    base = copy.deepcopy(model)
    layer = max(get_family(model).moe_layers(model))
    patches = ExpertPatchSet(model)
    pid = patches.add("p", write_random_expert_patch(model, layer, 0, tmp_path / "p", noise=1.0))
    ids = torch.randint(3, 400, (4, 5), generator=torch.Generator().manual_seed(0))
    assignment = [pid, -1, pid, -1]
    with torch.inference_mode():
        patches.set_rows(torch.tensor(assignment))  # a tensor: grouped once, before the forward
        with forbid_host_sync():
            # with the ids as a host list too, even the grouping reads nothing back
            patches.set_rows(torch.tensor(assignment), host_ids=assignment)
            batched = model(ids).logits
            again = model(ids).logits  # a second step on the same assignment: still no read-back
        patches.clear_rows()
        for row, patch in enumerate(assignment):
            with patches.rows([patch]):
                alone = model(ids[row : row + 1]).logits[0]
            torch.testing.assert_close(batched[row], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched[1], base(ids[1:2]).logits[0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(batched[0], base(ids[0:1]).logits[0], atol=1e-3)  # the patch acts
    assert torch.equal(batched, again)
