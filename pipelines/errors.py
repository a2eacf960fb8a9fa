"""Turning exceptions into the one readable sentence the UI and CLI show (never a stack trace)."""
from __future__ import annotations


def user_message(exc: BaseException, fallback: bool = True) -> str | None:
    """The message for errors a user can act on; for anything else a generic line (or None if not `fallback`)."""
    from .loading import ModelAccessError
    from .manager import InternalError, QueueFullError
    from .registry import UnknownModelError
    from .request import RequestError
    from .residency import InsufficientMemoryError
    from .run_context import JobCancelled
    from .sampling import NumericsError
    from .serving import ServingError

    known = (RequestError, UnknownModelError, ModelAccessError, InsufficientMemoryError, NumericsError,
             QueueFullError, JobCancelled, InternalError, ServingError)
    if isinstance(exc, known):
        return str(exc)
    if not fallback:
        return None
    return f"Unexpected error ({type(exc).__name__}: {exc}). The app is still running; see its log for details."
