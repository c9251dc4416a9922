"""What the tests of the workers' KV processes (receiving and sending) share: the KV layout, a
runner that stops UCX after each test, and the check that a child dies with its worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from baton.shared.transfer import KVLayout, stop_ucx

T = TypeVar("T")
LAYOUT = KVLayout(model_id="tiny@1", num_layers=3, block_size=4, num_kv_heads=2, head_dim=16, dtype="float32")
NUM_CACHE_BLOCKS = 32


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 90) -> T:
    async def main() -> T:
        try:
            return await asyncio.wait_for(coro, timeout=timeout_s)
        finally:
            stop_ucx()

    return asyncio.run(main())


def assert_child_dies_with_its_worker(tmp_path: Path, worker_script: str, what: str) -> None:
    """Run `worker_script` (it prints its child's pid, then waits), kill -9 it, and check the child
    is gone within 10 s."""
    script = tmp_path / "worker.py"
    script.write_text(worker_script)
    worker = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, cwd=tmp_path, text=True, start_new_session=True
    )
    try:
        assert worker.stdout is not None
        lines = iter(worker.stdout.readline, "")
        child = int(next(line for line in lines if line.strip().isdigit()))  # UCX may warn on stdout
        os.kill(child, 0)  # running
        worker.kill()
        worker.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(child, signal.SIGKILL)
        raise AssertionError(f"the {what} process outlived its worker by 10 s")
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the worker's process group
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
