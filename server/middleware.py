"""Hardening at the HTTP edge, as one pure ASGI middleware (so streaming responses pass through untouched):

* request body cap: a declared `Content-Length` over the limit is refused before the body is read; a chunked
  body (no length) is read up to the limit and refused as soon as it goes over, so a client cannot make the
  server buffer more than `max_body_bytes`;
* admission control (back-pressure): with `--max-queue`, at most `max_num_seqs + max_queue` generation requests
  are admitted at once; the next one gets 503 + `Retry-After` before any work (tokenization, queueing) is done.
  The engine's own waiting-sequence check (serving) still applies to multi-sequence requests (`n`, prompt
  lists); this counter also covers requests queued between engine steps, which that check cannot see yet;
* in-flight accounting for draining (`ServerState.active_requests`) and the `http_requests` metric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unlearn_serve.server.errors import error_json

if TYPE_CHECKING:
    from unlearn_serve.server.app import ServerState

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# Probes and metrics are not "work": they must not hold a drain open.
UNTRACKED_PATHS = frozenset({"/health", "/ready", "/metrics"})
RETRY_AFTER_S = 1


class _BodyTooLarge(Exception):
    pass


class LimitsMiddleware:
    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        limit = state.config.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        status: list[int] = []

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        if length is not None and length.isdigit() and int(length) > limit:
            await self._too_large(scope, receive, send_status, int(length))
        elif length is None and b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            try:
                receive = await self._buffered(receive, limit)
            except _BodyTooLarge:
                await self._too_large(scope, receive, send_status, None)
            else:
                await self._admit(scope, receive, send_status)
        else:
            await self._admit(scope, receive, send_status)
        if state.metrics is not None and status:
            route = scope.get("route")
            state.metrics.http_requests.labels(getattr(route, "path", "other"), str(status[0])).inc()

    async def _admit(self, scope, receive, send) -> None:
        state = self.state
        path = scope.get("path", "")
        generate = scope.get("method") == "POST" and path in GENERATE_PATHS
        if generate:
            capacity = state.admission_capacity()
            if capacity is not None and state.generating >= capacity:
                response = error_json(
                    503,
                    f"server is at capacity ({state.generating} requests in flight, {state.config.max_queue} may "
                    "wait); retry later",
                    None,
                    "service_unavailable",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
                await response(scope, receive, send)
                return
            state.generating += 1
        tracked = path not in UNTRACKED_PATHS
        state.active_requests += tracked
        try:
            await self.app(scope, receive, send)
        finally:
            state.active_requests -= tracked
            if generate:
                state.generating -= 1

    async def _too_large(self, scope, receive, send, length: int | None) -> None:
        limit = self.state.config.max_body_bytes
        size = f"{length} bytes" if length is not None else f"over {limit} bytes"
        response = error_json(
            400, f"request body is {size}; the limit is {limit} bytes", None, "body_too_large", {"Connection": "close"}
        )
        await response(scope, receive, send)

    @staticmethod
    async def _buffered(receive, limit: int):
        """Read a body of unknown length up to `limit` bytes; return a `receive` that replays it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                replay = [message]  # the client went away mid-body: let the app see the disconnect
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return replay_receive
