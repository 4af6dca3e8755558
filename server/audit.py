"""Per-request context (who called, what was applied) and the audit log (`serve --audit-log FILE`).

`AuditMiddleware` gives every `/v1` request a `RequestContext`; the auth dependency fills in the key,
serving fills in the model, the artifact and the alpha/filter it applied and the engine's finish callback
the token counts. When the response has been sent, one JSON line goes to the audit log:

    {"time": "...", "request_id": "...", "key": "support-bot", "method": "POST", "endpoint": "/v1/completions",
     "model": "forget-hp", "artifact": "forget-hp", "alpha": 0.75, "filter": 0.01, "status": 200,
     "prompt_tokens": 12, "completion_tokens": 16}

It never holds prompt or completion text, nor a client-chosen string: `model` is only logged when it names a
served model and `endpoint` is the route's template. Lines are queued and written by a thread (the event loop
never touches the file); the file rotates by size (`max_bytes`; 0 leaves rotation to logrotate).
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import logging.handlers
import queue
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unlearn_serve.server.policy import KeyEntry

AUDITED_PREFIX = "/v1/"
REQUEST_ID_HEADER = "x-request-id"


@dataclass
class RequestContext:
    request_id: str
    method: str
    endpoint: str
    key: KeyEntry | None = None  # set by the auth dependency once the caller is known
    model: str | None = None  # a served name the request asked for (never an unknown string)
    artifact: str | None = None  # the unlearning artifact applied
    alpha: float | None = None
    filter: float | None = None
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def key_name(self) -> str | None:
        return self.key.name if self.key is not None and self.key.name else None

    def record(self) -> dict:
        line = asdict(self)
        del line["key"]
        return {"time": _now(), "key": self.key_name, **line}


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("unlearn_request", default=None)


def current_context() -> RequestContext | None:
    """The context of the request being handled (tasks it starts inherit it)."""
    return _current.get()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class AuditConfig:
    path: str
    max_bytes: int = 100 * 1024 * 1024  # 0: never rotate (leave it to logrotate with copytruncate)
    backups: int = 5


class AuditLog:
    """Appends JSON lines from a writer thread; `write` only enqueues."""

    def __init__(self, config: AuditConfig):
        path = Path(config.path)
        self.handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8"
        )
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.listener = logging.handlers.QueueListener(self.queue, self.handler)
        self.listener.start()

    def write(self, entry: dict) -> None:
        self.queue.put_nowait(logging.makeLogRecord({"msg": json.dumps(entry, separators=(",", ":"))}))

    def close(self) -> None:
        self.listener.stop()  # writes what is queued first
        self.handler.close()


class AuditMiddleware:
    """Pure ASGI (streams pass untouched): a RequestContext per /v1 request, one audit line when it ends."""

    def __init__(self, app, state):
        self.app = app
        self.state = state  # ServerState: .audit (AuditLog | None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(AUDITED_PREFIX):
            await self.app(scope, receive, send)
            return
        ctx = RequestContext(request_id=f"req-{uuid.uuid4().hex}", method=scope.get("method", ""), endpoint="other")
        request_id = ctx.request_id.encode()

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id)]
            await send(message)

        token = _current.set(ctx)
        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            ctx.status = ctx.status or 500  # answered by the outermost error handler, outside this middleware
            raise
        finally:
            _current.reset(token)
            route = scope.get("route")
            ctx.endpoint = getattr(route, "path", "other")  # the template, never the client's raw path
            audit = self.state.audit
            if audit is not None:
                audit.write(ctx.record())
