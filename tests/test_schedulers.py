"""Sampler choice: every sampler runs on the tiny models, changes the picture where it should, is validated
with the choices listed, and lands in the PNG the AUTOMATIC1111 way."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.pngmeta import parse_infotext, read_png_metadata
from pipelines.registry import Family
from pipelines.request import GenerationRequest, RequestError
from pipelines.families import FAMILIES
from pipelines.schedulers import sampler_names


@pytest.fixture(scope="module")
def manager():
    m = PipelineManager(ManagerConfig(device="cpu"))
    yield m
    m.close()


def test_the_expected_samplers_are_offered():
    assert sampler_names(Family.SDXL) == ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DDIM",
                                          "UniPC"]
    assert sampler_names(Family.FLUX)[0] == "Euler" and len(sampler_names(Family.FLUX)) >= 2


@pytest.mark.parametrize("family", [Family.FLUX, Family.SDXL])
def test_every_sampler_makes_a_finite_picture_and_some_differ(manager, tiny_flux, tiny_sdxl, family):
    model = str(tiny_flux if family is Family.FLUX else tiny_sdxl)
    pictures = {}
    for name in ["", *sampler_names(family)]:
        result = manager.generate(GenerationRequest("a red circle", model, width=32, height=32, steps=3, seed=4,
                                                    guidance=3.0, sampler=name), timeout=120)
        assert result.request.sampler == name
        pictures[name] = np.asarray(result.images[0], dtype=np.int16)
    assert np.array_equal(pictures[""], pictures["Euler"])  # the model's own scheduler is Euler here
    other = "DPM++ 2M" if family is Family.SDXL else "Euler Karras"
    assert np.abs(pictures[other] - pictures["Euler"]).max() > 0


def test_unknown_sampler_is_refused_with_the_choices(manager, tiny_sdxl, tiny_flux):
    with pytest.raises(RequestError, match=r"Unknown sampler 'Heun' for SDXL; choose one of: Euler, Euler a, DPM\+\+ 2M"):
        manager.generate(GenerationRequest("x", str(tiny_sdxl), width=32, height=32, steps=1, sampler="Heun"),
                         timeout=60)
    with pytest.raises(RequestError, match="for FLUX"):  # an SDXL sampler is not a Flux one
        manager.generate(GenerationRequest("x", str(tiny_flux), width=32, height=32, steps=1, sampler="DDIM"),
                         timeout=60)


def test_png_records_the_sampler_as_a1111_does(tiny_sdxl, tmp_path):
    from ui.service import PrismService, offered_models

    m = PipelineManager(ManagerConfig(device="cpu"))
    try:
        service = PrismService(m, offered_models([str(tiny_sdxl)]), output_dir=tmp_path)
        req = service.build_request(Family.SDXL, "tiny-sdxl", "a cat", "", 32, 32, 2, 5.0, 3, 1, "bf16",
                                    "DPM++ 2M Karras")
        (path,) = service.save_result(service.start_generate(req).result(timeout=120))
        meta = read_png_metadata(path)
        assert parse_infotext(meta["parameters"])["Sampler"] == "DPM++ 2M Karras"
        assert meta["settings"]["sampler"] == "DPM++ 2M Karras"
        default = service.build_request(Family.SDXL, "tiny-sdxl", "a cat", "", 32, 32, 1, 5.0, 3, 1, "bf16")
        (path,) = service.save_result(service.start_generate(default).result(timeout=120))
        assert parse_infotext(read_png_metadata(path)["parameters"])["Sampler"] == "Euler"
    finally:
        m.close()
    assert all(s.class_name for f in FAMILIES.values() for s in f.samplers)
