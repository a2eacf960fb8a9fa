"""What a running job carries besides its request: device, progress reporting, cancellation, timing."""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, TypeVar

import torch


T = TypeVar("T")


class JobCancelled(Exception):
    """The user cancelled the job; raised between steps."""


@dataclass(frozen=True)
class Progress:
    stage: str  # "queue" | "download" | "load" | "build" | "compile" | "text" | "denoise" | "vae"
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
    warnings: list[str] = field(default_factory=list)  # notes for the result, from anything the job ran
    # Denoising steps the host may queue before the GPU finished the one it reports (StepReports); 0 waits for
    # every step before queuing the next.
    steps_ahead: int = 1

    def report(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(stage, done, total, message))

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise JobCancelled("The job was cancelled.")

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    @contextlib.contextmanager
    def active(self):
        """Make this the job that engines called inside the block report to (see `current_context`)."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


# Engines are shared between jobs and called with tensors only; what they have to tell the job running
# them (a compile stage, a fallback) goes to the context the worker made current for that job.
_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("prism_run_context", default=None)


def current_context() -> RunContext | None:
    return _current.get()


class Parts(Protocol):
    """A job's view of its model's components; the manager loads them on first `get`."""

    def get(self, name: str) -> Any: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def done_with(self, *names: str) -> None: ...

    def remember(self, names: tuple[str, ...], what: Hashable, compute: Callable[[], T]) -> T:
        """`compute()`, which runs parts `names` on `what` (a prompt): kept between jobs for the same weights of
        those parts, so a repeat neither runs nor loads them."""
        ...


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


class StepReports:
    """Marks each denoising step on the clock and reports it done once the GPU has finished it, so the progress
    bar tells the truth. With `ctx.steps_ahead` 1 the host reports step i after it has queued step i+1: the GPU
    runs step i+1 while the host waits, where waiting on step i before queuing the next left the GPU idle while
    the host ran the scheduler, the progress report and the next step's first launches."""

    def __init__(self, ctx: RunContext, clock: Stopwatch, marks: list, progress: tuple[int, int]):
        self.ctx, self.clock, self.marks = ctx, clock, marks
        self.done, self.total = progress  # steps done before these, and the job's total
        self.first = len(marks)  # marks[first - 1] is where these steps start; marks[first - 1 + k] ends step k
        self.ahead = max(ctx.steps_ahead, 0)
        self.reported = 0

    def step_done(self) -> None:
        """Call after queuing a step: marks its end, and reports the steps the GPU must have finished by now."""
        self.marks.append(self.clock.mark())
        self._report_up_to(len(self.marks) - self.first - self.ahead)

    def all_done(self) -> None:
        """Call after the last step: waits for the steps still running, and reports them."""
        self._report_up_to(len(self.marks) - self.first)

    def _report_up_to(self, steps: int) -> None:
        while self.reported < steps:
            self.reported += 1
            self.clock.wait(self.marks[self.first - 1 + self.reported])
            self.ctx.report("denoise", self.done + self.reported, self.total)
