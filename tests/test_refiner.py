"""The SDXL refiner on a tiny base + refiner pair (CPU): diffusers' two-pipeline latent hand-off pixel for pixel,
every precision, shared components loaded once, the memory plan, bad input, the CLI and the PNG keys."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.pngmeta import parse_infotext, read_png_metadata
from pipelines.precision import Backend, Precision
from pipelines.registry import (HUB_MODELS, REFINER_MODELS, UnknownModelError, known_ids, read_local_spec,
                                refiner_of, resolve_spec)
from pipelines.request import GenerationRequest, RequestError

from conftest import fast_16bit_cpu
from test_image_to_image import circle_on_blue

ROOT = Path(__file__).resolve().parent.parent


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def _diffusers_hand_off(base: Path, refiner: Path, switch: float, image=None, **kwargs) -> Image.Image:
    """diffusers' documented base -> refiner ensemble: the base stops at `switch` and returns latents, the refiner
    (sharing the base's text_encoder_2 and VAE) starts there; one generator runs through both."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    first_cls = StableDiffusionXLPipeline if image is None else StableDiffusionXLImg2ImgPipeline
    # bf16 weights computing in FP32, as `fp32_cpu_manager` does.
    first = first_cls.from_pretrained(base, dtype=torch.bfloat16).to(torch.float32)
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner, text_encoder_2=first.text_encoder_2,
                                                              vae=first.vae, dtype=torch.bfloat16).to(torch.float32)
    generator = torch.Generator().manual_seed(kwargs.pop("seed"))
    size = {} if image is None else {"image": image, "strength": kwargs.pop("strength")}
    latents = first(**kwargs, **size, generator=[generator], denoising_end=switch, output_type="latent").images
    kwargs.pop("width"), kwargs.pop("height")
    return second(**kwargs, image=latents, denoising_start=switch, generator=[generator]).images[0]


@pytest.mark.parametrize("case", ["text to image", "image to image, negative prompt"])
def test_matches_the_diffusers_base_to_refiner_hand_off(case, tiny_sdxl_pair, fp32_cpu_manager,
                                                        diffusers_encoder_on_contiguous_input):
    base, refiner = tiny_sdxl_pair
    settings = dict(prompt="a red circle", num_inference_steps=10, guidance_scale=5.0, width=32, height=48, seed=7)
    image = None
    if case != "text to image":
        image = circle_on_blue(32, 48)
        settings.update(negative_prompt="blue", strength=0.9)
    ours = fp32_cpu_manager.generate(GenerationRequest(
        prompt=settings["prompt"], model=str(base), precision="bf16", seed=7, steps=10, guidance=5.0, width=32,
        height=48, refiner=0.8, negative_prompt=settings.get("negative_prompt", ""),
        image=image, strength=settings.get("strength")))
    theirs = _diffusers_hand_off(base, refiner, 0.8, image=image, **settings)
    # Both sides compute in FP32 from the same bf16 weights: at most one level apart.
    assert np.abs(_pixels(ours.images[0]) - _pixels(theirs)).max() <= 1
    # "leading" spacing, 10 steps: timesteps 901, 801, ..., 1; the base runs those at or above 200 (diffusers'
    # cutoff round(1000 - 0.8 x 1000)), the refiner the rest. Image to image at 0.9 starts at 801.
    base_steps = 8 if image is None else 7
    assert (len(ours.timings.steps_ms), ours.timings.refiner_steps) == (base_steps + 2, 2)
    assert ours.settings()["refiner_model"] == "tiny-sdxl-refiner" and ours.settings()["refiner"] == 0.8
    assert f"{base_steps} base + 2 refiner" in ours.timings.summary()


def test_the_refiner_changes_the_picture(tiny_sdxl_pair, cpu_manager):
    """The hand-off is not a no-op: the same seed without the refiner gives other pixels."""
    base, _ = tiny_sdxl_pair
    request = GenerationRequest(prompt="a red circle", model=str(base), seed=3, steps=5, width=32, height=32)
    plain = cpu_manager.generate(request)
    refined = cpu_manager.generate(replace(request, refiner=0.3))
    # More than the one level two runs of the same path differ by; the tiny random UNets' noise predictions are
    # close, so the pictures differ by a few levels.
    assert np.abs(_pixels(plain.images[0]) - _pixels(refined.images[0])).max() > 3
    assert plain.timings.refiner_steps == 0 and "refiner_model" not in plain.settings()


