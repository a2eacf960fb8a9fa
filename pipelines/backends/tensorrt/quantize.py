"""Quantization recipes for the denoiser, calibrated with NVIDIA ModelOpt over real denoise trajectories.

A recipe (FP8 or NVFP4, calibration prompts/steps/size, algorithm) has an id that goes into every
EngineKey built from it, so changing any part of it builds new artifacts.

Calibration runs the project's own Flux/SDXL loop (`pipelines.families.flux.generate` / `pipelines.families.sdxl.generate`)
on our prompt set (`calibration_prompts.txt`), with ModelOpt's calibrators on the inputs of every
quantized Linear layer. The result is one activation range (amax) per layer: small, cached, and
reused for every target GPU. Weights need no calibration: their scales come from the weights.

Which layers: every Linear of the denoiser except the family's 16-bit anchors (`keep_16bit`:
embedders and the final projection, as the TensorRT demo and ModelOpt's diffusion recipes keep them)
and layers whose sizes are not multiples of 16 (FP8 GEMMs and FP4 blocks need them), the same rule
as the torch backend (`pipelines.quant.quantize_linears`).

NVFP4 on a CPU: ModelOpt's NVFP4 fake-quantization kernel needs CUDA ("amax must be a CUDA tensor
for dynamic block quantization"). We do not need it: calibration only collects ranges (ModelOpt
disables quantization while calibrating), and the quantize-dequantize arithmetic is ours (qdq.py),
in plain torch on any device.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Hashable, TypeVar

import torch
from torch import nn

from ...device_policy import LIGHT_PARTS, DevicePolicy
from ...errors import MissingPackageError
from ..contract import CALIBRATION_PROMPTS
from ...families import family_of
from ...families.family import REFINER_PREFIX, ImageUse, part_owner, weights_of
from ...image_input import random_image
from ...quant import quantizable_linears
from ...loading import WeightSource, load_component
from ...lora import NO_LORAS, LoraSet
from ..torch_lora import fuse_into
from ...precision import Backend, Precision
from ...registry import ModelSpec, base_of
from ...request import DEFAULT_REFINER_SWITCH, GenerationRequest, resolve_request
from ...run_context import RunContext
from ...sampling import NumericsError
from . import qdq

log = logging.getLogger("prism.tensorrt.quantize")
T = TypeVar("T")

PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
RECIPE_VERSION = 1  # bump when the quantization arithmetic or layer choice changes
ALGORITHMS = ("max",)  # ModelOpt calibration algorithms whose result is a range per layer (what we lower)

_FORMATS = {
    Precision.FP8: (qdq.FMT_FP8, "e4m3 weights per output channel, activations per tensor (calibrated)"),
    Precision.FP4: (qdq.FMT_NVFP4, "e2m1 in blocks of 16 with e4m3 block scales; activations quantized per block "
                                   "at run time with a calibrated global scale"),
}


def calibration_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@dataclass(frozen=True)
class QuantRecipe:
    precision: Precision
    prompts: int = CALIBRATION_PROMPTS  # calibration images (one prompt each, in file order)
    steps: int | None = None  # denoising steps per image; None: the model's default
    width: int | None = None  # calibration size; None: the model's default
    height: int | None = None
    guidance: float | None = None  # None: the model's default
    algorithm: str = "max"
    seed: int = 0

    def __post_init__(self):
        precision = Precision.parse(self.precision)
        object.__setattr__(self, "precision", precision)
        if precision not in _FORMATS:
            raise ValueError(f"{precision.value} is not a quantized precision; recipes exist for fp8 and fp4.")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"Calibration algorithm {self.algorithm!r} is not supported; choose one of {ALGORITHMS}.")
        if self.prompts < 1:
            raise ValueError("A calibration needs at least one prompt.")

    @property
    def fmt(self) -> str:
        return _FORMATS[self.precision][0]

    def resolved(self, spec: ModelSpec) -> "QuantRecipe":
        """Defaults filled from the model spec: the recipe as it will run."""
        return replace(self, steps=self.steps or spec.default_steps, width=self.width or spec.default_width,
                       height=self.height or spec.default_height,
                       guidance=spec.default_guidance if self.guidance is None else self.guidance)

    def recipe_id(self, spec: ModelSpec) -> str:
        """Readable, and unique for everything that changes the result (a digest covers the rest)."""
        r = self.resolved(spec)
        keep = family_of(spec).keep_16bit
        full = {**asdict(r), "precision": r.precision.value, "keep_16bit": list(keep), "version": RECIPE_VERSION,
                "format": _FORMATS[r.precision][1], "prompts_sha256": hashlib.sha256(PROMPTS_FILE.read_bytes()).hexdigest()}
        if spec.is_refiner:  # calibrated on its base's trajectories, from the usual hand-off
            full.update(base=spec.base, handoff=DEFAULT_REFINER_SWITCH)
        digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:8]
        return f"{r.fmt}-{r.algorithm}-cal{r.prompts}x{r.steps}-{r.width}x{r.height}-{digest}"


def apply_quantization(model: nn.Module, fmt: str, amax: dict[str, float]) -> int:
    """Swap each Linear named in `amax` for a FakeQuantLinear (in place, sharing the weights)."""
    for name, value in amax.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not a Linear; the calibration does not fit this model.")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, qdq.FakeQuantLinear(linear, fmt, value))
    return len(amax)


class _CalibrationParts:
    """The `Parts` the family loop reads: 16-bit encoders and VAE on the device, and the denoiser being calibrated
    (`calibrated`: its part name in the loop; a refiner's UNet is `refiner_unet` in its base's loop)."""

    def __init__(self, spec: ModelSpec, precision: Precision, device: str, source: WeightSource, denoiser: nn.Module,
                 policy: DevicePolicy, loras: LoraSet = NO_LORAS, calibrated: str | None = None,
                 refiner: ModelSpec | None = None):
        self.spec, self.precision, self.device, self.source = spec, precision, device, source
        self.policy, self.loras, self.refiner = policy, loras, refiner
        self._loaded: dict[str, Any] = {calibrated or spec.denoiser: denoiser}

    def get(self, name: str) -> Any:
        if name not in self._loaded:
            spec, component = part_owner(self.spec, name, self.refiner)
            dtype = self.policy.component_dtype(spec, component, self.precision)
            weights = weights_of(component)  # the VAE encoder (an edit's input image) is built from the VAE's weights
            obj = load_component(spec, weights, dtype=dtype or torch.float32, device=self.device, source=self.source)
            if component not in LIGHT_PARTS:
                fuse_into(obj, self.loras if spec is self.spec else NO_LORAS, weights)
            self._loaded[name] = obj if component in LIGHT_PARTS else family_of(spec).adapter(component)(obj).eval()
        return self._loaded[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.policy.component_dtype(*part_owner(self.spec, name, self.refiner), self.precision)

    def done_with(self, *names: str) -> None:
        """Kept: the encoders serve every calibration prompt."""

    def remember(self, names: tuple[str, ...], what: Hashable, compute: Callable[[], T]) -> T:
        """Computed each time: each calibration prompt is encoded once anyway."""
        return compute()


def calibrate(spec: ModelSpec, recipe: QuantRecipe, source: WeightSource, device: str,
              capability: tuple[int, int] | None, report: Callable[[int, int, str], None] | None = None,
              loras: LoraSet = NO_LORAS) -> dict[str, Any]:
    """Run the recipe's calibration; returns {"amax": {layer: activation range}, ...} for `apply_quantization`.
    With `loras`, they are fused into every component first: the ranges are those of the fused model."""
    try:
        import modelopt
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise MissingPackageError("FP8/FP4 engines are calibrated with NVIDIA ModelOpt (nvidia-modelopt), which does not "
                                  "import here. Install with: pip install -r requirements-tensorrt.txt") from exc

    # A refiner is calibrated where it runs: in its base's loop, from the base's latents at the usual hand-off.
    loop_spec, calibrated, handoff = spec, None, None
    if spec.is_refiner:
        loop_spec = base_of(spec)
        if loop_spec is None:
            raise ValueError(f"{spec.id} is a refiner and no base model names it; its FP8/FP4 engine is calibrated in "
                             "its base's loop: run a job on the base with the refiner on.")
        calibrated, handoff = REFINER_PREFIX + spec.denoiser, DEFAULT_REFINER_SWITCH
    recipe = recipe.resolved(spec)
    # Calibrated as the engine will compute: a GPU's dtypes (a bf16 one when exporting on a CPU).
    policy = DevicePolicy.for_target(capability)
    family = family_of(spec)
    dtype = policy.compute_dtype(spec, recipe.precision)
    started = time.monotonic()
    denoiser = load_component(spec, spec.denoiser, dtype=dtype, device=device, source=source)
    fuse_into(denoiser, loras, spec.denoiser)
    graph = family.adapters[spec.denoiser](denoiser).eval()
    prefix = next(name for name, child in graph.named_children() if child is denoiser) + "."
    targets = quantizable_linears(denoiser, family.keep_16bit)
    input_cfg = ({"num_bits": (4, 3), "axis": None} if recipe.fmt == qdq.FMT_FP8 else
                 {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}})
    # Only the inputs of the chosen layers: weight ranges come from the weights themselves.
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    quant_cfg += [{"quantizer_name": f"{prefix}{name}.input_quantizer", "cfg": input_cfg} for name in targets]

    prompts = calibration_prompts()
    if recipe.prompts > len(prompts):
        raise ValueError(f"The recipe asks for {recipe.prompts} calibration prompts; {PROMPTS_FILE.name} has {len(prompts)}.")
    run_precision = policy.reference_precision(spec, recipe.precision)
    run_ctx = RunContext(torch.device(device))

    non_finite = []

    def forward_loop(model: nn.Module) -> None:
        parts = _CalibrationParts(loop_spec, recipe.precision, device, source, model, policy, loras, calibrated,
                                  spec if calibrated else None)
        for i, prompt in enumerate(prompts[:recipe.prompts]):
            # A family that edits an input image gets one of random pixels at the calibration size: the context
            # tokens' ranges are then observed too (no photograph ships with Prism).
            image = random_image(recipe.width, recipe.height, recipe.seed + i) \
                if family.image_use is ImageUse.CONTEXT else None
            request = resolve_request(GenerationRequest(
                prompt=prompt, model=loop_spec.id, precision=run_precision, width=recipe.width, height=recipe.height,
                steps=recipe.steps, guidance=recipe.guidance, seed=recipe.seed + i, refiner=handoff, image=image),
                loop_spec, capability, Backend.TORCH)
            try:
                family.generate(loop_spec, parts, request, run_ctx)
            except NumericsError:
                # The ranges were already observed step by step; only the final image is not finite (random
                # weights do this). Layers whose range is not finite stay 16-bit below.
                non_finite.append(i)
            if report is not None:
                report(i + 1, recipe.prompts, f"calibrating {spec.denoiser}: image {i + 1}/{recipe.prompts}")

    mtq.quantize(graph, {"quant_cfg": quant_cfg, "algorithm": recipe.algorithm}, forward_loop=forward_loop)
    amax, unused = {}, []
    for name in targets:
        value = graph.get_submodule(prefix + name).input_quantizer.amax
        if value is None or not torch.isfinite(value).all():
            unused.append(name)  # never ran (or saw no finite data): it stays 16-bit
        else:
            amax[name] = float(value.float().max())
    return {"amax": amax, "left_16bit": unused, "recipe": recipe.recipe_id(spec), "modelopt": modelopt.__version__,
            "seconds": round(time.monotonic() - started, 2), "device": device, "non_finite_images": non_finite}
