"""The gateway process: two listeners, the pipelines, and the edge that maps errors to statuses.

The **local listener** takes this force's applications (mTLS with application
certificates of this force). Applications call it with their ordinary stubs:
any method path is accepted and routed by its service through the network
directory. The **peer listener** takes other forces' gateways (mTLS with gateway
certificates pinned to their own force) and serves the relay (gateway.relay).

This module is the edge: it turns a gRPC call into a `Call`, runs the stages,
hands the call to a forwarder (the backend, or the relay to the host force's
gateway), records the outcome, and chooses the caller's status (through
`gateway.status`, the one table). Refusals are logged with their full reason;
the caller sees only the status and a short public text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from gateway import __version__
from gateway._proto.psn.gateway.v1 import relay_pb2, witness_pb2
from gateway.admin import AdminServer
from gateway.audit.recorder import AuditRecorder
from gateway.audit.setup import build_transparency, log_public_key
from gateway.audit.witness import ConflictEvidence, conflict_kind
from gateway.audit.witness_grpc import ADD_CHECKPOINT, witness_reply
from gateway.breaker import BreakerState
from gateway.clock import Clock, SystemClock
from gateway.config import GatewayConfig, LimitsConfig
from gateway.directory import CallType, NetworkDirectory, load_directory
from gateway.envelope import EnvelopeVerifier, MessageDigest, Signer, seal_response
from gateway.errors import (
    ConfigError,
    DeadlineExceeded,
    GatewayError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from gateway.forward import BackendUpstream, Downstream, Metadata, Reply, Upstream, backend_unary, pump_stream
from gateway.identity import TrustStore, Usage, load_trust_store
from gateway.metadata import backend_metadata
from gateway.metrics import GatewayMetrics, Registry
from gateway.mux import MUX_METHOD, BatchHold, MuxClient, MuxHost
from gateway.muxstream import HostStream
from gateway.pipeline import (
    Call,
    DeadlineStage,
    Listener,
    MetadataStage,
    PeerIdentityStage,
    Pipeline,
    PolicyStage,
    PurposeStage,
    RouteStage,
    Stage,
    TokenStage,
)
from gateway.policy import (
    Decision,
    DecisionRequest,
    Disagreement,
    Policy,
    PolicyError,
    PolicyHolder,
    ShadowPolicy,
    load_policy,
)
from gateway.ratelimit import PlaceShares, RateLimiter, RateLimitStage
from gateway.relay import EnvelopeStage, RelayClient, RelayHostDownstream, response_seal_for, sealable
from gateway.relaylink import (
    FRAME_OVERHEAD,
    MAX_LINKS,
    LinkConnection,
    LinkTarget,
    RelayLinkListener,
    client_context,
    server_context,
)
from gateway.replay import InMemoryReplayStore, ReplayStore, SqliteReplayStore
from gateway.status import status_for
from gateway.tls import ChannelPool, KeyPair, ServerTls
from gateway.token import KeySource, TokenVerifier, build_key_source
from gateway.tomlconf import parse_address

__all__ = ["REQUEST_ID_KEY", "Gateway", "Recorder", "StartFiles"]

log = logging.getLogger("psngw.server")
_PEM = Encoding.PEM

#: The trailing metadata key in which a caller gets the gateway's request id (also in the audit log).
REQUEST_ID_KEY = "psn-request-id"

#: The servicer context of the gateway's handlers (raw bytes locally, relay frames on the peer listener).
Context = grpc.aio.ServicerContext[Any, Any]
calls_log = logging.getLogger("psngw.calls")


class Recorder(Protocol):
    """Where the record of each call goes; `record` returns once it is durable."""

    async def record(self, call: Call, event: str, *, alone: bool = False) -> None:
        """Record `call` (event: call, stream-open, stream-close); raise AuditUnavailable if it cannot.

        `alone`: no other call is in flight in this process (the record may be committed at once).
        """
        ...


#: The method name in the records of relay link calls refused before their envelope verified.
LINK_METHOD = "/psn.gateway.v1.Relay/Link"
#: how long a `Relay/Stream` RPC may take to send its envelope, its first frame
FIRST_FRAME_SECONDS = 10.0


@dataclass(frozen=True)
class _Ports:
    local: int
    peer: int
    admin: int | None
    relay: int | None = None


def _batch_hold(limits: LimitsConfig) -> BatchHold | None:
    """How relay channels pack calls when busy (`[limits] relay_batch_*`); None when the delay is 0."""
    return BatchHold(limits.relay_batch_delay, limits.relay_batch_siblings) if limits.relay_batch_delay > 0 else None


def _place_shares(limits: LimitsConfig) -> tuple[PlaceShares, PlaceShares]:
    """Each peer force's share of the relay listener's links, and of the peer listener's long-lived RPCs.

    Half of each (relay channels and streams are the RPCs): one force holding all it may still leaves
    the others room.
    """
    return (
        PlaceShares(MAX_LINKS // 2, "relay links"),
        PlaceShares(max(1, limits.max_concurrent_calls // 2), "relay channels and streams"),
    )


def _peer_certificate(context: Context) -> bytes | None:
    return next(iter(context.auth_context().get("x509_pem_cert", ())), None)


class ContextDownstream:
    """The caller of a streaming call on the local listener."""

    def __init__(self, context: Context, call: Call, *, max_requests: int | None) -> None:
        self._context = context
        self._call = call
        self._max = max_requests

    async def read(self) -> bytes | None:
        """The caller's next request message, None when it is done."""
        message: object = await self._context.read()
        if message is grpc.aio.EOF:
            return None
        self._call.request_messages += 1
        if self._max is not None and self._call.request_messages > self._max:
            raise InvalidArgument(f"{self._call.method} takes one request message, got more")
        assert isinstance(message, bytes)  # noqa: S101  # no deserializer: raw bytes
        return message

    async def send_initial_metadata(self, md: Metadata) -> None:
        """Send the response headers (empty ones go out with the first message or the status instead)."""
        if md:
            await self._context.send_initial_metadata(md)

    async def write(self, data: bytes) -> None:
        """Send one response message."""
        self._call.response_messages += 1
        await self._context.write(data)


#: The first bytes of every SQLite database file.
_SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class StartFiles:
    """What a gateway reads at start, read and checked: nothing listens, nothing is written.

    `Gateway` is built from these; ``psngw serve --check`` loads them and stops. A file that
    cannot be used is a `ConfigError` at the setting that named it (`GatewayConfig.provenance`).
    """

    trust: TrustStore
    tls: KeyPair
    signer: Signer
    keys: KeySource
    policy: Policy
    shadow: Policy | None

    @classmethod
    def load(cls, config: GatewayConfig, clock: Clock) -> StartFiles:
        """Every CA certificate, CRL, key pair, the JWKS and the policies; the databases' paths, read-only."""
        revocation = config.revocation
        with config.provenance.locating():
            trust = load_trust_store(
                config.directory, crl_grace=revocation.crl_grace, require_crl=revocation.require_crl
            )
            tls = KeyPair.load(config.tls.cert, config.tls.key)
            signer = Signer.from_files(config.signing.cert, config.signing.key)
            log_signing = KeyPair.load(config.log_signing.cert, config.log_signing.key)
            try:
                log_public_key(log_signing.cert_pem)  # the rule `build_transparency` applies
            except ConfigError as exc:
                raise ConfigError(exc.message, file=config.log_signing.cert) from exc
            for db in (config.audit.db, config.witness_db, config.signing.replay_db):
                if db is not None:
                    _check_database(db)
            keys = build_key_source(config.tokens, clock)
            policy = load_policy(config.policy.dir, config.directory)
            shadow_dir = config.policy.shadow_dir
            shadow = None if shadow_dir is None else load_policy(shadow_dir, config.directory)
        return cls(trust, tls, signer, keys, policy, shadow)


