"""The compiled denoiser wrapper: a "compile" stage once per input signature, and eager when compiling fails."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.backends.compile_guard import CompiledEngine
from pipelines.run_context import JobCancelled, RunContext


class Adapter(nn.Module):
    """Shaped like the graph adapters: keyword tensors in, a tensor out."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, hidden_states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.block(hidden_states) * scale


def broken_backend(graph_module, example_inputs):
    raise RuntimeError("no C compiler found (cc not on PATH)")


def _job():
    seen = []
    return RunContext(torch.device("cpu"), on_progress=seen.append), seen


def _inputs(rows: int = 4):
    gen = torch.Generator().manual_seed(rows)
    return dict(hidden_states=torch.randn(rows, 8, generator=gen), scale=torch.tensor(2.0))


def test_a_new_input_signature_reports_one_compile_stage():
    torch.manual_seed(0)
    eager = Adapter().eval()
    wrapped = CompiledEngine(Adapter().eval(), lambda: None)
    wrapped.engine.load_state_dict(eager.state_dict())
    wrapped = CompiledEngine(wrapped.engine, lambda: wrapped.engine.compile(backend="eager"))
    ctx, seen = _job()
    with ctx.active():
        out1 = wrapped(**_inputs(4))
        wrapped(**_inputs(4))
        wrapped(**_inputs(6))  # another size: compiles again
    compile_reports = [p for p in seen if p.stage == "compile"]
    assert [p.done for p in compile_reports] == [0, 1, 0, 1]
    assert "compiling (once" in compile_reports[0].message and "compiled in" in compile_reports[1].message
    torch.testing.assert_close(out1, eager(**_inputs(4)))
    assert wrapped.compiled and not ctx.warnings


def test_a_failing_compile_runs_eager_and_says_why():
    module = Adapter().eval()
    expected = module(**_inputs())
    wrapped = CompiledEngine(module, lambda: module.compile(backend=broken_backend))
    ctx, seen = _job()
    with ctx.active():
        out = wrapped(**_inputs())
        again = wrapped(**_inputs(5))
    torch.testing.assert_close(out, expected)
    assert again.shape == (5, 8)
    assert not wrapped.compiled and "no C compiler" in wrapped.failure
    assert len(ctx.warnings) == 1 and ctx.warnings[0].startswith("torch.compile failed")
    assert [p.done for p in seen if p.stage == "compile"] == [0]  # no second compile attempt after the failure
    assert module._compiled_call_impl is None  # compilation really turned off


def test_cancelling_during_the_first_call_is_not_taken_for_a_compile_failure():
    class Cancels(nn.Module):
        def forward(self, hidden_states):
            raise JobCancelled("The job was cancelled.")

    wrapped = CompiledEngine(Cancels(), lambda: None)
    with pytest.raises(JobCancelled):
        wrapped(hidden_states=torch.zeros(1))
    assert wrapped.compiled


def test_without_a_running_job_the_wrapper_still_works():
    module = Adapter().eval()
    wrapped = CompiledEngine(module, lambda: module.compile(backend=broken_backend))
    torch.testing.assert_close(wrapped(**_inputs()), Adapter.forward(module, **_inputs()))


def _in_a_new_thread(fn):
    """fn's result, run in a fresh Python thread (as the manager's worker thread is)."""
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join()
    return result["value"]


def test_a_new_thread_gets_its_own_cuda_graph_tree_state():
    # Before torch 2.13 a thread other than inductor's importer had none, and a CUDA-graph replay there failed an
    # assert (pytorch#123177): the wrapper gives each calling thread the state before it replays.
    from torch._inductor import cudagraph_trees as trees

    from pipelines.backends.compile_guard import adopt_cuda_graph_state

    main_thread_state = trees.get_obj(trees.local, "tree_manager_containers")

    def adopt():
        had = hasattr(trees.local, "tree_manager_containers")
        adopt_cuda_graph_state()
        # Looked at directly: torch 2.13's get_obj would set it up itself, the torch this works around asserts.
        has, stashed = hasattr(trees.local, "tree_manager_containers"), torch._C._is_key_in_tls("tree_manager_locks")
        return had, has, stashed, trees.get_obj(trees.local, "tree_manager_containers")

    had_before, has_after, stashed, thread_state = _in_a_new_thread(adopt)
    assert not had_before and has_after
    assert isinstance(thread_state, dict) and thread_state is not main_thread_state
    assert stashed  # threads autograd starts from that thread inherit it
    adopt_cuda_graph_state()  # a thread that has it keeps it
    assert trees.get_obj(trees.local, "tree_manager_containers") is main_thread_state
