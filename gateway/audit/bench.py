"""Benchmarks of the audit log: durable records per second through group commit, and `verify` speed.

Each function builds what it measures in a temporary directory, returns a dict of figures, and
reports ratios against a baseline measured in the same run (figures from different runs or
machines are not comparable; ratios mostly are):

- `bench_append`: records acknowledged durable per second with many concurrent appenders (group
  commit), against one appender waiting for each record (one fsync per record);
- `bench_verify`: records per second through `tools.verify_log`, against bare SHA-256 leaf hashing
  of the same bytes (the floor any verifier pays);
- `bench_call_path`: process CPU microseconds per record of the gateway's whole audit stage (`record_for`
  on a relayed call, then `AuditLog.append` with many appenders on one event loop, the writer thread
  included) and of the per-call metrics the server observes, with its parts measured alone.

`psngw bench` (gateway.bench) and ``make bench`` call these; they are not tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.merkle import MerkleTree, leaf_hash
from gateway.audit.note import Checkpoint, CosignatureSigner, NoteSigner, sign_note
from gateway.audit.record import AuditRecord, format_time
from gateway.audit.recorder import record_for
from gateway.audit.store import AuditConfig, AuditLog, LogReader
from gateway.audit.tools import TrustAnchors, verify_log
from gateway.clock import SystemClock
from gateway.directory import Application, CallType, Method, Route
from gateway.identity import PeerIdentity
from gateway.metrics import GatewayMetrics, Registry
from gateway.pipeline import Call, Listener
from gateway.policy.values import Decision
from gateway.principal import Principal, Purpose

__all__ = ["bench_append", "bench_call_path", "bench_verify", "sample_call", "sample_record"]

_ORIGIN = "bench.se.psn/audit"
#: another force's witness, which cosigns the benchmark log's last checkpoint
_PEER_WITNESS = "peer.se.psn/witness"


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


def _build_log(db: Path, signer: NoteSigner, records: int, every: int, witness: CosignatureSigner) -> None:
    """Write a log of `records` sample records with a checkpoint every `every`, directly (fast).

    The last checkpoint is cosigned by `witness` (another force's, as `verify_log` requires), which
    vouches for the earlier ones as its prefix.
    """
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
            body = Checkpoint(_ORIGIN, tree.size, tree.root()).body()
            note = sign_note(body, [signer])
            conn.execute(
                "INSERT INTO checkpoints (size, root, note, signed_at) VALUES (?, ?, ?, ?)",
                (tree.size, tree.root(), note.text(), time.time()),
            )
    now = int(time.time())
    conn.execute("INSERT INTO witness_keys VALUES (?, ?, NULL, ?)", (witness.vkey(), witness.name, now))
    conn.execute(
        "INSERT INTO cosignatures VALUES (?, ?, ?, ?, ?)",
        (tree.size, witness.name, witness.cosign(body, now).line(), now, now),
    )
    conn.execute("COMMIT")
    conn.close()


def bench_verify(records: int = 200_000, *, every: int = 1000, directory: Path | None = None) -> dict[str, float]:
    """Records per second through `verify_log` (the target is at least 100,000), against bare leaf hashing.

    Figures: ``verify_records_per_s``, ``sha256_records_per_s`` (leaf hashes of the same bytes,
    nothing else), ``verify_vs_sha256``, and ``checkpoints``.
    """
    signer = NoteSigner(_ORIGIN, Ed25519PrivateKey.generate())
    witness = CosignatureSigner(_PEER_WITNESS, Ed25519PrivateKey.generate())
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        db = Path(tmp) / "verify.db"
        _build_log(db, signer, records, every, witness)
        anchors = TrustAnchors(
            log_verifiers=(signer.verifier(),), witness_verifiers=(witness.verifier(),), at=time.time()
        )
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


_GATEWAY = "spiffe://thames-valley.se.psn/gateway"
_FORCE = "thames-valley"
#: The stages whose durations a relayed call at the host gateway observes (peer listener).
_PEER_STAGES = ("peer-identity", "envelope", "route", "deadline", "rate-limit", "policy", "forward", "audit")


def sample_call(i: int, *, now_mono: float = 0.0) -> Call:
    """A relayed call as the host gateway's pipeline leaves it: every field the audit record reads is set."""
    digest = hashlib.sha256(i.to_bytes(8, "big")).digest()
    method = Method("psn.demo.intel.v1.IntelligenceSearch", "Search", CallType.UNARY)
    application = Application("intel-search", "Intelligence search", _FORCE, "SC", (method,))
    call = Call(
        Listener.PEER,
        method.path,
        (),
        None,
        1_800_000_000.0,
        now_mono,
        request_id=digest.hex()[:32],
        peer=PeerIdentity(
            "spiffe://hampshire.se.psn/gateway", "hampshire", "gateway", None, digest.hex(), i, 1_900_000_000.0
        ),
        route=Route(application, method),
        principal=Principal(f"HC{i % 977:05d}", "hampshire", ("serocu",), ("investigator",), "SC"),
        purpose=Purpose("INV", f"OP/{i % 113}", "intelligence check on a named associate"),
        decision=Decision(
            True, digest.hex()[32:], digest.hex(), "rules.csv:12: p, serocu, hampshire, intel-search", ""
        ),
        origin_force="hampshire",
        origin_gateway="spiffe://hampshire.se.psn/gateway",
        request_digest=digest,
        response_digest=hashlib.sha256(digest).digest(),
        request_messages=1,
        response_messages=1,
        envelope_signature=digest + digest,
        seal_signature=digest[::-1] * 2,
    )
    call.status = "OK"
    return call


def _cpu_us(fn: Callable[[], object], n: int) -> float:
    """Process CPU microseconds (every thread) per item of `fn()`, which handles `n` items."""
    start = time.process_time()
    fn()
    return (time.process_time() - start) / n * 1e6


def bench_call_path(records: int = 20_000, appenders: int = 64, *, directory: Path | None = None) -> dict[str, float]:
    """Process CPU per record of the audit stage, and per call of the server's metrics.

    Figures, in CPU microseconds (process time, so the writer thread is included):
    ``record_for_us`` (building the record of a relayed call), ``encode_us`` (indexing, canonical
    bytes and the Merkle leaf, as the writer does for each record), ``stage_us`` (the whole stage:
    `record_for` and `AuditLog.append` from `appenders` concurrent tasks on one event loop, fsyncs
    and group commits included), and ``metrics_us`` (one call's observations: its stages, the call
    counter and the call latency). Also ``records_per_s`` (wall clock) and ``mean_batch``.
    """
    calls = [sample_call(i) for i in range(records)]
    signer = NoteSigner(_ORIGIN, Ed25519PrivateKey.generate())
    out: dict[str, float] = {"records": float(records), "appenders": float(appenders)}

    def build() -> list[AuditRecord]:
        return [
            record_for(c, "call", gateway=_GATEWAY, force=_FORCE, now=1_800_000_000.0 + i / 1e4, now_mono=0.004)
            for i, c in enumerate(calls)
        ]

    built = build()
    out["record_for_us"] = _cpu_us(build, records)
    out["encode_us"] = _cpu_us(lambda: [leaf_hash(r.with_index(i).encode()) for i, r in enumerate(built)], records)

    async def stage(log: AuditLog) -> None:
        queue = iter(enumerate(calls))
        clock = SystemClock()

        async def worker() -> None:
            for _, call in queue:
                record = record_for(
                    call, "call", gateway=_GATEWAY, force=_FORCE, now=clock.now(), now_mono=clock.monotonic()
                )
                await log.append(record)

        await asyncio.gather(*(worker() for _ in range(appenders)))

    async def run(tmp: Path) -> None:
        log = _new_log(tmp / "stage.db", signer)
        log.open()
        await log.append(record_for(calls[0], "call", gateway=_GATEWAY, force=_FORCE, now=0.0, now_mono=0.0))
        wall = time.perf_counter()
        cpu = time.process_time()
        await stage(log)
        out["stage_us"] = (time.process_time() - cpu) / records * 1e6
        out["records_per_s"] = records / (time.perf_counter() - wall)
        out["mean_batch"] = records / max(1, log.status()["commits"] - 1)
        await log.close()

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        asyncio.run(run(Path(tmp)))

    metrics = GatewayMetrics(Registry(), version="bench")

    def count(call: Call) -> None:
        metrics.calls.inc(
            listener=call.listener.value,
            origin_force=call.origin_force or "unknown",
            application=call.route.application.name if call.route else "unknown",
            decision="allow",
            status=call.status,
        )
        metrics.call_duration.observe(0.004, listener=call.listener.value, application="intel-search")

    def observe() -> None:
        stage_duration = metrics.stage_duration
        for call in calls:
            for name in _PEER_STAGES:
                stage_duration.observe(0.0001, stage=name)
            count(call)

    out["metrics_us"] = _cpu_us(observe, records)
    # Series bound once, as the server holds them.
    stages = [metrics.stage_duration.labels(stage=name) for name in _PEER_STAGES]
    in_flight = metrics.calls_in_flight.labels(listener="peer")

    def observe_bound() -> None:
        for call in calls:
            in_flight.inc()
            for series in stages:
                series.observe(0.0001)
            count(call)
            in_flight.dec()

    out["metrics_bound_us"] = _cpu_us(observe_bound, records)
    return out
