"""Does a CUDA-graph ("reduce-overhead") compiled module replay in a thread that did not import inductor, as the
manager's worker thread calls the denoiser? Without `adopt_cuda_graph_state` torch before 2.13 failed an
`_is_key_in_tls` assert there (SDXL, H200, 2026-12-01). Seconds on a GPU, no weights:

    python scripts/gpu_cuda_graph_thread_check.py
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.backends.compile_guard import adopt_cuda_graph_state  # noqa: E402


def replay_in_a_new_thread(adopt: bool) -> str:
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256)).cuda()
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(64, 256, device="cuda")
    outcome = {}

    def work():
        try:
            if adopt:
                adopt_cuda_graph_state()
            with torch.no_grad():
                for _ in range(4):  # warm-up, record, replays
                    torch.compiler.cudagraph_mark_step_begin()
                    y = compiled(x).clone()
            torch.cuda.synchronize()
            outcome["result"] = f"ran, max |difference from eager| {(y - model(x)).abs().max().item():.2e}"
        except Exception as exc:  # the failure being looked for
            outcome["result"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return outcome["result"]


def main() -> int:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("without adopt_cuda_graph_state:", replay_in_a_new_thread(adopt=False))
    torch._dynamo.reset()
    print("with adopt_cuda_graph_state:   ", replay_in_a_new_thread(adopt=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
