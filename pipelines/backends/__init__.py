"""Execution backends for heavy components, and the choice between them.

Only this package knows TensorRT or torch.compile details. Every backend keeps the contract in
`contract.py` (`ComponentBackend`): `load` returns an engine that takes the same keyword arguments as
the module in `pipelines.graphs` it stands for.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..precision import Backend, Precision, precision_support


@dataclass(frozen=True)
class TensorRTStatus:
    flavour: str | None  # "tensorrt" (full) | "tensorrt-rtx" | None
    version: str | None
    can_run: bool  # engines execute on this machine's GPU
    reason: str


def tensorrt_status(capability: tuple[int, int] | None) -> TensorRTStatus:
    """Which TensorRT is installed, and whether it can build and run here. Imports nothing heavy unless present."""
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt as trt

            version = trt.__version__
        except Exception as exc:  # a broken install (e.g. the PyPI download stub) must not stop the app
            return TensorRTStatus(None, None, False, f"TensorRT is installed but does not import ({exc}).")
        if capability is None:
            return TensorRTStatus("tensorrt", version, False, "TensorRT needs an NVIDIA GPU to build and run engines.")
        return TensorRTStatus("tensorrt", version, True, f"TensorRT {version} found.")
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        try:
            import tensorrt_rtx as trt

            version = trt.__version__
        except Exception as exc:
            return TensorRTStatus(None, None, False, f"TensorRT-RTX is installed but does not import ({exc}).")
        if capability is None:
            return TensorRTStatus("tensorrt-rtx", version, False,
                                  f"TensorRT-RTX {version} builds engines ahead of time here, but running them needs a GPU.")
        if capability == (9, 0) or capability < (7, 5):
            return TensorRTStatus("tensorrt-rtx", version, False,
                                  f"TensorRT-RTX {version} does not run on compute capability {capability[0]}.{capability[1]} "
                                  "(it targets RTX and Blackwell GPUs); engines can still be built for other GPUs.")
        return TensorRTStatus("tensorrt-rtx", version, True, f"TensorRT-RTX {version} found.")
    return TensorRTStatus(None, None, False,
                          "TensorRT is not installed (NVIDIA's PyTorch container ships it; pip offers tensorrt-rtx-cu13).")


@dataclass(frozen=True)
class BackendChoice:
    backend: Backend
    reason: str


def choose_backend(requested: str, capability: tuple[int, int] | None, precision: Precision) -> BackendChoice:
    """`auto` picks TensorRT when it is installed, runs on this GPU and runs this precision natively."""
    requested = (requested or "auto").lower()
    if requested not in ("auto", "torch", "tensorrt"):
        raise ValueError(f"Unknown backend {requested!r}; choose auto, torch or tensorrt.")
    if requested == "torch":
        return BackendChoice(Backend.TORCH, "PyTorch backend chosen.")
    status = tensorrt_status(capability)
    support = precision_support(precision, capability, Backend.TENSORRT)
    if requested == "tensorrt":
        if not status.can_run:
            raise ValueError(f"The TensorRT backend cannot run here: {status.reason} Use --backend torch or auto.")
        if not support.runnable:
            raise ValueError(f"TensorRT cannot run {Precision.parse(precision).value} here: {support.reason}")
        return BackendChoice(Backend.TENSORRT, status.reason)
    if not status.can_run:
        return BackendChoice(Backend.TORCH, f"PyTorch backend: {status.reason}")
    if support.level.value != "native":
        return BackendChoice(Backend.TORCH, f"PyTorch backend: {support.reason}")
    return BackendChoice(Backend.TENSORRT, status.reason)
