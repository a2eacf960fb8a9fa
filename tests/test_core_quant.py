"""FP8 / NVFP4 arithmetic: formats, error bounds, which layers are converted, and memory saved."""
from __future__ import annotations

import torch
from torch import nn

from pipelines.components import estimate_bytes
from pipelines.families import family_of
from pipelines.loading import load_component
from pipelines.precision import Precision
from pipelines import quant
from pipelines.quant import (FP4_VALUES, Fp8Linear, Nvfp4WeightOnlyLinear, gemm_output_dtype, module_bytes,
                             nvfp4_dequantize, nvfp4_quantize, quantize_linears)
from pipelines.registry import resolve_spec


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_fp8_linear_matches_a_float64_reference_of_the_same_quantization():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    q = Fp8Linear.from_linear(linear, torch.bfloat16)
    # Reference: dequantize both operands exactly and multiply in float64.
    w = q.weight_fp8.double() * q.weight_scale.double().reshape(-1, 1)
    x2 = x.reshape(-1, 64).double()
    sx = (x2.abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
    xq = (x2 / sx).clamp(-448, 448).to(torch.float8_e4m3fn).double() * sx
    ref = (xq @ w.T + linear.bias.double()).reshape(3, 5, 48)
    assert q(x).shape == (3, 5, 48)
    assert rel_err(q(x), ref) < 1e-2  # only the bf16 output rounding remains
    assert 0.005 < rel_err(q(x), linear(x)) < 0.06  # measured 0.037: real FP8 error, neither zero nor large


def test_the_fp8_gemm_writes_fp16_only_for_fp16_compute_on_a_gpu_whose_torch_writes_it(monkeypatch):
    asked = []
    monkeypatch.setattr(quant, "_rowwise_fp16_output", lambda index: asked.append(index) or True)
    assert gemm_output_dtype(torch.float16, "cuda") is torch.float16
    assert gemm_output_dtype(torch.float16, "cuda:1") is torch.float16
    assert asked == [0, 1]
    assert gemm_output_dtype(torch.bfloat16, "cuda") is torch.bfloat16  # FLUX.1: bf16 is the compute dtype
    for compute in (torch.float16, torch.bfloat16, torch.float32):
        assert gemm_output_dtype(compute, "cpu") is torch.bfloat16  # the CPU emulates the GPU's default
    assert asked == [0, 1]  # asked only where the answer matters
    monkeypatch.setattr(quant, "_rowwise_fp16_output", lambda index: False)  # an older torch: bf16 only
    assert gemm_output_dtype(torch.float16, "cuda") is torch.bfloat16


def test_fp8_linear_rounds_its_gemm_output_to_the_chosen_dtype():
    torch.manual_seed(3)
    linear = nn.Linear(256, 64, bias=False)
    x = torch.randn(32, 256)
    bf16 = Fp8Linear.from_linear(linear, torch.float32)
    assert bf16.gemm_out_dtype is torch.bfloat16  # on the CPU, as the weight's device says
    fp16 = Fp8Linear(bf16.weight_fp8, bf16.weight_scale, None, torch.float32, gemm_out_dtype=torch.float16)
    out_fp16, out_bf16 = fp16(x), bf16(x)
    assert torch.equal(out_fp16, out_fp16.to(torch.float16).float())  # every value is an fp16 value
    assert torch.equal(out_bf16, out_bf16.to(torch.bfloat16).float())
    # the same quantized operands, multiplied in float64: only the output rounding differs between the two
    w = bf16.weight_fp8.double() * bf16.weight_scale.double().reshape(-1, 1)
    sx = (x.double().abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
    exact = ((x.double() / sx).clamp(-448, 448).to(torch.float8_e4m3fn).double() * sx) @ w.T
    assert rel_err(out_fp16, exact) < 5e-4  # fp16 rounding: ~2^-12 relative
    assert 5e-4 < rel_err(out_bf16, exact) < 5e-3  # bf16 keeps 3 fewer bits


def test_nvfp4_round_trip_is_exact_for_representable_values():
    # Each block holds e2m1 values times a power of two: the quantizer must reproduce them exactly.
    values = torch.cat([FP4_VALUES, -FP4_VALUES])
    w = values[torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(1))]
    w[:, ::16] = 6.0  # every block reaches the e2m1 maximum, so its scale is exactly 1
    q = nvfp4_quantize(w)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (8, 32)
    assert q.block_scale.dtype == torch.float8_e4m3fn and q.block_scale.shape == (8, 4)
    assert torch.equal(nvfp4_dequantize(q, torch.float32), w)


def test_nvfp4_packs_two_codes_per_byte_low_nibble_first():
    w = torch.zeros(1, 16)
    w[0, 0], w[0, 1] = 6.0, -0.5  # codes 7 and 8|1 = 9
    q = nvfp4_quantize(w)
    assert int(q.packed[0, 0]) == 7 | (9 << 4)


def test_nvfp4_error_on_gaussian_weights_is_in_the_expected_range():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(2))
    err = rel_err(nvfp4_dequantize(nvfp4_quantize(w), torch.float32), w)
    assert 0.05 < err < 0.15  # 4-bit blocks of 16 with fp8 scales: ~0.09-0.10 on Gaussian data


def test_zero_blocks_do_not_produce_nan():
    w = torch.zeros(4, 32)
    w[0, :16] = 1.0
    out = nvfp4_dequantize(nvfp4_quantize(w), torch.float32)
    assert torch.isfinite(out).all() and torch.equal(out, w)


def test_weight_only_fp4_linear_uses_16bit_compute_and_saves_memory():
    torch.manual_seed(3)
    linear = nn.Linear(128, 64).to(torch.bfloat16)
    q = Nvfp4WeightOnlyLinear.from_linear(linear, torch.bfloat16)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, linear(x)) < 0.15
    assert module_bytes(q) < module_bytes(linear) / 3


