"""Process lifecycle shared by the services: logging setup and waiting for SIGTERM / Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REQUEST_LOGGER = "baton.requests"


def request_logger(module: str) -> logging.Logger:
    """Where a service logs each request's lifecycle (admitted, placed, prefilled, ended, aborted): a
    child of `baton.requests`, shown only with --log-requests. A burst of 256 requests writes some
    two thousand such lines across the services, which took ~6 % of the served anchor's time."""
    return logging.getLogger(f"{REQUEST_LOGGER}.{module.removeprefix('baton.services.')}")


def setup_logging(level: str = "INFO", log_requests: bool = False) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=LOG_FORMAT,
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger(REQUEST_LOGGER).setLevel(logging.NOTSET if log_requests else logging.WARNING)


async def wait_for_stop_signal() -> str:
    """Return the name of the first SIGTERM or SIGINT this process receives."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not stopped.done():
            stopped.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await stopped
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def terminate_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: this process gets `sig` when its parent (the thread that started it) dies, so a killed
    supervisor leaves no orphans (call it first thing in the child)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, sig)


def request_stop() -> None:
    """Stop this process the way SIGTERM does (drain, then exit)."""
    os.kill(os.getpid(), signal.SIGTERM)
