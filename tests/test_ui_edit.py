"""The Edit tab and the /edit_image endpoint with a tiny Kontext model on the CPU (the app started in-process on a
free loopback port): edits by instruction, the before/after slider, "Use as input", history, Compare on an edit,
and one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.test_ui_app import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, WAIT_MS, _image_size, _open_tab, _screenshot, free_port


def circle_on_blue(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (20, 40, 200))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(220, 20, 20))
    return image


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_flux, tiny_kontext):
    from pipelines.cpu_math import FAST_CPU
    from pipelines.loading import HubOptions
    from pipelines.manager import ManagerConfig
    from ui.launch import LaunchOptions, start

    config = ManagerConfig(device="cpu", hub=HubOptions(offline=True), cpu_math=FAST_CPU,
                           engine_cache_dir=tmp_path_factory.mktemp("engine-cache"))
    opts = LaunchOptions(port=free_port(), models=(str(tiny_flux), str(tiny_kontext)), manager=config,
                         output_dir=tmp_path_factory.mktemp("outputs"))
    demo, service = start(opts, block=False)
    yield f"http://127.0.0.1:{opts.port}/", service
    demo.close()
    service.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app[0], verbose=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "circle.png"
    circle_on_blue(48, 40).save(path)
    return path


def _settings(path: str) -> dict:
    return json.loads(Image.open(path).text["prism"])


def test_api_edit_image(client, source):
    from gradio_client import handle_file

    from pipelines.image_input import read_image

    slider, gallery, files, seed, summary, details, status = client.predict(
        model="tiny-kontext", instruction="make the circle blue", input_image=handle_file(str(source)), steps=2,
        seed=9, num_images=2, precision="bf16", api_name="/edit_image")
    assert status.startswith("Done: 2 edits") and seed == 9 and len(files) == 2
    size = Image.open(source).size
    assert f"**Input image:** {size[0]}×{size[1]} · edited by instruction" in summary
    before, after = slider
    assert Image.open(before).size == Image.open(after).size == (32, 32)  # the tiny model's preferred size
    settings = _settings(files[0])
    assert settings["prompt"] == "make the circle blue" and settings["model"] == "tiny-kontext"
    assert settings["input_image_sha256"] == read_image(Image.open(source)).sha256 and "strength" not in settings
    assert details["timings"]["vae_encoder_ms"] > 0 and len(details["timings"]["steps_ms"]) == 2


@pytest.mark.parametrize("fields,message", [
    ({"instruction": "make it blue"}, "give it an input image"),
    ({"instruction": "  ", "image": True}, "The instruction is empty"),
    ({"instruction": "make it blue", "image": True, "width": 40}, "not a multiple of 16"),
    ({"instruction": "make it blue", "image": True, "model": "tiny-flux"}, "tiny-flux is not in the list of choices: ['tiny-kontext']"),
    ({"instruction": "make it blue", "image": "not a picture"},
     "input_image is not an image Prism can read; send a PNG, JPEG or WebP file."),
])
def test_api_bad_edits_are_one_line_and_the_app_keeps_serving(client, source, fields, message, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    kwargs = {"model": fields.get("model", "tiny-kontext"), "instruction": fields["instruction"], "steps": 1}
    if fields.get("image") is True:
        kwargs["input_image"] = handle_file(str(source))
    elif fields.get("image"):  # a file that is not an image
        (tmp_path / "photo.png").write_text(fields["image"])
        kwargs["input_image"] = handle_file(str(tmp_path / "photo.png"))
    if "width" in fields:
        kwargs["width"] = fields["width"]
    with pytest.raises(AppError) as caught:
        client.predict(**kwargs, api_name="/edit_image")
    assert message in str(caught.value) and "\n" not in str(caught.value).strip() and "/tmp" not in str(caught.value)
    assert client.predict(model="tiny-kontext", instruction="make it blue", input_image=handle_file(str(source)),
                          steps=1, api_name="/edit_image")[-1].startswith("Done")


def test_api_compare_on_an_edit_uses_the_input_image(client, source):
    """A Kontext model in Compare edits the input image at each precision; the strength widget's value is not sent."""
    from gradio_client import handle_file

    from pipelines.image_input import read_image

    out = client.predict("tiny-kontext", "make the circle blue", 4, ["16-bit", "fp8"], None, None, 2, 2.5,
                         handle_file(str(source)), 0.6, api_name="/compare")
    details = next(o for o in out if isinstance(o, dict) and "entries" in o)
    assert details["input_image_sha256"] == read_image(Image.open(source)).sha256 and details.get("strength") is None
    assert [e["precision"] for e in details["entries"]] == ["bf16", "fp8"]
    assert all(e["latency_ms"] > 0 for e in details["entries"])
    assert Image.open(out[0]).size == (32, 32)


