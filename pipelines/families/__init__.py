"""One module per model family: a frozen `ModelFamily` describing it, and its generate loop.

Everything outside this package asks `family_of(spec)` and never which family a model is.
"""
from __future__ import annotations

from ..registry import Family, ModelSpec
from .family import ModelFamily
from .flux import FLUX
from .kontext import KONTEXT
from .sdxl import SDXL

FAMILIES: dict[Family, ModelFamily] = {f.kind: f for f in (FLUX, SDXL, KONTEXT)}


def family_of(spec: ModelSpec) -> ModelFamily:
    return FAMILIES[spec.family]
