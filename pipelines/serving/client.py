"""RayManager: the PipelineManager's public interface, served by replicas on a Ray cluster.

The UI, the CLI and Compare call `submit` / `generate` / `queue_position` / `status` / `unload` /
`close` and read `info`, `config` and `engine_cache`, exactly as they do on a PipelineManager, so
handing them a RayManager is the whole switch. Ray does the distributed work: Serve places one replica
per GPU, keeps the queue, routes by model affinity
(router.py), streams progress back, cancels, health-checks and restarts replicas.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..backends import TensorRTStatus, tensorrt_status
from ..cpu_math import FAST_CPU
from ..device_policy import DevicePolicy
from ..engine_cache import EngineCache
from ..gpu import DeviceInfo
from ..lora import LoraLibrary
from ..manager import InternalError, Job, JobState, ManagerConfig, ManagerStatus, QueueFullError, ResidentInfo
from ..precision import Precision
from ..registry import REPO_ROOT, resolve_spec
from ..request import GenerationRequest, GenerationResult
from ..run_context import JobCancelled, Progress
from . import ServingError, require_ray
from .messages import ReplicaEvent, ReplicaStatus, affinity_tag, result_from_wire

log = logging.getLogger("prism.serving")

REPLICA_QUEUE = 4  # each replica's own manager queue: Serve sends one job at a time, but a cancelled
#                    job may still be finishing its step when the next one arrives
STALE_AFTER_S = 5.0  # a replica silent this long is shown as not responding


class ReplicaDiedError(InternalError):
    """The replica running a job died (its process was killed, its machine left the cluster)."""


@dataclass(frozen=True)
class ServingConfig:
    address: str | None = None  # "HOST:6379"; None: the cluster `ray start` made here, else a new local one
    replicas: int | None = None  # None: one per GPU in the cluster (one CPU replica where it has none)
    cpus_per_replica: float = 1.0
    app_name: str = "prism"
    log_to_driver: bool = False  # replicas' logs in this terminal (they are always in Ray's log folder)
    start_timeout_s: float = 600.0  # replicas import torch and probe their GPU before they report


@dataclass
class RayJob(Job):
    """A job sent to the cluster: the manager's Job (result, state, done, progress), cancelled through Serve."""

    replica: str | None = None  # set when a replica starts it
    _response: Any = None

    def cancel(self) -> None:
        """A waiting job leaves Serve's queue, a running one stops at its next step."""
        super().cancel()
        if self._response is not None:
            self._response.cancel()


@dataclass(frozen=True)
class ClusterStatus:
    """ManagerStatus's fields over every replica (so the UI reads it as it reads one manager), plus the replicas."""

    device: DeviceInfo
    budget_bytes: int
    used_bytes: int
    parked_bytes: int
    resident: tuple[ResidentInfo, ...]
    queued: int
    running: GenerationRequest | None
    tensorrt: TensorRTStatus
    backend_note: str
    engine_cache_dir: Path
    engine_cache_bytes: int
    events: tuple[str, ...]
    replicas: tuple[ReplicaStatus, ...]
    deployment: str  # Serve's view of the deployment, e.g. "HEALTHY"
    checked_at: float

    @property
    def memory_used_bytes(self) -> int:
        return sum(r.memory_used_bytes for r in self.replicas)

    @property
    def memory_total_bytes(self) -> int:
        return sum(r.memory_total_bytes for r in self.replicas)

    def replica_rows(self) -> list[dict[str, Any]]:
        """One plain dict per replica for the System tab and its JSON API."""
        rows = []
        for r in self.replicas:
            info, m = r.manager.device, r.manager
            age = self.checked_at - r.reported_at
            models = sorted({x.key.model for x in m.resident if x.nbytes})
            rows.append({
                "replica": r.replica, "node": r.node, "pid": r.pid, "device": info.name, "device_id": info.device,
                "compute_capability": info.capability_text, "resident_models": models,
                "running": None if m.running is None else f"{m.running.model} "
                                                           f"{Precision.parse(m.running.precision).value}",
                "queued": m.queued, "memory_used_bytes": r.memory_used_bytes, "memory_total_bytes": r.memory_total_bytes,
                "health": "ok" if age < STALE_AFTER_S else f"not responding for {age:.0f} s",
            })
        return rows


