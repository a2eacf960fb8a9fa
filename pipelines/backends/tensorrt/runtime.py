"""Running an engine as if it were the graph module it replaces: `engine(**same_kwargs) -> same outputs`.

- Binding: keyword arguments are matched to the engine's inputs by name, cast to the engine's input
  types (as the torch modules cast internally), checked against the optimisation profile, and bound
  by address; outputs are torch tensors allocated for the shapes the engine reports.
- Memory: the engines of one pipeline share one scratch buffer (`DeviceMemoryPool`), sized to the
  largest need; they run one at a time on one stream, so sharing is safe (the TensorRT demo does the
  same). Needs are taken for the shapes actually run, not the profile's maximum, so an engine built
  for sizes up to 2048 px does not hold 2048-px scratch memory while making 512-px images.
- Batches larger than the engine's profile run in chunks of its maximum (the denoisers and the VAE
  treat images independently), so a batch-1 engine serves any number of images.
- CUDA graphs: for static shapes (the denoiser, called once per step with the same shapes) the
  launch is captured once per shape and replayed; outputs are cloned, so a caller may keep them.
- unload() frees device memory and keeps the plan path; the next call (or load()) brings it back.

Everything here runs unchanged against a fake TensorRT module in the tests (tests/test_tensorrt_runtime.py):
only the GPU itself is faked.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from .trt_api import (IOTensor, Trt, create_context, deserialize, engine_io, make_logger, scratch_bytes_for_shapes,
                      set_context_memory, set_weight_streaming_budget)

log = logging.getLogger("prism.tensorrt.runtime")


class DeviceMemoryPool:
    """One scratch buffer for every engine of a pipeline, as large as the largest needs."""

    def __init__(self, device: str):
        self.device = device
        self._needs: dict[int, int] = {}  # user id -> bytes
        self._buffer: torch.Tensor | None = None
        self.generation = 0  # changes whenever the buffer moves (captured CUDA graphs must be redone)

    def reserve(self, user: object, nbytes: int) -> None:
        """Make the buffer at least `nbytes`; a user's need only grows (no reallocation churn between calls)."""
        self._needs[id(user)] = max(self._needs.get(id(user), 0), int(nbytes))
        self._resize()

    def unregister(self, user: object) -> None:
        self._needs.pop(id(user), None)
        self._resize()

    @property
    def size(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def buffer(self) -> tuple[int, int]:
        """(address, size) of the shared buffer."""
        if self._buffer is None:
            return 0, 0
        return self._buffer.data_ptr(), self._buffer.numel()

    def _resize(self) -> None:
        need = max(self._needs.values(), default=0)
        if need == self.size:
            return
        self._buffer = None  # free first: growing must not hold old and new at once
        if need:
            self._buffer = torch.empty(need, dtype=torch.uint8, device=self.device)
        self.generation += 1


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def prepare_inputs(io: list[IOTensor], kwargs: dict[str, Any], device: torch.device, where: str) -> dict[str, torch.Tensor]:
    """The engine's inputs from the call's keyword arguments: matched by name, typed, on the device, in range."""
    inputs = [t for t in io if t.is_input]
    names = {t.name for t in inputs}
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in names)
    if unknown:
        raise TypeError(f"{where} got unexpected argument(s) {unknown}; it takes {sorted(names)}.")
    out = {}
    for t in inputs:
        value = kwargs.get(t.name)
        if value is None:
            raise TypeError(f"{where} needs the argument {t.name!r}.")
        value = torch.as_tensor(value)
        if value.ndim != len(t.shape) or any(d >= 0 and d != s for d, s in zip(t.shape, value.shape)):
            raise ValueError(f"{where}: {t.name} has shape {tuple(value.shape)}; the engine takes {t.shape} (-1: any).")
        if t.profile is not None:
            lo, _, hi = t.profile
            if any(not a <= s <= b for a, s, b in zip(lo, value.shape, hi)):
                raise ValueError(f"{where}: {t.name} has shape {tuple(value.shape)}, outside the engine's range "
                                 f"{tuple(lo)}..{tuple(hi)}. Build an engine for this size or batch "
                                 "(python -m pipelines build ... --width/--height or --min-size/--max-size, --max-batch).")
        out[t.name] = value.to(device=device, dtype=t.dtype).contiguous()
    return out


def bind(context: Any, io: list[IOTensor], inputs: dict[str, torch.Tensor], device: torch.device,
         where: str) -> list[torch.Tensor]:
    """Set input shapes and addresses, allocate outputs at the shapes TensorRT infers; returns the outputs."""
    for name, tensor in inputs.items():
        if context.set_input_shape(name, tuple(tensor.shape)) is False:
            raise ValueError(f"{where}: TensorRT refused shape {tuple(tensor.shape)} for {name}.")
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = []
    for t in io:
        if t.is_input:
            continue
        shape = tuple(int(d) for d in context.get_tensor_shape(t.name))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"{where}: TensorRT could not infer the shape of output {t.name} ({shape}).")
        tensor = torch.empty(shape, dtype=t.dtype, device=device)
        context.set_tensor_address(t.name, tensor.data_ptr())
        outputs.append(tensor)
    return outputs


