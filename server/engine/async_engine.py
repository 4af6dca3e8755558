"""Runs an `Engine` on a background thread and bridges its outputs to asyncio.

Model compute releases the GIL, so the event loop keeps serving HTTP while a step runs.
Cancelling the consumer of `generate()` (a client disconnect) aborts the request, which frees
its KV slot before the next step.

A step's outputs cross to the event loop in ONE `call_soon_threadsafe` (not one per request): with
64 streams that is one loop wake-up per token step instead of 64.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

import torch
from unlearn_serve.server.engine.engine import Engine
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Request, RequestOutput, Selection

logger = logging.getLogger("unlearn_serve.engine")

# Consecutive failed steps after which the engine counts as dead (a sticky device error fails them all).
MAX_CONSECUTIVE_FAILURES = 3
# Errors after which the device cannot be trusted again in this process (CUDA's are sticky).
_FATAL_MARKERS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "CUDNN_STATUS", "NCCL error")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped after a fatal error; the process must be restarted."""


def is_fatal(exc: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return not isinstance(exc, Exception) or any(m in str(exc) for m in _FATAL_MARKERS)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        # set when the loop has died (fatal device error, or every step failing): /ready and /health fail
        self.fatal_error: str | None = None
        # called on the event loop with each finished engine Request (metrics)
        self.on_request_finished = None
        # request id -> (its consumer's queue, or None once the consumer left; the request)
        self._queues: dict[str, tuple[asyncio.Queue[RequestOutput] | None, Request]] = {}
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="unlearn-engine", daemon=True)
        self.engine.engine_thread = self._thread
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.engine.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.engine.engine_thread = None
        self._thread = None

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # the loop itself broke: nothing drives the engine any more
            logger.exception("engine loop died")
            self._die(f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        engine = self.engine
        failures = 0
        while not self._stop.is_set():
            if not engine.has_work():
                engine.wakeup.wait(0.05)
                engine.wakeup.clear()
                continue
            try:
                outputs = engine.step()
                failures = 0
            except BaseException as exc:  # keep serving: fail the batch, not the process
                logger.exception("engine step failed")
                failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                outputs = engine.fail_all(f"engine error: {type(exc).__name__}")
                if is_fatal(exc) or failures >= MAX_CONSECUTIVE_FAILURES:
                    self._publish(outputs)
                    self._die(self.last_error)
                    return
            self._publish(outputs)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        loop = self._event_loop
        if outputs and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._dispatch, outputs)
            except RuntimeError:  # the loop closed between the check and the call (shutdown)
                pass

    def _die(self, reason: str) -> None:
        """Stop for good: readiness and health fail with `reason`, queued and new requests get an error."""
        self.fatal_error = reason
        try:
            self._publish(self.engine.fail_all(f"engine stopped after a fatal error: {reason}"))
        except BaseException:  # the engine state may be what broke; the requests then end via `generate`
            logger.exception("could not fail the remaining requests")
        loop = self._event_loop
        if loop is not None and not loop.is_closed():
            try:  # consumers still waiting on requests the engine never saw
                loop.call_soon_threadsafe(self._fail_waiting, reason)
            except RuntimeError:
                pass

    def _fail_waiting(self, reason: str) -> None:
        for request_id, (queue, request) in list(self._queues.items()):
            if queue is not None and not request.finished:
                for seq in request.sequences:
                    seq.finish_reason = seq.finish_reason or "abort"
                error = f"engine stopped: {reason}"
                queue.put_nowait(RequestOutput(request_id, [], request.prompt_token_ids, finished=True, error=error))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: hand each output to its request's consumer (aborted ones have none)."""
        for out in outputs:
            entry = self._queues.get(out.request_id)
            if entry is None:
                continue
            queue, request = entry
            if queue is not None:
                queue.put_nowait(out)
            elif out.finished:  # an abandoned (aborted) request has ended: count it in the metrics too
                del self._queues[out.request_id]
                if self.on_request_finished is not None:
                    self.on_request_finished(request, out)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        selection: Selection | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (deltas) until it finishes. Raises engine input errors eagerly."""
        if self.fatal_error is not None:
            raise EngineDeadError(f"the engine stopped after a fatal error: {self.fatal_error}")
        self._event_loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = request_id or self.engine.new_request_id()
        request = Request(request_id, prompt_token_ids, params, selection)
        self._queues[request_id] = (outputs, request)  # before add_request: the first output may come at once
        try:
            self.engine.add_request(request)
        except BaseException:
            del self._queues[request_id]
            raise
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                if finished and self.on_request_finished is not None:
                    self.on_request_finished(request, out)
                yield out
        finally:
            if finished:
                self._queues.pop(request_id, None)
            elif request.finished:  # it ended, but the consumer left before reading the last output
                self._queues.pop(request_id, None)
                if self.on_request_finished is not None:
                    self.on_request_finished(request, None)
            else:  # the consumer left (client disconnect): abort; _dispatch sees the request's end
                self._queues[request_id] = (None, request)
                self.engine.abort(request_id)
