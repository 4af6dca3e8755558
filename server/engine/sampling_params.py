"""Per-request sampling parameters (the engine's, independent of any HTTP protocol)."""

from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """Invalid sampling parameters; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    n: int = 1
    logprobs: int | None = None  # None = no logprobs; k >= 0 = sampled token + k alternatives
    prompt_logprobs: int | None = None  # same, for the prompt tokens (completions echo)
    skip_special_tokens: bool = True

    def validate(self, vocab_size: int | None = None, max_n: int = 16, max_logprobs: int = 20) -> None:
        if self.max_tokens < 0:
            raise SamplingParamsError(f"max_tokens must be at least 0, got {self.max_tokens}", "max_tokens")
        if self.temperature < 0:
            raise SamplingParamsError(f"temperature must be non-negative, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise SamplingParamsError(f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.repetition_penalty <= 0:
            raise SamplingParamsError("repetition_penalty must be positive", "repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not 1 <= self.n <= max_n:
            raise SamplingParamsError(f"n must be between 1 and {max_n}, got {self.n}", "n")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= max_logprobs:
                raise SamplingParamsError(f"{name} must be between 0 and {max_logprobs}, got {value}", name)
        # a 64-bit signed seed (as vLLM): a larger one made torch.Generator.manual_seed raise inside the engine
        # step, failing every request of the batch, and three such requests stopped the engine for good
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise SamplingParamsError(f"seed must be a 64-bit signed integer, got {self.seed}", "seed")
        if vocab_size is not None:
            for name in ("logit_bias", "stop_token_ids"):
                for token_id in getattr(self, name):
                    if not 0 <= int(token_id) < vocab_size:
                        raise SamplingParamsError(
                            f"token id {token_id} is outside the vocabulary (size {vocab_size})", name
                        )
        for value in self.logit_bias.values():
            if not -100.0 <= value <= 100.0:
                raise SamplingParamsError("logit_bias values must be in [-100, 100]", "logit_bias")

    @property
    def greedy(self) -> bool:
        # below vLLM's sampling epsilon a temperature is greedy: 1e-300 became 0 in a float32 tensor, and
        # logits / 0 sampled NaNs (token 0, over and over)
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )
