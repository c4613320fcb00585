"""Benchmarks of the audit log: durable records per second through group commit, and `verify` speed.

Each function builds what it measures in a temporary directory, returns a dict of figures, and
reports ratios against a baseline measured in the same run (figures from different runs or
machines are not comparable; ratios mostly are):

- `bench_append`: records acknowledged durable per second with many concurrent appenders (group
  commit), against one appender waiting for each record (one fsync per record);
- `bench_verify`: records per second through `tools.verify_log`, against bare SHA-256 leaf hashing
  of the same bytes (the floor any verifier pays).

`psngw bench` (gateway.bench) and ``make bench`` call these; they are not tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.merkle import MerkleTree, leaf_hash
from gateway.audit.note import Checkpoint, NoteSigner, sign_note
from gateway.audit.record import AuditRecord, format_time
from gateway.audit.store import AuditConfig, AuditLog, LogReader
from gateway.audit.tools import TrustAnchors, verify_log
from gateway.clock import SystemClock

__all__ = ["bench_append", "bench_verify", "sample_record"]

_ORIGIN = "bench.se.psn/audit"


def sample_record(i: int, *, now: float = 1_800_000_000.0) -> AuditRecord:
    """A realistic call record (about 1.1 kB encoded) for benchmarks."""
    digest = hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
    return AuditRecord(
        event="call",
        time=format_time(now + i / 1000),
        gateway="spiffe://thames-valley.se.psn/gateway",
        force="thames-valley",
        request_id=digest[:32],
        peer="spiffe://hampshire.se.psn/gateway",
        origin_force="hampshire",
        origin_gateway="spiffe://hampshire.se.psn/gateway",
        officer_id=f"HC{i % 977:05d}",
        units=("serocu",),
        roles=("investigator",),
        clearance="SC",
        purpose_code="INV",
        purpose_case=f"OP/{i % 113}",
        purpose_text="intelligence check on a named associate",
        application="intel-search",
        method="/psn.demo.intel.v1.IntelligenceSearch/Search",
        call_type="unary",
        host_force="thames-valley",
        recipients=("hampshire", "serocu"),
        decision_allowed=True,
        decision_rule="p, serocu, hampshire, intel-search, allow",
        policy_version=digest,
        decision_id=digest[32:],
        status="OK",
        latency_ms=3.5,
        request_digest=digest,
        response_digest=digest,
        request_messages=1,
        response_messages=1,
        envelope_signature="A" * 88,
        seal_signature="B" * 88,
    )


def _new_log(db: Path, signer: NoteSigner) -> AuditLog:
    config = AuditConfig(db=db, checkpoint_every=1000, checkpoint_interval=1.0)
    return AuditLog(config, origin=_ORIGIN, signer=signer, clock=SystemClock())


def bench_append(records: int = 20_000, appenders: int = 256, *, directory: Path | None = None) -> dict[str, float]:
    """Durable records per second: `appenders` concurrent tasks sharing group commits, against one at a time.

    Figures: ``group_records_per_s`` (the target is at least 5,000), ``single_records_per_s`` (one
    record per transaction), ``group_vs_single``, ``mean_batch`` (records per commit).
    """
    signer = NoteSigner(_ORIGIN, Ed25519PrivateKey.generate())
    template = [sample_record(i) for i in range(records)]

    async def group(log: AuditLog) -> float:
        queue = iter(template)

        async def worker() -> None:
            for record in queue:
                await log.append(record)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(appenders)))
        return time.perf_counter() - start

    async def single(log: AuditLog, n: int) -> float:
        start = time.perf_counter()
        for record in template[:n]:
            await log.append(record)
        return time.perf_counter() - start

    async def run(tmp: Path) -> dict[str, float]:
        log = _new_log(tmp / "group.db", signer)
        log.open()
        group_s = await group(log)
        commits = log.status()["commits"]
        await log.close()
        single_n = max(1, min(records, 1000))
        log = _new_log(tmp / "single.db", signer)
        log.open()
        single_s = await single(log, single_n)
        await log.close()
        group_rate = records / group_s
        single_rate = single_n / single_s
        return {
            "records": float(records),
            "appenders": float(appenders),
            "group_seconds": group_s,
            "group_records_per_s": group_rate,
            "mean_batch": records / max(1, commits),
            "single_records_per_s": single_rate,
            "group_vs_single": group_rate / single_rate,
        }

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        return asyncio.run(run(Path(tmp)))


def _build_log(db: Path, signer: NoteSigner, records: int, every: int) -> None:
    """Write a log of `records` sample records with a checkpoint every `every`, directly (fast)."""
    log = AuditLog(AuditConfig(db=db), origin=_ORIGIN, signer=signer, clock=SystemClock())
    log.open()
    log.close_blocking()
    conn = sqlite3.connect(db, isolation_level=None)
    tree = MerkleTree()
    conn.execute("BEGIN IMMEDIATE")
    batch: list[tuple[int, bytes, bytes]] = []
    for i in range(records):
        data = sample_record(i).with_index(i).encode()
        h = leaf_hash(data)
        batch.append((i, h, data))
        tree.append(h)
        if tree.size % every == 0 or i == records - 1:
            conn.executemany("INSERT INTO records (idx, leaf_hash, data) VALUES (?, ?, ?)", batch)
            batch = []
            note = sign_note(Checkpoint(_ORIGIN, tree.size, tree.root()).body(), [signer])
            conn.execute(
                "INSERT INTO checkpoints (size, root, note, signed_at) VALUES (?, ?, ?, ?)",
                (tree.size, tree.root(), note.text(), time.time()),
            )
    conn.execute("COMMIT")
    conn.close()


def bench_verify(records: int = 200_000, *, every: int = 1000, directory: Path | None = None) -> dict[str, float]:
    """Records per second through `verify_log` (the target is at least 100,000), against bare leaf hashing.

    Figures: ``verify_records_per_s``, ``sha256_records_per_s`` (leaf hashes of the same bytes,
    nothing else), ``verify_vs_sha256``, and ``checkpoints``.
    """
    signer = NoteSigner(_ORIGIN, Ed25519PrivateKey.generate())
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        db = Path(tmp) / "verify.db"
        _build_log(db, signer, records, every)
        anchors = TrustAnchors(log_verifiers=(signer.verifier(),), at=time.time())
        with LogReader.open(db) as reader:
            start = time.perf_counter()
            report = verify_log(reader, anchors)
            verify_s = time.perf_counter() - start
            if not report.ok:  # pragma: no cover - a self-check of the benchmark
                raise AssertionError(f"the benchmark log does not verify: {report.first}")
            datas = [d for _, _, d in reader.rows()]
        start = time.perf_counter()
        for data in datas:
            leaf_hash(data)
        hash_s = time.perf_counter() - start
    verify_rate = records / verify_s
    hash_rate = records / hash_s
    return {
        "records": float(records),
        "checkpoints": float(report.checkpoints),
        "verify_seconds": verify_s,
        "verify_records_per_s": verify_rate,
        "sha256_records_per_s": hash_rate,
        "verify_vs_sha256": verify_rate / hash_rate,
    }