class GraphCache:
    """CUDA-graph replays of one engine, one per input signature (shape, type).

    A capture bakes in every address, the shared scratch buffer's included: when the pool reallocates
    (`generation()` changes) all captures are dropped and redone on next use.
    """

    def __init__(self, run: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]], generation: Callable[[], int],
                 max_entries: int = 2, new_graph: Callable[[], Any] | None = None,
                 capture: Callable[[Any], Any] | None = None):
        self._run = run
        self._current = generation
        self.max_entries = max_entries  # each entry keeps its static inputs and outputs alive
        self._new_graph = new_graph or torch.cuda.CUDAGraph
        self._capture = capture or torch.cuda.graph
        self._entries: OrderedDict[tuple, tuple[Any, dict[str, torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self._generation: int | None = None
        self.captures = 0

    def _check_generation(self) -> None:
        if self._generation != self._current():
            self._entries.clear()
            self._generation = self._current()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        self._check_generation()
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        entry = self._entries.get(key)
        if entry is None:
            static_in = {name: t.clone() for name, t in inputs.items()}
            self._run(static_in)  # TensorRT needs one launch outside capture; it may also grow the scratch pool
            self._check_generation()
            graph = self._new_graph()
            with self._capture(graph):
                static_out = self._run(static_in)
            entry = (graph, static_in, static_out)
            self._entries[key] = entry
            self.captures += 1
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        graph, static_in, static_out = entry
        for name, t in inputs.items():
            static_in[name].copy_(t)
        graph.replay()
        return [t.clone() for t in static_out]

    def clear(self) -> None:
        self._entries.clear()


class TensorRTEngine:
    """One engine, called with the keyword arguments of the graph module it replaces."""

    def __init__(self, plan_path: Path, trt: Trt, device: str, *, pool: DeviceMemoryPool | None = None,
                 cuda_graphs: bool = False, weight_streaming_budget: int | None = None, name: str | None = None,
                 batch_inputs: frozenset[str] = frozenset()):
        self.plan_path = Path(plan_path)
        self.trt = trt
        self.device = torch.device(device)
        self.pool = pool
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.weight_streaming_budget = weight_streaming_budget
        self.name = name or self.plan_path.name
        self.batch_inputs = frozenset(batch_inputs)  # inputs whose first dimension counts images
        self._engine = self._context = None
        self._io: list[IOTensor] = []
        self._graphs: GraphCache | None = None
        self.scratch_bytes = 0
        self.load()

    @property
    def loaded(self) -> bool:
        return self._context is not None

    @property
    def nbytes(self) -> int:
        """Device memory it holds: the weights (about the plan's size) and the scratch memory it last needed."""
        return self.plan_path.stat().st_size + self.scratch_bytes

    @property
    def io(self) -> list[IOTensor]:
        return list(self._io)

    def load(self) -> None:
        if self.loaded:
            return
        logger = make_logger(self.trt)
        self._engine = deserialize(self.trt, self.plan_path.read_bytes(), logger)
        if self.weight_streaming_budget is not None and not set_weight_streaming_budget(self._engine, self.weight_streaming_budget):
            log.warning("%s: this TensorRT cannot stream weights; the whole engine stays on the GPU", self.name)
        self._io = engine_io(self.trt, self._engine)
        self._context = create_context(self.trt, self._engine, user_memory=self.pool is not None)
        self.scratch_bytes = 0
        if self.cuda_graphs:
            self._graphs = GraphCache(self._launch, lambda: self.pool.generation if self.pool else 0)

    def unload(self) -> None:
        if self._graphs is not None:
            self._graphs.clear()
        self._graphs = None
        self._context = self._engine = None
        if self.pool is not None:
            self.pool.unregister(self)

    def max_batch(self) -> int | None:
        limits = [t.profile[2][0] for t in self._io if t.name in self.batch_inputs and t.profile]
        return min(limits) if limits else None

    def __call__(self, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not self.loaded:
            self.load()
        limit = self.max_batch()
        batch = next((torch.as_tensor(kwargs[n]).shape[0] for n in self.batch_inputs if kwargs.get(n) is not None), None)
        if limit is not None and batch is not None and batch > limit:
            chunks = [self(**{k: (v[i:i + limit] if k in self.batch_inputs and v is not None else v)
                              for k, v in kwargs.items()}) for i in range(0, batch, limit)]
            if isinstance(chunks[0], tuple):
                return tuple(torch.cat(parts) for parts in zip(*chunks))
            return torch.cat(chunks)
        inputs = prepare_inputs(self._io, kwargs, self.device, self.name)
        if self._graphs is not None:
            outputs = self._graphs(inputs)
        else:
            outputs = self._launch(inputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _launch(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        outputs = bind(self._context, self._io, inputs, self.device, self.name)
        if self.pool is not None:
            self.scratch_bytes = max(self.scratch_bytes, scratch_bytes_for_shapes(self._context, self._engine))
            self.pool.reserve(self, self.scratch_bytes)
            set_context_memory(self._context, *self.pool.buffer())
        if not self._context.execute_async_v3(stream_handle(self.device)):
            raise RuntimeError(f"{self.name}: TensorRT failed to run the engine (see the log for its error).")
        return outputs

    def __repr__(self) -> str:
        return f"TensorRTEngine({self.name}, {'loaded' if self.loaded else 'unloaded'})"
