"""The FastAPI application: thin routes over `OpenAIServing`, auth, metrics, health and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from unlearn_serve.server.audit import AuditLog, AuditMiddleware, current_context
from unlearn_serve.server.auth import caller, check_api_key, require_admin
from unlearn_serve.server.config import ServerConfig
from unlearn_serve.server.engine.async_engine import AsyncEngine
from unlearn_serve.server.engine.engine import Engine, UnknownArtifactError
from unlearn_serve.server.engine.model_runner import AssistantKVBudgetError
from unlearn_serve.server.errors import (
    APIError,
    bad_request,
    install_error_handlers,
    not_found,
    unauthorized,
    unavailable,
)
from unlearn_serve.server.metrics import Metrics
from unlearn_serve.server.middleware import LimitsMiddleware
from unlearn_serve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    LoadArtifactRequest,
    ModelCard,
    ModelList,
    UnloadArtifactRequest,
)
from unlearn_serve.server.serving import OpenAIServing

from unlearn_serve.artifact import ArtifactError, load_manifest

logger = logging.getLogger("unlearn_serve.server")


class ServerState:
    """What the routes need; `serving` is None until the model is loaded."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.policy = config.access_policy()  # swapped whole on a key-file reload
        self.audit: AuditLog | None = None  # opened by the app's lifespan
        self.async_engine: AsyncEngine | None = None
        self.serving: OpenAIServing | None = None
        self.metrics: Metrics | None = None
        self.load_error: str | None = None
        self.draining = False
        # maintained by server.middleware.LimitsMiddleware
        self.active_requests = 0  # /v1 requests being handled (a drain waits for 0)
        self.generating = 0  # completions/chat requests admitted

    def admission_capacity(self) -> int | None:
        """Generation requests admitted at once: a full batch plus `max_queue` waiting (None: unbounded)."""
        if self.config.max_queue is None or self.serving is None:
            return None
        return self.serving.engine.config.max_num_seqs + self.config.max_queue

    @property
    def ready(self) -> bool:
        return self.serving is not None and not self.draining and self.engine_error is None

    @property
    def engine_error(self) -> str | None:
        """Why the engine loop stopped for good (a fatal device error), or None while it runs."""
        return self.async_engine.fatal_error if self.async_engine is not None else None

    def attach(self, engine: Engine) -> None:
        async_engine = AsyncEngine(engine)
        # a key_name label only where keys are configured (values come from the key file: bounded)
        self.metrics = Metrics(engine.num_running, engine.num_waiting, key_names=not self.policy.open)
        name = self.config.served_model_name
        metrics = self.metrics
        serving = OpenAIServing(
            async_engine, name, metrics, self.config.max_queue, self.config.chat_template_timeout_s
        )

        def finished(request, out):
            artifact = request.backend.name if request.backend is not None else "none"
            ctx = serving.tracked.pop(request.request_id, None)  # the HTTP request it belongs to
            if ctx is not None:
                ctx.prompt_tokens += len(request.prompt_token_ids)
                ctx.completion_tokens += request.num_generated_tokens
            key_name = (ctx.key_name if ctx is not None else None) or "none"
            metrics.observe_finished(
                name, artifact, request, [s.finish_reason for s in request.sequences], key_name=key_name
            )

        async_engine.on_request_finished = finished
        async_engine.start()
        self.async_engine = async_engine
        self.serving = serving


def _serving(request: Request) -> OpenAIServing:
    state: ServerState = request.app.state.server
    if state.draining:
        raise unavailable("server is shutting down", retry_after=5)
    if state.engine_error is not None:
        raise unavailable("the engine stopped after a fatal error; the server must be restarted")
    if state.serving is None:
        if state.load_error:  # the details (paths, ...) are in the server log, not for clients
            raise unavailable("model failed to load; see the server log")
        raise unavailable("model is loading; retry shortly", retry_after=5)
    return state.serving


def _artifact_path(state: ServerState, raw: str) -> Path:
    root = Path(state.config.artifact_root or ".").resolve()
    if "\x00" in raw:
        raise bad_request("artifact path must not contain NUL bytes", "path")
    candidate = Path(raw)
    if ".." in candidate.parts:
        raise bad_request("artifact path must not contain '..'", "path")
    try:
        # resolve() follows symlinks, so a link inside the root that points outside it is refused too
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
        path.exists()  # surfaces OS-level refusals (name too long, permissions) as a 400 here
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise bad_request(f"invalid artifact path: {reason}", "path") from None
    if path != root and root not in path.parents:
        raise bad_request("artifact path must be inside the server's artifact root", "path")
    return path


