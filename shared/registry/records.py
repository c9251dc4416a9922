"""What the registry stores and reports: workers, their load, request ownership records.

Records travel through Redis as flat string hashes; `*_fields`/`*_from_fields` convert both ways so
the Lua scripts and Python agree on one field list.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

ROLES = ("prefill", "decode")


class RequestState(str, enum.Enum):
    """Who owns a request's KV (invariant I2: exactly one owner at a time)."""

    RESERVED = "reserved"  # D allocated blocks for the prompt, waiting for P's KV; owner = D
    PREFILLING = "prefilling"  # P is computing/pushing the KV; owner = P
    DECODING = "decoding"  # D owns the KV and decodes; owner = D


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker registers once; fixed for the life of the process."""

    worker_id: str
    role: str  # "prefill" | "decode"
    grpc_address: str
    transfer_address: str  # "" when the worker takes no KV pushes
    model_id: str
    block_size: int
    num_blocks: int


@dataclass(frozen=True)
class WorkerLoad:
    """Refreshed at each heartbeat: what placement decisions read."""

    num_free_blocks: int
    num_running: int
    num_waiting: int


@dataclass(frozen=True)
class WorkerRecord:
    """A live worker as the registry sees it."""

    info: WorkerInfo
    load: WorkerLoad
    heartbeat_at: float  # unix seconds, Redis server clock


@dataclass(frozen=True)
class RequestRecord:
    """The shared view of one request's KV ownership."""

    request_id: str
    state: RequestState
    owner: str  # the worker whose KV this is right now
    decode_worker: str  # D: holds blocks for the request from reserve to end
    prefill_worker: str  # P, "" if none (local prefill, or not begun yet)
    num_blocks: int
    created_at: float  # unix seconds, Redis server clock
    updated_at: float  # last state change


@dataclass(frozen=True)
class WorkerReport:
    """What a live worker says about itself (gathered over gRPC by the audit's caller)."""

    worker_id: str
    role: str
    request_ids: tuple[str, ...]  # requests it currently holds blocks for / is working on
    integrity_error: str | None  # its allocator's check_integrity() failure, None if fine
    num_held_blocks: int  # blocks with refcount > 0
    num_request_blocks: int  # distinct blocks the requests it knows hold; must equal num_held_blocks


@dataclass(frozen=True)
class ReapReport:
    """What one `Registry.reap` pass cleaned up. Concurrent reapers never report the same id twice."""

    dead_workers: tuple[str, ...] = ()  # lease expired: dropped from membership with their prefix sets
    dropped_requests: tuple[str, ...] = ()  # records a dead worker decoded (or owned): deleted
    released_requests: tuple[str, ...] = ()  # PREFILLING records of a dead P: back to RESERVED, owner D
    expired_reservations: tuple[str, ...] = ()  # RESERVED longer than reservation_ttl_s: deleted

    @property
    def is_empty(self) -> bool:
        return not (
            self.dead_workers or self.dropped_requests or self.released_requests or self.expired_reservations
        )


# -- Redis hash encoding ----------------------------------------------------------------------------


def worker_fields(info: WorkerInfo, load: WorkerLoad) -> dict[str, str]:
    return {
        "worker_id": info.worker_id,
        "role": info.role,
        "grpc_address": info.grpc_address,
        "transfer_address": info.transfer_address,
        "model_id": info.model_id,
        "block_size": str(info.block_size),
        "num_blocks": str(info.num_blocks),
        **load_fields(load),
    }


def load_fields(load: WorkerLoad) -> dict[str, str]:
    return {
        "num_free_blocks": str(load.num_free_blocks),
        "num_running": str(load.num_running),
        "num_waiting": str(load.num_waiting),
    }


def worker_from_fields(fields: Mapping[str, str]) -> WorkerRecord:
    info = WorkerInfo(
        worker_id=fields["worker_id"],
        role=fields["role"],
        grpc_address=fields["grpc_address"],
        transfer_address=fields["transfer_address"],
        model_id=fields["model_id"],
        block_size=int(fields["block_size"]),
        num_blocks=int(fields["num_blocks"]),
    )
    load = WorkerLoad(
        num_free_blocks=int(fields["num_free_blocks"]),
        num_running=int(fields["num_running"]),
        num_waiting=int(fields["num_waiting"]),
    )
    return WorkerRecord(info=info, load=load, heartbeat_at=float(fields["heartbeat_at"]))


def request_fields(record: RequestRecord) -> dict[str, str]:
    return {
        "request_id": record.request_id,
        "state": record.state.value,
        "owner": record.owner,
        "decode_worker": record.decode_worker,
        "prefill_worker": record.prefill_worker,
        "num_blocks": str(record.num_blocks),
        "created_at": repr(record.created_at),
        "updated_at": repr(record.updated_at),
    }


def request_from_fields(fields: Mapping[str, str]) -> RequestRecord:
    return RequestRecord(
        request_id=fields["request_id"],
        state=RequestState(fields["state"]),
        owner=fields["owner"],
        decode_worker=fields["decode_worker"],
        prefill_worker=fields["prefill_worker"],
        num_blocks=int(fields["num_blocks"]),
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
    )


def pairs_to_dict(flat: list[str]) -> dict[str, str]:
    """A Lua HGETALL reply ([k1, v1, k2, v2, ...]) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
