"""ProcessEngine: the AsyncEngine API with the engine core in a spawned process."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from pathlib import Path

import pytest

from baton import LLM, SamplingParams
from baton.services.engine_process import ProcessEngine
from baton.shared.config import EngineConfig
from baton.shared.engine.async_engine import AsyncEngine, EngineDeadError
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.scheduler import SampledToken

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500], list(range(10, 90))]
LONG = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, params):
        tokens.extend(out.new_token_ids)
    return tokens


def num_running(core: EngineCore) -> int:
    return core.stats().num_running


async def until_idle(engine: ProcessEngine) -> None:
    for _ in range(500):  # an abort is applied by the child between steps
        if await engine.call(num_running) == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine process still runs requests")


def test_the_process_engine_serves_as_the_threaded_one_does(llama_dir: Path) -> None:
    expected = [o.token_ids for o in LLM(str(llama_dir)).generate(PROMPTS, GREEDY)]

    async def main() -> None:
        async with ProcessEngine(EngineConfig(model=str(llama_dir), max_model_len=256)) as engine:
            assert engine.pid is not None and engine.pid != os.getpid()
            assert engine.info["num_blocks"] > 0
            # greedy streams, concurrently, token for token as offline
            assert await asyncio.gather(*(collect(engine, p) for p in PROMPTS)) == expected
            # bad input is refused on this side, before anything is sent
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await collect(engine, [10**7])
            with pytest.raises(ValueError, match="longer than the model allows"):
                await collect(engine, list(range(300)))
            # calls run in the child, with arguments; their errors come back; a lambda cannot go
            assert await engine.call(num_running) == 0
            assert await engine.call(EngineCore.reset_prefix_cache) > 0  # the prompts above were cached
            with pytest.raises(KeyError, match="nope"):
                await engine.call(EngineCore.commit_reserved, "nope", SampledToken(1), 0)
            with pytest.raises(TypeError, match="must pickle"):
                await engine.call(lambda core: 1)
            # leaving a stream early aborts its request in the child
            async for _ in engine.generate(PROMPTS[2], LONG, request_id="left"):
                break
            await until_idle(engine)
            # a reservation, committed with a first token, streams on from there
            reserved = await engine.reserve("pushed", PROMPTS[1], GREEDY)
            assert reserved is not None and reserved.outputs is not None
            assert len(reserved.block_ids) == 1
            engine.commit("pushed", SampledToken(expected[1][0]), 0)
            tokens = [t async for out in reserved.outputs for t in out.new_token_ids]
            assert len(tokens) == GREEDY.max_tokens
            assert tokens[0] == expected[1][0]
            assert engine.stalled_for() < 60.0
            await engine.call(EngineCore.assert_no_leaks)
            # a request still running when the engine stops ends, and so does its stream
            stream = engine.generate(PROMPTS[0], LONG)
            await stream.__anext__()
        assert not engine.is_running and math.isinf(engine.stalled_for())
        reasons = [out.finish_reason async for out in stream]
        assert reasons[-1] == "abort"
        with pytest.raises(EngineDeadError, match="not running"):
            await collect(engine, PROMPTS[0])

    run(main())


def test_a_dead_engine_process_fails_every_stream_and_call(llama_dir: Path) -> None:
    async def main() -> None:
        engine = ProcessEngine(EngineConfig(model=str(llama_dir)))
        await engine.start_process()
        try:
            streams = [engine.generate(p, LONG) for p in PROMPTS]
            for stream in streams:
                await stream.__anext__()
            assert engine.pid is not None
            os.kill(engine.pid, signal.SIGKILL)
            for stream in streams:
                with pytest.raises(EngineDeadError, match="exited"):
                    async for _ in stream:
                        pass
            assert math.isinf(engine.stalled_for())
            with pytest.raises(EngineDeadError):
                await engine.call(num_running)
            with pytest.raises(EngineDeadError):
                await collect(engine, PROMPTS[0])
        finally:
            await engine.aclose()

    run(main())


def test_an_engine_that_cannot_be_built_fails_the_start_with_its_reason(llama_dir: Path) -> None:
    config = EngineConfig(model=str(llama_dir), max_model_len=256, num_kv_blocks=2)  # < one sequence

    async def main() -> None:
        engine = ProcessEngine(config)
        with pytest.raises(RuntimeError, match="cannot hold one sequence"):
            await engine.start_process()
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPTS[0])

    run(main())
