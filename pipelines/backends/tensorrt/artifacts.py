"""The chain of cached artifacts behind one engine: ONNX export -> (calibration -> quantized ONNX) -> plan.

Each step is an entry of the engine cache under its own EngineKey, built only when missing:
- `onnx`: the graph module exported (16-bit, or with FP8/NVFP4 layers from a calibration);
  shape-agnostic, so one export serves every size range and target GPU;
- `calibration`: per-layer activation ranges from a QuantRecipe (small JSON, reused for every target);
- `engine`: the TensorRT plan for one target GPU, size range and batch range, with its build log
  and layer-precision summary beside it.
Alternatively the ONNX comes from the model's official ONNX repository (`official.py`).
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from ...device_policy import DevicePolicy
from ...engine_cache import EngineCache, EngineKey
from ...errors import require_packages
from ...loading import WeightSource, load_component
from ...lora import NO_LORAS, LoraError, LoraSet
from ...precision import Precision
from ...registry import ModelSpec
from ..torch_lora import fuse_into
from . import export, official
from .build import BuildReport, build_engine, read_report, refusal, target_name, timing_cache_path
from .quantize import QuantRecipe, apply_quantization, calibrate
from .trt_api import BuildRefused, BuildSettings, Trt, import_trt

log = logging.getLogger("prism.tensorrt.artifacts")

Report = Callable[[int, int, str], None]  # (done, total, message), e.g. RunContext.report("build", ...)


@dataclass(frozen=True)
class EngineRequest:
    """One engine to have: which component of which model, at which precision, for which GPU and shapes."""

    spec: ModelSpec
    component: str  # a graph component: text_encoder, text_encoder_2, transformer/unet, vae, vae_encoder
    precision: Precision  # the pipeline's precision; only the denoiser is quantized by it
    ranges: export.ShapeRanges
    target: tuple[int, int]
    source: WeightSource = WeightSource()
    recipe: QuantRecipe | None = None  # None: the default recipe for the precision
    onnx_source: str = "export"  # "export" (from the torch modules) | "official" (the model's ONNX repo)
    weight_streaming: bool = False
    graph_dtype: torch.dtype | None = None  # None: the dtype the pipeline runs this component in at `precision`
    # Fused into the weights before export (and calibration): an engine per LoRA set, keyed by its digest.
    loras: LoraSet = NO_LORAS

    @property
    def policy(self) -> DevicePolicy:
        """Dtypes as the target GPU computes them."""
        return DevicePolicy.for_target(self.target)

    @property
    def quantized(self) -> bool:
        return self.component == self.spec.denoiser and not Precision.parse(self.precision).is_16bit

    @property
    def dtype(self) -> torch.dtype:
        if self.graph_dtype is not None:
            return self.graph_dtype
        if self.component == self.spec.denoiser:
            return self.policy.compute_dtype(self.spec, self.precision)
        weights = export.component_io(self.spec, self.component).weights
        return self.policy.component_dtype(self.spec, weights, self.precision)

    @property
    def lora_digest(self) -> str:
        """The LoRAs this engine's weights depend on: the component's own, and for a quantized denoiser every
        LoRA of the set (its calibration ran the whole pipeline, text encoders included)."""
        return self.loras.digest(None if self.quantized else export.component_io(self.spec, self.component).weights)

    @property
    def quant_recipe(self) -> QuantRecipe | None:
        return (self.recipe or QuantRecipe(self.precision)) if self.quantized else None

    def needs(self) -> tuple[Precision, ...]:
        """Precisions the engine's GPU must run: BF16 layers, and the quantized format."""
        needs = [Precision.BF16] if self.dtype == torch.bfloat16 else []
        if self.quantized:
            needs.append(Precision.parse(self.precision))
        return tuple(needs)


@dataclass
class Built:
    """Where each artifact of one engine went, for the CLI to print."""

    component: str
    engine: Path
    report: BuildReport
    onnx: Path | None = None
    calibration: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # step -> seconds spent here (0 when cached)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_revision(spec: ModelSpec, source: WeightSource, component: str, loras: str = "") -> str:
    """What identifies the weights: the Hub revision, a fingerprint of a local folder, or the random seed;
    with `loras` (a LoraSet digest: files and scales) fused into them."""
    return _base_revision(spec, source, component) + (f"+lora-{loras}" if loras else "")


