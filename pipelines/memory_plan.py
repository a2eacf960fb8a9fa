"""Memory planning, as plain arithmetic over byte counts: what each stage of a job holds at once, whether
the job fits its budget, and which smaller precision would. The manager gathers the sizes (estimates, or
what is already loaded) and asks here; tests call these functions with numbers of their own.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .components import activation_bytes
from .device_policy import LIGHT_PARTS, DevicePolicy
from .families.family import REFINER_PREFIX
from .precision import Precision
from .registry import ModelSpec
from .request import GenerationRequest
from .residency import human_bytes

Stage = tuple[str, ...]
SMALLER_ORDER = (Precision.BF16, Precision.FP8, Precision.FP4)  # what a refused job may step down to


def working_bytes(spec: ModelSpec, req: GenerationRequest, policy: DevicePolicy, min_working_bytes: int) -> int:
    """Memory a job needs beyond the weights: at least `min_working_bytes`, more for large images."""
    vae_dtype = policy.component_dtype(spec, "vae", req.precision)
    element = torch.empty((), dtype=vae_dtype).element_size()
    return min_working_bytes + activation_bytes(spec, req.width, req.height, req.num_images, element)


def stage_needs(stages: tuple[Stage, ...], weights: Mapping[str, int], load_peaks: Mapping[str, int],
                working: int) -> list[tuple[Stage, int]]:
    """Per stage, the most memory it holds at once: its weights plus working memory, or a load's peak
    (the stage's other weights plus what loading one component holds at its height)."""
    out = []
    for stage in stages:
        total = sum(weights[n] for n in stage)
        peaks = [total - weights[n] + load_peaks[n] for n in stage if not _light(n)]
        out.append((stage, max([total + working, *peaks])))
    return out


def refusal(spec: ModelSpec, precision: Precision, needs: list[tuple[Stage, int]], working: int, budget: int,
            used: int) -> str | None:
    """None when the largest stage fits the budget; else the numbers (the caller adds a way out)."""
    stage, need = max(needs, key=lambda s: s[1])
    if need <= budget:
        return None
    free = max(budget - used, 0)
    return (f"{spec.id} at {precision.value} needs {human_bytes(need)} at once "
            f"({' + '.join(n for n in stage if not _light(n))} and {human_bytes(working)} of working memory); "
            f"the memory budget is {human_bytes(budget)} and {human_bytes(free)} of it is free now.")


def _light(name: str) -> bool:
    """A tokenizer or scheduler (the base's or its refiner's): no device memory."""
    return name.removeprefix(REFINER_PREFIX) in LIGHT_PARTS


def smaller_precision_hint(precision: Precision, budget: int, need_of: Callable[[Precision], int | None]) -> str:
    """The first smaller precision whose largest stage fits. `need_of` gives a precision's largest stage, or
    None where it cannot run here; it is asked only until one fits."""
    order = list(SMALLER_ORDER)
    smaller = order[order.index(precision) + 1:] if precision in order else order[1:]
    for candidate in smaller:
        need = need_of(candidate)
        if need is not None and need <= budget:
            return f"{candidate.value} would fit (needs {human_bytes(need)}): choose it, or a smaller image size."
    return "No smaller precision fits either: raise --memory-budget, free memory, or choose a smaller model or image."
