"""TLS of Baton's gRPC. A process's GrpcTlsConfig (paths) is read and checked once, at startup, into
GrpcTls (the PEM bytes), which makes its server's port and its channels: plaintext where TLS is off.

Checked before anything serves, so that a half-configured or broken setting is one clear error at
startup rather than a handshake failing later: every file is readable, the certificate chain and
its key are PEM and belong together (and the key is not encrypted), the CA bundle holds
certificates. The key is never logged: GrpcTls leaves it out of its repr."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from baton.shared.config import GrpcTlsConfig

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class GrpcTls:
    """The PEM material of a process's gRPC TLS (see GrpcTlsConfig for what each part does)."""

    certificate_chain: bytes | None
    private_key: bytes | None = field(repr=False)
    root_certificates: bytes | None
    client_auth: bool = False
    server_name: str | None = None

    @property
    def mode(self) -> str:
        """What the servers run, for logs: 'TLS' or 'mutual TLS'."""
        return "mutual TLS" if self.client_auth else "TLS"

    def server_credentials(self) -> grpc.ServerCredentials:
        """A server's credentials: its certificate, and under mutual TLS the CA clients must chain to."""
        if self.certificate_chain is None or self.private_key is None:
            raise ValueError("a gRPC server with TLS needs --grpc-tls-cert and --grpc-tls-key")
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.root_certificates if self.client_auth else None,
            require_client_auth=self.client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A client's credentials: the CA (None: gRPC's default roots), and its certificate if it has one."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel arguments TLS adds: the server name to check, where one is set."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def load(config: GrpcTlsConfig, server: bool = False) -> GrpcTls | None:
    """The material `config` names, read and checked; None when TLS is off. `server`: this process
    serves gRPC, so TLS needs its certificate. Raises ValueError naming the setting and file at fault."""
    if not config.enabled:
        return None
    if server and config.cert is None:
        raise ValueError(
            "gRPC TLS: a server needs its certificate and key (--grpc-tls-cert, --grpc-tls-key); "
            "only --grpc-tls-ca is set"
        )
    chain = key = None
    if config.cert is not None and config.key is not None:
        chain, key = _read(config.cert, "--grpc-tls-cert"), _read(config.key, "--grpc-tls-key")
        _check_pair(config.cert, chain, config.key, key)
    roots = None
    if config.ca is not None:
        roots = _read(config.ca, "--grpc-tls-ca")
        _check_ca(config.ca)
    return GrpcTls(chain, key, roots, config.client_auth, config.server_name)


def describe(tls: GrpcTls | None) -> str:
    """'plaintext', 'TLS' or 'mutual TLS' (servers' logs)."""
    return tls.mode if tls is not None else "plaintext"


def add_port(server: grpc.aio.Server, address: str, tls: GrpcTls | None) -> int:
    """Listen on `address` (TLS when `tls`); the bound port, 0 when it could not be bound."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def aio_channel(address: str, tls: GrpcTls | None, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """An asyncio channel to `address`, over TLS when `tls`."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=[*options, *tls.channel_options()]
    )


def sync_channel(address: str, tls: GrpcTls | None, options: ChannelOptions = ()) -> grpc.Channel:
    """A blocking channel to `address` (the CLI's), over TLS when `tls`."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.channel_credentials(), options=[*options, *tls.channel_options()])


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"gRPC TLS: {flag} {path}: cannot read it ({exc.strerror or exc})") from None


def _check_pair(cert: Path, chain_pem: bytes, key: Path, key_pem: bytes) -> None:
    """The chain and key are PEM, unencrypted, and the key is the certificate's."""
    if b"-----BEGIN CERTIFICATE-----" not in chain_pem:
        raise ValueError(f"gRPC TLS: --grpc-tls-cert {cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key_pem:
        raise ValueError(f"gRPC TLS: --grpc-tls-key {key} holds no PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise ValueError(
            f"gRPC TLS: --grpc-tls-key {key} is encrypted; give it unencrypted (a mounted secret)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"gRPC TLS: --grpc-tls-key {key} is not the private key of --grpc-tls-cert {cert}"
            ) from None
        raise ValueError(
            f"gRPC TLS: --grpc-tls-cert {cert} and --grpc-tls-key {key} are not a PEM certificate "
            f"chain and its PEM private key ({exc.reason or exc})"
        ) from None


def _check_ca(ca: Path) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ValueError(
            f"gRPC TLS: --grpc-tls-ca {ca} holds no PEM CA certificate ({exc.reason or exc})"
        ) from None


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> str:
    """Called by ssl only for an encrypted key: Baton takes none (no password setting to keep secret)."""
    raise _EncryptedKey
