"""Completions and chat completions: OpenAI requests -> engine requests -> OpenAI responses/streams."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from unlearn_serve.server.audit import RequestContext, current_context
from unlearn_serve.server.auth import caller
from unlearn_serve.server.engine.async_engine import AsyncEngine, EngineDeadError
from unlearn_serve.server.engine.engine import EngineInputError, UnknownArtifactError
from unlearn_serve.server.engine.sequence import RequestOutput, Selection, TokenLogprob
from unlearn_serve.server.errors import (
    APIError,
    bad_request,
    error_payload,
    not_found,
    permission_denied,
    unauthorized,
    unavailable,
)
from unlearn_serve.server.policy import KeyEntry, PolicyViolation, check_unlearning
from unlearn_serve.server.protocol import (
    AssistantMessage,
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)


async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators, yielding (stream index, item) as items arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as exc:  # surface errors to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass


async def _until_disconnect(raw_request: HTTPRequest, coro):
    """Run `coro`, cancelling it (and so aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise APIError(499, "client disconnected")


def _sse(payload: Any) -> str:
    data = payload.model_dump_json(exclude_unset=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


class OpenAIServing:
    def __init__(
        self,
        async_engine: AsyncEngine,
        served_model_name: str,
        metrics=None,
        max_queue: int | None = None,
        chat_template_timeout_s: float = 5.0,
    ):
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.tokenizer = self.engine.tokenizer
        self.served_model_name = served_model_name
        self.metrics = metrics
        self.max_queue = max_queue
        self.chat_template_timeout_s = chat_template_timeout_s
        # Chat templates render here, never on the event loop. A render past the time limit gets 400; its thread
        # (threads cannot be killed) runs on, but the template is the operator's and its input is bounded by the
        # body cap, and with two workers a stuck render cannot take more than these threads.
        self._templates = ThreadPoolExecutor(max_workers=2, thread_name_prefix="unlearn-template")
        # engine request id -> the HTTP request's context (token counts and key name for the audit log, metrics)
        self.tracked: dict[str, RequestContext] = {}

    # ------------------------------------------------------------------ shared
    def selection_for(self, model: str, options, key: KeyEntry | None) -> Selection | None:
        """Resolve `model` and `unlearning` for this caller: names it may not use are 404 exactly like names that
        do not exist; overrides that weaken a ULD artifact below its defaults need `can_weaken` (403)."""
        if key is None:  # fail closed: only reachable if the auth dependency did not run
            raise unauthorized()
        base = model == self.served_model_name
        served = base or model in self.engine.artifact_names()
        ctx = current_context() or RequestContext("", "", "")
        if served:  # the audit log shows served names only, denied ones too; never a client's arbitrary string
            ctx.model = model
        if not served or not key.allows(model):
            raise not_found(f"The model `{model}` does not exist.")
        if base:
            if options is not None:
                raise bad_request("`unlearning` options need an unlearning artifact as `model`", "unlearning")
            return None
        opts = options.model_dump(exclude_none=True) if options is not None else {}
        assistant = self.engine.assistants.assistants.get(model)
        if assistant is None:  # a UOE expert patch: nothing to tune, so nothing to weaken
            if opts:
                raise bad_request("UOE expert patches take no `unlearning` options", "unlearning")
            ctx.artifact = model
            return Selection(model, {})
        try:
            check_unlearning(key, model, opts, assistant.alpha, assistant.filter)
        except PolicyViolation as exc:
            raise permission_denied(exc.message, exc.param) from None
        # explicit values: what was checked (and is audited) is what the engine applies
        applied = {"alpha": opts.get("alpha", assistant.alpha), "filter": opts.get("filter", assistant.filter)}
        ctx.artifact, ctx.alpha, ctx.filter = model, applied["alpha"], applied["filter"]
        return Selection(model, applied)

    def _check_capacity(self, sequences: int = 1, param: str = "n") -> None:
        if self.max_queue is None:
            return
        # one request must not queue more than the server ever holds (a prompt list is not bounded otherwise)
        most = self.engine.config.max_num_seqs + self.max_queue
        if sequences > most:
            raise bad_request(f"this request needs {sequences} sequences (prompts x n); at most {most} fit", param)
        # waiting + running, not waiting alone: right after a burst the requests wait until the next step moves them
        # into free batch slots, and counting them as queued refused requests the batch had room for; this request's
        # own sequences count too (an n=8 request must not overfill a queue with one place left)
        held = self.engine.num_waiting() + self.engine.num_running()
        if held + sequences > most:
            raise unavailable(
                f"server is at capacity ({held} sequences running or waiting, at most {most}: --max-num-seqs + "
                "--max-queue); retry later",
                retry_after=1,
            )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def _stream_request(
        self, ids: list[int], params, selection: Selection | None
    ) -> AsyncIterator[RequestOutput]:
        started = time.monotonic()
        last = started
        artifact = selection.name if selection else "none"
        ctx = current_context()
        key_name = (ctx.key_name if ctx is not None else None) or "none"
        request_id = self.engine.new_request_id()
        if ctx is not None:
            self.tracked[request_id] = ctx  # the finish callback adds the token counts and pops it
        answered = False
        try:
            async for out in self.async_engine.generate(ids, params, selection, request_id=request_id):
                answered = True
                if out.error:
                    raise APIError(500, out.error, None, "engine_error")
                now = time.monotonic()
                new_tokens = sum(len(o.token_ids) for o in out.outputs)
                if self.metrics is not None and last != started:
                    self.metrics.observe_itl(self.served_model_name, artifact, now - last, new_tokens, key_name)
                if new_tokens:
                    last = now
                yield out
        except UnknownArtifactError as exc:  # unloaded between the checks above and admission
            raise not_found(str(exc)) from None
        except EngineDeadError as exc:
            raise unavailable(str(exc)) from None
        finally:
            if not answered:  # refused or abandoned before any output: no finish callback may come for it
                self.tracked.pop(request_id, None)

    def _start(self, prompts: list[list[int]], params, selection):
        """Create one engine stream per prompt; input errors surface here, before any response."""
        streams = []
        for ids in prompts:
            try:
                self.engine.check_request(ids, params)
            except EngineInputError as exc:
                raise bad_request(str(exc), exc.param) from None
            streams.append(self._stream_request(ids, params, selection))
        try:
            self.engine.resolve(selection)
        except UnknownArtifactError as exc:
            raise not_found(str(exc)) from None
        except EngineInputError as exc:
            raise bad_request(str(exc), exc.param) from None
        return streams

    # ------------------------------------------------------------------ completions
    def _completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            return [self.engine.encode_prompt(prompt)]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [self.engine.encode_prompt(p) for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]
        raise bad_request("prompt must be a string, a list of strings, or token ids", "prompt")

    def _completion_logprobs(
        self, entries: list[TokenLogprob | None], token_ids: list[int], offset: int
    ) -> tuple[CompletionLogprobs, int]:
        lp = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries, strict=True):
            text = self._token_text(token_id)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                lp.token_logprobs.append(entry.logprob)
                top = {self._token_text(t): v for t, v in entry.top}
                # like OpenAI and vLLM: the sampled token is always listed (up to logprobs + 1 entries)
                top.setdefault(text, entry.logprob)
                lp.top_logprobs.append(top)
        return lp, offset

    async def completions(self, request: CompletionRequest, raw_request: HTTPRequest):
        selection = self.selection_for(request.model, request.unlearning, caller(raw_request))
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        prompts = self._completion_prompts(request)
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        try:
            params = request.sampling_params(max_tokens, request.logprobs, prompt_logprobs)
        except ValueError as exc:
            raise bad_request(str(exc), "logit_bias") from None
        self._check_capacity(len(prompts) * params.n, "prompt" if len(prompts) > 1 else "n")
        streams = self._start(prompts, params, selection)
        n = params.n
        if request.stream:
            return StreamingResponse(
                self._completion_stream(request, prompts, streams, n), media_type="text/event-stream"
            )
        return await _until_disconnect(raw_request, self._completion_full(request, prompts, streams, n))

    async def _completion_full(self, request: CompletionRequest, prompts, streams, n: int) -> JSONResponse:
        texts: dict[int, str] = {}
        tokens: dict[int, list[int]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        finish: dict[int, tuple[str | None, Any]] = {}
        prompt_lp: dict[int, list[TokenLogprob | None]] = {}
        generated = 0
        async for p_idx, out in merge_streams(streams):
            if out.prompt_logprobs is not None:
                prompt_lp[p_idx] = out.prompt_logprobs
            for so in out.outputs:
                idx = p_idx * n + so.index
                texts[idx] = texts.get(idx, "") + so.text
                tokens.setdefault(idx, []).extend(so.token_ids)
                if so.logprobs:
                    logprobs.setdefault(idx, []).extend(so.logprobs)
                finish[idx] = (so.finish_reason, so.stop_reason)
            if out.finished:
                generated += out.num_generated_tokens
        choices = []
        for p_idx, ids in enumerate(prompts):
            prompt_text = self.tokenizer.decode(ids, skip_special_tokens=False) if request.echo else ""
            for s in range(n):
                idx = p_idx * n + s
                lp = None
                if request.logprobs is not None:
                    entries: list[TokenLogprob | None] = []
                    ids_for_lp: list[int] = []
                    if request.echo:
                        entries += prompt_lp.get(p_idx, [None] * len(ids))
                        ids_for_lp += ids
                    entries += logprobs.get(idx, [])
                    ids_for_lp += tokens.get(idx, [])[: len(logprobs.get(idx, []))]
                    lp, _ = self._completion_logprobs(entries, ids_for_lp, 0)
                reason, stop_reason = finish.get(idx, ("length", None))
                choices.append(
                    CompletionChoice(
                        index=idx,
                        text=prompt_text + texts.get(idx, ""),
                        logprobs=lp,
                        finish_reason=reason,
                        stop_reason=stop_reason,
                    )
                )
        prompt_tokens = sum(len(p) for p in prompts)
        usage = UsageInfo(
            prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated
        )
        body = CompletionResponse(model=request.model, choices=choices, usage=usage)
        return JSONResponse(body.model_dump())

    async def _completion_stream(self, request: CompletionRequest, prompts, streams, n: int) -> AsyncIterator[str]:
        response_id = CompletionResponse(model=request.model, choices=[]).id
        created = int(time.time())
        generated = 0
        offsets: dict[int, int] = {}
        prompt_lp: dict[int, list[TokenLogprob | None]] = {}
        echoed: set[int] = set()
        try:
            async for p_idx, out in merge_streams(streams):
                if out.prompt_logprobs is not None:
                    prompt_lp[p_idx] = out.prompt_logprobs
                choices = []
                for so in out.outputs:
                    idx = p_idx * n + so.index
                    text = so.text
                    lp = None
                    if request.echo and idx not in echoed:
                        echoed.add(idx)
                        text = self.tokenizer.decode(prompts[p_idx], skip_special_tokens=False) + text
                        if request.logprobs is not None:
                            entries = prompt_lp.get(p_idx, [None] * len(prompts[p_idx]))
                            lp, offsets[idx] = self._completion_logprobs(entries, prompts[p_idx], 0)
                    if request.logprobs is not None and so.logprobs:
                        more, offsets[idx] = self._completion_logprobs(
                            so.logprobs, so.token_ids[: len(so.logprobs)], offsets.get(idx, 0)
                        )
                        if lp is None:
                            lp = more
                        else:
                            for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                                getattr(lp, field).extend(getattr(more, field))
                    if text or so.finish_reason is not None or lp is not None:
                        choices.append(
                            CompletionStreamChoice(
                                index=idx, text=text, logprobs=lp, finish_reason=so.finish_reason,
                                stop_reason=so.stop_reason,
                            )
                        )
                if out.finished:
                    generated += out.num_generated_tokens
                if choices:
                    yield _sse(CompletionChunk(id=response_id, created=created, model=request.model, choices=choices))
            if request.stream_options and request.stream_options.include_usage:
                prompt_tokens = sum(len(p) for p in prompts)
                usage = UsageInfo(
                    prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated
                )
                yield _sse(
                    CompletionChunk(id=response_id, created=created, model=request.model, choices=[], usage=usage)
                )
        except APIError as exc:
            yield _sse(error_payload(exc.status, exc.message, exc.param, exc.code))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ chat
    async def _chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                f"The model `{self.served_model_name}` has no chat template, so chat completions are unavailable; "
                "use /v1/completions instead.",
                "messages",
            )
        try:
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
            render = functools.partial(
                self.tokenizer.apply_chat_template,
                messages,
                add_generation_prompt=request.add_generation_prompt,
                tokenize=False,
                **(request.chat_template_kwargs or {}),  # allow-listed simple values only (protocol)
            )
            future = asyncio.get_running_loop().run_in_executor(self._templates, render)
            text = await asyncio.wait_for(future, self.chat_template_timeout_s)
        except TimeoutError:
            raise bad_request(
                f"the chat template took longer than {self.chat_template_timeout_s:g}s to render",
                "messages",
                "chat_template_timeout",
            ) from None
        except Exception as exc:  # jinja raises on template-rejected conversations
            raise bad_request(f"could not apply the chat template: {exc}", "messages") from None
        return self.engine.encode_prompt(text, add_special_tokens=False)

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> ChatChoiceLogprobs:
        content = []
        for e in entries:
            text = self._token_text(e.token_id)
            content.append(
                ChatTokenLogprob(
                    token=text,
                    logprob=e.logprob,
                    bytes=list(text.encode()),
                    top_logprobs=[
                        TopLogprob(token=(t := self._token_text(i)), logprob=v, bytes=list(t.encode()))
                        for i, v in e.top
                    ],
                )
            )
        return ChatChoiceLogprobs(content=content)

    async def chat(self, request: ChatCompletionRequest, raw_request: HTTPRequest):
        selection = self.selection_for(request.model, request.unlearning, caller(raw_request))
        ids = await self._chat_prompt(request)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.engine.max_model_len - len(ids))
        if request.top_logprobs and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        try:
            params = request.sampling_params(max_tokens, logprobs, None)
        except ValueError as exc:
            raise bad_request(str(exc), "logit_bias") from None
        self._check_capacity()
        streams = self._start([ids], params, selection)
        if request.stream:
            return StreamingResponse(
                self._chat_stream(request, ids, streams[0], params.n), media_type="text/event-stream"
            )
        return await _until_disconnect(raw_request, self._chat_full(request, ids, streams[0], params.n))

    async def _chat_full(self, request, ids, stream, n: int) -> JSONResponse:
        texts = [""] * n
        entries: list[list[TokenLogprob]] = [[] for _ in range(n)]
        finish: list[tuple[str | None, Any]] = [(None, None)] * n
        generated = 0
        async for out in stream:
            for so in out.outputs:
                texts[so.index] += so.text
                if so.logprobs:
                    entries[so.index].extend(so.logprobs)
                finish[so.index] = (so.finish_reason, so.stop_reason)
            if out.finished:
                generated = out.num_generated_tokens
        choices = [
            ChatCompletionChoice(
                index=i,
                message=AssistantMessage(content=texts[i]),
                logprobs=self._chat_logprobs(entries[i]) if request.logprobs else None,
                finish_reason=finish[i][0],
                stop_reason=finish[i][1],
            )
            for i in range(n)
        ]
        usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=generated, total_tokens=len(ids) + generated)
        return JSONResponse(ChatCompletionResponse(model=request.model, choices=choices, usage=usage).model_dump())

    async def _chat_stream(self, request, ids, stream, n: int) -> AsyncIterator[str]:
        response_id = ChatCompletionResponse(model=request.model, choices=[], usage=UsageInfo()).id
        created = int(time.time())

        def chunk(choices, usage=None):
            return _sse(
                ChatCompletionChunk(id=response_id, created=created, model=request.model, choices=choices, usage=usage)
            )

        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)])
        generated = 0
        try:
            async for out in stream:
                choices = []
                for so in out.outputs:
                    lp = self._chat_logprobs(so.logprobs) if request.logprobs and so.logprobs else None
                    if so.text or so.finish_reason is not None or lp is not None:
                        choices.append(
                            ChatStreamChoice(
                                index=so.index,
                                delta=DeltaMessage(content=so.text) if so.text else DeltaMessage(),
                                logprobs=lp,
                                finish_reason=so.finish_reason,
                            )
                        )
                if out.finished:
                    generated = out.num_generated_tokens
                if choices:
                    yield chunk(choices)
            if request.stream_options and request.stream_options.include_usage:
                usage = UsageInfo(
                    prompt_tokens=len(ids), completion_tokens=generated, total_tokens=len(ids) + generated
                )
                yield chunk([], usage)
        except APIError as exc:
            yield _sse(error_payload(exc.status, exc.message, exc.param, exc.code))
        yield "data: [DONE]\n\n"
