"""Step caching ("Fast (cached)"): the schedule, the request field, and what it does to real tiny models on CPU."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines import imagemetrics
from pipelines.registry import read_local_spec
from pipelines.request import GenerationRequest, RequestError, resolve_request
from pipelines.families.flux import FAST_CACHE as FLUX_FAST
from pipelines.families.sdxl import FAST_CACHE as SDXL_FAST
from pipelines.step_cache import NO_CACHE, StepCache, check_name

STEPS = 10  # long enough for the fast schedule to skip steps (it starts at 8)


def test_fast_schedules_run_the_first_and_last_steps_and_some_between():
    ran = [i for i in range(30) if SDXL_FAST.computes(i, 30)]  # SDXL: every other step between
    assert ran[:3] == [0, 1, 2] and ran[-2:] == [28, 29] and ran[3:-2] == list(range(3, 28, 2))
    assert SDXL_FAST.calls(30) == len(ran) == 18 and not SDXL_FAST.extrapolate
    ran = [i for i in range(28) if FLUX_FAST.computes(i, 28)]  # Flux: one step in four between, extrapolated
    assert ran == [0, 1, 2, 3, 7, 11, 15, 19, 23, 26, 27] and FLUX_FAST.calls(28) == 11 and FLUX_FAST.extrapolate
    assert NO_CACHE.calls(28) == 28
    assert "28 steps run it 11 times" in FLUX_FAST.describe(28) and "extend its last two" in FLUX_FAST.describe(28)
    assert "30 steps run it 18 times" in SDXL_FAST.describe(30) and "reuse its last output" in SDXL_FAST.describe(30)


def test_short_schedules_are_not_cached_and_say_so():
    for fast in (FLUX_FAST, SDXL_FAST):
        assert fast.calls(4) == 4 and "8 steps" in fast.note(4) and "4 steps all run it" in fast.describe(4)
        assert fast.note(28) is None
    assert NO_CACHE.note(4) is None


@pytest.mark.parametrize("given, expected", [("off", "off"), ("FAST", "fast"), (" fast ", "fast"), ("", "off"),
                                             (None, "off"), (True, "fast"), (False, "off")])
def test_cache_names_are_normalised(given, expected):
    assert check_name(given) == expected
    assert StepCache.named(given, FLUX_FAST) == (FLUX_FAST if expected == "fast" else NO_CACHE)


@pytest.mark.parametrize("bad", ["turbo", "on", 3, 1.5])
def test_an_unknown_cache_is_one_line_listing_the_choices(bad, tiny_flux):
    with pytest.raises(RequestError) as exc:
        resolve_request(GenerationRequest("a fox", str(tiny_flux), cache=bad), read_local_spec(tiny_flux), None)
    message = str(exc.value)
    assert "off, fast" in message and "\n" not in message and "Traceback" not in message


def _count_calls(manager, model, name):
    spec_id = read_local_spec(model).id
    key = next(k for k in manager.residency.entries if k.name == name and k.model == spec_id)
    module = manager.residency.entries[key].component.obj
    calls = []
    handle = module.register_forward_pre_hook(lambda *a, **k: calls.append(1), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("family, denoiser", [("flux", "transformer"), ("sdxl", "unet")])
def test_cached_output_is_close_to_uncached_with_fewer_model_calls(family, denoiser, request, cpu_manager):
    model = request.getfixturevalue(f"tiny_{family}")
    base = GenerationRequest("a small red circle", str(model), seed=5, steps=STEPS, width=32, height=32,
                             guidance=3.0 if family == "flux" else 5.0)
    plain = cpu_manager.generate(base)
    calls, handle = _count_calls(cpu_manager, model, denoiser)
    try:
        again = cpu_manager.generate(base)
        uncached_calls = len(calls)
        calls.clear()
        cached = cpu_manager.generate(GenerationRequest(**{**base.to_dict(), "cache": "fast"}))
    finally:
        handle.remove()
    fast = FLUX_FAST if family == "flux" else SDXL_FAST
    assert uncached_calls == STEPS and len(calls) == fast.calls(STEPS) == (7 if family == "flux" else 8)
    # the result says how many of its steps ran the model, and the timing line too
    assert cached.timings.model_calls == len(calls) and plain.timings.model_calls == STEPS
    assert f"{STEPS} steps ({len(calls)} ran the model)" in cached.timings.summary()
    assert "ran the model" not in plain.timings.summary()
    # off is today's path: bit-identical run to run
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(again.images[0]))
    difference = imagemetrics.psnr(plain.images[0], cached.images[0])
    assert 15 < difference < float("inf")  # it changes the picture, by a bounded amount
    assert cached.request.cache == "fast" and cached.settings()["cache"] == "fast"
    assert plain.settings()["cache"] == "off"


def test_the_png_records_step_caching_and_an_uncached_png_does_not_mention_it():
    from PIL import Image

    from pipelines.pngmeta import png_bytes, read_png_metadata

    image = Image.new("RGB", (16, 16))
    settings = {"prompt": "a fox", "steps": 28, "width": 16, "height": 16, "model": "demo-flux"}
    cached = read_png_metadata(png_bytes(image, {**settings, "cache": "fast"}, 1))
    plain = read_png_metadata(png_bytes(image, {**settings, "cache": "off"}, 1))
    assert cached["settings"]["cache"] == "fast" and "Step cache: fast" in cached["parameters"]
    assert plain["settings"]["cache"] == "off" and "Step cache" not in plain["parameters"]


@pytest.mark.parametrize("extrapolate", [False, True])
def test_skipped_steps_reuse_the_last_output_or_extend_the_last_two(extrapolate):
    """An output that changes linearly with time: holding gives the last computed value on a skipped step;
    extrapolating gives the line through the last two, exactly."""
    import torch

    from pipelines.step_cache import StepOutputs

    cache = StepCache("test", warmup=2, final=1, every=3, min_steps=4, extrapolate=extrapolate)
    steps, computed = 9, []
    times = torch.linspace(1.0, 0.1, steps)
    outputs = StepOutputs(cache, steps)

    def line(t):
        computed.append(float(t))
        return torch.full((2, 3), 5.0) + 4.0 * t

    got = [outputs.at(i, t, lambda: line(t)) for i, t in enumerate(times)]
    ran = [i for i in range(steps) if cache.computes(i, steps)]
    assert ran == [0, 1, 2, 5, 8] and len(computed) == len(ran)
    for i, t in enumerate(times):
        if i in ran or extrapolate:
            assert torch.allclose(got[i], line(t), atol=1e-5), i
        else:
            last = max(j for j in ran if j < i)
            assert torch.equal(got[i], got[last]), i


def test_extrapolation_waits_for_two_computed_outputs():
    import torch

    from pipelines.step_cache import StepOutputs

    outputs = StepOutputs(StepCache("test", warmup=0, final=0, every=2, extrapolate=True), 4)
    first = outputs.at(0, torch.tensor(1.0), lambda: torch.ones(2))
    assert torch.equal(outputs.at(1, torch.tensor(0.5), lambda: torch.zeros(2)), first)  # one point: held
