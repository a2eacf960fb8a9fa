"""Which 16-bit types this CPU computes fast, measured once per process.

CPUs differ by two orders of magnitude here. On a 2-core AMD EPYC with AVX2 only, torch's bf16 and fp16
matmuls ran at ~1 GFLOP/s against ~150 GFLOP/s in fp32 (convolutions ~200x slower), so the demo SDXL
took 12 s an image in bf16 and 0.58 s in fp32. A Xeon with AMX/avx512_bf16 runs bf16 as fast as fp32 or
faster. CPU flags alone do not say what torch's kernels will do (oneDNN's dispatch, ATen's vector ISA),
so we time the two operations the models spend their time in, a matmul and a 3x3 convolution, in fp32
and in each 16-bit type, and call a type fast when it is no slower than 1.5x fp32 on both.
(Reproduce the slow case on a fast CPU: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2.)
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SLOWDOWN_LIMIT = 1.5  # a 16-bit type slower than this multiple of fp32 is not worth its precision loss
_INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "asimd", "bf16",
                      "fphp", "sve")


@dataclass(frozen=True)
class CpuMath:
    """What this CPU computes fast. Tests build one directly instead of measuring."""

    name: str  # the CPU model, as /proc/cpuinfo names it
    flags: tuple[str, ...]  # the vector/matrix flags that matter for 16-bit math
    fast_bf16: bool
    fast_fp16: bool
    measured: str = ""  # the timings behind the verdict, for the System tab and `doctor`

    def fast(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            return self.fast_bf16
        if dtype == torch.float16:
            return self.fast_fp16
        return True

    def describe(self) -> str:
        fast = [n for n, ok in (("BF16", self.fast_bf16), ("FP16", self.fast_fp16)) if ok]
        verdict = f"fast {' and '.join(fast)}" if fast else "no fast 16-bit math (16-bit work computes in FP32)"
        return f"{self.name}: {verdict}" + (f" [{self.measured}]" if self.measured else "")


FAST_CPU = CpuMath("CPU", (), fast_bf16=True, fast_fp16=True)  # what a GPU-side policy assumes; tests use it


def _cpu_identity() -> tuple[str, tuple[str, ...]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU", ()
    name, flags = "CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and name == "CPU":
            name = value.strip() or name
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return name, tuple(f for f in _INTERESTING_FLAGS if f in flags)


def _best_seconds(fn, repeats: int, give_up_after: float = float("inf")) -> float:
    """The fastest of `repeats` calls (the minimum is what the kernel can do; the rest is other load).
    Stops early once one call alone takes `give_up_after` seconds: such a type is slow whatever the noise."""
    fn()  # first call: allocation, thread pool start and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if best >= give_up_after:
            break
    return best


def _timings(dtype: torch.dtype, reference: tuple[float, float] | None = None) -> tuple[float, float]:
    """(matmul, convolution) seconds for small shapes typical of the demo models."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(256, 256, generator=gen).to(dtype)
    b = torch.randn(256, 256, generator=gen).to(dtype)
    x = torch.randn(1, 32, 32, 32, generator=gen).to(dtype)
    w = torch.randn(32, 32, 3, 3, generator=gen).to(dtype)
    # fp32 takes ~0.2 ms a call here, so many repeats cost nothing and see through other load; a slow
    # 16-bit type takes 30-60 ms a call and is given up on after one call 10x over fp32.
    repeats = 20 if reference is None else 6
    limits = (float("inf"), float("inf")) if reference is None else tuple(10 * r for r in reference)
    with torch.inference_mode():
        return (_best_seconds(lambda: a @ b, repeats, limits[0]),
                _best_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats, limits[1]))


@functools.lru_cache(maxsize=1)
def measure_cpu_math() -> CpuMath:
    """Time fp32, bf16 and fp16 once (about 0.1-0.5 s) and keep the verdict for the process."""
    name, flags = _cpu_identity()
    # One thread: what is compared is the kernels' speed, and two threads on a loaded 2-core machine
    # spend their time waiting for each other (fp32 matmul 0.15 ms alone, 4-5 ms under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(name, flags)
    finally:
        torch.set_num_threads(threads)


def _measure(name: str, flags: tuple[str, ...]) -> CpuMath:
    mm32, conv32 = _timings(torch.float32)
    verdicts, notes = {}, [f"fp32 matmul {mm32 * 1e3:.2f} ms, conv {conv32 * 1e3:.2f} ms"]
    for dtype in (torch.bfloat16, torch.float16):
        try:
            mm, conv = _timings(dtype, (mm32, conv32))
        except RuntimeError:  # a CPU build without the 16-bit kernel at all
            verdicts[dtype], mm, conv = False, float("inf"), float("inf")
        else:
            verdicts[dtype] = mm <= SLOWDOWN_LIMIT * mm32 and conv <= SLOWDOWN_LIMIT * conv32
        label = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
        notes.append(f"{label} {mm / mm32:.1f}x / {conv / conv32:.1f}x")
    return CpuMath(name, flags, verdicts[torch.bfloat16], verdicts[torch.float16], "; ".join(notes))
