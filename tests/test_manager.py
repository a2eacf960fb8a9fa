"""The manager with tiny real models and injected memory budgets: eviction order, budget, OOM, queue, cancel."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from pipelines.backends.torch_backend import TorchBackend
from pipelines.manager import JobState, ManagerConfig, PipelineManager, QueueFullError
from pipelines.precision import Backend, Precision
from pipelines.registry import resolve_spec
from pipelines.request import GenerationRequest
from pipelines.residency import InsufficientMemoryError
from pipelines.run_context import JobCancelled
from conftest import fast_16bit_cpu


def need_bytes(manager, model: str, precision: str) -> int:
    """What the manager itself says one job needs at once (largest stage + working memory)."""
    spec = resolve_spec(model)
    working = manager.working_bytes(spec, GenerationRequest(prompt="", model=model, width=32, height=32,
                                                             num_images=1, precision=precision))
    return max(n for _, n in manager.stage_needs(spec, Precision(precision), Backend.TORCH, working))


def total_bytes(manager, model: str, precision: str) -> int:
    spec = resolve_spec(model)
    return sum(b for _, b in manager.stage_bytes(spec, Precision(precision), Backend.TORCH))


@pytest.fixture
def manager_with_budget():
    made = []

    def make(budget: int, backend=None, **config):
        m = PipelineManager(ManagerConfig(device="cpu", memory_budget=f"{budget}B", **config),
                            backends={Backend.TORCH: backend} if backend else None, device_info=fast_16bit_cpu())
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def small(model, **fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle", "model": str(model), "steps": 2, "seed": 1, "width": 32,
                                "height": 32, **fields})


def test_second_model_evicts_the_first_in_the_stated_order_and_stays_in_budget(manager_with_budget, tiny_flux, tiny_sdxl):
    probe = manager_with_budget(10**9)
    flux, sdxl = str(tiny_flux), str(tiny_sdxl)
    # Room for either model alone, not for both.
    budget = max(need_bytes(probe, sdxl, "bf16"), need_bytes(probe, flux, "bf16")) + total_bytes(probe, flux, "bf16") // 4
    assert budget < total_bytes(probe, flux, "bf16") + need_bytes(probe, sdxl, "bf16")
    m = manager_with_budget(budget)
    seen_over_budget = []

    def record(event):
        if m.residency.used_bytes() > m.residency.budget_bytes:
            seen_over_budget.append((event.action, str(event.key), m.residency.used_bytes()))

    m.residency.listeners.append(record)
    m.generate(small(flux))
    assert {k.model for k in m.residency.entries} == {"tiny-flux"}
    m.generate(small(sdxl))
    evicted = [e.key for e in m.residency.events if e.action == "evict"]
    names = [(k.model, k.name) for k in evicted]
    assert names, "loading SDXL under this budget must evict something"
    # 1) the running job's own finished text encoders go first, 2) then the other model, least recently used first.
    assert names[0][0] == "tiny-sdxl" and names[0][1].startswith("text_encoder")
    flux_order = [n for model, n in names if model == "tiny-flux"]
    assert flux_order.index("text_encoder") < flux_order.index("transformer") < flux_order.index("vae")
    assert not seen_over_budget
    assert m.residency.used_bytes() <= budget
    resident = {(k.model, k.name) for k in m.residency.entries}
    assert ("tiny-sdxl", "vae") in resident and ("tiny-sdxl", "tokenizer") in resident  # weightless parts stay


def test_impossible_job_names_need_free_and_a_smaller_precision_then_the_next_job_runs(manager_with_budget, tiny_sdxl, tiny_flux):
    probe = manager_with_budget(10**9)
    sdxl = str(tiny_sdxl)
    bf16_need, fp8_need = need_bytes(probe, sdxl, "bf16"), need_bytes(probe, sdxl, "fp8")
    assert fp8_need < bf16_need
    m = manager_with_budget((bf16_need + fp8_need) // 2)
    with pytest.raises(InsufficientMemoryError) as err:
        m.generate(small(sdxl, precision="bf16"))
    message = str(err.value)
    assert "needs" in message and "memory budget is" in message and "free now" in message
    assert "fp8 would fit" in message
    assert not m.residency.entries  # nothing was loaded for the refused job
    assert m.generate(small(sdxl, precision="fp8")).images[0].size == (32, 32)  # the worker carries on
    assert m.generate(small(tiny_flux)).images[0].size == (32, 32)


def test_no_precision_fits_says_so(manager_with_budget, tiny_sdxl):
    m = manager_with_budget(1000)
    with pytest.raises(InsufficientMemoryError, match="No smaller precision fits either"):
        m.generate(small(tiny_sdxl))


class OomBackend(TorchBackend):
    """Raises CUDA out-of-memory a set number of times: while loading the denoiser, or inside its first call."""

    def __init__(self, fail_loads: int = 0, fail_calls: int = 0):
        super().__init__()
        self.fail_loads, self.fail_calls = fail_loads, fail_calls

    def load(self, spec, name, *args, **kwargs):
        if name == spec.denoiser and self.fail_loads > 0:
            self.fail_loads -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        component = super().load(spec, name, *args, **kwargs)
        if name == spec.denoiser:
            engine, backend = component.obj, self

            class Flaky(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.inner = engine

                def forward(self, **kw):
                    if backend.fail_calls > 0:
                        backend.fail_calls -= 1
                        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                    return self.inner(**kw)

            component.obj = Flaky()
        return component


@pytest.mark.parametrize("where", ["load", "run"])
def test_out_of_memory_evicts_and_retries_once(manager_with_budget, tiny_flux, tiny_sdxl, where):
    backend = OomBackend()
    m = manager_with_budget(10**9, backend=backend)
    m.generate(small(tiny_sdxl))  # something else resident, to be evicted by the retry
    backend.fail_loads, backend.fail_calls = (1, 0) if where == "load" else (0, 1)
    result = m.generate(small(tiny_flux))
    assert result.images[0].size == (32, 32)
    reasons = [e.reason for e in m.residency.events if e.action == "evict"]
    assert any("out of memory: retrying once" in r for r in reasons)
    assert not any(k.model == "tiny-sdxl" for k in m.residency.entries)


def test_out_of_memory_twice_is_a_clear_error_and_the_worker_survives(manager_with_budget, tiny_flux):
    backend = OomBackend(fail_calls=2)
    m = manager_with_budget(10**9, backend=backend)
    with pytest.raises(InsufficientMemoryError) as err:
        m.generate(small(tiny_flux, precision="bf16"))
    assert "Out of GPU memory running tiny-flux at bf16 32x32" in str(err.value)
    assert "would fit" in str(err.value) or "No smaller precision" in str(err.value)
    assert m.generate(small(tiny_flux)).images[0].size == (32, 32)


class BlockingBackend(TorchBackend):
    """Holds the worker inside a load until released, so the queue can be filled deterministically."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def load(self, spec, name, *args, **kwargs):
        if name == spec.denoiser and not self.release.is_set():
            self.entered.set()
            assert self.release.wait(60), "test never released the worker"
        return super().load(spec, name, *args, **kwargs)


