"""`baton prefill` / `baton decode`: one worker process. Builds the engine, the KV transfer end, the
gRPC server (health, reflection), registers in Redis, serves until SIGTERM, then drains: health goes
NOT_SERVING and new requests are refused (the router places them elsewhere), in-flight requests get
`drain_timeout_s` to finish, then the worker leaves the registry and everything closes."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import torch

from baton.services.decode.receiver_process import ReceiverProcess, ReceiverSpec
from baton.services.decode.service import DecodeService
from baton.services.engine_process import ProcessEngine, engine_info
from baton.services.lifecycle import LOG_FORMAT, request_stop, wait_for_stop_signal
from baton.services.prefill.sender_process import SenderProcess, SenderSpec
from baton.services.prefill.service import PrefillService
from baton.shared import grpc_tls
from baton.shared.config import WorkerConfig
from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.engine.engine_core import EngineCore
from baton.shared.engine.kv_cache import KVCaches, SharedKVCaches
from baton.shared.gc_pauses import freeze_startup_heap
from baton.shared.grpc_server import ServiceBinding, start_server
from baton.shared.loop_lag import LoopLagMonitor
from baton.shared.progress_watchdog import ProgressWatchdog
from baton.shared.registry import Registry, WorkerInfo
from baton.shared.rpc import worker_pb2_grpc
from baton.shared.transfer import FaultConfig, KVLayout, TransferSecret
from baton.shared.worker_presence import WorkerPresence
from baton.shared.worker_runtime import default_worker_id, engine_snapshot, step_summary, track_cache_events

logger = logging.getLogger(__name__)


async def run_worker(config: WorkerConfig) -> None:
    tls = grpc_tls.load(config.grpc_tls, server=True)  # a bad setting fails before the model loads
    secret = transfer_secret(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    engine, kv_caches, info = await start_engine(config)
    layout = info["layout"]
    worker_id = config.worker_id or default_worker_id(config.role)
    registry = Registry.from_config(config.registry, config.reservation_timeout_s)
    host = advertised_host(config)
    receiver: ReceiverProcess | None = None
    service: Any
    if config.role == "decode":
        service = DecodeService(config, engine, registry, worker_id, layout.num_layers)
        # The KV receiver runs in a process of its own, writing into the engine's cache: in this process
        # its UCX completions would wait for the GIL behind the engine thread.
        spec = receiver_spec(config, info["attention_backend"], layout, host, secret)
        receiver = ReceiverProcess(spec, kv_caches, service)
        await receiver.start()
        receiver.on_lost = request_stop
        service.receiver = receiver
        service.transfer_address = receiver.address
        engine.set_reservation_release(receiver.revoke)
        binding = ServiceBinding(
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server, service, "baton.worker.v1.DecodeWorker"
        )
    else:
        # The KV sender runs in a process of its own, reading this one's cache: in this process its UCX
        # threads and checksums slowed the engine's steps down (sender_process.py).
        assert not isinstance(kv_caches, SharedKVCaches)  # a prefill worker's engine runs on a thread
        sender = SenderProcess(
            sender_spec(config, info["attention_backend"], layout, secret),
            kv_caches,
            engine.release_prompt_kv,
        )
        FaultConfig.parse(config.kv_faults)  # a bad spec fails here, not in the child
        await sender.start()
        sender.on_lost = request_stop
        service = PrefillService(config, engine, registry, sender, worker_id, layout.num_layers)
        binding = ServiceBinding(
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server, service, "baton.worker.v1.PrefillWorker"
        )
    server = await start_server([binding], config.host, config.port, tls)
    info = WorkerInfo(
        worker_id=worker_id,
        role=config.role,
        grpc_address=f"{host}:{server.port}",
        transfer_address=receiver.address if receiver is not None else "",
        model_id=layout.model_id,
        block_size=layout.block_size,
        num_blocks=info["num_blocks"],
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
        "%s worker %s ready: grpc %s (%s)%s (connections %s), %d KV blocks",
        config.role,
        worker_id,
        info.grpc_address,
        grpc_tls.describe(tls),
        f", KV transfer {info.transfer_address}" if info.transfer_address else ", KV transfer",
        "authenticated by the KV transfer secret" if secret is not None else "not authenticated",
        info.num_blocks,
    )
    watchdog = ProgressWatchdog(engine, server, config.stall_timeout_s, lambda: service.draining)
    watchdog.start()
    freeze_startup_heap()
    loop_lag = LoopLagMonitor()
    loop_lag.start()
    signal_name = await wait_for_stop_signal()
    logger.info("%s received: draining (up to %g s)", signal_name, config.drain_timeout_s)
    await watchdog.stop()
    await server.set_serving(False)
    await service.drain(config.drain_timeout_s)  # still heartbeating: its records stay owned
    await presence.stop()
    if receiver is not None:  # first: once it stopped, nothing writes into reserved blocks
        await receiver.close()
    await service.shutdown()
    await server.server.stop(grace=5)
    if config.role == "prefill":
        await sender.close()
    if engine.is_running:
        logger.info("engine steps: %s", await engine.call(step_summary))
        if (allocator := await engine.call(EngineCore.allocator_summary)) is not None:
            logger.info("CUDA allocator: %s", allocator)
    await engine.aclose()
    logger.info("event loop lag: %s", loop_lag.stop())
    await registry.close()
    logger.info("%s worker %s stopped", config.role, worker_id)


async def start_engine(
    config: WorkerConfig,
) -> tuple[AsyncEngine, KVCaches | SharedKVCaches, dict[str, Any]]:
    """The worker's engine, started: on a thread of this process, or (--engine-process) in a child
    process; its KV cache (for the KV helper process) and what engine_info says of it."""
    if config.engine_process:
        process_engine = ProcessEngine(config.engine, LOG_FORMAT, config.threads)
        await process_engine.start_process()
        process_engine.on_lost = request_stop  # a worker without its engine drains and exits
        logger.info("engine core in process %s", process_engine.pid)
        await process_engine.call(track_cache_events)
        info = process_engine.info
        return process_engine, info["kv_caches"], info
    core = await asyncio.to_thread(EngineCore, config.engine)
    track_cache_events(core)
    engine = AsyncEngine(core)
    engine.start()
    return engine, core.kv_caches, engine_info(core)


def advertised_host(config: WorkerConfig) -> str:
    """Where others reach this worker: --advertise-host, else --host, except that a worker bound to every
    interface (0.0.0.0, ::) publishes its host name's address, which is the container's or pod's own
    address there (on a plain host that may be a loopback alias: set --advertise-host)."""
    if config.advertise_host:
        return config.advertise_host
    if config.host in ("0.0.0.0", "::", ""):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return config.host


def transfer_secret(config: WorkerConfig) -> TransferSecret | None:
    """The KV transfer secret (--kv-transfer-secret) for the worker's KV process, or None."""
    if config.kv_transfer_secret is None:
        return None
    return TransferSecret(config.kv_transfer_secret.get_secret_value())


def receiver_spec(
    config: WorkerConfig, attention_backend: str, layout: KVLayout, host: str, secret: TransferSecret | None
) -> ReceiverSpec:
    """The receiving process's settings; `host`: the address the worker publishes (advertised_host)."""
    return ReceiverSpec(
        layout=layout,
        host=config.host,
        port=config.transfer_port,
        advertise_host=host,
        attention_backend=attention_backend,
        log_format=LOG_FORMAT,
        log_level=logging.getLogger().getEffectiveLevel(),
        secret=secret,
    )


def sender_spec(
    config: WorkerConfig, attention_backend: str, layout: KVLayout, secret: TransferSecret | None
) -> SenderSpec:
    """The sending process's settings."""
    return SenderSpec(
        layout=layout,
        faults=config.kv_faults,
        max_pushes_per_address=config.max_pushes_per_receiver,
        connections_per_address=config.kv_connections_per_receiver,
        copy_buffer_nbytes=int(config.kv_copy_buffer_gib * (1 << 30)),
        attention_backend=attention_backend,
        log_format=LOG_FORMAT,
        log_level=logging.getLogger().getEffectiveLevel(),
        secret=secret,
    )
