"""The cluster's counters as one ClusterStats: the workers' GetStats answers summed."""

from __future__ import annotations

from baton.shared.rpc import router_pb2, worker_pb2


def summed_stats(workers: list[worker_pb2.WorkerStats]) -> router_pb2.ClusterStats:
    """Workers' counters summed (worker counts left for the caller)."""
    decodes = [w for w in workers if w.role == "decode"]
    return router_pb2.ClusterStats(
        num_running=sum(w.num_running for w in workers),
        num_waiting=sum(w.num_waiting for w in workers),
        num_reserved=sum(w.num_reserved for w in workers),
        num_decode_blocks=sum(w.num_blocks for w in decodes),
        num_decode_held_blocks=sum(w.num_held_blocks for w in decodes),
        num_preemptions=sum(w.num_preemptions for w in workers),
        prefix_query_tokens=sum(w.prefix_query_tokens for w in workers),
        prefix_hit_tokens=sum(w.prefix_hit_tokens for w in workers),
        num_transfers=sum(w.num_transfers for w in workers if w.role == "prefill"),
        num_transfer_failures=sum(w.num_transfer_failures for w in workers if w.role == "prefill"),
    )
