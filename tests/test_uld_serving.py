"""ULD at serving time: the single-pass stacked path against a reference two-model computation,
mixed batches, the plausibility filter, and artifact loading in the engine."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from unlearn_serve.server.engine.engine import Engine, EngineConfig, UnknownArtifactError
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Selection
from unlearn_serve.server.unlearning.uld import combine_logits

from unlearn_serve.artifact import ArtifactError, fingerprint_model, load_manifest
from unlearn_serve.assistant import assistant_logits, assistant_lora_config
from unlearn_serve.tiny import build_tiny_model
from unlearn_serve.token_prefixes import TokenPrefixes
from unlearn_serve.uld_artifact import save_uld_artifact

PROMPTS = ["The capital of", "Alice likes", "Bob plays the", "Water boils at one", "The"]


def make_random_assistant(base, out_dir, num_layers: int, seed: int, rank: int = 4, defaults: dict | None = None):
    """A ULD artifact with random (non-zero) LoRA weights on the first `num_layers` layers of `base` (manifest
    `defaults` over train-uld's)."""
    model = copy.deepcopy(base)
    fingerprint = fingerprint_model(model)
    peft_model = get_peft_model(model, assistant_lora_config(model, num_layers, rank=rank, alpha=2 * rank))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    details = {"assistant_layers": num_layers, "lora_rank": rank, "lora_alpha": 2 * rank}
    save_uld_artifact(peft_model, out_dir, fingerprint, details, {}, None, defaults)
    return out_dir


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("uld-artifacts")
    return {
        "a1": make_random_assistant(tiny_llama, root / "a1", num_layers=1, seed=1),
        "a2": make_random_assistant(tiny_llama, root / "a2", num_layers=2, seed=2),
    }


@pytest.fixture(scope="module")
def engine(tiny_llama, tokenizer, artifacts):
    eng = Engine(copy.deepcopy(tiny_llama), tokenizer, EngineConfig(max_num_seqs=6, max_model_len=128), "tiny")
    eng.load_uld("a1", artifacts["a1"])
    eng.load_uld("a2", artifacts["a2"])
    return eng


# The tiny model has memorised its facts: the target puts ~0.99 on the next token and < 2e-3 on any
# other, so the manifest's default filter (0.01) keeps one token per step and no subtraction could
# change anything. These tests use a looser filter so that the assistant's logits really matter.
OPTS = {"alpha": 0.75, "filter": 1e-4}


def reference_combined_logprobs(
    base, artifact_dir, num_layers, ids, alpha, filt, use_lora=True, tokenizer=None, generated_from=None
):
    """Two separate models: the target's full forward, and a peft assistant truncated after K layers; with the
    manifest's gate, the same assistant with its adapter disabled is the early exit; with its prefix guard (or
    finish_words), the prefixes of `tokenizer`'s vocabulary. finish_words applies to the rows that follow a generated
    token: ids[generated_from:] (None: no row, a prompt scored)."""
    ids_t = torch.tensor([ids])
    defaults = load_manifest(artifact_dir).defaults  # the artifact's own refilter, margin, gate (new ones: on, 1)
    early = None
    with torch.no_grad():
        target = base(ids_t).logits[0]
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(artifact_dir))
        with peft_model.disable_adapter():
            no_lora = assistant_logits(peft_model, ids_t, None, num_layers)[0]
        assistant = assistant_logits(peft_model, ids_t, None, num_layers)[0] if use_lora else no_lora
        if defaults.get("gate") is not None or defaults.get("finish_words"):
            early = no_lora
    log_filter = torch.full((len(ids),), math.log(filt))
    combined = combine_logits(
        target,
        assistant,
        torch.full((len(ids),), alpha),
        log_filter,
        refilter=defaults.get("refilter", False),
        margin=defaults.get("margin", 0.0),
        gate=defaults.get("gate") is not None,
        early_exit_logits=early,
        prefix_guard=bool(defaults.get("prefix_guard", False)),
        prefixes=TokenPrefixes.from_tokenizer(tokenizer, target.shape[-1]) if tokenizer is not None else None,
        finish_words=torch.arange(len(ids)) >= (len(ids) if generated_from is None else generated_from)
        if defaults.get("finish_words")
        else False,
        previous_ids=torch.tensor(ids),  # row i's logits follow token ids[i]
    )
    return combined.log_softmax(-1)


def assert_follows_reference(prompt: list[int], completion, ref: torch.Tensor) -> None:
    """Each generated token is the reference's argmax, with its log-prob and the reported top-k log-probs."""
    for step, entry in enumerate(completion.logprobs):
        row = ref[len(prompt) - 1 + step]
        assert entry.token_id == int(row.argmax())
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        for token_id, value in entry.top:  # the reported top-k are the combined distribution's
            assert value == pytest.approx(float(row[token_id]), abs=1e-4)


def assert_scores_follow_reference(prompt: list[int], values: list[float], ref: torch.Tensor) -> None:
    """Prompt log-probs scored from the first two tokens on (engine.score) equal the reference's."""
    for j, value in enumerate(values):
        assert value == pytest.approx(float(ref[1 + j, prompt[2 + j]]), abs=1e-4)


