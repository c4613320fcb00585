"""The configuration of one gateway: one TOML file per force.

Example (paths are relative to the file)::

    force = "thames-valley"
    directory = "directory.toml"

    [listeners]
    local = "127.0.0.1:7401"     # this force's applications (mTLS + officer token)
    peer = "127.0.0.1:7441"      # other forces' gateways (mTLS, signed envelopes)
    relay = "127.0.0.1:7451"     # optional: relay links from other forces' gateways (TLS 1.3, no gRPC)
    admin = "127.0.0.1:9401"     # metrics and health, plaintext: keep it on loopback

    [tls]                        # the gateway's TLS certificate (server and client)
    cert = "pki/thames-valley/gateway-tls.pem"
    key = "pki/thames-valley/gateway-tls.key"

    [backends.intel-search]      # each application this force hosts
    address = "127.0.0.1:9001"

Owns: parsing and validating that file into a frozen `GatewayConfig`, with
file:line:field in every error. Sections that belong to a subsystem (tokens,
purpose, signing, policy, audit) are parsed by that subsystem's
`from_section`. The files the config and the directory name are loaded later,
when the gateway starts (or by ``psngw serve --check``); `GatewayConfig.provenance`
says which setting named each, for their errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from gateway.admin import NOT_LOOPBACK, is_loopback_address
from gateway.audit.store import AuditConfig
from gateway.directory import NAME_PATTERN, NetworkDirectory, load_directory
from gateway.errors import ConfigError
from gateway.policy.live import PolicyConfig
from gateway.purpose import PurposeConfig
from gateway.ratelimit import RateLimitConfig
from gateway.token import TokenConfig
from gateway.tomlconf import Provenance, Section, TomlFile

__all__ = [
    "BackendConfig",
    "GatewayConfig",
    "LimitsConfig",
    "ListenersConfig",
    "RevocationConfig",
    "SigningConfig",
    "TlsConfig",
    "load_config",
]


@dataclass(frozen=True)
class ListenersConfig:
    """Where the gateway listens."""

    local: str
    peer: str
    #: metrics and health, plaintext: loopback only (`gateway.admin`)
    admin: str | None
    #: relay links (`gateway.relaylink`); required when the directory gives this force a `relay_address`
    relay: str | None = None

    @classmethod
    def from_section(cls, sec: Section, *, relay_required: bool = False) -> ListenersConfig:
        """Parse the `[listeners]` table."""
        out = cls(sec.address("local"), sec.address("peer"), sec.address("admin", None), sec.address("relay", None))
        if out.local == out.peer:
            sec.fail("peer", "local and peer listeners must differ")
        if out.admin is not None and not is_loopback_address(out.admin):
            sec.fail("admin", f"{out.admin!r} {NOT_LOOPBACK}")
        if out.relay is not None and out.relay in (out.local, out.peer, out.admin):
            sec.fail("relay", "the relay listener must have an address of its own")
        if relay_required and out.relay is None:
            sec.fail("relay", "the network directory gives this force a relay_address: say where to listen for it")
        sec.finish()
        return out


@dataclass(frozen=True)
class TlsConfig:
    """A certificate and its private key, as files."""

    cert: Path
    key: Path

    @classmethod
    def from_section(cls, sec: Section) -> TlsConfig:
        """Parse a table with `cert` and `key` paths."""
        out = cls(sec.file_path("cert"), sec.file_path("key"))
        sec.finish()
        return out


@dataclass(frozen=True)
class SigningConfig:
    """The gateway's signing key (separate from its TLS key) and the envelope rules."""

    cert: Path
    key: Path
    window: float = 30.0
    replay_capacity: int = 200_000
    #: the replay store shared by worker processes (``--workers N``); default beside the audit log
    replay_db: Path | None = None

    @classmethod
    def from_section(cls, sec: Section) -> SigningConfig:
        """Parse the `[signing]` table."""
        d = cls(Path(), Path())
        out = cls(
            cert=sec.file_path("cert"),
            key=sec.file_path("key"),
            window=sec.number("window_seconds", d.window, minimum=1, maximum=3600),
            replay_capacity=sec.integer("replay_capacity", d.replay_capacity, minimum=1000, maximum=10_000_000),
            replay_db=sec.file_path("replay_db", None),
        )
        sec.finish()
        return out


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what a call may ask of the gateway."""

    max_message_bytes: int = 4 * 1024 * 1024
    default_deadline: float = 30.0
    max_deadline: float = 300.0
    max_metadata_entries: int = 64
    max_metadata_bytes: int = 16 * 1024
    #: what is forwarded to a backend: under grpc's default 8 KiB, with room for the psn-gw-* headers
    max_forwarded_metadata_bytes: int = 6 * 1024
    peer_channels: int = 2
    #: unary relay calls go over long-lived `Relay/Mux` streams (one per peer channel), not an RPC each
    relay_channels: bool = True
    #: while `relay_batch_siblings` calls wait on a relay channel, hold new requests this long for company
    relay_batch_delay: float = 0.003
    relay_batch_siblings: int = 8
    backend_connect_timeout: float = 2.0
    shutdown_grace: float = 10.0
    max_concurrent_calls: int = 1000
    #: connections each gRPC listener holds at once, those still in their TLS handshake included
    max_connections: int = 256
    peer_failures: int = 5
    peer_cooldown: float = 5.0

    @classmethod
    def from_section(cls, sec: Section) -> LimitsConfig:
        """Parse the `[limits]` table; every bound has a safe default."""
        d = cls()
        out = cls(
            max_message_bytes=sec.integer("max_message_bytes", d.max_message_bytes, minimum=1024, maximum=64 << 20),
            default_deadline=sec.number("default_deadline_seconds", d.default_deadline, minimum=0.1, maximum=3600),
            max_deadline=sec.number("max_deadline_seconds", d.max_deadline, minimum=0.1, maximum=86400),
            max_metadata_entries=sec.integer("max_metadata_entries", d.max_metadata_entries, minimum=1, maximum=1024),
            max_metadata_bytes=sec.integer("max_metadata_bytes", d.max_metadata_bytes, minimum=256, maximum=1 << 20),
            max_forwarded_metadata_bytes=sec.integer(
                "max_forwarded_metadata_bytes", d.max_forwarded_metadata_bytes, minimum=0, maximum=1 << 20
            ),
            peer_channels=sec.integer("peer_channels", d.peer_channels, minimum=1, maximum=64),
            relay_channels=sec.flag("relay_channels", d.relay_channels),
            relay_batch_delay=sec.number("relay_batch_delay_seconds", d.relay_batch_delay, minimum=0, maximum=1),
            relay_batch_siblings=sec.integer("relay_batch_siblings", d.relay_batch_siblings, minimum=2, maximum=100000),
            backend_connect_timeout=sec.number(
                "backend_connect_timeout_seconds", d.backend_connect_timeout, minimum=0.05, maximum=60
            ),
            shutdown_grace=sec.number("shutdown_grace_seconds", d.shutdown_grace, minimum=0, maximum=600),
            max_concurrent_calls=sec.integer("max_concurrent_calls", d.max_concurrent_calls, minimum=1, maximum=100000),
            max_connections=sec.integer("max_connections", d.max_connections, minimum=1, maximum=65536),
            peer_failures=sec.integer("peer_failures", d.peer_failures, minimum=1, maximum=1000),
            peer_cooldown=sec.number("peer_cooldown_seconds", d.peer_cooldown, minimum=0.1, maximum=3600),
        )
        if out.default_deadline > out.max_deadline:
            sec.fail("default_deadline_seconds", "must not exceed max_deadline_seconds")
        sec.finish()
        return out


@dataclass(frozen=True)
class RevocationConfig:
    """How strictly CRLs are required."""

    crl_grace: float = 3600.0
    require_crl: bool = True
    expiry_warning_days: float = 14.0
    reload_interval: float = 2.0

    @classmethod
    def from_section(cls, sec: Section) -> RevocationConfig:
        """Parse the `[revocation]` table."""
        d = cls()
        out = cls(
            crl_grace=sec.number("crl_grace_seconds", d.crl_grace, minimum=0, maximum=7 * 86400),
            require_crl=sec.flag("require_crl", d.require_crl),
            expiry_warning_days=sec.number("expiry_warning_days", d.expiry_warning_days, minimum=0, maximum=365),
            reload_interval=sec.number("reload_interval_seconds", d.reload_interval, minimum=0.1, maximum=3600),
        )
        sec.finish()
        return out


@dataclass(frozen=True)
class BackendConfig:
    """How to reach one application this force hosts."""

    application: str
    address: str
    server_name: str

    @classmethod
    def from_section(cls, name: str, sec: Section, default_server_name: str) -> BackendConfig:
        """Parse one `[backends.<application>]` table."""
        out = cls(name, sec.address("address"), sec.text("server_name", default_server_name))
        sec.finish()
        return out


@dataclass(frozen=True)
class GatewayConfig:
    """Everything one gateway needs to start."""

    path: Path
    force: str
    directory_path: Path
    directory: NetworkDirectory
    listeners: ListenersConfig
    tls: TlsConfig
    signing: SigningConfig
    tokens: TokenConfig
    purpose: PurposeConfig
    audit: AuditConfig
    policy: PolicyConfig
    rate_limits: RateLimitConfig
    log_signing: TlsConfig
    witness_db: Path
    limits: LimitsConfig
    revocation: RevocationConfig
    backends: Mapping[str, BackendConfig]
    #: which setting (here or in the directory) named each file: errors about a file are put there
    provenance: Provenance = field(default_factory=Provenance, repr=False, compare=False)

    @property
    def trust_domain(self) -> str:
        """The trust domain of the force this gateway serves."""
        return self.directory.forces[self.force].trust_domain

    @property
    def gateway_id(self) -> str:
        """The SPIFFE ID of the gateway."""
        return self.directory.forces[self.force].gateway_spiffe_id


def _witness_db(sec: Section) -> Path:
    path: Path = sec.file_path("db")
    sec.finish()
    return path


def load_config(path: Path | str) -> GatewayConfig:
    """Read and validate a gateway config file and the directory it names."""
    file = TomlFile.load(path)
    root = file.root()
    force = root.text("force", pattern=NAME_PATTERN)
    directory_path = root.file_path("directory", must_exist=True)
    with Provenance(file).locating():
        directory = load_directory(directory_path)
    if force not in directory.forces:
        root.fail("force", f"force {force!r} is not in the network directory {directory_path}")
    trust_domain = directory.forces[force].trust_domain

    backends: dict[str, BackendConfig] = {}
    backends_sec = root.table("backends")
    for name, sec in backends_sec.tables():
        app = directory.applications.get(name)
        if app is None:
            backends_sec.fail(name, "no such application in the network directory")
        if app.host != force:
            backends_sec.fail(name, f"application {name!r} is hosted by {app.host}, not by {force}")
        backends[name] = BackendConfig.from_section(name, sec, f"{name}.{trust_domain}")
    for app in directory.applications.values():
        if app.host == force and app.name not in backends:
            raise ConfigError(
                f"this force hosts application {app.name!r} but no [backends.{app.name}] says where it runs",
                file=file.path,
                line=file.line_of(("backends",)),
                field="backends",
            )

    config = GatewayConfig(
        path=file.path,
        force=force,
        directory_path=directory_path,
        directory=directory,
        listeners=ListenersConfig.from_section(
            root.table("listeners", required=True), relay_required=directory.forces[force].relay_address is not None
        ),
        tls=TlsConfig.from_section(root.table("tls", required=True)),
        signing=SigningConfig.from_section(root.table("signing", required=True)),
        tokens=TokenConfig.from_section(root.table("tokens", required=True)),
        purpose=PurposeConfig.from_section(root.table("purpose", required=True)),
        audit=AuditConfig.from_section(root.table("audit", required=True)),
        policy=PolicyConfig.from_section(root.table("policy", required=True)),
        rate_limits=RateLimitConfig.from_section(root.table("rate_limits")),
        log_signing=TlsConfig.from_section(root.table("log_signing", required=True)),
        witness_db=_witness_db(root.table("witness", required=True)),
        limits=LimitsConfig.from_section(root.table("limits")),
        revocation=RevocationConfig.from_section(root.table("revocation")),
        backends=MappingProxyType(backends),
        provenance=Provenance(file, directory.named),
    )
    for name in config.rate_limits.overrides:
        if name not in directory.forces:
            raise file.error(("rate_limits", "forces", name), f"no force {name!r} in the network directory")
    root.finish()
    return config
