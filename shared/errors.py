"""The errors Baton's services raise to say what kind of failure a request met; `grpc_server.status_for`
maps each kind to one gRPC status. Kept free of heavy imports: a service that never loads the engine
or torch (the gateway, the router) still recognises every kind."""

from __future__ import annotations


class CapacityError(RuntimeError):
    """No room for the request now (blocks, sequence slots, workers): RESOURCE_EXHAUSTED, retry later."""


class UnavailableError(RuntimeError):
    """A dependency this request needs is gone (worker died, engine stopped, transfer failed):
    UNAVAILABLE."""


class ConflictError(RuntimeError):
    """The request's shared state moved on (reservation expired, handoff refused): ABORTED."""
