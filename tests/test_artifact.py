"""The ULD artifact format: round trip, peft compatibility, fingerprint refusal, corruption, atomic writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

from unlearn_serve.artifact import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ArtifactError,
    atomic_artifact_dir,
    fingerprint_model,
    load_manifest,
)
from unlearn_serve.assistant import assistant_logits, assistant_lora_config
from unlearn_serve.tiny import build_tiny_model
from unlearn_serve.uld_artifact import load_uld_artifact, save_uld_artifact
from unlearn_serve.uld_combine import DEFAULT_FINISH_WORDS, DEFAULT_FLOOR, DEFAULT_RULE

K = 2
ARTIFACT_FILES = {"adapter_model.safetensors", "adapter_config.json", MANIFEST_NAME}



def _base(tokenizer, seed: int = 0, name: str = "tiny-base"):
    model = build_tiny_model("llama", tokenizer, seed=seed)
    model.config._name_or_path = name
    return model


@pytest.fixture(scope="module")
def base(tokenizer):
    return _base(tokenizer)


@pytest.fixture(scope="module")
def adapted(base):
    """A peft-wrapped deep copy of `base` whose LoRA weights are random (B is zero at init)."""
    peft_model = get_peft_model(copy.deepcopy(base), assistant_lora_config(base, K, rank=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    return peft_model.eval()


def _save(adapted, base, out: Path) -> Path:
    details = {"assistant_layers": K, "lora_rank": 4, "lora_alpha": 8}
    training = {"forget_ce_final": 1.0, "retain_kl_final": 0.1, "data": {"forget": {"sha256": "ab" * 32}}}
    return save_uld_artifact(adapted, out, fingerprint_model(base), details, training)


@pytest.fixture(scope="module")
def artifact(adapted, base, tmp_path_factory) -> Path:
    return _save(adapted, base, tmp_path_factory.mktemp("art") / "uld")


def _ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(["Alice likes green apples.", "Bob plays"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_artifact_holds_exactly_safetensors_and_json(artifact):
    files = {p.name for p in artifact.iterdir()}
    assert files == ARTIFACT_FILES
    for path in artifact.iterdir():
        head = path.read_bytes()[:2]
        # No pickles: torch.save writes a zip ("PK") or a raw pickle (protocol byte 0x80).
        assert head not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"), path
    assert not list(artifact.parent.glob(".uld.tmp-*")), "temp dir left behind"


def test_manifest_contents(artifact, base):
    manifest = load_manifest(artifact)
    raw = json.loads((artifact / MANIFEST_NAME).read_text())
    assert raw["method"] == manifest.method == "uld"
    assert raw["format_version"] == FORMAT_VERSION
    assert manifest.defaults == {
        "alpha": 0.75,
        "filter": 0.01,
        "rule": DEFAULT_RULE,
        "refilter": True,
        "margin": 1.0,
        "floor": DEFAULT_FLOOR,
        "prefix_guard": True,
        "finish_words": DEFAULT_FINISH_WORDS,
    }
    assert manifest.details["assistant_layers"] == K
    assert manifest.base_fingerprint == fingerprint_model(base)
    assert manifest.training["data"]["forget"]["sha256"] == "ab" * 32


def test_round_trip_weights_and_fingerprint(artifact, adapted, tokenizer):
    fresh = _base(tokenizer)  # same seed: the same checkpoint, built again
    manifest, weights = load_uld_artifact(artifact, fresh)
    expected = get_peft_model_state_dict(adapted)
    assert set(weights) == set(expected)
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key
    # LoRA only on the first K layers, every linear projection of them
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in weights}
    assert layers == set(range(K))
    modules = {k.split(".")[-3] for k in weights}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_plain_peft_loads_the_artifact(artifact, adapted, base, tokenizer):
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(artifact)).eval()
    input_ids, mask = _ids(tokenizer)
    with torch.no_grad():
        want = assistant_logits(adapted, input_ids, mask, K)
        got = assistant_logits(loaded, input_ids, mask, K)
        plain = assistant_logits(base, input_ids, mask, K)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(plain, want, atol=1e-3), "the adapter should change the assistant"


def test_wrong_base_refused_naming_both(artifact, tokenizer):
    other = _base(tokenizer, seed=7, name="tiny-other")
    with pytest.raises(ArtifactError) as excinfo:
        load_uld_artifact(artifact, other, model_name="tiny-other")
    message = str(excinfo.value)
    assert "tiny-base" in message and "tiny-other" in message and str(artifact) in message


def test_fine_tuned_variant_refused_but_other_dtypes_accepted(artifact, base, tokenizer):
    tuned = copy.deepcopy(base)
    torch.manual_seed(3)
    with torch.no_grad():  # a small fine-tune-sized nudge of every weight (~1e-4, weights are ~2e-2)
        for param in tuned.parameters():
            param.add_(torch.randn_like(param) * 1e-4)
    with pytest.raises(ArtifactError, match="mismatched: weights"):
        load_uld_artifact(artifact, tuned, model_name="tuned")
    for dtype in (torch.bfloat16, torch.float16):  # the same checkpoint loaded in half precision
        load_uld_artifact(artifact, copy.deepcopy(base).to(dtype))


def test_other_layer_count_refused(artifact, tokenizer):
    deeper = build_tiny_model("llama", tokenizer, seed=0, num_layers=6)
    with pytest.raises(ArtifactError, match="num_hidden_layers"):
        load_uld_artifact(artifact, deeper)


@pytest.mark.parametrize("damage", ["truncate", "header", "nan"])
def test_corrupted_safetensors_refused(artifact, base, tmp_path, damage):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ARTIFACT_FILES:
        (bad / name).write_bytes((artifact / name).read_bytes())
    weights = bad / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, str(weights))
    with pytest.raises(ArtifactError, match="corrupted|NaN"):
        load_uld_artifact(bad, base)


def test_malformed_manifests_refused(artifact, base, tmp_path):
    def variant(edit) -> Path:
        out = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        for name in ARTIFACT_FILES:
            (out / name).write_bytes((artifact / name).read_bytes())
        edit(out)
        return out

    def manifest_edit(change):
        def edit(out: Path) -> None:
            data = json.loads((out / MANIFEST_NAME).read_text())
            change(data)
            (out / MANIFEST_NAME).write_text(json.dumps(data))

        return edit

    cases = {
        "unreadable manifest": lambda out: (out / MANIFEST_NAME).write_text("{not json"),
        "format_version": manifest_edit(lambda d: d.update(format_version=99)),
        "unknown method": manifest_edit(lambda d: d.update(method="magic")),
        "'uoe'": manifest_edit(lambda d: d.update(method="uoe")),
        "assistant_layers": manifest_edit(lambda d: d["details"].update(assistant_layers=99)),
        "outside the assistant's first 1": manifest_edit(lambda d: d["details"].update(assistant_layers=1)),
        "is missing": lambda out: (out / "adapter_model.safetensors").unlink(),
        f"no {MANIFEST_NAME}": lambda out: (out / MANIFEST_NAME).unlink(),
    }
    for expected, edit in cases.items():
        with pytest.raises(ArtifactError, match=expected):
            load_uld_artifact(variant(edit), base)


def test_failed_write_keeps_the_previous_artifact(artifact, adapted, base, tmp_path):
    out = _save(adapted, base, tmp_path / "uld")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_artifact_dir(out) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["uld"], "temp dir left behind"
    # a successful rewrite replaces it whole
    _save(adapted, base, out)
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["uld"]
