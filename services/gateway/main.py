"""`baton gateway`: the OpenAI-compatible HTTP server (uvicorn), in front of a Router."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterator, Sequence

import uvicorn

from baton.services.gateway.app import create_app
from baton.services.lifecycle import wait_for_stop_signal
from baton.shared.config import GatewayConfig
from baton.shared.gc_pauses import freeze_startup_heap
from baton.shared.loop_lag import LoopLagMonitor

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The gateway handles SIGTERM / SIGINT itself (uvicorn would re-raise them after shutdown,
        so the process would not exit 0)."""
        yield


async def run_gateway(config: GatewayConfig, sockets: Sequence[socket.socket] | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C; then stop accepting connections, let requests in flight finish
    (up to config.drain_timeout_s; streams still open then are cut, which aborts them), and return.
    `sockets`: listening sockets to serve (one process of several); None binds config's host:port."""
    server = _Server(
        uvicorn.Config(
            create_app(config),
            host=config.host,
            port=config.port,
            log_config=None,  # the process's own logging setup
            access_log=False,
            timeout_graceful_shutdown=math.ceil(config.drain_timeout_s),
        )
    )
    freeze_startup_heap()
    loop_lag = LoopLagMonitor()
    loop_lag.start()
    serving = asyncio.create_task(server.serve(sockets=list(sockets) if sockets else None))
    stop = asyncio.create_task(wait_for_stop_signal())
    await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
    if stop.done():
        logger.info("%s received: draining", stop.result())
        server.should_exit = True
    else:
        stop.cancel()
    await serving
    logger.info("event loop lag: %s", loop_lag.stop())
