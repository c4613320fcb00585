"""Shared helpers of the hostile-conditions tests (corpus, faults, soak, rate limits, namespaces).

A network of its own with config tweaks written before it starts, audit records
read the way auditors read them (`LogReader` + `query`), polling, and the demo
calls every test makes to prove a gateway still serves.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from gateway._proto.psn.demo.intel.v1 import intel_pb2
from tests import netharness as harness
from tests.netharness import NetworkThread, call_outcome, records, records_since, wait_for

__all__ = [
    "HOSTS",
    "LIFTED_RATE_LIMITS",
    "SEARCH",
    "SEARCH_MSG",
    "Outcome",
    "add_to_table",
    "append_config",
    "case_files",
    "custody",
    "fresh_officer",
    "outcome",
    "records",
    "records_since",
    "relay_network",
    "search",
    "still_serving",
    "wait_for",
]

#: application -> the force that hosts it in the demo network
HOSTS = {"intel-search": "thames-valley", "custody-records": "hampshire", "case-files": "surrey"}

#: (status code name, details) of one call
Outcome = tuple[str, str]

#: A `[rate_limits]` table no test's own calls reach (tests that are not about rate limits)
LIFTED_RATE_LIMITS = (
    "[rate_limits]\nforce_rate = 10000.0\nforce_burst = 10000\nunit_rate = 10000.0\nunit_burst = 10000\n"
)


#: The unary method the relay tests call (hosted by Thames Valley), and a request it answers
SEARCH = "/psn.demo.intel.v1.IntelligenceSearch/Search"
SEARCH_MSG = intel_pb2.SearchRequest(subject="alpha").SerializeToString()


def fresh_officer() -> str:
    """An officer id no other test uses, to find one test's records."""
    return f"DC-{secrets.token_hex(5)}"


def relay_network(root: Path, *, relay_links: bool) -> Iterator[NetworkThread]:
    """A module's own network with rate limits lifted, relaying by links or by gRPC only (a fixture body)."""
    net = NetworkThread(root, relay_links=relay_links)
    append_config(net, LIFTED_RATE_LIMITS)
    net.start()
    yield net
    net.stop()


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


def named(result: tuple[grpc.StatusCode, str]) -> Outcome:
    """A call's outcome with the status by name."""
    return result[0].name, result[1]


def outcome(fn: Callable[[], Any]) -> Outcome:
    """Run `fn`; its status name and details (OK and "" if it returned)."""
    return named(call_outcome(fn))


def search(ch: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """IntelligenceSearch.Search (thames-valley); checks the answer."""
    return named(harness.search(ch, timeout=timeout))


def custody(ch: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """CustodyRecords.GetRecord (hampshire); checks the answer."""
    return named(harness.custody(ch, timeout=timeout))


def case_files(ch: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """CaseFiles.FetchDocument, a server stream (surrey); checks every byte arrived."""
    return named(harness.case_files(ch, timeout=timeout))


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
