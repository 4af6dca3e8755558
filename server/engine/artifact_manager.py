"""The artifact manager: load, pin and unload unlearning artifacts, for every backend.

A request resolves its selection and pins the artifact in one locked step (so an unload cannot slip
in between); it unpins when it finishes. `unload` stops new requests at once; the artifact is
removed, between steps, once no request pins it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from unlearn_serve.server.engine.errors import UnknownArtifactError
from unlearn_serve.server.engine.sequence import Request, Selection
from unlearn_serve.server.unlearning.base import Choice, UnlearningBackend

from unlearn_serve.artifact import ArtifactError


class ArtifactManager:
    def __init__(
        self,
        backends: list[UnlearningBackend],
        model_name: str,
        call_soon: Callable[[Callable[[], Any]], Future],
        on_engine_thread: Callable[[], bool],
        wakeup: threading.Event,
    ):
        self.backends = backends
        self.model_name = model_name
        self._call_soon = call_soon
        self._on_engine_thread = on_engine_thread
        self._wakeup = wakeup
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self.pending_unloads: list[tuple[str, threading.Event]] = []

    def backend(self, kind: str) -> UnlearningBackend:
        return next(b for b in self.backends if b.kind == kind)

    def _owner(self, name: str) -> UnlearningBackend | None:
        return next((b for b in self.backends if name in b.names()), None)

    def names(self) -> list[str]:
        """Artifacts new requests may select (not those being unloaded)."""
        return [n for b in self.backends for n in b.names() if not b.is_unloading(n)]

    def resolve(self, selection: Selection | None) -> Choice | None:
        if selection is None:
            return None
        for backend in self.backends:
            choice = backend.resolve(selection.name, selection.options or {})
            if choice is not None:
                return choice
        raise UnknownArtifactError(f"The model `{selection.name}` does not exist.")

    def pin(self, request: Request) -> None:
        """Resolve the request's selection and pin its artifact (one locked step with `unload`)."""
        with self._lock:
            request.backend = self.resolve(request.selection)
            if request.backend is not None:
                self._pins[request.backend.name] = self._pins.get(request.backend.name, 0) + 1
                request.pinned = True

    def unpin(self, request: Request) -> None:
        if not request.pinned:
            return
        request.pinned = False
        with self._lock:
            name = request.backend.name
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]

    def load(self, kind: str, name: str, path) -> Any:
        if name in self.names() or name == self.model_name:
            raise ArtifactError(f"an artifact named {name!r} is already loaded")
        backend = self.backend(kind)
        prepared = backend.read(name, path)  # validation and I/O off the engine thread
        return self._call_soon(lambda: backend.install(prepared)).result()

    def unload(self, name: str) -> threading.Event:
        """Stop accepting requests for `name`; it is removed once every request that pinned it has finished."""
        done = threading.Event()
        with self._lock:
            backend = self._owner(name)
            if backend is None:
                raise UnknownArtifactError(f"no artifact named {name!r} is loaded")
            backend.mark_unloading(name)  # refuse new requests for it from now on
            self.pending_unloads.append((name, done))
        if self._on_engine_thread():
            self.finish_unloads()
        else:
            self._wakeup.set()  # the engine thread removes it between steps
        return done

    def finish_unloads(self) -> None:
        """Remove artifacts marked for unloading that no request pins any more (engine thread)."""
        with self._lock:
            ready = [(n, d) for n, d in self.pending_unloads if not self._pins.get(n)]
            self.pending_unloads = [(n, d) for n, d in self.pending_unloads if self._pins.get(n)]
        for name, done in ready:
            backend = self._owner(name)
            if backend is not None:
                backend.remove(name)
            done.set()
