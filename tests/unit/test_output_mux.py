"""A subscriber's shared output stream: what is due, merged per request, in one batch."""

from __future__ import annotations

import asyncio

from baton.shared.engine.outputs import EngineOutput
from baton.shared.output_mux import Failed, OutputMux


def step(rid: str, *tokens: int, finish: str | None = None) -> EngineOutput:
    return EngineOutput(rid, list(tokens), finish_reason=finish)


def test_outputs_queued_between_reads_go_out_merged_one_per_request() -> None:
    async def main() -> None:
        mux = OutputMux("router-1")
        a, b = mux.attach("a"), mux.attach("b")
        a.put_nowait(step("a", 1))
        b.put_nowait(step("b", 7))
        a.put_nowait(step("a", 2))
        a.put_nowait(step("a", 3, finish="length"))
        batch = await mux.next_batch()
        assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in batch] == [
            ("a", [1, 2, 3], "length"),
            ("b", [7], None),
        ]
        assert mux.request_ids == {"b"}  # "a" ended
        a.put_nowait(step("a", 4))  # after its end: ignored
        b.put_nowait(step("b", 8))
        assert [(o.request_id, o.new_token_ids) for o in await mux.next_batch()] == [("b", [8])]

    asyncio.run(main())


def test_after_the_first_token_an_output_waits_for_the_stream_interval() -> None:
    async def main() -> None:
        mux = OutputMux("router-1", stream_interval=3)
        sink = mux.attach("r")
        sink.put_nowait(step("r", 1))
        assert [o.new_token_ids for o in await mux.next_batch()] == [[1]]  # the first goes at once
        sink.put_nowait(step("r", 2))
        sink.put_nowait(step("r", 3))
        waiting = asyncio.ensure_future(mux.next_batch())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # two tokens held
        sink.put_nowait(step("r", 4))
        assert [o.new_token_ids for o in await waiting] == [[2, 3, 4]]
        sink.put_nowait(step("r", 5, finish="stop"))  # the end goes out whatever its size
        assert [(o.new_token_ids, o.finish_reason) for o in await mux.next_batch()] == [([5], "stop")]

    asyncio.run(main())


def test_an_exception_ends_the_request_and_close_hands_back_the_orphans() -> None:
    async def main() -> None:
        mux = OutputMux("router-1")
        broken, running, never = mux.attach("broken"), mux.attach("running"), mux.attach("never")
        broken.put_nowait(step("broken", 1))
        error = RuntimeError("device lost")
        broken.put_nowait(error)  # replaces what was held: the request failed
        broken.put_nowait(step("broken", 2))  # after its failure: ignored
        running.put_nowait(step("running", 1))
        mux.detach("never")  # it failed to start
        never.put_nowait(step("never", 9))
        batch = await mux.next_batch()
        assert batch[0] == Failed("broken", error)
        assert [(o.request_id, o.new_token_ids) for o in batch[1:]] == [("running", [1])]  # type: ignore[union-attr]
        assert mux.request_ids == {"running"}
        waiting = asyncio.ensure_future(mux.next_batch())
        await asyncio.sleep(0)
        assert mux.close() == {"running"}
        assert await waiting == []
        running.put_nowait(step("running", 2))  # after close: dropped
        assert mux.request_ids == set()

    asyncio.run(main())
