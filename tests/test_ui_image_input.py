"""Image to image and inpainting in the web app: the input widget's value, and the named API endpoints taking an
image (the app started in-process on a free loopback port, tiny models on the CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ui.input_image import image_and_mask


def test_nothing_painted_is_image_to_image_and_any_paint_is_the_mask():
    background = Image.new("RGB", (32, 24), (0, 0, 255))
    empty_layer = Image.new("RGBA", (32, 24), (0, 0, 0, 0))
    assert image_and_mask({"background": background, "layers": [empty_layer], "composite": None}) == (background, None)
    painted = empty_layer.copy()
    painted.paste((255, 255, 255, 128), (4, 4, 12, 12))
    image, mask = image_and_mask({"background": background, "layers": [empty_layer, painted], "composite": None})
    assert image is background and mask.mode == "L" and mask.getbbox() == (4, 4, 12, 12)
    assert set(np.unique(np.asarray(mask))) == {0, 255}
    assert image_and_mask(None) == (None, None) and image_and_mask({"background": None}) == (None, None)
    assert image_and_mask("picked.png") == ("picked.png", None)  # "Use as input" hands over a file


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_flux, tiny_sdxl):
    from gradio_client import Client

    from pipelines.cpu_math import FAST_CPU
    from pipelines.loading import HubOptions
    from pipelines.manager import ManagerConfig
    from tests.test_ui_app import free_port
    from ui.launch import LaunchOptions, start

    config = ManagerConfig(device="cpu", hub=HubOptions(offline=True), cpu_math=FAST_CPU,
                           engine_cache_dir=tmp_path_factory.mktemp("engine-cache"))
    opts = LaunchOptions(port=free_port(), models=(str(tiny_flux), str(tiny_sdxl)), manager=config,
                         output_dir=tmp_path_factory.mktemp("outputs"))
    demo, service = start(opts, block=False)
    yield Client(f"http://127.0.0.1:{opts.port}/", verbose=False)
    demo.close()
    service.close()


def _editor(tmp_path, image: Image.Image, layer: Image.Image | None = None) -> dict:
    from gradio_client import handle_file

    image.save(tmp_path / "input.png")
    layers = []
    if layer is not None:
        layer.save(tmp_path / "layer.png")
        layers = [handle_file(str(tmp_path / "layer.png"))]
    return {"background": handle_file(str(tmp_path / "input.png")), "layers": layers, "composite": None}


def test_api_image_to_image_records_the_input(client, tmp_path):
    from pipelines.image_input import read_image

    source = Image.new("RGB", (64, 48), (200, 30, 30))
    files, _, seed, summary, details, _ = client.predict(
        "tiny-flux", "a red circle", 32, 32, 4, 3.5, 3, 1, "bf16", "", _editor(tmp_path, source), 0.5, 4, False,
        api_name="/generate_flux")
    assert "**Input image:** 64×48 · image to image, strength 0.5" in summary
    settings = json.loads(Image.open(files[0]["image"] if isinstance(files[0], dict) else files[0]).text["prism"])
    assert settings["strength"] == 0.5 and settings["input_image_sha256"] == read_image(source).sha256
    assert "mask_sha256" not in settings and len(details["timings"]["steps_ms"]) == 2


def test_api_inpainting_takes_the_painted_layer_as_the_mask(client, tmp_path):
    source = Image.new("RGB", (32, 32), (20, 40, 200))
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (8, 8, 24, 24))
    files, _, _, summary, details, _ = client.predict(
        "tiny-sdxl", "a yellow square", "", 32, 32, 3, 5.0, 1, 1, "bf16", "", _editor(tmp_path, source, layer), 1.0, 0,
        False, api_name="/generate_sdxl")
    assert "**Input image:** 32×32 · inpainting where the mask is white, strength 1" in summary
    path = files[0]["image"] if isinstance(files[0], dict) else files[0]
    settings = json.loads(Image.open(path).text["prism"])
    assert settings["mask_sha256"] and settings["mask_blur"] == 0
    out = np.asarray(Image.open(path).convert("RGB")).astype(int)
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    assert np.array_equal(out[outside], np.asarray(source).astype(int)[outside])


def test_api_refuses_a_bad_strength_in_one_line(client, tmp_path):
    with pytest.raises(Exception) as exc:
        client.predict("tiny-flux", "a red circle", 32, 32, 2, 3.5, 1, 1, "bf16", "",
                       _editor(tmp_path, Image.new("RGB", (32, 32))), 1.5, 4, False, api_name="/generate_flux")
    assert "strength must be above 0 and at most 1" in str(exc.value)


def test_api_compare_takes_an_input_image(client, tmp_path):
    from gradio_client import handle_file

    from pipelines.image_input import read_image

    source = Image.new("RGB", (32, 32), (200, 30, 30))
    source.save(tmp_path / "input.png")
    out = client.predict("tiny-flux", "a red circle", 4, ["16-bit", "fp8"], 32, 32, 2, 3.5,
                         handle_file(str(tmp_path / "input.png")), 0.5, api_name="/compare")
    details = next(o for o in out if isinstance(o, dict) and "entries" in o)
    assert details["strength"] == 0.5 and details["input_image_sha256"] == read_image(source).sha256
    assert len(details["entries"]) == 2
