"""ONNX export of each component's graph module (`pipelines.graphs`), so an engine takes the same inputs.

What each component takes is written once (`component_io`), as named tensors with symbolic
dimensions; from it come the export's dynamic axes, the sample inputs, and TensorRT's optimisation
profile for a model spec's batch and size ranges.

Exporter per graph, from measurements on the tiny models (research/feasibility-trt.md and ours):
- dynamo (torch.export) for the Flux transformer and the CLIP / T5 encoders: the TorchScript exporter
  cannot export `aten::rms_norm`, bakes Flux's batch into the RoPE broadcast, and writes CLIP's
  LayerNorm with mixed fp32/fp16 inputs (and fails outright in bf16);
- TorchScript for the SDXL UNet and the VAE: dynamo's UNet graph concatenates fp16 with fp32
  (rejected by strongly typed TensorRT), and TorchScript exports them 5-10x faster.
On a GPU, torch's RMSNorm becomes the CUDA-only `aten._fused_rms_norm`, which neither exporter can
write (seen on the H100/H200 with torch 2.11 + onnxscript 0.7.2); during export every `nn.RMSNorm`
is swapped for the same arithmetic in plain ops (`_PlainRMSNorm`), on every device alike.

The saved file keeps its weights in an external data file beside it (any model over 2 GB must, and
one layout for every size keeps the code single); its size and checksum are recorded in the model's
metadata so a truncated data file is caught before a build trusts it.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ... import graphs
from ...families import family_of
from ...families.family import VAE_ENCODER, weights_of
from ...graphs import TensorSpec
from ...registry import ModelSpec
from . import qdq

log = logging.getLogger("prism.tensorrt.export")

OPSET = 20  # the TorchScript exporter's newest; the quantized graphs move to 23 when lowered (qdq.QDQ_OPSET)
EXPORT_VERSION = 2  # part of every ONNX artifact's key: bump when the exported graphs change
DATA_SUFFIX = ".data"
EXTERNAL_THRESHOLD = 1024  # tensors at least this many bytes go to the data file


@dataclass(frozen=True)
class ComponentIO:
    weights: str  # the spec component whose weights it uses ("vae" for the VAE encoder)
    adapter: type[nn.Module]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    exporter: str  # "dynamo" | "torchscript"
    guidance_batch: bool = False  # SDXL's UNet sees 2x the images (unconditional + conditional)


EXPORTERS: dict[type[nn.Module], str] = {
    graphs.ClipPooled: "dynamo", graphs.ClipPenultimate: "dynamo", graphs.ClipPenultimateAndProjection: "dynamo",
    graphs.T5Hidden: "dynamo", graphs.FluxDenoiser: "dynamo", graphs.KontextDenoiser: "dynamo",
    graphs.SdxlDenoiser: "torchscript", graphs.VaeDecoder: "torchscript", graphs.VaeEncoder: "torchscript",
}


def component_io(spec: ModelSpec, name: str) -> ComponentIO:
    """The inputs and outputs of component `name`'s graph module, as the family loop calls it."""
    family = family_of(spec)
    if name not in (*family.adapters, VAE_ENCODER):
        known = ", ".join([*family.adapters, VAE_ENCODER])
        raise ValueError(f"{spec.id} has no exportable component {name!r}; choose from {known}.")
    io, adapter = family.graph_io(spec, name), family.adapter(name)
    return ComponentIO(weights_of(name), adapter, io.inputs, io.outputs, EXPORTERS[adapter],
                       guidance_batch=family.guidance_batch and name == spec.denoiser)


# --------------------------------------------------------------------------- shape ranges

Range = tuple[int, int, int]  # min, opt, max