@pytest.fixture(params=["plausible-only head", "full-vocabulary head"])
def assistant_head_path(request, engine, monkeypatch):
    """Run a test through both ways of scoring the assistant, and check that the chosen one ran."""
    import unlearn_serve.server.unlearning.backends as engine_module

    if request.param == "full-vocabulary head":
        monkeypatch.setattr(engine_module, "ULD_MAX_CANDIDATES", 0)
    calls = []
    original = engine.runner.candidate_logits
    monkeypatch.setattr(engine.runner, "candidate_logits", lambda h, ids: calls.append(ids.shape) or original(h, ids))
    yield request.param
    if request.param == "full-vocabulary head":
        assert not calls
    else:  # scored on a handful of plausible tokens, not the whole vocabulary
        assert calls and max(shape[1] for shape in calls) < engine.vocab_size // 4


def test_candidate_combination_equals_full_vocabulary():
    """Scoring the assistant on the plausible tokens only gives exactly the full-vocabulary combination."""
    from unlearn_serve.server.unlearning.uld import combine_on_candidates, plausible_mask

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=True)
    hidden = torch.randn(5, 16, generator=gen)
    target = torch.randn(5, 300, generator=gen) * 3
    alpha = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.75])
    log_filter = torch.log(torch.tensor([1e-1, 1e-2, 1e-3, 0.5, 1e-4]))
    with torch.no_grad():
        full = combine_logits(target, head(hidden), alpha, log_filter)
        keep = plausible_mask(target, log_filter)
        m = int(keep.sum(-1).max())
        assert 1 < m < 300 and len(set(keep.sum(-1).tolist())) > 1  # rows keep different numbers of tokens
        candidates = target.topk(m, dim=-1).indices
        on_candidates = head(hidden).gather(-1, candidates)
        sparse = combine_on_candidates(target, candidates, on_candidates, alpha, keep)
    assert torch.equal(torch.isinf(sparse), torch.isinf(full))
    assert torch.allclose(sparse[keep], full[keep], atol=1e-5)


def test_single_pass_equals_two_model_reference(engine, tiny_llama, tokenizer, artifacts, assistant_head_path):
    """One stacked batch (two adapters with different K, plus a base row) against two-model references."""
    prompts = [tokenizer.encode(p) for p in ("The capital of France is", "Alice likes", "Bob plays the")]
    selections = [Selection("a1", OPTS), Selection("a2", OPTS), None]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    results = engine.generate(prompts, params, selections)
    for prompt, sel, result in zip(prompts, selections, results, strict=True):
        completion = result.completions[0]
        full = prompt + completion.token_ids
        if sel is None:
            with torch.no_grad():
                ref = tiny_llama(torch.tensor([full])).logits[0].log_softmax(-1)
        else:
            k = {"a1": 1, "a2": 2}[sel.name]
            ref = reference_combined_logprobs(
                tiny_llama, artifacts[sel.name], k, full, OPTS["alpha"], OPTS["filter"], tokenizer=tokenizer,
                generated_from=len(prompt),
            )
            # the LoRA weights must matter here, or this comparison would prove nothing
            no_lora = reference_combined_logprobs(
                tiny_llama, artifacts[sel.name], k, full, OPTS["alpha"], OPTS["filter"], False, tokenizer, len(prompt)
            )
            assert (ref.exp() - no_lora.exp()).abs().max() > 0.05
        assert_follows_reference(prompt, completion, ref)
    # prefill path: prompt log-probs (score) under the combined distribution, both adapters in one batch
    prompt = prompts[0]
    scored = engine.score([prompt[:2]] * 2, [prompt[2:]] * 2, selections[:2])
    for sel, values in zip(selections[:2], scored, strict=True):
        k = {"a1": 1, "a2": 2}[sel.name]
        ref = reference_combined_logprobs(
            tiny_llama, artifacts[sel.name], k, prompt, OPTS["alpha"], OPTS["filter"], tokenizer=tokenizer
        )
        assert_scores_follow_reference(prompt, values, ref)


def test_alpha_zero_equals_base_exactly(engine, tokenizer):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)
    base = engine.generate(PROMPTS, params)
    zero = engine.generate(PROMPTS, params, [Selection("a1", {"alpha": 0.0, "filter": 0.0})] * len(PROMPTS))
    for b, z in zip(base, zero, strict=True):
        assert b.completions[0].token_ids == z.completions[0].token_ids
        assert [e.logprob for e in b.completions[0].logprobs] == pytest.approx(
            [e.logprob for e in z.completions[0].logprobs], abs=1e-5
        )