def test_openai_edits_endpoint_runs_a_kontext_edit(app, source):
    """POST /v1/images/edits with a Kontext model: an edit of the uploaded picture (OpenAI's own edit verb)."""
    import base64
    import io

    import httpx

    url = app[0] + "v1/images/edits"
    form = {"model": (None, "tiny-kontext"), "prompt": (None, "make the circle blue"), "seed": (None, "2"),
            "num_inference_steps": (None, "2"), "image": ("in.png", source.read_bytes(), "image/png")}
    answer = httpx.post(url, files=form, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    picture = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert picture.size == (32, 32) and body["prism"]["input_image_sha256"] and "strength" not in body["prism"]
    refused = httpx.post(url, files={**form, "strength": (None, "0.5")}, timeout=120)
    assert refused.status_code == 400 and "takes no strength" in refused.json()["error"]["message"]


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (CI installs it).")
    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.route(lambda url: not url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")),
                   lambda route: route.abort())
        page.goto(app[0], timeout=60_000)
        page.wait_for_selector("#flux-prompt textarea")
        yield page
        browser.close()


def test_browser_edit_tab(page, source):
    """Upload, instruct, edit: the slider holds before and after; "Use as input" chains a second edit; both are
    in the history. An empty instruction is a one-line message."""
    from playwright.sync_api import expect

    _open_tab(page, "Edit")
    expect(page.locator("#edit-model input")).to_have_value("tiny-kontext")
    page.locator("#edit-input-image input[type=file]").set_input_files(str(source))
    expect(page.locator("#edit-input-image img")).to_have_count(1)
    page.click("#edit-run")
    expect(page.locator("#edit-status")).to_contain_text("The instruction is empty")
    page.fill("#edit-instruction textarea", "make the circle blue")
    page.locator("#edit-settings").get_by_text("Settings", exact=True).first.click()
    page.fill("#edit-steps input[type=number]", "1")
    page.click("#edit-run")
    expect(page.locator("#edit-status")).to_contain_text("Done: 1 edit")
    expect(page.locator("#edit-slider img")).to_have_count(2)
    assert _image_size(page, "#edit-gallery img") == (32, 32)
    expect(page.locator("#edit-summary")).to_contain_text("Seed")
    expect(page.locator("#edit-history img")).to_have_count(1)
    first = page.locator("#edit-input-image img").get_attribute("src")
    page.click("#edit-use-result")  # the edit becomes the next input
    expect(page.locator("#edit-input-image img")).not_to_have_attribute("src", first)
    assert _image_size(page, "#edit-input-image img") == (32, 32)
    page.fill("#edit-instruction textarea", "make the background yellow")
    page.click("#edit-run")
    expect(page.locator("#edit-status")).to_contain_text("Done: 1 edit")
    expect(page.locator("#edit-history img")).to_have_count(2)
    _screenshot(page, "ui-edit.png")


def test_browser_edit_examples_fill_the_instruction(page):
    """A real Kontext model's examples are instructions alone: a click fills the instruction box."""
    from playwright.sync_api import expect

    _open_tab(page, "Edit")
    examples = page.locator("#edit-examples")
    expect(examples).to_contain_text("Examples (click to use)")
    examples.get_by_text("make the sky red").click()
    expect(page.locator("#edit-instruction textarea")).to_have_value("make the sky red")


def test_browser_edit_this_picture_sends_a_flux_result_to_the_edit_tab(page, tiny_flux):
    """"Edit this picture" on the Flux tab: before any result a one-line message; after one, the Edit tab opens
    with that picture as its input."""
    from playwright.sync_api import expect

    from pipelines.registry import read_local_spec

    _open_tab(page, "Flux.1")
    page.click("#flux-send-to-edit")
    expect(page.get_by_text("Generate an image first, then edit it.")).to_be_visible()
    page.fill("#flux-prompt textarea", "a red circle")
    page.fill("#flux-steps input[type=number]", "1")
    page.click("#flux-generate")
    expect(page.locator("#flux-status")).to_contain_text("Done: 1 image")
    before = page.locator("#edit-input-image img").get_attribute("src")  # the last edit test's chained input
    page.click("#flux-send-to-edit")
    expect(page.get_by_role("tab", name="Edit")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#edit-input-image img")).not_to_have_attribute("src", before)
    spec = read_local_spec(tiny_flux)  # the Flux tab drew at the model's default size
    assert _image_size(page, "#edit-input-image img") == (spec.default_width, spec.default_height)
