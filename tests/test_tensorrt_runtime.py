"""The engine wrapper, run against a fake GPU: only what cannot exist here is faked.

Engines are really built (TensorRT-RTX, no GPU needed). Deserializing and executing them needs a GPU,
so `fake_trt` is the real tensorrt_rtx module with its `Runtime` swapped: the engine it returns takes
its inputs, outputs, types and optimisation profile from the real build's I/O table, and "executes"
by running the engine's ONNX with onnxruntime on the memory our binding code bound by address.
Everything else (binding, profile checks, the shared memory pool, chunking, unload/reload, the
backend and the manager) is the production code.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import modelopt  # noqa: F401
    import onnxruntime as ort
    import tensorrt_rtx
except ImportError as exc:  # CI installs these (requirements-test.txt); a missing one is a failure, not a skip
    raise ImportError(f"The TensorRT tests need onnxruntime, nvidia-modelopt[torch] and tensorrt-rtx-cu13: {exc}") from exc

from pipelines.backends.tensorrt import export
from pipelines.backends.tensorrt.artifacts import ArtifactBuilder, EngineRequest
from pipelines.backends.tensorrt.backend import TensorRTBackend, TensorRTOptions
from pipelines.backends.tensorrt.build import LOG_SUFFIX
from pipelines.backends.tensorrt.runtime import DeviceMemoryPool, GraphCache, TensorRTEngine
from pipelines.backends.tensorrt.trt_api import Trt
from pipelines.engine_cache import EngineCache
from pipelines.gpu import DeviceInfo
from pipelines.loading import load_component
from pipelines.precision import Backend, Precision

TARGET = (8, 9)


# --------------------------------------------------------------------------- the fake GPU

def tensor_at(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor viewing `prod(shape)` elements of host memory at `ptr` (what a bound device address holds)."""
    count = math.prod(shape)
    size = count * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * size).from_address(ptr), dtype=dtype, count=count).reshape(shape)


_TYPES = {"Float": (tensorrt_rtx.float32, torch.float32), "Half": (tensorrt_rtx.float16, torch.float16),
          "BFloat16": (tensorrt_rtx.bfloat16, torch.bfloat16), "Int64": (tensorrt_rtx.int64, torch.int64),
          "Int32": (tensorrt_rtx.int32, torch.int32)}
_IO_LINE = re.compile(r"Name: (\S+), IOMode: (Input|Output), DataType: (\w+), Dimensions: \[([-\d,]*)\]")
_PROFILE = re.compile(r"MinShape: \[([-\d,]*)\], OptShape: \[([-\d,]*)\], MaxShape: \[([-\d,]*)\]")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


class FakeEngine:
    """ICudaEngine's runtime surface, described by the real build's I/O table, computing with onnxruntime."""

    def __init__(self, build_log: str, onnx_path: Path):
        section = build_log[build_log.index("I/O Tensors:"):]
        self.io = {}
        for line in section.splitlines():
            m = _IO_LINE.search(line)
            if m:
                name, mode, dtype, dims = m.groups()
                p = _PROFILE.search(line)
                profile = tuple(_dims(d) for d in p.groups()) if p else None
                self.io[name] = (mode == "Input", _TYPES[dtype], _dims(dims), profile)
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.device_memory_size_v2 = 1 << 16
        self.weight_streaming_budget_v2 = -1
        self.contexts: list[FakeContext] = []

    num_io_tensors = property(lambda self: len(self.io))

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return tensorrt_rtx.TensorIOMode.INPUT if self.io[name][0] else tensorrt_rtx.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.io[name][1][0]

    def get_tensor_shape(self, name):
        return self.io[name][2]

    def get_tensor_profile_shape(self, name, profile):
        return list(self.io[name][3])

    def create_execution_context(self, strategy=None):
        context = FakeContext(self, strategy)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine, self.strategy = engine, strategy
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.runs = 0

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.io[name][3]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def _compute(self) -> dict[str, np.ndarray]:
        feeds = {}
        for name, (is_input, (_, dtype), _, _) in self.engine.io.items():
            if is_input:
                feeds[name] = tensor_at(self.addresses[name], self.shapes[name], dtype).numpy().copy()
        names = [o.name for o in self.engine.session.get_outputs()]
        return dict(zip(names, self.engine.session.run(None, feeds)))

    def get_tensor_shape(self, name):
        return self._compute()[name].shape  # TensorRT infers it from the input shapes; we run the graph

    def update_device_memory_size_for_shapes(self):
        return 1024 + sum(math.prod(s) for s in self.shapes.values())  # grows with the shapes, as TensorRT's does

    def set_device_memory(self, ptr, size):
        assert size >= self.update_device_memory_size_for_shapes(), "scratch smaller than the shapes need"
        self.memory = (ptr, size)

    def execute_async_v3(self, stream):
        for name, value in self._compute().items():
            dtype = self.engine.io[name][1][1]
            tensor_at(self.addresses[name], value.shape, dtype).copy_(torch.from_numpy(value))
        self.runs += 1
        return True