def _check_database(path: Path) -> None:
    """A SQLite file the gateway opens at start: its folder must exist, an existing file must be SQLite.

    Only the file's first bytes are read (they never change once written): other workers may be
    writing to it now. The stores check the contents themselves when they open.
    """
    if not path.parent.is_dir():
        raise ConfigError("the folder for this database does not exist", file=path)
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError("the gateway cannot write in the folder of this database", file=path)
    try:
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return  # made at start
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=path) from exc
    if head and head != _SQLITE_HEADER:
        raise ConfigError("not a SQLite database (damaged, or another file)", file=path)
    if not os.access(path, os.W_OK):
        raise ConfigError("the gateway cannot write this database", file=path)


def _bind_problem(address: str, *, reuse_port: bool) -> OSError | None:
    """Why `address` cannot be listened on now, asked of the OS with a socket bound and closed at once.

    grpc says only that it failed to bind. Like grpc, one resolved address that binds is enough.
    """
    host, port = parse_address(address)
    problem: OSError | None = None
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return exc
    for family, kind, proto, _, where in resolved:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(where)
            except OSError as exc:
                problem = problem or exc
                continue
            return None
    return problem


def _cannot_listen(name: str, address: str, problem: OSError | str) -> ConfigError:
    """The error for a listener that cannot be bound, at its setting (``listeners.<name>``)."""
    reason = problem if isinstance(problem, str) else problem.strerror or str(problem)
    return ConfigError(f"cannot listen on {address}: {reason}", field=f"listeners.{name}")


