"""unlearn-serve: inference-time unlearning (ULD assistants, UOE expert patches) behind an OpenAI-compatible server.

Layers (imports point down): core (`artifact`, `errors`, `families`, `assistant`, `loading`, ...) <-
`unlearn_serve.training`, `unlearn_serve.server` <- `unlearn_serve.evaluation` <- `unlearn_serve.cli`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("unlearn-serve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
