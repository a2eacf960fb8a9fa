"""Turning exceptions into the one readable sentence the UI and CLI show (never a stack trace)."""
from __future__ import annotations

import importlib.util


class MissingPackageError(RuntimeError):
    """An optional package a feature needs is not installed; the message names it and the command that adds it."""


def require_packages(feature: str, packages: dict[str, str], install: str) -> None:
    """Raise MissingPackageError unless every module in `packages` ({import name: pip name}) is importable."""
    missing = [pip for module, pip in packages.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingPackageError(f"{feature} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                                  f"not installed. Install with: {install}")


def user_message(exc: BaseException, fallback: bool = True) -> str | None:
    """The message for errors a user can act on; for anything else a generic line (or None if not `fallback`)."""
    from .config import FlagError
    from .loading import ModelAccessError
    from .manager import InternalError, QueueFullError
    from .registry import UnknownModelError
    from .request import RequestError
    from .residency import InsufficientMemoryError
    from .run_context import JobCancelled
    from .sampling import NumericsError
    from .serving import ServingError

    known = (FlagError, MissingPackageError, RequestError, UnknownModelError, ModelAccessError, InsufficientMemoryError,
             NumericsError, QueueFullError, JobCancelled, InternalError, ServingError)
    if isinstance(exc, known):
        return str(exc)
    if not fallback:
        return None
    # Said by the CLI and the app alike, so it names neither.
    return f"Unexpected error ({type(exc).__name__}: {exc}); the log has the details."