def test_full_queue_refuses_at_once_and_reports_positions(manager_with_budget, tiny_flux):
    backend = BlockingBackend()
    m = manager_with_budget(10**9, backend=backend, max_queue=2)
    try:
        running = m.submit(small(tiny_flux))
        assert backend.entered.wait(60)
        waiting = [m.submit(small(tiny_flux, seed=s)) for s in (2, 3)]
        assert [m.queue_position(j) for j in waiting] == [1, 2]
        assert waiting[1].progress.message == "queued: 2 job(s) ahead"
        started = time.monotonic()
        with pytest.raises(QueueFullError, match="busy: 2 jobs are already waiting"):
            m.submit(small(tiny_flux, seed=4))
        assert time.monotonic() - started < 1.0
    finally:
        backend.release.set()
    assert all(j.result(120).images for j in [running, *waiting])
    assert m.generate(small(tiny_flux, seed=5)).images  # room again


def test_max_queue_zero_runs_one_job_and_keeps_no_waiting_line(manager_with_budget, tiny_flux):
    backend = BlockingBackend()
    m = manager_with_budget(10**9, backend=backend, max_queue=0)
    try:
        running = m.submit(small(tiny_flux))  # an idle server takes a job
        assert backend.entered.wait(60)
        with pytest.raises(QueueFullError, match=r"busy with another job and keeps no waiting line \(--max-queue 0\)"):
            m.submit(small(tiny_flux, seed=2))
        assert m.status().queued == 0
    finally:
        backend.release.set()
    assert running.result(120).images
    assert m.generate(small(tiny_flux, seed=3), timeout=120).images  # idle again: the next job is taken


def test_cancel_stops_a_job_between_steps_and_the_next_job_runs(manager_with_budget, tiny_flux):
    m = manager_with_budget(10**9)
    steps_seen = []
    holder = {}

    def on_progress(p):
        if p.stage == "denoise":
            steps_seen.append(p.done)
            if p.done == 2:
                holder["job"].cancel()

    holder["job"] = job = m.submit(small(tiny_flux, steps=40), on_progress=on_progress)
    with pytest.raises(JobCancelled):
        job.result(120)
    assert job.state is JobState.CANCELLED
    assert max(steps_seen) == 2  # stopped at the next step boundary, not after 40 steps
    assert m.generate(small(tiny_flux)).images


def test_a_job_cancelled_while_queued_never_runs(manager_with_budget, tiny_flux):
    backend = BlockingBackend()
    m = manager_with_budget(10**9, backend=backend)
    first = m.submit(small(tiny_flux))
    assert backend.entered.wait(60)
    queued = m.submit(small(tiny_flux, seed=9))
    queued.cancel()
    backend.release.set()
    first.result(120)
    with pytest.raises(JobCancelled, match="before it started"):
        queued.result(60)


def test_unexpected_errors_become_a_message_and_the_worker_goes_on(manager_with_budget, tiny_flux):
    class Broken(TorchBackend):
        calls = 0

        def load(self, spec, name, *args, **kwargs):
            if name == spec.denoiser and Broken.calls == 0:
                Broken.calls += 1
                raise KeyError("weights.bin")
            return super().load(spec, name, *args, **kwargs)

    m = manager_with_budget(10**9, backend=Broken())
    with pytest.raises(Exception) as err:
        m.generate(small(tiny_flux))
    assert "Generation failed unexpectedly (KeyError" in str(err.value)
    assert "still running" in str(err.value)
    assert m.generate(small(tiny_flux)).images


def test_text_encoders_and_vae_are_shared_between_precisions(manager_with_budget, tiny_flux):
    m = manager_with_budget(10**9)
    m.generate(small(tiny_flux, precision="bf16"))
    m.generate(small(tiny_flux, precision="fp8"))
    loads = [(e.key.name, e.key.variant) for e in m.residency.events if e.action == "load"]
    assert loads.count(("text_encoder_2", "bfloat16")) == 1 and loads.count(("vae", "bfloat16")) == 1
    assert ("transformer", "bf16") in loads and ("transformer", "fp8") in loads


def test_unload_releases_a_model(manager_with_budget, tiny_flux):
    m = manager_with_budget(10**9)
    m.generate(small(tiny_flux))
    assert m.status().used_bytes > 0
    assert m.unload("tiny-flux") > 0
    status = m.status()
    assert status.used_bytes == 0 and not status.resident