class RayManager:
    """Submit jobs to a Ray Serve deployment of PipelineManagers; the PipelineManager's public interface."""

    def __init__(self, config: ManagerConfig = ManagerConfig(), serving: ServingConfig = ServingConfig()):
        require_ray()
        import ray
        from ray import serve

        if config.max_queue < 1:
            raise ServingError("With Ray Serve the queue must hold at least one job: use --max-queue 1 or more.")
        self.config, self.serving = config, serving
        self.engine_cache = EngineCache(config.engine_cache_dir)
        self._ray, self._serve = ray, serve
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # Workers import `pipelines` from this checkout: every machine needs it at the same path (README).
            try:
                ray.init(address=serving.address, namespace="prism", log_to_driver=serving.log_to_driver,
                         job_config=ray.job_config.JobConfig(code_search_path=[str(REPO_ROOT)]))
            except (ConnectionError, RuntimeError) as exc:  # ConnectionError is an OSError: not "port taken"
                raise ServingError(
                    f"Cannot join the Ray cluster at {serving.address or 'this machine'} ({_first_line(exc)}). Check that "
                    "`ray status` works on its head machine, that its port (6379) is open to this machine, and, as "
                    "Ray requires tokens by default, that RAY_AUTH_MODE=token is set here with the head's "
                    "~/.ray/auth_token copied to this machine.") from None
        self._waiting: list[RayJob] = []  # submitted, not yet started on a replica
        self._in_flight = 0  # submitted, not yet finished
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._replicas_seen: dict[str, ReplicaStatus] = {}
        self.job_observers: list[Callable[[RayJob], None]] = []  # called with each finished job, as the manager does
        # The LoRA names the UI offers; every replica reads the same folder (shared, like the models).
        self.lora_library = LoraLibrary(config.lora_dir, allow_paths=config.lora_paths)
        self._board: Any = None  # set by _deploy; close() removes only what was made
        self._handle: Any = None
        try:
            self.replica_count = self._deploy()
            self.info = cluster_device(self._wait_for_replicas())
            # What each precision runs as, for the UI's labels: the slowest replica's facts.
            self.policy = DevicePolicy.for_device(self.info.capability, self.info.cpu_math or FAST_CPU)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ deployment

    def _deploy(self) -> int:
        from ray.serve.config import RequestRouterConfig

        from .deployment import PrismReplica, StatusBoard
        from .router import ModelAffinityRouter

        gpus = 0 if self.config.device == "cpu" else int(self._ray.cluster_resources().get("GPU", 0))
        count = self.serving.replicas or max(gpus, 1)
        if self.serving.replicas and gpus and count > gpus:
            raise ServingError(f"--replicas {count} asks for more GPUs than the cluster has ({gpus}); "
                               f"use --replicas {gpus} or fewer, or add a machine (`ray status` lists them).")
        self._board = self._ray.remote(StatusBoard).options(num_cpus=0).remote()
        # Each replica sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), so "auto" finds it as cuda:0.
        replica_config = replace(self.config, device="auto" if gpus else "cpu", max_queue=REPLICA_QUEUE)
        deployment = self._serve.deployment(PrismReplica, name="PrismReplica").options(
            num_replicas=count,
            ray_actor_options={"num_gpus": 1 if gpus else 0, "num_cpus": self.serving.cpus_per_replica},
            max_ongoing_requests=1,  # one job per GPU; the rest wait in Serve's queue for whichever frees first
            max_queued_requests=self.config.max_queue,
            request_router_config=RequestRouterConfig(request_router_class=ModelAffinityRouter,
                                                      request_routing_stats_period_s=1.0,
                                                      request_routing_stats_timeout_s=5.0),
            health_check_period_s=2.0, health_check_timeout_s=30.0,
            graceful_shutdown_timeout_s=5.0,
        )
        self._serve.start(proxy_location="Disabled")  # no Serve HTTP port: the Gradio app is the API
        app = deployment.bind(replica_config, self._board)
        self._handle = self._serve.run(app, name=self.serving.app_name, route_prefix=None)
        return count

    def _wait_for_replicas(self) -> list[ReplicaStatus]:
        deadline = time.monotonic() + self.serving.start_timeout_s
        while True:
            statuses = self._snapshot()
            if len(statuses) >= self.replica_count:
                return statuses
            if time.monotonic() > deadline:
                raise RuntimeError(f"Only {len(statuses)} of {self.replica_count} Ray Serve replicas reported within "
                                   f"{self.serving.start_timeout_s:.0f} s; see `ray status` and Ray's serve logs.")
            time.sleep(0.2)

    def _snapshot(self) -> list[ReplicaStatus]:
        statuses = self._ray.get(self._board.snapshot.remote(), timeout=30)
        self._replicas_seen.update({s.replica: s for s in statuses})
        return statuses

    # ------------------------------------------------------------------ submitting

    def submit(self, request: GenerationRequest, on_progress: Callable[[Progress], None] | None = None) -> RayJob:
        """Send a job to the deployment, or raise QueueFullError at once when `max_queue` jobs already wait
        beyond one running on each replica.

        Counted here rather than left to Serve's `max_queued_requests`, which stays as the backstop: Serve's
        count drops while a waiting request is tried on a replica that turns it away, and a request arriving
        in that moment was accepted (seen in a clean-clone CI on a 2-core EPYC, 2026-12-02, with 2 running and
        2 waiting). This process is the app's one door to the cluster, so its count is exact.
        """
        job = RayJob(next(self._ids), request, on_progress)
        with self._lock:
            if self._in_flight >= self.replica_count + self.config.max_queue:
                raise QueueFullError(
                    f"The server is busy: {self.config.max_queue} jobs are already waiting. Try again in a moment.")
            self._in_flight += 1
            self._waiting.append(job)
            ahead = len(self._waiting) - 1
        job.report(Progress("queue", 0, 1, f"queued: {ahead} job(s) ahead" if ahead else "starting"))
        try:
            call = self._handle.options(method_name="generate", stream=True, multiplexed_model_id=_affinity(request))
            job._response = call.remote(request)
        except BaseException:  # never sent: it must not hold a place in the count
            with self._lock:
                self._in_flight -= 1
            self._leave_queue(job)
            raise
        if job.cancel_event.is_set():  # cancelled before the response existed
            job._response.cancel()
        threading.Thread(target=self._follow, args=(job,), name=f"prism-ray-job-{job.id}", daemon=True).start()
        return job

    def generate(self, request: GenerationRequest, on_progress: Callable[[Progress], None] | None = None,
                 timeout: float | None = None) -> GenerationResult:
        return self.submit(request, on_progress).result(timeout)

    def queue_position(self, job: RayJob) -> int:
        """Jobs of this app ahead of `job` in Serve's queue (0 when it is running or next)."""
        with self._lock:
            return self._waiting.index(job) if job in self._waiting else 0

    def _follow(self, job: RayJob) -> None:
        """Read the job's stream of ReplicaEvents to its end, on a thread of its own."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        last: ReplicaEvent | None = None
        try:
            # Read to the stream's end, not just to the result: then the replica has finished the call and
            # counts as free, so a job submitted right after this one can go to it (model affinity).
            for event in job._response:
                self._started(job, event)
                if event.progress is not None:
                    job.report(event.progress)
                else:
                    last = event
            if last is not None and last.result is not None:
                job._finish(JobState.DONE, result=result_from_wire(last.result))
            elif last is not None and last.error is not None:
                cancelled = isinstance(last.error, JobCancelled)
                job._finish(JobState.CANCELLED if cancelled else JobState.FAILED, error=last.error)
            else:
                job._finish(JobState.FAILED, error=InternalError("The replica ended the job without a result; see its log."))
        except RequestCancelledError:
            job._finish(JobState.CANCELLED, error=JobCancelled("The job was cancelled."))
        except BackPressureError:
            job._finish(JobState.FAILED, error=QueueFullError(
                f"The server is busy: {self.config.max_queue} jobs are already waiting. Try again in a moment."))
        except RayActorError:
            job._finish(JobState.FAILED, error=ReplicaDiedError(self._died_message(job)))
        except Exception as exc:
            log.error("job %d failed on the cluster", job.id, exc_info=True)
            job._finish(JobState.FAILED, error=InternalError(
                f"The cluster could not run the job ({type(exc).__name__}: {_first_line(exc)}). "
                "The app is still running; its log has the details."))
        finally:
            self._leave_queue(job)
            with self._lock:
                self._in_flight -= 1
            for observe in self.job_observers:
                try:
                    observe(job)
                except Exception:  # an observer (the HTTP API's metrics) must never break job handling
                    log.exception("job observer failed")

    @property
    def worker_alive(self) -> bool:
        """At least one replica reported recently (what /health asks of a single manager's worker)."""
        now = time.time()
        return any(now - s.reported_at < STALE_AFTER_S for s in self._snapshot())

    def _started(self, job: RayJob, event: ReplicaEvent) -> None:
        if job.replica is None:
            job.replica, job.state = event.replica, JobState.RUNNING
            self._leave_queue(job)

    def _leave_queue(self, job: RayJob) -> None:
        with self._lock:
            if job not in self._waiting:
                return
            self._waiting.remove(job)
            waiting = list(self._waiting)
        for i, other in enumerate(waiting):
            other.report(Progress("queue", 0, 1, f"queued: {i} job(s) ahead" if i else "starting"))

    def _died_message(self, job: RayJob) -> str:
        seen = self._replicas_seen.get(job.replica or "")
        where = f" (replica {seen.replica} on {seen.node}, {seen.manager.device.name})" if seen else ""
        return (f"The GPU worker running this job{where} stopped unexpectedly: its process died or its machine left "
                "the cluster. Ray Serve is restarting it; submit the job again.")

    # ------------------------------------------------------------------ status, unloading, closing

    def status(self) -> ClusterStatus:
        statuses = tuple(self._snapshot())
        managers: list[ManagerStatus] = [s.manager for s in statuses]
        first = managers[0] if managers else None
        running = next((m.running for m in managers if m.running is not None), None)
        with self._lock:
            waiting = len(self._waiting)
        events = tuple(f"[{s.replica}] {e}" for s in statuses for e in s.manager.events)[-20:]
        return ClusterStatus(
            device=cluster_device(list(statuses)) if statuses else self.info,
            budget_bytes=sum(m.budget_bytes for m in managers), used_bytes=sum(m.used_bytes for m in managers),
            parked_bytes=sum(m.parked_bytes for m in managers),
            resident=tuple(r for m in managers for r in m.resident),
            queued=waiting + sum(m.queued for m in managers), running=running,
            tensorrt=first.tensorrt if first else tensorrt_status(self.info.capability),
            backend_note=first.backend_note if first else "no replica has reported yet",
            engine_cache_dir=self.engine_cache.root, engine_cache_bytes=self.engine_cache.total_bytes(),
            events=events, replicas=statuses, deployment=self._deployment_state(), checked_at=time.time())

    def _deployment_state(self) -> str:
        try:
            app = self._serve.status().applications[self.serving.app_name]
            dep = app.deployments["PrismReplica"]
            counts = ", ".join(f"{n} {state.lower()}" for state, n in dep.replica_states.items())
            return f"{dep.status.value.lower()} ({counts})"
        except Exception as exc:  # the controller is restarting
            return f"unknown ({type(exc).__name__})"

    def unload(self, model: str | None = None, timeout_s: float = 300.0) -> int:
        """Unload `model` (or every model) on every replica; returns the bytes released. A replica that is
        running a job unloads when the job ends, as one manager does."""
        return sum(self._on_every_replica("unload", timeout_s, model))

    def forget_tensorrt_failures(self, timeout_s: float = 60.0) -> None:
        """Every replica gives its failed TensorRT engines another try (after the engine cache is cleared)."""
        self._on_every_replica("forget_tensorrt_failures", timeout_s)

    def _on_every_replica(self, method: str, timeout_s: float, *args: Any) -> list[Any]:
        from ray.serve.exceptions import BackPressureError

        now = time.time()
        live = [s for s in self._snapshot() if now - s.reported_at < STALE_AFTER_S]
        calls = [self._handle.options(method_name=method).remote(*args, replica=s.replica) for s in live]
        try:
            return [call.result(timeout_s=timeout_s) for call in calls]
        except BackPressureError:
            raise QueueFullError("The server is busy; try again when the queue has room.") from None

    def close(self) -> None:
        """Remove the deployment (its replicas free their GPUs); leave a cluster we joined running."""
        with self._lock:
            jobs = list(self._waiting)
        for job in jobs:
            job.cancel()
        if self._handle is not None:
            try:
                self._serve.delete(self.serving.app_name)
            except Exception:  # the controller is gone with the cluster
                log.debug("serve.delete failed", exc_info=True)
        if self._board is not None:
            self._ray.kill(self._board)
        if self._owns_ray:
            self._ray.shutdown()


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).splitlines()), "")


