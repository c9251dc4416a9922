"""The Redis registry against a real redis-server: leases, transitions, prefix index, reaper, I3/I5."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from baton.shared.registry import (
    Registry,
    RegistryError,
    RegistryUnavailable,
    RequestRecord,
    RequestState,
    WorkerInfo,
    WorkerLoad,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
LOAD = WorkerLoad(num_free_blocks=100, num_running=0, num_waiting=0)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def info(wid: str, role: str) -> WorkerInfo:
    return WorkerInfo(wid, role, f"127.0.0.1:{len(wid)}", "", "tiny", 16, 128)


async def register(reg: Registry, *workers: tuple[str, str]) -> None:
    for wid, role in workers:
        await reg.register_worker(info(wid, role), LOAD)


async def heartbeat_until(
    reg: Registry, wid: str, stop: asyncio.Event, request_ids: Sequence[str] = ()
) -> None:
    while not stop.is_set():
        assert await reg.heartbeat(wid, LOAD, request_ids)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.1)


async def refused(call: Awaitable[object], reg: Registry, rid: str, before: RequestRecord | None) -> str:
    """The call raises RegistryError and leaves the record exactly as it was; returns the message."""
    with pytest.raises(RegistryError) as excinfo:
        await call
    assert await reg.get_request(rid) == before
    return str(excinfo.value)


# -- workers -----------------------------------------------------------------------------------------


def test_register_heartbeat_and_lease_expiry(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url, lease_ttl_s=0.5) as reg:
            assert await reg.ping()
            await register(reg, ("d1", "decode"), ("p1", "prefill"))
            assert [w.info.worker_id for w in await reg.live_workers()] == ["d1", "p1"]
            [decode] = await reg.live_workers("decode")
            assert decode.info == info("d1", "decode") and decode.load == LOAD
            assert abs(decode.heartbeat_at - time.time()) < 5

            assert await reg.heartbeat("d1", WorkerLoad(90, 3, 2))
            [decode_after] = await reg.live_workers("decode")
            assert decode_after.load == WorkerLoad(90, 3, 2)
            assert decode_after.heartbeat_at >= decode.heartbeat_at

            stop = asyncio.Event()
            beating = asyncio.create_task(heartbeat_until(reg, "d1", stop))
            await asyncio.sleep(0.8)  # p1's lease (0.5 s) runs out; d1 keeps renewing
            assert [w.info.worker_id for w in await reg.live_workers()] == ["d1"]
            assert await reg.live_workers("prefill") == []
            assert not await reg.heartbeat("p1", LOAD)  # gone: the caller must re-register
            stop.set()
            await beating

    run(main())


def test_reregistering_with_another_role_moves_membership(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            await register(reg, ("w", "decode"))
            await register(reg, ("w", "prefill"))
            assert await reg.live_workers("decode") == []
            assert [w.info.role for w in await reg.live_workers()] == ["prefill"]
            with pytest.raises(ValueError, match="role"):
                await reg.register_worker(info("x", "router"), LOAD)
            with pytest.raises(ValueError, match="non-empty"):
                await reg.reserve("", "d1", 1)
            with pytest.raises(ValueError, match="num_blocks"):
                await reg.reserve("r", "d1", -1)

    run(main())


def test_heartbeat_after_flushall_is_false_and_the_worker_rebuilds_the_registry(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg, aioredis.Redis.from_url(redis_url) as raw:
            await register(reg, ("d1", "decode"))
            record = await reg.reserve("r1", "d1", 4, local_prefill=True)
            await reg.publish_prefix("d1", ["h0", "h1"], [])
            await raw.flushall()
            await raw.script_flush()  # as after a restart: the scripts are loaded again on demand

            assert not await reg.heartbeat("d1", LOAD, ["r1"])  # I5: Redis lost everything
            assert await reg.live_workers() == [] and await reg.get_request("r1") is None
            await register(reg, ("d1", "decode"))  # rebuilt from the worker's own state
            await reg.publish_prefix("d1", ["h0", "h1"], [])
            assert await reg.restore_requests("d1", [record]) == ["r1"]
            assert await reg.restore_requests("d1", [record]) == []  # present: left alone
            assert await reg.heartbeat("d1", LOAD, ["r1"])
            assert [w.info.worker_id for w in await reg.live_workers()] == ["d1"]
            assert await reg.live_requests() == [record]
            assert await reg.prefix_overlap(["h0", "h1"], ["d1"]) == {"d1": 2}
            assert await reg.end_request("r1", "d1")

    run(main())


def test_restore_skips_records_that_name_another_worker(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            foreign = RequestRecord("r9", RequestState.DECODING, "d2", "d2", "", 4, 1.0, 2.0)
            assert await reg.restore_requests("d1", [foreign]) == []
            assert await reg.get_request("r9") is None

    run(main())


# -- request transitions -----------------------------------------------------------------------------


def test_full_transition_chain_refuses_every_wrong_step(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            msg = await refused(reg.begin_prefill("r", "p1"), reg, "r", None)
            assert msg == "request r: expected state reserved, found no record"
            await refused(reg.commit_handoff("r", "p1", "d1"), reg, "r", None)
            await refused(reg.release_prefill("r", "p1"), reg, "r", None)

            reserved = await reg.reserve("r", "d1", 7)
            assert (reserved.state, reserved.owner, reserved.decode_worker) == (
                RequestState.RESERVED,
                "d1",
                "d1",
            )
            assert (reserved.prefill_worker, reserved.num_blocks) == ("", 7)
            assert reserved.created_at == reserved.updated_at
            assert await reg.get_request("r") == reserved
            msg = await refused(reg.reserve("r", "d2", 3), reg, "r", reserved)
            assert (
                msg == "request r: expected no record, found one (state reserved, owner d1, decode worker d1)"
            )
            msg = await refused(reg.commit_handoff("r", "p1", "d1"), reg, "r", reserved)
            assert msg == (
                "request r: expected state prefilling, owner p1, decode worker d1;"
                " found state reserved, owner d1, decode worker d1"
            )
            msg = await refused(reg.end_request("r", "p1"), reg, "r", reserved)
            assert msg == (
                "request r: expected owner or decode worker p1,"
                " found state reserved, owner d1, decode worker d1"
            )

            prefilling = await reg.begin_prefill("r", "p1")
            assert (prefilling.state, prefilling.owner, prefilling.prefill_worker) == (
                RequestState.PREFILLING,
                "p1",
                "p1",
            )
            assert (
                prefilling.created_at == reserved.created_at and prefilling.updated_at >= reserved.updated_at
            )
            msg = await refused(reg.begin_prefill("r", "p2"), reg, "r", prefilling)
            assert (
                msg
                == "request r: expected state reserved, found state prefilling, owner p1, decode worker d1"
            )
            await refused(reg.commit_handoff("r", "p2", "d1"), reg, "r", prefilling)  # wrong P
            await refused(reg.commit_handoff("r", "p1", "d2"), reg, "r", prefilling)  # wrong D
            await refused(reg.release_prefill("r", "p2"), reg, "r", prefilling)
            await refused(reg.end_request("r", "p2"), reg, "r", prefilling)
            await refused(reg.reserve("r", "d1", 7), reg, "r", prefilling)

            decoding = await reg.commit_handoff("r", "p1", "d1")
            assert (decoding.state, decoding.owner, decoding.prefill_worker) == (
                RequestState.DECODING,
                "d1",
                "p1",
            )
            await refused(reg.commit_handoff("r", "p1", "d1"), reg, "r", decoding)  # twice: refused
            await refused(reg.begin_prefill("r", "p1"), reg, "r", decoding)
            await refused(reg.release_prefill("r", "p1"), reg, "r", decoding)
            await refused(reg.end_request("r", "p1"), reg, "r", decoding)  # P no longer owns it

            assert await reg.live_requests() == [decoding]
            assert await reg.end_request("r", "d1")
            assert await reg.get_request("r") is None
            assert not await reg.end_request("r", "d1")  # already gone: not an error
            assert await reg.live_requests() == []

    run(main())


def test_local_prefill_reserve_decodes_at_once(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            record = await reg.reserve("r", "d1", 2, local_prefill=True)
            assert (record.state, record.owner, record.decode_worker, record.prefill_worker) == (
                RequestState.DECODING,
                "d1",
                "d1",
                "",
            )
            await refused(reg.begin_prefill("r", "p1"), reg, "r", record)
            assert await reg.end_request("r", "d1")

    run(main())


def test_release_prefill_lets_another_prefill_worker_begin(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            await reg.reserve("r", "d1", 2)
            await reg.begin_prefill("r", "p1")
            released = await reg.release_prefill("r", "p1")
            assert (released.state, released.owner, released.prefill_worker) == (
                RequestState.RESERVED,
                "d1",
                "",
            )
            await reg.begin_prefill("r", "p2")
            decoding = await reg.commit_handoff("r", "p2", "d1")
            assert decoding.prefill_worker == "p2"
            assert await reg.end_request("r", "d1")
            assert await reg.keys() == []

    run(main())


def test_prefill_owner_may_end_the_request(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            await reg.reserve("r", "d1", 2)
            await reg.begin_prefill("r", "p1")
            assert await reg.end_request("r", "p1")
            assert await reg.keys() == []

    run(main())


def test_concurrent_commit_handoff_exactly_one_wins(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as a, Registry(redis_url) as b:
            for i in range(20):
                rid = f"r{i}"
                await a.reserve(rid, "d1", 4)
                await a.begin_prefill(rid, "p1")
                results = await asyncio.gather(
                    a.commit_handoff(rid, "p1", "d1"),
                    b.commit_handoff(rid, "p1", "d1"),
                    return_exceptions=True,
                )
                wins = [r for r in results if isinstance(r, RequestRecord)]
                losses = [r for r in results if isinstance(r, RegistryError)]
                assert len(wins) == 1 and len(losses) == 1, results
                assert await a.get_request(rid) == wins[0] and wins[0].state is RequestState.DECODING

    run(main())


def test_concurrent_reserve_of_one_id_exactly_one_wins(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as a, Registry(redis_url) as b:
            results = await asyncio.gather(
                a.reserve("r", "d1", 4), b.reserve("r", "d2", 4), return_exceptions=True
            )
            wins = [r for r in results if isinstance(r, RequestRecord)]
            assert len(wins) == 1 and sum(isinstance(r, RegistryError) for r in results) == 1
            assert await a.get_request("r") == wins[0]

    run(main())


def test_a_burst_wider_than_the_connection_pool_waits_for_connections(redis_url: str) -> None:
    """A decode worker ends hundreds of records in one step: each call waits for a pooled connection
    instead of failing with redis-py's "Too many connections" (its default pool holds 100)."""

    async def main() -> None:
        async with Registry(redis_url) as reg:
            ids = [f"burst{i}" for i in range(400)]
            await asyncio.gather(*(reg.reserve(rid, "d1", 1, local_prefill=True) for rid in ids))
            ended = await asyncio.gather(*(reg.end_request(rid, "d1") for rid in ids))
            assert all(ended)
            assert [await reg.get_request(rid) for rid in ids[:5]] == [None] * 5

    run(main())


