"""Shared fixtures: tiny Flux/SDXL pipelines saved once per session in the Hugging Face layout."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from tiny_models import save_tiny_flux, save_tiny_sdxl, save_tiny_sdxl_with_refiner  # noqa: E402


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", guidance_embeds=False)


@pytest.fixture(scope="session")
def tiny_kontext(tmp_path_factory) -> Path:
    from diffusers import FluxKontextPipeline

    return save_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-kontext", seed=1, pipeline=FluxKontextPipeline)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny SDXL base whose prism.json names its refiner, the tiny refiner's folder)."""
    return save_tiny_sdxl_with_refiner(tmp_path_factory.mktemp("models"))


# Every tiny component the TensorRT tests export and build, as (family, component).
TINY_COMPONENTS = [("flux", c) for c in ("text_encoder", "text_encoder_2", "transformer", "vae", "vae_encoder")] + \
                  [("sdxl", c) for c in ("text_encoder", "text_encoder_2", "unet", "vae", "vae_encoder")]


@pytest.fixture(scope="session")
def specs(tiny_flux, tiny_sdxl):
    from pipelines.registry import read_local_spec

    return {"flux": read_local_spec(tiny_flux), "sdxl": read_local_spec(tiny_sdxl)}


@pytest.fixture(scope="session")
def sdxl(specs):
    return specs["sdxl"]


@pytest.fixture(scope="session")
def trt_cache(tmp_path_factory):
    """One TensorRT artifact cache for the whole session, so each tiny export/build is made once."""
    from pipelines.engine_cache import EngineCache

    return EngineCache(tmp_path_factory.getbasetemp() / "tensorrt-cache")


@contextlib.contextmanager
def worker_held(manager, model: str):
    """Keep `manager`'s one worker busy with a 1-step job of `model` until the block ends; yields that job,
    whose result is awaited on the way out."""
    from pipelines.request import GenerationRequest

    release, holding = threading.Event(), threading.Event()

    def hold(progress):  # on the worker thread: the job stays in its denoise stage until released
        if progress.stage == "denoise":
            holding.set()
            release.wait(60)

    job = manager.submit(GenerationRequest("x", model, width=32, height=32, steps=1, seed=1), on_progress=hold)
    try:
        assert holding.wait(60), "the holding job never started"
        yield job
    finally:
        release.set()
    job.result(timeout=60)


def fast_16bit_cpu(fast: bool = True):
    """This machine's CPU as a device, with fast 16-bit math assumed (or, `fast=False`, assumed absent, so 16-bit
    precisions compute in FP32), so dtypes, labels and pixel checks do not depend on the CPU CI lands on
    (tests/test_cpu_dtype.py covers both kinds of CPU)."""
    from dataclasses import replace

    from pipelines.cpu_math import FAST_CPU
    from pipelines.gpu import probe_device

    return replace(probe_device("cpu"), cpu_math=replace(FAST_CPU, fast_bf16=fast, fast_fp16=fast))


@pytest.fixture(scope="session")
def fp32_cpu_manager():
    """A manager on this CPU that computes 16-bit precisions in FP32 (16-bit weights upcast), whatever the CPU.

    For pixel parity with diffusers: both sides in FP32 agree to a level on any CPU, while bf16 arithmetic does
    not (on a 2-core AVX2 EPYC without native bf16, 2026-12-02, SDXL image to image and the refiner hand-off came
    2-9 levels from diffusers' bf16 pipelines; on CPUs with bf16 kernels they had agreed to one level)."""
    from pipelines.manager import ManagerConfig, PipelineManager

    manager = PipelineManager(ManagerConfig(device="cpu"), device_info=fast_16bit_cpu(fast=False))
    yield manager
    manager.close()


@pytest.fixture(scope="session")
def cpu_manager():
    from pipelines.manager import ManagerConfig, PipelineManager

    manager = PipelineManager(ManagerConfig(device="cpu", max_queue=8), device_info=fast_16bit_cpu())
    yield manager
    manager.close()


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is not a passed test, and a run of zero tests is a failure (CI must notice both)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    ran = sum(len(reporter.stats.get(k, [])) for k in ("passed", "failed", "error"))
    if skipped and os.environ.get("PRISM_ALLOW_SKIPS") != "1":
        reporter.write_line(f"{len(skipped)} test(s) were skipped; Prism counts a skip as a failure.", red=True)
        session.exitstatus = 1
    elif ran == 0 and exitstatus == 0:
        session.exitstatus = 5


@pytest.fixture
def diffusers_encoder_on_contiguous_input(monkeypatch):
    """diffusers hands its VAE encoder a channels-last view of the pixels (a numpy transpose), ours a contiguous
    tensor; the CPU bf16 convolutions round the two layouts differently (one bf16 step in the latent mean,
    up to 10 levels of 255 after SDXL's guidance, measured). The layout is no part of the method, so the
    reference's encoder gets a contiguous copy of the same values. In FP32 the two
    layouts differed by 1e-4 in a latent after other tests had run in the process (2026-12-07)."""
    from diffusers import AutoencoderKL

    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, return_dict=True: encode(self, x.contiguous(), return_dict))
