"""What a running job carries besides its request: device, progress reporting, cancellation, timing."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch


class JobCancelled(Exception):
    """The user cancelled the job; raised between steps."""


@dataclass(frozen=True)
class Progress:
    stage: str  # "queue" | "load" | "build" | "text" | "denoise" | "vae"
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


@dataclass
class RunContext:
    device: torch.device
    on_progress: Callable[[Progress], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def report(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(stage, done, total, message))

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise JobCancelled("The job was cancelled.")


class Parts(Protocol):
    """A job's view of its model's components; the manager loads them on first `get`."""

    def get(self, name: str) -> Any: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def done_with(self, *names: str) -> None: ...


class Stopwatch:
    """Marks on the device timeline: CUDA events on a GPU (no sync per mark), a monotonic clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wait(self, mark: Any) -> None:
        """Block until the work before `mark` is done (for truthful progress reports)."""
        if self.cuda:
            mark.synchronize()

    def ms(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return (end - start) * 1000.0
        end.synchronize()
        return float(start.elapsed_time(end))
