"""`psngw serve --workers 2`: calls from one peer reach every worker, and all land in one audit tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway.audit.store import LogReader
from gateway.audit.tools import load_anchors, verify_log
from tests.netharness import NetworkThread

pytestmark = pytest.mark.integration

CALLS = 60


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetworkThread, subprocess.Popen[str], Path]]:
    network = NetworkThread(tmp_path_factory.mktemp("workers-net"))
    layout = network.layout
    # Surrey opens many connections to each peer, so that SO_REUSEPORT spreads them over the workers.
    surrey = layout.configs["surrey"]
    surrey.write_text(surrey.read_text() + "\n[limits]\npeer_channels = 16\n")
    network.network.gateways.clear()
    # Thames Valley's gateway runs as two worker processes; the rest in this process.
    for force, apps in layout.hosted.items():
        for app in apps:
            network.run(network.network.start_app(force, app))
    for force in ("hampshire", "surrey"):
        network.run(network.network.start_gateway(force))
    log_path = layout.root / "tv-workers.log"
    stderr = log_path.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(layout.configs["thames-valley"]),
            "--workers",
            "2",
            "--log-format",
            "json",
        ],
        stderr=stderr,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    _wait_serving(layout.local_address("thames-valley"), process, log_path)
    yield network, process, log_path
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)
    stderr.close()
    network.stop()


def _wait_serving(address: str, process: subprocess.Popen[str], log_path: Path) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 30
    import socket

    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"workers exited: {log_path.read_text()[-2000:]}")
        # Both workers serving (each logs it once its listeners are bound): connections opened before the
        # second binds would all stay with the first, since gateways keep their connections to a peer.
        serving = {entry.get("worker") for entry in _log_entries(log_path) if "serving: local" in entry["message"]}
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0 and serving >= {0, 1}:
                return
        time.sleep(0.1)
    raise AssertionError(f"workers did not start: {log_path.read_text()[-2000:]}")


def _log_entries(log_path: Path) -> list[dict[str, Any]]:
    entries = []
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("message"), str):
            entries.append(entry)
    return entries


def test_calls_from_one_peer_reach_every_worker_and_one_tree(
    net: tuple[NetworkThread, subprocess.Popen[str], Path],
) -> None:
    network, _, log_path = net
    with network.officer_channel("surrey", officer="DC-WORKERS") as ch:
        stub = intel_pb2_grpc.IntelligenceSearchStub(ch)
        for _ in range(CALLS):
            stub.Search(intel_pb2.SearchRequest(subject="alpha"), timeout=10)
    time.sleep(0.5)
    workers = set()
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("logger") == "psngw.calls" and entry.get("officer") == "DC-WORKERS":
            workers.add(entry["worker"])
    assert workers == {0, 1}, f"calls reached workers {workers} only"
    db = network.layout.config("thames-valley").audit.db
    anchors = load_anchors(directory=network.layout.directory_path, at=time.time())
    deadline = time.monotonic() + 20
    while True:
        # The log is whole once a checkpoint the other forces' witnesses cosigned covers it (every 2 s here).
        with LogReader.open(db) as reader:
            report = verify_log(reader, anchors)
            count = reader.count()
        if not report.findings and report.witnessed is not None and report.witnessed >= CALLS:
            break
        assert time.monotonic() < deadline, report.findings or report.notes
        time.sleep(0.5)
    assert count >= CALLS  # every call's record, from both workers, in one tree


def test_a_replayed_envelope_is_refused_whichever_worker_gets_it(
    net: tuple[NetworkThread, subprocess.Popen[str], Path],
) -> None:
    # One envelope, sent on several fresh connections (spread over both workers by SO_REUSEPORT):
    # the first is served, every replay is refused, because the workers share one replay store.
    import os as _os

    import grpc

    from gateway._proto.psn.gateway.v1 import relay_pb2
    from gateway.directory import CallType
    from gateway.envelope import Envelope, MessageDigest, Signer, seal_envelope
    from gateway.principal import Principal, Purpose

    network, _, _ = net
    layout = network.layout
    surrey = layout.material["surrey"]
    message = intel_pb2.SearchRequest(subject="alpha").SerializeToString()
    digest = MessageDigest()
    digest.update(message)
    now = time.time()
    envelope = Envelope(
        request_id=_os.urandom(16).hex(),
        origin_force="surrey",
        origin_gateway="spiffe://surrey.se.psn/gateway",
        host_force="thames-valley",
        application="intel-search",
        method="/psn.demo.intel.v1.IntelligenceSearch/Search",
        call_type=CallType.UNARY,
        principal=Principal("DC-REPLAY", "surrey", ("serocu",), ("investigator",), "SC"),
        purpose=Purpose("investigation", "OP-TEST-0001", "replay test"),
        issued_at=now,
        deadline=now + 30,
        messages_digest=digest.digest,
        message_count=1,
        metadata=(),
    )
    signed, _ = seal_envelope(
        envelope, Signer.from_files(surrey.gateway_signing.cert_path, surrey.gateway_signing.key_path)
    )
    request = relay_pb2.UnaryRelayRequest(envelope=signed, message=message)
    creds = grpc.ssl_channel_credentials(
        b"".join(layout.material[f].ca.read_bytes() for f in layout.material),
        surrey.gateway_tls.key_path.read_bytes(),
        surrey.gateway_tls.cert_path.read_bytes(),
    )
    target = layout.directory().forces["thames-valley"]
    codes = []
    for i in range(12):
        options = [
            ("grpc.ssl_target_name_override", target.gateway_server_name),
            ("grpc.use_local_subchannel_pool", 1),
            ("psn.test.connection", i),
        ]
        with grpc.secure_channel(target.peer_address, creds, options=options) as ch:
            unary = ch.unary_unary(
                "/psn.gateway.v1.Relay/Unary",
                request_serializer=relay_pb2.UnaryRelayRequest.SerializeToString,
                response_deserializer=relay_pb2.UnaryRelayResponse.FromString,
            )
            try:
                unary(request, timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
    assert codes[0] is grpc.StatusCode.OK
    assert codes[1:] == [grpc.StatusCode.UNAUTHENTICATED] * 11
