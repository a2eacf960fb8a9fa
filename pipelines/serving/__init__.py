"""Serving on a Ray cluster: one PipelineManager per GPU as a Ray Serve deployment (see README,
"Several GPUs or machines (Ray Serve)"). Ray is optional: nothing here is imported unless `--ray` or
`python -m pipelines serve` asks for it, and `require_ray()` says how to install it when it is missing.
"""
from __future__ import annotations

INSTALL_HINT = "Ray Serve is not installed: run `pip install -r requirements-ray.txt` (or pip install \"ray[serve]\")."


class ServingError(RuntimeError):
    """Serving on Ray could not start (Ray missing, cluster unreachable); the message says what to do."""


class RayMissingError(ServingError):
    """`--ray` was asked for but Ray Serve cannot be imported here."""


def require_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise RayMissingError(INSTALL_HINT) from None