# -- overlapping calls share round trips (batcher.py) ------------------------------------------------


def test_transitions_made_while_one_is_on_the_wire_share_a_round_trip(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            ids = [f"r{i}" for i in range(64)]
            records = await asyncio.gather(*(reg.reserve(rid, "d1", 2) for rid in ids))
            assert [r.request_id for r in records] == ids
            assert all(r.state is RequestState.RESERVED and r.decode_worker == "d1" for r in records)
            scripts, round_trips = reg.round_trips
            assert scripts == 64 and round_trips <= 3, reg.round_trips  # the first alone, the rest together
            assert [await reg.get_request(rid) for rid in ids] == records
            ended = await asyncio.gather(*(reg.end_request(rid, "d1") for rid in ids))
            assert all(ended) and await reg.get_request("r0") is None

    run(main())


def test_a_refused_transition_among_others_fails_only_its_caller(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            taken = await reg.reserve("taken", "d1", 1)
            results = await asyncio.gather(
                reg.reserve("a", "d1", 1),
                reg.reserve("taken", "d2", 1),
                reg.commit_handoff("missing", "p1", "d1"),
                reg.reserve("b", "d1", 1),
                return_exceptions=True,
            )
            assert isinstance(results[0], RequestRecord) and isinstance(results[3], RequestRecord)
            assert isinstance(results[1], RegistryError) and isinstance(results[2], RegistryError)
            assert await reg.get_request("taken") == taken
            assert reg.round_trips[1] < reg.round_trips[0]

    run(main())


def test_a_queued_transition_whose_caller_went_away_is_not_sent(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg, aioredis.from_url(redis_url) as admin:
            assert await reg.ping()  # connected before Redis pauses
            await admin.execute_command("CLIENT", "PAUSE", "400", "ALL")
            first = asyncio.create_task(reg.reserve("first", "d1", 1))  # on the wire, held by the pause
            await asyncio.sleep(0.1)
            gone = asyncio.create_task(reg.reserve("gone", "d1", 1))
            kept = asyncio.create_task(reg.reserve("kept", "d1", 1))
            await asyncio.sleep(0.1)
            assert not first.done()
            gone.cancel()
            await first
            assert (await kept).state is RequestState.RESERVED
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert await reg.get_request("gone") is None
            assert reg.round_trips == (3, 2)

    run(main())


def test_scripts_that_redis_lost_are_loaded_again_inside_a_shared_round_trip(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg, aioredis.from_url(redis_url) as admin:
            for rid in ("a", "b"):
                await reg.reserve(rid, "d1", 1)
            await reg.begin_prefill("b", "p1")
            await admin.script_flush()  # as a Redis restart would
            reserved, began, handed_off = await asyncio.gather(
                reg.reserve("c", "d1", 1), reg.begin_prefill("a", "p1"), reg.commit_handoff("b", "p1", "d1")
            )
            assert reserved.state is RequestState.RESERVED
            assert began.state is RequestState.PREFILLING and began.owner == "p1"
            assert handed_off.state is RequestState.DECODING and handed_off.owner == "d1"
            assert reg.round_trips[1] < reg.round_trips[0]

    run(main())


# -- prefix index ------------------------------------------------------------------------------------


def test_prefix_overlap_counts_leading_hashes_only(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            await register(reg, ("p1", "prefill"), ("p2", "prefill"))
            hashes = [f"{i:032x}" for i in range(5)]
            await reg.publish_prefix("p1", hashes, [])
            await reg.publish_prefix("p2", [hashes[0], hashes[1], hashes[3]], [])
            assert await reg.prefix_overlap(hashes, ["p1", "p2", "p3"]) == {"p1": 5, "p2": 2, "p3": 0}
            assert await reg.prefix_overlap([hashes[1], hashes[0]], ["p2"]) == {"p2": 2}  # order of the query
            assert await reg.prefix_overlap(["f" * 32, *hashes], ["p1"]) == {"p1": 0}  # first miss stops
            assert await reg.prefix_overlap([], ["p1"]) == {"p1": 0}
            assert await reg.prefix_overlap(hashes, []) == {}

            await reg.publish_prefix("p1", [], [hashes[2]])  # evicted from the middle
            assert await reg.prefix_overlap(hashes, ["p1"]) == {"p1": 2}
            await reg.publish_prefix("p1", [hashes[2]], [hashes[2]])  # removed first, then added
            assert await reg.prefix_overlap(hashes, ["p1"]) == {"p1": 5}

            await register(reg, ("p2", "prefill"))  # a restarted worker starts with an empty set
            assert await reg.prefix_overlap(hashes, ["p2"]) == {"p2": 0}
            await reg.deregister_worker("p1")
            assert await reg.prefix_overlap(hashes, ["p1"]) == {"p1": 0}

    run(main())


def test_large_prefix_publish_and_overlap(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            hashes = [f"{i:032x}" for i in range(5000)]
            await reg.publish_prefix("p1", hashes[:4000], [])
            assert await reg.prefix_overlap(hashes, ["p1"]) == {"p1": 4000}

    run(main())


# -- reaper, TTLs and I3 -----------------------------------------------------------------------------


def test_reap_removes_dead_workers_and_stale_reservations_only(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url, lease_ttl_s=0.5, reservation_ttl_s=1.5) as reg:
            await register(
                reg, ("d-live", "decode"), ("d-dead", "decode"), ("p-dead", "prefill"), ("p-live", "prefill")
            )
            await reg.publish_prefix("d-dead", ["h0"], [])
            await reg.reserve("stale", "d-live", 1)  # D never gets KV for it: the reservation expires
            await reg.reserve("dead-d", "d-dead", 2, local_prefill=True)
            await reg.reserve("dead-p", "d-live", 3)
            await reg.begin_prefill("dead-p", "p-dead")
            await reg.reserve("via-dead-d", "d-dead", 4)
            await reg.begin_prefill("via-dead-d", "p-live")
            await reg.reserve("live", "d-live", 5, local_prefill=True)

            stop = asyncio.Event()
            held_by_d = ["stale", "dead-p", "live"]
            beating = [
                asyncio.create_task(heartbeat_until(reg, "d-live", stop, held_by_d)),
                asyncio.create_task(heartbeat_until(reg, "p-live", stop, ["via-dead-d"])),
            ]
            await asyncio.sleep(0.8)  # the dead workers' leases (0.5 s) ran out
            reports = await asyncio.gather(reg.reap(), reg.reap(), reg.reap())  # several reapers at once
            merged = {
                field: sorted(x for r in reports for x in getattr(r, field))
                for field in ("dead_workers", "dropped_requests", "released_requests", "expired_reservations")
            }
            assert merged == {
                "dead_workers": ["d-dead", "p-dead"],
                "dropped_requests": ["dead-d", "via-dead-d"],
                "released_requests": ["dead-p"],  # back to its D, which still holds the blocks
                "expired_reservations": [],
            }
            released = await reg.get_request("dead-p")
            assert released is not None
            assert (released.state, released.owner, released.prefill_worker) == (
                RequestState.RESERVED,
                "d-live",
                "",
            )
            assert [w.info.worker_id for w in await reg.live_workers()] == ["d-live", "p-live"]
            assert await reg.prefix_overlap(["h0"], ["d-dead"]) == {"d-dead": 0}

            await asyncio.sleep(0.9)  # "stale" is > 1.7 s old now; "dead-p" became RESERVED 0.9 s ago
            assert (await reg.reap()).expired_reservations == ("stale",)
            assert [r.request_id for r in await reg.live_requests()] == ["dead-p", "live"]
            assert (await reg.reap()).is_empty
            stop.set()
            await asyncio.gather(*beating)

            for rid in ("dead-p", "live"):
                assert await reg.end_request(rid, "d-live")
            assert await reg.keys() == [
                "baton:worker:d-live",
                "baton:worker:p-live",
                "baton:workers:decode",
                "baton:workers:prefill",
            ]

    run(main())


def test_records_and_keys_of_a_crashed_process_expire_without_a_reaper(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url, lease_ttl_s=0.3) as reg:  # request TTL 0.9 s, aux TTL 1.8 s
            await register(reg, ("d1", "decode"), ("p1", "prefill"))
            await reg.publish_prefix("p1", ["h0"], [])
            await reg.reserve("kept", "d1", 1, local_prefill=True)
            await reg.reserve("orphan", "d1", 1, local_prefill=True)
            await reg.reserve("prefilling", "d1", 1)
            await reg.begin_prefill("prefilling", "p1")
            # d1 keeps renewing "kept" only; "prefilling" belongs to p1, which crashed: not renewed by D
            stop = asyncio.Event()
            beating = asyncio.create_task(heartbeat_until(reg, "d1", stop, ["kept", "prefilling"]))
            await asyncio.sleep(1.2)
            assert [r.request_id for r in await reg.live_requests()] == ["kept"]
            assert await reg.get_request("orphan") is None and await reg.get_request("prefilling") is None
            stop.set()
            await beating  # now d1 crashes too
            await asyncio.sleep(2.0)
            assert await reg.keys() == []  # nothing eternal, though no reaper ever ran

    run(main())


def test_every_key_carries_a_ttl(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg, aioredis.Redis.from_url(redis_url) as raw:
            await register(reg, ("d1", "decode"), ("p1", "prefill"))
            await reg.publish_prefix("p1", ["h0"], [])
            await reg.reserve("r1", "d1", 1)
            await reg.reserve("r2", "d1", 1)
            await reg.begin_prefill("r2", "p1")
            assert await reg.heartbeat("p1", LOAD, ["r2"])
            keys = await reg.keys()
            assert {k.split(":")[1] for k in keys} == {
                "worker",
                "workers",
                "worker-requests",
                "worker-prefixes",
                "request",
                "requests",
                "reserved",
            }
            for key in keys:
                ttl_ms = await raw.pttl(key)
                assert 0 < ttl_ms <= 60_000, (key, ttl_ms)

    run(main())


def test_i3_no_keys_but_live_workers_after_all_requests_end(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url, namespace="i3") as reg:
            await register(reg, ("d1", "decode"), ("p1", "prefill"))
            for i in range(10):
                rid = f"r{i}"
                await reg.reserve(rid, "d1", 3, local_prefill=i % 3 == 0)
                if i % 3 == 1:
                    await reg.begin_prefill(rid, "p1")
                    await reg.commit_handoff(rid, "p1", "d1")
                elif i % 3 == 2:
                    await reg.begin_prefill(rid, "p1")
                    await reg.release_prefill(rid, "p1")
                assert await reg.heartbeat("d1", LOAD, [rid])
            for i in range(10):
                assert await reg.end_request(f"r{i}", "d1")
            assert await reg.live_requests() == []
            assert await reg.keys() == [
                "i3:worker:d1",
                "i3:worker:p1",
                "i3:workers:decode",
                "i3:workers:prefill",
            ]
            assert await reg.deregister_worker("p1") == []
            assert await reg.deregister_worker("d1") == []
            assert await reg.keys() == []

    run(main())


def test_deregister_drops_what_the_worker_still_decodes(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url) as reg:
            await register(reg, ("d1", "decode"), ("p1", "prefill"))
            await reg.reserve("a", "d1", 1, local_prefill=True)
            await reg.reserve("b", "d1", 1)
            await reg.begin_prefill("b", "p1")
            assert await reg.deregister_worker("d1") == ["a", "b"]
            assert await reg.live_requests() == []
            assert [w.info.worker_id for w in await reg.live_workers()] == ["p1"]
            assert await reg.keys() == ["baton:worker:p1", "baton:workers:prefill"]

    run(main())


def test_namespaces_are_isolated(redis_url: str) -> None:
    async def main() -> None:
        async with Registry(redis_url, namespace="a") as a, Registry(redis_url, namespace="b") as b:
            await register(a, ("d1", "decode"))
            await a.reserve("r", "d1", 1)
            assert await b.live_workers() == [] and await b.get_request("r") is None
            await b.reserve("r", "d1", 1)  # same id, other namespace: no conflict
            assert await b.keys() and all(k.startswith("b:") for k in await b.keys())

    run(main())


# -- Redis down --------------------------------------------------------------------------------------


def test_unreachable_redis_raises_registry_unavailable_quickly() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"  # bound, then closed: nothing listens there

    async def main() -> None:
        async with Registry(url, connect_timeout_s=2.0, socket_timeout_s=2.0) as reg:
            assert not await reg.ping()
            calls: list[Awaitable[object]] = [
                reg.register_worker(info("d1", "decode"), LOAD),
                reg.heartbeat("d1", LOAD, ["r"]),
                reg.live_workers(),
                reg.reserve("r", "d1", 1),
                reg.get_request("r"),
                reg.live_requests(),
                reg.publish_prefix("d1", ["h0"], []),
                reg.prefix_overlap(["h0"], ["d1"]),
                reg.reap(),
                reg.keys(),
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(RegistryUnavailable, match="Redis unavailable"):
                    await call
                assert time.monotonic() - started < 2.0
            # overlapping calls (sharing round trips) fail as quickly
            started = time.monotonic()
            failures = await asyncio.gather(
                *(reg.reserve(f"r{i}", "d1", 1) for i in range(8)), return_exceptions=True
            )
            assert all(isinstance(f, RegistryUnavailable) for f in failures), failures
            assert time.monotonic() - started < 2.0

    run(main())


def test_registry_check_authenticates_with_the_password_setting(
    redis_with_auth: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Redis with AUTH (as compose and k8s run it): refused without BATON_REDIS_PASSWORD, clean with it;
    the password is never printed."""
    from baton.services.cli import main

    url, password = redis_with_auth
    assert main(["registry", "check", "--redis-url", url]) == 1
    refused = capsys.readouterr().err
    assert "unreachable" in refused and "auth" in refused.lower()
    monkeypatch.setenv("BATON_REDIS_PASSWORD", password)
    assert main(["registry", "check", "--redis-url", url]) == 0
    out, err = capsys.readouterr()
    assert "clean (0 live workers" in out and password not in out + err + refused