class Gateway:
    """One force's gateway: start it, serve, stop it."""

    #: calls in flight in this process, every listener
    _calls_now = 0
    #: of them, unary calls: each brings a record within moments (a stream may stay open for hours)
    _unary_now = 0
    #: when the last warning of a certificate near its expiry was logged (the clock's seconds)
    _last_expiry_warning = 0.0

    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Clock | None = None,
        recorder: Recorder | None = None,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        self.config = config
        #: this process's number among `workers` processes serving the same listeners (SO_REUSEPORT)
        self.worker = worker
        self.workers = workers
        self.force = config.force
        self.clock: Clock = clock or SystemClock()
        self._directory = config.directory
        files = StartFiles.load(config, self.clock)  # every file the config names, or a ConfigError at its setting
        self._trust = files.trust
        self.registry = Registry()
        self.metrics = GatewayMetrics(self.registry)
        # Series bound once for labels known in advance (each call observes every stage it passes).
        self._stage_series = {s: self.metrics.stage_duration.labels(stage=s) for s in GatewayMetrics.STAGES}
        self._flight_series = {li: self.metrics.calls_in_flight.labels(listener=li.value) for li in Listener}
        self.transparency = build_transparency(config, self._trust, self.clock, checkpointer=worker == 0)
        self.audit_log = self.transparency.log
        self.recorder: Recorder = recorder or AuditRecorder(
            self.audit_log, gateway=config.gateway_id, force=self.force, clock=self.clock, worker=worker
        )
        self._tls = files.tls
        self._local_tls = ServerTls(self._tls, self._roots())
        self._peer_tls = ServerTls(self._tls, self._roots())
        limits = config.limits
        self.backends = ChannelPool(self._tls, max_message_bytes=limits.max_message_bytes, grace=limits.max_deadline)
        self.peers = ChannelPool(
            self._tls, max_message_bytes=limits.max_message_bytes, size=limits.peer_channels, grace=limits.max_deadline
        )
        self._set_channel_targets()
        self._signer = files.signer
        self.envelope_verifier = EnvelopeVerifier(
            trust=self.trust,
            own_force=self.force,
            window=config.signing.window,
            replay=self._replay_store(),
            clock=self.clock,
            max_deadline=limits.max_deadline,
        )
        self.relay = RelayClient(
            force=self.force,
            gateway_id=config.gateway_id,
            signer=self.signer,
            verifier=self.envelope_verifier,
            peers=self.peers,
            clock=self.clock,
            breaker_failures=limits.peer_failures,
            breaker_cooldown=limits.peer_cooldown,
            mux=MuxClient(self.peers, clock=self.clock, links=limits.peer_channels, hold=_batch_hold(limits))
            if limits.relay_channels
            else None,
        )
        self._link_contexts: dict[tuple[str, str, bytes], ssl.SSLContext] = {}
        self._relay_listener: RelayLinkListener | None = None
        self._set_link_targets()
        self.policy = PolicyHolder(files.policy)
        self.shadow: ShadowPolicy | None = (
            None if files.shadow is None else ShadowPolicy(self.policy, files.shadow, self._log_disagreement)
        )
        self.rate_limiter = RateLimiter(
            config.rate_limits.per_worker(workers),
            forces=config.directory.forces,
            units=config.directory.units,
            clock=self.clock,
        )
        self.token_verifier = TokenVerifier(config.tokens, force=self.force, keys=files.keys, clock=self.clock)
        observe = self._observe_stage
        self.local_pipeline = Pipeline(self._local_stages(), observe=observe)
        self.peer_identity = Pipeline(
            [
                PeerIdentityStage(
                    Listener.PEER, force=self.force, trust=self.trust, directory=self.directory, clock=self.clock
                )
            ],
            observe=observe,
        )
        self.peer_pipeline = Pipeline(
            [
                EnvelopeStage(
                    self.envelope_verifier, self.clock, max_forwarded_bytes=limits.max_forwarded_metadata_bytes
                ),
                RouteStage(self.directory, force=self.force, listener=Listener.PEER),
                DeadlineStage(default=limits.default_deadline, maximum=limits.max_deadline, clock=self.clock),
                RateLimitStage(self.rate_limiter, own_force=self.force),
                PolicyStage(self.decide, own_force=self.force),
            ],
            observe=observe,
        )
        self._link_shares, self._rpc_shares = _place_shares(limits)
        self._admin: AdminServer | None = None
        self.reload_hooks: list[Callable[[], None]] = []
        self.reload_errors: list[str] = []
        self.expiring: list[tuple[str, float]] = []
        self._reload_requested = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._local_server: grpc.aio.Server | None = None
        self._peer_server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self.ports: _Ports | None = None
        self._stopping = asyncio.Event()
        #: set when `stop` begins: relay channels take no new calls and end once theirs are answered
        self._draining = asyncio.Event()

    # -- what the stages read ---------------------------------------------------

    def directory(self) -> NetworkDirectory:
        """The current network directory."""
        return self._directory

    def trust(self) -> TrustStore:
        """The current trust store (CA certificates and CRLs)."""
        return self._trust

    def _roots(self) -> bytes:
        # Both listeners trust every force's CA for the handshake, then pin each
        # peer to its own trust domain in the peer-identity stage, where the
        # refusal is logged and audited (a failed handshake would leave no record).
        return b"".join(self._trust.ca_certificate(f).public_bytes(_PEM) for f in self._trust.forces)

    def _own_ca(self) -> bytes:
        return self._trust.ca_certificate(self.force).public_bytes(_PEM)

    def _set_channel_targets(self) -> None:
        directory = self._directory
        own_ca = self._own_ca()
        self.backends.set_targets(
            {name: (b.address, b.server_name, own_ca) for name, b in self.config.backends.items()}
        )
        self.peers.set_targets(
            {
                f.name: (f.peer_address, f.gateway_server_name, self._trust.ca_certificate(f.name).public_bytes(_PEM))
                for f in directory.forces.values()
                if f.name != self.force
            }
        )

    def _link_context(self, side: str, roots: bytes) -> ssl.SSLContext:
        """A relay link TLS context, the same object while the key pair and the roots stay the same."""
        key = (side, self._tls.fingerprint, roots)
        context = self._link_contexts.get(key)
        if context is None:
            make = server_context if side == "server" else client_context
            context = make(self._tls, roots)
            self._link_contexts = {k: v for k, v in self._link_contexts.items() if k[1] == self._tls.fingerprint}
            self._link_contexts[key] = context
        return context

    def _relay_server_context(self) -> ssl.SSLContext:
        """The relay listener's context for the next handshake (every force's CA, as on the peer listener)."""
        return self._link_context("server", self._roots())

    def _set_link_targets(self) -> None:
        """Relay links to every other force whose directory entry has a `relay_address`."""
        mux = self.relay.mux
        if mux is None:
            return
        targets = {}
        for f in self._directory.forces.values():
            if f.name != self.force and f.relay_address is not None:
                roots = self._trust.ca_certificate(f.name).public_bytes(_PEM)
                context = self._link_context(f"client:{f.name}", roots)
                targets[f.name] = LinkTarget(f.relay_address, f.gateway_server_name, context)
        mux.set_links(targets, check=self._check_link_host, max_frame=self._max_link_frame)

    @property
    def _max_link_frame(self) -> int:
        """The largest relay link frame this gateway takes: a message at its limit, with room for the rest."""
        return self.config.limits.max_message_bytes + FRAME_OVERHEAD

    def _check_link_host(self, host: str, certificate: bytes) -> None:
        """The host gateway's TLS certificate on a relay link: trusted now, CRL included, and that gateway's."""
        force = self._directory.forces.get(host)
        if force is None:
            raise Unauthenticated(f"force {host} is no longer in the network directory")
        identity = self._trust.verify(certificate, Usage.SERVER, self.clock.now())
        expected = force.gateway_spiffe_id
        if identity.spiffe_id != expected:
            raise Unauthenticated(f"{identity.describe()} is not {expected}")

    def _replay_store(self) -> ReplayStore:
        """In-process for one worker; shared through SQLite when several workers serve the same listeners."""
        signing = self.config.signing
        if self.workers == 1:
            return InMemoryReplayStore(signing.replay_capacity)
        path = signing.replay_db or self.config.audit.db.with_name(f"{self.force}-replay.db")
        return SqliteReplayStore(path, max_entries=signing.replay_capacity)

    def signer(self) -> Signer:
        """The current signing key and certificate."""
        return self._signer

    def _local_stages(self) -> list[Stage]:
        limits = self.config.limits
        return [
            PeerIdentityStage(
                Listener.LOCAL, force=self.force, trust=self.trust, directory=self.directory, clock=self.clock
            ),
            MetadataStage(
                max_entries=limits.max_metadata_entries,
                max_bytes=limits.max_metadata_bytes,
                max_forwarded_bytes=limits.max_forwarded_metadata_bytes,
            ),
            TokenStage(self.token_verifier),
            PurposeStage(self.config.purpose),
            RouteStage(self.directory, force=self.force, listener=Listener.LOCAL),
            DeadlineStage(default=limits.default_deadline, maximum=limits.max_deadline, clock=self.clock),
            RateLimitStage(self.rate_limiter, own_force=self.force),
            PolicyStage(self.decide, own_force=self.force),
        ]

    def decide(self, request: DecisionRequest) -> Decision:
        """The policy decision for `request` (the live policy; the shadow candidate beside it if configured)."""
        started = time.perf_counter()
        decision = self.shadow.decide(request) if self.shadow is not None else self.policy.decide(request)
        self.metrics.policy_decision.observe(time.perf_counter() - started)
        return decision

    def _log_disagreement(self, d: Disagreement) -> None:
        log.warning(
            "shadow policy %s disagrees: %s for %s from %s (live %s: %s)",
            d.candidate.policy_version,
            "allow" if d.candidate.allowed else "deny",
            d.request.method,
            d.request.origin_force,
            d.live.policy_version,
            "allow" if d.live.allowed else "deny",
            extra={
                "shadow_rule": d.candidate.rule,
                "live_rule": d.live.rule,
                "units": list(d.request.units),
                "roles": list(d.request.roles),
                "decision_id": d.live.decision_id,
            },
        )

    # -- lifecycle ---------------------------------------------------------------

    def _server_options(self) -> list[tuple[str, int]]:
        limits = self.config.limits
        return [
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            # grpc's own ceiling sits above ours, so that oversized metadata reaches the metadata stage
            # and is refused there with a record, not by grpc with none.
            ("grpc.max_metadata_size", 4 * limits.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", 8 * limits.max_metadata_bytes),
            ("grpc.so_reuseport", 1 if self.workers > 1 else 0),
            # Counted from the moment a connection is accepted: clients that never finish a TLS handshake
            # cannot hold more sockets than this (grpc closes the connection over it at once).
            ("grpc.max_allowed_incoming_connections", limits.max_connections),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]

    async def start(self) -> None:
        """Open the audit log (refusing a divergent one), bind the listeners, start serving.

        A listener that cannot be bound is a `ConfigError` at its setting (``listeners.peer``), and
        the gateway is stopped again before it is raised: nothing is left listening or running.
        """
        # A busy gateway holds group commits open for more records ([audit] commit_delay_seconds).
        self.audit_log.busy = lambda: self._unary_now
        with self.config.provenance.locating():
            report = self.audit_log.open()
        for message in report.messages:
            log.warning("audit log: %s", message)
        log.info("audit log open: %d records, last checkpoint at %d", report.records, report.checkpoint_size)
        if self.worker == 0:  # one process signs checkpoints and collects cosignatures for the force
            self.transparency.register_witnesses(self.peers.channel, timeout=self.config.audit.witness_timeout)
        try:
            with self.config.provenance.locating():
                self.ports = ports = await self._listen()
        except BaseException:
            await self.stop(0)
            raise
        self._install_gauges()
        self.metrics.set_policy_version(self.policy.current.version)
        self._warn_expiry()
        await self._update_health()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="psngw-watch")
        log.info(
            "gateway of %s serving: local %s, peer %s",
            self.force,
            self.config.listeners.local,
            self.config.listeners.peer,
            extra={
                "force": self.force,
                "local_port": ports.local,
                "peer_port": ports.peer,
                "relay_port": ports.relay,
                "worker": self.worker,
            },
        )

    async def _listen(self) -> _Ports:
        """Bind every listener and serve on it; `ConfigError` (``listeners.<name>``) for one that cannot be bound.

        Every address is tried first with a socket of our own, so that a port already taken leaves
        nothing bound, and so that the error says why (grpc does not).
        """
        listeners, limits = self.config.listeners, self.config.limits
        reuse_port = self.workers > 1
        admin = listeners.admin if self.worker == 0 else None
        wanted = {"local": listeners.local, "peer": listeners.peer, "relay": listeners.relay, "admin": admin}
        for name, address in wanted.items():
            problem = _bind_problem(address, reuse_port=reuse_port) if address is not None else None
            if address is not None and problem is not None:
                raise _cannot_listen(name, address, problem)
        local = grpc.aio.server(options=self._server_options(), maximum_concurrent_rpcs=limits.max_concurrent_calls)
        local.add_generic_rpc_handlers((_LocalHandler(self),))
        self._add_health(local)
        peer = grpc.aio.server(options=self._server_options(), maximum_concurrent_rpcs=limits.max_concurrent_calls)
        self._add_peer_services(peer)
        self._add_health(peer)
        self._local_server, self._peer_server = local, peer
        local_port = self._add_port(local, "local", listeners.local, self._local_tls)
        try:
            peer_port = self._add_port(peer, "peer", listeners.peer, self._peer_tls)
        finally:
            await local.start()  # even on failure: grpc lets go of a bound port only when a started server stops
        await peer.start()
        relay_port = None
        if listeners.relay is not None:
            self._relay_listener = RelayLinkListener(
                listeners.relay,
                context=self._relay_server_context,
                handle=self.peer_link,
                reuse_port=reuse_port,
                max_frame=self._max_link_frame,
            )
            try:
                relay_port = await self._relay_listener.start()
            except OSError as exc:
                raise _cannot_listen("relay", listeners.relay, exc) from exc
        admin_port = None
        if admin is not None:
            self._admin = AdminServer(admin, registry=self.registry, health=self.health)
            admin_port = await self._admin.start()
        return _Ports(local_port, peer_port, admin_port, relay_port)

    def _add_port(self, server: grpc.aio.Server, name: str, address: str, tls: ServerTls) -> int:
        """Bind `server` to `address` with mTLS (not yet serving); the bound port."""
        try:
            return server.add_secure_port(address, tls.credentials())
        except RuntimeError as exc:  # grpc: "Failed to bind to address", without the reason
            problem = _bind_problem(address, reuse_port=self.workers > 1)
            raise _cannot_listen(name, address, problem or "grpc could not bind it") from exc

    def _add_health(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)

    def _add_peer_services(self, server: grpc.aio.Server) -> None:
        """The relay (and the witness) on the peer listener."""
        server.add_generic_rpc_handlers((_PeerHandler(self),))

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls; let calls in flight finish within `grace` seconds."""
        grace = self.config.limits.shutdown_grace if grace is None else grace
        self._draining.set()
        with contextlib.suppress(Exception):
            await self._health.enter_graceful_shutdown()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        servers = [s for s in (self._local_server, self._peer_server) if s is not None]
        links = [] if self._relay_listener is None else [self._relay_listener.stop(grace)]
        await asyncio.gather(*(s.stop(grace) for s in servers), *links)
        if self._admin is not None:
            await self._admin.stop()
        await self.audit_log.close()
        await self.backends.close()
        if self.relay.mux is not None:
            await self.relay.mux.close()
        await self.peers.close()
        self._stopping.set()
        log.info("gateway of %s stopped", self.force, extra={"force": self.force})

    async def wait_stopped(self) -> None:
        """Wait until `stop` has finished."""
        await self._stopping.wait()

    # -- reloading without restart --------------------------------------------------------

    def _watched_files(self) -> list[Path]:
        files = [self.config.tls.cert, self.config.tls.key, self.config.signing.cert, self.config.signing.key]
        files.append(self.config.directory_path)
        for force in self._directory.forces.values():
            files.append(force.ca_path)
            if force.crl_path is not None:
                files.append(force.crl_path)
        return files

    def _policy_files(self) -> list[Path]:
        roots = [self.config.policy.dir, *([self.config.policy.shadow_dir] if self.config.policy.shadow_dir else [])]
        return sorted(p for root in roots for p in root.rglob("*") if p.is_file())

    def _snapshot(self) -> dict[Path, tuple[int, int] | None]:
        out: dict[Path, tuple[int, int] | None] = {}
        for path in [*self._watched_files(), *self._policy_files()]:
            try:
                st = path.stat()
                out[path] = (st.st_mtime_ns, st.st_size)
            except OSError:
                out[path] = None
        return out

    def request_reload(self) -> None:
        """Reload soon (the SIGHUP handler)."""
        self._reload_requested.set()

    async def _watch(self) -> None:
        """Poll the watched files; reload when one changes or on request."""
        interval = self.config.revocation.reload_interval
        seen = self._snapshot()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._reload_requested.wait()
            await self._update_health()
            now = self._snapshot()
            if now != seen or self._reload_requested.is_set():
                self._reload_requested.clear()
                # Let a writer finish: files written in place change size/mtime more than once.
                await asyncio.sleep(min(0.2, interval))
                seen = self._snapshot()
                self.reload()
                await self.reload_policy()
            self._warn_expiry()

    def reload(self) -> list[str]:
        """Reload every reloadable input; each part that fails keeps its old value. Returns the errors."""
        errors: list[str] = []
        directory = self._directory
        try:
            directory = load_directory(self.config.directory_path)
            if self.force not in directory.forces:
                raise ConfigError(f"force {self.force} is no longer in the directory", file=self.config.directory_path)
        except ConfigError as exc:
            errors.append(str(exc))
            directory = self._directory
        try:
            trust = load_trust_store(
                directory,
                crl_grace=self.config.revocation.crl_grace,
                require_crl=self.config.revocation.require_crl,
                previous=self._trust,
            )
            self._directory, self._trust = directory, trust
            errors.extend(trust.load_errors)
        except ConfigError as exc:
            errors.append(str(exc))
        try:
            keypair = KeyPair.load(self.config.tls.cert, self.config.tls.key)
            if keypair.fingerprint != self._tls.fingerprint:
                self._check_own(keypair.certificate, Usage.SERVER, self.config.tls.cert)
                self._tls = keypair
                self.backends.rebuild(keypair)
                self.peers.rebuild(keypair)
                log.info("TLS certificate rotated", extra={"fingerprint": keypair.fingerprint})
        except ConfigError as exc:
            errors.append(str(exc))
        self._local_tls.update(self._tls, self._roots())
        self._peer_tls.update(self._tls, self._roots())
        self._set_channel_targets()
        try:
            self._set_link_targets()
        except GatewayError as exc:
            errors.append(exc.reason)
        try:
            signer = Signer.from_files(self.config.signing.cert, self.config.signing.key)
            if signer.certificate != self._signer.certificate:
                self._check_own(signer.certificate, Usage.SIGNING, self.config.signing.cert)
            self._signer = signer
        except ConfigError as exc:
            errors.append(str(exc))
        for hook in self.reload_hooks:
            try:
                hook()
            except ConfigError as exc:
                errors.append(str(exc))
        for error in errors:
            log.error("reload rejected, keeping the last good version: %s", error)
        self.metrics.reloads.inc(result="failed" if errors else "ok")
        self.reload_errors = errors
        return errors

    async def reload_policy(self) -> bool:
        """Build and check the policy off the event loop, then swap it in; a rejected edit keeps the old one."""
        directory = self._directory
        try:
            policy = await asyncio.to_thread(self.policy.reload, self.config.policy.dir, directory)
            if self.shadow is not None and self.config.policy.shadow_dir is not None:
                self.shadow.candidate = await asyncio.to_thread(
                    load_policy, self.config.policy.shadow_dir, directory, isolate=True
                )
        except PolicyError:
            self.metrics.policy_reload_failures.inc()  # gateway.policy.live logged why
            return False
        self.metrics.set_policy_version(policy.version)
        return True

    def _check_own(self, cert: x509.Certificate, usage: Usage, path: Path) -> None:
        """A rotated certificate of this gateway must be one its peers will accept: refuse it otherwise."""
        try:
            identity = self._trust.verify(cert, usage, self.clock.now())
        except GatewayError as exc:
            raise ConfigError(f"new certificate refused: {exc.reason}", file=path) from exc
        if identity.spiffe_id != self.config.gateway_id:
            raise ConfigError(f"new certificate is {identity.spiffe_id}, not {self.config.gateway_id}", file=path)

    def _certificates(self) -> dict[str, Any]:
        certs = {"tls": self._tls.certificate, "signing": self._signer.certificate}
        for force in self._directory.forces:
            certs[f"ca:{force}"] = self._trust.ca_certificate(force)
        return certs

    def _warn_expiry(self) -> None:
        """Note certificates near expiry (health, metrics) and log them at most hourly."""
        now = self.clock.now()
        certs = self._certificates()
        for label, cert in certs.items():
            days = (cert.not_valid_after_utc.timestamp() - now) / 86400
            self.metrics.certificate_expiry_days.set(days, certificate=label)
        self.expiring = self._trust.expiring(certs, now, self.config.revocation.expiry_warning_days)
        if self.expiring and now - self._last_expiry_warning >= 3600:
            self._last_expiry_warning = now
            for label, days in self.expiring:
                log.warning(
                    "%s certificate expires in %.1f days", label, days, extra={"certificate": label, "days_left": days}
                )

    # -- health and metrics ------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What the health endpoint shows; `serving` is false when the gateway refuses traffic."""
        now = self.clock.now()
        crls = {}
        for force in self._directory.forces:
            status = self._trust.crl_status(force, now)
            crls[force] = {"usable": status.usable, "reason": status.reason}
        audit = self.audit_log.status()
        return {
            "serving": self.audit_log.healthy and not self._stopping.is_set(),
            "force": self.force,
            "version": __version__,
            "audit": audit,
            # This gateway's witness: rollbacks and forks of peer logs it has evidence of (empty: none).
            "witness": {
                "name": self.transparency.witness.name,
                "conflicts": self.transparency.witness.conflict_summary(),
            },
            # The peers' witnesses that report this force's log rolled back or forked.
            "disputed_by": sorted(name for name, w in audit["witnesses"].items() if w["equivocation"]),
            "crl": crls,
            "expiring_certificates": [{"certificate": c, "days_left": round(d, 1)} for c, d in self.expiring],
            "reload_errors": self.reload_errors,
            "relay_channels": self._relay_channel_health(),
            "policy": {
                "version": self.policy.current.version,
                "last_error": self.policy.last_error,
                "reload_failures": self.policy.reload_failures,
                "shadow": None
                if self.shadow is None
                else {
                    "version": self.shadow.candidate.version,
                    "evaluated": self.shadow.evaluated,
                    "disagreements": self.shadow.disagreements,
                },
            },
        }

    def _relay_channel_health(self) -> dict[str, Any]:
        """Relay channels per peer force: how many are open, and whether that peer is relayed to by RPC instead."""
        mux = self.relay.mux
        return {
            force: {
                "open": 0 if mux is None else mux.streams(force),
                "by_unary_rpc": mux is None or not mux.supports(force),
                "transport": "unary-rpc" if mux is None else mux.transport(force),
            }
            for force in self._directory.forces
            if force != self.force
        }

    async def _update_health(self) -> None:
        serving = self.audit_log.healthy and not self._stopping.is_set()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set("", status)

    def _install_gauges(self) -> None:
        m = self.metrics
        m.audit_healthy.set_function(lambda: 1.0 if self.audit_log.healthy else 0.0)
        m.audit_queue_depth.set_function(lambda: float(self.audit_log.status()["queue_depth"]))
        m.checkpoint_size.set_function(lambda: float(self.audit_log.status()["last_checkpoint_size"]))
        m.witness_quorum_required.set(float(self.config.audit.witness_quorum))
        m.witness_quorum_reached.set_function(lambda: 1.0 if self.audit_log.status()["quorum"]["reached"] else 0.0)
        m.checkpoint_cosignatures.set_function(self._cosignatures)
        m.watch_log_disputes(self.audit_log.status)  # the witnesses are registered by now (start)
        self.audit_log.on_commit = self._observe_commit
        if self.relay.mux is not None:
            self.relay.mux.on_sent = self._observe_relay_message
        for force in self._directory.forces:
            m.crl_usable.set_function(partial(self._crl_usable, force), force=force)
            if force != self.force:
                m.peer_circuit_open.set_function(partial(self._circuit_open, force), force=force)
                m.relay_channels_open.set_function(partial(self._relay_channels, force), force=force)

    def _relay_channels(self, force: str) -> float:
        mux = self.relay.mux
        return 0.0 if mux is None else float(mux.streams(force))

    def _circuit_open(self, force: str) -> float:
        return 0.0 if self.relay.breaker(force).state is BreakerState.CLOSED else 1.0

    def _cosignatures(self) -> float:
        status = self.audit_log.status()  # one snapshot: size and witnesses from the same moment
        size = status["last_checkpoint_size"]
        return float(sum(1 for w in status["witnesses"].values() if w["size"] >= size > 0))

    def _observe_commit(self, seconds: float, records: int) -> None:
        self.metrics.audit_commit.observe(seconds)
        self.metrics.audit_records.inc(records)

    def _observe_relay_message(self, requests: int) -> None:
        self.metrics.relay_messages.inc()
        self.metrics.relay_requests.inc(requests)

    def _crl_usable(self, force: str) -> float:
        return 1.0 if self._trust.crl_status(force, self.clock.now()).usable else 0.0

    def _observe_stage(self, stage: str, seconds: float) -> None:
        series = self._stage_series.get(stage)
        if series is None:
            self.metrics.stage_duration.observe(seconds, stage=stage)
        else:
            series.observe(seconds)

    def _observe_call(self, call: Call) -> None:
        application = call.route.application.name if call.route else "unknown"
        decision = call.decision
        verdict = "refused" if decision is None else ("allow" if decision.allowed else "deny")
        origin = call.origin_force or (self.force if call.listener is Listener.LOCAL else "unknown")
        status = call.status or "UNKNOWN"
        self.metrics.calls.inc(
            listener=call.listener.value, origin_force=origin, application=application, decision=verdict, status=status
        )
        self.metrics.call_duration.observe(
            max(0.0, self.clock.monotonic() - call.started_mono), listener=call.listener.value, application=application
        )
        if call.refusal is not None:
            self.metrics.refusals.inc(stage=call.refusal_stage or "forward", status=status)
            if call.refusal_stage == "rate-limit":
                units = call.principal.units if call.principal else ()
                for unit in units or ("",):
                    self.metrics.rate_limited.inc(origin_force=origin, unit=unit)

    async def record(self, call: Call, event: str) -> None:
        """Record the call durably (the audit stage), then count it; `AuditUnavailable` if it cannot be."""
        started = self.clock.monotonic()
        # Alone in this process (one worker, one call): its record is committed here, not by the writer.
        alone = self.workers == 1 and self._calls_now <= 1
        try:
            await self.recorder.record(call, event, alone=alone)
        finally:
            self._observe_stage("audit", self.clock.monotonic() - started)
        if event != "stream-open":
            self._observe_call(call)

    # -- the edge ----------------------------------------------------------------------

    def new_call(self, listener: Listener, method: str, context: Context) -> Call:
        """A `Call` for an arriving RPC, with its peer certificate and deadline."""
        remaining = context.time_remaining()
        mono = self.clock.monotonic()
        return Call(
            listener=listener,
            method=method,
            metadata=tuple((k, v) for k, v in context.invocation_metadata() or ()),
            peer_certificate=_peer_certificate(context),
            started_at=self.clock.now(),
            started_mono=mono,
            deadline_mono=None if remaining is None else mono + remaining,
        )

    async def refuse(self, call: Call, exc: GatewayError, context: Context, *, event: str = "call") -> None:
        """Record a refused call (`event`: a stream refused after it opened closes it) and end it; never returns."""
        refused = await self._record_refusal(call, exc, event=event)
        await context.abort(refused.code, refused.public, trailing_metadata=((REQUEST_ID_KEY, call.request_id),))

    async def _record_refusal(self, call: Call, exc: GatewayError, *, event: str = "call") -> _Refused:
        """Record a refused call; the status and public text its caller gets (UNAVAILABLE if unrecorded)."""
        code = self._note_refusal(call, exc)
        call.status = code.name
        call.status_message = exc.public
        try:
            await self.record(call, event)
        except GatewayError as audit_exc:
            code, exc = status_for(audit_exc), audit_exc
            log.error("could not record refusal: %s", audit_exc.reason, extra={"request_id": call.request_id})
        return _Refused(code, exc.public)

    async def finish(
        self, call: Call, reply: Reply, context: Context, event: str, *, headers: Metadata = ()
    ) -> bytes | None:
        """Record the outcome durably, then release the reply to the caller: `headers` first, if any.

        Headers are part of the answer (an application may put data in them): nothing of it
        leaves before the record is on disk.
        """
        call.status = reply.code.name
        call.status_message = reply.details
        try:
            await self.record(call, event)
        except GatewayError as exc:
            await self.refuse(call, exc, context)
        if headers:
            await context.send_initial_metadata(headers)
        trailing = (*reply.trailing_metadata, (REQUEST_ID_KEY, call.request_id))
        if not reply.ok:
            await context.abort(reply.code, reply.details, trailing_metadata=trailing)
        context.set_trailing_metadata(trailing)
        return reply.message

    def _record_cancelled(self, call: Call, event: str) -> None:
        call.status = grpc.StatusCode.CANCELLED.name
        task = asyncio.get_running_loop().create_task(self.record(call, event))
        task.add_done_callback(_log_task_error)

    async def _forward_timed(self, forward: Awaitable[Reply]) -> Reply:
        started = self.clock.monotonic()
        try:
            return await forward
        finally:
            self._observe_stage("forward", self.clock.monotonic() - started)

    async def local_unary(self, method: str, request: bytes, context: Context) -> bytes | None:
        """A unary call from an application of this force."""
        with self._in_flight(Listener.LOCAL, unary=True):
            return await self._local_unary(method, request, context)

    async def _local_unary(self, method: str, request: bytes, context: Context) -> bytes | None:
        call = self.new_call(Listener.LOCAL, method, context)
        call.request_messages = 1
        try:
            await self.local_pipeline.admit(call)
            reply = await self._forward_timed(self.forward_unary(call, request))
        except GatewayError as exc:
            await self.refuse(call, exc, context)
        except asyncio.CancelledError:
            self._record_cancelled(call, "call")
            raise
        if reply.message is not None:
            call.response_messages = 1
        return await self.finish(call, reply, context, "call", headers=reply.initial_metadata)

    async def local_stream(self, method: str, context: Context) -> None:
        """A streaming call (any direction) from an application of this force."""
        with self._in_flight(Listener.LOCAL):
            await self._local_stream(method, context)

    async def _local_stream(self, method: str, context: Context) -> None:
        call = self.new_call(Listener.LOCAL, method, context)
        opened = False
        try:
            await self.local_pipeline.admit(call)
            assert call.route is not None  # noqa: S101  # the route stage sets it
            call_type = call.route.method.call_type
            await self.record(call, "stream-open")
            opened = True
            downstream = ContextDownstream(context, call, max_requests=None if call_type.client_streams else 1)
            reply = await self._forward_timed(self._pump(downstream, call))
        except GatewayError as exc:
            await self.refuse(call, exc, context, event="stream-close" if opened else "call")
        except asyncio.CancelledError:
            self._record_cancelled(call, "stream-close" if opened else "call")
            raise
        await self.finish(call, reply, context, "stream-close")

    @contextlib.contextmanager
    def _in_flight(self, listener: Listener, *, unary: bool = False) -> Iterator[None]:
        series = self._flight_series[listener]
        series.inc()
        self._calls_now += 1
        self._unary_now += unary
        try:
            yield
        finally:
            self._calls_now -= 1
            self._unary_now -= unary
            series.dec()

    # -- forwarding ---------------------------------------------------------------------

    async def _pump(self, downstream: Downstream, call: Call) -> Reply:
        return await pump_stream(downstream, await self.open_upstream(call))

    def backend_metadata(self, call: Call) -> Metadata:
        """The caller's pass-through metadata, and what the backend is told in the gateway's own headers."""
        assert call.principal is not None and call.purpose is not None  # noqa: S101  # admitted calls have both
        own = backend_metadata(request_id=call.request_id, principal=call.principal, purpose=call.purpose)
        return (*call.passthrough, *own)

    async def forward_unary(self, call: Call, request: bytes) -> Reply:
        """Send a unary call where its data is: this force's backend, or the host force."""
        assert call.route is not None  # noqa: S101  # the route stage sets it
        if call.route.host != self.force:
            return await self.relay_unary(call, request)
        app = call.route.application.name
        return await backend_unary(
            self.backends.channel(app),
            call.method,
            request,
            metadata=self.backend_metadata(call),
            timeout=call.remaining(self.clock.monotonic()),
            what=f"backend {app}",
        )

    async def open_upstream(self, call: Call) -> Upstream:
        """Open a streaming call where its data is."""
        assert call.route is not None  # noqa: S101  # the route stage sets it
        if call.route.host != self.force:
            return await self.relay_stream(call)
        app = call.route.application.name
        return BackendUpstream(
            self.backends.channel(app),
            call.method,
            metadata=self.backend_metadata(call),
            timeout=call.remaining(self.clock.monotonic()),
            what=f"backend {app}",
        )

    async def relay_unary(self, call: Call, request: bytes) -> Reply:
        """Relay a unary call to the host force's gateway."""
        return await self.relay.unary(call, request)

    async def relay_stream(self, call: Call) -> Upstream:
        """Relay a streaming call to the host force's gateway."""
        return await self.relay.stream(call)

    # -- the host side of the relay (peer listener) -----------------------------------------

    async def _peer_admit(self, call: Call, context: PeerContext) -> None:
        """Run the peer pipeline; a refusal before the envelope verified ends the relay call unsealed."""
        try:
            await self.peer_pipeline.admit(call)
        except GatewayError as exc:
            if call.envelope is None:
                await self.refuse(call, exc, context)
            raise

    def _sealed(self, call: Call, reply: Reply, digest: MessageDigest, headers: Metadata) -> relay_pb2.Signed:
        seal = response_seal_for(
            call,
            reply,
            host_gateway=self.config.gateway_id,
            force=self.force,
            digest=digest,
            headers=headers,
            clock=self.clock,
        )
        signed = seal_response(seal, self.signer())
        call.seal_signature = signed.signature
        call.response_digest = digest.digest
        return signed

    async def peer_unary(self, request: bytes, context: PeerContext) -> relay_pb2.UnaryRelayResponse:
        """A unary call relayed by another force's gateway (raw bytes: the envelope stage parses them)."""
        with self._in_flight(Listener.PEER, unary=True):
            return await self._peer_unary(request, context)

    async def _peer_unary(self, request: bytes, context: PeerContext) -> relay_pb2.UnaryRelayResponse:
        call = self.new_call(Listener.PEER, _RELAY_UNARY, context)
        call.relay_request = request
        outcome = await self._relayed_unary(call)
        if isinstance(outcome, _Refused):
            await context.abort(outcome.code, outcome.public, trailing_metadata=((REQUEST_ID_KEY, call.request_id),))
        return outcome

    async def _relayed_unary(self, call: Call) -> relay_pb2.UnaryRelayResponse | _Refused:
        """A relayed unary call (`Relay/Unary` or a relay channel), from peer identity to its durable record.

        The sealed response; or, for a refusal before the envelope verified (nothing to seal), the
        recorded refusal's status.
        """
        try:
            await self.peer_identity.admit(call)
            await self.peer_pipeline.admit(call)
            reply = sealable(call, await self._forward_timed(self.forward_unary(call, call.relay_request.message)))
        except GatewayError as exc:
            if call.envelope is None:
                return await self._record_refusal(call, exc)
            reply = self._refusal_reply(call, exc)
        except asyncio.CancelledError:
            self._record_cancelled(call, "call")
            raise
        digest = MessageDigest()
        if reply.message is not None:
            digest.update(reply.message)
            call.response_messages = 1
        signed = self._sealed(call, reply, digest, reply.initial_metadata)
        call.status, call.status_message = reply.code.name, reply.details
        try:
            await self.record(call, "call")
        except GatewayError as exc:
            return await self._record_refusal(call, exc)
        response = relay_pb2.UnaryRelayResponse(seal=signed)
        if reply.message is not None:
            response.message = reply.message
        return response

    # -- relay channels (`Relay/Mux`): many unary calls over one stream (gateway.mux) --

    def _mux_call(self, peer_certificate: bytes | None, method: str = MUX_METHOD) -> Call:
        now, mono = self.clock.now(), self.clock.monotonic()
        # No transport deadline: the envelope stage takes the call's deadline from the signed envelope.
        return Call(
            listener=Listener.PEER,
            method=method,
            metadata=(),
            peer_certificate=peer_certificate,
            started_at=now,
            started_mono=mono,
        )

    async def peer_mux(self, context: PeerContext) -> None:
        """A relay channel (`Relay/Mux`) from another force's gateway: its calls each run as a relayed unary call."""

        async def read() -> bytes | None:
            raw: Any = await context.read()
            return None if raw is grpc.aio.EOF else raw

        async def end(opening: Call, exc: GatewayError) -> None:
            await self.refuse(opening, exc, context)

        await context.send_initial_metadata(())  # accepted: the origin starts writing (`gateway.mux.GrpcPipe`)
        await self._serve_channel(
            _peer_certificate(context), MUX_METHOD, read=read, write=context.write, send_now=None, end=end
        )

    async def peer_link(self, certificate: bytes, connection: LinkConnection) -> None:
        """A relay link (`gateway.relaylink`) from another force's gateway: a relay channel over plain TLS."""

        async def end(opening: Call, exc: GatewayError) -> None:
            if isinstance(exc, Unavailable) and opening.peer is not None:
                log.info("relay link from %s broke: %s", opening.peer.describe(), exc.reason)
                return  # a connection that broke is not a refusal of anything
            await self._record_refusal(opening, exc)

        await self._serve_channel(
            certificate or None,
            LINK_METHOD,
            read=connection.read,
            write=connection.send,
            send_now=connection.send_now,
            end=end,
        )

    async def _serve_channel(
        self,
        certificate: bytes | None,
        method: str,
        *,
        read: Callable[[], Awaitable[bytes | None]],
        write: Callable[[relay_pb2.MuxBatch], Awaitable[None]],
        send_now: Callable[[relay_pb2.MuxBatch], bool] | None,
        end: Callable[[Call, GatewayError], Awaitable[None]],
    ) -> None:
        """Serve one relay channel: the peer is checked once to open it and again for every call on it.

        The peer's force holds one of its places (`PlaceShares`: links, or the peer listener's RPCs)
        while the channel is open. `end` records (and, on gRPC, answers) a refusal of the channel itself.
        """
        opening = self._mux_call(certificate, method)
        try:
            await self.peer_identity.admit(opening)
        except GatewayError as exc:
            await end(opening, exc)
            return

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            call = self._mux_call(certificate, method)
            call.relay_request = request.request
            with self._in_flight(Listener.PEER, unary=True):
                outcome = await self._relayed_unary(call)
            if isinstance(outcome, _Refused):
                return outcome.answer(request.id)
            return relay_pb2.MuxResponse(id=request.id, response=outcome)

        async def refuse(request: relay_pb2.MuxRequest, exc: GatewayError) -> relay_pb2.MuxResponse:
            call = self._mux_call(certificate, method)
            call.peer = opening.peer
            return (await self._record_refusal(call, exc)).answer(request.id)

        async def handle_stream(stream: HostStream, problem: GatewayError | None) -> None:
            # The stream is shaped as the servicer context of `Relay/Stream`: the same handler serves it.
            context = cast(PeerContext, stream)
            if problem is None:
                await self.peer_stream(context)
                return
            call = self.new_call(Listener.PEER, _RELAY_STREAM, context)
            call.peer = opening.peer
            await self.refuse(call, problem, context)

        host = MuxHost(
            read,
            write,
            send_now=send_now,
            handle=handle,
            refuse=refuse,
            handle_stream=handle_stream,
            certificate=certificate,
            max_in_flight=self.config.limits.max_concurrent_calls,
            max_frame=self._max_link_frame if method == LINK_METHOD else self.config.limits.max_message_bytes,
            draining=self._draining,
        )
        shares = self._link_shares if method == LINK_METHOD else self._rpc_shares
        assert opening.peer is not None  # noqa: S101  # the peer-identity stage sets it
        try:
            with shares.hold(opening.peer.force):
                await host.serve()
        except GatewayError as exc:
            await end(opening, exc)

    async def peer_witness(self, raw: bytes, context: PeerContext) -> witness_pb2.AddCheckpointResponse:
        """A peer force's log submits a checkpoint for this gateway to witness."""
        call = self.new_call(Listener.PEER, ADD_CHECKPOINT, context)
        try:
            await self.peer_identity.admit(call)
            assert call.peer is not None  # noqa: S101  # the peer-identity stage sets it
            try:
                request = witness_pb2.AddCheckpointRequest.FromString(raw)
            except DecodeError as exc:
                raise InvalidArgument(f"witness request does not parse: {exc}") from exc
            origin = f"{self._directory.forces[call.peer.force].trust_domain}/audit"

            def count(evidence: ConflictEvidence) -> None:  # the witness kept it and logged it at ERROR
                self.metrics.witness_conflicts.inc(origin=evidence.origin, kind=evidence.kind.value)

            return await witness_reply(
                self.transparency.witness,
                request,
                submitter_origin=origin,
                submitter=call.peer.spiffe_id,
                on_conflict=count,
            )
        except GatewayError as exc:
            code = status_for(exc)
            if conflict_kind(exc) is None:  # evidence of a rollback or fork was logged at ERROR already
                log.warning(
                    "witness refused a checkpoint from %s: %s",
                    call.peer.spiffe_id if call.peer else "an unverified peer",
                    exc.reason,
                    extra={"request_id": call.request_id, "status": code.name},
                )
            await context.abort(code, exc.public)
            raise  # abort() raised already; this keeps type checkers informed

    def _refusal_reply(self, call: Call, exc: GatewayError) -> Reply:
        """A refusal after the envelope verified: recorded, and sealed back to the origin."""
        code = self._note_refusal(call, exc)
        return Reply(code=code, details=exc.public)

    @staticmethod
    def _note_refusal(call: Call, exc: GatewayError) -> grpc.StatusCode:
        """Keep the refusal on the call and log its full reason; the status the caller gets."""
        code = status_for(exc)
        call.refusal = call.refusal or exc
        log.warning(
            "refused %s%s at %s: %s",
            "relayed " if call.envelope is not None else "",
            call.method,
            call.refusal_stage or "forward",
            exc.reason,
            extra={
                "request_id": call.request_id,
                "status": code.name,
                "peer": call.peer.spiffe_id if call.peer else None,
            },
        )
        return code

    async def peer_stream(self, context: PeerContext, *, rpc: bool = False) -> None:
        """A streaming call relayed by another force's gateway: its own `Relay/Stream` RPC (`rpc`), or on a channel.

        A `Relay/Stream` RPC holds one of its force's places on the peer listener (`PlaceShares`)
        while it runs, and must send its envelope within `FIRST_FRAME_SECONDS`; a stream on a
        channel or link is bounded by the channel's own cap on calls in flight.
        """
        with self._in_flight(Listener.PEER):
            call = self.new_call(Listener.PEER, _RELAY_STREAM, context)
            try:
                await self.peer_identity.admit(call)
                assert call.peer is not None  # noqa: S101  # the peer-identity stage sets it
                with self._rpc_shares.hold(call.peer.force) if rpc else contextlib.nullcontext():
                    await self._peer_stream(call, context)
            except GatewayError as exc:
                await self.refuse(call, exc, context)

    async def _peer_stream(self, call: Call, context: PeerContext) -> None:
        downstream: RelayHostDownstream | None = None
        opened = False
        try:
            try:
                first = await asyncio.wait_for(context.read(), FIRST_FRAME_SECONDS)
            except TimeoutError:
                raise DeadlineExceeded(f"relay stream sent no envelope within {FIRST_FRAME_SECONDS:g} s") from None
            if first is grpc.aio.EOF:
                await self.refuse(call, InvalidArgument("relay stream closed before its envelope"), context)
            call.relay_request = first
            await self._peer_admit(call, context)
            downstream = RelayHostDownstream(context, call, self.envelope_verifier, clock=self.clock)
            await self.record(call, "stream-open")
            opened = True
            reply = sealable(call, await self._forward_timed(self._pump(downstream, call)))
        except GatewayError as exc:
            if call.envelope is None:
                raise
            reply = self._refusal_reply(call, exc)
        except asyncio.CancelledError:
            self._record_cancelled(call, "stream-close" if opened else "call")
            raise
        if downstream is None:
            downstream = RelayHostDownstream(context, call, self.envelope_verifier)
        signed = self._sealed(call, reply, downstream.sent_digest, downstream.headers)
        call.status, call.status_message = reply.code.name, reply.details
        try:
            await self.record(call, "stream-close" if opened else "call")
        except GatewayError as exc:
            await self.refuse(call, exc, context)
        await context.write(relay_pb2.RelayFrame(response_seal=signed))


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background record failed: %s", task.exception())


