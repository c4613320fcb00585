"""A running three-force network for integration tests, on its own event loop thread.

The gateways and demo applications run in a background thread (their own
asyncio loop, as if in another process); tests call them with ordinary
synchronous gRPC stubs, as application developers do.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc

from gateway import client
from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway.audit.record import AuditRecord
from gateway.audit.store import LogReader
from gateway.audit.tools import QueryFilter, query
from gateway.demo.network import DemoNetwork, NetworkLayout, write_network
from gateway.principal import Purpose

PURPOSE = Purpose("investigation", "OP-TEST-0001", "integration test")

T = TypeVar("T")


class NetworkThread:
    """A `DemoNetwork` served by an event loop in a background thread."""

    def __init__(self, root: Path, *, echo: bool = False, relay_links: bool = True) -> None:
        self.layout: NetworkLayout = write_network(root, echo=echo, relay_links=relay_links)
        self.network = DemoNetwork(self.layout)
        self._manifest_lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="network", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run `coro` on the network's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def start(self) -> NetworkThread:
        """Start every application and gateway."""
        self.run(self.network.start())
        return self

    def stop(self) -> None:
        """Stop everything and the loop."""
        try:
            self.run(self.network.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def manifest(self) -> Path:
        """The network's demo.json (written on first use; client threads may ask at once)."""
        path = self.layout.root / "demo.json"
        with self._manifest_lock:
            if not path.exists():
                self.network.write_manifest()
        return path

    def officer_channel(
        self,
        force: str,
        *,
        units: tuple[str, ...] = ("serocu",),
        roles: tuple[str, ...] = ("investigator",),
        clearance: str = "SC",
        officer: str = "DC-2001",
        purpose: Purpose | None = PURPOSE,
        options: list[tuple[str, Any]] | None = None,
    ) -> grpc.Channel:
        """A channel to `force`'s local listener as its client app, with an officer token and purpose."""
        endpoint = client.from_manifest(self.manifest(), force)
        token = endpoint.unsafe_dev_token(officer=officer, units=units, roles=roles, clearance=clearance)
        return endpoint.secure_channel(token=token, purpose=purpose, options=options or ())

    def channel(
        self,
        force: str,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        address: str | None = None,
        server_name: str | None = None,
        ca: Path | None = None,
    ) -> grpc.Channel:
        """A sync mTLS channel to `force`'s local listener, as its client application (or as `cert`)."""
        material = self.layout.material[force]
        client = material.app_clients["analyst-desk"]
        directory = self.layout.directory()
        creds = grpc.ssl_channel_credentials(
            (ca or material.ca).read_bytes(),
            (key or client.key_path).read_bytes(),
            (cert or client.cert_path).read_bytes(),
        )
        return grpc.secure_channel(
            address or self.layout.local_address(force),
            creds,
            options=[("grpc.ssl_target_name_override", server_name or directory.forces[force].gateway_server_name)],
        )


# -- helpers the integration tests share ---------------------------------------------------------

#: (status code, details) of one call
Outcome = tuple[grpc.StatusCode, str]


def wait_for(predicate: Callable[[], bool], what: str, *, timeout: float = 20.0, every: float = 0.05) -> float:
    """Poll `predicate` until it holds; return the seconds it took (AssertionError on timeout)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def records(net: NetworkThread, force: str, **flt: Any) -> list[AuditRecord]:
    """`force`'s audit records matching `flt` (a `QueryFilter`), oldest first."""
    with LogReader.open(net.layout.config(force).audit.db) as reader:
        return query(reader, QueryFilter(**flt))


def records_since(net: NetworkThread, force: str, since: float, **flt: Any) -> list[AuditRecord]:
    """`force`'s records made at or after `since` (epoch seconds)."""
    return records(net, force, since=since, **flt)


def call_outcome(fn: Callable[[], Any]) -> Outcome:
    """Run `fn`; its status and details (OK and "" if it returned)."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def search(channel: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """IntelligenceSearch.Search (hosted by thames-valley); checks the answer when it succeeds."""

    def call() -> None:
        reply = intel_pb2_grpc.IntelligenceSearchStub(channel).Search(
            intel_pb2.SearchRequest(subject="alpha"), timeout=timeout
        )
        assert [m.report_id for m in reply.matches] == ["IR-0001", "IR-0002", "IR-0004"]

    return call_outcome(call)


def custody(channel: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """CustodyRecords.GetRecord (hosted by hampshire); checks the answer when it succeeds."""

    def call() -> None:
        reply = custody_pb2_grpc.CustodyRecordsStub(channel).GetRecord(
            custody_pb2.GetRecordRequest(custody_number="HC/00001/26"), timeout=timeout
        )
        assert reply.custody_number == "HC/00001/26"

    return call_outcome(call)


def case_files(channel: grpc.Channel, *, timeout: float = 10) -> Outcome:
    """CaseFiles.FetchDocument, a server stream (hosted by surrey); checks every byte arrived."""

    def call() -> None:
        chunks = list(
            casefiles_pb2_grpc.CaseFilesStub(channel).FetchDocument(
                casefiles_pb2.FetchDocumentRequest(case_reference="C", document_id="D"), timeout=timeout
            )
        )
        assert sum(len(c.data) for c in chunks) == 65536 and chunks[-1].last

    return call_outcome(call)
