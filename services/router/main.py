"""`baton router`: the Router process. Disaggregated (workers found in the registry; it also runs the
reaper) or colocated (an engine in this process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from baton.services.lifecycle import wait_for_stop_signal
from baton.services.router.disaggregated import DisaggregatedBackend
from baton.services.router.service import Backend, RouterService
from baton.shared import grpc_tls
from baton.shared.config import RouterConfig
from baton.shared.gc_pauses import freeze_startup_heap
from baton.shared.grpc_server import ServiceBinding, start_server
from baton.shared.loop_lag import LoopLagMonitor
from baton.shared.registry import Registry, RegistryUnavailable, redacted
from baton.shared.rpc import router_pb2_grpc

logger = logging.getLogger(__name__)


async def run_router(config: RouterConfig) -> None:
    tls = grpc_tls.load(config.grpc_tls, server=True)  # a bad setting fails before the model loads
    registry: Registry | None = None
    reaper: asyncio.Task[None] | None = None
    backend: Backend
    max_model_len = config.max_model_len
    if config.colocated is not None:
        # the engine and torch only here: a disaggregated router starts without them
        from baton.services.router.colocated import ColocatedBackend
        from baton.shared.engine.async_engine import AsyncEngine
        from baton.shared.engine.engine_core import EngineCore

        core = await asyncio.to_thread(EngineCore, config.colocated)
        max_model_len = core.max_model_len
        engine = AsyncEngine(core)
        engine.start()
        backend = ColocatedBackend(engine)
    else:
        reg = config.registry
        registry = Registry.from_config(reg)
        backend = DisaggregatedBackend(config, registry, tls)
        reaper = asyncio.create_task(_reap_forever(registry, reg.lease_ttl_s / 2))
    service = RouterService(Path(config.model), backend, max_model_len, config.max_pending_requests)
    binding = ServiceBinding(router_pb2_grpc.add_RouterServicer_to_server, service, "baton.v1.Router")
    server = await start_server([binding], config.host, config.port, tls)
    mode = (
        "colocated"
        if config.colocated is not None
        else f"disaggregated, registry {redacted(config.registry.redis_url)}"
    )
    logger.info(
        "router ready on %s:%d (%s, %s), model %s",
        config.host,
        server.port,
        grpc_tls.describe(tls),
        mode,
        service.model_name,
    )
    freeze_startup_heap()
    loop_lag = LoopLagMonitor()
    loop_lag.start()
    signal_name = await wait_for_stop_signal()
    logger.info("%s received: draining", signal_name)
    await server.set_serving(False)
    drain_s = config.drain_timeout_s
    await asyncio.gather(server.server.stop(grace=drain_s), service.drain(drain_s))
    if reaper is not None:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
    await backend.close()
    if registry is not None:
        await registry.close()
    logger.info("event loop lag: %s", loop_lag.stop())
    logger.info("router stopped")


async def _reap_forever(registry: Registry, interval_s: float) -> None:
    """Dead workers' records and expired reservations leave the registry within about one lease."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            report = await registry.reap()
        except RegistryUnavailable as exc:
            logger.debug("reaper skipped a pass: %s", exc)
            continue
        if not report.is_empty:
            logger.warning(
                "reaped dead workers %s; dropped requests %s; released %s; expired reservations %s",
                list(report.dead_workers),
                list(report.dropped_requests),
                list(report.released_requests),
                list(report.expired_reservations),
            )
