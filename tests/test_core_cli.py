"""The CLI end to end (subprocess, as a user runs it) and PNG metadata round trips."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.pngmeta import infotext, parse_infotext, png_bytes, read_png_metadata, save_png

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                                "PRISM_ENGINE_CACHE": str(ROOT / "test-artifacts" / "engine_cache")})


def test_png_metadata_round_trips(tmp_path):
    settings = {"prompt": "a red fox, snow", "negative_prompt": "blurry", "steps": 28, "guidance": 3.5,
                "width": 64, "height": 48, "model": "my-flux", "precision": "fp4",
                "runs_as": "FP4 weights, 16-bit compute", "backend": "PyTorch (eager)", "seeds": [42]}
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    path = save_png(tmp_path / "a.png", image, settings, seed=42, sampler="Euler")
    meta = read_png_metadata(path)
    assert meta["settings"] == {**settings, "seed": 42}
    fields = parse_infotext(meta["parameters"])
    assert fields["prompt"] == "a red fox, snow" and fields["negative_prompt"] == "blurry"
    assert (fields["Steps"], fields["Seed"], fields["Size"], fields["CFG scale"]) == ("28", "42", "64x48", "3.5")
    assert fields["Model"] == "my-flux" and fields["Precision"] == "FP4 weights, 16-bit compute"
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert not list(tmp_path.glob("*.part"))


def test_infotext_omits_an_empty_negative_prompt():
    text = infotext({"prompt": "x", "negative_prompt": "", "steps": 4}, seed=1)
    assert "Negative prompt" not in text and text.startswith("x\nSteps: 4")
    assert read_png_metadata(png_bytes(Image.new("RGB", (8, 8)), {"prompt": "x"}, 3))["settings"]["seed"] == 3


def test_cli_generate_writes_pngs_with_metadata(tiny_flux, tmp_path):
    out = tmp_path / "img.png"
    proc = run_cli("generate", "a red circle", "--model", str(tiny_flux), "--precision", "fp8", "--num-images", "2",
                   "--seed", "21", "--steps", "2", "--width", "48", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    paths = [tmp_path / "img-1.png", tmp_path / "img-2.png"]
    assert all(p.is_file() for p in paths)
    assert Image.open(paths[0]).size == (48, 32)
    meta = [read_png_metadata(p)["settings"] for p in paths]
    assert [m["seed"] for m in meta] == [21, 22] and meta[0]["precision"] == "fp8"
    assert meta[0]["runs_as"].startswith("FP8 (CPU emulation")  # ", FP32 compute)" on a CPU without fast bf16
    assert meta[0]["model"] == "tiny-flux"  # the model's name, not the folder's path
    assert "FP8 (CPU emulation" in proc.stdout and "2 steps" in proc.stdout


def test_cli_errors_list_the_choices_and_exit_nonzero():
    proc = run_cli("generate", "x", "--model", "nope", "--device", "cpu")
    assert proc.returncode == 2
    assert "Unknown model 'nope'. Choose one of: flux.1-dev" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("generate", "x", "--model", "flux.1-dev", "--width", "1000", "--device", "cpu")
    assert proc.returncode == 2 and "use 992 or 1008" in proc.stderr
    proc = run_cli("generate", "x", "--precision", "int3")
    assert proc.returncode == 2 and "invalid choice: 'int3'" in proc.stderr


def test_cli_offline_hub_model_explains_what_to_do(tmp_path):
    proc = run_cli("generate", "x", "--model", "flux.1-schnell", "--device", "cpu")
    assert proc.returncode == 2
    assert "offline mode is on" in proc.stderr and "hf download black-forest-labs/FLUX.1-schnell" in proc.stderr
