"""Shared test material for the audit store, collector, tools and crash tests.

Keys are derived from labels (deterministic); three forces of the South East network each have a
log and a witness; `FakeWitnessClient` is the in-process twin of the gRPC witness client.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import pki
from gateway.audit.note import CosignatureSigner, CosignatureVerifier, NoteSigner, NoteVerifier
from gateway.audit.record import AuditRecord, format_time
from gateway.audit.store import AuditConfig, AuditLog
from gateway.audit.witness import InMemoryWitnessState, Witness
from gateway.clock import Clock, FakeClock

NETWORK = "se.psn"
FORCES = ("thames-valley", "hampshire", "surrey")
T0 = 1_800_000_000.0


def key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


def domain(force: str) -> str:
    return f"{force}.{NETWORK}"


def origin(force: str) -> str:
    return f"{domain(force)}/audit"


def signer(force: str, label: str | None = None) -> NoteSigner:
    return NoteSigner(origin(force), key(label or force))


def log_verifier(force: str) -> NoteVerifier:
    return signer(force).verifier()


def cosigner(force: str) -> CosignatureSigner:
    # A force's witness cosigns with the same key as its log, under the name <force>.<network>/witness.
    return CosignatureSigner(f"{domain(force)}/witness", key(force))


def cosig_verifier(force: str) -> CosignatureVerifier:
    return cosigner(force).verifier()


def make_record(i: int, *, when: float | None = None, **fields: Any) -> AuditRecord:
    """A plausible call record; `i` varies the officer, unit, decision and request id."""
    base: dict[str, Any] = {
        "event": "call",
        "time": format_time(T0 + i if when is None else when),
        "gateway": f"spiffe://{domain('thames-valley')}/gateway",
        "force": "thames-valley",
        "request_id": f"{i:032x}",
        "peer": f"spiffe://{domain('hampshire')}/gateway",
        "origin_force": ("hampshire", "surrey")[i % 2],
        "origin_gateway": f"spiffe://{domain(('hampshire', 'surrey')[i % 2])}/gateway",
        "officer_id": f"OFF{i % 5}",
        "units": (("serocu",), ("ctpse", "serocu"), ("hc-cid",))[i % 3],
        "roles": ("investigator",),
        "clearance": "SC",
        "purpose_code": "INV",
        "purpose_case": f"OP/{i % 7}",
        "purpose_text": "search for an associate",
        "application": ("intel-search", "custody")[i % 2],
        "method": ("/psn.demo.intel.v1.IntelligenceSearch/Search", "/psn.demo.custody.v1.Custody/Get")[i % 2],
        "call_type": "unary",
        "host_force": "thames-valley",
        "recipients": (("hampshire", "surrey")[i % 2], "serocu"),
        "decision_allowed": i % 4 != 3,
        "decision_rule": "p, serocu, intel-search, *, allow" if i % 4 != 3 else "deny by default",
        "policy_version": "ab" * 32,
        "decision_id": f"{i:032x}",
        "status": "OK" if i % 4 != 3 else "PERMISSION_DENIED",
        "latency_ms": 1.25 + i % 3,
        "request_digest": hashlib.sha256(b"req%d" % i).hexdigest(),
        "response_digest": hashlib.sha256(b"resp%d" % i).hexdigest(),
        "request_messages": 1,
        "response_messages": 1,
        "envelope_signature": "c2lnbmF0dXJl",
        "seal_signature": "c2VhbA==",
    }
    base.update(fields)
    return AuditRecord(**base)


def config(db: Path, **overrides: Any) -> AuditConfig:
    values: dict[str, Any] = {
        "db": db,
        "checkpoint_interval": 3600.0,
        "checkpoint_every": 10,
        "lock_timeout": 0.2,
        "retry_initial": 0.01,
        "retry_max": 0.05,
        "witness_quorum": 2,
        "witness_timeout": 5.0,
    }
    values.update(overrides)
    return AuditConfig(**values)


def new_log(
    db: Path,
    *,
    force: str = "thames-valley",
    clock: Clock | None = None,
    checkpointer: bool = True,
    key_label: str | None = None,
    certificate: bytes | None = None,
    **overrides: Any,
) -> AuditLog:
    return AuditLog(
        config(db, **overrides),
        origin=origin(force),
        signer=signer(force, key_label) if checkpointer else None,
        clock=clock or FakeClock(T0),
        checkpointer=checkpointer,
        certificate=certificate,
    )


def fill(log: AuditLog, n: int, *, start: int = 0) -> list[int]:
    """Append records start..start+n-1 from this thread; return their indexes."""
    return [log.append_blocking(make_record(i)).index for i in range(start, start + n)]


async def fill_async(log: AuditLog, n: int, *, start: int = 0) -> list[int]:
    results = await asyncio.gather(*(log.append(make_record(i)) for i in range(start, start + n)))
    return [r.index for r in results]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll until `predicate()` holds; fail the test after `timeout` seconds (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


async def wait_for_async(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def rows(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def execute(db: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Change a log database behind the gateway's back (a tamperer with file access)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for sql, args in statements:
            conn.execute(sql, args)
        conn.execute("COMMIT")
    finally:
        conn.close()


# -- witnesses ------------------------------------------------------------------------------------


def make_witness(force: str, clock: Clock, logs: tuple[str, ...] = FORCES) -> Witness:
    """Force `force`'s witness for the other forces' logs (in-memory state)."""
    verifiers = {origin(f): log_verifier(f) for f in logs if f != force}
    return Witness(cosigner(force), verifiers, InMemoryWitnessState(), clock)


@dataclass
class FakeWitnessClient:
    """The in-process twin of the gRPC witness client: calls a real `Witness` in a worker thread."""

    witness: Witness
    calls: list[tuple[int, int]] = field(default_factory=list)
    #: if set, replaces the answer (a misbehaving witness)
    answer: Callable[[bytes], bytes] | None = None
    fail: BaseException | None = None
    delay: float = 0.0

    async def add_checkpoint(self, old_size: int, proof: list[bytes], note: bytes) -> bytes:
        self.calls.append((old_size, len(proof)))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        sig = await asyncio.to_thread(self.witness.add_checkpoint, old_size, proof, note)
        line = sig.line()
        return self.answer(line) if self.answer is not None else line


# -- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA per force and a log certificate for each force's key, plus a directory file naming the CAs."""

    directory: Path
    ca_certs: dict[str, bytes]
    log_certs: dict[str, bytes]


