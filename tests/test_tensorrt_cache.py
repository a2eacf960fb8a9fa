"""Every TensorRT artifact lives in the engine cache under a key that names everything that made it.

Engines are found again instead of rebuilt; a different recipe, target, size range or weight source
is a different key; a damaged ONNX data file is rebuilt, not trusted; `python -m pipelines build`
puts every component there and says where; the official ONNX source is fetched with the user's token.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

try:
    import modelopt  # noqa: F401
    import tensorrt_rtx
except ImportError as exc:  # CI installs these (requirements-test.txt); a missing one is a failure, not a skip
    raise ImportError(f"The TensorRT tests need nvidia-modelopt[torch] and tensorrt-rtx-cu13: {exc}") from exc

from pipelines.backends.tensorrt import artifacts, export, official
from pipelines.backends.tensorrt.artifacts import ArtifactBuilder, EngineRequest
from pipelines.backends.tensorrt.quantize import QuantRecipe
from pipelines.engine_cache import EngineCache, Manifest
from pipelines.loading import HubOptions, WeightSource
from pipelines.precision import Precision
from pipelines.registry import resolve_spec

# The same recipe and cache folder as the other TensorRT test modules, so artifacts are made once.
SMALL_FP8 = QuantRecipe(Precision.FP8, prompts=2, steps=2)


def request(spec, component, precision, target, dtype=None, **kw) -> EngineRequest:
    ranges = export.ShapeRanges.for_spec(spec, min_size=32, max_size=128, max_batch=2)
    return EngineRequest(spec, component, precision, ranges, target, graph_dtype=dtype, **kw)


def _fail(*args, **kwargs):
    raise AssertionError("a cached artifact was built again")


def test_engines_are_stored_and_found_under_their_keys(sdxl, trt_cache, monkeypatch):
    builder = ArtifactBuilder(trt_cache)
    for target in ((8, 9), (12, 0)):
        builder.engine(request(sdxl, "vae", Precision.FP16, target, torch.float16))
    req = request(sdxl, "vae", Precision.FP16, (12, 0), torch.float16)
    key = builder.engine_key(req)
    assert trt_cache.lookup(key) == trt_cache.artifact_path(key)
    manifest = Manifest.from_json(trt_cache.manifest_path(key).read_text())
    assert manifest.key == key
    assert (key.model, key.component, key.precision, key.recipe, key.shapes, key.batch, key.target, key.backend,
            key.backend_version) == (sdxl.id, "vae", "float16", "none", "32-128x32-128@32x32", "1-2", "sm120",
                                     "tensorrt-rtx", tensorrt_rtx.__version__)
    assert key.revision.startswith("local-")  # a fingerprint of the folder's weights

    # One ONNX export served both targets.
    onnx_keys = [e.manifest.key for e in trt_cache.entries() if e.manifest and e.manifest.key.backend == "onnx"
                 and e.manifest.key.component == "vae" and e.manifest.key.precision == "float16"
                 and e.manifest.key.model == sdxl.id]
    assert len(onnx_keys) == 1 and onnx_keys[0] == builder.onnx_key(req)

    # Asked again, it comes from the cache: nothing is exported or built.
    monkeypatch.setattr(artifacts, "build_engine", _fail)
    monkeypatch.setattr(export, "export_graph", _fail)
    again = ArtifactBuilder(trt_cache).engine(req)
    assert again.engine == trt_cache.artifact_path(key) and "cached" in again.seconds
    assert again.report.matmuls and set(again.report.matmuls.values()) == {"Half"}


def test_what_changes_an_artifact_changes_its_key(sdxl, tmp_path):
    builder = ArtifactBuilder(EngineCache(tmp_path))
    base = request(sdxl, "unet", Precision.FP8, (8, 9), recipe=SMALL_FP8)
    variants = {
        "recipe": replace(base, recipe=replace(SMALL_FP8, prompts=3)),
        "algorithm-steps": replace(base, recipe=replace(SMALL_FP8, steps=3)),
        "precision": replace(base, precision=Precision.FP4, recipe=QuantRecipe(Precision.FP4, prompts=2, steps=2)),
        "target": replace(base, target=(12, 0)),
        "sizes": replace(base, ranges=export.ShapeRanges.for_spec(sdxl, width=64, height=64)),
        "batch": replace(base, ranges=replace(base.ranges, batch=(1, 1, 4))),
        "weight streaming": replace(base, weight_streaming=True),
        "weights": replace(base, source=WeightSource(random_weights=True)),
    }
    engine_keys = {name: builder.engine_key(r) for name, r in variants.items()}
    assert len({builder.engine_key(base), *engine_keys.values()}) == len(variants) + 1
    assert all(k.filename() != builder.engine_key(base).filename() for k in engine_keys.values())
    # The export does not depend on the GPU, sizes or build flags; the calibration not on the GPU either.
    for name in ("target", "sizes", "batch", "weight streaming"):
        assert builder.onnx_key(variants[name]) == builder.onnx_key(base)
    assert builder.onnx_key(variants["recipe"]) != builder.onnx_key(base)
    assert builder.calibration_key(variants["target"]) == builder.calibration_key(base)
    assert builder.calibration_key(variants["recipe"]) != builder.calibration_key(base)
    # Text encoders are 16-bit at every precision: one engine serves fp16 and fp8 pipelines.
    assert builder.engine_key(request(sdxl, "text_encoder", Precision.FP16, (8, 9))) == \
        builder.engine_key(request(sdxl, "text_encoder", Precision.FP8, (8, 9)))


def test_a_damaged_onnx_data_file_is_rebuilt_not_trusted(sdxl, tmp_path):
    builder = ArtifactBuilder(EngineCache(tmp_path))
    req = request(sdxl, "vae", Precision.FP16, (8, 9), torch.float16)
    path = builder.onnx(req)
    data = path.with_name(path.name + export.DATA_SUFFIX)
    good = data.read_bytes()
    data.write_bytes(good[: len(good) // 2])  # truncated
    assert "bytes" in export.check_data_file(path)
    assert builder.onnx(req) == path and data.read_bytes() == good
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # same size, one byte changed
    data.write_bytes(bytes(flipped))
    assert "checksum" in export.check_data_file(path)
    assert builder.onnx(req) == path and data.read_bytes() == good


def test_build_command_builds_every_component_and_says_where(tiny_sdxl, trt_cache, capsys):
    from pipelines.cli import main

    args = ["build", "--model", str(tiny_sdxl), "--target", "sm120", "--min-size", "32", "--max-size", "128",
            "--max-batch", "2", "--engine-cache", str(trt_cache.root)]
    assert main([*args, "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    for component in ("text_encoder", "text_encoder_2", "unet", "vae"):
        assert f"\n{component} (" in out
    engines = [line.split()[1] for line in out.splitlines() if line.strip().startswith("engine ")]
    assert len(engines) == 4 and all(str(trt_cache.root) in e for e in engines)
    assert all(trt_cache.root.joinpath(e.rsplit("/", 1)[1]).is_file() for e in engines)

    assert main([*args, "--precision", "fp4", "--target", "sm89"]) == 2
    assert "FP4 tensor cores" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--precision", "fp16", "--target", "current"]) == 2
        assert "no GPU here" in capsys.readouterr().err


def test_official_onnx_is_fetched_with_the_users_token(tmp_path):
    spec = resolve_spec("flux.1-dev")
    calls = []

    def download(**kwargs):
        calls.append(kwargs)
        folder = tmp_path / "snapshot" / "transformer.opt" / "fp8"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(b"onnx")
        return str(tmp_path / "snapshot")

    path = official.fetch(spec, "transformer", Precision.FP8, HubOptions(token="hf_user"), download=download)
    assert path == tmp_path / "snapshot" / "transformer.opt" / "fp8" / "model.onnx"
    assert calls[0]["repo_id"] == "black-forest-labs/FLUX.1-dev-onnx" and calls[0]["token"] == "hf_user"
    assert calls[0]["allow_patterns"] == ["transformer.opt/fp8/*"]

    req = EngineRequest(spec, "transformer", Precision.FP8, export.ShapeRanges.for_spec(spec), (12, 1), onnx_source="official")
    key = ArtifactBuilder(EngineCache(tmp_path / "cache")).engine_key(req)
    assert key.recipe == "official:black-forest-labs/FLUX.1-dev-onnx/transformer.opt/fp8@main" and key.target == "sm121"
    with pytest.raises(ValueError, match="no official ONNX"):
        official.fetch(resolve_spec("sdxl-base-1.0"), "unet", Precision.FP8, HubOptions(), download=download)
    with pytest.raises(ValueError, match="not vae"):
        official.fetch(spec, "vae", Precision.BF16, HubOptions(), download=download)