def fake_trt(cache: EngineCache) -> Trt:
    """tensorrt_rtx with a Runtime whose engines run on onnxruntime (found through the engine cache's manifests)."""

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes):
            digest = hashlib.sha256(plan).hexdigest()
            entry = next(e for e in cache.entries() if e.manifest and e.manifest.sha256 == digest)
            key = entry.manifest.key
            onnx_entry = next(e for e in cache.entries() if e.manifest and e.manifest.key.backend == "onnx"
                              and (e.manifest.key.model, e.manifest.key.revision, e.manifest.key.component,
                                   e.manifest.key.precision) == (key.model, key.revision, key.component, key.precision)
                              and key.recipe.startswith(e.manifest.key.recipe))
            return FakeEngine(Path(str(entry.path) + LOG_SUFFIX).read_text(), onnx_entry.path)

    module = types.SimpleNamespace(**{n: getattr(tensorrt_rtx, n) for n in dir(tensorrt_rtx) if not n.startswith("__")})
    module.Runtime = Runtime
    return Trt(module, "tensorrt-rtx", tensorrt_rtx.__version__)


# --------------------------------------------------------------------------- fixtures

def build(cache, spec, component, dtype=torch.float32, max_batch=2):
    ranges = export.ShapeRanges.for_spec(spec, min_size=32, max_size=128, max_batch=max_batch)
    req = EngineRequest(spec, component, Precision.FP16, ranges, TARGET, graph_dtype=dtype)
    return ArtifactBuilder(cache).engine(req).engine


@pytest.fixture(scope="session")
def vae_plan(trt_cache, sdxl):
    return build(trt_cache, sdxl, "vae")


def torch_module(spec, component, dtype=torch.float32):
    io = export.component_io(spec, component)
    return io.adapter(load_component(spec, io.weights, dtype=dtype, device="cpu")).eval()


# --------------------------------------------------------------------------- the wrapper

def test_engine_takes_the_modules_keyword_arguments(trt_cache, sdxl, vae_plan):
    engine = TensorRTEngine(vae_plan, fake_trt(trt_cache), "cpu", batch_inputs=frozenset({"latents"}))
    latents = torch.randn(2, 4, 16, 24).half()
    with torch.no_grad():
        expected = torch_module(sdxl, "vae")(latents=latents.float())
    got = engine(latents=latents)  # cast to the engine's input type (fp32), as the torch module would
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)

    with pytest.raises(TypeError, match="unexpected argument"):
        engine(latents=latents, sample=latents)
    with pytest.raises(TypeError, match="needs the argument 'latents'"):
        engine(image=None)
    with pytest.raises(ValueError, match="outside the engine's range.*pipelines build"):
        engine(latents=torch.randn(1, 4, 16, 256))  # 512 px wide: the engine was built up to 128


def test_batches_beyond_the_profile_run_in_chunks(trt_cache, sdxl, vae_plan):
    engine = TensorRTEngine(vae_plan, fake_trt(trt_cache), "cpu", batch_inputs=frozenset({"latents"}))
    assert engine.max_batch() == 2
    latents = torch.randn(5, 4, 16, 16)
    with torch.no_grad():
        expected = torch_module(sdxl, "vae")(latents=latents)
    assert torch.allclose(engine(latents=latents), expected, rtol=1e-4, atol=1e-4)
    assert engine._context.runs == 3  # 2 + 2 + 1