@dataclass(frozen=True)
class ShapeRanges:
    """The image sizes and batch an engine accepts; TensorRT tunes for `opt`."""

    width: Range
    height: Range
    batch: Range = (1, 1, 1)  # images per call

    @classmethod
    def for_spec(cls, spec: ModelSpec, width: int | None = None, height: int | None = None,
                 min_size: int | None = None, max_size: int | None = None, max_batch: int = 1) -> "ShapeRanges":
        """A static size when width/height are given without a range; else the spec's range (or the one given)."""
        if max_batch < 1:
            raise ValueError(f"max batch must be at least 1; got {max_batch}.")
        w = width or spec.default_width
        h = height or spec.default_height
        problem = spec.size.check(w, h)
        if problem:
            raise ValueError(f"{spec.id}: {problem}")
        batch = (1, 1, max_batch)
        if (width or height) and min_size is None and max_size is None:
            return cls((w, w, w), (h, h, h), batch)
        lo = min_size or spec.size.min_side
        hi = max_size or spec.size.max_side
        if not lo <= min(w, h) <= max(w, h) <= hi:
            raise ValueError(f"The size range {lo}..{hi} must contain the optimal size {w}x{h}.")
        for value in (lo, hi):
            problem = spec.size.check(value, value)
            if problem:
                raise ValueError(f"{spec.id}: size range: {problem}")
        return cls((lo, w, hi), (lo, h, hi), batch)

    @property
    def static(self) -> bool:
        return self.width[0] == self.width[2] and self.height[0] == self.height[2]

    def shapes_label(self) -> str:
        if self.static:
            return f"{self.width[1]}x{self.height[1]}"
        return f"{self.width[0]}-{self.width[2]}x{self.height[0]}-{self.height[2]}@{self.width[1]}x{self.height[1]}"

    def batch_label(self) -> str:
        lo, opt, hi = self.batch
        return f"{lo}-{hi}" if lo != hi else str(lo)


