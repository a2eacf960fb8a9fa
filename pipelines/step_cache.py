"""Step caching (opt-in, "Fast (cached)"): some denoising steps reuse or extend earlier denoiser outputs.

A `StepCache` is a fixed schedule of which steps call the denoiser; the others reuse the last output (the
velocity for Flux, the guided noise prediction for SDXL) or extend the last two, and only the scheduler's
update runs. Each family names its own "fast" schedule (`ModelFamily.fast_cache`), measured on its demo
model. Reusing an output on a slowly changing stretch of the trajectory is what First-Block Cache / TeaCache /
cache-dit's DBCache decide per step from a residual; a fixed schedule skips the same steps every time.

Why our own and not cache-dit (1.5.3, tried with diffusers 0.42.1 on the demo Flux transformer, 2026-12-01):
- it has no adapter for SDXL's UNet (its BlockAdapter matches only transformer-block call patterns);
- its hooks stay on the module, which our residency shares between jobs, and its state carries across
  calls: two identical 8-step runs of the same cached transformer differed (max 0.24 vs 0.30 from the
  uncached latents), so a seed would no longer give one image; and it fixes the step count when enabled;
- it patches the diffusers module's blocks, which a TensorRT engine or the compiled regions do not expose.
A schedule in the family loop works on every backend, is the same for every job with the same steps,
and its saving is known before the job runs (speed is measured with a fixed schedule anyway, issue 17).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

OFF = "off"
FAST = "fast"
CHOICES = (OFF, FAST)


@dataclass(frozen=True)
class StepCache:
    """Which of a job's steps call the denoiser. The first `warmup` steps (where the picture's layout forms) and
    the last `final` steps (where fine detail forms) always do; in between, one step in `every` does."""

    name: str = OFF
    warmup: int = 0
    final: int = 0
    every: int = 1  # 1: every step calls the denoiser (no caching)
    min_steps: int = 0  # shorter schedules call the denoiser every step: too few steps to spare one
    # A skipped step takes the line through the last two computed outputs at its own time, rather than the
    # last output as it was (first order instead of zeroth; TaylorSeer's idea at order 1).
    extrapolate: bool = False

    @classmethod
    def named(cls, name: str, fast: "StepCache") -> "StepCache":
        """The schedule a request's `cache` names: `fast` (the family's) or none (checked by `check_name` first)."""
        return fast if check_name(name) == FAST else NO_CACHE

    @property
    def active(self) -> bool:
        return self.every > 1

    def computes(self, step: int, steps: int) -> bool:
        """Whether step `step` (0-based) of `steps` calls the denoiser."""
        if not self.active or steps < self.min_steps or step < self.warmup or step >= steps - self.final:
            return True
        return (step - self.warmup) % self.every == 0

    def calls(self, steps: int) -> int:
        """Denoiser calls for a schedule of `steps` steps."""
        return sum(self.computes(i, steps) for i in range(steps))

    def describe(self, steps: int) -> str:
        """What the schedule does, for the switch's label: at `steps` steps, how many run the model."""
        which = "every other middle step" if self.every == 2 else f"one middle step in {self.every}"
        rest = "extend its last two outputs" if self.extrapolate else "reuse its last output"
        saving = (f"{steps} steps run it {self.calls(steps)} times" if steps >= self.min_steps
                  else f"from {self.min_steps} steps up; {steps} steps all run it")
        return f"{which} runs the model, the others {rest} ({saving})"

    def note(self, steps: int) -> str | None:
        """Why a request for caching saved nothing, when it did not (shown as a warning)."""
        if self.active and self.calls(steps) == steps:
            return (f"Fast (cached) reuses steps only from {self.min_steps} steps up; these {steps} steps all ran "
                    "the model.")
        return None


class StepOutputs:
    """The denoiser's output at each step of one job under a StepCache: computed where the schedule says, else
    made from the outputs computed before (the last one, or with `extrapolate` the line through the last two)."""

    def __init__(self, cache: StepCache, steps: int):
        self.cache, self.steps = cache, steps
        self.computed: list[tuple[torch.Tensor, torch.Tensor]] = []  # the last two (time, output)

    def at(self, i: int, t: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The output at step `i`, whose time is `t` (a tensor: no host synchronisation)."""
        if i == 0 or self.cache.computes(i, self.steps):
            out = compute()
            self.computed = [*self.computed[-1:], (t, out)]
            return out
        (t1, last) = self.computed[-1]
        if not self.cache.extrapolate or len(self.computed) < 2:
            return last
        t0, before = self.computed[0]
        slope = (t.float() - t1.float()) / (t1.float() - t0.float())
        return last + (last - before) * slope.to(last.dtype)


NO_CACHE = StepCache()


def check_name(name: object) -> str:
    """The cache choice, normalised; ValueError with the valid choices otherwise."""
    text = name.strip().lower() if isinstance(name, str) else name
    if text in ("", None, False):
        return OFF
    if text is True:
        return FAST
    if text not in CHOICES:
        raise ValueError(f"cache must be one of {', '.join(CHOICES)} (or true / false); got {name!r}.")
    return text
