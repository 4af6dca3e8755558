"""The library's exceptions. Every user-facing error derives from `UnlearnServeError`.

Library code raises these; only the CLI (`unlearn_serve.cli`) turns them into a one-line message and
exit code 2, and only the server's error module turns them into HTTP error objects.
"""

from __future__ import annotations


class UnlearnServeError(Exception):
    """Base class: an error the user can fix (bad input, missing file, mismatched model)."""


class ArtifactError(UnlearnServeError, ValueError):
    """An unlearning artifact is missing, malformed, or made for another base model."""


class DataError(UnlearnServeError, ValueError):
    """A forget/retain/eval data file cannot be used (names file and line where known)."""


class ModelLoadError(UnlearnServeError):
    """A model or tokenizer cannot be loaded (bad path, missing GGUF, no CUDA, ...)."""


class TrainingError(UnlearnServeError):
    """A training run cannot start or finish (bad settings, nothing to train on, ...)."""


class ConfigError(UnlearnServeError, ValueError):
    """A setting (flag, config file) is invalid."""
