"""--compile-vae: the VAE decoder compiled behind the same guard as the denoiser (a "compile" stage that names it,
eager with a warning when compiling fails), off by default; on a CPU inductor's work is replaced by the eager
backend, so these tests check what is compiled and that the image is the same, not the speed (measured on a GPU
by scripts/gpu_vae_levers.py)."""
from __future__ import annotations

import pytest
import torch

from pipelines.backends.contract import TorchOptions
from pipelines.backends.torch_backend import lever_states
from pipelines.cli import build_parser
from pipelines.config import manager_config
from pipelines.graphs import VaeDecoder
from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.request import GenerationRequest
from conftest import fast_16bit_cpu


@pytest.fixture
def compiled_modules(monkeypatch):
    """Every module marked for torch.compile, compiled with the eager backend (no C compiler needed)."""
    marked: list[str] = []
    original = torch.nn.Module.compile

    def compile_for_test(module, *args, **kwargs):
        marked.append(type(module).__name__)
        original(module, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_for_test)
    return marked


def generate(model, options: TorchOptions):
    manager = PipelineManager(ManagerConfig(device="cpu", torch=options), device_info=fast_16bit_cpu())
    seen = []
    try:
        result = manager.generate(GenerationRequest(prompt="a red circle", model=str(model), precision="bf16",
                                                    steps=2, seed=3, width=64, height=64), on_progress=seen.append)
    finally:
        manager.close()
    return result, seen


@pytest.mark.parametrize("family", ["tiny_sdxl", "tiny_flux"])
def test_the_vae_decoder_compiles_when_asked_and_draws_the_same_image(family, request, compiled_modules):
    model = request.getfixturevalue(family)
    plain, plain_seen = generate(model, TorchOptions(compile=True))
    assert VaeDecoder.__name__ not in compiled_modules  # off by default: only the denoiser (or its blocks)
    assert compiled_modules
    compiled_modules.clear()
    result, seen = generate(model, TorchOptions(compile=True, compile_vae=True))
    assert compiled_modules.count(VaeDecoder.__name__) == 1
    stages = [p.message for p in seen if p.stage == "compile"]
    assert any("VAE decoder" in m and "compiling (once" in m for m in stages), stages
    assert any("the decode included" in m for m in stages), stages
    assert not any("VAE decoder" in p.message for p in plain_seen if p.stage == "compile")
    assert not result.warnings or not any("compil" in w for w in result.warnings), result.warnings
    assert list(result.images[0].getdata()) == list(plain.images[0].getdata())


def test_without_compile_the_vae_stays_eager(tiny_sdxl, compiled_modules):
    generate(tiny_sdxl, TorchOptions(compile=False, compile_vae=True))
    assert compiled_modules == []


def test_a_vae_that_fails_to_compile_still_draws_the_image_and_says_so(tiny_sdxl, monkeypatch):
    original = torch.nn.Module.compile

    def broken_backend(gm, example_inputs):
        raise RuntimeError("inductor exploded")

    def compile_for_test(module, *args, **kwargs):
        original(module, backend=broken_backend if isinstance(module, VaeDecoder) else "eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_for_test)
    eager, _ = generate(tiny_sdxl, TorchOptions(compile=False))
    result, _ = generate(tiny_sdxl, TorchOptions(compile=True, compile_vae=True))
    assert any("torch.compile failed" in w and "inductor exploded" in w for w in result.warnings), result.warnings
    assert result.images[0].size == eager.images[0].size == (64, 64)


def test_the_switch_and_its_label():
    parse = build_parser().parse_args
    assert manager_config(parse(["generate", "a fox", "--compile-vae"])).torch.compile_vae
    assert not manager_config(parse(["generate", "a fox"])).torch.compile_vae
    assert lever_states(TorchOptions(), cuda=True)["VAE decoder compiled"] == "off (--compile-vae turns it on)"
    assert lever_states(TorchOptions(compile_vae=True), cuda=True)["VAE decoder compiled"] == "on"
    assert lever_states(TorchOptions(compile_vae=True), cuda=False)["VAE decoder compiled"] == \
        "not available: needs torch.compile"
    assert lever_states(TorchOptions(compile=True, compile_vae=True), cuda=False)["VAE decoder compiled"] == "on"
