"""OpenAI-compatible request/response models (after vLLM's entrypoints/openai/protocol.py).

Unknown fields are accepted and ignored, like vLLM. Sampling extensions vLLM users know (top_k,
min_p, repetition_penalty, stop_token_ids, ignore_eos, ...) are accepted as extra body fields, and
so is `unlearning: {"alpha", "filter"}` for requests that name an unlearning artifact.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import LOGPROB_FLOOR

# Always a finite number: a token an unlearned model rules out (probability 0) reports the floor.
Logprob = Annotated[
    float,
    Field(ge=LOGPROB_FLOOR, description=f"natural-log probability; finite, floored at {LOGPROB_FLOOR}"),
]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class UnlearningOptions(BaseModel):
    """Per-request ULD settings. A negative alpha would *add* the assistant (which memorised the forget set),
    so it is invalid for everybody; weakening below the artifact's defaults is a per-key permission (serving)."""

    # strict: `true` or "1" is not a strength (pydantic would coerce them to 1.0)
    model_config = ConfigDict(extra="forbid", strict=True)
    alpha: float | None = Field(
        # at most 1e6: past float32's range (~3.4e38) alpha became inf and every logit NaN (garbage tokens)
        default=None, ge=0.0, le=1e6, allow_inf_nan=False, description="strength of the assistant subtraction (ULD)"
    )
    filter: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="relative-top plausibility filter (ULD)"
    )


# The only chat_template_kwargs that reach a chat template: simple switches templates commonly read. Anything
# else (a whole `chat_template`, `tools`, nested values) could change what the template does or how long it runs.
CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort"})
CHAT_TEMPLATE_KWARG_MAX_CHARS = 64


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(OpenAIModel):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM-style extensions
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    unlearning: UnlearningOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        if value == "" or (isinstance(value, list) and any(not s for s in value)):
            raise ValueError("stop strings must be non-empty")  # a bare "" ended every completion at once
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            n=self.n,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


# ----------------------------------------------------------------------------- completions


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    best_of: int | None = None
    suffix: str | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Logprob | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, Logprob] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ----------------------------------------------------------------------------- chat


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description=f"only {', '.join(sorted(CHAT_TEMPLATE_KWARGS))}: booleans or strings of at most "
        f"{CHAT_TEMPLATE_KWARG_MAX_CHARS} characters",
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value):
        for key, item in (value or {}).items():
            if key not in CHAT_TEMPLATE_KWARGS:
                allowed = ", ".join(sorted(CHAT_TEMPLATE_KWARGS))
                raise ValueError(f"chat_template_kwargs key {key[:40]!r} is not allowed (allowed: {allowed})")
            if not (isinstance(item, bool) or (isinstance(item, str) and len(item) <= CHAT_TEMPLATE_KWARG_MAX_CHARS)):
                raise ValueError(
                    f"chat_template_kwargs.{key} must be a boolean or a string of at most "
                    f"{CHAT_TEMPLATE_KWARG_MAX_CHARS} characters"
                )
        return value


class TopLogprob(BaseModel):
    token: str
    logprob: Logprob
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


# ----------------------------------------------------------------------------- models & admin


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "unlearn-serve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    unlearning: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadArtifactRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
    path: str = Field(min_length=1)
    method: Literal["uld", "uoe"] | None = None


class UnloadArtifactRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