_RELAY_UNARY = "/psn.gateway.v1.Relay/Unary"
_RELAY_STREAM = "/psn.gateway.v1.Relay/Stream"

PeerContext = Context


class _PeerHandler(grpc.GenericRpcHandler):
    """The relay service on the peer listener."""

    def __init__(self, gateway: Gateway) -> None:
        # Requests arrive as raw bytes and are parsed by the gateway, so that garbage from a peer
        # is a refusal that is logged and recorded, not grpc's UNKNOWN before any gateway code runs.
        self._unary: grpc.RpcMethodHandler[bytes, relay_pb2.UnaryRelayResponse]
        self._unary = grpc.unary_unary_rpc_method_handler(
            gateway.peer_unary, response_serializer=relay_pb2.UnaryRelayResponse.SerializeToString
        )
        self._stream: grpc.RpcMethodHandler[bytes, relay_pb2.RelayFrame]
        self._stream = grpc.stream_stream_rpc_method_handler(
            partial(_peer_stream_entry, gateway), response_serializer=relay_pb2.RelayFrame.SerializeToString
        )
        self._mux: grpc.RpcMethodHandler[bytes, relay_pb2.MuxBatch]
        self._mux = grpc.stream_stream_rpc_method_handler(
            partial(_peer_mux_entry, gateway), response_serializer=relay_pb2.MuxBatch.SerializeToString
        )
        self._witness: grpc.RpcMethodHandler[bytes, witness_pb2.AddCheckpointResponse]
        self._witness = grpc.unary_unary_rpc_method_handler(
            gateway.peer_witness, response_serializer=witness_pb2.AddCheckpointResponse.SerializeToString
        )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method == _RELAY_UNARY:
            return self._unary
        if method == _RELAY_STREAM:
            return self._stream
        if method == MUX_METHOD:
            return self._mux
        if method == ADD_CHECKPOINT:
            return self._witness
        return None


