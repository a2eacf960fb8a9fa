"""Samplers a user may choose, by the names AUTOMATIC1111 uses (and writes into PNG metadata), each as a
diffusers scheduler class plus options applied to the model's own scheduler config.

SDXL gets the usual set; Flux, a flow-matching model, gets flow-match Euler and the sigma schedules diffusers
offers for it. An empty name means the model's own scheduler, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .registry import Family


@dataclass(frozen=True)
class Sampler:
    name: str  # as A1111 writes it in `parameters`: "DPM++ 2M Karras"
    family: Family
    class_name: str  # the diffusers scheduler class
    options: Mapping[str, Any] = field(default_factory=dict)  # overrides of the model's scheduler config


SAMPLERS = (
    Sampler("Euler", Family.SDXL, "EulerDiscreteScheduler"),
    Sampler("Euler a", Family.SDXL, "EulerAncestralDiscreteScheduler"),
    Sampler("DPM++ 2M", Family.SDXL, "DPMSolverMultistepScheduler",
            MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2})),
    Sampler("DPM++ 2M Karras", Family.SDXL, "DPMSolverMultistepScheduler",
            MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True})),
    # diffusers' own SDE solver: A1111's "DPM++ SDE" needs torchsde's Brownian tree; this one draws its noise
    # from the job's seeded generators, so a seed still gives the same picture.
    Sampler("DPM++ SDE", Family.SDXL, "DPMSolverMultistepScheduler",
            MappingProxyType({"algorithm_type": "sde-dpmsolver++", "solver_order": 2})),
    Sampler("DDIM", Family.SDXL, "DDIMScheduler"),
    Sampler("UniPC", Family.SDXL, "UniPCMultistepScheduler"),
    Sampler("Euler", Family.FLUX, "FlowMatchEulerDiscreteScheduler"),
    Sampler("Euler Karras", Family.FLUX, "FlowMatchEulerDiscreteScheduler",
            MappingProxyType({"use_karras_sigmas": True})),
    Sampler("Euler Exponential", Family.FLUX, "FlowMatchEulerDiscreteScheduler",
            MappingProxyType({"use_exponential_sigmas": True})),
)

# Scheduler class -> the name A1111 users know, for a model's own scheduler (no sampler chosen).
CLASS_NAMES = {"FlowMatchEulerDiscreteScheduler": "Euler", "EulerDiscreteScheduler": "Euler",
               "EulerAncestralDiscreteScheduler": "Euler a", "DDIMScheduler": "DDIM",
               "UniPCMultistepScheduler": "UniPC", "DPMSolverMultistepScheduler": "DPM++ 2M"}


def sampler_names(family: Family) -> list[str]:
    return [s.name for s in SAMPLERS if s.family is family]


def find_sampler(family: Family, name: str) -> Sampler:
    """The sampler called `name` for `family`; ValueError listing the choices otherwise."""
    for s in SAMPLERS:
        if s.family is family and s.name == name:
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
