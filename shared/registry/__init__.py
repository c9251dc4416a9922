"""Redis block-ownership registry: workers' leases and load, request ownership, prefix index, audit."""

from baton.shared.registry.audit import audit
from baton.shared.registry.records import (
    ROLES,
    ReapReport,
    RequestRecord,
    RequestState,
    WorkerInfo,
    WorkerLoad,
    WorkerRecord,
    WorkerReport,
)
from baton.shared.registry.registry import Registry, RegistryError, RegistryUnavailable, redacted

__all__ = [
    "ROLES",
    "ReapReport",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "RequestRecord",
    "RequestState",
    "WorkerInfo",
    "WorkerLoad",
    "WorkerRecord",
    "WorkerReport",
    "audit",
    "redacted",
]
