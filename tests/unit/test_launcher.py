"""`baton serve`'s launcher: how GPUs are dealt to engine processes, what each process is told."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from baton.services.cli import (
    SHARED_GPU_BURST_STEP_INTERVAL_MS,
    _burst_step_interval_ms,
    _engine_argv,
    _engine_config,
    _gateway_argv,
    _parse_gpus,
    build_parser,
    main,
)
from baton.services.launcher import ClusterSpec, LocalCluster
from baton.shared.config import EngineConfig, GatewayConfig, WorkerConfig


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


def test_gateway_processes_reach_the_gateway_and_split_the_in_flight_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["serve", "--gateway-processes", "3", "--max-pending-requests", "10", "--max-body-bytes", "4096"]
    args = build_parser().parse_args(argv)
    passed = ["--max-pending-requests", "10", "--gateway-processes", "3", "--max-body-bytes", "4096"]
    assert _gateway_argv(args) == passed
    assert GatewayConfig(model="m", max_pending_requests=10, processes=3).max_pending_per_process == 4
    assert GatewayConfig(model="m", max_pending_requests=512).max_pending_per_process == 512
    assert main(["serve", "--gateway-processes", "0"]) == 2  # a clear message, nothing started
    assert "processes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], SHARED_GPU_BURST_STEP_INTERVAL_MS),  # every process sees every GPU: they share one
        (["--gpus", "0"], SHARED_GPU_BURST_STEP_INTERVAL_MS),
        (["--gpus", "0,1"], 0.0),  # decode on GPU 0, prefill on GPU 1
        (["--gpus", "0,1", "--decode-workers", "2"], SHARED_GPU_BURST_STEP_INTERVAL_MS),  # prefill-0 on 0
        (["--prefill-workers", "0"], 0.0),  # colocated replicas push no KV
        (["--burst-step-interval-ms", "0"], 0.0),
        (["--gpus", "0,1", "--burst-step-interval-ms", "7"], 7.0),
    ],
)
def test_serve_paces_decode_bursts_where_a_prefill_worker_shares_its_gpu(
    argv: list[str], expected: float
) -> None:
    args = build_parser().parse_args(["serve", *argv])
    assert _burst_step_interval_ms(args, _parse_gpus(args.gpus)) == expected


def test_every_engine_flag_given_to_serve_reaches_the_workers_engines() -> None:
    engine = ["--dtype", "float32", "--device", "cpu", "--block-size", "32", "--num-kv-blocks", "77"]
    engine += ["--max-num-batched-tokens", "999", "--max-num-seqs", "9", "--max-model-len", "640"]
    engine += ["--gpu-memory-utilization", "0.5", "--seed", "3", "--cpu-kv-cache-gib", "0.25"]
    engine += ["--attention-backend", "torch", "--load-format", "dummy", "--no-prefix-caching"]
    engine += ["--enforce-eager", "--no-async-scheduling", "--stream-interval", "4"]
    served = _engine_config(build_parser().parse_args(["serve", *engine]))
    passed_on = _engine_argv(build_parser().parse_args(["serve", *engine]))
    worker = _engine_config(build_parser().parse_args(["decode", *passed_on]))
    assert worker == served
    assert not served.async_scheduling and served.enforce_eager and not served.enable_prefix_caching


def test_a_worker_bound_to_every_interface_advertises_its_own_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    from baton.services.worker_main import advertised_host
    from baton.shared.config import EngineConfig, WorkerConfig

    def worker(host: str, advertise: str | None = None) -> WorkerConfig:
        return WorkerConfig(
            role="decode", engine=EngineConfig(model="m"), host=host, advertise_host=advertise
        )

    monkeypatch.setattr(socket, "gethostname", lambda: "pod-7")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: {"pod-7": "10.1.2.3"}[name])
    assert advertised_host(worker("0.0.0.0")) == "10.1.2.3"  # a container's or pod's own address
    assert advertised_host(worker("::")) == "10.1.2.3"
    assert advertised_host(worker("0.0.0.0", "decode-0.baton")) == "decode-0.baton"  # told: as told
    assert advertised_host(worker("127.0.0.1")) == "127.0.0.1"  # bound to one interface: that one


def test_only_the_workers_get_the_kv_transfer_secret_and_only_in_their_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "kv-secret-for-the-launcher-test"
    cluster = LocalCluster(ClusterSpec(model="m", kv_transfer_secret=secret))
    assert secret not in repr(cluster.spec)
    for name in ("prefill-0", "decode-1"):
        assert cluster._environment(name, {})["BATON_KV_TRANSFER_SECRET"] == secret
        assert secret not in cluster._worker_argv(name)
    for name in ("router", "gateway"):
        assert "BATON_KV_TRANSFER_SECRET" not in cluster._environment(name, {})
    with pytest.raises(ValueError, match="at least 16 characters, got 6") as short:
        LocalCluster(ClusterSpec(model="m", kv_transfer_secret="hunter"))
    assert "hunter" not in str(short.value)

    started: list[ClusterSpec] = []
    monkeypatch.setattr("baton.services.launcher.serve_forever", lambda spec: started.append(spec) or 0)
    assert main(["serve", "--model", "m"]) == 0  # none given: a random one for this cluster
    monkeypatch.setenv("BATON_KV_TRANSFER_SECRET", secret)
    assert main(["serve", "--model", "m"]) == 0
    made_up, given = (spec.kv_transfer_secret or "" for spec in started)
    assert len(made_up) == 64 and int(made_up, 16) >= 0 and given == secret
    monkeypatch.setenv("BATON_KV_TRANSFER_SECRET", "hunter")
    assert main(["decode", "--model", "m"]) == 2  # a clear message before anything loads
    error = capsys.readouterr().err
    assert "kv_transfer_secret" in error and "at least 16 characters" in error and "hunter" not in error


def test_router_replicas_reach_the_gateway_and_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    cluster = LocalCluster(ClusterSpec(model="m", num_routers=2))
    cluster.router_addresses = {"router": "127.0.0.1:50051", "router-1": "127.0.0.1:50052"}
    argv = cluster._gateway_argv(0)
    assert argv[argv.index("--router") + 1] == "127.0.0.1:50051,127.0.0.1:50052"
    config = GatewayConfig(model="m", router="127.0.0.1:50051, 127.0.0.1:50052")
    assert config.router_addresses == ["127.0.0.1:50051", "127.0.0.1:50052"]
    with pytest.raises(ValueError, match="comma-separated"):
        GatewayConfig(model="m", router="127.0.0.1:50051,,127.0.0.1:50052")
    with pytest.raises(ValueError, match="only one when colocated"):
        LocalCluster(ClusterSpec(model="m", colocated=True, num_decode=0, num_routers=2))
    assert main(["serve", "--routers", "0"]) == 2  # a clear message, nothing started
    assert "router" in capsys.readouterr().err


def test_the_engine_process_flag_reaches_decode_workers_only() -> None:
    cluster = LocalCluster(ClusterSpec(model="m", decode_args=["--engine-process"]))
    assert "--engine-process" in cluster._worker_argv("decode-0")
    assert "--engine-process" not in cluster._worker_argv("prefill-0")
    assert build_parser().parse_args(["serve", "--engine-process"]).engine_process
    assert build_parser().parse_args(["decode", "--engine-process"]).engine_process
    with pytest.raises(SystemExit):  # a prefill worker's engine shares its process (the KV sender)
        build_parser().parse_args(["prefill", "--engine-process"])
    engine = EngineConfig(model="m")
    assert WorkerConfig(role="decode", engine=engine, engine_process=True).engine_process
    with pytest.raises(ValidationError, match="decode workers only"):
        WorkerConfig(role="prefill", engine=engine, engine_process=True)
