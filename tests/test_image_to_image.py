"""Image to image on tiny real models (CPU): diffusers' img2img pipelines pixel for pixel, every precision,
the VAE encoder as a component of its own, and the stated input rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.image_input import fit, read_image
from pipelines.request import GenerationRequest, RequestError


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def circle_on_blue(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (20, 40, 200))
    r = min(width, height) // 3
    ImageDraw.Draw(image).ellipse((width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r), fill=(220, 20, 20))
    return image


@pytest.mark.parametrize("kind,strength", [("flux", 0.6), ("sdxl", 0.7)])
def test_matches_the_diffusers_img2img_pipeline(kind, strength, request, fp32_cpu_manager,
                                               diffusers_encoder_on_contiguous_input):
    """Same seed, same input, same strength: the same pixels as FluxImg2ImgPipeline / StableDiffusionXLImg2ImgPipeline
    (bf16 weights, both computing in FP32: see the fixture)."""
    from diffusers import FluxImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    folder = request.getfixturevalue(f"tiny_{kind}")
    cls, extra = ((FluxImg2ImgPipeline, {"max_sequence_length": 32}) if kind == "flux"
                  else (StableDiffusionXLImg2ImgPipeline, {}))
    guidance = 3.5 if kind == "flux" else 5.0
    source = circle_on_blue(32, 48)  # already the requested size: both sides use it unresized
    ours = fp32_cpu_manager.generate(GenerationRequest(prompt="a red circle", model=str(folder), precision="bf16",
                                                       seed=7, steps=5, guidance=guidance, width=32, height=48,
                                                       image=read_image(source), strength=strength))
    pipe = cls.from_pretrained(folder, dtype=torch.bfloat16).to(torch.float32)
    theirs = pipe("a red circle", image=source, strength=strength, num_inference_steps=5, guidance_scale=guidance,
                  width=32, height=48, generator=[torch.Generator().manual_seed(7)], **extra).images
    # Both sides compute in FP32 from the same bf16 weights: at most one level apart.
    assert np.abs(_pixels(ours.images[0]) - _pixels(theirs[0])).max() <= 1
    # The strength cut the schedule: 5 x 0.6 = 3 steps (Flux), int(5 x 0.7) = 3 steps (SDXL).
    assert len(ours.timings.steps_ms) == 3 and ours.timings.vae_encoder_ms > 0


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp8", "fp4"])
def test_every_precision_runs_image_to_image(kind, precision, request, cpu_manager):
    folder = request.getfixturevalue(f"tiny_{kind}")
    source = read_image(circle_on_blue(64, 64))
    result = cpu_manager.generate(GenerationRequest(prompt="a red circle", model=str(folder), precision=precision,
                                                    seed=3, steps=4, width=32, height=32, image=source, strength=0.5))
    assert result.images[0].size == (32, 32)
    assert len(result.timings.steps_ms) == 2
    assert result.request.strength == 0.5
    assert result.settings()["input_image_sha256"] == source.sha256 and "image" not in result.settings()
    assert _pixels(result.images[0]).std() > 1.0  # not a flat (black) picture
    # (The tiny random VAE does not reconstruct its input; test_demo_image_to_image.py shows the input kept.)


def test_encoder_is_its_own_component_loaded_only_for_an_input_image(cpu_manager, tiny_sdxl):
    cpu_manager.unload()
    cpu_manager.generate(GenerationRequest(prompt="x", model=str(tiny_sdxl), seed=1, steps=1, width=32, height=32))
    assert not any(r.key.name == "vae_encoder" for r in cpu_manager.status().resident)
    cpu_manager.generate(GenerationRequest(prompt="x", model=str(tiny_sdxl), seed=1, steps=2, width=32, height=32,
                                           image=circle_on_blue(32, 32), strength=0.5))
    assert any(r.key.name == "vae_encoder" for r in cpu_manager.status().resident)


def test_batch_seeds_reproduce_alone(cpu_manager, tiny_flux):
    base = dict(prompt="a red circle", model=str(tiny_flux), steps=3, width=32, height=32,
                image=circle_on_blue(32, 32), strength=0.8)
    batch = cpu_manager.generate(GenerationRequest(**base, seed=5, num_images=2))
    alone = cpu_manager.generate(GenerationRequest(**base, seed=6))
    diff = np.abs(_pixels(alone.images[0]) - _pixels(batch.images[1]))
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())
    assert np.abs(_pixels(batch.images[0]) - _pixels(batch.images[1])).mean() > 0.5


def test_fit_covers_and_crops_the_centre():
    wide = Image.new("RGB", (200, 100), (0, 0, 255))
    ImageDraw.Draw(wide).rectangle((75, 0, 124, 99), fill=(255, 0, 0))  # a red band in the middle
    fitted = fit(wide, 64, 64)
    assert fitted.size == (64, 64)
    arr = _pixels(fitted)
    # 200x100 scaled to 128x64, the centre 64 columns kept: the red band (a quarter of the width) is 32 wide.
    red = (arr[32, :, 0] > 128).sum()
    assert 30 <= red <= 34, red
    same = Image.new("RGB", (64, 64))
    assert fit(same, 64, 64) is same


@pytest.mark.parametrize("strength,message", [(0.0, "above 0"), (1.5, "at most 1"), ("lots", "must be a number")])
def test_strength_outside_0_to_1_is_refused(cpu_manager, tiny_flux, strength, message):
    req = GenerationRequest(prompt="x", model=str(tiny_flux), image=circle_on_blue(32, 32), strength=strength,
                            width=32, height=32, steps=2)
    with pytest.raises(RequestError, match=message):
        cpu_manager.generate(req)


def test_strength_too_small_for_the_steps_is_refused(cpu_manager, tiny_sdxl):
    req = GenerationRequest(prompt="x", model=str(tiny_sdxl), image=circle_on_blue(32, 32), strength=0.1,
                            width=32, height=32, steps=4)
    with pytest.raises(RequestError, match="no step to run; raise the strength or the steps"):
        cpu_manager.generate(req)


def test_strength_without_an_image_is_refused(cpu_manager, tiny_flux):
    with pytest.raises(RequestError, match="give an image or clear strength"):
        cpu_manager.generate(GenerationRequest(prompt="x", model=str(tiny_flux), strength=0.5, width=32, height=32))


# --------------------------------------------------------------------------- inpainting

def square_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.mark.parametrize("kind,strength", [("flux", 0.8), ("sdxl", 1.0), ("sdxl", 0.8)])
def test_inpainting_matches_the_diffusers_inpaint_pipeline(kind, strength, request, fp32_cpu_manager,
                                                          diffusers_encoder_on_contiguous_input):
    """Inside the mask our pixels are FluxInpaintPipeline's / StableDiffusionXLInpaintPipeline's; outside it,
    with no blur, they are the input's own (we paste the result back; diffusers returns the VAE's round trip)."""
    from diffusers import FluxInpaintPipeline, StableDiffusionXLInpaintPipeline

    folder = request.getfixturevalue(f"tiny_{kind}")
    cls, extra = ((FluxInpaintPipeline, {"max_sequence_length": 32}) if kind == "flux"
                  else (StableDiffusionXLInpaintPipeline, {}))
    guidance = 3.5 if kind == "flux" else 5.0
    source, mask = circle_on_blue(32, 48), square_mask(32, 48, (8, 16, 23, 39))
    ours = fp32_cpu_manager.generate(GenerationRequest(prompt="a red circle", model=str(folder), precision="bf16",
                                                       seed=7, steps=5, guidance=guidance, width=32, height=48,
                                                       image=source, mask=mask, mask_blur=0, strength=strength))
    pipe = cls.from_pretrained(folder, dtype=torch.bfloat16).to(torch.float32)  # FP32 compute, as the fixture
    theirs = pipe("a red circle", image=source, mask_image=mask, strength=strength, num_inference_steps=5,
                  guidance_scale=guidance, width=32, height=48, generator=[torch.Generator().manual_seed(7)],
                  **extra).images[0]
    inside = np.asarray(mask) > 127
    diff = np.abs(_pixels(ours.images[0]) - _pixels(theirs))[inside]
    assert diff.max() <= 1  # both sides in FP32 from the same bf16 weights
    assert np.array_equal(np.asarray(ours.images[0])[~inside], np.asarray(source)[~inside])
    assert ours.settings()["mask_sha256"] and ours.settings()["mask_blur"] == 0


def test_mask_blur_softens_the_paste_but_far_pixels_stay(cpu_manager, tiny_flux):
    source, mask = circle_on_blue(64, 64), square_mask(64, 64, (24, 24, 39, 39))
    result = cpu_manager.generate(GenerationRequest(prompt="x", model=str(tiny_flux), seed=2, steps=3, width=64,
                                                    height=64, image=source, mask=mask, mask_blur=4, strength=0.9))
    out, src = np.asarray(result.images[0]).astype(int), np.asarray(source).astype(int)
    changed = np.abs(out - src).max(axis=2) > 0
    assert changed[24:40, 24:40].mean() > 0.9  # the masked square was repainted
    assert changed[20:23, 28:36].any()  # the blur reaches a few pixels past the mask's edge
    far = np.ones((64, 64), bool)
    far[12:52, 12:52] = False  # 3 blur radii past the edge
    assert not changed[far].any()


def test_only_masked_repaints_a_region_at_full_resolution(cpu_manager, tiny_sdxl):
    source = circle_on_blue(128, 96)
    mask = square_mask(128, 96, (100, 70, 115, 85))  # a small square near the bottom right corner
    seen = []
    result = cpu_manager.generate(GenerationRequest(prompt="x", model=str(tiny_sdxl), seed=2, steps=2, width=32,
                                                    height=32, image=source, mask=mask, mask_blur=0, strength=0.9,
                                                    only_masked=True), on_progress=seen.append)
    out, src = np.asarray(result.images[0]).astype(int), np.asarray(source).astype(int)
    assert result.images[0].size == (128, 96)  # the input's size: the region was pasted back
    changed = np.abs(out - src).max(axis=2) > 0
    assert changed[70:86, 100:116].mean() > 0.9 and changed.sum() == changed[70:86, 100:116].sum()


def test_mask_region_keeps_the_requested_aspect():
    from pipelines.image_input import mask_region

    region = mask_region(square_mask(200, 100, (90, 40, 109, 59)), aspect=2.0, padding=10)
    left, top, right, bottom = region
    assert left <= 80 and right >= 120 and top <= 30 and bottom >= 70
    assert (right - left) == 2 * (bottom - top)


@pytest.mark.parametrize("change,message", [
    (dict(mask=Image.new("L", (16, 16), 255)), "The mask is 16x16 but the input image is 32x32; give a mask of the image's size."),
    (dict(mask=Image.new("L", (32, 32), 0)), "The mask is empty: paint the area to repaint in white."),
    (dict(mask_blur=500), "mask blur must be between 0 and 64 pixels; got 500."),
    (dict(mask=None, only_masked=True), "'Only masked' needs a mask; give one or turn the option off."),
    (dict(image=None, strength=None), "A mask needs an input image to paint into; give an image or clear the mask."),
])
def test_bad_masks_are_refused(cpu_manager, tiny_flux, change, message):
    base = dict(prompt="x", model=str(tiny_flux), width=32, height=32, steps=2, image=circle_on_blue(32, 32),
                mask=Image.new("L", (32, 32), 255), strength=0.5)
    with pytest.raises(RequestError) as exc:
        cpu_manager.generate(GenerationRequest(**{**base, **change}))
    assert str(exc.value) == message


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_every_sampler_runs_image_to_image_and_inpainting(kind, request, cpu_manager):
    from pipelines.registry import Family
    from pipelines.schedulers import sampler_names

    folder = request.getfixturevalue(f"tiny_{kind}")
    source, mask = circle_on_blue(32, 32), square_mask(32, 32, (8, 8, 23, 23))
    for sampler in sampler_names(Family.FLUX if kind == "flux" else Family.SDXL):
        for inpaint in (None, mask):
            result = cpu_manager.generate(GenerationRequest(prompt="x", model=str(folder), seed=1, steps=4, width=32,
                                                            height=32, image=source, mask=inpaint, mask_blur=0,
                                                            strength=0.5, sampler=sampler))
            assert len(result.timings.steps_ms) == 2 and _pixels(result.images[0]).std() > 1.0, sampler
