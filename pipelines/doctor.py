"""`python -m pipelines doctor`: what works on this machine, checked by running it, in about two minutes.

First the facts (GPU, driver, CUDA, torch, TensorRT flavour, ModelOpt, torchao, what this CPU computes
fast), then one row per backend and precision: the embedded demo-flux model (a real FLUX.1-architecture
pipeline, 19 MB, shipped in models/) renders one prompt through the same PipelineManager the app uses,
and its image is compared with the 16-bit PyTorch image (relative error of the pixels). A TensorRT row
builds its engines into a scratch cache and executes them; where engines can be built but not run (a
machine without a GPU, with TensorRT-RTX), the row builds the denoiser engine for a DGX Spark and says
that it did not execute it. The report is printed as a table and written as JSON for bug reports.
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .backends import tensorrt_status
from .backends.contract import TorchOptions
from .cpu_math import measure_cpu_math
from .errors import user_message
from .gpu import probe_device, resolve_device
from .precision import Backend, Precision, precision_support

DEMO_MODEL = "demo-flux"
PROMPT = "a small red circle at the top left on a blue background"
SEED = 7
STEPS = 8  # enough for a recognisable demo image; every row uses the same
BUDGET_SECONDS = 120.0
SPARK_TARGET = (12, 1)  # what a build-only row builds for: the DGX Spark's GB10
# Largest relative pixel error against the 16-bit PyTorch image that still passes. Measured on demo-flux
# (BENCHMARKS.md): FP8 44.5 dB PSNR (~0.01 relative), FP4 weights 32.6 dB (~0.04); limits leave 2-3x room.
MAX_REL_ERROR = {Precision.BF16: 0.05, Precision.FP16: 0.05, Precision.FP8: 0.05, Precision.FP4: 0.12}

VERIFIED, FAILED, NOT_APPLICABLE, NOT_RUN = "verified", "failed", "not applicable", "not run"


@dataclass(frozen=True)
class Check:
    backend: str  # "torch", "torch+compile", "tensorrt"
    precision: str
    status: str  # verified | failed | not applicable | not run
    detail: str  # what ran, or why not
    rel_error: float | None = None  # against the 16-bit PyTorch image
    seconds: float = 0.0


@dataclass(frozen=True)
class DoctorReport:
    facts: dict[str, str]
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not any(c.status == FAILED for c in self.checks)

    def table(self) -> str:
        width = max(len(k) for k in self.facts)
        lines = [f"{k.ljust(width)}  {v}" for k, v in self.facts.items()]
        lines += ["", f"{'backend':<14} {'precision':<9} {'result':<14} {'rel. error':>10} {'time':>7}  detail"]
        for c in self.checks:
            err = "-" if c.rel_error is None else f"{c.rel_error:.4f}"
            lines.append(f"{c.backend:<14} {c.precision:<9} {c.status:<14} {err:>10} {c.seconds:>6.1f}s  {c.detail}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"facts": self.facts, "checks": [asdict(c) for c in self.checks], "ok": self.ok}, indent=1)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return str(pynvml.nvmlSystemGetDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver library (a CPU machine or container)
        return "not found"


def machine_facts(device: str) -> dict[str, str]:
    info = probe_device(device)
    trt = tensorrt_status(info.capability)
    facts = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "CPU": measure_cpu_math().describe(),
        "device": info.describe(),
        "NVIDIA driver": _driver(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "TensorRT": trt.reason,
    }
    for package in ("nvidia-modelopt", "torchao", "onnxscript", "diffusers"):
        facts[package] = _version(package)
    return facts


def _rel_error(image, reference) -> float:
    a = np.asarray(image, dtype=np.float64) / 255.0
    b = np.asarray(reference, dtype=np.float64) / 255.0
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


class _Runner:
    """Renders the check prompt through a manager for the current backend option set, replaced when that changes:
    one manager at a time, since two live threads that ran torch ops slow both on a CPU (pipelines/bench.py)."""

    def __init__(self, device: str, cache_dir: Path, compile_torch: bool):
        from .manager import ManagerConfig

        self.base = ManagerConfig(device=device, engine_cache_dir=cache_dir, max_queue=1,
                                  torch=TorchOptions(compile=compile_torch))
        self.key: tuple[str, bool] | None = None
        self.manager = None

    def render(self, backend: Backend, precision: Precision, compile_torch: bool | None = None):
        from .manager import PipelineManager
        from .request import GenerationRequest

        compiled = self.base.torch.compile if compile_torch is None else compile_torch
        if (backend.value, compiled) != self.key:
            self.close()
            self.manager = PipelineManager(replace(self.base, backend=backend.value,
                                                   torch=replace(self.base.torch, compile=compiled)))
            self.key = (backend.value, compiled)
        request = GenerationRequest(PROMPT, DEMO_MODEL, precision, seed=SEED, steps=STEPS, backend=backend.value)
        return self.manager.generate(request)

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
        self.manager, self.key = None, None


def run_doctor(device: str = "auto", budget_seconds: float = BUDGET_SECONDS,
               on_check: Callable[[Check], None] | None = None, cache_dir: Path | None = None) -> DoctorReport:
    """Every check this machine allows, in order, within `budget_seconds` (rows left over say "not run")."""
    started = time.monotonic()
    device = resolve_device(device)
    facts = machine_facts(device)
    capability = probe_device(device).capability
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        if on_check is not None:
            on_check(check)

    with tempfile.TemporaryDirectory(prefix="prism-doctor-") as scratch:
        runner = _Runner(device, Path(cache_dir or scratch), compile_torch=False)
        try:
            reference = _reference(runner, capability, add)
            for backend, precision, compiled in _plan(capability):
                label = _label(backend, compiled)
                reason = _not_applicable(backend, precision, capability)
                if reason:
                    add(Check(label, precision.value, NOT_APPLICABLE, reason))
                elif time.monotonic() - started > budget_seconds:
                    add(Check(label, precision.value, NOT_RUN, f"the {budget_seconds:.0f} s budget was spent on the rows above"))
                elif backend is Backend.TENSORRT and capability is None:
                    add(_build_only(runner, precision))
                else:
                    add(_check(runner, backend, precision, compiled, capability, reference))
        finally:
            runner.close()
    return DoctorReport(facts, tuple(checks))


def _label(backend: Backend, compiled: bool) -> str:
    return "torch+compile" if compiled else backend.value


def reference_precision(capability: tuple[int, int] | None) -> Precision:
    return Precision.BF16 if precision_support(Precision.BF16, capability, Backend.TORCH).runnable else Precision.FP16


def _reference(runner: _Runner, capability, add) -> tuple[Precision, object | None]:
    precision = reference_precision(capability)
    started = time.monotonic()
    try:
        result = runner.render(Backend.TORCH, precision)
    except Exception as exc:
        add(Check("torch", precision.value, FAILED, user_message(exc), seconds=time.monotonic() - started))
        return precision, None
    add(Check("torch", precision.value, VERIFIED, f"reference image; ran as {result.runs_as} on {result.backend}",
              seconds=time.monotonic() - started))
    return precision, result.images[0]


def _plan(capability) -> list[tuple[Backend, Precision, bool]]:
    """(backend, precision, compiled) rows after the reference: every precision on each backend, and on a GPU
    the reference precision compiled."""
    rows = [(Backend.TORCH, p, False) for p in Precision if p is not reference_precision(capability)]
    if capability is not None:
        rows.append((Backend.TORCH, reference_precision(capability), True))
    rows += [(Backend.TENSORRT, p, False) for p in Precision]
    return rows


def _not_applicable(backend: Backend, precision: Precision, capability) -> str | None:
    """Why a row cannot run on this machine at all, or None. Without a GPU, TensorRT-RTX still builds (one
    fp16 row checks that); every other TensorRT row needs a GPU that runs engines."""
    if backend is Backend.TENSORRT:
        status = tensorrt_status(capability)
        build_only = status.flavour == "tensorrt-rtx" and capability is None and precision is Precision.FP16
        if not status.can_run and not build_only:
            return status.reason
        if build_only:
            return None
    support = precision_support(precision, capability, backend)
    return None if support.runnable else support.reason


def _check(runner: _Runner, backend: Backend, precision: Precision, compiled: bool, capability,
           reference: tuple[Precision, object | None]) -> Check:
    label = _label(backend, compiled)
    ref_precision, ref_image = reference
    if ref_image is None:
        return Check(label, precision.value, NOT_RUN, f"the {ref_precision.value} PyTorch reference failed")
    started = time.monotonic()
    try:
        result = runner.render(backend, precision, compile_torch=compiled)
    except Exception as exc:
        return Check(label, precision.value, FAILED, user_message(exc), seconds=time.monotonic() - started)
    seconds = time.monotonic() - started
    error = _rel_error(result.images[0], ref_image)
    ran = f"ran as {result.runs_as} on {result.backend}"
    if backend is Backend.TENSORRT and not result.backend.startswith("TensorRT"):
        return Check(label, precision.value, FAILED, f"TensorRT did not run the job: {'; '.join(result.warnings)}",
                     error, seconds)
    limit = MAX_REL_ERROR[precision]
    if error > limit:
        return Check(label, precision.value, FAILED, f"{ran}; error above the {limit} limit", error, seconds)
    return Check(label, precision.value, VERIFIED, ran, error, seconds)


def _build_only(runner: _Runner, precision: Precision) -> Check:
    """No GPU, but TensorRT-RTX: build the demo denoiser engine for a DGX Spark (not executed here)."""
    from .backends.tensorrt.artifacts import ArtifactBuilder, EngineRequest
    from .backends.tensorrt.export import ShapeRanges
    from .engine_cache import EngineCache
    from .registry import resolve_spec

    spec = resolve_spec(DEMO_MODEL)
    started = time.monotonic()
    try:
        builder = ArtifactBuilder(EngineCache(runner.base.engine_cache_dir), "cpu")
        ranges = ShapeRanges.for_spec(spec, spec.default_width, spec.default_height)
        built = builder.engine(EngineRequest(spec, spec.denoiser, precision, ranges, SPARK_TARGET))
    except Exception as exc:
        return Check("tensorrt", precision.value, FAILED, f"engine build for sm121: {user_message(exc)}",
                     seconds=time.monotonic() - started)
    size = built.report.engine_bytes / 2**20
    return Check("tensorrt", precision.value, VERIFIED,
                 f"built the {spec.denoiser} engine for sm121 ({size:.1f} MiB) with {builder.trt.describe()}; "
                 "not executed: no GPU here", seconds=time.monotonic() - started)


def write_report(report: DoctorReport, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.to_json())
    return path
