"""The UI's service and text, without a browser: which models are offered, how widget values become
requests, what the precision choices say on a given GPU, and how progress reads."""
from __future__ import annotations

import pytest

from pipelines.gpu import DeviceInfo
from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.precision import Precision
from pipelines.registry import HUB_MODELS, Family, UnknownModelError
from pipelines.request import GenerationRequest, RequestError
from pipelines.run_context import Progress
from ui.formatting import fmt_bytes, precision_label, progress_text
from ui.service import PrismService, offered_models
from conftest import fast_16bit_cpu


@pytest.fixture(scope="module")
def service(tiny_flux, tiny_sdxl, tmp_path_factory):
    manager = PipelineManager(ManagerConfig(device="cpu"), device_info=fast_16bit_cpu())
    yield PrismService(manager, offered_models([str(tiny_flux), str(tiny_sdxl), "flux.1-schnell"]),
                       output_dir=tmp_path_factory.mktemp("outputs"))
    manager.close()


def test_default_offer_is_every_hub_model():
    assert {c.name for c in offered_models()} >= {s.id for s in HUB_MODELS}


def test_models_argument_accepts_ids_and_folders_under_their_name(service, tiny_flux):
    names = [c.name for c in service.models]
    assert names == ["tiny-flux", "tiny-sdxl", "flux.1-schnell"]
    assert service.choice("tiny-flux").model == str(tiny_flux.resolve())
    assert [c.name for c in service.choices(Family.SDXL)] == ["tiny-sdxl"]


def test_models_argument_rejects_unknowns_and_duplicate_names(tmp_path, tiny_flux):
    with pytest.raises(UnknownModelError, match="neither a known model"):
        offered_models([str(tmp_path / "missing")])
    with pytest.raises(UnknownModelError, match="two models are named 'tiny-flux'"):
        offered_models([str(tiny_flux), str(tiny_flux)])


def test_default_choice_prefers_an_offered_model_with_weights_here(service):
    choice, note = service.default_choice(Family.FLUX)
    assert choice.name == "tiny-flux" and "tiny-flux" in note
    sdxl_only = PrismService(service.manager, [service.choice("tiny-sdxl")], output_dir=service.output_dir)
    choice, note = sdxl_only.default_choice(Family.FLUX)
    assert choice is None and "--models" in note


def test_without_local_weights_an_ungated_hub_model_is_preselected(service, tmp_path):
    from pipelines.loading import HubOptions

    empty_cache = HubOptions(cache_dir=str(tmp_path), offline=False)  # whatever this machine has downloaded
    hub_only = PrismService(service.manager, offered_models(["flux.1-dev", "flux.1-schnell"]),
                            output_dir=service.output_dir, hub=empty_cache)
    choice, note = hub_only.default_choice(Family.FLUX)
    assert choice.name == "flux.1-schnell" and "first request downloads it" in note


def test_hub_model_note_says_how_it_will_be_fetched(service):
    note = service.model_note(service.choice("flux.1-schnell"))
    assert "schnell" in note and ("download" in note.lower() or "cache" in note)


def test_widget_values_become_a_request(service):
    req = service.build_request(Family.FLUX, "tiny-flux", "a cat", None, 48, "", 2, 3.5, -1, 2, "fp4")
    assert req.model == service.choice("tiny-flux").model and req.seed is None  # -1: random
    assert (req.width, req.height, req.steps, req.num_images, req.precision) == (48, None, 2, 2, "fp4")
    with pytest.raises(RequestError, match="Unknown FLUX model 'tiny-sdxl'; choose one of: tiny-flux, flux.1-schnell"):
        service.build_request(Family.FLUX, "tiny-sdxl", "a cat", None, 32, 32, 1, 0, 1, 1, "bf16")
    with pytest.raises(RequestError, match="Unknown FLUX model"):  # a path is not a name
        service.build_request(Family.FLUX, service.choice("tiny-flux").model, "x", None, 32, 32, 1, 0, 1, 1, "bf16")


def test_bad_input_is_refused_before_it_is_queued(service):
    req = service.build_request(Family.SDXL, "tiny-sdxl", "x", "blurry", 36, 32, 1, 1.0, 1, 1, "bf16")
    with pytest.raises(RequestError, match="width 36 is not a multiple of 8; use 32 or 40"):
        service.start_generate(req)
    assert service.manager.status().queued == 0 and service.manager.status().running is None


def test_generate_saves_pngs_with_settings_under_the_offered_name(service):
    from pipelines.pngmeta import read_png_metadata

    req = service.build_request(Family.FLUX, "tiny-flux", "a cat", None, 32, 32, 1, 3.5, 9, 1, "bf16")
    result = service.start_generate(req).result(timeout=120)
    (path,) = service.save_result(result)
    assert path.parent.parent == service.output_dir and path.name == "tiny-flux-9-bf16.png"
    meta = read_png_metadata(path)
    assert "Seed: 9" in meta["parameters"] and meta["settings"]["seed"] == 9


