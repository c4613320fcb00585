"""TLS material for the listeners and the channels, reloadable without restart.

The listeners use grpcio's dynamic server credentials: every new handshake asks
`ServerTls` for the newest certificate, key and client CA roots, so a rotated
certificate is served from the next connection on while open connections carry
on. Outbound channels (to peer gateways and backends) are rebuilt on rotation:
new calls take the new channels, calls in flight finish on the old ones, which
are closed once those finish (bounded by a grace period).

Owns: loading key pairs (checking that the key matches the certificate), the
server credentials, and the pools of outbound channels.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.errors import ConfigError

__all__ = ["ChannelPool", "KeyPair", "ServerTls", "channel_options"]

log = logging.getLogger("psngw.tls")


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM, checked to match."""

    cert_pem: bytes
    key_pem: bytes
    certificate: x509.Certificate
    cert_path: Path
    key_path: Path

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate's DER, hex."""
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> KeyPair:
        """Read both files; `ConfigError` naming the file if either is bad or they do not match."""
        cert_pem = _read(cert_path)
        key_pem = _read(key_path)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise ConfigError(f"not a PEM certificate: {exc}", file=cert_path) from exc
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"not an unencrypted PEM private key: {exc}", file=key_path) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
            raise ConfigError(f"unsupported key type {type(key).__name__}", file=key_path)
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
            raise ConfigError(f"private key does not match certificate {cert_path}", file=key_path)
        return cls(cert_pem, key_pem, cert, cert_path, key_path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=path) from exc


class ServerTls:
    """Dynamic server credentials for one listener: new handshakes see new material."""

    def __init__(self, keypair: KeyPair, client_roots_pem: bytes) -> None:
        self._lock = threading.Lock()
        self._config = self._make(keypair, client_roots_pem)
        self._fresh = False
        self.keypair = keypair

    @staticmethod
    def _make(keypair: KeyPair, roots: bytes) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(keypair.key_pem, keypair.cert_pem)], roots)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require and verify a client certificate."""
        return grpc.dynamic_ssl_server_credentials(
            self._config,
            self._fetch,  # type: ignore[arg-type]  # grpc accepts None ("no change"); the stub says otherwise
            require_client_authentication=True,
        )

    def update(self, keypair: KeyPair, client_roots_pem: bytes) -> None:
        """Serve `keypair` and trust `client_roots_pem` from the next handshake on."""
        config = self._make(keypair, client_roots_pem)
        with self._lock:
            self._config = config
            self._fresh = True
            self.keypair = keypair

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc core on every handshake: return new material once.
        with self._lock:
            if not self._fresh:
                return None
            self._fresh = False
            return self._config


def channel_options(*, server_name: str, max_message_bytes: int, pool_index: int = 0) -> list[tuple[str, str | int]]:
    """Options for an outbound channel.

    Each channel of a pool uses its own subchannel pool, so that grpcio does not
    share one connection between them (calls spread over connections, and so
    over a peer's worker processes).
    """
    return [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.use_local_subchannel_pool", 1),
        ("psn.pool_index", pool_index),
        ("grpc.keepalive_time_ms", 10_000),  # a silent partition is noticed within ~15 s
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
        # A peer or backend that comes back is reconnected to within a second or two, not minutes.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


@dataclass(frozen=True)
class _Target:
    address: str
    server_name: str
    roots_pem: bytes


class ChannelPool:
    """Outbound mTLS channels by name (a peer force or a backend application).

    Each target gets `size` channels used in turn. `rebuild` swaps in new
    channels (new key pair, new roots) and closes the old ones after `grace`
    seconds, so calls in flight are not broken.
    """

    def __init__(self, keypair: KeyPair, *, max_message_bytes: int, size: int = 1, grace: float = 30.0) -> None:
        self._keypair = keypair
        self._max = max_message_bytes
        self._size = size
        self._grace = grace
        self._targets: dict[str, _Target] = {}
        self._channels: dict[str, Sequence[grpc.aio.Channel]] = {}
        self._turn: dict[str, itertools.cycle[int]] = {}
        self._retired: set[asyncio.Task[None]] = set()

    @property
    def max_message_bytes(self) -> int:
        """The largest message the pool's channels send or take."""
        return self._max

    def set_targets(self, targets: Mapping[str, tuple[str, str, bytes]]) -> None:
        """Set (address, server name, CA roots PEM) per target name; changed targets get new channels."""
        wanted = {name: _Target(*t) for name, t in targets.items()}
        for name in list(self._targets):
            if wanted.get(name) != self._targets[name]:
                self._retire(name)
        self._targets = wanted

    def rebuild(self, keypair: KeyPair) -> None:
        """Use a new client key pair: every target gets new channels."""
        self._keypair = keypair
        for name in list(self._channels):
            self._retire(name)

    def channel(self, name: str) -> grpc.aio.Channel:
        """The next channel to `name` (KeyError if unknown)."""
        channels = self._channels.get(name)
        if channels is None:
            target = self._targets[name]
            creds = grpc.ssl_channel_credentials(target.roots_pem, self._keypair.key_pem, self._keypair.cert_pem)
            channels = tuple(
                grpc.aio.secure_channel(
                    target.address,
                    creds,
                    options=channel_options(server_name=target.server_name, max_message_bytes=self._max, pool_index=i),
                )
                for i in range(self._size)
            )
            self._channels[name] = channels
            self._turn[name] = itertools.cycle(range(self._size))
        return channels[next(self._turn[name])]

    def _retire(self, name: str) -> None:
        channels = self._channels.pop(name, ())
        self._turn.pop(name, None)
        if not channels:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._close_later(channels))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _close_later(self, channels: Sequence[grpc.aio.Channel]) -> None:
        # New calls already use the new channels; calls in flight get `grace` to finish.
        await asyncio.gather(*(ch.close(grace=self._grace) for ch in channels))

    async def close(self) -> None:
        """Close every channel now."""
        for task in list(self._retired):
            task.cancel()
        for channels in self._channels.values():
            for ch in channels:
                await ch.close(grace=None)
        self._channels.clear()
