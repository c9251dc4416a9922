"""The Router's placement of a burst against a real Redis registry: requests placed at the same
moment spread over the decode workers instead of all taking the one that looked least loaded."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from baton.services.router.disaggregated import DisaggregatedBackend, _Failures
from baton.shared.config import RegistryConfig, RouterConfig
from baton.shared.registry import Registry, WorkerInfo, WorkerLoad

pytestmark = pytest.mark.integration

IDLE = WorkerLoad(num_free_blocks=1000, num_running=0, num_waiting=0)


def test_a_burst_spreads_over_the_decode_workers(redis_url: str) -> None:
    """Each placement awaits the prefix index (Redis) before it counts the request: the decode
    worker must be chosen after that wait, or a burst all sees the same idle worker."""

    async def main() -> Counter[str]:
        async with Registry(redis_url) as registry:
            for wid, role in (("decode-0", "decode"), ("decode-1", "decode"), ("prefill-0", "prefill")):
                info = WorkerInfo(wid, role, "127.0.0.1:1", "", "tiny", 16, 4096)
                await registry.register_worker(info, IDLE)
            config = RouterConfig(model="tiny", registry=RegistryConfig(redis_url=redis_url))
            backend = DisaggregatedBackend(config, registry)
            prompt = list(range(3, 200))  # 12 full blocks to look up in the prefix index
            placements = await asyncio.gather(*(backend._place(prompt, _Failures()) for _ in range(8)))
            assert all(p.prefill is not None and p.prefill.info.worker_id == "prefill-0" for p in placements)
            return Counter(p.decode.info.worker_id for p in placements)

    assert asyncio.run(asyncio.wait_for(main(), timeout=20)) == {"decode-0": 4, "decode-1": 4}
