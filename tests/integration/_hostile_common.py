"""Shared helpers of the hostile-conditions tests (corpus, faults, soak, rate limits, namespaces).

A network of its own with config tweaks written before it starts, audit records
read the way auditors read them (`LogReader` + `query`), polling, and the demo
calls every test makes to prove a gateway still serves.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway.audit.record import AuditRecord
from gateway.audit.store import LogReader
from gateway.audit.tools import QueryFilter, query
from tests.netharness import NetworkThread

__all__ = [
    "HOSTS",
    "Outcome",
    "add_to_table",
    "append_config",
    "case_files",
    "custody",
    "outcome",
    "records",
    "records_since",
    "search",
    "still_serving",
    "wait_for",
]

#: application -> the force that hosts it in the demo network
HOSTS = {"intel-search": "thames-valley", "custody-records": "hampshire", "case-files": "surrey"}

#: (status code name, details) of one call
Outcome = tuple[str, str]


def add_to_table(text: str, table: str, lines: str) -> str:
    """Insert `lines` at the start of `[table]` in TOML `text` (the table must exist once)."""
    pattern = re.compile(rf"^\[{re.escape(table)}\][^\n]*\n", re.M)
    new, n = pattern.subn(lambda m: m.group(0) + lines.rstrip("\n") + "\n", text)
    if n != 1:
        raise AssertionError(f"table [{table}] not found exactly once")
    return new


def append_config(net: NetworkThread, extra: str | Mapping[str, str], *, audit: str = "") -> None:
    """Append TOML `extra` to every gateway config (or per force), and `audit` keys into `[audit]`; before start."""
    for force, path in net.layout.configs.items():
        text = path.read_text()
        if audit:
            text = add_to_table(text, "audit", audit)
        more = extra if isinstance(extra, str) else extra.get(force, "")
        path.write_text(text + "\n" + more)


def records(net: NetworkThread, force: str, **flt: Any) -> list[AuditRecord]:
    """`force`'s audit records matching `flt` (a `QueryFilter`), oldest first."""
    with LogReader.open(net.layout.config(force).audit.db) as reader:
        return query(reader, QueryFilter(**flt))


def records_since(net: NetworkThread, force: str, since: float, **flt: Any) -> list[AuditRecord]:
    """`force`'s records made at or after `since` (epoch seconds)."""
    return records(net, force, since=since, **flt)


def wait_for(predicate: Callable[[], bool], what: str, *, timeout: float = 10.0, every: float = 0.05) -> float:
    """Poll until `predicate()`; return the seconds it took (AssertionError on timeout)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def outcome(fn: Callable[[], Any]) -> Outcome:
    """Run `fn`; its status name and details (OK and "" if it returned)."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def search(ch: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """IntelligenceSearch.Search (thames-valley); checks the answer."""

    def call() -> None:
        reply = intel_pb2_grpc.IntelligenceSearchStub(ch).Search(
            intel_pb2.SearchRequest(subject="alpha"), timeout=timeout
        )
        assert [m.report_id for m in reply.matches] == ["IR-0001", "IR-0002", "IR-0004"]

    return outcome(call)


def custody(ch: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """CustodyRecords.GetRecord (hampshire); checks the answer."""

    def call() -> None:
        reply = custody_pb2_grpc.CustodyRecordsStub(ch).GetRecord(
            custody_pb2.GetRecordRequest(custody_number="HC/00001/26"), timeout=timeout
        )
        assert reply.custody_number == "HC/00001/26"

    return outcome(call)


def case_files(ch: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """CaseFiles.FetchDocument, a server stream (surrey); checks every byte arrived."""

    def call() -> None:
        chunks = list(
            casefiles_pb2_grpc.CaseFilesStub(ch).FetchDocument(
                casefiles_pb2.FetchDocumentRequest(case_reference="C", document_id="D"), timeout=timeout
            )
        )
        assert sum(len(c.data) for c in chunks) == 65536 and chunks[-1].last

    return outcome(call)


#: the call that reaches each force's own application
_OWN_CALL = {"thames-valley": search, "hampshire": custody, "surrey": case_files}


def still_serving(net: NetworkThread, force: str) -> None:
    """`force`'s gateway answers a good call on its local listener, and a good relayed call on its peer listener."""
    with net.officer_channel(force) as ch:
        assert _OWN_CALL[force](ch) == ("OK", ""), f"{force} stopped serving its own applications"
    other = next(f for f in _OWN_CALL if f != force)
    with net.officer_channel(other) as ch:
        assert _OWN_CALL[force](ch) == ("OK", ""), f"{force} stopped serving relayed calls"


def iter_chunks(data: bytes, size: int) -> Iterator[bytes]:
    """`data` in pieces of `size` bytes."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite `path` in place (not atomically), as a careless editor does."""
    with path.open("r+b") as f:
        f.seek(0)
        f.write(data)
        f.truncate()
        f.flush()
