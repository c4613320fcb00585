"""Building a gateway's transparency log and witness from its configuration and the directory.

Each force's audit log is signed with its log key (certificate SPIFFE ID
``spiffe://<force>.<network>/log``) under the origin ``<force>.<network>/audit``;
the same key cosigns the other forces' checkpoints as ``<force>.<network>/witness``.
The other forces' log certificates come from the directory (``log_cert``) and
must verify against their own force's CA as log keys; a peer whose log
certificate does not verify is not witnessed (and is logged), the gateway
still starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.audit.note import CosignatureSigner, CosignatureVerifier, NoteSigner, NoteVerifier
from gateway.audit.store import AuditLog
from gateway.audit.witness import SqliteWitnessState, Witness
from gateway.audit.witness_grpc import GrpcWitnessClient
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.errors import ConfigError, GatewayError
from gateway.identity import TrustStore, Usage
from gateway.tls import KeyPair

__all__ = ["PeerLog", "Transparency", "build_transparency", "log_origin", "witness_name"]

log = logging.getLogger("psngw.audit")


def log_origin(trust_domain: str) -> str:
    """The checkpoint origin (and note key name) of a force's audit log."""
    return f"{trust_domain}/audit"


def witness_name(trust_domain: str) -> str:
    """The cosignature key name of a force's witness."""
    return f"{trust_domain}/witness"


@dataclass(frozen=True)
class PeerLog:
    """Another force's log key, verified against its CA."""

    force: str
    trust_domain: str
    public_key: ed25519.Ed25519PublicKey
    certificate_pem: bytes


@dataclass
class Transparency:
    """The audit log of the gateway, its witness for the peers, and the peers' log keys."""

    log: AuditLog
    witness: Witness
    peers: list[PeerLog] = field(default_factory=list)

    def register_witnesses(self, channel: Callable[[str], grpc.aio.Channel], *, timeout: float) -> None:
        """Submit our checkpoints to each peer's witness (after `log.open()`)."""
        for peer in self.peers:
            client = GrpcWitnessClient(partial(channel, peer.force), peer=peer.force, timeout=timeout)
            name = witness_name(peer.trust_domain)
            self.log.add_witness(
                name, client, CosignatureVerifier(name, peer.public_key), certificate=peer.certificate_pem
            )


def _log_key(config: GatewayConfig) -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    pair = KeyPair.load(config.log_signing.cert, config.log_signing.key)
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError("the audit-log key must be Ed25519 (C2SP signed notes)", file=config.log_signing.key)
    return key, pair.cert_pem


def peer_logs(config: GatewayConfig, trust: TrustStore, now: float) -> list[PeerLog]:
    """The other forces' log keys from the directory, each verified as a log key of its own force."""
    out = []
    for force in config.directory.forces.values():
        if force.name == config.force or force.log_cert_path is None:
            continue
        try:
            pem = force.log_cert_path.read_bytes()
            identity = trust.verify(pem, Usage.LOG, now)
            if identity.kind != "log" or identity.force != force.name:
                raise ConfigError(f"{identity.spiffe_id} is not the log key of {force.name}")
        except (OSError, GatewayError) as exc:
            reason = exc.reason if isinstance(exc, GatewayError) else str(exc)
            log.error(
                "not witnessing %s: its log certificate %s is unusable: %s", force.name, force.log_cert_path, reason
            )
            continue
        public = log_public_key(pem)
        out.append(PeerLog(force.name, force.trust_domain, public, pem))
    return out


def log_public_key(pem: bytes) -> ed25519.Ed25519PublicKey:
    """The Ed25519 public key of a (verified) log certificate."""
    key = x509.load_pem_x509_certificate(pem).public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError("a log certificate must hold an Ed25519 key")
    return key


def build_transparency(
    config: GatewayConfig, trust: TrustStore, clock: Clock, *, checkpointer: bool = True
) -> Transparency:
    """The audit log (not yet opened) and the witness of this gateway.

    With several worker processes, each appends to the same log (SQLite sequences
    them) and only the `checkpointer` signs checkpoints and collects cosignatures.
    """
    key, cert_pem = _log_key(config)
    td = config.trust_domain
    audit_log = AuditLog(
        config.audit,
        origin=log_origin(td),
        signer=NoteSigner(log_origin(td), key),
        clock=clock,
        certificate=cert_pem,
        checkpointer=checkpointer,
    )
    peers = peer_logs(config, trust, clock.now())
    logs = {log_origin(p.trust_domain): NoteVerifier(log_origin(p.trust_domain), p.public_key) for p in peers}
    witness = Witness(CosignatureSigner(witness_name(td), key), logs, SqliteWitnessState(config.witness_db), clock)
    return Transparency(audit_log, witness, peers)
