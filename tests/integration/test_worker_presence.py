"""A worker's presence when Redis refuses one of its commands (an ACL user without a permission the
registry needs, here MULTI/EXEC of the prefix updates): the heartbeat loop logs the refusal as an
error and goes on, so the worker's lease and the records it keeps alive survive past their TTLs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from baton.shared.registry import Registry, WorkerInfo, WorkerLoad
from baton.shared.worker_presence import PresenceSnapshot, WorkerPresence

pytestmark = pytest.mark.integration

WITHOUT_TRANSACTIONS = ["~p:*", "&*", "+@read", "+@write", "+@scripting", "+@connection", "+time"]


def test_a_refused_prefix_update_neither_stops_the_heartbeat_nor_loses_the_lease(
    start_redis: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    users = ["--user", "w", "on", ">pw", *WITHOUT_TRANSACTIONS, "--user", "default", "off"]
    url = start_redis(username="w", password="pw", extra_args=users)
    beats = 0

    async def snapshot(full: bool) -> PresenceSnapshot:
        nonlocal beats
        beats += 1
        hashes = [f"{beats:04x}"]  # a prefix change every beat: every beat tries MULTI/EXEC
        return PresenceSnapshot(
            WorkerLoad(10, 0, 0), ["r~1"], prefix_added=hashes, prefix_all=hashes if full else None
        )

    async def main() -> None:
        async with Registry(url, namespace="p", lease_ttl_s=0.6, username="w", password="pw") as registry:
            info = WorkerInfo("decode-0", "decode", "127.0.0.1:1", "ucx://127.0.0.1:2", "m", 16, 10)
            await registry.reserve("r~1", "decode-0", 1)
            presence = WorkerPresence(registry, info, snapshot, interval_s=0.2)
            await presence.start()
            await asyncio.sleep(3.0)  # 5 leases, 1.7 record TTLs: only heartbeats keep them
            assert [w.info.worker_id for w in await registry.live_workers()] == ["decode-0"]
            assert [r.request_id for r in await registry.live_requests()] == ["r~1"]
            await presence.stop()

    with caplog.at_level(logging.ERROR, logger="baton.shared.worker_presence"):
        asyncio.run(main())
    assert beats >= 10  # the loop kept going
    refusals = [r for r in caplog.records if "refused worker decode-0's heartbeat" in r.getMessage()]
    assert refusals and "multi" in refusals[0].getMessage().lower()
