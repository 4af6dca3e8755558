"""Batched sampling: every row has its own parameters, applied as tensor ops over [rows, vocab].

No Python loop over the vocabulary or over rows, except one over the rows that carry their own
seed (each needs its own generator, as in vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from unlearn_serve.server.engine.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row sampling tensors for one batch composition (rebuilt only when rows join or leave)."""

    temperature: torch.Tensor  # [R] (0 where greedy; replaced by 1 in the division)
    greedy: torch.Tensor  # [R] bool
    top_p: torch.Tensor  # [R]
    top_k: torch.Tensor  # [R] long, V where off
    min_p: torch.Tensor  # [R]
    repetition_penalty: torch.Tensor  # [R]
    presence_penalty: torch.Tensor  # [R]
    frequency_penalty: torch.Tensor  # [R]
    bias_rows: torch.Tensor  # [nnz] sparse logit_bias
    bias_tokens: torch.Tensor
    bias_values: torch.Tensor
    generators: list[tuple[int, torch.Generator]]  # (row, generator) for seeded rows
    any_top_k_or_p: bool
    any_min_p: bool
    any_penalty: bool
    all_greedy: bool

    @classmethod
    def build(
        cls,
        params: list[SamplingParams | None],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingBatch:
        """`params[i] is None` marks a padding row (sampled greedily, result ignored)."""
        real = [p or SamplingParams(temperature=0.0) for p in params]

        def t(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in real]
        rows, tokens, values = [], [], []
        for i, p in enumerate(real):
            for tok, val in p.logit_bias.items():
                rows.append(i)
                tokens.append(int(tok))
                values.append(float(val))
        return cls(
            temperature=t([p.temperature if p.temperature > 0 else 1.0 for p in real]),
            greedy=t([p.greedy for p in real], torch.bool),
            top_p=t([p.top_p for p in real]),
            top_k=t(top_k, torch.long),
            min_p=t([p.min_p for p in real]),
            repetition_penalty=t([p.repetition_penalty for p in real]),
            presence_penalty=t([p.presence_penalty for p in real]),
            frequency_penalty=t([p.frequency_penalty for p in real]),
            bias_rows=t(rows, torch.long),
            bias_tokens=t(tokens, torch.long),
            bias_values=t(values),
            generators=[(i, g) for i, g in enumerate(generators) if g is not None and not real[i].greedy],
            any_top_k_or_p=any(p.top_p < 1.0 or 0 < p.top_k < vocab_size for p in real),
            any_min_p=any(p.min_p > 0 for p in real),
            any_penalty=any(p.needs_penalties for p in real),
            all_greedy=all(p.greedy for p in real),
        )


def apply_penalties(
    logits: torch.Tensor,
    batch: SamplingBatch,
    prompt_mask: torch.Tensor | None,
    output_counts: torch.Tensor | None,
) -> torch.Tensor:
    """Repetition (HF/CTRL style, over prompt + output), presence and frequency (OpenAI style)."""
    if batch.bias_rows.numel():
        logits = logits.index_put((batch.bias_rows, batch.bias_tokens), batch.bias_values, accumulate=True)
    if not batch.any_penalty or output_counts is None:
        return logits
    counts = output_counts.to(logits.dtype)
    seen = counts > 0
    if prompt_mask is not None:
        seen_any = seen | prompt_mask
    else:
        seen_any = seen
    rp = batch.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rp, logits * rp)
    logits = torch.where(seen_any, penalised, logits)
    logits = logits - batch.frequency_penalty[:, None] * counts - batch.presence_penalty[:, None] * seen
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Pick one token per row from processed logits [R, V]; returns [R] long."""
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    scaled = logits / batch.temperature[:, None]
    if batch.any_top_k_or_p:
        sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
        drop = ranks >= batch.top_k[:, None]
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop |= (cum - sorted_logits.softmax(dim=-1)) >= batch.top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, sorted_idx, sorted_logits)
    probs = scaled.softmax(dim=-1)
    if batch.any_min_p:
        threshold = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    # Exponential race (Gumbel-max equivalent): argmax p / q with q ~ Exp(1) samples from p.
    noise = torch.empty_like(probs).exponential_()
    for row, generator in batch.generators:
        noise[row].exponential_(generator=generator)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(batch.greedy, greedy_tokens, sampled)


def gather_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-prob of `tokens` and the top-`top_n` alternatives, for rows of `logprobs` [R, V]."""
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    if top_n <= 0:
        return chosen, None, None
    top_values, top_ids = logprobs.topk(top_n, dim=-1)
    return chosen, top_values, top_ids
