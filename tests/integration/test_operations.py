"""What operators rely on: metrics by scraping, JSON logs with request ids, graceful stop, demo up, config errors."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
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

from gateway import client
from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from tests.integration._hostile_common import append_config
from tests.netharness import NetworkThread

pytestmark = pytest.mark.integration


def scrape(net: NetworkThread, force: str, path: str = "/metrics") -> tuple[int, str]:
    port = net.network.gateways[force].ports.admin  # type: ignore[union-attr]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels}")


def test_metrics_are_scraped_from_the_admin_listener(net: NetworkThread) -> None:
    _, before = scrape(net, "surrey")
    with net.officer_channel("surrey") as ch:
        for _ in range(3):
            intel_pb2_grpc.IntelligenceSearchStub(ch).Search(intel_pb2.SearchRequest(subject="alpha"), timeout=10)
    status, text = scrape(net, "surrey")
    assert status == 200
    labels = {"listener": "local", "origin_force": "surrey", "application": "intel-search", "decision": "allow"}
    calls_before = 0.0
    with contextlib.suppress(AssertionError):  # no such series before the first call
        calls_before = sample(before, "psngw_calls_total", **labels, status="OK")
    assert sample(text, "psngw_calls_total", **labels, status="OK") >= calls_before + 3
    for stage in ("peer-identity", "token", "purpose", "route", "policy", "forward", "audit"):
        assert sample(text, "psngw_stage_duration_seconds_count", stage=stage) > 0, stage
    assert sample(text, "psngw_audit_records_total") > 0
    assert sample(text, "psngw_audit_commit_seconds_count") > 0
    assert sample(text, "psngw_audit_healthy") == 1
    assert sample(text, "psngw_crl_usable", force="hampshire") == 1
    assert sample(text, "psngw_certificate_expiry_days", certificate="tls") > 20
    assert re.search(r'psngw_policy_info\{version="sha256:[0-9a-f]+"\} 1', text)
    assert sample(text, "psngw_peer_circuit_open", force="thames-valley") == 0
    status, body = scrape(net, "surrey", "/healthz")
    health = json.loads(body)
    assert status == 200 and health["serving"] is True and health["force"] == "surrey"


def test_graceful_stop_finishes_calls_in_flight(tmp_path: Path) -> None:
    network = NetworkThread(tmp_path / "net").start()
    try:
        with network.officer_channel("surrey") as ch:
            stub = casefiles_pb2_grpc.CaseFilesStub(ch)
            release = threading.Event()

            def comments() -> Iterator[casefiles_pb2.ReviewComment]:
                yield casefiles_pb2.ReviewComment(case_reference="C", paragraph="1", comment="ok")
                release.wait(10)
                yield casefiles_pb2.ReviewComment(case_reference="C", paragraph="2", comment="ok")

            call = stub.Review(comments(), timeout=20)
            assert next(call).sequence == 1
            gateway = network.network.gateways["surrey"]
            stopping = threading.Thread(target=network.run, args=(gateway.stop(5.0),))
            stopping.start()
            time.sleep(0.5)
            # New calls are refused while it drains ...
            with network.officer_channel("surrey") as other, pytest.raises(grpc.RpcError):
                intel_pb2_grpc.IntelligenceSearchStub(other).Search(intel_pb2.SearchRequest(subject="a"), timeout=3)
            # ... and the call in flight runs to its end.
            release.set()
            assert [a.sequence for a in call] == [2]
            assert call.code() is grpc.StatusCode.OK
            stopping.join(15)
    finally:
        network.stop()


def test_logs_are_json_lines_with_the_request_id(tmp_path: Path) -> None:
    network = NetworkThread(tmp_path / "net")
    layout = network.layout
    for force, apps in layout.hosted.items():
        for app in apps:
            network.run(network.network.start_app(force, app))
    log_path = tmp_path / "surrey.log"
    with log_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(layout.configs["surrey"])],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while "serving" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        with network.officer_channel("surrey") as ch:
            with pytest.raises(grpc.RpcError) as err_info:
                ch.unary_unary("/psn.demo.nothing.v1.X/Y")(b"", timeout=10)
            request_id = dict(err_info.value.trailing_metadata())["psn-request-id"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        network.stop()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)
    about_call = [e for e in lines if e.get("request_id") == request_id]
    assert {e["logger"] for e in about_call} >= {"psngw.server", "psngw.calls"}
    assert any(e["logger"] == "psngw.serve" and "stop signal" in e["message"] for e in lines)


def test_demo_up_refuses_a_folder_in_use_or_a_file_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    for name, said in (("used", "folder is not empty"), ("a-file", "not a folder")):
        argv = [sys.executable, "-m", "gateway.cli", "demo", "up", "--dir", str(tmp_path / name)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2 and said in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert (tmp_path / "a-file").read_text() == "mine"


def test_demo_up_writes_a_manifest_clients_can_use(tmp_path: Path) -> None:
    folder = tmp_path / "demo-net"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "up", "--dir", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        manifest = folder / "demo.json"
        deadline = time.monotonic() + 60
        while not manifest.exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.1)
        time.sleep(0.2)
        endpoint = client.from_manifest(manifest, "hampshire")
        token = endpoint.unsafe_dev_token(officer="DC-1", units=["serocu"], roles=["investigator"], clearance="SC")
        from gateway.principal import Purpose

        with endpoint.secure_channel(token=token, purpose=Purpose("investigation", "OP-1", "demo up")) as ch:
            reply = intel_pb2_grpc.IntelligenceSearchStub(ch).Search(
                intel_pb2.SearchRequest(subject="alpha"), timeout=10
            )
        assert reply.matches
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "stopped" in out


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda t: t.replace("[listeners]", '[listeners]\nlocal_typo = "x"'),
            r":\d+: listeners\.local_typo: unknown key",
        ),
        (lambda t: re.sub(r'local = "[^"]+"', 'local = "127.0.0.1"', t), r":\d+: listeners\.local: .*host:port"),
        (
            lambda t: t.replace("[purpose]", "[purpose]\nmin_text_len = 0"),
            r":\d+: purpose\.min_text_len: must be at least 1",
        ),
        (lambda t: t.replace('algorithms = ["ES256"]', 'algorithms = ["HS256"]'), r"tokens\.algorithms"),
    ],
    ids=["unknown-key", "bad-address", "out-of-bounds", "hmac-algorithm"],
)
def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path, edit: object, expected: str) -> None:
    network = NetworkThread(tmp_path / "net")
    try:
        config = network.layout.configs["surrey"]
        config.write_text(edit(config.read_text()))  # type: ignore[operator]
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        network.stop()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"psngw: {config}:"), lines[0]
    assert re.search(expected, lines[0]), lines[0]


def test_a_grpc_listener_holds_at_most_max_connections_so_idle_handshakes_cannot_take_its_sockets(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Clients that connect to a gRPC listener and never begin their TLS handshake: the fifth connection over a
    # cap of four is closed as it is accepted, and once the idle ones leave, an application is served again.
    net = NetworkThread(tmp_path_factory.mktemp("max-connections-net"))
    append_config(net, {"surrey": "[limits]\nmax_connections = 4\n"})
    net.start()
    idle: list[socket.socket] = []
    try:
        host, _, port = net.layout.local_address("surrey").rpartition(":")
        for _ in range(4):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        time.sleep(0.3)  # grpc has accepted them
        fifth = socket.create_connection((host, int(port)), timeout=5)
        try:
            fifth.settimeout(2)  # closed at once, not held for the handshake timeout
            try:
                closed = fifth.recv(1) == b""
            except ConnectionResetError:
                closed = True
        finally:
            fifth.close()
        assert closed
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + 10
        while True:  # grpc notices the idle ones have gone
            with net.officer_channel("surrey") as ch:
                stub = intel_pb2_grpc.IntelligenceSearchStub(ch)
                try:
                    stub.Search(intel_pb2.SearchRequest(subject="alpha"), timeout=2)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.2)
    finally:
        for s in idle:
            s.close()
        net.stop()
