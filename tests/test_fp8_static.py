"""Calibrated activation scales for the FP8 layers (pipelines/fp8_static.py), on the CPU's emulation of the same
arithmetic the GPU runs."""
from __future__ import annotations

import math

import torch
from torch import nn

from pipelines.fp8_static import clear_input_scales, fp8_layers, recording_input_amax, set_input_scales
from pipelines.precision import Precision
from pipelines.quant import Fp8Linear, quantize_linears


def two_layers_float() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))


def two_layers() -> nn.Module:
    """The same layers (same seed), FP8."""
    model = two_layers_float()
    quantize_linears(model, Precision.FP8, (), torch.float32)
    return model


def test_recording_keeps_each_layers_largest_input_over_every_call_then_stops():
    model = two_layers()
    first, second = torch.randn(4, 32), 3 * torch.randn(2, 5, 32)
    with torch.no_grad(), recording_input_amax(model) as amax:
        model(first)
        model(second)
        hidden = torch.cat([model[1](model[0](first)).flatten(), model[1](model[0](second)).flatten()])
    assert set(amax) == {"0", "2"}
    assert amax["0"] == torch.cat([first.flatten(), second.flatten()]).abs().max().item()
    assert math.isclose(amax["2"], hidden.abs().max().item(), rel_tol=1e-6)
    with torch.no_grad():
        model(100 * first)  # the hooks are gone: nothing more is recorded
    assert amax["0"] == torch.cat([first.flatten(), second.flatten()]).abs().max().item()


def test_calibrated_scales_stay_close_to_16_bit_and_clearing_restores_per_row_scales():
    model = two_layers()
    reference = two_layers_float()
    x = torch.randn(8, 32)
    with torch.no_grad():
        dynamic = model(x)
        with recording_input_amax(model) as amax:
            model(x)
        assert set_input_scales(model, amax) == 2
        calibrated = model(x)
        exact = reference(x)
        clear_input_scales(model)
        again = model(x)
    assert not torch.equal(calibrated, dynamic)  # the calibrated path ran
    assert (calibrated - exact).norm() / exact.norm() < 0.06  # FP8 rounding, not a wrong scale
    assert torch.equal(again, dynamic)
    assert all(layer.input_scale is None for layer in fp8_layers(model).values())


def test_inputs_beyond_the_calibrated_range_clip_to_it():
    linear = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(16))
    layer = Fp8Linear.from_linear(linear, torch.float32)
    layer.set_input_amax(1.0)
    with torch.no_grad():
        out = layer(torch.full((2, 16), 3.0))
        inside = layer(torch.full((2, 16), 0.5))
    assert torch.allclose(out, torch.ones(2, 16)) and torch.allclose(inside, torch.full((2, 16), 0.5))
    assert "calibrated input scale" in repr(layer)


def test_layers_without_a_usable_range_keep_per_row_scales():
    model = two_layers()
    assert set_input_scales(model, {"0": float("nan"), "2": 0.0}) == 0
    assert set_input_scales(model, {"2": 4.0, "not-a-layer": 1.0}) == 1
    assert fp8_layers(model)["0"].input_scale is None
    assert math.isclose(fp8_layers(model)["2"].input_scale.item(), 4.0 / 448.0, rel_tol=1e-6)