def make_pki(root: Path, *, imposter_for: str | None = None) -> Pki:
    """Issue the three forces' CAs and log certificates; write directory.toml under `root`.

    With `imposter_for`, that force's log certificate is issued by another force's CA (which must
    not be believed).
    """
    now = datetime.fromtimestamp(T0, UTC)
    cas: dict[str, tuple[Any, Any]] = {}
    ca_pems: dict[str, bytes] = {}
    for force in FORCES:
        ca_key = pki.generate_key("p256")
        profile = pki.ca_profile(trust_domain=domain(force), display_name=force)
        cert = pki.build_certificate(
            profile,
            public_key=ca_key.public_key(),
            issuer=None,
            issuer_key=ca_key,
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=365),
        )
        cas[force] = (cert, ca_key)
        ca_pems[force] = cert.public_bytes(Encoding.PEM)
        (root / f"{force}-ca.pem").write_bytes(ca_pems[force])
    log_pems: dict[str, bytes] = {}
    for force in FORCES:
        issuer = "surrey" if force == imposter_for and force != "surrey" else force
        if force == imposter_for and force == "surrey":
            issuer = "hampshire"
        profile = pki.leaf_profile(pki.CertKind.LOG_SIGNING, trust_domain=domain(force), display_name=force)
        cert = pki.build_certificate(
            profile,
            public_key=key(force).public_key(),
            issuer=cas[issuer][0],
            issuer_key=cas[issuer][1],
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=90),
        )
        log_pems[force] = cert.public_bytes(Encoding.PEM)
    lines = [f'network = "{NETWORK}"', 'clearance_levels = ["NPPV1", "SC"]', ""]
    for port, force in enumerate(FORCES, start=7441):
        lines += [f"[forces.{force}]", f'ca = "{force}-ca.pem"', f'peer_address = "127.0.0.1:{port}"', ""]
    directory = root / "directory.toml"
    directory.write_text("\n".join(lines))
    return Pki(directory, ca_pems, log_pems)
