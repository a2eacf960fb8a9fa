"""What device we run on and how much memory it has.

Discrete GPUs report framebuffer memory through NVML. On unified-memory machines (DGX Spark's GB10
shares 128 GB with the CPU) NVML may report no framebuffer figures; there the system's available
memory is what the GPU can get, and offloading to the CPU frees nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .cpu_math import CpuMath, measure_cpu_math

GiB = 1024**3


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "cpu" or "cuda:N"
    name: str
    capability: tuple[int, int] | None  # None on a CPU
    total_bytes: int
    free_bytes: int
    unified: bool  # GPU and CPU share one memory: parking evicted weights in RAM frees nothing
    cpu_math: CpuMath | None = None  # on a CPU device: which 16-bit types it computes fast (measured)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def capability_text(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}" if self.capability else "n/a (CPU)"

    def describe(self) -> str:
        kind = "system RAM" if not self.is_cuda else ("unified memory shared with the CPU" if self.unified else "GPU memory")
        return (f"{self.name} (compute capability {self.capability_text}), "
                f"{self.free_bytes / GiB:.1f} of {self.total_bytes / GiB:.1f} GiB free ({kind})")


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of system RAM, from /proc/meminfo."""
    text = Path("/proc/meminfo").read_text()
    field = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024  # noqa: E731
    return field("MemTotal"), field("MemAvailable")


def resolve_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return "cuda:0"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"Device {requested} was asked for, but PyTorch sees no CUDA GPU; use --device cpu.")
    return requested


def _nvml_memory(index: int) -> tuple[int, int] | None:
    """(total, free) framebuffer bytes, or None where NVML has no figures (unified memory) or is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            return int(info.total), int(info.free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVMLError_NotSupported on GB10, no driver library in a CPU container
        return None


def probe_device(device: str) -> DeviceInfo:
    if not device.startswith("cuda"):
        total, available = system_memory()
        return DeviceInfo("cpu", "CPU", None, total, available, unified=True, cpu_math=measure_cpu_math())
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    integrated = bool(getattr(props, "is_integrated", False))
    nvml = None if integrated else _nvml_memory(index)
    if nvml is None or nvml[0] == 0:
        total, available = system_memory()
        return DeviceInfo(device, props.name, (props.major, props.minor), total, available, unified=True)
    return DeviceInfo(device, props.name, (props.major, props.minor), nvml[0], nvml[1], unified=False)


def parse_memory(text: str, total_bytes: int) -> int:
    """'40GB', '40GiB', '512MB' or a fraction '0.6' of total memory -> bytes."""
    raw = text.strip().upper().replace(" ", "")
    units = {"TIB": 1024**4, "TB": 1000**4, "GIB": GiB, "GB": 1000**3, "MIB": 1024**2, "MB": 1000**2, "B": 1}
    for unit, size in units.items():
        if raw.endswith(unit):
            try:
                return int(float(raw[: -len(unit)]) * size)
            except ValueError:
                break
    else:
        try:
            fraction = float(raw)
        except ValueError:
            fraction = -1.0
        if 0 < fraction <= 1:
            return int(total_bytes * fraction)
    raise ValueError(f"Cannot read memory budget {text!r}; write e.g. 40GB, 512MB or a fraction such as 0.6.")
