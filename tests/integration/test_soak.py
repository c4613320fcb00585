"""Soak: mixed traffic of every call type, allowed and refused, from all three forces, for a bounded time.

Checks, at the end: no call ended with a status other than the one expected of it;
every record is there (each kind of call leaves a known number of records at the
origin and at the host: the records per officer id are counted); the tree of every
log verifies against the network directory; and memory stayed flat.

`test_soak_short` (about 10 s) runs in `make test`; `test_soak_long` (marker
``slow``, ``PSN_SOAK_SECONDS``, default 120) runs in `make soak`.

Memory. The network runs in this process, so its resident set size (VmRSS from
/proc/self/status) is sampled after a warm-up and at the end. Some growth is by
design and proportional to the traffic: each record adds a leaf to the in-memory
Merkle tree (32 bytes per leaf plus its share of the inner levels), and each relayed
request id stays in the replay store until its window (30 s by default) passes. The tolerance
is therefore a budget per call (`PER_CALL_BYTES`) on top of a fixed allowance
(`FIXED_BYTES`: allocator arenas, grpc and SQLite caches reaching their working
size); a leak of even one message buffer per call (several KiB) exceeds it.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway.audit.store import LogReader
from gateway.audit.tools import load_anchors, verify_log
from tests.integration._hostile_common import HOSTS, append_config, outcome, records
from tests.netharness import NetworkThread

pytestmark = pytest.mark.integration

FORCES = ("thames-valley", "hampshire", "surrey")
CUSTODY_UNIT = {"thames-valley": "tvp-custody", "hampshire": "hants-custody", "surrey": "surrey-custody"}
PER_CALL_BYTES = 1024
FIXED_BYTES = 24 * 1024 * 1024


@dataclass(frozen=True)
class Kind:
    """One kind of call: how to make it, what must come of it, how many records it leaves."""

    name: str
    application: str
    expected: str
    #: records at the origin gateway, and at the host if the host is another force
    origin_records: int
    host_records: int
    call: Callable[[grpc.Channel], None]
    #: response messages each call delivers (what its closing record must count, at every gateway)
    responses: int = 0
    units: tuple[str, ...] = ("serocu",)
    roles: tuple[str, ...] = ("investigator",)
    clearance: str = "SC"
    purpose: bool = True


def _search(ch: grpc.Channel) -> None:
    reply = intel_pb2_grpc.IntelligenceSearchStub(ch).Search(intel_pb2.SearchRequest(subject="alpha"), timeout=10)
    assert len(reply.matches) == 3


def _stream_matches(ch: grpc.Channel) -> None:
    got = list(
        intel_pb2_grpc.IntelligenceSearchStub(ch).StreamMatches(intel_pb2.SearchRequest(subject="alpha"), timeout=10)
    )
    assert len(got) == 3


def _get_record(ch: grpc.Channel) -> None:
    stub = custody_pb2_grpc.CustodyRecordsStub(ch)
    assert stub.GetRecord(custody_pb2.GetRecordRequest(custody_number="HC/00001/26"), timeout=10).custody_number


def _bulk_lookup(ch: grpc.Channel) -> None:
    numbers = [custody_pb2.GetRecordRequest(custody_number=f"HC/{n:05d}/26") for n in (1, 2, 3)]
    summary = custody_pb2_grpc.CustodyRecordsStub(ch).BulkLookup(iter(numbers), timeout=10)
    assert len(summary.found) == 3


def _fetch_document(ch: grpc.Channel) -> None:
    request = casefiles_pb2.FetchDocumentRequest(case_reference="C", document_id="D")
    chunks = list(casefiles_pb2_grpc.CaseFilesStub(ch).FetchDocument(request, timeout=10))
    assert len(chunks) == 4 and sum(len(c.data) for c in chunks) == 65536


def _review(ch: grpc.Channel) -> None:
    comments = (casefiles_pb2.ReviewComment(case_reference="C", paragraph=str(i), comment="ok") for i in range(3))
    assert [a.sequence for a in casefiles_pb2_grpc.CaseFilesStub(ch).Review(comments, timeout=10)] == [1, 2, 3]


def _unknown(ch: grpc.Channel) -> None:
    ch.unary_unary("/psn.demo.firearms.v1.Licensing/Lookup")(b"", timeout=10)


def kinds(force: str) -> list[Kind]:
    """Every kind of call an officer of `force` makes in the soak."""
    custody = {"units": (CUSTODY_UNIT[force],), "roles": ("custody-officer",), "clearance": "NPPV3"}
    return [
        Kind("search", "intel-search", "OK", 1, 1, _search, 1),
        Kind("stream-matches", "intel-search", "OK", 2, 2, _stream_matches, 3),
        Kind("get-record", "custody-records", "OK", 1, 1, _get_record, 1),
        Kind("bulk-lookup", "custody-records", "OK", 2, 2, _bulk_lookup, 1, **custody),  # type: ignore[arg-type]
        Kind("fetch-document", "case-files", "OK", 2, 2, _fetch_document, 4),
        Kind("review", "case-files", "OK", 2, 2, _review, 3),
        # refused at the origin gateway: one record there, nothing relayed
        Kind("no-purpose", "intel-search", "INVALID_ARGUMENT", 1, 0, _search, purpose=False),
        Kind("custody-searches-intel", "intel-search", "PERMISSION_DENIED", 1, 0, _search, **custody),  # type: ignore[arg-type]
        Kind("serocu-bulk-lookup", "custody-records", "PERMISSION_DENIED", 1, 0, _bulk_lookup),
        Kind("unknown-service", "intel-search", "NOT_FOUND", 1, 0, _unknown),
    ]


@pytest.fixture(scope="module")
def snet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkThread]:
    net = NetworkThread(tmp_path_factory.mktemp("soak-net"))
    append_config(
        net, "[rate_limits]\nforce_rate = 100000.0\nforce_burst = 100000\nunit_rate = 100000.0\nunit_burst = 100000\n"
    )
    net.start()
    net.manifest()
    yield net
    net.stop()


def rss_bytes() -> int:
    """This process's resident set size (the in-process network's included)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@dataclass
