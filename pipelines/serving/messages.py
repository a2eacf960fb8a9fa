"""What travels between the app and its replicas: plain picklable dataclasses (no Ray import here).

Images cross as uint8 arrays (Ray ships numpy arrays without copying them through pickle) and become
PIL images again on the caller's side, pixel for pixel. Errors cross as the exception objects the
PipelineManager raised, so the caller sees the same type and message as in single-process mode.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ..manager import InternalError, ManagerStatus
from ..request import GenerationResult
from ..run_context import Progress


@dataclass(frozen=True)
class ReplicaEvent:
    """One item of a replica's answer stream: progress while the job runs, then its result or its error."""

    replica: str  # Serve's replica id, so the caller knows where its job runs
    progress: Progress | None = None
    result: GenerationResult | None = None  # images as uint8 arrays (`result_to_wire`)
    error: BaseException | None = None


@dataclass(frozen=True)
class ReplicaStatus:
    """What one replica reports about itself about once a second (the System tab's replica rows)."""

    replica: str
    node: str  # the machine's IP address
    pid: int
    manager: ManagerStatus  # its PipelineManager's own status: device, resident models, queue, events
    memory_used_bytes: int  # device memory in use now (GPU memory, or RAM on a CPU/unified machine)
    memory_total_bytes: int
    reported_at: float  # time.time() on the replica

    @property
    def affinity_tags(self) -> frozenset[str]:
        return resident_tags(self.manager)


def affinity_tag(model_id: str, precision: str) -> str:
    """The routing key of a job: its model and precision (the denoiser's form, which costs the load)."""
    return f"{model_id}@{precision}"


def resident_tags(status: ManagerStatus) -> frozenset[str]:
    """Affinity tags of what a replica holds on its device. The denoiser's variant is its precision; other
    components' variants are dtype names, which never equal a precision, so they add harmless tags."""
    return frozenset(affinity_tag(r.key.model, r.key.variant) for r in status.resident if r.nbytes and not r.parked)


def result_to_wire(result: GenerationResult) -> GenerationResult:
    return replace(result, images=tuple(np.asarray(image) for image in result.images))


def result_from_wire(result: GenerationResult) -> GenerationResult:
    return replace(result, images=tuple(Image.fromarray(array) for array in result.images))


def portable_error(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling unchanged in type and message, else an InternalError with its message."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:  # an exception class whose constructor needs more than its message
        pass
    return InternalError(f"Generation failed unexpectedly ({type(exc).__name__}: {exc}). "
                         "The server is still running; the replica's log has the details.")
