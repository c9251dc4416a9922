"""TLS of Baton's gRPC on a real server (`start_server`, as the router and the workers serve) and real
channels: who gets in with TLS and with mutual TLS, `baton probe` over it, and settings that do not fit
together, or files that are not what they should be, as one clear error before anything starts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_certs import SERVER_NAME, Pki

from baton.services import probe
from baton.services.cli import main
from baton.services.launcher import ClusterSpec, LocalCluster
from baton.shared import grpc_tls
from baton.shared.config import GrpcTlsConfig
from baton.shared.grpc_server import open_channel, start_server
from baton.shared.grpc_tls import GrpcTls

REFUSED = "refused"


def server_tls(pki: Pki, client_auth: bool = False) -> GrpcTls:
    tls = grpc_tls.load(GrpcTlsConfig(cert=pki.cert, key=pki.key, ca=pki.ca, client_auth=client_auth), True)
    assert tls is not None
    return tls


def client_tls(
    ca: Path, cert: Path | None = None, key: Path | None = None, name: str | None = None
) -> GrpcTls:
    tls = grpc_tls.load(GrpcTlsConfig(ca=ca, cert=cert, key=key, server_name=name))
    assert tls is not None
    return tls


@asynccontextmanager
async def serving(tls: GrpcTls | None) -> AsyncIterator[int]:
    """A Baton gRPC server (health only) on a free loopback port: the port."""
    server = await start_server([], "127.0.0.1", 0, tls)
    try:
        yield server.port
    finally:
        await server.server.stop(0)


async def health(address: str, tls: GrpcTls | None) -> str:
    """The server's health status name, or REFUSED when the call could not get through."""
    async with open_channel(address, tls) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
            return REFUSED
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_tls_server_admits_clients_of_its_ca_only(pki: Pki) -> None:
    async def run() -> None:
        async with serving(server_tls(pki)) as port:
            address = f"127.0.0.1:{port}"
            assert await health(address, client_tls(pki.ca)) == "SERVING"
            assert await health(f"localhost:{port}", client_tls(pki.ca)) == "SERVING"
            # dialled at an address its certificate does not name (a worker's pod IP): the server name
            assert await health(address, client_tls(pki.ca, name=SERVER_NAME)) == "SERVING"
            assert await health(address, client_tls(pki.ca, name="someone-else")) == REFUSED
            assert await health(address, None) == REFUSED  # plaintext
            assert await health(address, client_tls(pki.other_ca)) == REFUSED
            # without mutual TLS, a client certificate is neither asked for nor in the way
            assert await health(address, client_tls(pki.ca, pki.other_cert, pki.other_key)) == "SERVING"

    asyncio.run(run())


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(pki: Pki) -> None:
    async def run() -> None:
        async with serving(server_tls(pki, client_auth=True)) as port:
            address = f"127.0.0.1:{port}"
            assert await health(address, client_tls(pki.ca, pki.cert, pki.key)) == "SERVING"
            assert await health(address, client_tls(pki.ca)) == REFUSED  # no certificate
            assert await health(address, client_tls(pki.ca, pki.other_cert, pki.other_key)) == REFUSED
            assert await health(address, None) == REFUSED

    asyncio.run(run())


def test_a_plaintext_server_refuses_tls_clients(pki: Pki) -> None:
    async def run() -> None:
        async with serving(None) as port:
            assert await health(f"127.0.0.1:{port}", None) == "SERVING"
            assert await health(f"127.0.0.1:{port}", client_tls(pki.ca)) == REFUSED

    asyncio.run(run())


