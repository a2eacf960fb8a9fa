"""Ray Serve mode on a local CPU cluster: two replicas of the demo models behind one RayManager.

Ray is told the machine has two GPUs (`num_gpus=2`): Serve schedules one replica on each of those fake
GPUs, and PyTorch, which sees no CUDA device, runs each replica on the CPU. The cluster starts once
for the module (about a minute on two cores) and is shut down at its end.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import types

import numpy as np
import pytest

# Loopback only: with this, Ray's own services bind and talk on 127.0.0.1 instead of this machine's network
# address. Read by Ray when it is imported, and inherited by the cluster's processes started from here.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray  # noqa: E402

from pipelines.manager import ManagerConfig, PipelineManager, QueueFullError
from pipelines.registry import REPO_ROOT
from pipelines.request import GenerationRequest, RequestError
from pipelines.run_context import JobCancelled
from pipelines.serving import INSTALL_HINT, RayMissingError, ServingError, require_ray
from pipelines.serving.client import RayManager, ReplicaDiedError, ServingConfig
from pipelines.serving.router import ModelAffinityRouter

MAX_QUEUE = 2
QUICK = dict(width=64, height=64, steps=2)


def quick(seed: int = 1, model: str = "demo-flux", **kw) -> GenerationRequest:
    return GenerationRequest("a red circle above a blue square", model, seed=seed, **{**QUICK, **kw})


def long_job(seed: int = 7) -> GenerationRequest:
    # 100 steps at the largest size the demo model takes, 4 images: tens of seconds even on a fast CPU core with
    # fast bf16 (at 64x64, 1 image it took ~3 s there and could finish before the test acted on it).
    return quick(seed, steps=100, width=128, height=128, num_images=4)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, namespace="prism-tests",
             log_to_driver=False, job_config=ray.job_config.JobConfig(code_search_path=[str(REPO_ROOT)]))
    # Not the app's own name ("prism"): test_the_app_serves_through_ray deploys that one beside this.
    manager = RayManager(ManagerConfig(max_queue=MAX_QUEUE), ServingConfig(app_name="prism-tests", start_timeout_s=300))
    try:
        yield manager
    finally:
        manager.close()
        ray.shutdown()


def live_replicas(manager: RayManager) -> list[dict]:
    return [r for r in manager.status().replica_rows() if r["health"] == "ok"]


def wait_until(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def running_on_replica(job) -> str:
    """Wait until `job` is denoising on a replica; its replica id."""
    wait_until(lambda: job.progress is not None and job.progress.stage == "denoise" or job.done, what="denoising")
    assert not job.done, f"the job ended early: {job._error!r}"
    return job.replica


def test_two_replicas_report_their_devices(cluster):
    rows = live_replicas(cluster)
    assert len(rows) == 2 and len({r["replica"] for r in rows}) == 2 and len({r["pid"] for r in rows}) == 2
    assert all(r["device"] == "CPU" and r["node"] == "127.0.0.1" and r["health"] == "ok" for r in rows)
    assert cluster.info.device == "cluster" and cluster.info.name.startswith("2 Ray Serve replica(s)")
    assert cluster.status().deployment.startswith("healthy")


def test_images_equal_single_process_and_progress_streams(cluster):
    steps: list[int] = []
    request = quick(seed=42, steps=3)
    remote = cluster.generate(request, on_progress=lambda p: steps.append(p.done) if p.stage == "denoise" else None,
                              timeout=180)
    local = PipelineManager(ManagerConfig(device="cpu"))
    try:
        here = local.generate(request)
    finally:
        local.close()
    assert [np.asarray(i).tolist() for i in remote.images] == [np.asarray(i).tolist() for i in here.images]
    assert remote.seeds == here.seeds == (42,)
    assert steps[-1] == 3 and steps == sorted(steps)


def test_concurrent_jobs_spread_over_both_replicas(cluster):
    jobs = [cluster.submit(quick(seed=s, steps=8)) for s in (1, 2)]
    results = [j.result(timeout=180) for j in jobs]
    assert {j.replica for j in jobs} == {r["replica"] for r in live_replicas(cluster)}
    assert all(r.images[0].size == (64, 64) for r in results)


def test_a_job_goes_to_the_replica_that_holds_its_model(cluster):
    first = cluster.submit(quick(seed=20, model="demo-sdxl"))
    first.result(timeout=180)
    holder = first.replica
    wait_until(lambda: any(r["replica"] == holder and "demo-sdxl" in r["resident_models"] for r in live_replicas(cluster)),
               what="the replica to report demo-sdxl")
    time.sleep(3)  # Serve polls routing stats every second and passes them to the router
    for seed in (21, 22, 23):  # one idle replica holds demo-sdxl, the other does not: always the holder
        job = cluster.submit(quick(seed=seed, model="demo-sdxl"))
        job.result(timeout=180)
        assert job.replica == holder


def test_the_ui_generates_and_compares_through_the_cluster(cluster):
    from pipelines.registry import Family
    from ui.service import PrismService

    service = PrismService(cluster)
    request = service.build_request(Family.FLUX, "demo-flux", "a red circle", None, 64, 64, 2, None, 5, 1, "bf16")
    assert service.start_generate(request).result(timeout=180).images[0].size == (64, 64)
    comparison = service.start_compare(request, ["16-bit", "fp8"]).result(timeout=300)
    assert [e.error for e in comparison.entries] == [None, None] and comparison.entries[1].psnr_db is not None


def test_router_prefers_a_replica_holding_the_model():
    def replica(rid: str, resident: list[str]):
        return types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id=rid), routing_stats={"resident": resident})

    a, b, c = replica("a", ["demo-flux@bf16"]), replica("b", ["demo-sdxl@bf16"]), replica("c", [])

    def ranks(tag: str = "", **kwargs):
        pending = types.SimpleNamespace(kwargs=kwargs, metadata=types.SimpleNamespace(multiplexed_model_id=tag),
                                        routing_context=types.SimpleNamespace(should_backoff=False))
        import asyncio

        return asyncio.run(ModelAffinityRouter.choose_replicas(None, [a, b, c], pending))

    assert ranks("demo-sdxl@bf16") == [[b], [a, c]]
    assert ranks("demo-sdxl@fp8") == [[a, b, c]]  # another precision is another load: no preference
    assert ranks("") == [[a, b, c]]
    assert ranks("demo-flux@bf16", replica="c") == [[c]]  # unload calls name their replica


def test_errors_cross_intact_or_as_a_readable_internal_error():
    from pipelines.manager import InternalError
    from pipelines.serving.client import _affinity
    from pipelines.serving.messages import portable_error

    class NeedsTwoArguments(RuntimeError):
        def __init__(self, what: str, where: str):
            super().__init__(f"{what} at {where}")

    same = RequestError("steps must be between 1 and 100")
    assert portable_error(same) is same
    crossed = portable_error(NeedsTwoArguments("bad thing", "step 3"))
    assert type(crossed) is InternalError and "NeedsTwoArguments: bad thing at step 3" in str(crossed)
    assert _affinity(quick(precision="fp8")) == "demo-flux@fp8"
    assert _affinity(quick(model="no-such-model")) == ""  # no preference; the replica answers the RequestError


def test_request_errors_are_the_single_process_ones(cluster, cpu_manager):
    bad = quick(steps=0)
    with pytest.raises(RequestError) as remote:
        cluster.generate(bad, timeout=120)
    with pytest.raises(RequestError) as local:
        cpu_manager.generate(bad, timeout=120)
    assert str(remote.value) == str(local.value) and "steps must be between 1 and" in str(remote.value)


def test_busy_answer_queue_positions_and_cancelling(cluster):
    running = [cluster.submit(long_job(seed=s)) for s in (1, 2)]
    assert {running_on_replica(j) for j in running} == {r["replica"] for r in live_replicas(cluster)}
    waiting = [cluster.submit(quick(seed=s)) for s in (3, 4)]
    try:
        with pytest.raises(QueueFullError, match="The server is busy: 2 jobs are already waiting"):
            cluster.submit(quick(seed=5))  # answered at once, as a single manager does
        assert [cluster.queue_position(j) for j in waiting] == [0, 1]
        waiting[0].cancel()  # a waiting job leaves Serve's queue without running
        with pytest.raises(JobCancelled):
            waiting[0].result(timeout=30)
        assert waiting[0].replica is None and cluster.queue_position(waiting[1]) == 0
        running[0].cancel()  # a running job stops at its next step and frees its replica
        with pytest.raises(JobCancelled):
            running[0].result(timeout=30)
        assert waiting[1].result(timeout=120).images  # the freed replica takes the next job
    finally:
        for job in running + waiting:
            job.cancel()
    with pytest.raises(JobCancelled):
        running[1].result(timeout=60)


def test_a_job_that_cannot_be_sent_takes_no_place_in_the_queue(cluster, monkeypatch):
    class Unreachable:  # the deployment's handle when Serve has gone away under the app
        def options(self, **_):
            return self

        def remote(self, *_):
            raise RuntimeError("the deployment is gone")

    wait_until(lambda: cluster._in_flight == 0, what="the earlier tests' jobs to end")
    real = cluster._handle
    monkeypatch.setattr(cluster, "_handle", Unreachable())
    for _ in range(cluster.replica_count + MAX_QUEUE + 1):  # more than the queue holds: none may count as waiting
        with pytest.raises(RuntimeError, match="the deployment is gone"):
            cluster.submit(quick())
    monkeypatch.setattr(cluster, "_handle", real)
    assert cluster.generate(quick(seed=8), timeout=120).images


def test_system_tab_lists_replicas_and_unload_frees_them(cluster):
    from ui.service import PrismService
    from ui.system_tab import system_markdown, system_snapshot

    service = PrismService(cluster)
    snap = system_snapshot(service)
    assert len(snap["replicas"]) == 2 and {"device", "node", "resident_models", "queued", "health"} <= set(snap["replicas"][0])
    assert "### Replicas" in system_markdown(snap)
    memory = service.memory()
    assert 0 < memory.used_bytes <= memory.total_bytes and "replica" in memory.kind
    wait_until(lambda: cluster.status().used_bytes > 0, what="a resident model")
    assert cluster.unload(None) > 0
    wait_until(lambda: cluster.status().used_bytes == 0, what="both replicas empty")


def test_serving_bench_and_status_lines(cluster):
    from pipelines.serving.commands import run_serving_bench, status_lines

    bench = run_serving_bench(cluster, quick(), requests=MAX_QUEUE)
    assert bench.images == MAX_QUEUE and sum(bench.jobs_per_replica.values()) == MAX_QUEUE
    assert bench.replicas == 2 and bench.images_per_minute > 0 and bench.size == "64x64" and bench.devices == ["CPU"]
    lines = status_lines(cluster.status())
    assert lines[0].startswith("deployment: healthy") and len(lines) == 3
    assert all("127.0.0.1" in ln and ln.endswith(", ok") for ln in lines[1:])


def test_more_replicas_than_gpus_is_refused_and_the_app_keeps_serving(cluster):
    with pytest.raises(ServingError, match=r"--replicas 3 asks for more GPUs than the cluster has \(2\); use --replicas 2"):
        RayManager(ManagerConfig(), ServingConfig(replicas=3, app_name="prism-too-many"))
    with pytest.raises(ServingError, match="--max-queue 1 or more"):
        RayManager(ManagerConfig(max_queue=0))
    assert cluster.generate(quick(seed=30), timeout=180).images


def test_the_app_serves_through_ray(cluster, tmp_path):
    """`python app.py --ray --device cpu`, in process: a CPU replica beside the fixture's (the cluster's two
    fake GPUs are taken), the UI's service over a RayManager, the HTTP API's System status listing it."""
    import socket

    from gradio_client import Client
    from ui.launch import LaunchOptions, start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, service = start(LaunchOptions(port=port, ray="", manager=ManagerConfig(device="cpu"), models=("demo-flux",),
                                        output_dir=tmp_path),
                          block=False)
    try:
        assert isinstance(service.manager, RayManager) and service.manager.replica_count == 1
        request = service.build_request(None, "demo-flux", "a red circle", None, 64, 64, 2, None, 3, 1, "bf16")
        assert service.start_generate(request).result(timeout=180).images[0].size == (64, 64)
        overview = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/system_status")[0]
        assert "### Replicas" in overview and "1 Ray Serve replica(s): CPU" in overview
    finally:
        demo.close()
        service.close()  # removes the app's deployment; the fixture's keeps serving
    assert cluster.generate(quick(seed=31), timeout=180).images


def test_killed_replica_fails_its_job_and_serve_restarts_it(cluster):
    job = cluster.submit(long_job())
    victim = running_on_replica(job)
    pid = next(r["pid"] for r in live_replicas(cluster) if r["replica"] == victim)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ReplicaDiedError, match="stopped unexpectedly") as died:
        job.result(timeout=120)
    assert victim in str(died.value) and "submit the job again" in str(died.value)
    assert cluster.generate(quick(seed=9), timeout=180).images  # the other replica keeps serving
    fresh = wait_until(lambda: {r["replica"] for r in live_replicas(cluster)} - {victim} if len(
        [r for r in live_replicas(cluster) if r["replica"] != victim]) == 2 else None, timeout=180,
        what="Serve to restart the replica")
    assert len(fresh) == 2
    jobs = [cluster.submit(quick(seed=s, steps=4)) for s in (10, 11)]
    assert all(j.result(timeout=180).images for j in jobs) and {j.replica for j in jobs} == fresh


def test_missing_ray_names_the_requirements_file(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayMissingError, match="pip install -r requirements-ray.txt"):
        require_ray()
    with pytest.raises(RayMissingError):
        RayManager(ManagerConfig())
    from pipelines.cli import main

    assert main(["serve", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: Ray Serve is not installed: run `pip install -r requirements-ray.txt`" in err and "Traceback" not in err


def test_ray_flags_are_checked_before_anything_starts(capsys):
    from ui.launch import main as app_main
    from ui.launch import options_from_args

    assert options_from_args(["--ray"]).ray == "" and options_from_args(["--ray", "10.0.0.1:6379"]).ray == "10.0.0.1:6379"
    assert options_from_args([]).ray is None
    assert app_main(["--ray", "--max-queue", "0"]) == 2
    assert "--ray needs --max-queue 1 or more" in capsys.readouterr().err
    from pipelines.cli import main

    with pytest.raises(SystemExit, match="--replicas must be 1 or more"):
        main(["serve", "--replicas", "0"])
    assert INSTALL_HINT.startswith("Ray Serve is not installed")


def test_the_cluster_offers_what_the_ui_and_api_ask_of_a_manager(cluster):
    """ui/service.py, ui/health.py and ui/metrics.py are handed a RayManager in --ray mode: every member they use
    on a PipelineManager must exist here too."""
    used = ("submit", "generate", "queue_position", "status", "unload", "close", "forget_tensorrt_failures",
            "worker_alive", "job_observers", "policy", "info", "config", "engine_cache", "lora_library")
    local = PipelineManager(ManagerConfig(device="cpu"))
    try:
        assert all(hasattr(local, name) for name in used)  # the list names real manager members
    finally:
        local.close()
    assert [name for name in used if not hasattr(cluster, name)] == []
    from pipelines.precision import Backend

    assert cluster.worker_alive and cluster.policy.support("bf16", Backend.TORCH).runnable
    cluster.forget_tensorrt_failures()  # reaches every replica without error