class _Tally:
    calls: Counter[tuple[str, str, str]]  # (force, kind, officer) -> calls
    unexpected: list[str]


def _worker(net: NetworkThread, force: str, index: int, stop: threading.Event, tally: _Tally) -> None:
    channels = []
    plan = []
    for kind in kinds(force):
        officer = f"SOAK-{force[:2]}{index}-{kind.name}"
        ch = net.officer_channel(
            force,
            units=kind.units,
            roles=kind.roles,
            clearance=kind.clearance,
            officer=officer,
            **({} if kind.purpose else {"purpose": None}),  # type: ignore[arg-type]
        )
        channels.append(ch)
        plan.append((kind, officer, ch))
    try:
        while not stop.is_set():
            for kind, officer, ch in plan:
                status, details = outcome(lambda kind=kind, ch=ch: kind.call(ch))  # type: ignore[misc]
                tally.calls[(force, kind.name, officer)] += 1
                if status != kind.expected:
                    tally.unexpected.append(f"{force} {kind.name}: {status} {details}")
    finally:
        for ch in channels:
            ch.close()


def soak(net: NetworkThread, seconds: float, *, warm_up: float) -> dict[str, float]:
    """Run the mixed traffic for `seconds`; check statuses, records, trees and memory; return figures."""
    before = {f: len(records(net, f)) for f in FORCES}
    tally = _Tally(Counter(), [])
    stop = threading.Event()
    threads = [
        threading.Thread(target=_worker, args=(net, force, i, stop, tally), name=f"soak-{force}-{i}")
        for force in FORCES
        for i in range(2)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(warm_up)
    gc.collect()
    calls_at_warm = sum(tally.calls.values())
    rss_warm = rss_bytes()
    time.sleep(max(0.0, seconds - warm_up))
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - started
    gc.collect()
    rss_end = rss_bytes()
    calls = sum(tally.calls.values())

    # 1. no unexpected status
    assert not tally.unexpected, tally.unexpected[:20]

    # 2. every record present: per officer id, exactly the records its calls leave, at origin and host
    by_kind = {(f, k.name): k for f in FORCES for k in kinds(f)}
    expected_total = Counter[str]()
    missing = []
    for (force, name, officer), n in tally.calls.items():
        kind = by_kind[(force, name)]
        host = HOSTS[kind.application]
        want = {force: n * kind.origin_records}
        if host != force and kind.host_records:
            want[host] = n * kind.host_records
        for gateway, count in want.items():
            expected_total[gateway] += count
            found = records(net, gateway, officer=officer)
            if len(found) != count:
                missing.append(f"{gateway} has {len(found)} records of {officer}, expected {count}")
            wrong = {r.response_messages for r in found if r.event != "stream-open"} - {kind.responses}
            if wrong:
                missing.append(f"{gateway} counts {wrong} responses for {officer}, expected {kind.responses}")
    assert not missing, missing
    for force in FORCES:
        assert len(records(net, force)) - before[force] == expected_total[force], force

    # 3. every tree verifies, with a checkpoint covering every record
    anchors = load_anchors(directory=net.layout.directory_path, at=time.time())
    for force in FORCES:
        log = net.network.gateways[force].audit_log
        log.wait_checkpoint(log.size, timeout=30)
        with LogReader.open(net.layout.config(force).audit.db) as reader:
            report = verify_log(reader, anchors)
        assert not report.findings, (force, [str(f) for f in report.findings[:5]])

    # 4. memory flat (module docstring: a budget per call on top of a fixed allowance)
    growth = rss_end - rss_warm
    budget = FIXED_BYTES + PER_CALL_BYTES * (calls - calls_at_warm)
    assert growth <= budget, (
        f"RSS grew {growth / 2**20:.1f} MiB over {calls - calls_at_warm} calls (budget {budget / 2**20:.1f} MiB)"
    )
    figures = {
        "seconds": elapsed,
        "calls": calls,
        "calls_per_second": calls / elapsed,
        "records": sum(expected_total.values()),
        "rss_warm_mib": rss_warm / 2**20,
        "rss_end_mib": rss_end / 2**20,
        "rss_growth_bytes_per_call": growth / max(1, calls - calls_at_warm),
    }
    print("soak figures:", {k: round(v, 2) for k, v in figures.items()})
    return figures


def test_soak_short(snet: NetworkThread) -> None:
    figures = soak(snet, 10.0, warm_up=3.0)
    assert figures["calls"] > 200


@pytest.mark.slow
def test_soak_long(snet: NetworkThread) -> None:
    seconds = float(os.environ.get("PSN_SOAK_SECONDS", "120"))
    figures = soak(snet, seconds, warm_up=min(20.0, seconds / 4))
    assert figures["calls"] > 20 * seconds