def _affinity(request: GenerationRequest) -> str:
    """The job's routing tag; empty (no preference) when the model or precision is unknown, so the replica
    answers with the same RequestError a single manager would."""
    try:
        return affinity_tag(resolve_spec(request.model).id, Precision.parse(request.precision).value)
    except Exception:
        return ""


def cluster_device(statuses: list[ReplicaStatus]) -> DeviceInfo:
    """The replicas' devices as one: their names, the lowest compute capability (what every replica can run),
    summed memory. `device` is "cluster": the GPUs are the replicas', none is used in this process."""
    infos = [s.manager.device for s in statuses]
    names: dict[str, int] = {}
    for info in infos:
        names[info.name] = names.get(info.name, 0) + 1
    label = ", ".join(f"{n} x {name}" if n > 1 else name for name, n in names.items())
    caps = [i.capability for i in infos]
    capability = None if not caps or None in caps else min(caps)
    cpu_maths = [i.cpu_math for i in infos if i.cpu_math is not None]
    return DeviceInfo("cluster", f"{len(infos)} Ray Serve replica(s): {label}", capability,
                      sum(i.total_bytes for i in infos), sum(i.free_bytes for i in infos),
                      unified=all(i.unified for i in infos),
                      cpu_math=min(cpu_maths, key=lambda c: (c.fast_bf16, c.fast_fp16)) if cpu_maths else None)
