"""Authentication for /v1/*: `Authorization: Bearer <key>`, looked up in the access policy (server.policy).

The caller's KeyEntry goes on the request's context (server.audit) for the routes, serving, the audit log and
the metrics. `require_admin` guards the artifact admin routes.
"""

from __future__ import annotations

from fastapi import Request
from unlearn_serve.server.audit import RequestContext, current_context
from unlearn_serve.server.errors import permission_denied, unauthorized
from unlearn_serve.server.policy import KeyEntry


def _context(request: Request) -> RequestContext:
    ctx = current_context()
    if ctx is None:  # only without AuditMiddleware (an app assembled by hand): still authenticate
        ctx = RequestContext(request_id="", method=request.method, endpoint=request.url.path)
    return ctx


async def check_api_key(request: Request) -> KeyEntry:
    policy = request.app.state.server.policy
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    key = policy.authenticate(token.strip()) if (policy.open or scheme.lower() == "bearer") else None
    if key is None:
        raise unauthorized()
    _context(request).key = key
    request.state.api_key = key
    return key


def caller(request: Request) -> KeyEntry | None:
    """The authenticated caller of this request (None only if check_api_key did not run)."""
    return getattr(request.state, "api_key", None)


async def require_admin(request: Request) -> None:
    key = caller(request)
    if key is None or not key.admin:
        raise permission_denied("this API key may not load or unload unlearning artifacts (it is not an admin key)")
