"""`baton serve`'s launcher: how GPUs are dealt to engine processes, what each process is told."""

from __future__ import annotations

import subprocess
import sys

import pytest

from baton.services.cli import _parse_gpus
from baton.services.launcher import ClusterSpec, LocalCluster


def test_gpus_are_dealt_round_robin_decode_workers_first() -> None:
    cluster = LocalCluster(ClusterSpec(model="m", num_prefill=2, num_decode=1, gpus=["0", "1"]))
    # engine processes in start order: decode-0, prefill-0, prefill-1
    assert [cluster._gpu_env(i) for i in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
        {"CUDA_VISIBLE_DEVICES": "0"},
    ]
    assert LocalCluster(ClusterSpec(model="m"))._gpu_env(0) == {}


def test_gpus_flag_parsing() -> None:
    assert _parse_gpus("0, 1") == ["0", "1"] and _parse_gpus("") == []
    with pytest.raises(ValueError, match="--gpus takes GPU indices"):
        _parse_gpus("cuda:0")


def test_request_lines_are_logged_only_when_asked_for() -> None:
    cluster = LocalCluster(ClusterSpec(model="m", log_requests=True))
    assert "--log-requests" in cluster._gateway_argv(0) and "--log-requests" in cluster._common_argv()
    assert "--log-requests" not in LocalCluster(ClusterSpec(model="m"))._common_argv()

    script = (
        "import logging, sys\n"
        "from baton.services.lifecycle import request_logger, setup_logging\n"
        "setup_logging('INFO', sys.argv[1] == 'on')\n"
        "request_logger('baton.services.router.service').info('request r1: admitted')\n"
        "logging.getLogger('baton.services.router.service').info('router ready')\n"
    )
    for mode, shown in (("on", True), ("off", False)):
        run = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        assert "router ready" in run.stderr
        assert ("baton.requests.router.service: request r1: admitted" in run.stderr) is shown, run.stderr
