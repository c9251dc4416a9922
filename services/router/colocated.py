"""Colocated generation: the Router runs an engine itself (no workers, no transfer, no Redis): the
simplest deployment and the baseline disaggregation is measured against."""

from __future__ import annotations

from collections.abc import AsyncIterator

from baton.services.router.cluster_stats import summed_stats
from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.outputs import EngineOutput
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.rpc import router_pb2
from baton.shared.worker_runtime import worker_stats


class ColocatedBackend:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        async for out in self.engine.add(request_id, prompt, params):
            yield out

    async def cluster_stats(self) -> router_pb2.ClusterStats:
        """The engine's counters, as if it were the cluster's one decode worker."""
        stats = await worker_stats(self.engine, "colocated", "decode", [], False)
        summary = summed_stats([stats])
        summary.num_decode_workers = 1
        return summary

    async def reset_prefix_cache(self) -> router_pb2.ResetClusterPrefixCacheResponse:
        num_blocks = await self.engine.call(EngineCore.reset_prefix_cache)
        return router_pb2.ResetClusterPrefixCacheResponse(num_blocks=num_blocks, num_workers=1)

    async def close(self) -> None:
        self.engine.shutdown()