def test_step_caching_counts_the_base_and_refiner_model_calls(tiny_sdxl_pair, cpu_manager):
    """Each part of the schedule is cached on its own: 12 base steps run the UNet 9 times (3, every other of the
    middle 7, 2), 8 refiner steps 7 times (3, 2 of the middle 3, 2); the result counts both."""
    from pipelines.families.sdxl import FAST_CACHE

    base, _ = tiny_sdxl_pair
    request = GenerationRequest(prompt="a red circle", model=str(base), seed=3, steps=20, width=32, height=32,
                                refiner=0.6, cache="fast")
    result = cpu_manager.generate(request)
    assert (len(result.timings.steps_ms), result.timings.refiner_steps) == (20, 8)
    assert result.timings.model_calls == FAST_CACHE.calls(12) + FAST_CACHE.calls(8) == 9 + 7


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp8", "fp4"])
def test_every_precision_runs_with_the_refiner(precision, tiny_sdxl_pair, cpu_manager):
    base, _ = tiny_sdxl_pair
    result = cpu_manager.generate(GenerationRequest(prompt="a red circle", model=str(base), precision=precision,
                                                    seed=3, steps=4, width=32, height=32, refiner=0.7))
    assert result.timings.refiner_steps >= 1 and len(result.timings.steps_ms) == 4
    assert _pixels(result.images[0]).std() > 1.0  # not a flat (black) picture
    refiner_unets = [r.key for r in cpu_manager.status().resident if r.key.model == "tiny-sdxl-refiner"
                     and r.key.name == "unet"]
    assert Precision(precision).value in {k.variant for k in refiner_unets}  # the refiner ran at the precision


def test_shared_components_load_once_and_each_model_keeps_its_own_unet(tiny_sdxl_pair):
    base, _ = tiny_sdxl_pair
    manager = PipelineManager(ManagerConfig(device="cpu"), device_info=fast_16bit_cpu())
    try:
        manager.generate(GenerationRequest(prompt="x", model=str(base), seed=1, steps=4, width=32, height=32,
                                           refiner=0.5))
        keys = [r.key for r in manager.status().resident]
        names = sorted((k.model, k.name) for k in keys)
        assert names == sorted([("tiny-sdxl-base", n) for n in ("tokenizer", "tokenizer_2", "text_encoder",
                                                                 "text_encoder_2", "scheduler", "unet", "vae")]
                               + [("tiny-sdxl-refiner", "scheduler"), ("tiny-sdxl-refiner", "unet")])
        loads = [e for e in manager.status().events if e.startswith("load ")]
        assert len(loads) == len(keys)  # nothing loaded twice
    finally:
        manager.close()


def test_a_tight_budget_evicts_the_base_unet_for_the_refiner(tiny_sdxl_pair):
    """A budget one byte short of both UNets at once: the job runs, the finished base UNet makes room."""
    base, _ = tiny_sdxl_pair
    request = GenerationRequest(prompt="x", model=str(base), seed=1, steps=4, width=32, height=32, refiner=0.5)
    probe = PipelineManager(ManagerConfig(device="cpu", min_working_bytes=0), device_info=fast_16bit_cpu())
    try:
        spec = read_local_spec(base)
        unet = probe.component_bytes(spec, "unet", Precision.BF16, Backend.TORCH)
        refiner_unet = probe.component_bytes(refiner_of(spec), "unet", Precision.BF16, Backend.TORCH)
        working = probe.working_bytes(spec, replace(request, precision=Precision.BF16))
        needs = probe.stage_needs(spec, Precision.BF16, Backend.TORCH, working, with_refiner=True)
    finally:
        probe.close()
    assert (("refiner_scheduler", "refiner_unet"), refiner_unet + working) in needs  # the refiner's own stage
    budget = unet + refiner_unet + working - 1
    assert max(need for _, need in needs) <= budget  # every stage fits alone
    manager = PipelineManager(ManagerConfig(device="cpu", memory_budget=f"{budget}B", min_working_bytes=0),
                              device_info=fast_16bit_cpu())
    try:
        result = manager.generate(request)
        assert result.timings.refiner_steps == 2
        assert any(e.startswith("evict tiny-sdxl-base/unet[bf16,torch]") for e in manager.status().events)
        assert manager.status().used_bytes + working <= budget
    finally:
        manager.close()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("switch,message", [
    (0, "refiner switch must be above 0 and below 1"), (1, "refiner switch must be above 0 and below 1"),
    (1.5, "got 1.5"), (-0.2, "got -0.2"), ("abc", "refiner switch must be a number; got 'abc'"),
    (float("nan"), "refiner switch must be a finite number"),
])
def test_switch_outside_zero_one_is_refused(switch, message, tiny_sdxl_pair, cpu_manager):
    base, _ = tiny_sdxl_pair
    with pytest.raises(RequestError, match=message):
        cpu_manager.generate(GenerationRequest(prompt="x", model=str(base), seed=1, steps=4, width=32, height=32,
                                               refiner=switch))


