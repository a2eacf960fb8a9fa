"""The Ray Serve deployment: one PipelineManager per replica, one replica per GPU (`num_gpus=1`).

Ray gives each replica its own GPU (CUDA_VISIBLE_DEVICES), so the manager inside sees it as cuda:0 and
keeps doing what it does in single-process mode: memory budget, residency, lazy engine builds. Serve
sends a replica one job at a time (`max_ongoing_requests=1`); the waiting jobs stay in Serve's queue at
the caller, so whichever replica frees first takes the next one.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any, AsyncIterator

import ray
from ray import serve

from ..gpu import system_memory
from ..manager import ManagerConfig, PipelineManager
from ..request import GenerationRequest, GenerationResult
from .messages import ReplicaEvent, ReplicaStatus, portable_error, resident_tags, result_to_wire

log = logging.getLogger("prism.serving")

REPORT_PERIOD_S = 1.0  # how often a replica posts its status to the board (System tab freshness)


class StatusBoard:
    """A small Ray actor the replicas post their status to, and the app reads (System tab, `status()`)."""

    def __init__(self) -> None:
        self._latest: dict[str, ReplicaStatus] = {}

    def report(self, status: ReplicaStatus) -> None:
        self._latest[status.replica] = status

    def snapshot(self, forget_after_s: float = 30.0) -> list[ReplicaStatus]:
        """Every replica heard from in the last `forget_after_s` seconds (a dead one drops out after that)."""
        now = time.time()
        self._latest = {k: s for k, s in self._latest.items() if now - s.reported_at < forget_after_s}
        return sorted(self._latest.values(), key=lambda s: (s.node, s.replica))


class PrismReplica:
    """One GPU's worker. Serve makes this class a deployment (`client.deploy`), so it holds no Serve options."""

    def __init__(self, config: ManagerConfig, board: Any = None):
        self.manager = PipelineManager(config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = _node_address()
        self._board = board
        self._stop = threading.Event()
        if board is not None:
            threading.Thread(target=self._report, name="prism-replica-status", daemon=True).start()
        log.info("replica %s on %s: %s", self.replica, self.node, self.manager.info.describe())

    # ---------------------------------------------------------------- jobs

    async def generate(self, request: GenerationRequest) -> AsyncIterator[ReplicaEvent]:
        """Progress events while the job runs, then one event with its result or error.

        Cancelling the call (DeploymentResponseGenerator.cancel, or the caller going away) cancels the
        manager's job, which stops at its next step.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = self.manager.submit(request, on_progress=lambda p: loop.call_soon_threadsafe(events.put_nowait, p))
        except Exception as exc:  # QueueFullError: cancelled jobs still winding down here
            yield ReplicaEvent(self.replica, error=portable_error(exc))
            return
        outcome = loop.run_in_executor(None, _settle, job)
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, outcome}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                yield ReplicaEvent(self.replica, progress=getter.result())
            while not events.empty():
                yield ReplicaEvent(self.replica, progress=events.get_nowait())
            result, error = outcome.result()
            if error is not None:
                yield ReplicaEvent(self.replica, error=portable_error(error))
            else:
                yield ReplicaEvent(self.replica, result=result_to_wire(result))
        finally:
            if not job.done:
                job.cancel()

    async def unload(self, model: str | None, replica: str) -> int:
        """Unload `model` (None: all) here; `replica` is read by the router to send this call to one replica."""
        assert replica == self.replica, "the router sent an unload meant for another replica"
        return await asyncio.get_running_loop().run_in_executor(None, self.manager.unload, model)

    async def forget_tensorrt_failures(self, replica: str) -> None:
        """Give this replica's failed TensorRT engines another try (the engine cache was cleared)."""
        assert replica == self.replica, "the router sent a call meant for another replica"
        self.manager.forget_tensorrt_failures()

    # ---------------------------------------------------------------- status

    def status(self) -> ReplicaStatus:
        info = self.manager.info
        if info.is_cuda and not info.unified:
            import torch

            free, total = torch.cuda.mem_get_info(info.device)
            used = total - free
        else:
            total, available = system_memory()
            used = total - available
        return ReplicaStatus(self.replica, self.node, os.getpid(), self.manager.status(), used, total, time.time())

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve polls this for the router: the (model, precision) pairs this replica holds."""
        return {"resident": sorted(resident_tags(self.manager.status()))}

    def _report(self) -> None:
        while not self._stop.wait(REPORT_PERIOD_S):
            try:
                self._board.report.remote(self.status())
            except Exception:  # the app that owns the board went away; Serve will stop us too
                log.debug("status report failed", exc_info=True)

    def __del__(self) -> None:  # Serve calls this when it stops the replica
        self._stop.set()
        self.manager.close()


def _node_address() -> str:
    """The address this replica's machine has in the cluster (what `ray start --node-ip-address` set)."""
    node_id = ray.get_runtime_context().get_node_id()
    return next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), ray.util.get_node_ip_address())


def _settle(job: Any) -> tuple[GenerationResult | None, BaseException | None]:
    try:
        return job.result(), None
    except BaseException as exc:
        return None, exc
