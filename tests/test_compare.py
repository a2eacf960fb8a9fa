"""The Compare logic with a tiny real Flux pipeline on the CPU: order, shared seed, figures, per-precision errors."""
import math

import pytest

from pipelines.compare import plan_precisions, reference_precision, run_comparison
from pipelines.gpu import DeviceInfo
from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.precision import Precision
from pipelines.registry import read_local_spec
from pipelines.request import GenerationRequest, RequestError
from conftest import fast_16bit_cpu

SMALL = dict(width=32, height=32, steps=1)  # one step keeps each run around a second on a shared CPU


@pytest.fixture(scope="module")
def flux_dir(tiny_flux):
    return tiny_flux


@pytest.fixture(scope="module")
def manager():
    m = PipelineManager(ManagerConfig(device="cpu"), device_info=fast_16bit_cpu())
    yield m
    m.close()


def test_plan_orders_16bit_first_and_picks_the_compute_dtype(flux_dir, tiny_sdxl):
    flux = read_local_spec(flux_dir)
    sdxl = read_local_spec(tiny_sdxl)
    assert plan_precisions(["fp4", "16-bit", "fp8", "fp4"], flux, None) == [Precision.BF16, Precision.FP8, Precision.FP4]
    # SDXL's FP8/FP4 UNet computes in fp16 on a GPU (bf16 on a CPU), so that is the reference that
    # isolates quantization
    assert reference_precision(sdxl, (9, 0)) is Precision.FP16
    assert plan_precisions(["16-bit"], sdxl, (9, 0)) == [Precision.FP16]
    assert reference_precision(sdxl, None) is Precision.BF16
    # a GPU without bf16 computes Flux in fp16
    assert reference_precision(flux, (7, 5)) is Precision.FP16
    with pytest.raises(ValueError, match="at least one precision"):
        plan_precisions([], flux, None)


def test_each_precision_runs_with_one_seed_and_is_measured_against_16bit(manager, flux_dir):
    seen_precisions = []
    req = GenerationRequest("a red circle", str(flux_dir), seed=None, **SMALL)  # random seed, chosen once
    comparison = run_comparison(manager, req, ["16-bit", "fp8", "fp4"],
                                on_progress=lambda p, i, n, prog: seen_precisions.append((p, i, n)))
    assert [e.precision for e in comparison.entries] == [Precision.BF16, Precision.FP8, Precision.FP4]
    assert comparison.reference is Precision.BF16 and comparison.note is None
    seeds = {e.result.request.seed for e in comparison.entries}
    assert seeds == {comparison.request.seed}
    assert {(p, i) for p, i, _ in seen_precisions} >= {(Precision.BF16, 0), (Precision.FP8, 1), (Precision.FP4, 2)}

    ref, fp8, fp4 = comparison.entries
    assert ref.is_reference and ref.psnr_db is None and ref.heatmap is None
    for entry in comparison.entries:
        assert entry.error is None
        assert entry.image.size == (32, 32)
        assert entry.latency_ms > 0
        assert entry.peak_memory_bytes is None  # a CPU has no peak-memory counter
    assert fp4.runs_as == "FP4 weights, 16-bit compute"
    for entry in (fp8, fp4):
        assert entry.psnr_db > 0 and -1 <= entry.ssim <= 1 and entry.max_difference >= 0
        assert entry.heatmap.size == (32, 32)
    # 4-bit weights change the picture measurably (no ordering against FP8 is asserted: on tiny random
    # models both differences are a few levels and either may be larger)
    assert fp4.max_difference > 0
    data = comparison.to_dict()
    assert [e["precision"] for e in data["entries"]] == ["bf16", "fp8", "fp4"]
    assert data["entries"][2]["runs_as"] == "FP4 weights, 16-bit compute"
    assert math.isfinite(data["entries"][2]["psnr_db"]) and data["seed"] == comparison.request.seed


def test_a_column_that_reused_the_prompt_counts_its_encoding_in_its_latency(manager, flux_dir):
    # The columns share 16-bit text encoders: with the prompt cache the first column encodes and the others reuse.
    req = GenerationRequest("a green square at the bottom", str(flux_dir), seed=4, **SMALL)
    ref, fp8 = run_comparison(manager, req, ["16-bit", "fp8"]).entries
    encoding = ref.result.timings.text_encoders_ms
    assert encoding > 0 and fp8.result.timings.prompt_reused
    assert ref.latency_ms == ref.result.timings.total_ms
    assert fp8.latency_ms == fp8.result.timings.total_ms + encoding


def test_without_16bit_there_is_a_note_instead_of_metrics(manager, flux_dir):
    comparison = run_comparison(manager, GenerationRequest("a red circle", str(flux_dir), seed=7, **SMALL), ["fp4"])
    (entry,) = comparison.entries
    assert entry.image is not None and entry.psnr_db is None and entry.heatmap is None
    assert comparison.reference is None and "16-bit" in comparison.note


def test_bad_input_fails_once_before_any_run(manager, flux_dir):
    before = manager.status().resident
    with pytest.raises(RequestError, match="multiple of 16"):
        run_comparison(manager, GenerationRequest("x", str(flux_dir), width=40, height=32, steps=1), ["16-bit", "fp4"])
    assert manager.status().resident == before


def test_a_precision_this_gpu_lacks_fails_in_its_own_column(flux_dir):
    # A GPU of compute capability 8.0 cannot exist here; a DeviceInfo saying so (while tensors stay on
    # the CPU) makes the manager apply that GPU's precision rules. The torch backend, because a GPU that
    # claims a compute capability would otherwise be offered TensorRT, which needs a real one.
    ampere = DeviceInfo("cpu", "Fake A100", (8, 0), 8 * 2**30, 8 * 2**30, unified=False)
    m = PipelineManager(ManagerConfig(device="cpu", backend="torch"), device_info=ampere)
    try:
        comparison = run_comparison(m, GenerationRequest("a red circle", str(flux_dir), seed=3, **SMALL),
                                    ["16-bit", "fp8", "fp4"])
    finally:
        m.close()
    ref, fp8, fp4 = comparison.entries
    assert fp8.result is None and "compute capability 8.9" in fp8.error
    assert ref.error is None and fp4.error is None
    assert fp4.runs_as == "FP4 weights, 16-bit compute" and fp4.ssim is not None


def test_the_cached_column_is_16bit_with_step_caching_measured_against_uncached_16bit(manager, flux_dir):
    req = GenerationRequest("a red circle", str(flux_dir), seed=4, **{**SMALL, "steps": 9})
    comparison = run_comparison(manager, req, ["16-bit", "cached"])
    ref, cached = comparison.entries
    assert not ref.cached and ref.is_reference and ref.result.request.cache == "off"
    assert cached.cached and not cached.is_reference and cached.precision is ref.precision
    assert cached.result.request.cache == "fast" and cached.column == "cached" and ref.column == "bf16"
    assert comparison.entry("cached") is cached and comparison.entry(ref.precision) is ref
    assert 0 < cached.psnr_db < math.inf and cached.ssim < 1 and cached.heatmap is not None
    assert [e["cached"] for e in comparison.to_dict()["entries"]] == [False, True]


def test_cached_alone_has_a_note_and_nothing_selected_lists_cached(manager, flux_dir):
    req = GenerationRequest("a red circle", str(flux_dir), seed=4, **{**SMALL, "steps": 9})
    comparison = run_comparison(manager, req, ["cached"])
    (entry,) = comparison.entries
    assert entry.cached and entry.image is not None and entry.psnr_db is None and "16-bit" in comparison.note
    with pytest.raises(ValueError, match="cached"):
        run_comparison(manager, req, [])
