"""Issue 16 on the GPU: switching LoRAs on full-size FLUX.1-dev (random weights, nothing downloaded).

Writes a random rank-16 and rank-64 LoRA over every attention and MLP Linear of the transformer (PEFT
layout), then, at bf16 and at FP8: the time to switch none -> r16 -> r64 -> none (goal: at most 10 s;
nothing is read from disk again), and the denoising step time with and without a LoRA (goal: the same,
since the LoRA is fused). Prints a table; about 4-6 minutes on an H200.

    python scripts/gpu_lora_switch.py [--size 1024] [--steps 4] [--precisions bf16 fp8]
    python scripts/gpu_lora_switch.py --model demo-flux --device cpu --size 128 --steps 2   # a smoke run on a CPU
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pipelines.components import weight_shapes  # noqa: E402
from pipelines.loading import HubOptions  # noqa: E402
from pipelines.lora import NO_LORAS, load_set  # noqa: E402
from pipelines.manager import ManagerConfig, PipelineManager  # noqa: E402
from pipelines.precision import Backend  # noqa: E402
from pipelines.registry import resolve_spec  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402

# What Flux LoRAs trained with diffusers/ai-toolkit usually touch: attention projections and MLPs of every block.
TARGETS = re.compile(r"(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|"
                     r"add_k_proj|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)$")


def write_lora(path: Path, model: str, rank: int, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (out, inp) in weight_shapes(resolve_spec(model), "transformer").items():
        if TARGETS.search(layer):
            tensors[f"transformer.{layer}.lora_A.weight"] = (torch.randn(rank, inp, generator=gen) / inp ** 0.5).bfloat16()
            tensors[f"transformer.{layer}.lora_B.weight"] = (torch.randn(out, rank, generator=gen) * 1e-3).bfloat16()
    save_file(tensors, str(path))
    return len(tensors) // 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8"])
    parser.add_argument("--model", default="flux.1-dev")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    model = args.model
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    folder = Path(tempfile.mkdtemp(prefix="prism-loras-"))
    started = time.perf_counter()
    layers = {rank: write_lora(folder / f"r{rank}.safetensors", model, rank, rank) for rank in (16, 64)}
    print(f"wrote random LoRAs (rank 16 and 64, {layers[16]} layers each) in {time.perf_counter() - started:.1f} s")
    manager = PipelineManager(ManagerConfig(device=args.device, backend="torch", random_weights=True, lora_dir=folder,
                                            hub=HubOptions(offline=True)))
    spec = resolve_spec(model)
    backend = manager.backend(Backend.TORCH)
    started = time.perf_counter()
    sets = {name: load_set(((name, 1.0),), spec, manager.lora_library) for name in ("r16", "r64")}
    print(f"read and checked both LoRA files in {time.perf_counter() - started:.1f} s (before any model work)")

    def step_ms(precision: str, loras: tuple) -> float:
        request = GenerationRequest(prompt="a lighthouse at dusk", model=model, precision=precision, width=args.size,
                                    height=args.size, steps=args.steps, seed=1, loras=loras)
        manager.generate(request)  # warm (the first call at a new LoRA set also switches)
        return manager.generate(request).timings.mean_step_ms

    rows = []
    for precision in args.precisions:
        started = time.perf_counter()
        first = step_ms(precision, (("r16", 1.0),))  # loads the LoRA-ready form (FP8 keeps its 16-bit base)
        load_s = time.perf_counter() - started
        entry = next(r for k, r in manager.residency.entries.items() if k.name == "transformer" and k.variant == precision)
        component = entry.component

        def switch(loras) -> float:
            sync()
            t0 = time.perf_counter()
            backend.apply_loras(spec, "transformer", component, loras)
            sync()
            return time.perf_counter() - t0

        loads_before = sum(e.action == "load" for e in manager.residency.events)
        switches = {"none -> r16": (switch(NO_LORAS), switch(sets["r16"]))[1], "r16 -> r64": switch(sets["r64"]),
                    "r64 -> none": switch(NO_LORAS)}
        without = step_ms(precision, ())
        with_r64 = step_ms(precision, (("r64", 1.0),))
        assert sum(e.action == "load" for e in manager.residency.events) == loads_before, "a switch reloaded weights"
        rows.append((precision, load_s, switches, without, first, with_r64, component.host_bytes))
        manager.unload(model)

    print(f"\n{model}, random weights, {args.size}x{args.size}, {args.steps} steps, {manager.info.describe()}")
    print("| precision | first job with r16 (load + fuse) | none -> r16 | r16 -> r64 | r64 -> none | step no LoRA | "
          "step r16 | step r64 | host RAM kept to unfuse |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for precision, load_s, switches, without, r16, r64, host in rows:
        print(f"| {precision} | {load_s:.1f} s | " + " | ".join(f"{s:.2f} s" for s in switches.values()) +
              f" | {without:.1f} ms | {r16:.1f} ms | {r64:.1f} ms | {host / 1e9:.1f} GB |")
    worst = max(s for row in rows for s in row[2].values())
    print(f"\nslowest switch {worst:.2f} s (goal <= 10 s): {'met' if worst <= 10 else 'NOT met'}")
    manager.close()


if __name__ == "__main__":
    main()