def _base_revision(spec: ModelSpec, source: WeightSource, component: str) -> str:
    if source.random_weights:
        return f"random-weights-seed{source.seed}"
    if spec.local_dir is not None:
        folder = spec.local_dir / component
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        text = "\n".join(f"{p.relative_to(folder)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
        return "local-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return spec.revision or "main"


# Import name -> pip name of what building needs beyond TensorRT itself (requirements-tensorrt.txt).
BUILD_PACKAGES = {"onnxscript": "onnxscript", "modelopt": "nvidia-modelopt"}
BUILD_INSTALL = "pip install -r requirements-tensorrt.txt (or: bash scripts/setup.sh --tensorrt)"


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not-installed"


class ArtifactBuilder:
    """Produces the artifacts of EngineRequests through the engine cache; export and calibration run on `device`."""

    def __init__(self, cache: EngineCache, device: str = "cpu", trt: Trt | None = None,
                 report: Report | None = None):
        self.cache = cache
        self.device = device
        self._trt = trt
        self.report = report or (lambda done, total, message: None)

    @property
    def trt(self) -> Trt:
        if self._trt is None:
            self._trt = import_trt()
        return self._trt

    # ------------------------------------------------------------------ keys

    def _recipe_field(self, req: EngineRequest) -> str:
        if req.onnx_source == "official":
            return official.recipe_label(req.spec, req.precision)
        recipe = req.quant_recipe
        return recipe.recipe_id(req.spec) if recipe else "none"

    def _precision_field(self, req: EngineRequest) -> str:
        """The 16-bit type, and for the quantized denoiser the format too (FP8 layers in a bf16 or fp16 graph)."""
        dtype = _dtype_name(req.dtype)
        return f"{Precision.parse(req.precision).value}-{dtype}" if req.quantized else dtype

    def onnx_key(self, req: EngineRequest) -> EngineKey:
        io = export.component_io(req.spec, req.component)
        return EngineKey(req.spec.id, weights_revision(req.spec, req.source, io.weights, req.lora_digest),
                         req.component, self._precision_field(req), self._recipe_field(req), "any", "any", "any", "onnx",
                         f"torch-{torch.__version__}-opset{export.OPSET}-export{export.EXPORT_VERSION}")

    def calibration_key(self, req: EngineRequest) -> EngineKey:
        recipe = req.quant_recipe.resolved(req.spec)
        # Calibration runs the whole pipeline, so every LoRA of the set (text encoder parts too) changes it.
        return EngineKey(req.spec.id, weights_revision(req.spec, req.source, req.spec.denoiser, req.loras.digest()),
                         req.spec.denoiser,
                         Precision.parse(req.precision).value, recipe.recipe_id(req.spec),
                         f"{recipe.width}x{recipe.height}", "1", "any", "modelopt-calibration",
                         _package_version("nvidia-modelopt"))

    def engine_key(self, req: EngineRequest) -> EngineKey:
        io = export.component_io(req.spec, req.component)
        recipe = self._recipe_field(req) + ("+weight-streaming" if req.weight_streaming else "")
        # Ranges only name what the engine has: the text encoders take one fixed-size prompt.
        dims = {d for t in io.inputs for d in t.dims if isinstance(d, str)}
        shapes = req.ranges.shapes_label() if dims - {"batch"} else "any"
        batch = req.ranges.batch_label() if "batch" in dims else "1"
        return EngineKey(req.spec.id, weights_revision(req.spec, req.source, io.weights, req.lora_digest),
                         req.component, self._precision_field(req), recipe, shapes, batch,
                         target_name(req.target), self.trt.flavour, self.trt.version)

    # ------------------------------------------------------------------ steps

    def check(self, req: EngineRequest) -> None:
        """Refuse up front what the target GPU cannot run (before minutes of export and calibration)."""
        reason = refusal(req.target, req.needs())
        if reason:
            raise BuildRefused(f"Not building {req.spec.id} {req.component} at {Precision.parse(req.precision).value} "
                               f"for {target_name(req.target)}: {reason}")

    def calibration(self, req: EngineRequest) -> tuple[Path, dict]:
        key = self.calibration_key(req)

        def build(tmp: Path) -> None:
            self.report(0, 1, f"calibrating {req.spec.id} {req.spec.denoiser} ({key.recipe})")
            capability = tuple(torch.cuda.get_device_capability(self.device)) if self.device.startswith("cuda") else None
            result = calibrate(req.spec, req.quant_recipe, req.source, self.device, capability, self.report, req.loras)
            tmp.write_text(json.dumps(result, indent=1, sort_keys=True))

        path = self.cache.get_or_build(key, build)
        return path, json.loads(path.read_text())

    def onnx(self, req: EngineRequest) -> Path:
        if req.onnx_source == "official":
            if req.loras.touches(req.component):
                raise LoraError("LoRAs are fused into engines Prism exports; the official ONNX cannot take them. "
                                "Build without --onnx-source official to use LoRAs.")
            return official.fetch(req.spec, req.component, req.precision, req.source.hub)
        key = self.onnx_key(req)
        final_name = self.cache.artifact_path(key).name
        io = export.component_io(req.spec, req.component)

        def build(tmp: Path) -> None:
            # Before minutes of calibration: name what is missing and how to add it.
            require_packages("Exporting engines to ONNX" + (" and calibrating FP8/FP4" if req.quantized else ""),
                             BUILD_PACKAGES if req.quantized else {"onnxscript": "onnxscript"}, BUILD_INSTALL)
            amax = self.calibration(req)[1]["amax"] if req.quantized else None
            _free(self.device)  # the calibration pipeline's modules
            self.report(0, 1, f"exporting {req.spec.id} {req.component} to ONNX ({key.precision})")
            workdir = tmp.parent / f".work-{tmp.name}"
            try:
                module = load_component(req.spec, io.weights, dtype=req.dtype, device=self.device, source=req.source)
                fuse_into(module, req.loras, io.weights)  # fuse, then quantize (as ModelOpt's calibration assumed)
                if amax is not None:
                    apply_quantization(module, req.quant_recipe.fmt, amax)
                graph = io.adapter(module).eval()
                vocab = min(int(req.spec.components[io.weights].config.get("vocab_size", 100)), 1000)
                raw = export.export_graph(graph, io, req.dtype, workdir, vocab=vocab)
                del graph, module
                _free(self.device)
                export.finalize(raw, io, tmp, final_name + export.DATA_SUFFIX,
                                metadata={"prism.key": json.dumps(key.__dict__, sort_keys=True)}, device=self.device)
            finally:
                export.remove_workdir(workdir)

        path = self.cache.get_or_build(key, build)
        problem = export.check_data_file(path)
        if problem:  # the plan-sized proto is fine but its weights are not: rebuild both
            log.warning("rebuilding %s: %s", path.name, problem)
            path.unlink()
            path = self.cache.get_or_build(key, build)
        return path

    def engine(self, req: EngineRequest) -> Built:
        self.check(req)
        key = self.engine_key(req)
        steps: dict[str, float] = {}
        found = self.cache.lookup(key)
        if found:
            return Built(req.component, found, read_report(found), seconds={"cached": 0.0})
        started = time.monotonic()
        onnx_path = self.onnx(req)
        steps["onnx"] = round(time.monotonic() - started, 2)
        io = export.component_io(req.spec, req.component)
        settings = BuildSettings(req.target, (export.profile(req.spec, io, req.ranges),), weight_streaming=req.weight_streaming)

        def build(tmp: Path) -> None:
            self.report(0, 1, f"building the {req.component} engine for {target_name(req.target)} ({self.trt.describe()})")
            build_engine(self.trt, onnx_path, tmp, settings, req.needs(),
                         timing_cache_path(self.cache.root, self.trt, req.target))

        started = time.monotonic()
        path = self.cache.get_or_build(key, build)
        steps["engine"] = round(time.monotonic() - started, 2)
        calibration = self.cache.lookup(self.calibration_key(req)) if req.quantized and req.onnx_source == "export" else None
        return Built(req.component, path, read_report(path), onnx_path, calibration, steps)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

