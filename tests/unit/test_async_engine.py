"""The async engine: stream, abort, concurrent requests, failures that must not hang."""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from baton import LLM, SamplingParams
from baton.shared.config import EngineConfig
from baton.shared.engine.async_engine import AsyncEngine, EngineDeadError, Reservation
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.scheduler import SampledToken

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500], list(range(10, 90))]


@pytest.fixture(scope="module")
def expected(llama_dir: Path) -> list[list[int]]:
    return [o.token_ids for o in LLM(str(llama_dir)).generate(PROMPTS, GREEDY)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def collect(
    engine: AsyncEngine, prompt: list[int], params: SamplingParams = GREEDY
) -> tuple[list[int], str]:
    tokens, reason = [], None
    async for out in engine.generate(prompt, params):
        tokens.extend(out.new_token_ids)
        reason = out.finish_reason
    return tokens, reason


def test_concurrent_streams_match_offline_generation(llama_dir: Path, expected: list[list[int]]) -> None:
    async def main() -> list:
        async with AsyncEngine.from_config(EngineConfig(model=str(llama_dir))) as engine:
            results = await asyncio.gather(*(collect(engine, p) for p in PROMPTS))
            engine.core.assert_no_leaks()
            return results

    results = run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(reason == "length" for _, reason in results)


def test_leaving_the_stream_early_aborts_the_request(llama_dir: Path) -> None:
    async def main() -> None:
        async with AsyncEngine.from_config(EngineConfig(model=str(llama_dir))) as engine:
            params = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
            got = 0
            async for _ in engine.generate(list(range(5, 40)), params):
                got += 1
                if got == 3:
                    break
            for _ in range(200):  # the abort is applied by the engine thread
                if not engine.core.has_unfinished():
                    break
                await asyncio.sleep(0.01)
            engine.core.assert_no_leaks()

    run(main())


def test_explicit_abort_ends_the_stream_with_abort(llama_dir: Path) -> None:
    async def main() -> str:
        async with AsyncEngine.from_config(EngineConfig(model=str(llama_dir))) as engine:
            params = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
            reason = None
            async for out in engine.generate([1, 2, 3], params, request_id="victim"):
                if len(out.new_token_ids) and reason is None:
                    engine.abort("victim")
                    reason = "requested"
                if out.finished:
                    reason = out.finish_reason
            engine.core.assert_no_leaks()
            return reason

    assert run(main()) == "abort"


def test_a_prompt_is_checked_once_on_the_callers_thread_not_again_by_the_step_loop(
    llama_dir: Path, expected: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking a long prompt's ids is per-token Python: the step loop, whose time every running
    request waits on, must not repeat what the caller's thread already checked."""
    threads: list[str] = []

    async def main() -> list[int]:
        async with AsyncEngine.from_config(EngineConfig(model=str(llama_dir))) as engine:
            validate = engine.core.validate

            def counted(prompt: list[int], params: SamplingParams) -> None:
                threads.append(threading.current_thread().name)
                validate(prompt, params)

            monkeypatch.setattr(engine.core, "validate", counted)
            tokens, _ = await collect(engine, PROMPTS[1])
            reserved = await engine.reserve("r", PROMPTS[2], GREEDY)
            assert reserved is not None and reserved.outputs is not None
            await reserved.outputs.aclose()
            # a caller that checked the prompt itself (the prefill worker, before its registry write)
            async for _ in engine.add("checked", PROMPTS[0], GREEDY, validated=True):
                pass
            return tokens

    assert run(main()) == expected[1]
    assert threads == ["MainThread", "MainThread"]


def test_bad_input_raises_before_streaming(llama_dir: Path) -> None:
    async def main() -> None:
        async with AsyncEngine.from_config(EngineConfig(model=str(llama_dir))) as engine:
            with pytest.raises(ValueError, match="outside the vocabulary"):
                async for _ in engine.generate([10**7], GREEDY):
                    pass
            first = engine.generate([1, 2], SamplingParams(max_tokens=50), request_id="dup")
            await first.__anext__()  # "dup" is now in flight
            with pytest.raises(ValueError, match="already in use"):
                async for _ in engine.generate([1, 2], GREEDY, request_id="dup"):
                    pass
            await first.aclose()

    run(main())


def test_call_runs_a_function_of_the_core_and_its_arguments_on_the_engine_thread(llama_dir: Path) -> None:
    """`call(fn, *args)` runs `fn(core, *args)` between steps; its error is raised in the caller."""

    def where(core: EngineCore, offset: int) -> tuple[str, int]:
        return threading.current_thread().name, core.stats().num_running + offset

    async def main() -> None:
        async with AsyncEngine.from_config(EngineConfig(model=str(llama_dir))) as engine:
            assert await engine.call(where, 42) == ("baton-engine", 42)
            assert await engine.call(EngineCore.reset_prefix_cache) == 0  # nothing cached yet
            with pytest.raises(KeyError, match="nope"):
                await engine.call(EngineCore.commit_reserved, "nope", SampledToken(1), 0)

    run(main())


def test_after_shutdown_requests_fail_fast(llama_dir: Path) -> None:
    async def main() -> None:
        engine = AsyncEngine.from_config(EngineConfig(model=str(llama_dir)))
        engine.start()
        engine.shutdown()
        with pytest.raises(EngineDeadError, match="not running"):
            async for _ in engine.generate([1, 2], GREEDY):
                pass

    run(main())


def test_fatal_engine_error_reaches_every_stream(llama_dir: Path) -> None:
    async def main() -> None:
        engine = AsyncEngine.from_config(EngineConfig(model=str(llama_dir)))

        def broken_step() -> list:
            raise RuntimeError("device lost")

        engine.core.step = broken_step  # type: ignore[method-assign]
        engine.start()
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in engine.generate([1, 2], GREEDY):
                pass
        with pytest.raises(EngineDeadError, match="fatal error"):
            async for _ in engine.generate([1, 2], GREEDY):
                pass
        assert engine.stalled_for() == math.inf  # liveness sees a dead engine thread

    run(main())


def test_a_consumer_that_falls_behind_gets_the_steps_merged(
    llama_dir: Path, expected: list[list[int]]
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)

    async def main() -> list:
        async with AsyncEngine.from_config(EngineConfig(model=str(llama_dir))) as engine:
            outputs = []
            async for out in engine.generate(PROMPTS[2], params):
                outputs.append(out)
                if len(outputs) == 1:
                    while engine.core.has_unfinished():  # let every other step queue up meanwhile
                        await asyncio.sleep(0.01)
            return outputs

    outputs = run(main())
    assert len(outputs) == 2  # the first token, then the other eleven in one merged output
    assert [t for out in outputs for t in out.new_token_ids] == expected[2]
    assert [len(out.new_logprobs) for out in outputs] == [1, 11]
    assert all(
        out.new_token_ids[i] in out.new_logprobs[i] for out in outputs for i in range(len(out.new_token_ids))
    )
    assert [out.finish_reason for out in outputs] == [None, "length"]


def test_merge_outputs_refuses_a_finished_first_output() -> None:
    from baton.shared.engine.outputs import EngineOutput, merge_outputs

    done = EngineOutput("r", [1], finish_reason="stop")
    with pytest.raises(ValueError, match="cannot merge"):
        merge_outputs(done, EngineOutput("r", [2]))
    merged = merge_outputs(EngineOutput("r", [1]), EngineOutput("r", [2, 3], finish_reason="length"))
    assert merged.new_token_ids == [1, 2, 3] and merged.finish_reason == "length"


def test_stream_interval_gathers_tokens_after_the_first(llama_dir: Path, expected: list[list[int]]) -> None:
    async def main() -> list:
        config = EngineConfig(model=str(llama_dir), stream_interval=5)
        async with AsyncEngine.from_config(config) as engine:
            return [out async for out in engine.generate(PROMPTS[2], GREEDY)]

    outputs = run(main())
    # 12 tokens: the first at once, then runs of at least 5, the end whenever it comes
    assert len(outputs[0].new_token_ids) == 1
    assert all(len(out.new_token_ids) >= 5 for out in outputs[1:-1])
    assert [t for out in outputs for t in out.new_token_ids] == expected[2]
    assert outputs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outputs[:-1])


def test_tokens_held_for_the_stream_interval_go_out_before_a_fatal_error(
    llama_dir: Path, expected: list[list[int]]
) -> None:
    async def main() -> tuple[list[int], BaseException | None]:
        engine = AsyncEngine.from_config(EngineConfig(model=str(llama_dir), stream_interval=100))
        real_step, calls = engine.core.step, [0]

        def failing_step() -> list:
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("device lost")
            return real_step()

        engine.core.step = failing_step  # type: ignore[method-assign]
        engine.start()
        tokens, error = [], None
        try:
            async for out in engine.generate(PROMPTS[2], GREEDY):
                tokens += out.new_token_ids
        except EngineDeadError as exc:
            error = exc
        return tokens, error

    tokens, error = run(main())
    assert "device lost" in str(error)
    assert tokens == expected[2][:4]  # the first token, then the three held ones, then the error


def test_an_uncommitted_reservation_is_released_before_its_blocks_are_freed(llama_dir: Path) -> None:
    """The decode worker's receiving process writes into reserved blocks: an abort or failure of a
    reservation waits for the release hook, a committed request's does not."""

    async def main() -> None:
        async with AsyncEngine.from_config(EngineConfig(model=str(llama_dir))) as engine:
            pool = engine.core.kv_manager.pool
            all_free = pool.num_free_blocks
            gate, released = asyncio.Event(), []

            async def release(request_id: str) -> None:
                released.append(request_id)
                await gate.wait()

            engine.set_reservation_release(release)
            aborted = await engine.reserve("aborted", list(range(40)), GREEDY)
            failed = await engine.reserve("failed", list(range(50)), GREEDY)
            assert aborted is not None and failed is not None
            engine.abort("aborted")
            engine.fail("failed", "the push broke")
            await asyncio.sleep(0.2)
            assert released == ["aborted", "failed"]
            assert pool.num_free_blocks == all_free - len(aborted.block_ids) - len(failed.block_ids)
            gate.set()
            assert [o.finish_reason async for o in aborted.outputs] == ["abort"]
            assert [o.finish_reason async for o in failed.outputs] == ["error"]
            assert pool.num_free_blocks == all_free

            committed = await engine.reserve("committed", list(range(30)), GREEDY)
            assert committed is not None
            engine.commit("committed", SampledToken(7), 0)
            first = await anext(committed.outputs)
            engine.abort("committed")
            reasons = [first.finish_reason] + [o.finish_reason async for o in committed.outputs]
            assert reasons[-1] == "abort" and released == ["aborted", "failed"]
            engine.core.assert_no_leaks()

    run(main())


def test_a_burst_of_reservations_paces_the_decode_steps(llama_dir: Path) -> None:
    """While 16 or more requests wait for their KV, more than decode, steps are at least
    burst_step_interval_ms apart (a prefill worker sharing the GPU gets it); before and after, not."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def gaps(engine: AsyncEngine, request_id: str) -> list[float]:
        reservation = await engine.reserve(request_id, list(range(20)), params)
        assert reservation is not None
        engine.commit(request_id, SampledToken(7), 0)
        loop = asyncio.get_running_loop()
        times = [loop.time() async for _ in reservation.outputs]
        return [b - a for a, b in itertools.pairwise(times[1:])]  # from the first decode step

    async def wait_for_kv(engine: AsyncEngine, ids: range) -> dict[str, Reservation | None]:
        return {f"w{i}": await engine.reserve(f"w{i}", [i + 1, 2, 3], params) for i in ids}

    async def commit_all(engine: AsyncEngine, waiting: dict[str, Reservation | None]) -> None:
        for request_id in waiting:
            engine.commit(request_id, SampledToken(7), 0)
        await asyncio.gather(*(_drain(r.outputs) for r in waiting.values() if r is not None))

    async def main() -> dict[str, list[float]]:
        config = EngineConfig(model=str(llama_dir), burst_step_interval_ms=300)
        async with AsyncEngine.from_config(config) as engine:
            few = await wait_for_kv(engine, range(2))
            light = await gaps(engine, "light")  # 1 decoding, 2 waiting for KV: no burst
            burst = await wait_for_kv(engine, range(2, 16))
            paced = await gaps(engine, "paced")  # 1 decoding, 16 waiting for KV: a burst
            await commit_all(engine, {**few, **burst})
            after = await gaps(engine, "after")  # nobody waits for KV
            engine.core.assert_no_leaks()
            return {"light": light, "paced": paced, "after": after}

    got = run(main())
    assert len(got["paced"]) == 4 and min(got["paced"]) >= 0.25
    for free in (got["light"], got["after"]):
        assert sorted(free)[len(free) // 2] < 0.15


async def _drain(outputs: AsyncIterator[object] | None) -> None:
    assert outputs is not None
    async for _ in outputs:
        pass
