"""`python -m pipelines serve [--address A] [--replicas N] [--bench]`: the Ray Serve deployment, headless.

Without --bench it deploys, prints each replica (machine, GPU, resident models, health) every 10 s and
keeps serving until Ctrl-C. With --bench it measures images per minute for --requests concurrent jobs:

    python -m pipelines serve --bench --model flux.1-dev --precision fp8 --random-weights --requests 8 --replicas 1
    python -m pipelines serve --bench --model flux.1-dev --precision fp8 --random-weights --requests 8 --replicas 2
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..commands import chosen_model, request_from_args
from ..config import manager_config
from ..gpu import GiB
from ..request import GenerationRequest
from .client import ClusterStatus, RayManager, ServingConfig


@dataclass(frozen=True)
class ServingBench:
    model: str
    precision: str
    size: str
    steps: int
    replicas: int
    requests: int
    images: int
    wall_s: float
    images_per_minute: float
    jobs_per_replica: dict[str, int]
    devices: list[str]


def run_serving_bench(manager: RayManager, request: GenerationRequest, requests: int) -> ServingBench:
    """Warm every replica (one job each, at once: Serve gives an idle replica each), then time `requests`
    jobs submitted together. Seeds differ so no result can be reused."""
    for job in [manager.submit(replace(request, seed=i)) for i in range(manager.replica_count)]:
        job.result()
    started = time.perf_counter()
    jobs = [manager.submit(replace(request, seed=1000 + i)) for i in range(requests)]
    results = [job.result() for job in jobs]
    wall = time.perf_counter() - started
    images = sum(len(r.images) for r in results)
    first = results[0].request
    return ServingBench(model=results[0].model_id, precision=str(getattr(first.precision, "value", first.precision)),
                        size=f"{first.width}x{first.height}", steps=int(first.steps or 0),
                        replicas=manager.replica_count, requests=requests, images=images, wall_s=round(wall, 3),
                        images_per_minute=round(images / wall * 60, 2),
                        jobs_per_replica=dict(Counter(job.replica or "?" for job in jobs)),
                        devices=sorted({r.device for r in results}))


def status_lines(status: ClusterStatus) -> list[str]:
    lines = [f"deployment: {status.deployment}; {status.queued} job(s) waiting"]
    for row in status.replica_rows():
        lines.append(f"  replica {row['replica']} on {row['node']}: {row['device']} (cc {row['compute_capability']}), "
                     f"{row['memory_used_bytes'] / GiB:.1f}/{row['memory_total_bytes'] / GiB:.1f} GiB, "
                     f"models {', '.join(row['resident_models']) or 'none'}, "
                     f"{'running ' + row['running'] if row['running'] else 'idle'}, {row['health']}")
    return lines


def run_serve(args: argparse.Namespace) -> int:
    if args.replicas is not None and args.replicas < 1:
        raise SystemExit("error: --replicas must be 1 or more.")
    if args.requests < 1:
        raise SystemExit("error: --requests must be 1 or more.")
    max_queue = args.max_queue if args.max_queue is not None else (args.requests if args.bench else 4)
    if max_queue < 1:
        raise SystemExit("error: --max-queue must be 1 or more (Ray Serve's queue cannot be empty).")
    model = chosen_model(args) if args.bench else None
    config = manager_config(args, max_queue=max_queue)
    manager = RayManager(config, ServingConfig(address=args.address, replicas=args.replicas,
                                               log_to_driver=args.verbose))
    try:
        print("\n".join(status_lines(manager.status())), flush=True)
        if args.bench:
            bench = run_serving_bench(manager, request_from_args(args, model, args.precision), args.requests)
            print(f"{bench.images} images of {bench.model} {bench.precision} {bench.size}, {bench.steps} steps, on "
                  f"{bench.replicas} replica(s): {bench.wall_s:.1f} s, {bench.images_per_minute:.1f} images/min "
                  f"(jobs per replica: {bench.jobs_per_replica})")
            if args.json_out:
                Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json_out).write_text(json.dumps(asdict(bench), indent=2))
            return 0
        print("Serving; Ctrl-C stops and removes the deployment.", flush=True)
        while True:
            time.sleep(10)
            print("\n".join(status_lines(manager.status())), flush=True)
    finally:
        manager.close()