def test_quantize_linears_keeps_the_named_layers_and_odd_shapes_in_16bit():
    model = nn.Module()
    model.x_embedder = nn.Linear(32, 32)
    model.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.Linear(32, 10))
    model = model.to(torch.bfloat16)
    report = quantize_linears(model, Precision.FP8, keep_16bit=["x_embedder"], compute_dtype=torch.bfloat16)
    assert isinstance(model.x_embedder, nn.Linear)
    assert isinstance(model.body[0], Fp8Linear) and isinstance(model.body[2], Fp8Linear)
    assert isinstance(model.body[3], nn.Linear)  # 10 outputs: not a multiple of 16
    assert report.quantized == 2 and set(report.kept) == {"x_embedder", "body.3"}
    assert report.bytes_after < report.bytes_before


def test_tiny_flux_transformer_error_against_bf16(tiny_flux):
    """Denoiser-level error of each low precision on the real (tiny) Flux architecture.

    Measured 2026-11-26 (CPU): fp8 0.0064, fp4 0.0164 relative error; the bounds leave about 3x room.
    """
    spec = resolve_spec(str(tiny_flux))
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    inputs = {k: v.to(torch.bfloat16) for k, v in inputs.items()} | {"guidance": torch.tensor([3.5])}
    base = load_component(spec, "transformer", dtype=torch.bfloat16, device="cpu")
    with torch.no_grad():
        reference = base(**inputs, return_dict=False)[0]
    errors = {}
    for precision in ("fp8", "fp4"):
        quant = load_component(spec, "transformer", dtype=torch.bfloat16, device="cpu")
        report = quantize_linears(quant, precision, ("x_embedder", "context_embedder", "time_text_embed", "norm_out",
                                                     "proj_out"), torch.bfloat16)
        assert report.quantized > 0 and "proj_out" in report.kept and "x_embedder" in report.kept
        with torch.no_grad():
            errors[precision] = rel_err(quant(**inputs, return_dict=False)[0], reference)
    assert 0.0 < errors["fp8"] < 0.02 and 0.0 < errors["fp4"] < 0.05, errors
    assert errors["fp8"] < errors["fp4"], errors


def test_memory_estimates_match_what_loading_holds(tiny_flux):
    spec = resolve_spec(str(tiny_flux))
    for precision in ("bf16", "fp8", "fp4"):
        module = load_component(spec, "transformer", dtype=torch.bfloat16, device="cpu")
        quantize_linears(module, precision, family_of(spec).keep_16bit, torch.bfloat16)
        estimate = estimate_bytes(spec, "transformer", precision)
        assert abs(estimate - module_bytes(module)) / module_bytes(module) < 0.05, precision


def test_full_size_estimates_are_the_published_sizes():
    flux = resolve_spec("flux.1-dev")
    # 11.9B parameters in bf16; FP8 roughly halves the Linear weights; FP4 roughly quarters them.
    assert 23.0e9 < estimate_bytes(flux, "transformer", "bf16") < 24.5e9
    assert 11.0e9 < estimate_bytes(flux, "transformer", "fp8") < 13.0e9
    assert 6.0e9 < estimate_bytes(flux, "transformer", "fp4") < 7.5e9
    assert 9.0e9 < estimate_bytes(flux, "text_encoder_2", "fp8") < 10.0e9  # T5-XXL encoder stays bf16
    sdxl = resolve_spec("sdxl-base-1.0")
    assert 5.0e9 < estimate_bytes(sdxl, "unet", "fp16") < 5.3e9  # 2.57B parameters


def test_component_dtypes_avoid_known_overflows():
    from pipelines.device_policy import DevicePolicy

    component_dtype = DevicePolicy().component_dtype
    sdxl, flux = resolve_spec("sdxl-base-1.0"), resolve_spec("flux.1-dev")
    assert component_dtype(sdxl, "vae", "fp16") == torch.float32  # SDXL VAE -> NaN / black images in fp16
    assert component_dtype(sdxl, "vae", "bf16") == torch.bfloat16
    assert component_dtype(sdxl, "unet", "fp8") == torch.float16  # FP8 computes in the family's 16-bit type
    assert component_dtype(flux, "transformer", "fp4") == torch.bfloat16
    assert component_dtype(flux, "text_encoder_2", "fp16") == torch.bfloat16  # T5 overflows in fp16
    assert DevicePolicy.for_target((7, 5)).component_dtype(flux, "text_encoder_2", "fp16") == torch.float32
    assert component_dtype(flux, "tokenizer", "fp8") is None


def test_device_policy_computes_as_the_device_or_the_build_target_does():
    from pipelines.device_policy import DevicePolicy

    sdxl, flux = resolve_spec("sdxl-base-1.0"), resolve_spec("flux.1-dev")
    cpu, ampere, turing = DevicePolicy.for_device(None), DevicePolicy.for_device((8, 6)), DevicePolicy.for_device((7, 5))
    assert cpu.compute_dtype(sdxl, "fp8") == torch.bfloat16  # fp16 convolutions are ~10x slower on a CPU
    assert ampere.compute_dtype(sdxl, "fp8") == torch.float16 and ampere.compute_dtype(flux, "fp8") == torch.bfloat16
    assert turing.compute_dtype(flux, "fp4") == torch.float16 and turing.reference_precision(flux) is Precision.FP16
    # An engine exported on a CPU computes as the GPU it is built for, not as the CPU.
    assert DevicePolicy.for_target(None).compute_dtype(sdxl, "fp8") == torch.float16
    assert cpu.reference_precision(sdxl) is Precision.BF16 and ampere.reference_precision(sdxl) is Precision.FP16
