"""The web app end to end with tiny real models on the CPU: started in-process on a free loopback port,
driven through `gradio_client` (every named endpoint) and through headless Chromium (every tab).

Screenshots of each tab go to test-artifacts/ (git-ignored) for a person to look at.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image


REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# No network from the browser, and nothing it does not need (updates, sync, QUIC probes).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 90_000  # one tiny CPU job takes 1-6 s; the bound leaves room for a busy shared CI machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_flux, tiny_sdxl, tiny_flux_schnell, tiny_sdxl_pair):
    from ui.launch import LaunchOptions, start

    from pipelines.cpu_math import FAST_CPU
    from pipelines.loading import HubOptions
    from pipelines.manager import ManagerConfig

    flux, sdxl, schnell = tiny_flux, tiny_sdxl, tiny_flux_schnell  # schnell's default guidance is 0
    # The test clears the engine cache: it must be a scratch one, not the repository's engine_cache/.
    # max_queue=1: one job running and one waiting fill the manager, so "busy" is reachable with three requests.
    # flux.1-schnell is not downloaded here and offline mode is on: asking for it must give the offline message.
    from tests.tiny_loras import FLUX_LAYERS, write_peft

    loras = tmp_path_factory.mktemp("loras")
    write_peft(loras / "ink.safetensors", "transformer", FLUX_LAYERS, seed=1)
    # Fast 16-bit math assumed, so labels do not depend on the CPU (tests/test_cpu_dtype.py covers the others).
    config = ManagerConfig(device="cpu", max_queue=1, hub=HubOptions(offline=True), cpu_math=FAST_CPU,
                           engine_cache_dir=tmp_path_factory.mktemp("engine-cache"), lora_dir=loras)
    # tiny-sdxl-base names its refiner (tiny-sdxl-refiner, beside it): the SDXL tab's refiner switch shows for it.
    models = (str(flux), str(schnell), str(sdxl), str(tiny_sdxl_pair[0]), "flux.1-schnell")
    opts = LaunchOptions(port=free_port(), models=models,
                         manager=config, output_dir=tmp_path_factory.mktemp("outputs"))
    demo, service = start(opts, block=False)
    assert service.manager.engine_cache.root != REPO / "engine_cache"
    yield f"http://127.0.0.1:{opts.port}/", service
    demo.close()
    service.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app[0], verbose=False)


def _png_settings(path: str) -> dict:
    image = Image.open(path)
    return {"parameters": image.text.get("parameters", ""), "prism": json.loads(image.text["prism"])}


# --------------------------------------------------------------------------- API (gradio_client)


def test_api_lists_named_endpoints(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate_flux", "/generate_sdxl", "/compare", "/system_status", "/unload_model",
            "/clear_engine_cache"} <= names


def test_api_generate_flux_returns_images_seed_and_timings(client):
    gallery, files, seed, summary, details, status = client.predict(
        "tiny-flux", "a red circle", 48, 32, 2, 3.5, -1, 2, "bf16", api_name="/generate_flux")
    assert len(gallery) == 2 and len(files) == 2
    assert Image.open(gallery[0]["image"]).size == (48, 32)
    assert isinstance(seed, int) and details["seeds"] == [seed, seed + 1]  # random seed, reported
    assert details["timings"]["total_ms"] > 0 and len(details["timings"]["steps_ms"]) == 2
    assert details["model"] == "tiny-flux" and details["runs_as"] == "BF16"
    meta = _png_settings(files[1])  # the download carries its settings
    assert f"Seed: {seed + 1}" in meta["parameters"] and meta["prism"]["seed"] == seed + 1
    assert "Seed" in summary and "total" in summary and status.startswith("Done")


def test_api_generate_sdxl_with_negative_prompt_and_fixed_seed(client):
    gallery, files, seed, summary, details, status = client.predict(
        "tiny-sdxl", "a blue square", "blurry", 40, 32, 1, 5.0, 1234, 1, "fp16", api_name="/generate_sdxl")
    assert Image.open(gallery[0]["image"]).size == (40, 32)
    assert seed == 1234 and details["negative_prompt"] == "blurry"
    assert details["timings"]["total_ms"] > 0 and details["runs_as"] == "FP16"


def test_api_compare_returns_each_precision_with_figures(client):
    out = client.predict("tiny-flux", "a red circle", 5, ["16-bit", "fp4"], 32, 32, 1, 3.5, api_name="/compare")
    images, heatmaps, figures = out[0:4], out[4:8], out[8:12]
    seed, summary, details, status = out[12:]
    assert images[0] and images[2] and images[1] is None and images[3] is None  # 16-bit and FP4 selected
    assert figures[3] == "*Not selected.*"
    assert Image.open(images[2]).size == (32, 32) and Image.open(heatmaps[2]).size == (32, 32)
    assert heatmaps[0] is None  # the reference has nothing to differ from
    assert "Latency" in figures[2] and "FP4 weights, 16-bit compute" in figures[2] and "PSNR" in figures[2]
    assert figures[1] == "*Not selected.*"
    assert seed == 5 and details["reference"] == "bf16"
    fp4 = details["entries"][1]
    assert fp4["precision"] == "fp4" and fp4["ssim"] is not None and fp4["latency_ms"] > 0


def test_api_error_is_a_message_and_the_app_keeps_serving(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="width 40 is not a multiple of 16; use 32 or 48"):
        client.predict("tiny-flux", "a red circle", 40, 32, 1, 3.5, 1, 1, "bf16", api_name="/generate_flux")
    # Only the offered models, by name (Gradio's dropdown refuses others before our check does), never a path.
    with pytest.raises(AppError, match="tiny-sdxl is not in the list of choices"):
        client.predict("tiny-sdxl", "a red circle", 32, 32, 1, 3.5, 1, 1, "bf16", api_name="/generate_flux")
    with pytest.raises(AppError, match="/etc is not in the list of choices"):
        client.predict("/etc", "a red circle", 32, 32, 1, 3.5, 1, 1, "bf16", api_name="/generate_flux")
    with pytest.raises(AppError, match="flux.1-schnell is not in the local Hugging Face cache and offline mode is on"):
        client.predict("flux.1-schnell", "a red circle", 256, 256, 1, 0, 1, 1, "bf16", api_name="/generate_flux")
    # Compare refuses an empty prompt as the other tabs do (it has no examples under its prompt to point at).
    with pytest.raises(AppError, match=r"^Type a prompt first: describe the picture such as \"[^\"]+\"\.$"):
        client.predict("tiny-flux", "  ", 5, ["16-bit", "fp4"], 32, 32, 1, 3.5, api_name="/compare")
    with pytest.raises(AppError) as caught:
        client.predict("tiny-flux", "a red circle", 5, [], 32, 32, 1, 3.5, api_name="/compare")
    assert str(caught.value) == ('Select at least one precision to compare: "16-bit", "FP8", "FP4" or '
                                 '"16-bit, fast (cached)".')
    gallery, *_ = client.predict("tiny-flux", "a red circle", 32, 32, 1, 3.5, 1, 1, "bf16", api_name="/generate_flux")
    assert Image.open(gallery[0]["image"]).size == (32, 32)


def test_api_queue_position_and_busy(client, app):
    """With max_queue=1: a request behind a running job reports its place in line; one more is told "busy"."""
    from gradio_client.exceptions import AppError

    from conftest import worker_held

    service = app[1]
    with worker_held(service.manager, service.choice("tiny-flux").model):
        second = client.submit("tiny-flux", "a red circle", 32, 32, 1, 3.5, 2, 1, "bf16", api_name="/generate_flux")
        deadline = time.monotonic() + 30
        while service.manager.status().queued < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(AppError, match="busy"):
            client.predict("tiny-flux", "x", 32, 32, 1, 3.5, 3, 1, "bf16", api_name="/generate_flux")
        seen = []  # the waiting request's progress text, as its client sees it
        while time.monotonic() < deadline and not any("Queued: 1 job ahead of yours" in d for d in seen):
            seen += [unit.desc or "" for unit in (second.status().progress_data or [])]
            time.sleep(0.1)
        assert any("Queued: 1 job ahead of yours" in d for d in seen), seen
    assert second.result(timeout=60)[2] == 2


def test_api_system_status_unload_and_clear(client, app):
    client.predict("tiny-flux", "a red circle", 32, 32, 1, 3.5, 1, 1, "bf16", api_name="/generate_flux")
    overview, resident, choices, cache, raw, message = client.predict(api_name="/system_status")
    assert "CPU" in overview and "system RAM" in overview and "Backend" in overview
    assert "tiny-flux" in raw["resident_models"]
    assert any(row[0] == "tiny-flux" for row in resident["data"])
    overview, resident, choices, cache, raw, message = client.predict("tiny-flux", api_name="/unload_model")
    assert "Unloaded tiny-flux" in message and "tiny-flux" not in raw["resident_models"]
    stray = app[1].manager.engine_cache.root / "stale.engine"  # an artifact with no manifest: listed, then cleared
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"x" * 1000)
    overview, resident, choices, cache, raw, message = client.predict(api_name="/system_status")
    assert cache["data"][0][-1] == "stale.engine" and "rebuilt on use" in cache["data"][0][0]
    *_, raw, message = client.predict(api_name="/clear_engine_cache")
    assert "Cleared the engine cache: 1 engine(s)" in message and raw["engine_cache"]["entries"] == []
    assert not stray.exists()


def test_api_self_check_streams_the_doctor_table_and_writes_its_report(client, monkeypatch):
    """The System tab's Self-check is `python -m pipelines doctor` (tests/test_doctor.py covers its checks); a
    zero budget keeps this one to the reference render and the rows known without running."""
    import pipelines.doctor as doctor

    real = doctor.run_doctor
    monkeypatch.setattr(doctor, "run_doctor", lambda device, on_check=None: real(device, 0, on_check=on_check))
    table, report_file = client.predict(api_name="/self_check")
    assert "Self-check done: no failures." in table
    assert "| torch | bf16 | verified |" in table and "| torch | fp8 | not run |" in table
    assert "| TensorRT |" in table  # the machine's facts follow the rows
    data = json.loads(Path(report_file["value"] if isinstance(report_file, dict) else report_file).read_text())
    assert data["ok"] is True and data["checks"][0]["detail"].startswith("reference image")


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def page(app):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install playwright` (CI installs it; the browser test "
                    "must run, not skip).")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (CI installs it).")
    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        # Loopback only: any request elsewhere is refused and remembered; the page must not make any.
        elsewhere: list[str] = []

        def refuse(route):
            elsewhere.append(route.request.url)
            route.abort()

        page.route(lambda url: not url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")), refuse)
        page.goto(app[0], timeout=60_000)
        page.wait_for_selector("#flux-prompt textarea")
        yield page
        browser.close()
    assert elsewhere == [], f"the page asked for non-loopback addresses: {elsewhere}"


def _fill_size(page, tab: str, width: int, height: int, steps: int) -> None:
    page.fill(f"#{tab}-width input", str(width))
    page.fill(f"#{tab}-height input", str(height))
    page.fill(f"#{tab}-steps input[type=number]", str(steps))


def _image_size(page, selector: str) -> tuple[int, int]:
    img = page.locator(selector).first
    img.wait_for()
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
    return tuple(img.evaluate("el => [el.naturalWidth, el.naturalHeight]"))


def _open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _screenshot(page, name: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    for close in page.locator(".toast-close").all():  # earlier, intended error toasts would hide the view
        try:
            close.click(timeout=2_000)
        except PlaywrightTimeout:  # the toast closed itself first (seen once in CI: a 90 s wait for a gone node)
            pass
    expect(page.locator(".toast-close")).to_have_count(0, timeout=10_000)  # gone, not fading
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _choose(page, dropdown: str, option: str) -> None:
    page.click(f"{dropdown} input")
    page.get_by_role("option", name=option, exact=True).click()


def test_browser_flux_tab(page, app):
    """Model defaults, a validation error, the progress bar, Stop, then an image of the requested size."""
    from playwright.sync_api import expect

    _open_tab(page, "Flux.1")
    guidance = page.locator("#flux-guidance input[type=number]")
    expect(guidance).to_have_value("3.5")
    _choose(page, "#flux-model", "tiny-flux-schnell")  # the model's own defaults replace the previous ones
    expect(guidance).to_have_value("0")
    expect(page.locator("#flux-model-note")).to_contain_text("tiny-flux-schnell")
    _choose(page, "#flux-model", "tiny-flux")
    expect(guidance).to_have_value("3.5")
    page.fill("#flux-prompt textarea", "a red circle")
    _fill_size(page, "flux", 40, 32, steps=1)  # 40: not a multiple of 16
    page.click("#flux-generate")
    expect(page.locator("#flux-status")).to_contain_text("width 40 is not a multiple of 16; use 32 or 48")
    # A running job shows its denoising progress bar, and Stop ends it. The job is held at step 2 (by a
    # progress listener on the manager's worker) so that the check does not race a fast CPU.
    release = threading.Event()
    manager = app[1].manager
    submit = manager.submit

    def submit_and_hold(request, on_progress=None):
        def listener(progress):
            if on_progress is not None:
                on_progress(progress)
            if progress.stage == "denoise" and progress.done == 2:
                release.wait(60)
        return submit(request, listener)

    manager.submit = submit_and_hold
    try:
        page.fill("#flux-width input", "32")
        page.fill("#flux-steps input[type=number]", "4")
        page.click("#flux-generate")
        expect(page.locator("#flux-gallery")).to_contain_text("Denoising: step 2/4")
        page.click("#flux-stop")
        expect(page.locator("#flux-status")).to_contain_text("Stopped")
    finally:
        release.set()
        del manager.submit  # the class's own method again
    # and a valid job still works afterwards
    _fill_size(page, "flux", 48, 32, steps=1)
    page.click("#flux-generate")
    expect(page.locator("#flux-status")).to_contain_text("Done: 1 image")
    assert _image_size(page, "#flux-gallery img") == (48, 32)
    expect(page.locator("#flux-summary")).to_contain_text("Timings")
    used = re.search(r"Seed: (\d+)", page.locator("#flux-summary").inner_text()).group(1)
    page.click("#flux-reuse-seed")  # the random seed that was used, back into the seed field
    expect(page.locator("#flux-seed input")).to_have_value(used)
    expect(page.locator("#flux-files")).to_contain_text(".png")
    _screenshot(page, "ui-flux.png")


def test_browser_sdxl_tab(page):
    from playwright.sync_api import expect

    _open_tab(page, "SDXL")
    page.fill("#sdxl-prompt textarea", "a blue square")
    page.fill("#sdxl-negative textarea", "blurry")
    _fill_size(page, "sdxl", 40, 32, steps=1)  # SDXL sizes are multiples of 8
    page.click("#sdxl-generate")
    expect(page.locator("#sdxl-status")).to_contain_text("Done: 1 image")
    assert _image_size(page, "#sdxl-gallery img") == (40, 32)
    expect(page.locator("#sdxl-summary")).to_contain_text("Ran as")
    _screenshot(page, "ui-sdxl.png")


def test_browser_compare_tab(page):
    from playwright.sync_api import expect

    _open_tab(page, "Compare")
    page.fill("#compare-prompt textarea", "a red circle")
    page.get_by_text("Size, steps and guidance").click()
    page.fill("#compare-steps input[type=number]", "1")
    page.locator("#compare-precisions").get_by_label("FP8").uncheck()  # FP8's column must stay empty
    page.click("#compare-run")
    expect(page.locator("#compare-status")).to_contain_text("Done: 2 of 2 precisions")
    for key in ("16bit", "fp4"):
        assert _image_size(page, f"#compare-image-{key} img") == (32, 32)
        expect(page.locator(f"#compare-figures-{key}")).to_contain_text("Latency")
        expect(page.locator(f"#compare-figures-{key}")).to_contain_text("Peak memory")
        expect(page.locator(f"#compare-figures-{key}")).to_contain_text("Ran as")
    expect(page.locator("#compare-figures-fp4")).to_contain_text("FP4 weights, 16-bit compute")
    expect(page.locator("#compare-figures-fp4")).to_contain_text("PSNR")
    expect(page.locator("#compare-figures-fp4")).to_contain_text("SSIM")
    assert _image_size(page, "#compare-heatmap-fp4 img") == (32, 32)
    expect(page.locator("#compare-heatmap-16bit")).to_be_hidden()  # the reference has no difference map to show
    assert page.locator("#compare-image-fp8 img").count() == 0
    expect(page.locator("#compare-figures-fp8")).to_contain_text("Not selected")
    # the before/after slider holds the 16-bit and FP4 images; the heat maps have a visible scale
    expect(page.locator("#compare-slider img")).to_have_count(2)
    expect(page.locator("#compare-slider")).to_contain_text("Before / after: BF16 | FP4")
    expect(page.locator("#compare-legend")).to_contain_text("0 (black) to 64/255 or more (pale yellow)")
    assert _image_size(page, "#compare-legend img") == (256, 16)
    shown = page.locator("#compare-image-fp4 img").bounding_box()
    assert shown["width"] > 32 * 4  # enlarged for display, not a 32 px stamp in a big box
    expect(page.locator("#compare-16bit-note")).to_contain_text("is BF16")  # what will run, for this model here
    _screenshot(page, "ui-compare.png")
    page.fill("#compare-prompt textarea", "")  # a refusal reads whole in the status line, no badge over it
    page.click("#compare-run")
    expect(page.locator("#compare-status")).to_contain_text("Type a prompt first")
    expect(page.locator("#compare-status .error")).to_be_hidden()


def test_browser_system_tab(page, app):
    from playwright.sync_api import expect

    from pipelines.request import GenerationRequest

    service = app[1]
    flux = service.choice("tiny-flux").model
    service.manager.generate(GenerationRequest("x", flux, width=32, height=32, steps=1), timeout=120)  # something resident
    _open_tab(page, "System")
    expect(page.locator("#system-overview")).to_contain_text("Device")
    expect(page.locator("#system-overview")).to_contain_text("system RAM")
    expect(page.locator("#system-resident")).to_contain_text("tiny-flux")
    _screenshot(page, "ui-system.png")
    page.click("#system-unload")  # the first resident model is preselected
    expect(page.locator("#system-message")).to_contain_text(re.compile(r"Unloaded \S+: [\d.]+ MiB released"))


def test_api_parameters_and_outputs_have_real_names_types_and_defaults(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    params = {p["parameter_name"]: p for p in api["/generate_sdxl"]["parameters"]}
    assert list(params) == ["model", "prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed",
                            "num_images", "precision", "sampler", "input_image", "strength", "mask_blur", "only_masked",
                            "lora", "lora_scale", "lora_2", "lora_2_scale", "cached", "refiner", "refiner_switch"]
    assert (params["refiner"]["python_type"]["type"], params["refiner_switch"]["python_type"]["type"]) == \
        ("bool", "float")
    assert (params["strength"]["python_type"]["type"], params["mask_blur"]["python_type"]["type"],
            params["only_masked"]["python_type"]["type"], params["cached"]["python_type"]["type"]) == \
        ("float", "int", "bool", "bool")
    assert {n: params[n]["python_type"]["type"] for n in ("width", "height", "steps", "seed", "num_images")} == \
        dict.fromkeys(("width", "height", "steps", "seed", "num_images"), "int")
    assert params["guidance"]["python_type"]["type"] == "float"
    assert not params["prompt"]["parameter_has_default"]
    assert all(params[n]["parameter_has_default"] for n in params if n != "prompt")
    assert [r["label"] for r in api["/generate_sdxl"]["returns"]] == [
        "Images", "PNG files (with generation settings in their metadata)", "Seed used", "Summary", "Details", "Status"]
    assert api["/unload_model"]["parameters"][0]["python_type"]["type"] == "str"
    assert not any(r["label"].startswith("value_") for ep in api.values() for r in ep["returns"])


def test_api_sdxl_without_a_negative_prompt_by_keyword(client):
    gallery, files, seed, summary, details, status = client.predict(
        model="tiny-sdxl", prompt="a blue square", width=40, height=32, steps=1, seed=7, api_name="/generate_sdxl")
    assert seed == 7 and details["negative_prompt"] == "" and Image.open(gallery[0]["image"]).size == (40, 32)


def test_api_fractions_and_text_in_whole_number_fields_are_refused_not_rounded(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"seed must be a whole number; got 1\.5\."):
        client.predict(model="tiny-flux", prompt="a red circle", width=32, height=32, steps=1, seed=1.5,
                       api_name="/generate_flux")
    with pytest.raises(AppError, match=r"steps must be a whole number; got 2\.5\."):
        client.predict(model="tiny-flux", prompt="a red circle", width=32, height=32, steps=2.5,
                       api_name="/generate_flux")
    with pytest.raises(AppError, match=r"Unknown model|not loaded"):
        client.predict(model="nothing-loaded", api_name="/unload_model")


def test_browser_controls_and_status_stay_in_view_at_1280x720(page):
    page.set_viewport_size({"width": 1280, "height": 720})
    try:
        for tab, prefix in (("Flux.1", "flux"), ("SDXL", "sdxl")):
            _open_tab(page, tab)
            page.evaluate("window.scrollTo(0, 0)")
            for part in ("generate", "stop", "status"):
                box = page.locator(f"#{prefix}-{part}").bounding_box()
                assert box is not None and box["y"] + min(box["height"], 40) <= 720, (prefix, part, box)
        page.screenshot(path=str(ARTIFACTS / "ui-sdxl-1280x720.png"))
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})


def test_browser_results_are_whole_and_sharp_and_examples_fill_the_prompt(page):
    from playwright.sync_api import expect

    _open_tab(page, "Flux.1")
    page.locator("#flux-examples button").first.click()  # tiny-flux is no demo model: the Flux examples
    expect(page.locator("#flux-prompt textarea")).to_have_value(re.compile("red fox"))
    _fill_size(page, "flux", 32, 128, steps=1)  # tall and small: cropping or blurring would show
    page.fill("#flux-seed input", "3")
    page.click("#flux-generate")
    expect(page.locator("#flux-status")).to_contain_text("Done: 1 image")
    img = page.locator("#flux-gallery img").first
    assert _image_size(page, "#flux-gallery img") == (32, 128)  # the file keeps its size
    style = img.evaluate("el => [getComputedStyle(el).objectFit, getComputedStyle(el).imageRendering]")
    assert style == ["contain", "pixelated"]
    shown, box = img.bounding_box(), page.locator("#flux-gallery").bounding_box()
    assert shown["height"] > 128 * 2  # enlarged for display
    assert box["y"] <= shown["y"] and shown["y"] + shown["height"] <= box["y"] + box["height"] + 1  # not cut off
    _screenshot(page, "ui-flux-tall.png")


def test_browser_errors_clear_the_previous_result_and_empty_prompts_get_a_hint(page):
    from playwright.sync_api import expect

    _open_tab(page, "Flux.1")
    page.fill("#flux-prompt textarea", "a red circle")
    _fill_size(page, "flux", 32, 32, steps=1)
    page.click("#flux-generate")
    expect(page.locator("#flux-status")).to_contain_text("Done: 1 image")
    expect(page.locator("#flux-gallery img")).to_have_count(1)
    page.fill("#flux-steps input[type=number]", "2.5")  # the slider's number box takes a fraction
    page.click("#flux-generate")
    expect(page.locator("#flux-status")).to_contain_text("steps must be a whole number; got 2.5.")
    expect(page.locator("#flux-gallery img")).to_have_count(0)  # the last picture is not taken for this run's
    expect(page.locator("#flux-summary")).to_have_text("")
    page.fill("#flux-steps input[type=number]", "1")
    page.fill("#flux-prompt textarea", "  ")
    page.click("#flux-generate")
    expect(page.locator("#flux-status")).to_contain_text("Type a prompt first")
    # The message is readable whole: no "Error" badge is drawn over the status line (the toast and the result box
    # still say it failed).
    expect(page.locator("#flux-status .error")).to_be_hidden()
    expect(page.locator("#flux-status [data-testid=markdown]")).to_be_visible()


def test_browser_a_second_user_sees_their_place_in_the_queue(page, app):
    from playwright.sync_api import expect

    from conftest import worker_held

    service = app[1]
    other = page.context.browser.new_context(viewport={"width": 1280, "height": 720})
    second = other.new_page()
    try:
        second.goto(app[0], timeout=60_000)
        second.fill("#flux-prompt textarea", "a red circle")
        _fill_size(second, "flux", 32, 32, steps=1)
        with worker_held(service.manager, service.choice("tiny-flux").model):
            second.click("#flux-generate")
            expect(second.locator("#flux-gallery")).to_contain_text("Queued: 1 job ahead of yours")
            second.screenshot(path=str(ARTIFACTS / "ui-flux-queued.png"))
        expect(second.locator("#flux-status")).to_contain_text("Done: 1 image")
    finally:
        other.close()


def test_browser_history_keeps_every_result_and_puts_settings_back(page):
    from playwright.sync_api import expect

    _open_tab(page, "SDXL")
    thumbs = page.locator("#sdxl-history img")
    before = thumbs.count()
    page.fill("#sdxl-prompt textarea", "a green star")
    page.fill("#sdxl-negative textarea", "")
    _fill_size(page, "sdxl", 48, 32, steps=2)
    page.fill("#sdxl-seed input", "11")
    page.click("#sdxl-generate")
    expect(page.locator("#sdxl-status")).to_contain_text("Done: 1 image")
    page.fill("#sdxl-prompt textarea", "a purple circle")
    _fill_size(page, "sdxl", 32, 40, steps=1)
    page.fill("#sdxl-seed input", "12")
    page.click("#sdxl-generate")
    expect(page.locator("#sdxl-status")).to_contain_text("Done: 1 image")
    expect(thumbs).to_have_count(before + 2)  # both runs are kept, newest first
    thumbs.nth(1).click()  # the earlier run
    expect(page.locator("#sdxl-history-picked")).to_contain_text("seed 11, 48x32, 2 steps")
    page.click("#sdxl-history-settings")
    expect(page.locator("#sdxl-prompt textarea")).to_have_value("a green star")
    expect(page.locator("#sdxl-width input")).to_have_value("48")
    expect(page.locator("#sdxl-steps input[type=number]")).to_have_value("2")
    expect(page.locator("#sdxl-seed input")).to_have_value("11")
    page.fill("#sdxl-seed input", "-1")
    page.click("#sdxl-history-seed")
    expect(page.locator("#sdxl-seed input")).to_have_value("11")
    # "Use as input" opens the closed input box, so the picture the next run starts from is on screen.
    expect(page.locator("#sdxl-input-image")).to_be_hidden()
    page.click("#sdxl-history-input")
    expect(page.locator("#sdxl-input-image")).to_be_visible()
    expect(page.locator("#sdxl-input-image img, #sdxl-input-image canvas").first).to_be_visible()
    _screenshot(page, "ui-sdxl-history.png")
    page.reload()  # a fresh form: the input image set here would turn the later SDXL tests into image to image
    page.wait_for_selector("#flux-prompt textarea")


def test_api_sampler_choice_is_recorded_in_the_png(client):
    gallery, files, seed, summary, details, status = client.predict(
        model="tiny-sdxl", prompt="a blue square", width=32, height=32, steps=2, seed=5, sampler="DPM++ 2M Karras",
        api_name="/generate_sdxl")
    assert details["sampler"] == "DPM++ 2M Karras"
    assert "Sampler: DPM++ 2M Karras" in _png_settings(files[0])["parameters"]


def test_api_loras_from_the_picker_change_the_image_and_are_recorded(client):
    kw = dict(model="tiny-flux", prompt="a red circle", width=32, height=32, steps=2, seed=9, api_name="/generate_flux")
    plain = client.predict(**kw)
    styled = client.predict(**kw, lora="ink", lora_scale=0.8)
    meta = _png_settings(styled[1][0])
    assert meta["prism"]["loras"] == [["ink", 0.8]] and "<lora:ink:0.8>" in meta["parameters"]
    assert "Lora hashes: \"ink: " in meta["parameters"]
    assert Image.open(plain[1][0]).tobytes() != Image.open(styled[1][0]).tobytes()
    out = client.predict(model="tiny-flux", prompt="a red circle", seed=5, precisions=["16-bit"], width=32, height=32,
                         steps=1, guidance=3.5, lora="ink", lora_scale=1.0, api_name="/compare")
    assert out[-2]["loras"] == [["ink", 1.0]] and out[-1].startswith("Done")


def test_api_a_bad_lora_is_one_line_and_the_app_keeps_serving(client):
    from gradio_client.exceptions import AppError

    kw = dict(model="tiny-flux", prompt="a red circle", width=32, height=32, steps=1, seed=9, api_name="/generate_flux")
    for bad, message in ((dict(lora="nope"), "Unknown LoRA 'nope'; available LoRAs: ink."),
                         (dict(lora="ink", lora_scale=7), "LoRA ink: scale 7 is outside -4..4"),
                         (dict(lora="/etc/passwd.safetensors"), "Unknown LoRA 'passwd.safetensors'")):
        with pytest.raises(AppError, match=re.escape(message)):
            client.predict(**kw, **bad)
    assert client.predict(**kw, lora="ink")[5].startswith("Done")


def test_browser_lora_picker_on_every_generating_tab(page):
    """Each tab offers the loras/ folder by name with a scale; a chosen LoRA runs and is reported."""
    from playwright.sync_api import expect

    for tab, prefix in (("SDXL", "sdxl"), ("Compare", "compare"), ("Flux.1", "flux")):
        _open_tab(page, tab)
        page.locator(f"#{prefix}-loras").get_by_text("LoRAs").click()
        expect(page.locator(f"#{prefix}-lora-1")).to_be_visible()
        expect(page.locator(f"#{prefix}-lora-2-scale")).to_be_visible()
    _choose(page, "#flux-lora-1", "ink")
    page.fill("#flux-lora-1-scale input[type=number]", "0.5")
    page.fill("#flux-prompt textarea", "a red circle")
    _fill_size(page, "flux", 32, 32, steps=1)
    page.click("#flux-generate")
    expect(page.locator("#flux-status")).to_contain_text("Done: 1 image")
    expect(page.locator("#flux-summary")).to_contain_text("LoRAs: ink × 0.5")
    _screenshot(page, "ui-flux-lora.png")


def test_api_fast_cached_generates_and_compares_against_uncached(client):
    gallery, files, seed, summary, details, status = client.predict(
        "tiny-flux", "a red circle", 32, 32, 9, 3.5, 6, 1, "bf16", api_name="/generate_flux", cached=True)
    assert details["cache"] == "fast" and "fast (cached steps)" in summary
    # 9 steps under Flux's schedule: 3 first, one of the middle 4, 2 last
    assert details["timings"]["model_calls"] == 6 and "9 steps (6 ran the model)" in summary
    out = client.predict("tiny-flux", "a red circle", 6, ["16-bit", "cached"], 32, 32, 9, 3.5, api_name="/compare")
    images, heatmaps, figures, details = out[0:4], out[4:8], out[8:12], out[14]
    assert images[0] and images[3] and heatmaps[3] and images[1] is None
    assert "fast (cached)" in figures[3] and "PSNR" in figures[3]
    assert [e["cached"] for e in details["entries"]] == [False, True]


def test_api_sdxl_refiner_runs_and_is_recorded(client):
    gallery, files, seed, summary, details, status = client.predict(
        model="tiny-sdxl-base", prompt="a blue square", width=32, height=32, steps=4, seed=7, refiner=True,
        refiner_switch=0.5, api_name="/generate_sdxl")
    assert "**Refiner:** tiny-sdxl-refiner ran the last 2 of 4 steps (hand-off at 0.5)" in summary
    assert details["refiner"] == 0.5 and details["refiner_model"] == "tiny-sdxl-refiner"
    png = _png_settings(files[0])
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.5" in png["parameters"]


def test_api_refiner_on_a_model_without_one_is_one_line(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"tiny-sdxl has no refiner \(the refiner finishes sdxl-base-1.0 images\)"):
        client.predict(model="tiny-sdxl", prompt="x", width=32, height=32, steps=2, refiner=True,
                       api_name="/generate_sdxl")
    with pytest.raises(AppError, match="refiner switch must be above 0 and below 1"):
        client.predict(model="tiny-sdxl-base", prompt="x", width=32, height=32, steps=2, refiner=True,
                       refiner_switch=1.5, api_name="/generate_sdxl")
    *_, status = client.predict(model="tiny-sdxl-base", prompt="x", width=32, height=32, steps=2, seed=1,
                                api_name="/generate_sdxl")  # still serving
    assert status.startswith("Done")


def test_browser_refiner_switch_shows_for_models_that_have_one(page):
    from playwright.sync_api import expect

    _open_tab(page, "SDXL")
    row = page.locator("#sdxl-refiner-row")
    _choose(page, "#sdxl-model", "tiny-sdxl")
    expect(row).to_be_hidden()
    _choose(page, "#sdxl-model", "tiny-sdxl-base")
    expect(row).to_be_visible()
    expect(page.locator("#sdxl-refiner")).to_contain_text("Refiner (tiny-sdxl-refiner)")
    page.fill("#sdxl-prompt textarea", "a blue square")
    _fill_size(page, "sdxl", 32, 32, steps=4)
    page.locator("#sdxl-refiner input[type=checkbox]").check()
    page.fill("#sdxl-refiner-switch input[type=number]", "0.5")
    page.locator("#sdxl-refiner-switch input[type=number]").press("Enter")
    page.click("#sdxl-generate")
    expect(page.locator("#sdxl-status")).to_contain_text("Done: 1 image")
    expect(page.locator("#sdxl-summary")).to_contain_text("Refiner: tiny-sdxl-refiner ran the last 2 of 4 steps")
    _screenshot(page, "ui-sdxl-refiner.png")
    _choose(page, "#sdxl-model", "tiny-sdxl")  # the switch goes off with the row: no leftover refiner request
    expect(row).to_be_hidden()
    page.click("#sdxl-generate")
    expect(page.locator("#sdxl-status")).to_contain_text("Done: 1 image")
    expect(page.locator("#sdxl-summary")).not_to_contain_text("Refiner")