def test_models_without_a_refiner_say_so(tiny_flux, tiny_sdxl, cpu_manager):
    for folder in (tiny_flux, tiny_sdxl):
        with pytest.raises(RequestError, match=r"has no refiner \(the refiner finishes sdxl-base-1.0 images\); "
                                               "turn the refiner off or choose that model"):
            cpu_manager.generate(GenerationRequest(prompt="x", model=str(folder), seed=1, steps=2, width=32,
                                                   height=32, refiner=0.8))


def test_the_refiner_is_not_a_model_of_its_own(tiny_sdxl_pair, cpu_manager):
    _, refiner = tiny_sdxl_pair
    for model in (str(refiner), "sdxl-refiner-1.0"):
        with pytest.raises(RequestError, match=r"is a refiner: it finishes a base model's images and does not run "
                                               r"alone\. Choose .* and turn the refiner on \(--refiner 0\.8\)"):
            cpu_manager.generate(GenerationRequest(prompt="x", model=model, seed=1, steps=2))


def test_a_switch_that_leaves_one_model_no_step_is_refused(tiny_sdxl_pair, cpu_manager):
    base, _ = tiny_sdxl_pair
    request = GenerationRequest(prompt="x", model=str(base), seed=1, steps=10, width=32, height=32)
    with pytest.raises(RequestError, match="leaves the base model no step of its 10; raise the switch"):
        cpu_manager.generate(replace(request, refiner=0.05))  # cutoff 950: above the first timestep, 901
    with pytest.raises(RequestError, match="with 10 steps leaves the refiner no step; lower the switch"):
        cpu_manager.generate(replace(request, refiner=0.9999))  # cutoff 0: below the last timestep, 1
    assert cpu_manager.generate(replace(request, refiner=0.5)).timings.refiner_steps == 5  # still serving


def test_the_refiner_with_an_inpainting_mask_says_what_to_change(tiny_sdxl_pair, cpu_manager):
    base, _ = tiny_sdxl_pair
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    with pytest.raises(RequestError, match="The refiner does not run with an inpainting mask; clear the mask or "
                                           "turn the refiner off"):
        cpu_manager.generate(GenerationRequest(prompt="x", model=str(base), seed=1, steps=4, width=32, height=32,
                                               image=circle_on_blue(32, 32), mask=mask, refiner=0.8))


def test_a_refiner_that_does_not_fit_its_base_is_refused(tiny_sdxl_pair, tiny_sdxl, tiny_flux):
    base, _ = tiny_sdxl_pair
    spec = read_local_spec(base)
    with pytest.raises(UnknownModelError, match="is not an SDXL refiner"):
        refiner_of(replace(spec, refiner=str(tiny_sdxl)))  # a base model, not a refiner
    full = resolve_spec("sdxl-base-1.0")
    with pytest.raises(UnknownModelError, match="sdxl-refiner-1.0's text_encoder_2 differs from tiny-sdxl-base's"):
        refiner_of(replace(spec, refiner="sdxl-refiner-1.0"))  # full-size refiner, tiny base
    assert refiner_of(full).id == "sdxl-refiner-1.0"
    with pytest.raises(UnknownModelError, match="has no model_index.json"):
        refiner_of(replace(spec, refiner="no-such-folder"))


# --------------------------------------------------------------------------- registry, memory, CLI


def test_the_registry_refiner_has_the_published_architecture():
    """stabilityai/stable-diffusion-xl-refiner-1.0: a 2.26 B parameter UNet (4.52 GB in fp16 as shipped) reading
    1280-wide OpenCLIP-bigG states, 1280 pooled + 5 x 256 time features = 2560."""
    from pipelines.components import _architecture
    import json

    refiner = resolve_spec("sdxl-refiner-1.0")
    unet = refiner.components["unet"]
    params, _ = _architecture(unet.library, unet.class_name, json.dumps(dict(unet.config), sort_keys=True))
    assert 2.25e9 < params < 2.27e9
    assert "text_encoder" not in refiner.components and refiner.is_refiner
    assert "sdxl-refiner-1.0" not in known_ids()  # menus offer base models only
    assert [s.id for s in HUB_MODELS if s.refiner] == ["sdxl-base-1.0"] and REFINER_MODELS == (refiner,)
    from pipelines.families import family_of

    inputs = {t.name: t.dims for t in family_of(refiner).graph_io(refiner, "unet").inputs}
    assert inputs["encoder_hidden_states"][-1] == 1280 and inputs["text_embeds"][-1] == 1280
    assert inputs["time_ids"] == ("batch", 5)


