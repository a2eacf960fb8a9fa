"""FP8 attention (pipelines/fp8_attention.py, pipelines/families/flux_attention.py): the arithmetic, checked on a
CPU against exact attention through the kernel's emulation; the FLUX.1 processor against diffusers' own; and when
the backend turns the lever on, and how it says so. cuDNN's kernel itself runs on a GPU only
(scripts/gpu_fp8_attention.py and `python -m pipelines bench ... --fp8-attention` measure it there)."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from pipelines.backends.contract import TorchOptions
from pipelines.backends.torch_backend import TorchBackend
from pipelines.families import family_of
from pipelines.families.flux_attention import Fp8FluxAttnProcessor, use_fp8_attention
from pipelines.fp8_attention import (FP8_MAX, emulate_sdpa_fp8, fp8_attention, fp8_attention_problem,
                                     quantize_per_tensor)
from pipelines.loading import load_component
from pipelines.registry import read_local_spec


def exact_attention(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


EMULATED = functools.partial(fp8_attention, sdpa_fp8=emulate_sdpa_fp8)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def qkv(seed: int, tokens: int = 200, heads: int = 3, dim: int = 64, gain: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, heads, dim, generator=g) for _ in range(3))
    return q * gain, k * gain, v


@pytest.mark.parametrize("amax", [1e-3, 1.0, 3.7, 900.0])
def test_per_tensor_quantization_uses_the_fp8_range_with_an_exact_power_of_two_scale(amax):
    x = torch.linspace(-amax, amax, 1001)
    values, descale = quantize_per_tensor(x)
    assert values.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert math.log2(descale.item()).is_integer()
    top = values.float().abs().max().item()
    assert FP8_MAX / 2 <= top <= FP8_MAX  # the largest value lands in the top binade: no range wasted, none clipped
    assert torch.allclose(values.float() * descale.reshape(()), x, rtol=2 ** -4, atol=descale.item() * 2 ** -9)


def test_an_all_zero_input_quantizes_to_zeros_not_nan():
    values, descale = quantize_per_tensor(torch.zeros(4, 8))
    assert torch.isfinite(descale).all() and (values.float() == 0).all()


@pytest.mark.parametrize("gain,bound", [(1.0, 0.08), (4.0, 0.2)])
def test_emulated_fp8_attention_is_close_to_exact_attention(gain, bound):
    q, k, v = qkv(0, gain=gain)
    want = exact_attention(q, k, v)
    got = EMULATED(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    error = relative_error(got, want)
    # FP8 costs real accuracy (measured: 5.9% for unit-normal inputs, 14.7% when Q and K are 4x, mostly from Q K^T
    # in e4m3), but no more than the format's rounding: a scale or layout mistake gives errors near 100%.
    assert 0.005 < error < bound
    assert relative_error(exact_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()), want) < error / 5


def test_fp8_attention_handles_the_kernels_softmax_and_output_scales():
    """Large V and a concentrated softmax: the output scale must follow V and P's 256 must not overflow."""
    q, k, v = qkv(1, gain=6.0)
    v = v * 1000
    got = EMULATED(q, k, v)
    assert torch.isfinite(got).all() and relative_error(got, exact_attention(q, k, v)) < 0.3


