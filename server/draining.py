"""Graceful shutdown: a uvicorn server that drains before it stops listening.

On the first SIGTERM (or SIGINT) the app is marked draining: `/ready` answers 503 (load balancers and
Kubernetes take the pod out of rotation), new `/v1` requests get 503 + `Retry-After`, and requests already in
flight (streams included) run to completion. The server keeps its socket open meanwhile so those 503s reach
clients instead of connection errors. Once nothing is in flight, or after `drain_timeout` seconds, uvicorn's
normal shutdown runs (idle connections closed, the engine stopped) and the process exits 0.
A second signal stops at once.

uvicorn re-raises a captured signal after shutdown (so the process would die of SIGTERM, exit status 143);
a completed drain is a clean exit, so the first signal is not recorded for re-raising.
"""

from __future__ import annotations

import logging
import signal
import time

import uvicorn
from unlearn_serve.server.app import ServerState

logger = logging.getLogger("unlearn_serve.server")

# After the drain, what is left (only requests that outlived drain_timeout) gets this long before cancellation.
FINAL_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.draining_since: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.draining_since is None and not self.should_exit:
            self.draining_since = time.monotonic()
            self.state.draining = True
            logger.info(
                "%s: draining %d in-flight request(s) (up to %.0fs)",
                signal.Signals(sig).name, self.state.active_requests, self.drain_timeout,
            )
            return
        logger.warning("second signal: stopping now")
        self.should_exit = True
        self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.draining_since is not None and not self.should_exit:
            waited = time.monotonic() - self.draining_since
            if self.state.active_requests == 0:
                logger.info("drained in %.1fs; shutting down", waited)
                self.should_exit = True
            elif waited >= self.drain_timeout:
                logger.warning(
                    "drain timeout (%.0fs): %d request(s) still in flight are cut off",
                    self.drain_timeout, self.state.active_requests,
                )
                self.should_exit = True
        return await super().on_tick(counter)


def draining_server(app, host: str, port: int, log_level: str, drain_timeout: float) -> DrainingServer:
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=FINAL_GRACE_S
    )
    return DrainingServer(config, app.state.server, drain_timeout)
