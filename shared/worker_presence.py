"""A worker's presence in the registry: register, heartbeat (lease, load, the records it holds, its
prefix-cache changes), re-register after Redis lost it, deregister on the way out.

Redis is a shared view, not the ground truth: while it is unreachable the worker keeps serving and
retries each beat; when it comes back empty (restart, flush) the worker registers again and
republishes its whole prefix cache (invariant I5)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from baton.shared.registry import Registry, RegistryUnavailable, RequestRecord, WorkerInfo, WorkerLoad

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PresenceSnapshot:
    """What one heartbeat reports, read from the worker's own state."""

    load: WorkerLoad
    request_ids: list[str]
    """Requests whose registry records this worker keeps alive."""
    prefix_added: list[str] = field(default_factory=list)
    """Block hashes (hex) that entered the prefix cache since the last snapshot."""
    prefix_removed: list[str] = field(default_factory=list)
    prefix_all: list[str] | None = None
    """Every cached hash (hex): filled when asked for a full snapshot (after re-registering)."""
    records: list[RequestRecord] = field(default_factory=list)
    """Full snapshots: the records of the requests this worker holds, restored if Redis lost them."""


SnapshotFn = Callable[[bool], Awaitable[PresenceSnapshot]]
"""snapshot(full) -> the worker's state; `full` asks for `prefix_all` too."""


class WorkerPresence:
    def __init__(self, registry: Registry, info: WorkerInfo, snapshot: SnapshotFn, interval_s: float) -> None:
        self.registry = registry
        self.info = info
        self._snapshot = snapshot
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._registered = False
        self._outage_logged = False

    async def start(self) -> None:
        """Register (retrying in the background if Redis is down) and start heartbeating."""
        await self._beat()
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.info.worker_id}")

    async def stop(self) -> None:
        """Stop heartbeating and leave the registry (best effort: a lease expiry does the same)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.registry.deregister_worker(self.info.worker_id)
        except RegistryUnavailable as exc:
            logger.warning("could not deregister %s: %s", self.info.worker_id, exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._beat()

    async def _beat(self) -> None:
        try:
            if not self._registered:
                await self._register()
                return
            snap = await self._snapshot(False)
            if not await self.registry.heartbeat(self.info.worker_id, snap.load, snap.request_ids):
                logger.warning(
                    "registry lost worker %s (expired or flushed): registering again", self.info.worker_id
                )
                await self._register()
                return
            if snap.prefix_added or snap.prefix_removed:
                await self.registry.publish_prefix(
                    self.info.worker_id, snap.prefix_added, snap.prefix_removed
                )
            if self._outage_logged:
                logger.info("registry reachable again")
                self._outage_logged = False
        except RegistryUnavailable as exc:
            self._registered = False  # whatever Redis holds after the outage is re-established
            if not self._outage_logged:
                logger.warning(
                    "registry unreachable, serving on and retrying every %.1f s: %s", self.interval_s, exc
                )
                self._outage_logged = True
        except Exception as exc:  # Redis refused a command (an ACL missing a permission), a script failed
            self._registered = False  # this beat's prefix changes may be lost: send everything next time
            logger.error(
                "registry refused worker %s's heartbeat, retrying every %.1f s: %s: %s",
                self.info.worker_id,
                self.interval_s,
                type(exc).__name__,
                exc,
            )

    async def _register(self) -> None:
        snap = await self._snapshot(True)
        await self.registry.register_worker(self.info, snap.load)
        if snap.records:
            restored = await self.registry.restore_requests(self.info.worker_id, snap.records)
            if restored:
                logger.warning("restored %d request records the registry had lost", len(restored))
        await self.registry.heartbeat(self.info.worker_id, snap.load, snap.request_ids)
        if snap.prefix_all:  # last: the lease and the records matter more than placement hints
            await self.registry.publish_prefix(self.info.worker_id, snap.prefix_all, [])
        self._registered = True
