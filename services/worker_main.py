"""`baton prefill` / `baton decode`: one worker process. Builds the engine, the KV transfer end, the
gRPC server (health, reflection), registers in Redis, serves until SIGTERM, then drains: health goes
NOT_SERVING and new requests are refused (the router places them elsewhere), in-flight requests get
`drain_timeout_s` to finish, then the worker leaves the registry and everything closes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from baton.services.decode.service import DecodeService
from baton.services.lifecycle import wait_for_stop_signal
from baton.services.prefill.service import PrefillService
from baton.shared.config import WorkerConfig
from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.engine.engine_core import EngineCore
from baton.shared.grpc_server import ServiceBinding, start_server
from baton.shared.loop_thread import LoopThread
from baton.shared.registry import Registry, WorkerInfo
from baton.shared.rpc import worker_pb2_grpc
from baton.shared.transfer import FaultConfig, KVReceiver, UcxKVReceiver, UcxKVSender, stop_ucx
from baton.shared.worker_presence import WorkerPresence
from baton.shared.worker_runtime import default_worker_id, engine_snapshot, kv_layout

logger = logging.getLogger(__name__)


async def run_worker(config: WorkerConfig) -> None:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    core = await asyncio.to_thread(EngineCore, config.engine)
    core.kv_manager.pool.track_cache_events()
    layout = kv_layout(core)
    worker_id = config.worker_id or default_worker_id(config.role)
    reg = config.registry

    def new_registry() -> Registry:
        return Registry(reg.redis_url, reg.namespace, reg.lease_ttl_s, config.reservation_timeout_s)

    registry = new_registry()
    engine = AsyncEngine(core)
    engine.start()
    receiver: KVReceiver | None = None
    receiver_loop: LoopThread | None = None
    handoff_registry: Registry | None = None
    service: Any
    if config.role == "decode":
        # The KV receiver (and the Redis client recording its handoffs) runs on a loop of its own, so a
        # handoff never waits behind the main loop's token streams.
        receiver_loop = LoopThread("baton-kv-receiver")
        handoff_registry = new_registry()
        service = DecodeService(config, engine, registry, worker_id, layout.num_layers, handoff_registry)
        receiver = UcxKVReceiver(
            layout, service, config.host, config.transfer_port, core.device, config.advertise_host
        )
        await receiver_loop.run(receiver.start())
        service.transfer_address = receiver.address
        binding = ServiceBinding(
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server, service, "baton.worker.v1.DecodeWorker"
        )
    else:
        sender = UcxKVSender(
            layout,
            FaultConfig.parse(config.kv_faults),
            max_pushes_per_address=config.max_pushes_per_receiver,
            connections_per_address=config.kv_connections_per_receiver,
        )
        service = PrefillService(config, engine, registry, sender, worker_id, layout.num_layers)
        binding = ServiceBinding(
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server, service, "baton.worker.v1.PrefillWorker"
        )
    server = await start_server([binding], config.host, config.port)
    host = config.advertise_host or config.host
    info = WorkerInfo(
        worker_id=worker_id,
        role=config.role,
        grpc_address=f"{host}:{server.port}",
        transfer_address=receiver.address if receiver is not None else "",
        model_id=layout.model_id,
        block_size=layout.block_size,
        num_blocks=core.kv_manager.pool.num_blocks,
    )
    presence = WorkerPresence(
        registry,
        info,
        lambda full: engine_snapshot(
            engine, service.request_ids, full, service.registry_records() if full else []
        ),
        config.heartbeat_interval_s,
    )
    await presence.start()
    logger.info(
        "%s worker %s ready: grpc %s%s, %d KV blocks",
        config.role,
        worker_id,
        info.grpc_address,
        f", KV transfer {info.transfer_address}" if info.transfer_address else "",
        info.num_blocks,
    )
    signal_name = await wait_for_stop_signal()
    logger.info("%s received: draining (up to %g s)", signal_name, config.drain_timeout_s)
    await server.set_serving(False)
    await service.drain(config.drain_timeout_s)  # still heartbeating: its records stay owned
    await presence.stop()
    await service.shutdown()
    await server.server.stop(grace=5)
    if receiver_loop is not None and receiver is not None and handoff_registry is not None:
        await receiver_loop.run(_close_receiver(receiver, handoff_registry))
        receiver_loop.stop()
    if config.role == "prefill":
        await sender.close()
        stop_ucx()
    await asyncio.to_thread(engine.shutdown)
    await registry.close()
    logger.info("%s worker %s stopped", config.role, worker_id)


async def _close_receiver(receiver: KVReceiver, handoff_registry: Registry) -> None:
    """On the receiver's loop: close it, its Redis client and UCX (bound to that loop)."""
    await receiver.close()
    await handoff_registry.close()
    stop_ucx()
