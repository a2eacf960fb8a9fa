"""Model affinity on Ray Serve's own request router (a custom `RequestRouter`, Ray >= 2.46).

Serve keeps the queue, probes the replicas' queue lengths and sends each job to the least loaded replica
of the first rank that has room; this router only orders the ranks:
  1. replicas that hold the job's model at its precision (from each replica's `record_routing_stats`),
  2. every other replica.
With `max_ongoing_requests=1` a replica "has room" only when it is idle, so a job goes to an idle
replica that holds its model, else to any idle replica, else it waits in Serve's queue (FIFO).

Requests that name a `replica` keyword (unload, forget_tensorrt_failures) go to that replica only.
"""
from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class ModelAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # Every rank is offered at once, so when none has room Serve should back off before asking again
        # (without this its routing loop spins on the CPU while all replicas are busy).
        pending_request.routing_context.should_backoff = True
        target = pending_request.kwargs.get("replica")
        if target:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        tag = pending_request.metadata.multiplexed_model_id
        holders = [r for r in candidate_replicas if tag and tag in r.routing_stats.get("resident", ())]
        others = [r for r in candidate_replicas if r not in holders]
        return [rank for rank in (holders, others) if rank]