def test_the_full_size_memory_plan_counts_the_refiner_stage():
    manager = PipelineManager(ManagerConfig(device="cpu", memory_budget="200GB"), device_info=fast_16bit_cpu())
    try:
        spec = resolve_spec("sdxl-base-1.0")
        needs = dict(manager.stage_needs(spec, Precision.BF16, Backend.TORCH, 0, with_refiner=True))
        assert 4.50e9 < needs[("refiner_scheduler", "refiner_unet")] < 4.54e9  # 2.26 B parameters in 16 bits
        assert ("refiner_scheduler", "refiner_unet") not in dict(manager.stage_needs(spec, Precision.BF16,
                                                                                    Backend.TORCH, 0))
    finally:
        manager.close()


def test_cli_refiner_records_a1111_keys(tiny_sdxl_pair, tmp_path):
    base, _ = tiny_sdxl_pair
    out = tmp_path / "refined.png"
    proc = subprocess.run([sys.executable, "-m", "pipelines", "generate", "a red circle", "--model", str(base),
                           "--refiner", "0.8", "--steps", "5", "--width", "32", "--height", "32", "--seed", "4",
                           "--device", "cpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    meta = read_png_metadata(out)
    fields = parse_infotext(meta["parameters"])
    assert fields["Refiner"] == "tiny-sdxl-refiner" and fields["Refiner switch at"] == "0.8"
    assert meta["settings"]["refiner"] == 0.8 and meta["settings"]["refiner_model"] == "tiny-sdxl-refiner"
    assert "4 base + 1 refiner" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pipelines", "generate", "x", "--model", str(base), "--refiner", "2",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: refiner switch must be above 0 and below 1")


def test_bench_measures_base_and_refiner_end_to_end(tiny_sdxl_pair, tmp_path):
    """What the lead runs on the GPU (`bench --model sdxl-base-1.0 --refiner 0.8 --random-weights`), on the tiny pair."""
    import json

    base, _ = tiny_sdxl_pair
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pipelines", "bench", "--model", str(base), "--refiner", "0.5",
                           "--steps", "4", "--width", "32", "--height", "32", "--runs", "1", "--warmup", "1",
                           "--no-baseline", "--device", "cpu", "--json-out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "base + refiner (switch at 0.5; steps counts both)" in proc.stdout
    (model,) = json.loads(out.read_text())["models"].values()  # one model benched
    row = model["rows"][0]
    assert row["steps"] == 4 and row["total_ms"] > 0 and "--refiner 0.5" in json.loads(out.read_text())["command"]


def test_a_lora_changes_the_base_unet_only(tiny_sdxl_pair, tmp_path):
    """A base model's LoRA does not fit its refiner (another architecture): it is fused into the base's UNet, and
    the refiner's loads plain, at FP8 too (where only a LoRA-ready form keeps its 16-bit base)."""
    from tiny_loras import SDXL_UNET, write_peft

    base, _ = tiny_sdxl_pair
    write_peft(tmp_path / "style.safetensors", "unet", SDXL_UNET, seed=4)
    manager = PipelineManager(ManagerConfig(device="cpu", lora_dir=tmp_path), device_info=fast_16bit_cpu())
    try:
        request = GenerationRequest(prompt="x", model=str(base), precision="fp8", seed=1, steps=4, width=32,
                                    height=32, refiner=0.5)
        plain = manager.generate(request)
        styled = manager.generate(replace(request, loras=(("style", 1.0),)))
        unets = {(r.key.model, r.key.lora) for r in manager.status().resident if r.key.name == "unet"}
    finally:
        manager.close()
    assert styled.timings.refiner_steps == 2 and dict(styled.lora_hashes)
    assert np.abs(_pixels(plain.images[0]) - _pixels(styled.images[0])).max() > 3
    assert ("tiny-sdxl-refiner", "") in unets and any(m == "tiny-sdxl-base" and lora for m, lora in unets)
