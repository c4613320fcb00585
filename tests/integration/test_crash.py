"""A gateway killed with SIGKILL under load, several times: no response without its record.

Thames Valley's gateway runs as a `psngw serve` process; the other gateways and
the applications run in this process. Client threads call through Thames
Valley (its own intel-search, and Hampshire's custody records over the relay)
and keep the request id of every response they receive. The gateway is killed
at random moments and restarted. At the end, every one of those request ids has
its record in Thames Valley's log, the tree verifies against its checkpoints
(signed and cosigned), and each restart found a log consistent with the last.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway.audit.store import LogReader
from gateway.audit.tools import QueryFilter, load_anchors, query, verify_log
from tests.netharness import NetworkThread

pytestmark = pytest.mark.integration

KILLS = 3


class Gateway:
    """Thames Valley's gateway as a process that can be killed and restarted."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, address: str) -> None:
        with self.log.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        host, port = address.rsplit(":", 1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            with socket.socket() as s:
                if s.connect_ex((host, int(port))) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("gateway did not start")

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)


@pytest.fixture
def crash_net(tmp_path: Path) -> Iterator[tuple[NetworkThread, Gateway]]:
    network = NetworkThread(tmp_path / "net")
    layout = network.layout
    for force, apps in layout.hosted.items():
        for app in apps:
            network.run(network.network.start_app(force, app))
    for force in ("hampshire", "surrey"):
        network.run(network.network.start_gateway(force))
    gateway = Gateway(layout.configs["thames-valley"], tmp_path / "tv.log")
    gateway.start(layout.local_address("thames-valley"))
    yield network, gateway
    gateway.stop()
    network.stop()


def _load(network: NetworkThread, stop: threading.Event, received: list[str], errors: list[str]) -> None:
    with network.officer_channel("thames-valley", officer="DC-CRASH") as ch:
        intel = intel_pb2_grpc.IntelligenceSearchStub(ch)
        with network.officer_channel(
            "thames-valley", officer="PS-CRASH", units=("tvp-custody",), roles=("custody-officer",), clearance="NPPV3"
        ) as cch:
            custody = custody_pb2_grpc.CustodyRecordsStub(cch)
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if n % 2:
                        _, call = intel.Search.with_call(intel_pb2.SearchRequest(subject="alpha"), timeout=5)
                    else:
                        _, call = custody.GetRecord.with_call(
                            custody_pb2.GetRecordRequest(custody_number="HC/00003/26"), timeout=5
                        )
                except grpc.RpcError as exc:
                    # While the gateway is dead or restarting: refused, never a wrong answer.
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        errors.append(f"{exc.code().name}: {exc.details()}")
                    time.sleep(0.02)
                    continue
                received.append(dict(call.trailing_metadata())["psn-request-id"])


def test_every_response_received_has_its_record_after_repeated_sigkill(
    crash_net: tuple[NetworkThread, Gateway],
) -> None:
    network, gateway = crash_net
    layout = network.layout
    rng = random.Random(6962)
    stop = threading.Event()
    received: list[str] = []
    errors: list[str] = []
    clients = [threading.Thread(target=_load, args=(network, stop, received, errors)) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        for _ in range(KILLS):
            before = len(received)
            time.sleep(rng.uniform(0.8, 2.0))
            assert len(received) > before, "no call succeeded since the last restart"
            gateway.kill()
            time.sleep(rng.uniform(0.1, 0.5))
            gateway.start(layout.local_address("thames-valley"))  # refuses to start on a divergent log
        before = len(received)
        time.sleep(1.5)
        assert len(received) > before, "no call succeeded after the last restart"
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    gateway.stop()
    assert not errors, errors[:5]
    assert len(received) > 50

    db = layout.config("thames-valley").audit.db
    with LogReader.open(db) as reader:
        recorded = {r.request_id for r in query(reader, QueryFilter(status="OK"))}
        report = verify_log(reader, load_anchors(directory=layout.directory_path, at=time.time()))
    missing = set(received) - recorded
    assert not missing, f"{len(missing)} responses without a record, e.g. {sorted(missing)[:3]}"
    assert not report.findings, report.findings
    assert report.checkpoints >= 1
