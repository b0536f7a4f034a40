"""mlxkv's small, flat exception hierarchy (mapped to HTTP statuses by server/errors.py)."""

from __future__ import annotations


class MlxkvError(Exception):
    """Base class of every error mlxkv raises on purpose."""


class InvalidRequestError(MlxkvError, ValueError):
    """A request that can never be served as given (HTTP 400).

    Args:
        message: what is wrong, in one sentence a user can act on.
        param: the offending request field, when there is one.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelNotFoundError(MlxkvError):
    """The requested model path, repo id or served name does not exist (HTTP 404)."""


class ModelLoadError(MlxkvError):
    """A model exists but cannot be loaded or converted (corrupt or unsupported file, offline hub)."""


class EngineOverloadedError(MlxkvError):
    """The engine's queue is full; retry later (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDeadError(MlxkvError):
    """The engine thread has died; every stream fails with this (HTTP 503)."""


class GenerationError(MlxkvError):
    """A request failed inside the engine; other requests are unaffected (HTTP 500, reason given)."""
