"""Readiness for `GET /health`: the manager's worker is alive and the default model can run here.

Cheap enough to probe every few seconds: nothing is loaded and the Hub is not contacted; a model whose
weights are neither here nor downloadable (offline) counts as unable to run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.loading import is_available_locally

from .service import PrismService


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str  # what is wrong (or "ready"), in words an operator can act on
    model: str | None  # the default model's offered name

    def to_dict(self, service: PrismService) -> dict[str, Any]:
        status = service.status()
        return {"status": "ok" if self.ready else "unavailable", "reason": self.reason, "model": self.model,
                "device": service.manager.info.name, "queued": status.queued, "running": status.running is not None}


def readiness(service: PrismService) -> Readiness:
    if not service.manager.worker_alive:
        return Readiness(False, "The generation worker has stopped; restart Prism.", None)
    choice = service.default_model()
    if choice is None:
        return Readiness(False, "No model is offered; start Prism with --models naming one.", None)
    precision = service.default_precision()
    support = service.support(precision)
    if not support.runnable:
        return Readiness(False, f"{choice.name} cannot run at {precision.value} here: {support.reason}", choice.name)
    spec, manager = choice.spec, service.manager
    here = spec.local_dir is not None or manager.config.random_weights or is_available_locally(spec, service.hub)
    if not here and service.hub.is_offline:
        return Readiness(False, f"{choice.name} is not downloaded and offline mode is on; download it or offer "
                                "another model with --models.", choice.name)
    return Readiness(True, "ready" if here else f"ready; {choice.name} downloads on its first request", choice.name)