async def _peer_stream_entry(gateway: Gateway, _requests: Any, context: PeerContext) -> None:
    await gateway.peer_stream(context, rpc=True)


async def _peer_mux_entry(gateway: Gateway, _requests: Any, context: PeerContext) -> None:
    await gateway.peer_mux(context)


@dataclass(frozen=True)
class _Refused:
    """A recorded refusal: the status and public text its caller gets."""

    code: grpc.StatusCode
    public: str

    def answer(self, call_id: int) -> relay_pb2.MuxResponse:
        """The answer to call `call_id` on a relay channel that carries this refusal."""
        return relay_pb2.MuxResponse(
            id=call_id, refusal=relay_pb2.MuxRefusal(code=self.code.value[0], message=self.public)
        )


class _LocalHandler(grpc.GenericRpcHandler):
    """Accepts any method on the local listener; the pipeline decides."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._cache: dict[tuple[int, str], grpc.RpcMethodHandler[bytes, bytes]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        method = handler_call_details.method
        directory = self._gateway.directory()
        key = (id(directory), method)
        handler = self._cache.get(key)
        if handler is not None:
            return handler
        try:
            call_type = directory.route(method).method.call_type
        except NotFound:
            call_type = None
        gateway = self._gateway
        if call_type is CallType.UNARY:
            handler = grpc.unary_unary_rpc_method_handler(partial(gateway.local_unary, method))
        else:
            handler = grpc.stream_stream_rpc_method_handler(partial(_stream_entry, gateway.local_stream, method))
        if call_type is not None:  # only known methods: unknown ones must not grow the cache
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = handler
        return handler


async def _stream_entry(
    fn: Callable[[str, Context], Coroutine[Any, Any, None]],
    method: str,
    _requests: Any,
    context: Context,
) -> None:
    # grpc passes a request iterator; the handlers use context.read() instead.
    await fn(method, context)