def test_stop_cancels_the_sessions_job_and_a_running_model_stays_loaded(service):
    from conftest import worker_held

    with worker_held(service.manager, service.choice("tiny-flux").model):
        req = service.build_request(Family.FLUX, "tiny-flux", "a cat", None, 32, 32, 1, 3.5, 1, 1, "bf16")
        task = service.start_generate(req, session="browser-1")
        # components in use are not unloaded from under the running job; other models may go
        with pytest.raises(RequestError, match="A job is running on tiny-flux"):
            service.unload("tiny-flux")
        with pytest.raises(RequestError, match="A job is running"):
            service.unload(None)
        assert service.unload("tiny-sdxl") >= 0
        assert service.cancel_session("browser-2") is None
        assert service.cancel_session("browser-1") == "queue"  # waiting behind the held job
    with pytest.raises(Exception, match="cancelled"):
        task.result(timeout=60)


def test_precision_choices_tell_what_runs_on_this_gpu():
    # An Ada-less, Blackwell-less GPU (compute capability 8.0) cannot exist here: a DeviceInfo says so.
    ampere = DeviceInfo("cpu", "Fake A100", (8, 0), 8 * 2**30, 8 * 2**30, unified=False)
    manager = PipelineManager(ManagerConfig(device="cpu", backend="torch"), device_info=ampere)
    try:
        service = PrismService(manager, [])
        labels = {p: precision_label(service.support(p)) for p in Precision}
    finally:
        manager.close()
    assert labels[Precision.BF16] == "BF16"
    assert labels[Precision.FP8] == "FP8 (not available here)"
    assert labels[Precision.FP4] == "FP4 weights, 16-bit compute"
    assert "8.9" in service.support(Precision.FP8).reason


def test_progress_reads_as_a_sentence():
    assert progress_text(Progress("queue", 0, 1), 2) == ("Queued: 2 jobs ahead of yours", 0.0)
    assert progress_text(Progress("denoise", 3, 4), 0, "FP8 (2/3)") == ("FP8 (2/3): Denoising: step 3/4", 0.75)
    text, fraction = progress_text(Progress("build", 1, 4, "transformer fp4"), 0)
    assert progress_text(Progress("build", 0, 1), 0)[1] == 0.0
    assert text == "Building engine (1/4): transformer fp4" and fraction == 0.25
    assert progress_text(Progress("load", 0, 1, "loading x"), 0) == ("Loading x", 0.0)
    assert progress_text(Progress("vae", 0, 1, "decoding"), 0) == ("Decoding the image (VAE)", 1.0)  # bar stays
    assert progress_text(Progress("text", 0, 1), 0) == ("Encoding the prompt", 0.0)


def test_stop_says_what_it_did():
    from ui.generate_tab import stop_message

    assert stop_message(None) == "Nothing to stop." and stop_message("denoise") == "Stopped."
    assert "will finish loading first" in stop_message("load") and "will finish loading first" in stop_message("build")
    assert stop_message("download").startswith("Stopped the download") and "resumes" in stop_message("download")
    assert fmt_bytes(3 * 2**30) == "3.00 GiB" and fmt_bytes(None) == "n/a"


def test_an_unwritable_output_folder_is_one_sentence_without_the_server_path(service, tmp_path):
    from ui.errors import OutputError, ui_error

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    broken = PrismService(service.manager, service.models, output_dir=blocked / "outputs")
    req = service.build_request(Family.FLUX, "tiny-flux", "a cat", None, 32, 32, 1, 3.5, 9, 1, "bf16")
    result = service.start_generate(req).result(timeout=120)
    with pytest.raises(OutputError) as err:
        broken.save_result(result)
    message = ui_error(err.value, "generate_flux").message
    assert "could not be saved on the server" in message and str(tmp_path) not in message


def test_unexpected_failures_name_no_exception_class():
    from pipelines.manager import InternalError
    from ui.errors import UNEXPECTED, ui_error

    assert ui_error(InternalError("Generation failed unexpectedly (TypeError: TextEncodeInput)"), "x").message == UNEXPECTED
    assert ui_error(KeyError("/srv/secret/path"), "x").message == UNEXPECTED
    assert ui_error(RequestError("steps must be between 1 and 50"), "x").message == "steps must be between 1 and 50"


def test_labels_say_each_fact_once():
    from ui.errors import ui_error
    from ui.formatting import short_dtype
    from ui.system_tab import resident_rows, system_markdown

    cpu = PipelineManager(ManagerConfig(device="cpu"), device_info=fast_16bit_cpu())
    try:
        service = PrismService(cpu, [])
        labels = {p: precision_label(service.support(p)) for p in Precision}
    finally:
        cpu.close()
    assert labels[Precision.FP8] == "FP8 (CPU emulation)" and labels[Precision.BF16] == "BF16"
    assert labels[Precision.FP4].count("FP4") == 1
    assert short_dtype("bfloat16") == "bf16" and short_dtype("float16") == "fp16"
    snap = {"device": {"device": "cpu", "name": "CPU", "compute_capability": "-", "unified_memory": False},
            "resident": [{"model": "m", "component": "vae", "form": "bfloat16", "backend": "torch", "bytes": 2**20,
                          "parked": False}]}
    assert resident_rows(snap) == [["m", "vae", "bf16", "torch", "1.0 MiB", "system RAM"]]
    note = "TensorRT is not installed."
    text = system_markdown({**snap, "memory": {"used_bytes": 1, "total_bytes": 2, "kind": "system RAM"},
                            "budget_bytes": 1, "resident_bytes": 0, "parked_bytes": 0, "resident_models": {},
                            "jobs": {"running": None, "queued": 0},
                            "backend": {"in_use": f"PyTorch. {note}", "tensorrt": note, "configured": "auto"},
                            "engine_cache": {"entries": [], "total_bytes": 0, "dir": "/x"}})
    assert text.count(note) == 1
    assert ui_error(RequestError("start it with `--models` naming one"), "x").message == \
        "start it with '--models' naming one"