def _scrub(message: str, path: Path, root: Path) -> str:
    """An artifact error for a client: the path as relative to the artifact root, never the absolute one."""
    relative = path.relative_to(root).as_posix() if path != root else "."
    return message.replace(str(path), relative).replace(str(root), "<artifact-root>")


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @router.get("/models")
    async def list_models(request: Request) -> ModelList:
        # only the names this key may use; `root` is the served name (no filesystem path is ever shown)
        serving = _serving(request)
        key = caller(request)
        if key is None:  # fail closed: only if the auth dependency did not run
            raise unauthorized()
        engine = serving.engine
        base = serving.served_model_name
        cards = []
        if key.allows(base):
            cards.append(ModelCard(id=base, root=base, max_model_len=engine.max_model_len))
        for name, assistant in engine.assistants.assistants.items():
            if not assistant.unloading and key.allows(name):
                cards.append(
                    ModelCard(
                        id=name, root=name, parent=base, max_model_len=engine.max_model_len,
                        unlearning={"method": "uld", "alpha": assistant.alpha, "filter": assistant.filter,
                                    "assistant_layers": assistant.num_layers},
                    )
                )
        if engine.patches is not None:
            for name in engine.patches.names():
                if key.allows(name):
                    card = {k: v for k, v in engine.patches.describe(name).items() if k != "path"}
                    cards.append(
                        ModelCard(id=name, root=name, parent=base, max_model_len=engine.max_model_len,
                                  unlearning={"method": "uoe", **card})
                    )
        return ModelList(data=cards)

    # response models in the OpenAPI schema (it documents, e.g., that logprobs are finite and floored)
    @router.post("/completions", responses={200: {"model": CompletionResponse}})
    async def completions(body: CompletionRequest, request: Request):
        return await _serving(request).completions(body, request)

    @router.post("/chat/completions", responses={200: {"model": ChatCompletionResponse}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _serving(request).chat(body, request)

    @router.post("/unlearning/load", dependencies=[Depends(require_admin)])
    async def load_artifact(body: LoadArtifactRequest, request: Request):
        serving = _serving(request)
        state: ServerState = request.app.state.server
        ctx = current_context()
        if ctx is not None:
            ctx.artifact = body.name
        path = _artifact_path(state, body.path)
        engine = serving.engine
        if body.name == serving.served_model_name:
            raise bad_request(f"{body.name!r} is the served base model's name; choose another artifact name", "name")
        if body.name in engine.artifact_names():
            raise bad_request(f"an artifact named {body.name!r} is already loaded", "name")
        try:
            manifest = load_manifest(path)
            if body.method is not None and body.method != manifest.method:
                raise ArtifactError(f"{path} is a {manifest.method!r} artifact, not {body.method!r}")
            loader = engine.load_uld if manifest.method == "uld" else engine.load_uoe
            await asyncio.to_thread(loader, body.name, path)
        except AssistantKVBudgetError as exc:  # valid artifact, but the engine has no KV room reserved for it
            raise APIError(409, str(exc), "path", "assistant_kv_budget") from None
        except ArtifactError as exc:
            root = Path(state.config.artifact_root or ".").resolve()
            raise bad_request(_scrub(str(exc), path, root), "path", "invalid_artifact") from None
        return {"status": "loaded", "name": body.name, "method": manifest.method}

    @router.post("/unlearning/unload", dependencies=[Depends(require_admin)])
    async def unload_artifact(body: UnloadArtifactRequest, request: Request):
        serving = _serving(request)
        ctx = current_context()
        if ctx is not None and body.name in serving.engine.artifact_names():
            ctx.artifact = body.name
        try:
            done = await asyncio.to_thread(serving.engine.unload, body.name)
        except UnknownArtifactError as exc:
            raise not_found(str(exc), "name") from None
        # In-flight requests using it finish first; wait for that.
        await asyncio.to_thread(done.wait, request.app.state.server.config.drain_timeout_s)
        return {"status": "unloaded" if done.is_set() else "unloading", "name": body.name}

    return router


def build_app(
    config: ServerConfig,
    engine: Engine | None = None,
    engine_factory: Callable[[], Engine] | None = None,
) -> FastAPI:
    """An app serving `engine`, or one that loads it with `engine_factory` in the background."""
    state = ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.audit is not None:
            state.audit = AuditLog(config.audit)
        if engine is not None:
            state.attach(engine)
        elif engine_factory is not None:

            def load():
                try:
                    state.attach(engine_factory())
                except Exception as exc:
                    logger.exception("model load failed")
                    # /ready is unauthenticated: only the error's kind, never its message (paths, hub ids)
                    state.load_error = f"{type(exc).__name__} (details in the server log)"

            threading.Thread(target=load, name="unlearn-load", daemon=True).start()
        yield
        state.draining = True
        if state.async_engine is not None:
            state.async_engine.stop()
        if state.audit is not None:
            state.audit.close()

    app = FastAPI(title="unlearn-serve", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.state.config = config
    install_error_handlers(app)

    # body cap, back-pressure, in-flight accounting for draining, HTTP metrics
    app.add_middleware(LimitsMiddleware, state=state)
    # outermost: audits the edge's own refusals (body too large, at capacity) too
    app.add_middleware(AuditMiddleware, state=state)

    @app.get("/health")
    async def health():
        # after a fatal engine error the process cannot recover: fail liveness so it gets restarted
        if state.engine_error is not None:
            return JSONResponse(status_code=503, content={"status": "engine failed", "error": state.engine_error})
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.ready:
            return {"status": "ready", "model": config.served_model_name}
        if state.engine_error is not None:
            return JSONResponse(status_code=503, content={"status": "engine failed", "error": state.engine_error})
        reason = "draining" if state.draining else ("load failed" if state.load_error else "loading")
        return JSONResponse(status_code=503, content={"status": reason, "error": state.load_error})

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response(b"", media_type="text/plain; version=0.0.4")
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(build_router())
    return app
