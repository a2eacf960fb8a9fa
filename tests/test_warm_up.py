"""--warm-up: the app loads (and, on a GPU, compiles) a model in the background at start, so the first image a
user asks for skips both; bad names fail the start in one line, and a warm-up that fails leaves the app serving."""
from __future__ import annotations

import shutil

import pytest

from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.request import GenerationRequest, RequestError
from ui import launch
from ui.launch import options_from_args
from ui.service import PrismService, offered_models
from conftest import fast_16bit_cpu


@pytest.fixture
def manager():
    manager = PipelineManager(ManagerConfig(device="cpu", max_queue=4), device_info=fast_16bit_cpu())
    yield manager
    manager.close()


def stages_of_a_job(manager, model) -> list[str]:
    seen = []
    manager.generate(GenerationRequest(prompt="a red circle", model=str(model), steps=2, seed=1, width=64, height=64),
                     on_progress=seen.append)
    return [p.stage for p in seen]


def test_the_first_job_after_a_warm_up_loads_nothing(manager, tiny_flux, tiny_sdxl):
    service = PrismService(manager, offered_models([str(tiny_flux), str(tiny_sdxl)]))
    lines: list[str] = []
    service.warm_up([], lines.append).join(300)  # no names: the model a request naming none gets (Flux first)
    assert len(lines) == 1 and lines[0].startswith("Warm-up: ") and "is loaded and ready at" in lines[0], lines
    assert {r.key.model for r in manager.status().resident if r.nbytes} == {service.default_model().spec.id}
    assert "load" not in stages_of_a_job(manager, tiny_flux)
    assert "load" in stages_of_a_job(manager, tiny_sdxl)  # the one not warmed up still loads


def test_an_edit_model_warms_up_on_a_picture_of_its_own(manager, tiny_kontext):
    service = PrismService(manager, offered_models([str(tiny_kontext)]))
    lines: list[str] = []
    service.warm_up([service.choices()[0].name], lines.append).join(300)
    assert len(lines) == 1 and "is loaded and ready" in lines[0], lines


def test_an_unknown_name_is_refused_at_once(manager, tiny_flux):
    service = PrismService(manager, offered_models([str(tiny_flux)]))
    with pytest.raises(RequestError, match="nope"):
        service.warm_up(["nope"], print)


def test_a_warm_up_that_fails_says_so_in_one_line_and_the_app_serves_on(manager, tiny_flux, tiny_sdxl, tmp_path):
    gone = tmp_path / "gone"
    shutil.copytree(tiny_sdxl, gone)
    service = PrismService(manager, offered_models([str(gone), str(tiny_flux)]))
    name = next(c.name for c in service.choices() if c.model == str(gone))
    shutil.rmtree(gone)  # the folder disappears after the start, before its warm-up loads it
    lines: list[str] = []
    service.warm_up([name], lines.append).join(300)
    assert len(lines) == 1 and lines[0].startswith(f"Warm-up of {name} did not finish: "), lines
    assert "Traceback" not in lines[0] and lines[0].endswith("Its first image will load it instead.")
    assert "load" in stages_of_a_job(manager, tiny_flux)  # the next job runs


def test_the_flag_and_a_bad_name_on_the_command_line(tiny_flux, capsys):
    assert options_from_args([]).warm_up is None
    assert options_from_args(["--warm-up"]).warm_up == ()
    assert options_from_args(["--warm-up", "demo-flux", "demo-sdxl"]).warm_up == ("demo-flux", "demo-sdxl")
    assert launch.main(["--warm-up", "nope", "--device", "cpu", "--models", str(tiny_flux)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --warm-up: ") and "nope" in err and "Traceback" not in err
