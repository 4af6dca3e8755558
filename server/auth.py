"""API-key check for /v1/*: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request
from unlearn_serve.server.errors import APIError


def check_api_key(request: Request) -> None:
    keys: list[str] = request.app.state.config.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    # Compare against every key so timing does not reveal which (or whether a prefix) matched.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.encode())
    if scheme.lower() != "bearer" or not ok:
        raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.", None, "invalid_api_key")
