"""Loading like a user's machine: registry ids, local folders, Hub errors turned into instructions, random weights."""
from __future__ import annotations

import json
import time

import pytest
import torch

from pipelines.loading import (HubOptions, ModelAccessError, WeightSource, check_access, default_model,
                               is_available_locally, load_component)
from pipelines.registry import Family, UnknownModelError, read_local_spec, resolve_spec


def test_local_folder_family_and_defaults_come_from_its_files(tiny_flux, tiny_sdxl):
    flux, sdxl = resolve_spec(str(tiny_flux)), resolve_spec(str(tiny_sdxl))
    assert (flux.family, flux.id, flux.denoiser) == (Family.FLUX, "tiny-flux", "transformer")
    assert (sdxl.family, sdxl.denoiser, sdxl.supports_negative_prompt) == (Family.SDXL, "unet", True)
    assert flux.components["transformer"].class_name == "FluxTransformer2DModel"
    assert flux.components["tokenizer_2"].class_name.startswith("T5Tokenizer")  # transformers 5 writes "T5Tokenizer"
    assert flux.size.max_side == 128 and sdxl.size.multiple_of == 8  # from prism.json


def test_folder_without_model_index_is_explained(tmp_path):
    with pytest.raises(UnknownModelError, match="has no model_index.json"):
        read_local_spec(tmp_path)


def test_unsupported_pipeline_class_lists_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UnknownModelError, match="StableDiffusion3Pipeline.*FluxPipeline, StableDiffusionXLPipeline"):
        read_local_spec(tmp_path)


def test_unknown_prism_json_keys_are_rejected(tiny_flux, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_flux, copy)
    (copy / "prism.json").write_text(json.dumps({"default_stepz": 3}))
    with pytest.raises(UnknownModelError, match="unknown keys \\['default_stepz'\\]"):
        read_local_spec(copy)


def test_components_load_from_a_local_folder_in_the_requested_dtype(tiny_sdxl):
    spec = resolve_spec(str(tiny_sdxl))
    unet = load_component(spec, "unet", dtype=torch.float16, device="cpu")
    assert next(unet.parameters()).dtype == torch.float16 and not unet.training
    tok = load_component(spec, "tokenizer", dtype=torch.float16, device="cpu")
    assert tok("a red circle").input_ids[0] == 0  # BOS of our CLIP tokenizer


def test_random_weights_build_the_exact_architecture_deterministically_and_never_zero(tiny_flux):
    spec = resolve_spec(str(tiny_flux))
    source = WeightSource(random_weights=True, seed=5)
    a = load_component(spec, "transformer", dtype=torch.bfloat16, device="cpu", source=source)
    b = load_component(spec, "transformer", dtype=torch.bfloat16, device="cpu", source=source)
    real = load_component(spec, "transformer", dtype=torch.bfloat16, device="cpu")
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert all(bool(p.any()) for p in a.parameters() if p.ndim >= 2), "an all-zero weight matrix"
    state = torch.random.get_rng_state()
    load_component(spec, "vae", dtype=torch.float32, device="cpu", source=source)
    assert torch.equal(state, torch.random.get_rng_state()), "building random weights changed the global RNG"


def test_random_weight_tokenizers_fit_the_full_size_encoders():
    spec = resolve_spec("flux.1-dev")
    t5_tok = load_component(spec, "tokenizer_2", dtype=torch.bfloat16, device="cpu",
                            source=WeightSource(random_weights=True))
    ids = t5_tok(["a photo of a cat"], padding="max_length", max_length=512, return_tensors="pt").input_ids
    assert ids.shape == (1, 512) and int(ids.max()) < spec.components["text_encoder_2"].config["vocab_size"]


