"""SDXL's fused attention projections (pipelines/families/sdxl_attention.py): the same output, no memory spent
twice, LoRAs still landing in the weights the model runs, and where the backend turns it on."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

from pipelines.backends.contract import TorchOptions
from pipelines.backends.torch_backend import TorchBackend, lever_states
from pipelines.backends.torch_lora import LoraState
from pipelines.device_policy import DevicePolicy
from pipelines.families import family_of
from pipelines.families.sdxl_attention import fuse_qkv_projections
from pipelines.gpu import probe_device
from pipelines.loading import WeightSource, load_component
from pipelines.lora import LowRank
from pipelines.precision import Precision
from pipelines.quant import Fp8Linear, module_bytes, quantize_linears

LEVER = "fused QKV projections (SDXL at 16 bits)"


def unet_and_inputs(spec, seed: int = 0):
    unet = load_component(spec, "unet", dtype=torch.float32, device="cpu").eval()
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    extra = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    inputs = dict(sample=torch.randn(2, cfg.in_channels, 8, 8, generator=g), timestep=torch.tensor(500.0),
                  encoder_hidden_states=torch.randn(2, 7, cfg.cross_attention_dim, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(2, extra, generator=g),
                                     "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})
    return unet, inputs


def run(unet, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return unet(**inputs).sample


def test_fusing_keeps_the_output_and_the_memory(sdxl):
    unet, inputs = unet_and_inputs(sdxl)
    want, bytes_before = run(unet, inputs), module_bytes(unet)
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    assert fuse_qkv_projections(unet) == len(attention) > 0
    assert {type(p) for p in unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    torch.testing.assert_close(run(unet, inputs), want, rtol=1e-5, atol=1e-6)
    assert module_bytes(unet) == bytes_before  # the separate projections are views, not copies
    for m in attention:
        whole = m.to_kv if m.is_cross_attention else m.to_qkv
        parts = (m.to_k, m.to_v) if m.is_cross_attention else (m.to_q, m.to_k, m.to_v)
        assert all(p.weight.untyped_storage().data_ptr() == whole.weight.untyped_storage().data_ptr() for p in parts)
        torch.testing.assert_close(torch.cat([p.weight for p in parts]), whole.weight, rtol=0, atol=0)


def test_fp8_projections_fuse_into_one_fp8_gemm_with_the_same_output_and_memory(sdxl):
    unet, inputs = unet_and_inputs(sdxl)
    assert quantize_linears(unet, Precision.FP8, family_of(sdxl).keep_16bit, torch.float32).quantized > 0
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    assert all(isinstance(p, Fp8Linear) for m in attention for p in (m.to_q, m.to_k, m.to_v))
    want, bytes_before = run(unet, inputs), module_bytes(unet)
    assert fuse_qkv_projections(unet) == len(attention) > 0
    assert {type(p) for p in unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    # per-channel weight scales and one shared per-row input quantization: only the matmul's blocking differs
    torch.testing.assert_close(run(unet, inputs), want, rtol=1e-5, atol=1e-5)
    assert module_bytes(unet) == bytes_before
    for m in attention:
        whole = m.to_kv if m.is_cross_attention else m.to_qkv
        parts = (m.to_k, m.to_v) if m.is_cross_attention else (m.to_q, m.to_k, m.to_v)
        assert isinstance(whole, Fp8Linear) and whole.out_features == sum(p.out_features for p in parts)
        assert all(p.weight_fp8.untyped_storage().data_ptr() == whole.weight_fp8.untyped_storage().data_ptr() for p in parts)
        torch.testing.assert_close(torch.cat([p.weight_scale for p in parts], dim=1), whole.weight_scale, rtol=0, atol=0)


def test_a_lora_on_fused_fp8_projections_reaches_the_fused_gemm(sdxl):
    """torch_lora re-quantizes an FP8 layer in place (its buffers keep their addresses), so a LoRA written into
    to_k lands in the fused FP8 weight: the same output as the unfused FP8 model with the same LoRA."""
    results = {}
    for fused in (False, True):
        unet, inputs = unet_and_inputs(sdxl)
        state = LoraState(unet)
        quantize_linears(unet, Precision.FP8, family_of(sdxl).keep_16bit, torch.float32, bases=state.base)
        if fused:
            assert fuse_qkv_projections(unet) > 0
        path = next(f"{n}.to_k" for n, m in unet.named_modules() if isinstance(m, Attention) and not m.is_cross_attention)
        out_features, in_features = unet.get_submodule(path).out_features, unet.get_submodule(path).in_features
        g = torch.Generator().manual_seed(6)
        lora = LowRank(down=torch.randn(4, in_features, generator=g), up=torch.randn(out_features, 4, generator=g), alpha=None)
        before = run(unet, inputs)
        state.apply({path: [(lora, 0.5)]}, ("test",), "test")
        results[fused] = run(unet, inputs)
        assert (results[fused] - before).abs().max() > 1e-3  # the LoRA changed what the model computes
        state.apply({}, (), "none")
        assert torch.equal(run(unet, inputs), before)
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp4", "fp8 calibrated"])
def test_projections_that_cannot_fuse_leave_the_model_as_it_was(sdxl, precision):
    unet, inputs = unet_and_inputs(sdxl)
    quantize_linears(unet, Precision.parse(precision.split()[0]), family_of(sdxl).keep_16bit, torch.float32)
    if precision == "fp8 calibrated":
        next(m for m in unet.modules() if isinstance(m, Attention)).to_k.set_input_amax(3.0)  # one layer is enough
    want, processors = run(unet, inputs), {type(p) for p in unet.attn_processors.values()}
    assert fuse_qkv_projections(unet) == 0
    assert {type(p) for p in unet.attn_processors.values()} == processors == {AttnProcessor2_0}
    assert not any(getattr(m, "fused_projections", False) for m in unet.modules())
    assert torch.equal(run(unet, inputs), want)


def test_a_lora_fused_into_the_separate_projections_reaches_the_fused_model(sdxl):
    """LoRAs are written into to_q / to_k / to_v by name (torch_lora); after fusing, the model runs to_qkv / to_kv,
    so the write must land there: same output as the unfused model with the same LoRA, and back after unfusing."""
    plain, inputs = unet_and_inputs(sdxl)
    fused, _ = unet_and_inputs(sdxl)
    fuse_qkv_projections(fused)
    self_attention = next(n for n, m in plain.named_modules() if isinstance(m, Attention) and not m.is_cross_attention)
    cross_attention = next(n for n, m in plain.named_modules() if isinstance(m, Attention) and m.is_cross_attention)
    g = torch.Generator().manual_seed(5)
    layers = {}
    for path in (f"{self_attention}.to_k", f"{cross_attention}.to_v"):
        out_features, in_features = plain.get_submodule(path).weight.shape
        layers[path] = [(LowRank(down=torch.randn(4, in_features, generator=g), up=torch.randn(out_features, 4, generator=g),
                                 alpha=None), 0.5)]
    before = run(fused, inputs)
    results = {}
    for name, unet in (("plain", plain), ("fused", fused)):
        state = LoraState(unet)
        state.apply(layers, ("test",), "test")
        results[name] = run(unet, inputs)
        state.apply({}, (), "none")
        results[name + " unfused"] = run(unet, inputs)
    assert (results["fused"] - before).abs().max() > 1e-3  # the LoRA changed what the fused model computes
    torch.testing.assert_close(results["fused"], results["plain"], rtol=1e-5, atol=1e-5)
    assert torch.equal(results["fused unfused"], before)


def policy():
    return DevicePolicy.for_info(probe_device("cpu"))


def test_the_backend_fuses_sdxl_at_16_bits_only_and_on_a_cpu_only_when_asked(specs):
    sdxl, flux = specs["sdxl"], specs["flux"]
    asked = TorchBackend(TorchOptions(compile=False, fused_qkv=True))
    loaded = asked.load(sdxl, "unet", "bf16", "cpu", policy(), WeightSource())
    assert {type(p) for p in loaded.obj.unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    default = TorchBackend(TorchOptions(compile=False)).load(sdxl, "unet", "bf16", "cpu", policy(), WeightSource())
    assert {type(p) for p in default.obj.unet.attn_processors.values()} == {AttnProcessor2_0}  # not measured on CPUs
    fp8 = asked.load(sdxl, "unet", "fp8", "cpu", policy(), WeightSource())
    assert not any(getattr(m, "fused_projections", False) for m in fp8.obj.unet.modules())
    assert TorchBackend().fuses_qkv(sdxl, "cuda:0") and not TorchBackend().fuses_qkv(sdxl, "cpu")
    assert not TorchBackend(TorchOptions(fused_qkv=False)).fuses_qkv(sdxl, "cuda")
    assert not asked.fuses_qkv(flux, "cuda") and family_of(flux).fuse_qkv is None


@pytest.mark.parametrize("options,cuda,state", [
    (TorchOptions(), True, "on"),
    (TorchOptions(fused_qkv=False), True, "off (--no-fused-qkv)"),
    (TorchOptions(), False, "off (measured on GPUs only)"),
    (TorchOptions(fused_qkv=True), False, "on"),
])
def test_the_lever_says_what_acts_here(options, cuda, state):
    assert lever_states(options, cuda)[LEVER] == state


def test_the_flag_turns_it_off():
    from pipelines.cli import build_parser
    from pipelines.config import manager_config

    assert manager_config(build_parser().parse_args(["generate", "a fox", "--no-fused-qkv"])).torch.fused_qkv is False
    assert manager_config(build_parser().parse_args(["generate", "a fox"])).torch.fused_qkv is None


@pytest.mark.parametrize("argv", [["--no-fused-qkv=yes"], ["--fp8-attention=1"], ["--compile-vae=on"]])
def test_the_switches_take_no_value_and_say_so(argv, capsys):
    from pipelines.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["generate", "a fox", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "ignored explicit argument" in err and "Traceback" not in err
