"""The one place that builds error responses: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from unlearn_serve.server.protocol import ErrorInfo, ErrorResponse

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "BadRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_request") -> APIError:
    return APIError(400, message, param, code)


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.", None, "invalid_api_key")


def permission_denied(message: str, param: str | None = None) -> APIError:
    return APIError(403, message, param, "permission_denied")


def not_found(message: str, param: str | None = "model") -> APIError:
    return APIError(404, message, param, "model_not_found")


def unavailable(message: str, retry_after: int | None = None) -> APIError:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return APIError(503, message, None, "service_unavailable", headers)


def error_json(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    body = ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "APIError"), param=param, code=code))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def error_payload(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """Error body for a stream that fails after its headers were sent."""
    return ErrorResponse(
        error=ErrorInfo(message=message, type=_TYPES.get(status, "APIError"), param=param, code=code)
    ).model_dump()


def _audit_model(request: Request, body) -> None:
    """Record a refused body's `model` for the audit log when it is a served name (never a client's string)."""
    from unlearn_serve.server.audit import current_context

    ctx = current_context()
    model = body.get("model") if isinstance(body, dict) else None
    if ctx is None or ctx.model is not None or not isinstance(model, str):
        return
    state = getattr(request.app.state, "server", None)
    serving = getattr(state, "serving", None)
    if serving is not None and (model == serving.served_model_name or model in serving.engine.artifact_names()):
        ctx.model = model


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_json(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # OpenAI (and vLLM) answer schema errors with 400, not FastAPI's default 422.
        _audit_model(request, exc.body)  # e.g. a negative unlearning.alpha: the audit log names the target
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        message = first.get("msg", "invalid request")
        if loc:
            message = f"{'.'.join(loc)}: {message}"
        return error_json(400, message, ".".join(loc) or None, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return error_json(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        return error_json(500, f"internal error: {type(exc).__name__}", None, "internal_error")