def dimension_ranges(spec: ModelSpec, io: ComponentIO, ranges: ShapeRanges) -> dict[str, Range]:
    scale = spec.vae_scale_factor
    factor = 2 if io.guidance_batch else 1
    lo, opt, hi = ranges.batch
    lat_h = tuple(v // scale for v in ranges.height)
    lat_w = tuple(v // scale for v in ranges.width)
    return {
        # With guidance the UNet sees 2 per image, without it 1: the range spans both.
        "batch": (lo, opt * factor, hi * factor),
        "lat_h": lat_h, "lat_w": lat_w,
        "img_h": ranges.height, "img_w": ranges.width,
        # Flux packs 2x2 latent patches into one token.
        "img_tokens": tuple((h // 2) * (w // 2) for h, w in zip(lat_h, lat_w)),
        # Kontext's input-image tokens, appended to the noise tokens: an input within the same size range (its
        # preferred sizes are), so the transformer's profile spans up to twice the tokens of text to image.
        "ctx_tokens": tuple((h // 2) * (w // 2) for h, w in zip(lat_h, lat_w)),
    }


def profile(spec: ModelSpec, io: ComponentIO, ranges: ShapeRanges) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> (min, opt, max) shapes, for one TensorRT optimisation profile."""
    dims = dimension_ranges(spec, io, ranges)
    out = {}
    for t in io.inputs:
        shapes = tuple(tuple(d if isinstance(d, int) else dims[d][i] for d in t.dims) for i in range(3))
        out[t.name] = shapes
    return out


# Small sample sizes for tracing: distinct values so no two symbolic dimensions look equal, all >= 2
# so torch.export keeps them symbolic, divisible by the UNet's and VAE's downsampling.
EXPORT_DIMS = {"batch": 2, "lat_h": 8, "lat_w": 12, "img_tokens": 24, "ctx_tokens": 20, "img_h": 64, "img_w": 96}


def sample_inputs(io: ComponentIO, dtype: torch.dtype, device: torch.device | str, vocab: int = 100,
                  dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the right shapes and types (ids below `vocab`), from a fixed seed."""
    dims = dims or EXPORT_DIMS
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in io.inputs:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in t.dims)
        if t.kind == "ids":
            out[t.name] = torch.randint(0, vocab, shape, generator=g)
        elif t.name == "timestep" and not shape:
            out[t.name] = torch.tensor(499.0)
        else:
            value = torch.rand(shape, generator=g) if t.name in ("timestep", "guidance") else torch.randn(shape, generator=g)
            out[t.name] = value.to(torch.float32 if t.kind == "float32" else dtype)
    return {k: v.to(device) for k, v in out.items()}


# --------------------------------------------------------------------------- export

def export_graph(module: nn.Module, io: ComponentIO, dtype: torch.dtype, workdir: Path, *, vocab: int = 100) -> Path:
    """Export `module` (the graph adapter, possibly with quantized layers) into `workdir`; returns the .onnx path."""
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "model.onnx"
    device = next(module.parameters()).device
    sample = sample_inputs(io, dtype, device, vocab)
    quantized = any(isinstance(m, qdq.QUANTIZED_MODULES) for m in module.modules())
    dynamic = {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)} for t in io.inputs}
    with torch.inference_mode(False), torch.no_grad(), plain_rms_norms(module):
        if io.exporter == "dynamo":
            from torch.export import Dim

            symbols = {s: Dim(s, min=1, max=1 << 16) for axes in dynamic.values() for s in axes.values()}
            shapes = {name: {i: symbols[s] for i, s in axes.items()} for name, axes in dynamic.items()}
            program = torch.onnx.export(module, (), kwargs=sample, dynamo=True, dynamic_shapes=shapes,
                                        opset_version=OPSET, verbose=False,
                                        custom_translation_table=qdq.dynamo_translation_table() if quantized else None)
            program.save(str(raw), external_data=True)
        else:
            if quantized:
                qdq.register_legacy_symbolic(OPSET)
            # No constant folding: folded weight transposes become anonymous initializers ("onnx::MatMul_12"),
            # losing the parameter names the build report maps layers by; TensorRT folds them itself.
            torch.onnx.export(module, (), str(raw), kwargs=sample, dynamo=False, opset_version=OPSET,
                              input_names=[t.name for t in io.inputs], output_names=list(io.outputs),
                              dynamic_axes={n: axes for n, axes in dynamic.items() if axes}, do_constant_folding=False)
    return raw


class _PlainRMSNorm(nn.Module):
    """`nn.RMSNorm`'s arithmetic (float32 statistics, result in the input's type) in ops every exporter knows.
    It holds the original's weight Parameter, so the ONNX initializer keeps the parameter's name."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.dims = tuple(range(-len(norm.normalized_shape), 0))
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = x32 * torch.rsqrt(x32.pow(2).mean(self.dims, keepdim=True) + eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


@contextlib.contextmanager
def plain_rms_norms(module: nn.Module) -> Iterator[None]:
    """Swap every `nn.RMSNorm` inside `module` for `_PlainRMSNorm` for the duration, then put them back."""
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.RMSNorm):
                setattr(parent, name, _PlainRMSNorm(child))
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _rename_outputs(model, names: tuple[str, ...]) -> None:
    """Name the graph outputs as ComponentIO says (dynamo names them after the last op)."""
    if len(model.graph.output) != len(names):
        raise RuntimeError(f"The exported graph has {len(model.graph.output)} outputs; expected {names}.")
    renames = {o.name: new for o, new in zip(model.graph.output, names) if o.name != new}
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for o in model.graph.output:
        o.name = renames.get(o.name, o.name)


def _tensor_bytes(tensor, base_dir: Path) -> bytes | None:
    """The raw little-endian bytes of an initializer, from the proto or its external file; None if typed fields."""
    from onnx import TensorProto

    if tensor.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        with open(base_dir / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    return tensor.raw_data if tensor.HasField("raw_data") else None


def save_with_external_data(model, path: Path, source_dir: Path, location: str) -> tuple[int, str]:
    """Write `model` to `path` and its large tensors, streamed one at a time, to `path + DATA_SUFFIX`.

    `location` is the data file name written into the model (it may differ from the name the file has
    now, when the file is renamed into place afterwards). Returns the data file's size and sha256.
    """
    from onnx import TensorProto

    data_path = Path(str(path) + DATA_SUFFIX)
    moved = _adopt_single_data_file(model, source_dir, data_path, location)
    if moved is not None:
        _set_metadata(model, {"prism.data_bytes": str(moved[0]), "prism.data_sha256": moved[1]})
        path.write_bytes(model.SerializeToString())
        return moved
    digest = hashlib.sha256()
    offset = 0
    with open(data_path, "wb") as f:
        for tensor in model.graph.initializer:
            data = _tensor_bytes(tensor, source_dir)
            if data is None or len(data) < EXTERNAL_THRESHOLD:
                if data is not None and tensor.data_location == TensorProto.EXTERNAL:
                    tensor.raw_data = data
                    tensor.data_location = TensorProto.DEFAULT
                    del tensor.external_data[:]
                continue
            pad = (-offset) % 64  # aligned offsets let readers map tensors directly
            f.write(b"\0" * pad)
            digest.update(b"\0" * pad)
            offset += pad
            f.write(data)
            digest.update(data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(data)
    _set_metadata(model, {"prism.data_bytes": str(offset), "prism.data_sha256": digest.hexdigest()})
    path.write_bytes(model.SerializeToString())
    return offset, digest.hexdigest()


def _adopt_single_data_file(model, source_dir: Path, data_path: Path, location: str) -> tuple[int, str] | None:
    """When every large tensor already sits in one data file (a 16-bit dynamo export), move that file
    instead of copying it: for a 24 GB transformer that saves the copy's time and its disk space."""
    from onnx import TensorProto

    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            locations.add(next(e.value for e in tensor.external_data if e.key == "location"))
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
            return None  # new tensors (quantized weights) must be written out
    if len(locations) != 1:
        return None
    source = source_dir / locations.pop()
    live = sum(int(next((e.value for e in t.external_data if e.key == "length"), 0)) for t in model.graph.initializer
               if t.data_location == TensorProto.EXTERNAL)
    if live < source.stat().st_size // 2:
        return None  # mostly dead weights (replaced by quantized ones): copy the live part instead
    os.replace(source, data_path)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    digest = hashlib.sha256()
    with open(data_path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return data_path.stat().st_size, digest.hexdigest()


def set_data_location(path: Path, location: str) -> None:
    """Point every external tensor of the model at `path` to the data file `location` (same folder)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def _set_metadata(model, values: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def finalize(raw: Path, io: ComponentIO, out: Path, location: str, metadata: dict[str, str] | None = None,
             on_weight: Callable[[str], None] | None = None, device: str = "cpu") -> qdq.LoweringReport | None:
    """Rename outputs, lower quantizer placeholders, check the graph, and save `raw` as `out` (+ data file)."""
    import onnx

    model = onnx.load(str(raw), load_external_data=False)
    names = [i.name for i in model.graph.input]
    expected = [t.name for t in io.inputs]
    if names != expected:
        raise RuntimeError(f"The exported graph's inputs are {names}; the engine signature needs {expected}.")
    _rename_outputs(model, io.outputs)
    report = None
    if any(n.domain == qdq.PLACEHOLDER_DOMAIN for n in model.graph.node):
        report = qdq.lower_fake_quant(model, raw.parent, on_weight, device=device)
    _set_metadata(model, {"prism.export_version": str(EXPORT_VERSION), **(metadata or {})})
    save_with_external_data(model, out, raw.parent, Path(str(out) + DATA_SUFFIX).name)
    onnx.checker.check_model(str(out))  # by path: works past 2 GB, reads external data
    set_data_location(out, location)
    return report


_verified_data: dict[Path, tuple[int, float]] = {}


def check_data_file(path: Path) -> str | None:
    """None if the ONNX at `path` has its complete, unchanged data file; else what is wrong."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "prism.data_bytes" not in meta:
        return None  # not written by us (an official download): nothing recorded to compare
    data = Path(str(path) + DATA_SUFFIX)
    if not data.is_file():
        return f"{data.name} is missing"
    stat = data.stat()
    if stat.st_size != int(meta["prism.data_bytes"]):
        return f"{data.name} has {stat.st_size} bytes; {meta['prism.data_bytes']} were written"
    if _verified_data.get(data) != (stat.st_size, stat.st_mtime):
        digest = hashlib.sha256()
        with open(data, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != meta["prism.data_sha256"]:
            return f"{data.name} does not match its checksum"
        _verified_data[data] = (stat.st_size, stat.st_mtime)
    return None


def remove_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)


def onnx_size(path: Path) -> int:
    data = Path(str(path) + DATA_SUFFIX)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)