def test_the_kernel_emulation_quantizes_p_before_normalizing_as_flash_kernels_do():
    """With one dominant key, P's largest entry is exactly 1 before normalization, so it survives FP8 exactly."""
    q = torch.zeros(1, 2, 1, 16)
    k = torch.zeros(1, 50, 1, 16)
    k[0, 0, 0, 0] = 40.0
    q[..., 0] = 1.0
    v = torch.randn(1, 50, 1, 16, generator=torch.Generator().manual_seed(2))
    got = EMULATED(q, k, v)
    assert torch.allclose(got, v[:, :1].expand_as(got), rtol=0.07, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_transformer(tiny_flux):
    spec = read_local_spec(tiny_flux)
    return spec, load_component(spec, "transformer", dtype=torch.float32, device="cpu")


def transformer_inputs(spec, seed: int = 0) -> dict:
    cfg = spec.components["transformer"].config
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 8
    return dict(hidden_states=torch.randn(1, tokens, cfg["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.rand(tokens, 3, generator=g) * 8,
                txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5]) if cfg.get("guidance_embeds") else None)


def processors(model) -> list:
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


def test_the_fp8_processor_with_exact_attention_matches_diffusers_processor(tiny_transformer):
    """The processor is diffusers' with the attention call swapped: with an exact kernel the whole transformer
    must give diffusers' output bit for bit, in both the double- and single-stream blocks."""
    spec, model = tiny_transformer
    inputs = transformer_inputs(spec)
    with torch.inference_mode():
        want = model(**inputs).sample
        try:
            changed = use_fp8_attention(model, exact_attention)
            kinds = {type(p) for p in processors(model)}
            got = model(**inputs).sample
            blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
        finally:
            for m in model.modules():
                if isinstance(getattr(m, "processor", None), Fp8FluxAttnProcessor):
                    m.set_processor(FluxAttnProcessor())
    assert changed == blocks > 0 and kinds == {Fp8FluxAttnProcessor}
    assert torch.equal(got, want)


def test_the_fp8_processor_changes_the_output_by_fp8s_rounding_only(tiny_transformer):
    spec, model = tiny_transformer
    inputs = transformer_inputs(spec, seed=1)
    with torch.inference_mode():
        want = model(**inputs).sample
        try:
            use_fp8_attention(model, EMULATED)
            got = model(**inputs).sample
        finally:
            for m in model.modules():
                if isinstance(getattr(m, "processor", None), Fp8FluxAttnProcessor):
                    m.set_processor(FluxAttnProcessor())
        assert torch.equal(model(**inputs).sample, want)  # and the swap back restores diffusers' output
    assert 0 < relative_error(got, want) < 0.1


def test_other_processors_are_left_alone(tiny_transformer):
    _, model = tiny_transformer
    attention = next(m for m in model.modules() if hasattr(m, "processor"))
    custom = type("OtherProcessor", (FluxAttnProcessor,), {})()
    attention.set_processor(custom)
    try:
        changed = use_fp8_attention(model, exact_attention)
        assert attention.processor is custom
        assert changed == len(processors(model)) - 1
    finally:
        for m in model.modules():
            if hasattr(m, "processor"):
                m.set_processor(FluxAttnProcessor())


def test_flux_and_kontext_have_fp8_attention_and_sdxl_does_not(specs, tiny_kontext):
    assert family_of(specs["flux"]).fp8_attention is use_fp8_attention
    assert family_of(read_local_spec(tiny_kontext)).fp8_attention is use_fp8_attention
    assert family_of(specs["sdxl"]).fp8_attention is None


def test_the_backend_says_why_fp8_attention_is_not_used(specs):
    on = TorchBackend(TorchOptions(fp8_attention=True))
    assert TorchBackend().fp8_attention_problem(specs["flux"], "fp8", "cuda") == "off (--fp8-attention turns it on)"
    assert on.fp8_attention_problem(specs["flux"], "bf16", "cuda") == "FLUX.1 at FP8 only"
    assert on.fp8_attention_problem(specs["flux"], "fp4", "cuda") == "FLUX.1 at FP8 only"
    assert on.fp8_attention_problem(specs["sdxl"], "fp8", "cuda") == "FLUX.1 at FP8 only"
    assert on.fp8_attention_problem(specs["flux"], "fp8", "cpu") is None  # the emulation
    assert fp8_attention_problem("meta") == "not on meta: cuDNN's kernel needs an NVIDIA GPU"


def test_a_loaded_denoiser_gets_the_fp8_processors_and_a_label(specs):
    from pipelines.device_policy import DevicePolicy
    from pipelines.gpu import probe_device
    from pipelines.loading import WeightSource

    policy = DevicePolicy.for_info(probe_device("cpu"))
    spec = specs["flux"]
    loaded = TorchBackend(TorchOptions(compile=False, fp8_attention=True)).load(
        spec, "transformer", "fp8", "cpu", policy, WeightSource())
    assert loaded.runs_as.endswith(" + FP8 attention (CPU emulation)")
    assert {type(p) for p in processors(loaded.obj)} == {Fp8FluxAttnProcessor}
    plain = TorchBackend(TorchOptions(compile=False)).load(spec, "transformer", "fp8", "cpu", policy, WeightSource())
    assert "FP8 attention" not in plain.runs_as and {type(p) for p in processors(plain.obj)} == {FluxAttnProcessor}


def test_the_kernel_op_traces_with_fake_tensors():
    """torch.compile traces the cuDNN call through its fake implementation (shape and FP8 dtype, no kernel)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q8 = torch.empty(1, 4608, 24, 128, dtype=torch.float8_e4m3fn)
        one = torch.empty(1, 1, 1, 1)
        out = torch.ops.prism.sdpa_fp8(q8, q8, q8, one, one, one, 0.088)
    assert out.shape == q8.shape and out.dtype == torch.float8_e4m3fn


def test_the_flag_turns_the_lever_on():
    from pipelines.cli import build_parser
    from pipelines.config import manager_config

    args = build_parser().parse_args(["generate", "a fox", "--fp8-attention"])
    assert manager_config(args).torch.fp8_attention
    assert not manager_config(build_parser().parse_args(["generate", "a fox"])).torch.fp8_attention


def test_the_op_runs_the_emulation_on_a_cpu():
    q, k, v = qkv(3)
    parts = [quantize_per_tensor(t) for t in (q, k, v)]
    args = [p[0] for p in parts] + [p[1] for p in parts] + [0.125]
    assert torch.equal(torch.ops.prism.sdpa_fp8(*args), emulate_sdpa_fp8(*args))


def test_an_fp8_image_with_fp8_attention_says_so_and_stays_close(tiny_flux):
    """Through the manager, as the app runs it: the label names the lever and the image moves by FP8's rounding
    (64 dB on the tiny model, 2026-12-07), not more."""
    from pipelines.imagemetrics import psnr
    from pipelines.manager import ManagerConfig, PipelineManager
    from pipelines.request import GenerationRequest

    request = GenerationRequest(prompt="a red circle", model=str(tiny_flux), precision="fp8", seed=3, steps=4,
                                width=64, height=64)
    results = {}
    for on in (False, True):
        manager = PipelineManager(ManagerConfig(device="cpu", torch=TorchOptions(compile=False, fp8_attention=on)))
        try:
            results[on] = manager.generate(request)
        finally:
            manager.close()
    assert results[True].runs_as == results[False].runs_as + " + FP8 attention (CPU emulation)"
    assert 30 < psnr(results[False].images[0], results[True].images[0]) < float("inf")
