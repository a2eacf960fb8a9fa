"""A compiled engine (the denoiser; the VAE decoder with --compile-vae) that says when it compiles and falls
back to eager when compiling fails.

torch.compile compiles lazily, on the first call with each new input signature, and a failure there
(no C compiler, an inductor bug, a Triton that does not support this GPU) would fail the user's job.
This wrapper makes both visible: a new signature reports a "compile" progress stage ("compiling (once)")
with its time, and a failure turns compilation off for this model, reruns the call eagerly and leaves a
warning on the job, so the image still comes and the result says why it ran eager.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import nn

from ..run_context import JobCancelled, current_context

log = logging.getLogger("prism.compile")


def _signature(inputs: dict[str, Any]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else (k, repr(v))
                 for k, v in sorted(inputs.items()))


def _reason(exc: BaseException) -> str:
    """One line: the underlying error (dynamo wraps a backend's own exception in BackendCompilerFailed)."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    first_line = (str(inner).strip().splitlines() or [""])[0][:200]
    return f"{type(inner).__name__}: {first_line}" if first_line else type(inner).__name__


def reset_compiled(module: nn.Module) -> None:
    """Undo `nn.Module.compile()` on `module` and its children (it stores the compiled call per module)."""
    for child in module.modules():
        if getattr(child, "_compiled_call_impl", None) is not None:
            child._compiled_call_impl = None


def adopt_cuda_graph_state() -> None:
    """Give the calling thread inductor's CUDA-graph-tree state, where its torch does not do so by itself.

    Why: before the fix of pytorch#123177 (PR #184357, in torch 2.13; not in the lent GPU's 2.11) that state
    exists only in the thread that imported inductor and the threads autograd starts, so a "reduce-overhead"
    model called from the manager's worker thread failed `assert torch._C._is_key_in_tls(...)` and the compile
    guard ran SDXL eager (H200, 2026-12-01, BENCHMARKS.md). Each thread gets its own trees, as the fixed torch
    does; the manager runs one job at a time, so no two threads capture at once."""
    from torch._inductor import cudagraph_trees as trees

    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return  # this thread has it (the importing thread, an autograd thread, or a torch that sets it lazily)
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)
    # As torch does for its importing thread: threads autograd starts from this one (a backward) inherit it.
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


class CompiledEngine(nn.Module):
    """Wraps a component's graph adapter whose module (or blocks) `compile_fn` marks for torch.compile; `part`
    and `first_call` name it and what its first compiled call includes, in the "compile" stage's text."""

    def __init__(self, engine: nn.Module, compile_fn: Callable[[], None], cuda_graphs: bool = False,
                 part: str = "model", first_call: str = "the first step"):
        super().__init__()
        self.engine = engine
        self.part, self.first_call = part, first_call
        # With CUDA graphs (mode "reduce-overhead") an output lives in the graph's memory pool and the next replay
        # overwrites it; a multistep scheduler keeps earlier outputs, so each call starts a new step and returns
        # a copy (one latent-sized copy: microseconds against a step of tens of milliseconds).
        self.cuda_graphs = cuda_graphs
        compile_fn()
        self.failure: str | None = None  # why compilation was turned off, once it was
        self._compiled: set[tuple] = set()

    @property
    def compiled(self) -> bool:
        return self.failure is None

    def forward(self, **inputs: Any) -> Any:
        signature = _signature(inputs)
        if self.failure is not None or signature in self._compiled:
            return self._call(inputs)
        ctx = current_context()
        if ctx is not None:
            ctx.report("compile", 0, 1,
                       f"compiling (once for this {self.part}, precision and size; kept in engine_cache/)")
        started = time.perf_counter()
        try:
            out = self._call(inputs)
        except (JobCancelled, torch.OutOfMemoryError, KeyboardInterrupt):
            raise  # not a compilation problem
        except Exception as exc:
            self.failure = _reason(exc)
            log.warning("torch.compile failed, running eager from now on: %s", self.failure, exc_info=True)
            reset_compiled(self.engine)
            out = self.engine(**inputs)  # an eager failure here is a real error and propagates
            if ctx is not None:
                ctx.warn(f"torch.compile failed ({self.failure}); this model runs eager until the app restarts.")
            return out
        self._compiled.add(signature)
        if ctx is not None:
            seconds = time.perf_counter() - started
            ctx.report("compile", 1, 1, f"compiled in {seconds:.1f} s ({self.first_call} included)")
        return out

    def _call(self, inputs: dict[str, Any]) -> Any:
        if not self.cuda_graphs or self.failure is not None:
            return self.engine(**inputs)
        adopt_cuda_graph_state()
        torch.compiler.cudagraph_mark_step_begin()
        out = self.engine(**inputs)
        return out.clone() if isinstance(out, torch.Tensor) else out
