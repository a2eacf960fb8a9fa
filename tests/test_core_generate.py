"""End-to-end generation on tiny real models through the real loading path (CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.request import GenerationRequest


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def psnr(a, b) -> float:
    mse = np.mean((_pixels(a) - _pixels(b)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def flux_results(cpu_manager, tiny_flux):
    """One bf16 batch of two plus fp8/fp4 at the same seed; reused by several tests to keep CPU time low."""
    base = dict(prompt="a small red circle at the top left", model=str(tiny_flux), seed=11, steps=3, width=48, height=32)
    return {p: cpu_manager.generate(GenerationRequest(**base, precision=p, num_images=2 if p == "bf16" else 1))
            for p in ("bf16", "fp16", "fp8", "fp4")}


@pytest.fixture(scope="module")
def sdxl_results(cpu_manager, tiny_sdxl):
    base = dict(prompt="a large blue square", model=str(tiny_sdxl), seed=3, steps=3, width=40, height=32,
                negative_prompt="blurry")
    return {p: cpu_manager.generate(GenerationRequest(**base, precision=p, num_images=2 if p == "bf16" else 1))
            for p in ("bf16", "fp16", "fp8", "fp4")}


@pytest.mark.parametrize("family", ["flux", "sdxl"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp8", "fp4"])
def test_every_family_and_precision_draws_the_requested_size(family, precision, request):
    results = request.getfixturevalue(f"{family}_results")
    result = results[precision]
    expected = (48, 32) if family == "flux" else (40, 32)
    assert [im.size for im in result.images] == [expected] * len(result.images)
    assert result.request.precision.value == precision
    assert len(result.timings.steps_ms) == 3 and all(t > 0 for t in result.timings.steps_ms)
    # The text stage is 0 ms where an earlier job's encoding of the prompt was reused (tests/test_prompt_cache.py).
    assert result.timings.text_encoders_ms >= 0 and result.timings.vae_ms > 0
    assert result.peak_memory_bytes is None  # CPU: no device memory figure
    assert np.asarray(result.images[0]).std() > 1.0  # not a flat (black) picture


def test_runs_as_is_honest_about_emulation(flux_results):
    assert flux_results["bf16"].runs_as == "BF16"
    assert flux_results["fp8"].runs_as == "FP8 (CPU emulation)"
    assert flux_results["fp4"].runs_as == "FP4 weights, 16-bit compute"


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_batch_seeds_are_consecutive_and_reproducible_alone(family, request, cpu_manager):
    batch = request.getfixturevalue(f"{family}_results")["bf16"]
    assert batch.seeds == (batch.request.seed, batch.request.seed + 1)
    alone = cpu_manager.generate(GenerationRequest(**{**batch.request.to_dict(), "seed": batch.seeds[1], "num_images": 1}))
    # The second image of a batch is the image its seed gives on its own (a batched matmul rounds a little
    # differently from a single one, so allow a few levels of 255 on a handful of pixels).
    diff = np.abs(_pixels(alone.images[0]) - _pixels(batch.images[1]))
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())
    # Different seeds give different pictures.
    assert psnr(batch.images[0], batch.images[1]) < 30


def test_same_seed_same_image(cpu_manager, tiny_flux):
    req = GenerationRequest(prompt="a green star", model=str(tiny_flux), seed=99, steps=2, width=32, height=32)
    a, b = cpu_manager.generate(req), cpu_manager.generate(req)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


# Image error of the low precisions against the 16-bit image they compute in (bf16 on a CPU) at the
# same seed, measured on these tiny random models (2026-11-26, CPU): Flux fp8 52.3 dB, fp4 51.1 dB; SDXL
# fp8 41.9 dB, fp4 42.3 dB. Tiny random denoisers move the picture little, so the denoiser-level error in
# test_core_quant.py is the sharper check; here the bounds guard against broken arithmetic (NaN, garbage).
@pytest.mark.parametrize("family,reference,bounds", [("flux", "bf16", {"fp8": 45, "fp4": 42}),
                                                     ("sdxl", "bf16", {"fp8": 38, "fp4": 38})])
def test_low_precision_stays_close_to_16bit(family, reference, bounds, request):
    results = request.getfixturevalue(f"{family}_results")
    scores = {p: psnr(results[p].images[0], results[reference].images[0]) for p in ("fp8", "fp4")}
    assert scores["fp8"] >= bounds["fp8"], scores
    assert scores["fp4"] >= bounds["fp4"], scores
    assert scores["fp4"] < 60, "FP4 output identical to bf16: quantization did not happen"


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_matches_the_diffusers_pipeline(kind, request, cpu_manager):
    """Our loop is diffusers' loop: the same seed gives the same pixels (to one level of 255 rounding)."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(f"tiny_{kind}")
    cls, extra = (FluxPipeline, {"max_sequence_length": 32}) if kind == "flux" else (StableDiffusionXLPipeline, {})
    guidance = 3.5 if kind == "flux" else 5.0
    ours = cpu_manager.generate(GenerationRequest(prompt="a red circle", model=str(folder), precision="bf16", seed=7,
                                                  num_images=2, steps=3, guidance=guidance, width=32, height=48))
    pipe = cls.from_pretrained(folder, dtype=torch.bfloat16)
    generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    theirs = pipe("a red circle", num_inference_steps=3, guidance_scale=guidance, width=32, height=48,
                  generator=generators, num_images_per_prompt=2, **extra).images
    for a, b in zip(ours.images, theirs):
        # diffusers rounds its [0, 1] conversion in bf16, we in fp32: at most one level apart.
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_schnell_style_model_runs_without_guidance(cpu_manager, tiny_flux_schnell):
    from pipelines.registry import resolve_spec

    spec = resolve_spec(str(tiny_flux_schnell))
    assert spec.default_steps == 3 and spec.default_guidance == 0.0  # prism.json steps; guidance from the model
    result = cpu_manager.generate(GenerationRequest(prompt="a blue square", model=str(tiny_flux_schnell), seed=1))
    assert result.images[0].size == (32, 32)


def test_long_prompt_is_truncated_with_a_warning(cpu_manager, tiny_flux):
    prompt = " ".join(["red circle"] * 40)  # far beyond the tiny model's 32 T5 tokens
    result = cpu_manager.generate(GenerationRequest(prompt=prompt, model=str(tiny_flux), seed=1, steps=1))
    assert any("cut off" in w for w in result.warnings)
