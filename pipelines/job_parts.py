"""One job's view of its model's components (the `Parts` a family loop reads): each `get` loads through
the manager's residency on first use, under the key the manager builds."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Hashable, TypeVar

import torch

from .components import ComponentKey, LoadedComponent, component_key
from .device_policy import LIGHT_PARTS
from .families import family_of
from .families.family import part_owner
from .loading import WeightSource
from .lora import NO_LORAS, LoraSet
from .precision import Backend, Precision
from .registry import ModelSpec, refiner_of
from .run_context import RunContext

if TYPE_CHECKING:
    from .manager import PipelineManager

T = TypeVar("T")


class JobParts:
    """One job's view of its model's components: loads through the residency on first `get`."""

    def __init__(self, manager: "PipelineManager", spec: ModelSpec, precision: Precision, backend: Backend,
                 source: WeightSource, ctx: RunContext, working_bytes: int, loras: LoraSet = NO_LORAS,
                 with_image: bool = False, with_refiner: bool = False):
        self.m, self.spec, self.precision, self.backend_kind = manager, spec, precision, backend
        self.source, self.ctx, self.working, self.loras = source, ctx, working_bytes, loras
        self.refiner = refiner_of(spec) if with_refiner else None  # its parts are named refiner_* (part_owner)
        self.stages = family_of(spec).stages(with_image, with_refiner)
        self.finished: set[ComponentKey] = set()
        self.load_ms = 0.0
        self.runs_as: str | None = None
        self._dtypes: dict[str, torch.dtype | None] = {}

    def _owner(self, name: str) -> tuple[ModelSpec, str, LoraSet]:
        """The model and component behind part `name`, and the LoRAs for it (a base model's LoRAs do not fit
        its refiner)."""
        spec, component = part_owner(self.spec, name, self.refiner)
        return spec, component, self.loras if spec is self.spec else NO_LORAS

    def _plain_key(self, name: str) -> tuple[ComponentKey, ModelSpec, str, LoraSet]:
        """Part `name`'s key without a LoRA form, with its model, component and LoRAs (`_owner`)."""
        spec, component, loras = self._owner(name)
        # Tokenizers and schedulers are the same object for every backend.
        backend = "any" if component in LIGHT_PARTS else self.backend_kind.value
        return component_key(spec, component, self.precision, backend, self.m.policy), spec, component, loras

    def key(self, name: str) -> ComponentKey:
        key, spec, name, loras = self._plain_key(name)
        if name in LIGHT_PARTS:
            return key
        with_loras = replace(key, lora=self._backend(name).lora_variant(spec, name, self.precision, loras))
        if with_loras.lora or key in self.m.residency.entries:
            return with_loras
        # No LoRA now, but a form loaded for LoRAs is here: it serves this job too (after unfusing), which beats
        # reading the checkpoint again. Which forms can is the backend's answer for "the set it was loaded for".
        for other in list(self.m.residency.entries):
            if replace(other, lora="") == key and other.lora and self._serves_any_set(name, other.lora):
                return other
        return key

    def _backend(self, name: str):
        return self.m.backend(Backend.TORCH if name in LIGHT_PARTS else self.backend_kind)

    def _serves_any_set(self, name: str, variant: str) -> bool:
        from .backends.torch_backend import LORA_READY

        return self.backend_kind is Backend.TORCH and variant == LORA_READY

    def get(self, name: str) -> Any:
        index = next(i for i, stage in enumerate(self.stages) if name in stage)
        protect = {self.key(n) for n in self.stages[index]}
        later = {self.key(n) for stage in self.stages[index + 1:] for n in stage}
        spec, component_name, loras = self._owner(name)
        backend = self._backend(component_name)
        component = self.m.residency.acquire(
            self.key(name), self.m.component_bytes(spec, component_name, self.precision, self.backend_kind),
            lambda: self._load(name), working_bytes=self.working, protect=protect, finished=self.finished, later=later,
            load_peak_bytes=backend.load_peak_bytes(spec, component_name, self.precision, self.m.device, self.m.policy,
                                                    self.source))
        if component_name not in LIGHT_PARTS:
            backend.apply_loras(spec, component_name, component, loras)
        self._dtypes[name] = component.dtype
        if name == self.spec.denoiser:
            self.runs_as = component.runs_as
        return component.obj

    def _load(self, name: str) -> LoadedComponent:
        started = time.perf_counter()
        spec, name, loras = self._owner(name)
        if name not in LIGHT_PARTS:
            self.ctx.report("load", 0, 1, f"loading {spec.id} {name} ({self.precision.value})")
        backend = self._backend(name)
        if name in LIGHT_PARTS:
            component = backend.load(spec, name, self.precision, self.m.device, self.m.policy, self.source, self.ctx)
        else:
            component = backend.load(spec, name, self.precision, self.m.device, self.m.policy, self.source,
                                     self.ctx, loras=loras)
        self.load_ms += (time.perf_counter() - started) * 1000
        return component

    def dtype(self, name: str) -> torch.dtype:
        if self._dtypes.get(name) is not None:
            return self._dtypes[name]
        spec, component_name, _ = self._owner(name)
        return self.m.policy.component_dtype(spec, component_name, self.precision)

    def done_with(self, *names: str) -> None:
        self.finished |= {self.key(n) for n in names}

    def remember(self, names: tuple[str, ...], what: Hashable, compute: Callable[[], T]) -> T:
        """`compute()` through the manager's prompt cache, keyed by `what` and the weights of parts `names`."""
        return self.m.prompts.get_or_encode((tuple(self._weights(n) for n in names), what), compute)

    def _weights(self, name: str) -> Hashable:
        """What identifies the weights part `name` computes with: model, component, dtype and backend (the key it
        loads under, without which form serves it), where they come from, and the LoRAs fused into it."""
        key, _, component, loras = self._plain_key(name)
        return key, self.source, loras.key(component)
