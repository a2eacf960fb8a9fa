"""The embedded demo models: shipped, small, loaded like any checkpoint, and drawing what the caption says."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.demo.scenes import held_out_captions, sample_scene
from pipelines.demo.scorer import adherence
from pipelines.loading import HubOptions, default_model
from pipelines.registry import DEMO_MODELS_DIR, Family, resolve_spec
from pipelines.request import GenerationRequest

# Measured on this suite's CPU torch (2026-11-26) for held-out captions 0-9 at seeds 0-9, bf16: see
# BENCHMARKS.md for the 200-caption figures. The bounds sit a little below the measurement.
FIXED_CAPTIONS = held_out_captions(10)
# Both measured 0.983 mean share of attributes right and 9 of 10 captions entirely right.
EXPECTED = {"demo-flux": 0.93, "demo-sdxl": 0.93}
EXPECTED_ALL_CORRECT = 0.8  # every attribute right: stricter than the 80% bar on the mean share


def test_demo_models_ship_within_the_size_budget():
    files = [p for p in DEMO_MODELS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 1024 * 1024  # all demo models together
    kontext = [p for p in (DEMO_MODELS_DIR / "demo-kontext").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in kontext) <= 15 * 1024 * 1024
    for name, component in (("demo-flux", "transformer"), ("demo-sdxl", "unet"), ("demo-kontext", "transformer")):
        assert (DEMO_MODELS_DIR / name / component / "diffusion_pytorch_model.safetensors").is_file()


def test_demo_kontext_makes_the_edits_its_table_claims(cpu_manager):
    """10 fixed held-out edits through the manager (what the Edit tab runs), edit i at seed i. Measured on this
    suite's CPU torch (2026-12-02, and again with the model retrained in 20 minutes on 2026-12-07): 9 of 10 right
    (the miss both times: "turn the square into a star"); the
    200-edit table in BENCHMARKS.md gives the per-kind rates. The bound sits a little below the measurement."""
    from pipelines.demo.architectures import IMAGE_SIZE
    from pipelines.demo.edits import held_out_edits
    from pipelines.demo.evaluate_edits import edit_accuracy
    from pipelines.demo.scenes import render

    edits = held_out_edits(10)
    images = [cpu_manager.generate(GenerationRequest(prompt=e.instruction, model="demo-kontext", seed=i,
                                                     image=render(e.source, IMAGE_SIZE))).images[0]
              for i, e in enumerate(edits)]
    accuracy = edit_accuracy(images, edits)
    assert accuracy["all"] >= 0.8 and accuracy["background"] == 1.0, accuracy


@pytest.mark.parametrize("model,family,denoiser", [("demo-flux", Family.FLUX, "transformer"),
                                                    ("demo-sdxl", Family.SDXL, "unet")])
def test_demo_models_load_through_the_registry_and_generate(cpu_manager, model, family, denoiser):
    spec = resolve_spec(model)
    assert (spec.family, spec.denoiser, spec.local_dir) == (family, denoiser, DEMO_MODELS_DIR / model)
    assert (spec.default_width, spec.default_height) == (64, 64)
    result = cpu_manager.generate(GenerationRequest(prompt=FIXED_CAPTIONS[0], model=model, seed=0, num_images=2))
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    assert result.model_id == model


def test_without_real_weights_the_default_is_the_demo_model_and_says_so(tmp_path):
    empty_cache = HubOptions(cache_dir=str(tmp_path))
    model, note = default_model(Family.FLUX, empty_cache)
    assert model == "demo-flux"
    assert "No Flux.1 weights found locally" in note and "flux.1-dev" in note
    model, note = default_model(Family.SDXL, empty_cache)
    assert model == "demo-sdxl" and "sdxl-base-1.0" in note


@pytest.mark.parametrize("model", ["demo-flux", "demo-sdxl"])
def test_demo_models_draw_the_caption(cpu_manager, model):
    images = [cpu_manager.generate(GenerationRequest(prompt=text, model=model, seed=i, precision="bf16")).images[0]
              for i, text in enumerate(FIXED_CAPTIONS)]
    scores = adherence(images, FIXED_CAPTIONS)
    assert scores["mean_fraction"] >= EXPECTED[model], scores
    assert scores["all_correct_rate"] >= EXPECTED_ALL_CORRECT, scores
    assert min(scores["per_attribute"].values()) >= 0.85, scores


def test_noise_does_not_pass_the_same_bar():
    """The bar above means something: random pictures score far below it."""
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in FIXED_CAPTIONS]
    assert adherence(noise, FIXED_CAPTIONS)["mean_fraction"] < 0.2


def test_training_renderer_matches_the_reference_renderer():
    from pipelines.demo.train import _scene_arrays, render_arrays, scene_arrays

    arrays = _scene_arrays(seed=3, index=7, size=24)
    rng = np.random.default_rng([3, 7])
    scenes = [sample_scene(rng) for _ in range(24)]
    expected = render_arrays({k: torch.from_numpy(v) for k, v in scene_arrays(scenes).items()}, 64)
    got = render_arrays({k: torch.from_numpy(v) for k, v in arrays.items()}, 64)
    assert torch.allclose(got, expected, atol=1e-5)
    assert arrays["ids_clip"].shape == (24, 77) and arrays["ids_t5"].shape == (24, 32)


def test_training_writes_a_pipeline_that_loads(tmp_path, cpu_manager):
    from pipelines.demo.train import TrainConfig, train

    folder = train(TrainConfig(family="flux", out_dir=tmp_path, device="cpu", batch=4, vae_steps=2,
                               denoiser_minutes=1.0, max_denoiser_steps=2, log_every=1000), log=lambda _: None)
    assert folder == tmp_path / "demo-flux" and (folder / "model_index.json").is_file()
    result = cpu_manager.generate(GenerationRequest(prompt=FIXED_CAPTIONS[1], model=str(folder), seed=0, steps=2))
    assert result.images[0].size == (64, 64)