def test_outputs_folder_is_capped_by_size_and_keeps_foreign_folders(tmp_path):
    from ui.history import HistoryItem, add_results, prune_outputs

    for i in range(4):
        batch = tmp_path / f"2026120{i}-120000-0000000{i}"
        batch.mkdir()
        (batch / "a.png").write_bytes(b"x" * 1000)
    (tmp_path / "my-photos").mkdir()
    (tmp_path / "my-photos" / "p.png").write_bytes(b"y" * 5000)
    removed = prune_outputs(tmp_path, max_bytes=2500)
    assert [p.name for p in removed] == ["20261200-120000-00000000", "20261201-120000-00000001"]
    assert (tmp_path / "my-photos" / "p.png").exists()
    history = add_results([], ["/o/1.png", "/o/2.png"], {"seeds": [5, 6], "prompt": "a cat", "timings": {}})
    assert [h.seed for h in history] == [6, 5] and history[0].settings == {"seeds": [5, 6], "prompt": "a cat"}
    assert add_results(history, None, None) == history
    assert isinstance(history[0], HistoryItem) and history[0].image_for_input == "/o/2.png"


def test_use_as_input_of_a_pruned_picture_says_so_in_one_line(tmp_path):
    import gradio as gr

    from ui.history import add_results, input_file, prune_outputs

    old, new = tmp_path / "20261201-120000-00000001", tmp_path / "20261202-120000-00000002"
    for batch in (old, new):
        batch.mkdir()
        (batch / "a.png").write_bytes(b"x" * 1000)
    history = add_results([], [str(old / "a.png")], {"seeds": [1]})
    history = add_results(history, [str(new / "a.png")], {"seeds": [2]})
    assert input_file(history[1], "an image") == str(old / "a.png")
    prune_outputs(tmp_path, max_bytes=1500)  # the older batch goes
    with pytest.raises(gr.Error, match="no longer in the outputs folder") as caught:
        input_file(history[1], "an image")
    assert str(tmp_path) not in str(caught.value)  # no server path in the UI
    assert input_file(history[0], "an image") == str(new / "a.png")
    with pytest.raises(gr.Error, match="Click an edit in the history first"):
        input_file(None, "an edit")


def test_the_system_tab_lists_each_speed_lever_as_started():
    from pipelines.backends.contract import TorchOptions
    from ui.system_tab import system_markdown, system_snapshot

    for options, vae_state in ((TorchOptions(), "off (--compile-vae turns it on)"),
                               (TorchOptions(compile_vae=True), "not available: needs torch.compile"),
                               (TorchOptions(compile=True, compile_vae=True), "on")):
        cpu = PipelineManager(ManagerConfig(device="cpu", torch=options), device_info=fast_16bit_cpu())
        try:
            snap = system_snapshot(PrismService(cpu, []))
        finally:
            cpu.close()
        assert snap["speed_levers"]["VAE decoder compiled"] == vae_state
        assert snap["speed_levers"]["CUDA graphs"] == "off (--torch-cuda-graphs turns it on)"
        assert f"VAE decoder compiled: {vae_state}" in system_markdown(snap)


def test_system_tab_says_whether_prompts_are_remembered(tiny_flux):
    from ui.system_tab import system_markdown, system_snapshot

    for entries, state in ((0, "off (--no-prompt-cache)"), (32, "on: 1 of up to 32 prompts kept, 1 reused")):
        cpu = PipelineManager(ManagerConfig(device="cpu", prompt_cache_entries=entries), device_info=fast_16bit_cpu())
        try:
            for seed in (1, 2):
                cpu.generate(GenerationRequest("a red kite", str(tiny_flux), steps=1, width=32, height=32, seed=seed))
            snap = system_snapshot(PrismService(cpu, []))
        finally:
            cpu.close()
        assert snap["prompt_cache"] == state
        assert f"**Prompt cache:** {state}" in system_markdown(snap)


def test_under_ray_serve_the_system_tab_says_each_replica_keeps_its_own_prompts():
    from types import SimpleNamespace

    from ui.system_tab import prompt_cache_state

    ray_manager = SimpleNamespace(config=ManagerConfig())  # RayManager keeps no cache itself; its replicas do
    assert prompt_cache_state(ray_manager) == "on, up to 32 prompts in each replica"