def test_gated_model_error_says_how_to_get_access(monkeypatch):
    from huggingface_hub import errors as hf
    import huggingface_hub

    def gated(*args, **kwargs):
        response = type("R", (), {"status_code": 401, "headers": {}, "request": None, "url": "x"})()
        try:
            raise hf.GatedRepoError("Access to model black-forest-labs/FLUX.1-dev is restricted.", response=response)
        except TypeError:
            raise hf.GatedRepoError("Access to model black-forest-labs/FLUX.1-dev is restricted.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ModelAccessError) as err:
        check_access(resolve_spec("flux.1-dev"), WeightSource())
    message = str(err.value)
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in message
    assert "accept its license" in message and "hf auth login" in message and "HF_TOKEN" in message


def test_offline_without_a_cached_copy_says_so_quickly(tmp_path):
    hub = HubOptions(offline=True, cache_dir=str(tmp_path))
    started = time.monotonic()
    with pytest.raises(ModelAccessError) as err:
        check_access(resolve_spec("flux.1-schnell"), WeightSource(hub=hub))
    assert time.monotonic() - started < 10  # offline mode must not wait on the network
    message = str(err.value)
    assert "offline mode is on" in message and "--model /path/to/a/local/folder" in message
    assert "demo-flux" in message
    assert not is_available_locally(resolve_spec("flux.1-schnell"), hub)


def test_an_unresolvable_hub_fails_at_once_naming_the_demo_of_the_family(tmp_path, monkeypatch):
    """A machine with no internet and HF_HUB_OFFLINE unset: one DNS failure decides, and the Hub is asked for its
    cache only (asked over the network, huggingface_hub retried five times with backoff: 33 s)."""
    import socket

    import huggingface_hub

    lookups, asked = [], []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    real_download = huggingface_hub.hf_hub_download

    def download(*args, **kwargs):
        asked.append(kwargs["local_files_only"])
        return real_download(*args, **kwargs)

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    hub = HubOptions(offline=False, cache_dir=str(tmp_path))
    with pytest.raises(ModelAccessError) as err:
        check_access(resolve_spec("flux.1-kontext-dev"), WeightSource(hub=hub))
    message = str(err.value)
    assert "cannot be reached from this machine" in message and "hf download black-forest-labs/FLUX.1-Kontext-dev" in message
    assert "demo-kontext" in message and "demo-sdxl" not in message
    assert lookups[0] == "huggingface.co" and asked == [True], (lookups, asked)


def test_behind_a_proxy_the_hub_is_not_judged_by_local_dns(monkeypatch):
    import socket

    from pipelines.loading import _hub_resolves

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror(-2, "no")))
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert not _hub_resolves()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.lan:3128")
    assert _hub_resolves()
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("ALL_PROXY", "socks5://proxy.lan:1080")
    assert _hub_resolves()


def test_hf_hub_offline_environment_variable_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert HubOptions().is_offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not HubOptions().is_offline
    assert HubOptions(offline=True).is_offline


def test_default_model_prefers_cached_hub_weights_and_says_what_it_picked(tmp_path, monkeypatch):
    from pipelines import registry

    monkeypatch.setattr(registry, "DEMO_MODELS_DIR", tmp_path / "none")
    monkeypatch.setattr(registry, "demo_specs", lambda models_dir=tmp_path / "none": ())
    with pytest.raises(ModelAccessError, match="No model weights are available here"):
        default_model(hub=HubOptions(cache_dir=str(tmp_path)))


def test_casting_a_diffusers_model_logs_no_false_float32_warning(tiny_sdxl):
    """diffusers 0.42's ModelMixin.to warned "should be kept in float32: []" on every CPU load's FP32 cast."""
    import logging

    from pipelines.loading import cast

    vae = load_component(read_local_spec(tiny_sdxl), "vae", dtype=torch.bfloat16, device="cpu",
                         source=WeightSource())
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")  # its loggers do not reach the root logger
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # diffusers' default (the test suite quietens it)
    try:
        assert cast(vae, torch.float32) is vae and {p.dtype for p in vae.parameters()} == {torch.float32}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in records if "kept in float32" in r.getMessage()] == []
