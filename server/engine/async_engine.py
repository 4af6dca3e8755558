"""Runs an `Engine` on a background thread and bridges its outputs to asyncio.

Model compute releases the GIL, so the event loop keeps serving HTTP while a step runs.
Cancelling the consumer of `generate()` (a client disconnect) aborts the request, which frees
its KV slot before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from server.engine.engine import Engine
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Request, RequestOutput, Selection

logger = logging.getLogger("unlearn_serve.engine")


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        # called on the event loop with each finished engine Request (metrics)
        self.on_request_finished = None

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
        engine = self.engine
        while not self._stop.is_set():
            if not engine.has_work():
                engine.wakeup.wait(0.05)
                engine.wakeup.clear()
                continue
            try:
                engine.step()
            except Exception as exc:  # keep serving: fail the batch, not the process
                logger.exception("engine step failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                engine.fail_all(f"engine error: {type(exc).__name__}")

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        selection: Selection | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (deltas) until it finishes. Raises engine input errors eagerly."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = request_id or self.engine.new_request_id()
        request = Request(
            request_id,
            prompt_token_ids,
            params,
            selection,
            on_output=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out),
        )
        self.engine.add_request(request)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                if finished and self.on_request_finished is not None:
                    self.on_request_finished(request, out)
                yield out
        finally:
            if not finished:
                self.engine.abort(request_id)