def test_engines_share_one_scratch_pool_and_unload(trt_cache, sdxl, vae_plan):
    trt = fake_trt(trt_cache)
    pool = DeviceMemoryPool("cpu")
    encoder = TensorRTEngine(build(trt_cache, sdxl, "vae_encoder"), trt, "cpu", pool=pool, weight_streaming_budget=123)
    decoder = TensorRTEngine(vae_plan, trt, "cpu", pool=pool)
    assert encoder._engine.weight_streaming_budget_v2 == 123
    assert encoder._context.strategy == tensorrt_rtx.ExecutionContextAllocationStrategy.USER_MANAGED

    encoder(image=torch.randn(1, 3, 32, 32))
    small = pool.size
    decoder(latents=torch.randn(2, 4, 32, 32))
    assert pool.size > small and pool.size == max(encoder.scratch_bytes, decoder.scratch_bytes)
    encoder(image=torch.randn(1, 3, 32, 32))
    assert encoder._context.memory == decoder._context.memory == pool.buffer()  # one buffer for both

    generation = pool.generation
    decoder.unload()
    assert not decoder.loaded and pool.size == encoder.scratch_bytes and pool.generation > generation
    out = decoder(latents=torch.randn(1, 4, 16, 16))  # reloads on use
    assert decoder.loaded and out.shape == (1, 3, 32, 32)


class _FakeGraph:
    """torch.cuda.CUDAGraph's surface: replay re-runs what was launched during capture."""
    capturing: "_FakeGraph | None" = None

    def __init__(self):
        self.launch = None

    def replay(self):
        self.launch()


class _capture:
    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        _FakeGraph.capturing = self.graph

    def __exit__(self, *exc):
        _FakeGraph.capturing = None


def test_graph_cache_captures_once_per_shape_and_redoes_after_the_pool_moves():
    launches = []
    generation = [0]

    def run(inputs):
        def launch():
            launches.append(tuple(inputs["x"].shape))
            out[0].copy_(inputs["x"] * 2)
        out = [torch.empty_like(inputs["x"])]
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.launch = launch
        launch()
        return out

    graphs = GraphCache(run, lambda: generation[0], max_entries=2, new_graph=_FakeGraph, capture=_capture)
    a = torch.ones(2, 3)
    first = graphs({"x": a})
    assert graphs.captures == 1 and torch.equal(first[0], a * 2)
    second = graphs({"x": a * 5})  # replay with new values copied into the captured inputs
    assert graphs.captures == 1 and torch.equal(second[0], a * 10)
    second[0].zero_()  # outputs are copies: the caller may keep or change them
    assert torch.equal(graphs({"x": a})[0], a * 2)
    graphs({"x": torch.ones(4, 3)})
    assert graphs.captures == 2
    generation[0] += 1  # the scratch buffer moved
    graphs({"x": a})
    assert graphs.captures == 3


# --------------------------------------------------------------------------- the backend and the manager

def _manager(cache: EngineCache, options: TensorRTOptions, trt: Trt | None = None):
    from pipelines.manager import ManagerConfig, PipelineManager

    info = DeviceInfo("cpu", "fake RTX (onnxruntime)", TARGET, 16 << 30, 16 << 30, unified=True)
    backend = TensorRTBackend(cache, options, trt=trt or fake_trt(cache))
    return PipelineManager(ManagerConfig(device="cpu", backend="tensorrt", engine_cache_dir=cache.root),
                           device_info=info, backends={Backend.TENSORRT: backend})


def test_sdxl_runs_end_to_end_on_engines(trt_cache, tiny_sdxl):
    """The SDXL loop, unchanged, on TensorRT engines: the same image as the torch backend."""
    from pipelines.request import GenerationRequest

    options = TensorRTOptions(calibration_prompts=2, calibration_steps=2)
    manager = _manager(trt_cache, options)
    try:
        request = GenerationRequest(prompt="a red fox", model=str(tiny_sdxl), precision="fp16", steps=2, seed=3,
                                    backend="tensorrt")
        on_engines = manager.generate(request, timeout=600)
        on_torch = manager.generate(GenerationRequest(**{**request.__dict__, "backend": "torch"}), timeout=600)
        quantized = manager.generate(GenerationRequest(**{**request.__dict__, "precision": "fp8"}), timeout=600)
    finally:
        manager.close()
    assert on_engines.backend.startswith("TensorRT") and not on_torch.backend.startswith("TensorRT")
    a, b = (np.asarray(r.images[0], dtype=np.float32) for r in (on_engines, on_torch))
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 4  # 0..255: fp16 onnxruntime vs fp16 torch
    assert quantized.runs_as == "FP8"
    c = np.asarray(quantized.images[0], dtype=np.float32)
    assert 0 < np.abs(c - a).mean() < 10  # FP8 changes the image a little (measured 1.9)