def test_baton_probe_speaks_tls_from_flags_and_from_the_environment(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def run() -> None:
        async with serving(server_tls(pki, client_auth=True)) as port:
            address = f"127.0.0.1:{port}"
            flags = ["--grpc-tls-ca", str(pki.ca), "--grpc-tls-cert", str(pki.cert)]
            flags += ["--grpc-tls-key", str(pki.key)]
            assert await asyncio.to_thread(main, ["probe", address, *flags]) == 0
            assert await asyncio.to_thread(main, ["probe", address]) == 1  # plaintext
            assert "UNAVAILABLE" in capsys.readouterr().err
            assert await asyncio.to_thread(probe.probe, address, "", 2.0, client_tls(pki.ca)) is not None
            # as compose's health checks and the k8s exec probes run it: the settings in BATON_GRPC_TLS_*
            for name, value in (("CA", pki.ca), ("CERT", pki.cert), ("KEY", pki.key)):
                monkeypatch.setenv(f"BATON_GRPC_TLS_{name}", str(value))
            monkeypatch.setenv("BATON_GRPC_TLS_SERVER_NAME", SERVER_NAME)
            assert await asyncio.to_thread(main, ["probe", address]) == 0

    asyncio.run(run())


def test_baton_probe_loads_no_engine() -> None:
    """With TLS, Kubernetes runs `baton probe` as the router's and workers' exec probes (its own gRPC
    probe speaks plaintext only): every few seconds, so it must not import torch."""
    script = (
        "import sys\n"
        "from baton.services.cli import main\n"
        "assert main(['probe', '127.0.0.1:1', '--timeout-s', '0.1']) == 1\n"
        "assert 'torch' not in sys.modules, 'baton probe imported torch'\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


# -- settings that cannot work are refused at startup, naming the problem --------------------------------


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"cert": "tls.crt"}, "--grpc-tls-cert is set but not its private key, --grpc-tls-key"),
        ({"key": "tls.key"}, "--grpc-tls-key is set but not its certificate, --grpc-tls-cert"),
        ({"cert": "c", "key": "k", "client_auth": True}, "--grpc-tls-client-auth needs --grpc-tls-ca"),
        ({"ca": "ca.crt", "client_auth": True}, "--grpc-tls-client-auth needs --grpc-tls-ca"),
        ({"server_name": "baton"}, "--grpc-tls-server-name is set but TLS is off"),
    ],
)
def test_settings_that_do_not_fit_together_are_refused(settings: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        GrpcTlsConfig(**settings)  # type: ignore[arg-type]


def test_files_that_are_missing_or_wrong_are_named(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    missing = tmp_path / "missing.pem"
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(_encrypted(pki.key))
    cases = [
        ({"cert": pki.cert, "key": missing}, f"--grpc-tls-key {missing}: cannot read it \\(No such file"),
        ({"cert": tmp_path, "key": pki.key}, f"--grpc-tls-cert {tmp_path}: cannot read it \\(Is a directory"),
        ({"cert": not_pem, "key": pki.key}, f"--grpc-tls-cert {not_pem} holds no PEM certificate"),
        ({"cert": pki.cert, "key": pki.cert}, f"--grpc-tls-key {pki.cert} holds no PEM private key"),
        ({"cert": pki.cert, "key": pki.other_key}, "is not the private key of --grpc-tls-cert"),
        ({"cert": pki.cert, "key": encrypted}, f"--grpc-tls-key {encrypted} is encrypted"),
        ({"ca": not_pem}, f"--grpc-tls-ca {not_pem} holds no PEM CA certificate"),
        ({"ca": pki.key}, "holds no PEM CA certificate"),
    ]
    for settings, complaint in cases:
        with pytest.raises(ValueError, match=complaint):
            grpc_tls.load(GrpcTlsConfig(**settings))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a server needs its certificate and key"):
        grpc_tls.load(GrpcTlsConfig(ca=pki.ca), server=True)
    assert grpc_tls.load(GrpcTlsConfig()) is None and grpc_tls.load(GrpcTlsConfig(), server=True) is None


def test_the_key_stays_out_of_reprs_and_command_lines(pki: Pki) -> None:
    key_pem = pki.key.read_text().splitlines()[1]  # a line of the key's base64
    tls = server_tls(pki, client_auth=True)
    assert key_pem not in repr(tls)
    spec = ClusterSpec(
        model="m", grpc_tls=GrpcTlsConfig(cert=pki.cert, key=pki.key, ca=pki.ca, client_auth=True)
    )
    cluster = LocalCluster(spec)
    worker, gateway = cluster._worker_argv("decode-0"), cluster._gateway_argv(8000)
    for argv in (worker, cluster._router_argv(50051), gateway):
        assert key_pem not in " ".join(argv)
        assert argv[argv.index("--grpc-tls-key") + 1] == str(pki.key.resolve())
        assert argv[argv.index("--grpc-tls-ca") + 1] == str(pki.ca.resolve())
    assert "--grpc-tls-client-auth" in worker and "--grpc-tls-client-auth" not in gateway  # a client
    assert "--grpc-tls-cert" not in LocalCluster(ClusterSpec(model="m"))._worker_argv("decode-0")


def test_commands_refuse_bad_settings_before_starting(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--model", str(tmp_path)]  # never loaded: the settings fail first
    runs = {
        "router": (["router", *model, "--grpc-tls-cert", str(pki.cert)], "not its private key"),
        "serve": (["serve", *model, "--grpc-tls-ca", str(pki.ca)], "a server needs its certificate"),
        "gateway": (["gateway", *model, "--grpc-tls-ca", str(tmp_path / "no.pem")], "cannot read it"),
        "complete": (["complete", "hi", "--grpc-tls-server-name", "x"], "TLS is off"),
    }
    for command, (argv, complaint) in runs.items():
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("baton: error: gRPC TLS: ") and complaint in err, (command, err)
        assert err.count("\n") == 1, err  # one line, no traceback


def test_a_worker_with_a_wrong_key_in_its_environment_exits_with_one_line(pki: Pki, tmp_path: Path) -> None:
    """As a container gets its settings: the error names the files, and comes before the model loads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
    env |= {"BATON_GRPC_TLS_CERT": str(pki.cert), "BATON_GRPC_TLS_KEY": str(pki.other_key)}
    env |= {"BATON_GRPC_TLS_CA": str(pki.ca), "BATON_GRPC_TLS_CLIENT_AUTH": "true"}
    argv = [sys.executable, "-m", "baton.services.cli", "decode", "--model", str(tmp_path / "no-model")]
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        f"baton: error: gRPC TLS: --grpc-tls-key {pki.other_key} is not the private key of "
        f"--grpc-tls-cert {pki.cert}\n"
    )


def _encrypted(key: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    encryption = serialization.BestAvailableEncryption(b"passphrase")
    return loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