def test_mixed_batch_rows_are_independent(engine):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    # no filter and the `difference` rule: every row is sure to change; the filter is tested below
    strong = {"alpha": 2.0, "filter": 0.0, "rule": "difference"}
    selections = [None, Selection("a1", strong), Selection("a2", strong), None, Selection("a2", strong),
                  Selection("a1", strong)]
    prompts = PROMPTS + ["Alice"]
    together = engine.generate(prompts, params, selections)
    alone = [engine.generate([p], params, s)[0] for p, s in zip(prompts, selections, strict=True)]
    assert [r.completions[0].token_ids for r in together] == [r.completions[0].token_ids for r in alone]
    # unlearned rows differ from the base model's output (else this test would prove nothing) ...
    plain = engine.generate(prompts, params)
    changed = [t.completions[0].token_ids != p.completions[0].token_ids for t, p in zip(together, plain, strict=True)]
    for name in ("a1", "a2"):
        assert any(changed[i] for i, s in enumerate(selections) if s is not None and s.name == name)
    # ... and base rows sharing the batch with them do not
    assert not any(changed[i] for i, s in enumerate(selections) if s is None)


def _implausible_steps(model, prompt, completion_ids, filt):
    """How many sampled tokens fall outside the target's candidate set: log p < max log p + ln filter
    and not among the target's ULD_MIN_CANDIDATES most likely tokens."""
    from unlearn_serve.uld_combine import ULD_MIN_CANDIDATES

    ids = prompt + completion_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    bad = 0
    for step, token in enumerate(completion_ids):
        row = logp[len(prompt) - 1 + step]
        top = float(row.topk(ULD_MIN_CANDIDATES).values[-1])
        bad += float(row[token]) < min(float(row.max()) + math.log(filt), top) - 1e-5
    return bad


def test_filter_masked_tokens_never_sampled(engine, tiny_llama, tokenizer):
    filt = 1e-3
    prompt = tokenizer.encode("Alice likes")
    params = SamplingParams(max_tokens=10, temperature=1.5, seed=3, ignore_eos=True, n=4)
    masked = engine.generate([prompt], params, Selection("a2", {"alpha": 2.0, "filter": filt}))[0]
    assert sum(_implausible_steps(tiny_llama, prompt, c.token_ids, filt) for c in masked.completions) == 0
    # without the filter the same sampling does pick implausible tokens: the mask is what prevents it
    unmasked = engine.generate([prompt], params, Selection("a2", {"alpha": 2.0, "filter": 0.0}))[0]
    assert sum(_implausible_steps(tiny_llama, prompt, c.token_ids, filt) for c in unmasked.completions) > 0


def test_unknown_artifact_and_bad_options(engine, tokenizer):
    from unlearn_serve.server.engine.engine import EngineInputError
    from unlearn_serve.server.engine.sequence import Request

    with pytest.raises(UnknownArtifactError):
        engine.add_request(Request("x", [1, 2], SamplingParams(), Selection("nope")))
    with pytest.raises(EngineInputError):
        engine.add_request(Request("y", [1, 2], SamplingParams(), Selection("a1", {"filter": 2.0})))


def test_wrong_base_refused_naming_both(tokenizer, tiny_llama, artifacts):
    other = build_tiny_model("llama", tokenizer, seed=123)
    eng = Engine(other, tokenizer, EngineConfig(max_num_seqs=2, max_model_len=64), "other-model")
    with pytest.raises(ArtifactError) as err:
        eng.load_uld("a1", artifacts["a1"])
    assert "other-model" in str(err.value) and str(artifacts["a1"]) in str(err.value)


def test_unload_waits_for_in_flight(engine, tokenizer):
    from unlearn_serve.server.engine.sequence import Request

    rid = engine.new_request_id()
    engine.add_request(Request(rid, tokenizer.encode("Bob"), SamplingParams(max_tokens=5, ignore_eos=True),
                               Selection("a1")))
    engine.step()  # prefill: the request is running
    done = engine.unload("a1")
    assert "a1" not in engine.artifact_names()  # no new requests may pick it
    assert not done.is_set()  # but the in-flight one keeps it
    while engine.has_work():
        engine.step()
    assert done.is_set() and "a1" not in engine.assistants.assistants


def test_overhead_bench_runs_its_comparisons_end_to_end():
    """bench/uld_overhead.py on a small random Llama with its seven A/B comparisons (the repeat guard off or on the
    substituted positions only, the vocabulary-wide candidate search, no split of wide rows, no gate, no prefix guard,
    finishing words flipped): every
    configuration runs and is reported (the figures themselves are the bench's, not asserted here)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "uld_overhead.py"
    args = ["--layers", "2", "--hidden", "64", "--requests", "4", "--max-tokens", "6", "--rounds", "1"]
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--guard-ab", "--candidates-ab", "--split-ab", "--gate-ab"]
        + ["--prefix-guard-ab", "--finish-words-ab", "--guard-scope-ab"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("output tok/s  off", "repeat guard (n = 3) off: on", "vocabulary-wide candidate search: on",
                 "no split of wide rows: on", "without the early-exit gate: on", "without the prefix guard: on",
                 "assistant served gated", "prefix guard on", "finish_words off: on", "finish_words on",
                 "repeat guard on substituted positions only: on", "resident memory"):
        assert line in proc.stdout, proc.stdout
