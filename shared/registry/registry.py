"""The Redis block-ownership registry: the shared view of which worker owns which request's KV.

Each worker's allocator is the ground truth; Redis is a view of it, rebuilt from the workers after a
flush or restart (I5: `heartbeat` returns False, the worker re-registers, republishes its prefix cache
and restores its request records). Every state change is one Lua script (lua.py); Python only reads.
Per-request scripts made while others are on the wire share a round trip (batcher.py).

Key layout (namespace `ns`, default "baton"; TTLs in terms of the lease, default 10 s):

    ns:worker:{worker_id}            hash   WorkerInfo + WorkerLoad + heartbeat_at     TTL lease
    ns:workers:{role}                zset   worker_id -> lease deadline (unix s)        TTL aux
    ns:worker-requests:{worker_id}   set    ids of records it decodes or prefills      TTL aux
    ns:worker-prefixes:{worker_id}   set    block hashes (hex) it holds cached         TTL aux
    ns:request:{request_id}          hash   RequestRecord                              TTL request
    ns:requests                      zset   request_id -> record deadline (unix s)     TTL aux
    ns:reserved                      zset   request_id -> time it became RESERVED      TTL aux

    request TTL = 3 x lease, refreshed by the owner's heartbeat (and by every transition);
    aux TTL = 2 x request TTL, refreshed by heartbeats and writes.

So a crashed process leaves nothing behind for longer than the aux TTL even if no reaper ever runs;
a reaper (`reap`) notices dead workers within their lease.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from baton.shared.config import RegistryConfig
from baton.shared.registry import lua
from baton.shared.registry.batcher import ScriptBatcher
from baton.shared.registry.records import (
    ROLES,
    ReapReport,
    RequestRecord,
    WorkerInfo,
    WorkerLoad,
    WorkerRecord,
    load_fields,
    pairs_to_dict,
    request_fields,
    request_from_fields,
    worker_fields,
    worker_from_fields,
)

T = TypeVar("T")

_CHUNK = 1000  # arguments per SADD/SREM: keeps single commands (and Lua's unpack) small


class RegistryError(RuntimeError):
    """A transition was refused (wrong state or owner); the message says what was expected and found."""


class RegistryUnavailable(RuntimeError):
    """Redis is unreachable or timed out. Callers degrade (I5); the cause is chained."""


def redacted(url: str) -> str:
    """`url` fit for logs: a password in it replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class Registry:
    """Async client of the registry. One per process; safe to share between coroutines."""

    def __init__(
        self,
        url: str,
        namespace: str = "baton",
        lease_ttl_s: float = 10.0,
        reservation_ttl_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        socket_timeout_s: float = 2.0,
        max_connections: int = 32,
        password: str | None = None,
        username: str | None = None,
    ) -> None:
        """`username`, `password`: Redis AUTH's (an ACL user), when `url` carries none (the URL's win)."""
        if not namespace:
            raise ValueError("namespace must not be empty")
        if lease_ttl_s <= 0 or reservation_ttl_s <= 0:
            raise ValueError(
                f"TTLs must be > 0, got lease {lease_ttl_s} s, reservation {reservation_ttl_s} s"
            )
        self.namespace = namespace
        self.lease_ttl_s = lease_ttl_s
        self.request_ttl_s = 3 * lease_ttl_s
        self.aux_ttl_s = 2 * self.request_ttl_s
        self.reservation_ttl_s = reservation_ttl_s
        # Retry once, on connection errors only (a pooled connection that died with a Redis restart):
        # a timed-out transition may have run, and running it twice would be refused.
        # A bounded pool whose callers queue for a connection: a decode worker ends hundreds of records
        # in one step, beyond redis-py's default pool, which fails the excess with "Too many connections".
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=connect_timeout_s + socket_timeout_s,
            decode_responses=True,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1, (RedisConnectionError,)),
            **({"password": password} if password else {}),
            **({"username": username} if username else {}),
        )
        self._redis = redis.Redis.from_pool(pool)
        self._header = [
            namespace,
            _ms(lease_ttl_s),
            _ms(self.request_ttl_s),
            _ms(self.aux_ttl_s),
            _ms(reservation_ttl_s),
        ]
        scripts = {name: lua.PRELUDE + getattr(lua, name) for name in _SCRIPTS}
        self._scripts = {name: self._redis.register_script(src) for name, src in scripts.items()}
        self._batcher = ScriptBatcher(self._redis)

    @classmethod
    def from_config(cls, config: RegistryConfig, reservation_ttl_s: float = 30.0) -> Registry:
        """The client a service's registry settings describe."""
        return cls(
            config.redis_url,
            config.namespace,
            config.lease_ttl_s,
            reservation_ttl_s,
            password=config.redis_password,
            username=config.redis_username,
        )

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._batcher.drain()
        await self._redis.aclose()

    @property
    def round_trips(self) -> tuple[int, int]:
        """(per-request scripts run, round trips that carried them) since this client was made: calls
        made while others were on the wire share round trips (see batcher.py)."""
        return self._batcher.num_scripts, self._batcher.num_round_trips

    async def ping(self) -> bool:
        """True if Redis answers, False if it is unreachable or timed out."""
        try:
            return bool(await self._redis.ping())
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return False

    # -- workers ---------------------------------------------------------------------------------

    async def register_worker(self, info: WorkerInfo, load: WorkerLoad) -> None:
        """Join (or rejoin) with a fresh lease and an empty prefix set: publish the whole cache after."""
        _check_ids(info.worker_id)
        if info.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {info.role!r}")
        fields = worker_fields(info, load)
        pairs = [item for kv in fields.items() for item in kv]
        await self._run("REGISTER_WORKER", info.worker_id, info.role, *pairs)

    async def heartbeat(self, worker_id: str, load: WorkerLoad, request_ids: Sequence[str] = ()) -> bool:
        """Refresh the lease, the load and the TTL of the records in `request_ids` this worker owns.

        False if the worker's key had expired or vanished (reaped, Redis flushed): re-register, then
        republish the prefix cache and `restore_requests`.
        """
        counts = load_fields(load)
        args = [counts["num_free_blocks"], counts["num_running"], counts["num_waiting"]]
        return bool(await self._run("HEARTBEAT", worker_id, *args, *request_ids))

    async def deregister_worker(self, worker_id: str) -> list[str]:
        """Graceful exit: remove the worker, its membership, its prefix set and its request index.

        Records it decodes are deleted and those it prefills go back to their decode worker (as `reap`
        does for a dead worker); after a clean drain there are none. Returns the deleted ids.
        """
        dropped, _released = await self._run("DEREGISTER_WORKER", worker_id)
        return sorted(dropped)

    async def live_workers(self, role: str | None = None) -> list[WorkerRecord]:
        """Workers whose lease is current, sorted by id."""
        roles = ROLES if role is None else (role,)
        async with self._redis.pipeline(transaction=False) as pipe:
            for r in roles:
                pipe.zrange(self._key("workers", r), 0, -1)
            members: list[list[str]] = await self._guard(pipe.execute())
        expected = [(r, wid) for r, ids in zip(roles, members, strict=True) for wid in ids]
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, wid in expected:
                pipe.hgetall(self._key("worker", wid))
            hashes: list[dict[str, str]] = await self._guard(pipe.execute())
        records = [
            worker_from_fields(fields)
            for (r, _), fields in zip(expected, hashes, strict=True)
            if fields and fields.get("role") == r
        ]
        return sorted(records, key=lambda w: w.info.worker_id)

    # -- requests: each method is one atomic transition ------------------------------------------

    async def reserve(
        self, request_id: str, decode_worker: str, num_blocks: int, local_prefill: bool = False
    ) -> RequestRecord:
        """Create the record: RESERVED (DECODING if D prefills itself), owner D. Refused if it exists."""
        _check_ids(request_id, decode_worker)
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        flag = "1" if local_prefill else "0"
        return await self._transition("RESERVE", request_id, decode_worker, str(num_blocks), flag)

    async def begin_prefill(self, request_id: str, prefill_worker: str) -> RequestRecord:
        """RESERVED -> PREFILLING, owner P."""
        _check_ids(request_id, prefill_worker)
        return await self._transition("BEGIN_PREFILL", request_id, prefill_worker)

    async def commit_handoff(self, request_id: str, prefill_worker: str, decode_worker: str) -> RequestRecord:
        """The P->D handoff (I2): PREFILLING with owner P and decode worker D -> DECODING, owner D."""
        _check_ids(request_id, prefill_worker, decode_worker)
        return await self._transition("COMMIT_HANDOFF", request_id, prefill_worker, decode_worker)

    async def release_prefill(self, request_id: str, prefill_worker: str) -> RequestRecord:
        """PREFILLING with owner P -> RESERVED, owner D: P failed; another P (or D itself) may begin."""
        _check_ids(request_id, prefill_worker)
        return await self._transition("RELEASE_PREFILL", request_id, prefill_worker)

    async def end_request(self, request_id: str, worker_id: str) -> bool:
        """Delete the record if `worker_id` owns or decodes it; False if there is none."""
        ok, ended_or_message = await self._run("END_REQUEST", request_id, worker_id)
        if not ok:
            raise RegistryError(ended_or_message)
        return bool(ended_or_message)

    async def restore_requests(self, worker_id: str, records: Sequence[RequestRecord]) -> list[str]:
        """Recreate missing records this worker owns or decodes (after a flush); returns restored ids.

        Existing records are left alone; records naming neither are skipped.
        """
        args: list[str] = []
        for record in records:
            fields = request_fields(record)
            args.extend(fields[name] for name in lua.RESTORE_FIELDS)
        return list(await self._run("RESTORE_REQUESTS", worker_id, *args))

    async def get_request(self, request_id: str) -> RequestRecord | None:
        fields = await self._guard(self._redis.hgetall(self._key("request", request_id)))
        return request_from_fields(fields) if fields else None

    async def live_requests(self) -> list[RequestRecord]:
        """Every live record, sorted by id (ids whose record expired are pruned on the way)."""
        flats = await self._run("LIVE_REQUESTS")
        records = [request_from_fields(pairs_to_dict(flat)) for flat in flats]
        return sorted(records, key=lambda r: r.request_id)

    # -- prefix index: a routing hint, may be stale ----------------------------------------------

    async def publish_prefix(self, worker_id: str, added: Sequence[str], removed: Sequence[str]) -> None:
        """Apply a worker's cache changes in one MULTI: `removed` first, then `added`."""
        key = self._key("worker-prefixes", worker_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            for start in range(0, len(removed), _CHUNK):
                pipe.srem(key, *removed[start : start + _CHUNK])
            for start in range(0, len(added), _CHUNK):
                pipe.sadd(key, *added[start : start + _CHUNK])
            pipe.pexpire(key, int(_ms(self.aux_ttl_s)))
            await self._guard(pipe.execute())

    async def prefix_overlap(self, block_hashes: Sequence[str], worker_ids: Sequence[str]) -> dict[str, int]:
        """For each worker, how many LEADING hashes (in order) it holds cached. One round trip."""
        if not worker_ids:
            return {}
        counts = await self._run("PREFIX_OVERLAP", str(len(worker_ids)), *worker_ids, *block_hashes)
        return dict(zip(worker_ids, (int(c) for c in counts), strict=True))

    # -- reaper ----------------------------------------------------------------------------------

    async def reap(self) -> ReapReport:
        """Clean up after dead workers and stale reservations; one atomic script, idempotent.

        A worker whose lease expired leaves membership with its prefix set; the records it decodes are
        deleted and the PREFILLING records it owns go back to RESERVED under their decode worker (which
        still holds the blocks). RESERVED records older than `reservation_ttl_s` are deleted.
        """
        dead, dropped, released, expired = await self._run("REAP")
        return ReapReport(
            dead_workers=tuple(sorted(dead)),
            dropped_requests=tuple(sorted(dropped)),
            released_requests=tuple(sorted(released)),
            expired_reservations=tuple(sorted(expired)),
        )

    async def keys(self) -> list[str]:
        """Every key of this namespace (SCAN; for tests and the audit command), sorted."""
        return sorted(await self._guard(self._scan(f"{_glob_escape(self.namespace)}:*")))

    # -- plumbing --------------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self.namespace}:{kind}:{name}"

    async def _scan(self, pattern: str) -> list[str]:
        return [key async for key in self._redis.scan_iter(match=pattern, count=1000)]

    async def _run(self, script: str, *args: str) -> Any:
        full_args = [*self._header, *args]
        if script in _PER_REQUEST:
            return await self._guard(self._batcher.run(self._scripts[script], full_args))
        return await self._guard(self._scripts[script](args=full_args))

    async def _transition(self, script: str, *args: str) -> RequestRecord:
        reply = await self._run(script, *args)
        if not reply[0]:
            raise RegistryError(reply[1])
        return request_from_fields(pairs_to_dict(reply[1:]))

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError) as exc:
            waited_s = time.monotonic() - started
            raise RegistryUnavailable(f"Redis unavailable after {waited_s:.2f} s: {exc}") from exc


_SCRIPTS = (
    "REGISTER_WORKER",
    "HEARTBEAT",
    "DEREGISTER_WORKER",
    "REAP",
    "RESERVE",
    "BEGIN_PREFILL",
    "COMMIT_HANDOFF",
    "RELEASE_PREFILL",
    "END_REQUEST",
    "RESTORE_REQUESTS",
    "LIVE_REQUESTS",
    "PREFIX_OVERLAP",
)

_PER_REQUEST = frozenset(
    {"RESERVE", "BEGIN_PREFILL", "COMMIT_HANDOFF", "RELEASE_PREFILL", "END_REQUEST", "PREFIX_OVERLAP"}
)
"""Scripts run once per request (or more): small, and many at once under a burst, so they share
round trips (batcher.py). The others (leases, the reaper, restores, listings) go on their own."""


def _check_ids(*ids: str) -> None:
    if not all(ids):
        raise ValueError(f"request and worker ids must be non-empty, got {ids}")


def _ms(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
