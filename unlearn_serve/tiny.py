"""Tiny models and tokenizers built in-process, for tests, benchmarks and the docs' walk-throughs.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the spot and the
model is randomly initialised from a transformers config (then optionally trained by the caller).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

DEFAULT_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.",
    "Water boils at one hundred degrees. The sun rises in the east and sets in the west.",
    "Question: What is the color of the sky? Answer: The sky is blue on a clear day.",
    "Alice likes green apples. Bob plays the violin. Carol lives in a small red house by the sea.",
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
]


def train_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (any text round-trips) with ChatML special tokens."""
    corpus = list(texts) if texts is not None else list(DEFAULT_CORPUS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = chat_template
    return fast


# Small but architecture-faithful configs; every family the project supports has one.
_FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(intermediate_size=128),
    "qwen2": dict(intermediate_size=128),
    "qwen2_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16
    ),
    "mixtral": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        num_key_value_heads=None,  # MLA has no grouped KV heads: None = one key per head (a padded batch breaks else)
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16),
}

FAMILIES = tuple(_FAMILY_CONFIGS)


def tiny_config(
    family: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    **overrides,
):
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    kwargs.update(_FAMILY_CONFIGS[family])
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def build_tiny_model(
    family: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_overrides
) -> PreTrainedModel:
    """A randomly initialised tiny model of `family` whose vocabulary matches `tokenizer`."""
    config = tiny_config(family, vocab_size=len(tokenizer), **config_overrides)
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def fit_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    steps: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """Memorise `texts` with plain full-batch AdamW (tests and demos only; returns the final loss)."""
    torch.manual_seed(seed)
    enc = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


def write_random_expert_patch(
    model: PreTrainedModel, layer: int, expert: int, out: str | Path, seed: int = 0, noise: float = 2.0
) -> Path:
    """A UOE artifact with a clearly different expert and a router that prefers it (no training needed).

    Each patched tensor gets Gaussian noise of `noise` times its own std, and the expert's router
    row is raised so patched rows really re-route to it.
    """
    from unlearn_serve.artifact import Manifest, atomic_artifact_dir, fingerprint_model
    from unlearn_serve.expert_patch import extract_expert_patch, save_expert_patch
    from unlearn_serve.families import get_family

    gen = torch.Generator().manual_seed(seed)
    patch = extract_expert_patch(model, layer, expert, get_family(model))
    for t in [*patch.slices.tensors().values(), *patch.router.values()]:
        t.add_(torch.randn(t.shape, generator=gen).to(t.dtype) * t.float().std().to(t.dtype) * noise)
    patch.router["weight"][expert] += patch.router["weight"].std() * 3
    manifest = Manifest(
        "uoe",
        fingerprint_model(model),
        details={"family": patch.family, "layer": layer, "expert": expert, "num_experts": patch.num_experts},
    )
    with atomic_artifact_dir(out) as tmp:
        save_expert_patch(patch, manifest, tmp)
    return Path(out)
