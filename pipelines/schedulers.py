"""Samplers a user may choose, by the names AUTOMATIC1111 uses (and writes into PNG metadata), each as a
diffusers scheduler class plus options applied to the model's own scheduler config.

Each family lists its samplers (ModelFamily.samplers): SDXL the usual set; Flux, a flow-matching model,
flow-match Euler and the sigma schedules diffusers offers for it. An empty name means the model's own
scheduler, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .registry import Family


@dataclass(frozen=True)
class Sampler:
    name: str  # as A1111 writes it in `parameters`: "DPM++ 2M Karras"
    class_name: str  # the diffusers scheduler class
    options: Mapping[str, Any] = field(default_factory=dict)  # overrides of the model's scheduler config


def family_samplers(family: Family) -> tuple[Sampler, ...]:
    """What each family offers lives in its module (pipelines/families/), which imports this one."""
    from .families import FAMILIES

    return FAMILIES[family].samplers


# Scheduler class -> the name A1111 users know, for a model's own scheduler (no sampler chosen).
CLASS_NAMES = {"FlowMatchEulerDiscreteScheduler": "Euler", "EulerDiscreteScheduler": "Euler",
               "EulerAncestralDiscreteScheduler": "Euler a", "DDIMScheduler": "DDIM",
               "UniPCMultistepScheduler": "UniPC", "DPMSolverMultistepScheduler": "DPM++ 2M"}


def sampler_names(family: Family) -> list[str]:
    return [s.name for s in family_samplers(family)]


def find_sampler(family: Family, name: str) -> Sampler:
    """The sampler called `name` for `family`; ValueError listing the choices otherwise."""
    for s in family_samplers(family):
        if s.name == name:
            return s
    raise ValueError(f"Unknown sampler {name!r} for {family.value.upper()}; choose one of: "
                     f"{', '.join(sampler_names(family))} (or leave it empty for the model's own).")


def make_scheduler(base: Any, family: Family, name: str) -> Any:
    """A fresh scheduler for one job (schedulers keep per-run state): the model's own `base` config, run by the
    chosen sampler's class and options, or `base`'s own class when `name` is empty."""
    if not name:
        return type(base).from_config(base.config)
    import diffusers

    sampler = find_sampler(family, name)
    return getattr(diffusers, sampler.class_name).from_config(base.config, **sampler.options)


def recorded_name(name: str, model_scheduler_class: str) -> str:
    """The `Sampler:` value for a PNG: the chosen sampler, else the model's own scheduler by its A1111 name."""
    return name or CLASS_NAMES.get(model_scheduler_class, model_scheduler_class or "Euler")
