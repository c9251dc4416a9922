"""Colocated generation: the Router runs an engine itself (no workers, no transfer, no Redis): the
simplest deployment and the baseline disaggregation is measured against."""

from __future__ import annotations

from collections.abc import AsyncIterator

from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.engine.outputs import EngineOutput
from baton.shared.engine.sampling_params import SamplingParams


class ColocatedBackend:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        async for out in self.engine.add(request_id, prompt, params):
            yield out

    async def close(self) -> None:
        self.engine.shutdown()
