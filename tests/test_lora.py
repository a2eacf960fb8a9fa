"""LoRAs on the tiny models: reading the layouts people download, fusing at 16 bits and FP8, switching without
reloading, unfusing bit for bit, and every bad input answered in one line while the app keeps serving."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.backends.torch_backend import LORA_READY, TorchBackend
from pipelines.device_policy import DevicePolicy
from pipelines.loading import WeightSource
from pipelines.lora import (MAX_SCALE, AppliedLora, LoraError, LoraLibrary, LoraSet, LowRank, NO_LORAS, load_set,
                            parse_lora_arg, parse_prompt, read_lora)
from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.pngmeta import infotext, parse_infotext
from pipelines.precision import Precision
from pipelines.quant import quantize_linears
from pipelines.registry import read_local_spec
from pipelines.request import GenerationRequest, RequestError, resolve_request
from tests.tiny_loras import FLUX_LAYERS, SDXL_TE, SDXL_UNET, write_kohya, write_peft
from conftest import fast_16bit_cpu


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_peft(folder / "ink.safetensors", "transformer", FLUX_LAYERS, seed=1)
    write_kohya(folder / "stripes.safetensors", FLUX_LAYERS, seed=2)
    write_kohya(folder / "sdxl-style.safetensors", SDXL_UNET + SDXL_TE, seed=3)
    write_peft(folder / "sdxl-peft.safetensors", "unet", SDXL_UNET, seed=4)
    # The same layer names at another model size (a Flux.1-dev LoRA on a smaller Flux).
    write_peft(folder / "big-flux.safetensors", "transformer", [(p, k, (3072, 3072)) for p, k, _ in FLUX_LAYERS[:1]], rank=2)
    good = (folder / "ink.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    return folder


@pytest.fixture(scope="module")
def manager(lora_dir):
    m = PipelineManager(ManagerConfig(device="cpu", lora_dir=lora_dir), device_info=fast_16bit_cpu())
    yield m
    m.close()


def req(model, *, loras=(), prompt="a red circle", **fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": prompt, "model": str(model), "steps": 2, "seed": 3, "width": 32, "height": 32,
                                "loras": tuple(loras), **fields})


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def transformer_module(manager, model, precision="bf16", lora=""):
    key = next(k for k in manager.residency.entries if k.name == "transformer" and k.variant == precision
               and k.lora == lora and k.model == read_local_spec(model).id)
    return manager.residency.entries[key].component.obj.transformer


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- reading

def test_peft_and_kohya_layouts_become_the_same_layers(lora_dir, specs):
    peft = read_lora(lora_dir / "ink.safetensors", specs["flux"])
    kohya = read_lora(lora_dir / "stripes.safetensors", specs["flux"])
    paths = {p for p, _, _ in FLUX_LAYERS}
    assert set(peft.layers["transformer"]) == set(kohya.layers["transformer"]) == paths
    # kohya's alpha is folded into the weights by diffusers' Flux converter: delta = up @ down * alpha/rank.
    raw = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(lora_dir / "stripes.safetensors"))
    key = "lora_unet_double_blocks_0_img_attn_proj"
    expected = raw[f"{key}.lora_up.weight"].float() @ raw[f"{key}.lora_down.weight"].float() * (2.0 / 4)
    got = kohya.layers["transformer"]["transformer_blocks.0.attn.to_out.0"].delta(1.0, "cpu")
    assert torch.allclose(got, expected, rtol=1e-2, atol=1e-3)

    sdxl = read_lora(lora_dir / "sdxl-style.safetensors", specs["sdxl"])
    assert set(sdxl.layers["unet"]) == {p for p, _, _ in SDXL_UNET}
    assert set(sdxl.layers["text_encoder"]) == {p for p, _, _ in SDXL_TE}  # the text encoder part is kept too
    assert all(lr.alpha == 2.0 for lr in sdxl.layers["unet"].values())
    assert len(peft.digest) == 12 and peft.digest != kohya.digest


def test_prompt_tags_are_taken_out_of_the_text_the_encoders_see(specs):
    text, loras = parse_prompt("a cat <lora:ink:0.8>, sitting <lora:stripes>")
    assert text == "a cat, sitting" and loras == (("ink", 0.8), ("stripes", 1.0))
    resolved = resolve_request(GenerationRequest("a fox <lora:ink:0.5>", "x", loras=(("stripes", 1),)), specs["flux"], None)
    assert resolved.prompt == "a fox" and resolved.loras == (("stripes", 1.0), ("ink", 0.5))
    assert parse_lora_arg("/tmp/a:b/ink.safetensors:0.7") == ("/tmp/a:b/ink.safetensors", 0.7)
    assert parse_lora_arg("ink") == ("ink", 1.0) and parse_lora_arg("ink:-1.5") == ("ink", -1.5)


@pytest.mark.parametrize("loras, prompt, message", [
    ((("ink", MAX_SCALE + 1),), "x", "outside -4..4"),
    ((("ink", float("nan")),), "x", "outside -4..4"),
    ((("ink", "lots"),), "x", "must be a number"),
    ((), "x <lora:ink:strong>", "'strong' is not a number"),
    ((("ink", 1), ("ink", 0.5)), "x", "given twice"),
    ((("", 1),), "x", "must be text"),
    (((f"l{i}", 1) for i in range(9)), "x", "At most 8"),
])
def test_bad_names_and_scales_are_refused_in_request_resolution(specs, loras, prompt, message):
    with pytest.raises(RequestError, match=message) as info:
        resolve_request(GenerationRequest(prompt, "x", loras=tuple(loras)), specs["flux"], None)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, family, message", [
    ("nope", "flux", "Unknown LoRA 'nope'; available LoRAs: big-flux, garbage, ink, sdxl-peft, sdxl-style, stripes, truncated"),
    ("sdxl-style", "flux", "was made for SDXL, not Flux.1"),
    ("ink", "sdxl", "was made for Flux.1, not SDXL"),
    ("big-flux", "flux", r"does not fit tiny-flux \(made for another model size\?\): layer transformer_blocks.0.attn.to_out.0 "
                         r"is \(32, 32\) in the model but \(3072, 3072\)"),
    ("truncated", "flux", "not a readable .safetensors file .truncated or corrupt"),
    ("garbage", "flux", "not a readable .safetensors file"),
])
def test_bad_files_are_one_line_errors_before_any_model_work(lora_dir, specs, name, family, message):
    with pytest.raises(LoraError, match=message) as info:
        load_set(((name, 1.0),), specs[family], LoraLibrary(lora_dir))
    assert "\n" not in str(info.value) and str(lora_dir) not in str(info.value)


def test_paths_are_for_the_cli_only(lora_dir, specs, tmp_path):
    path = str(lora_dir / "ink.safetensors")
    with pytest.raises(LoraError, match="Unknown LoRA 'ink.safetensors'"):  # a web request cannot read server files
        load_set(((path, 1.0),), specs["flux"], LoraLibrary(tmp_path))
    assert load_set(((path, 1.0),), specs["flux"], LoraLibrary(tmp_path, allow_paths=True)).items[0].file.name == "ink"
    (tmp_path / "x.ckpt").write_bytes(b"pickle")
    with pytest.raises(LoraError, match="only .safetensors files are loaded"):
        load_set(((str(tmp_path / "x.ckpt"), 1.0),), specs["flux"], LoraLibrary(tmp_path, allow_paths=True))
    with pytest.raises(LoraError, match="none: put .safetensors files in"):
        load_set((("ink", 1.0),), specs["flux"], LoraLibrary(tmp_path / "missing"))


# ---------------------------------------------------------------------- images through the manager

def test_scale_zero_is_the_base_image_and_the_image_follows_the_scale(manager, tiny_flux):
    base = pixels(manager.generate(req(tiny_flux)))
    zero = pixels(manager.generate(req(tiny_flux, loras=[("ink", 0.0)])))
    half = pixels(manager.generate(req(tiny_flux, loras=[("ink", 0.5)])))
    full = pixels(manager.generate(req(tiny_flux, prompt="a red circle <lora:ink:1>")))
    assert np.array_equal(zero, base)
    assert np.abs(half - base).mean() > 0.5 and np.abs(full - base).mean() > np.abs(half - base).mean()
    assert np.abs(full - half).mean() > 0.5


def test_switching_loras_never_reloads_and_unfuses_to_the_base_bit_for_bit(manager, tiny_flux):
    manager.generate(req(tiny_flux))
    module = transformer_module(manager, tiny_flux)
    base = weights(module)
    loads_before = sum(e.action == "load" for e in manager.residency.events)
    manager.generate(req(tiny_flux, loras=[("ink", 1.0)]))
    assert not same(weights(module), base)
    manager.generate(req(tiny_flux, loras=[("stripes", 0.7)]))
    manager.generate(req(tiny_flux))
    assert same(weights(module), base)  # unfused exactly
    assert sum(e.action == "load" for e in manager.residency.events) == loads_before  # nothing read again
    touched = {p for p, _, _ in FLUX_LAYERS}
    expected = sum(module.get_submodule(p).weight.numel() * 2 for p in touched)  # bf16 bases of the touched layers
    assert manager.status().lora_host_bytes >= expected


def test_on_a_cpu_computing_in_fp32_unfusing_still_restores_the_base(lora_dir, tiny_flux):
    """Where 16-bit weights compute in FP32 (CPUs without fast bf16, like CI's), the kept base is an fp32 tensor
    on the same device as the layer; fusing once added the update into that base itself (a `.to()` that copied
    nothing), so turning the LoRA off left it in the model (found 2026-12-07)."""
    m = PipelineManager(ManagerConfig(device="cpu", lora_dir=lora_dir), device_info=fast_16bit_cpu(fast=False))
    try:
        before = m.generate(req(tiny_flux))
        module = transformer_module(m, tiny_flux)
        assert next(module.parameters()).dtype == torch.float32
        base = weights(module)
        m.generate(req(tiny_flux, loras=[("ink", 1.0)]))
        m.generate(req(tiny_flux, loras=[("stripes", 0.7)]))
        after = m.generate(req(tiny_flux))
        assert same(weights(module), base)
        assert np.array_equal(pixels(after), pixels(before))
    finally:
        m.close()


def test_two_loras_compose_as_the_sum_of_their_updates(manager, tiny_flux, lora_dir, specs):
    manager.generate(req(tiny_flux))
    module = transformer_module(manager, tiny_flux)
    base = weights(module)
    manager.generate(req(tiny_flux, loras=[("ink", 0.8), ("stripes", 0.6)]))
    ink, stripes = (read_lora(lora_dir / f"{n}.safetensors", specs["flux"]) for n in ("ink", "stripes"))
    for path in ink.layers["transformer"]:
        want = (base[path + ".weight"].float() + ink.layers["transformer"][path].delta(0.8, "cpu")
                + stripes.layers["transformer"][path].delta(0.6, "cpu")).to(torch.bfloat16)
        assert torch.equal(module.get_submodule(path).weight, want)
    one = pixels(manager.generate(req(tiny_flux, loras=[("ink", 0.8)])))
    both = pixels(manager.generate(req(tiny_flux, loras=[("stripes", 0.6), ("ink", 0.8)])))  # order does not matter
    again = pixels(manager.generate(req(tiny_flux, loras=[("ink", 0.8), ("stripes", 0.6)])))
    assert np.array_equal(both, again) and np.abs(both - one).mean() > 0.5


def test_sdxl_kohya_lora_changes_the_unet_and_the_text_encoder(manager, tiny_sdxl):
    base = pixels(manager.generate(req(tiny_sdxl)))
    styled = manager.generate(req(tiny_sdxl, loras=[("sdxl-style", 1.0)]))
    assert np.abs(pixels(styled) - base).mean() > 0.5
    te = next(r.component for k, r in manager.residency.entries.items()
              if k.name == "text_encoder" and k.model == "tiny-sdxl")
    # The file says text_model.encoder...; CLIPTextModel is flat in this transformers: the model's own name is used.
    assert te.lora.applied and set(te.lora.base) == {"encoder.layers.0.self_attn.q_proj"}
    assert np.array_equal(pixels(manager.generate(req(tiny_sdxl))), base)


def test_results_and_pngs_record_loras_the_automatic1111_way(manager, tiny_flux, lora_dir, specs):
    result = manager.generate(req(tiny_flux, prompt="a fox <lora:ink:0.8>"))
    assert result.request.prompt == "a fox" and result.request.loras == (("ink", 0.8),)
    digest = read_lora(lora_dir / "ink.safetensors", specs["flux"]).digest
    fields = parse_infotext(infotext(result.settings(), result.seeds[0]))
    assert fields["prompt"] == "a fox <lora:ink:0.8>" and fields["Lora hashes"] == f"ink: {digest}"


# ---------------------------------------------------------------------- FP8: fuse, then quantize

def _backend_load(spec, precision, loras=NO_LORAS):
    component = TorchBackend().load(spec, "transformer", Precision(precision), "cpu", DevicePolicy(), WeightSource(),
                                    loras=loras)
    return component, component.obj.transformer


def test_fp8_with_a_lora_equals_quantize_of_the_fused_model_and_unfuses_exactly(lora_dir, specs):
    spec = specs["flux"]
    loras = load_set((("ink", 0.9), ("stripes", -0.5)), spec, LoraLibrary(lora_dir))
    bf16, bf16_module = _backend_load(spec, "bf16")
    TorchBackend().apply_loras(spec, "transformer", bf16, loras)
    quantize_linears(bf16_module, Precision.FP8, ("x_embedder", "context_embedder", "time_text_embed", "norm_out",
                                                  "proj_out"), torch.bfloat16)
    fp8, fp8_module = _backend_load(spec, "fp8", loras)
    plain = weights(fp8_module)
    assert fp8.lora is not None and TorchBackend().lora_variant(spec, "transformer", Precision.FP8, loras) == LORA_READY
    TorchBackend().apply_loras(spec, "transformer", fp8, loras)
    # Tolerance: none. Both sides round the same fp32 sum to bf16 and quantize it with the same code.
    assert same(weights(fp8_module), weights(bf16_module))
    TorchBackend().apply_loras(spec, "transformer", fp8, NO_LORAS)
    assert same(weights(fp8_module), plain)
    # It keeps every quantized layer's bf16 base in host RAM: that is what a LoRA-ready FP8 model costs.
    assert fp8.host_bytes == sum(t.numel() * 2 for t in fp8.lora.base.values()) > 0


def test_fp8_jobs_switch_loras_without_reloading(manager, tiny_flux):
    lora_a = pixels(manager.generate(req(tiny_flux, precision="fp8", loras=[("ink", 1.0)])))
    loads = sum(e.action == "load" and e.key.name == "transformer" for e in manager.residency.events)
    plain = pixels(manager.generate(req(tiny_flux, precision="fp8")))  # served by the LoRA-ready form, unfused
    lora_b = pixels(manager.generate(req(tiny_flux, precision="fp8", loras=[("stripes", 1.0)])))
    again = pixels(manager.generate(req(tiny_flux, precision="fp8", loras=[("ink", 1.0)])))
    assert sum(e.action == "load" and e.key.name == "transformer" for e in manager.residency.events) == loads
    assert np.array_equal(lora_a, again) and np.abs(lora_a - plain).mean() > 0.5 and np.abs(lora_b - lora_a).mean() > 0.5


# ---------------------------------------------------------------------- failures keep the previous state

@pytest.mark.parametrize("bad", [[("nope", 1.0)], [("truncated", 1.0)], [("sdxl-style", 1.0)], [("big-flux", 1.0)],
                                 [("ink", 9.0)]])
def test_a_bad_lora_fails_its_job_and_the_app_keeps_serving_the_previous_state(manager, tiny_flux, bad):
    first = pixels(manager.generate(req(tiny_flux, loras=[("ink", 1.0)])))
    fused = weights(transformer_module(manager, tiny_flux))
    with pytest.raises(RequestError) as info:
        manager.generate(req(tiny_flux, loras=bad))
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert same(weights(transformer_module(manager, tiny_flux)), fused)  # untouched: nothing was half applied
    assert np.array_equal(pixels(manager.generate(req(tiny_flux, loras=[("ink", 1.0)]))), first)


def test_a_failure_half_way_through_fusing_leaves_the_base_model(lora_dir, specs, monkeypatch):
    spec = specs["flux"]
    component, module = _backend_load(spec, "bf16")
    base = weights(module)
    loras = load_set((("ink", 1.0),), spec, LoraLibrary(lora_dir))
    calls = {"n": 0}
    real = LowRank.delta

    def failing(self, scale, device):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, scale, device)

    monkeypatch.setattr(LowRank, "delta", failing)
    with pytest.raises(torch.OutOfMemoryError):
        TorchBackend().apply_loras(spec, "transformer", component, loras)
    assert same(weights(module), base) and component.lora.applied == ()
    monkeypatch.setattr(LowRank, "delta", real)
    TorchBackend().apply_loras(spec, "transformer", component, loras)
    assert component.lora.applied == loras.key("transformer") and not same(weights(module), base)


def test_a_lora_set_is_keyed_by_digest_and_scale(lora_dir, specs):
    ink = read_lora(lora_dir / "ink.safetensors", specs["flux"])
    a, b = LoraSet((AppliedLora(ink, 0.5),)), LoraSet((AppliedLora(ink, 0.6),))
    assert a.digest("transformer") != b.digest("transformer") and a.digest("text_encoder") == ""
    assert LoraSet((AppliedLora(ink, 0.5),)).digest() == a.digest()  # the same file and scale: the same engine
    assert not NO_LORAS and NO_LORAS.digest() == ""


# ---------------------------------------------------------------------- the CLI

def test_cli_generate_takes_lora_paths_and_names_and_records_them(tiny_flux, lora_dir, tmp_path, specs):
    from pipelines.pngmeta import read_png_metadata
    from tests.test_core_cli import run_cli

    out = tmp_path / "img.png"
    proc = run_cli("generate", "a red circle", "--model", str(tiny_flux), "--steps", "2", "--seed", "4", "--device", "cpu",
                   "--lora", str(lora_dir / "ink.safetensors") + ":0.8", "--lora", "stripes", "--lora-dir", str(lora_dir),
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    meta = read_png_metadata(out)
    assert meta["settings"]["loras"] == [["ink", 0.8], ["stripes", 1.0]]  # names, never the private path
    digests = {n: read_lora(lora_dir / f"{n}.safetensors", specs["flux"]).digest for n in ("ink", "stripes")}
    fields = parse_infotext(meta["parameters"])
    assert fields["prompt"] == "a red circle <lora:ink:0.8> <lora:stripes:1>"
    assert fields["Lora hashes"] == f"ink: {digests['ink']}, stripes: {digests['stripes']}"

    bad = run_cli("generate", "x", "--model", str(tiny_flux), "--device", "cpu", "--lora", "nope:0.5",
                  "--lora-dir", str(lora_dir), "--out", str(tmp_path / "bad.png"))
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and errors == ["error: Unknown LoRA 'nope'; available LoRAs: big-flux, garbage, ink, "
                                              "sdxl-peft, sdxl-style, stripes, truncated."]
    assert "Traceback" not in bad.stderr
