"""The demo LoRA's variation (striped backgrounds) and its training path, run for a few steps on a CPU.
(The trained LoRAs themselves need a GPU: `python -m pipelines.demo train-lora`.)"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.demo.lora_train import MAX_LORA_BYTES, LoraTrainConfig, train_lora
from pipelines.demo.scenes import held_out_captions, parse_caption, render, stripe_mask, stripe_strength, striped
from pipelines.lora import LoraLibrary, load_set
from pipelines.registry import resolve_spec

MODELS = Path(__file__).resolve().parent.parent / "models"


def renders(n: int = 6) -> list[Image.Image]:
    return [render(parse_caption(c), 64) for c in held_out_captions(n)]


def test_stripes_darken_the_background_bands_and_leave_the_shapes():
    plain = torch.stack([torch.from_numpy(np.asarray(im, np.float32)) for im in renders()]).permute(0, 3, 1, 2) / 127.5 - 1
    styled = striped(plain)
    bands = torch.from_numpy(stripe_mask(64))
    background = (plain - plain[:, :, :1, :1]).abs().amax(1) <= 0.02
    changed = (styled != plain).any(1)
    assert torch.equal(changed, background & bands)  # only background pixels on the dark bands
    assert torch.allclose((styled[:, :, bands] + 1)[changed[:, bands].unsqueeze(1).expand(-1, 3, -1)],
                          ((plain[:, :, bands] + 1) * 0.5)[changed[:, bands].unsqueeze(1).expand(-1, 3, -1)])
    as_images = [Image.fromarray(((im.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()) for im in styled]
    assert abs(stripe_strength(renders())) < 0.01 and stripe_strength(as_images) > 0.1


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_the_lora_training_path_runs_on_a_cpu_and_saves_a_lora_prism_loads(family, tmp_path):
    weights = MODELS / f"demo-{family}" / ("transformer" if family == "flux" else "unet")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weights.glob("*.safetensors")}
    cfg = LoraTrainConfig(family=family, models=MODELS, out_dir=tmp_path, device="cpu", batch=4, max_steps=3,
                          minutes=5, eval_prompts=1, log_every=1)
    lines = []
    path = train_lora(cfg, log=lines.append)
    assert path == tmp_path / f"demo-{family}-stripes.safetensors" and 0 < path.stat().st_size <= MAX_LORA_BYTES
    tensors = load_file(str(path))
    ups = [t for k, t in tensors.items() if k.endswith("lora_B.weight")]
    assert ups and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert any(t.abs().max() > 0 for t in ups)  # zero-initialised: non-zero means the adapters trained
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weights.glob("*.safetensors")} == before
    loras = load_set(((path.stem, 1.0),), resolve_spec(f"demo-{family}"), LoraLibrary(tmp_path))
    assert loras.touches("transformer" if family == "flux" else "unet")
    assert any(line.startswith(f"{family} LoRA step 2: loss") for line in lines)
    assert any("stripe strength of 1 held-out prompts through Prism" in line for line in lines)


@pytest.mark.parametrize("model", ["demo-flux", "demo-sdxl"])
def test_the_shipped_demo_loras_change_the_picture_and_scale_0_is_the_base(cpu_manager, model):
    """loras/ ships one LoRA per demo model (trained 72 s each on an H200), so a fresh machine shows a LoRA at work.
    Measured over 8 held-out captions: mean |LoRA - base| 41.6/255 (demo-flux), 32.9/255 (demo-sdxl)."""
    from pipelines.request import GenerationRequest

    path = Path(__file__).resolve().parent.parent / "loras" / f"{model}-stripes.safetensors"
    assert path.stat().st_size <= MAX_LORA_BYTES
    caption = held_out_captions(2)[1]
    images = {}
    for scale in (None, 0.0, 1.0):
        loras = () if scale is None else ((f"{model}-stripes", scale),)
        result = cpu_manager.generate(GenerationRequest(caption, model, seed=1, loras=loras))
        images[scale] = np.asarray(result.images[0], dtype=np.float64)
    assert np.array_equal(images[None], images[0.0])
    assert np.abs(images[1.0] - images[None]).mean() > 5.0
