"""TensorRT engines with LoRAs (CPU builds with TensorRT-RTX): an engine per LoRA set, fused before export,
keyed by the set's digest; FP8 engines re-calibrate on the fused model."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from pipelines.backends.tensorrt import export
from pipelines.backends.tensorrt.artifacts import ArtifactBuilder, EngineRequest
from pipelines.backends.tensorrt.backend import TensorRTBackend
from pipelines.backends.tensorrt.quantize import QuantRecipe
from pipelines.engine_cache import EngineCache
from pipelines.lora import LoraLibrary, load_set, NO_LORAS
from pipelines.precision import Precision
from tests.tiny_loras import FLUX_LAYERS, SDXL_TE, SDXL_UNET, write_kohya, write_peft


def request(spec, component, precision, loras=NO_LORAS, **kw) -> EngineRequest:
    ranges = export.ShapeRanges.for_spec(spec, min_size=32, max_size=64, max_batch=1)
    recipe = None if Precision(precision).is_16bit else QuantRecipe(Precision(precision), prompts=2, steps=2)
    return EngineRequest(spec, component, Precision(precision), ranges, (12, 0), recipe=recipe,
                         graph_dtype=torch.bfloat16 if Precision(precision).is_16bit else None, loras=loras, **kw)


def initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_a_16bit_engine_is_built_with_the_lora_fused_and_keyed_by_its_digest_and_scale(specs, trt_cache, tmp_path):
    spec = specs["flux"]
    write_peft(tmp_path / "ink.safetensors", "transformer", FLUX_LAYERS, seed=1)
    library = LoraLibrary(tmp_path)
    ink, ink_half = (load_set((("ink", s),), spec, library) for s in (1.0, 0.5))
    builder = ArtifactBuilder(trt_cache)
    plain_key, ink_key = (builder.engine_key(request(spec, "transformer", "bf16", s)) for s in (NO_LORAS, ink))
    assert ink_key.revision == plain_key.revision + f"+lora-{ink.digest('transformer')}"
    assert builder.engine_key(request(spec, "transformer", "bf16", ink_half)) != ink_key  # the scale is in the key
    # The VAE does not change with a transformer LoRA: its engine is shared.
    assert builder.engine_key(request(spec, "vae", "bf16", ink)) == builder.engine_key(request(spec, "vae", "bf16"))

    built = builder.engine(request(spec, "transformer", "bf16", ink))
    assert built.engine.is_file() and built.engine.name != builder.engine(request(spec, "transformer", "bf16")).engine.name
    plain = initializers(builder.onnx(request(spec, "transformer", "bf16")))
    fused = initializers(built.onnx)
    changed = {name for name in plain if not np.array_equal(plain[name], fused[name])}
    assert len(changed) == len(FLUX_LAYERS)  # exactly the LoRA's layers, and nothing else


def test_quantized_engines_depend_on_every_lora_of_the_set(specs, tmp_path):
    """An FP8 denoiser is calibrated by running the whole pipeline, so a text-encoder-only LoRA changes it;
    a 16-bit denoiser engine does not depend on it."""
    spec = specs["sdxl"]
    write_kohya(tmp_path / "te-only.safetensors", SDXL_TE, seed=5)
    write_kohya(tmp_path / "both.safetensors", SDXL_UNET + SDXL_TE, seed=6)
    te_only = load_set((("te-only", 1.0),), spec, LoraLibrary(tmp_path))
    builder = ArtifactBuilder(EngineCache(tmp_path / "cache"))
    for precision, changes in (("fp8", True), ("bf16", False)):
        plain, with_te = (request(spec, "unet", precision, s) for s in (NO_LORAS, te_only))
        assert (plain.lora_digest != with_te.lora_digest) is changes
    assert builder.calibration_key(request(spec, "unet", "fp8", te_only)) != builder.calibration_key(request(spec, "unet", "fp8"))
    backend = TensorRTBackend(EngineCache(tmp_path / "cache"))
    both = load_set((("both", 0.7),), spec, LoraLibrary(tmp_path))
    assert backend.lora_variant(spec, "unet", Precision.BF16, both) == both.digest("unet")
    assert backend.lora_variant(spec, "unet", Precision.FP8, both) == both.digest()
    assert backend.lora_variant(spec, "vae", Precision.FP8, both) == ""
