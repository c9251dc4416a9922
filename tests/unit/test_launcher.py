"""`baton serve`'s launcher: how GPUs are dealt to engine processes."""

from __future__ import annotations

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
