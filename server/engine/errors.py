"""Errors the engine raises for requests it cannot run (the server maps them to HTTP 400/404)."""

from __future__ import annotations


class EngineInputError(ValueError):
    """A request the engine cannot run as given (prompt too long, bad parameters)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownArtifactError(LookupError):
    """A request named an unlearning artifact that is not loaded."""
