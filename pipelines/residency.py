"""Which components are resident on the device, what they cost, and what goes when room is needed.

Policy (after ComfyUI's: a minimum free working memory, and sorted eviction), stated once:
- The device may hold at most `budget` bytes of weights plus the running job's working memory.
- To make room, evict in this order, least recently used first within each tier:
    1. components the running job has finished with (its text encoders once the prompt is encoded);
    2. components the running job does not need (other models, other precisions);
    3. components the running job needs in a later stage (they will be loaded again).
  Components the current stage needs are never evicted.
- An evicted torch component is parked in host RAM when the GPU is discrete and RAM is available
  (bringing it back is a copy, not a reload); on unified memory (DGX Spark) and CPUs it is freed,
  since parking there frees nothing.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .components import ComponentKey, LoadedComponent

log = logging.getLogger("prism.residency")


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class InsufficientMemoryError(RuntimeError):
    """A job cannot fit even after evicting everything else; the message gives the numbers and a way out."""


@dataclass
class Resident:
    key: ComponentKey
    component: LoadedComponent
    last_used: float
    parked: bool = False  # in host RAM, not on the device


@dataclass
class ResidencyEvent:
    action: str  # "load" | "evict" | "park" | "restore"
    key: ComponentKey
    nbytes: int
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.action} {self.key} ({human_bytes(self.nbytes)}){': ' + self.reason if self.reason else ''}"


@dataclass(frozen=True)
class ResidencySnapshot:
    """One consistent view for status displays, taken under the lock."""

    used_bytes: int
    parked_bytes: int
    resident: tuple[Resident, ...]  # most recently used first
    events: tuple[ResidencyEvent, ...]  # the latest last


@dataclass
class Residency:
    """Every read and change of `entries` happens under one lock; a load runs outside it, so status calls
    never wait for a TensorRT build or a checkpoint load."""

    budget_bytes: int
    device: str
    can_park: bool = False  # discrete GPU with host RAM to spare
    park_budget_bytes: int = 0
    # Host RAM is the device's memory (CPU, unified memory): what components keep in host RAM (LoRA bases)
    # counts against the budget; on a discrete GPU it counts against the park budget instead.
    host_is_device: bool = False
    entries: dict[ComponentKey, Resident] = field(default_factory=dict)
    events: list[ResidencyEvent] = field(default_factory=list)
    listeners: list[Callable[[ResidencyEvent], None]] = field(default_factory=list)  # told of every event
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # ------------------------------------------------------------------ accounting

    def used_bytes(self) -> int:
        with self._lock:
            held = sum(r.component.nbytes for r in self.entries.values() if not r.parked)
            return held + (self.host_bytes() if self.host_is_device else 0)

    def parked_bytes(self) -> int:
        with self._lock:
            return sum(r.component.nbytes for r in self.entries.values() if r.parked)

    def host_bytes(self) -> int:
        """Host RAM components keep beside their weights (the 16-bit bases LoRAs are unfused to)."""
        with self._lock:
            return sum(r.component.host_bytes for r in self.entries.values())

    def resident(self) -> list[Resident]:
        with self._lock:
            return sorted(self.entries.values(), key=lambda r: -r.last_used)

    def snapshot(self, events: int = 20) -> ResidencySnapshot:
        with self._lock:
            return ResidencySnapshot(self.used_bytes(), self.parked_bytes(), tuple(self.resident()),
                                     tuple(self.events[-events:]))

    def _record(self, action: str, key: ComponentKey, nbytes: int, reason: str = "") -> None:
        event = ResidencyEvent(action, key, nbytes, reason)
        self.events.append(event)
        del self.events[:-200]
        log.info("%s", event)
        for listener in self.listeners:
            listener(event)

    # ------------------------------------------------------------------ the one entry point

    def acquire(self, key: ComponentKey, estimate_bytes: int, load: Callable[[], LoadedComponent], *,
                working_bytes: int, protect: set[ComponentKey], finished: set[ComponentKey],
                later: set[ComponentKey], load_peak_bytes: int = 0) -> LoadedComponent:
        """The component for `key`, on the device; loads it (making room first) if needed.

        protect: what the current stage needs (never evicted); finished: what the job is done with
        (evicted first); later: what the job still needs afterwards (evicted last). load_peak_bytes:
        what loading holds at its height when that exceeds the result (16-bit weights being quantized).
        """
        with self._lock:
            entry = self.entries.get(key)
            if entry and not entry.parked:
                entry.last_used = time.monotonic()
                return entry.component
            need = entry.component.nbytes if entry else estimate_bytes
            room = need + working_bytes if entry else max(need + working_bytes, load_peak_bytes)
            self.make_room(room, protect | {key}, finished, later, reason=f"to load {key}")
            if entry:  # parked in host RAM: copy it back
                entry.component.obj.to(self.device)
                entry.parked, entry.last_used = False, time.monotonic()
                self._record("restore", key, need)
                return entry.component
        component = load()  # outside the lock: a build can take minutes
        with self._lock:
            self.entries[key] = Resident(key, component, time.monotonic())
            self._record("load", key, component.nbytes)
            if self.used_bytes() + working_bytes > self.budget_bytes:  # the estimate was low: settle up now
                try:
                    self.make_room(working_bytes, protect | {key}, finished, later, reason=f"after loading {key}")
                except InsufficientMemoryError:
                    self.evict(key, "does not fit the budget")
                    self.entries.pop(key, None)
                    raise
            return component

    def make_room(self, nbytes: int, protect: set[ComponentKey], finished: set[ComponentKey] = frozenset(),
                  later: set[ComponentKey] = frozenset(), reason: str = "") -> None:
        def tier(key: ComponentKey) -> int:
            return 0 if key in finished else (2 if key in later else 1)

        with self._lock:
            self._make_room(nbytes, protect, tier, reason)

    def _make_room(self, nbytes: int, protect: set[ComponentKey], tier: Callable[[ComponentKey], int],
                   reason: str) -> None:
        while self.used_bytes() + nbytes > self.budget_bytes:
            victims = [(tier(k), r.last_used, k) for k, r in self.entries.items()
                       if not r.parked and k not in protect and r.component.nbytes > 0]
            if not victims:
                free = self.budget_bytes - self.used_bytes()
                raise InsufficientMemoryError(
                    f"Needs {human_bytes(nbytes)} but only {human_bytes(max(free, 0))} of the {human_bytes(self.budget_bytes)} "
                    "budget is free with nothing left to unload.")
            _, _, victim = min(victims)
            self.evict(victim, reason)

    def evict(self, key: ComponentKey, reason: str = "", release: bool = True, park: bool = True) -> None:
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                return
            obj, nbytes = entry.component.obj, entry.component.nbytes
            parkable = park and isinstance(obj, torch.nn.Module) and self.can_park and not entry.parked
            if parkable and self.parked_bytes() + self.host_bytes() + nbytes <= self.park_budget_bytes:
                obj.to("cpu")
                entry.parked = True
                self._record("park", key, nbytes, reason)
            else:
                del self.entries[key]
                unload = getattr(obj, "unload", None)
                if callable(unload):
                    unload()
                self._record("evict", key, nbytes, reason)
            del obj
            if release:
                release_device_memory(self.device)

    def evict_all(self, reason: str = "", keep: set[ComponentKey] = frozenset()) -> int:
        """Unload everything but `keep` (device and host); returns bytes released."""
        return self._drop(lambda k: k not in keep, reason)

    def drop_model(self, model: str) -> int:
        """Unload every component of `model` (device and host); returns bytes released."""
        return self._drop(lambda k: k.model == model, "unloaded by the user")

    def drop_backend(self, model: str, backend: str, reason: str) -> int:
        """Unload `model`'s components of one backend (e.g. its TensorRT engines after one failed)."""
        return self._drop(lambda k: k.model == model and k.backend == backend, reason)

    def _drop(self, which: Callable[[ComponentKey], bool], reason: str) -> int:
        with self._lock:
            keys = [k for k in self.entries if which(k)]
            freed = sum(self.entries[k].component.nbytes for k in keys)
            for key in keys:
                self.evict(key, reason, release=False, park=False)
                self.entries.pop(key, None)  # a component parked earlier is dropped from host RAM too
        release_device_memory(self.device)  # one collection for the lot (each is ~0.5 s in a big process)
        return freed


def release_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
