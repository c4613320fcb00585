"""The audit log in the running network: a record at every gateway, witnessing, fail closed."""

from __future__ import annotations

import base64
import sqlite3
import time
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway._proto.psn.gateway.v1 import witness_pb2
from gateway.audit.merkle import MerkleTree, leaf_hash
from gateway.audit.note import Checkpoint, NoteSigner, sign_note
from gateway.audit.store import LogReader
from gateway.audit.tools import load_anchors, verify_log
from gateway.audit.witness import ConflictKind, read_conflicts
from tests.integration._hostile_common import LIFTED_RATE_LIMITS, append_config
from tests.netharness import NetworkThread, records, wait_for

pytestmark = pytest.mark.integration


def search(net: NetworkThread, force: str, officer: str, *, purpose: bool = True) -> grpc.StatusCode:
    kwargs = {} if purpose else {"purpose": None}
    with net.officer_channel(force, officer=officer, **kwargs) as ch:  # type: ignore[arg-type]
        try:
            intel_pb2_grpc.IntelligenceSearchStub(ch).Search(intel_pb2.SearchRequest(subject="alpha"), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_a_relayed_call_is_recorded_at_both_gateways(net: NetworkThread) -> None:
    officer = f"DC-{uuid.uuid4().hex[:8]}"
    assert search(net, "surrey", officer) is grpc.StatusCode.OK
    [origin] = records(net, "surrey", officer=officer)
    [host] = records(net, "thames-valley", officer=officer)
    assert origin.request_id == host.request_id
    assert (origin.event, origin.status, host.status) == ("call", "OK", "OK")
    # DPA 2018 s62: who, when, why, to whom, at both ends.
    for record in (origin, host):
        assert record.officer_id == officer and record.units == ("serocu",)
        assert record.purpose_code == "investigation" and record.purpose_case == "OP-TEST-0001"
        assert record.application == "intel-search" and record.host_force == "thames-valley"
        assert record.origin_force == "surrey" and record.recipients == ("surrey", "serocu")
        assert record.request_digest and record.response_digest
        assert record.envelope_signature and record.seal_signature
    assert origin.request_digest == host.request_digest and origin.response_digest == host.response_digest
    assert host.peer == "spiffe://surrey.se.psn/gateway"
    assert origin.peer == "spiffe://surrey.se.psn/app/analyst-desk"
    assert base64.b64decode(origin.envelope_signature) == base64.b64decode(host.envelope_signature)


def test_a_refused_call_is_recorded_with_its_reason(net: NetworkThread) -> None:
    officer = f"DC-{uuid.uuid4().hex[:8]}"
    assert search(net, "hampshire", officer, purpose=False) is grpc.StatusCode.INVALID_ARGUMENT
    [record] = records(net, "hampshire", officer=officer)
    assert record.status == "INVALID_ARGUMENT" and record.refusal_stage == "purpose"
    assert "psn-purpose-code" in record.refusal_reason  # the full reason, which the caller never saw
    assert records(net, "thames-valley", officer=officer) == []  # nothing was relayed


def test_checkpoints_are_cosigned_by_both_peer_witnesses(net: NetworkThread) -> None:
    assert search(net, "surrey", f"DC-{uuid.uuid4().hex[:8]}") is grpc.StatusCode.OK
    db = net.layout.config("surrey").audit.db

    def quorum() -> bool:
        with LogReader.open(db) as reader:
            latest = reader.latest_checkpoint()
            return latest is not None and latest.quorum_at is not None and len(reader.cosignatures(latest.size)) >= 2

    wait_for(quorum, "two cosignatures on Surrey's latest checkpoint")
    anchors = load_anchors(directory=net.layout.directory_path, at=time.time())
    with LogReader.open(db) as reader:
        report = verify_log(reader, anchors)
    assert not report.findings, report.findings
    assert set(report.witnesses) == {"thames-valley.se.psn/witness", "hampshire.se.psn/witness"}


def test_a_witness_refuses_a_forked_history(net: NetworkThread) -> None:
    # Thames Valley's log key signs a checkpoint of the size Hampshire has already witnessed,
    # with another root: a second history. Hampshire's witness must refuse it.
    tv = net.layout.material["thames-valley"]
    assert search(net, "thames-valley", f"DC-{uuid.uuid4().hex[:8]}") is grpc.StatusCode.OK
    hants_witness = net.layout.config("hampshire").witness_db
    origin = "thames-valley.se.psn/audit"

    def witnessed() -> int:
        return _witnessed(hants_witness, origin)

    wait_for(lambda: witnessed() > 0, "Hampshire to witness Thames Valley's log")
    size = witnessed()
    key = serialization.load_pem_private_key(tv.log_signing.key_path.read_bytes(), None)
    forged_tree = MerkleTree(leaf_hash(f"forged {i}".encode()) for i in range(size))
    body = Checkpoint(origin, size, forged_tree.root()).body()
    note = sign_note(body, [NoteSigner(origin, key)]).text()  # type: ignore[arg-type]

    creds = grpc.ssl_channel_credentials(
        b"".join(net.layout.material[f].ca.read_bytes() for f in net.layout.material),
        tv.gateway_tls.key_path.read_bytes(),
        tv.gateway_tls.cert_path.read_bytes(),
    )
    target = net.layout.directory().forces["hampshire"]
    with grpc.secure_channel(
        target.peer_address, creds, options=[("grpc.ssl_target_name_override", target.gateway_server_name)]
    ) as ch:
        add = ch.unary_unary(
            "/psn.gateway.v1.Witness/AddCheckpoint",
            request_serializer=witness_pb2.AddCheckpointRequest.SerializeToString,
            response_deserializer=witness_pb2.AddCheckpointResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            add(witness_pb2.AddCheckpointRequest(old_size=size, checkpoint=note), timeout=10)
    assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert witnessed() >= size  # the witness kept the real history
    assert search(net, "hampshire", f"DC-{uuid.uuid4().hex[:8]}") is grpc.StatusCode.OK


def test_an_unwritable_audit_log_closes_the_gate_and_it_reopens(net: NetworkThread, tmp_path: Path) -> None:
    # Another process holds the log's write lock beyond the gateway's lock timeout.
    db = net.layout.config("thames-valley").audit.db
    gateway = net.network.gateways["thames-valley"]
    holder = sqlite3.connect(db, isolation_level=None, timeout=10)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        officer = f"DC-{uuid.uuid4().hex[:8]}"
        assert search(net, "thames-valley", officer) is grpc.StatusCode.UNAVAILABLE
        assert gateway.health()["serving"] is False
    finally:
        holder.execute("COMMIT")
        holder.close()
    wait_for(lambda: gateway.health()["serving"] is True, "the audit log to recover")
    officer = f"DC-{uuid.uuid4().hex[:8]}"
    assert search(net, "thames-valley", officer) is grpc.StatusCode.OK
    assert [r.status for r in records(net, "thames-valley", officer=officer)] == ["OK"]


def test_the_caller_gets_the_request_id_of_its_records(net: NetworkThread) -> None:
    officer = f"DC-{uuid.uuid4().hex[:8]}"
    with net.officer_channel("hampshire", officer=officer) as ch:
        _, call = intel_pb2_grpc.IntelligenceSearchStub(ch).Search.with_call(
            intel_pb2.SearchRequest(subject="alpha"), timeout=10
        )
        request_id = dict(call.trailing_metadata())["psn-request-id"]
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/psn.demo.nothing.v1.X/Y")(b"", timeout=10)
        refused_id = dict(err.value.trailing_metadata())["psn-request-id"]
    [origin] = records(net, "hampshire", officer=officer, status="OK")
    [host] = records(net, "thames-valley", officer=officer)
    assert origin.request_id == host.request_id == request_id
    [refused] = records(net, "hampshire", officer=officer, status="NOT_FOUND")
    assert refused.request_id == refused_id


def _witnessed(db: Path, origin: str) -> int:
    """The size a witness database holds for `origin` (0 if none), read the way an auditor would."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT size FROM witness_checkpoint WHERE origin = ?", (origin,)).fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        conn.close()
    return int(row[0]) if row else 0


def test_a_truncated_log_is_reported_by_every_peer_witness(tmp_path: Path) -> None:
    """Thames Valley cuts its cosigned log back and restarts: Hampshire's and Surrey's gateways keep the
    evidence, count it and show it; Thames Valley's own gateway shows its witnesses dispute its log."""
    tv, origin = "thames-valley", "thames-valley.se.psn/audit"
    peers = ("hampshire", "surrey")
    net = NetworkThread(tmp_path / "net", relay_links=False)  # its own network: this one is damaged on purpose
    append_config(net, LIFTED_RATE_LIMITS)
    net.start()
    try:
        for _ in range(12):
            assert search(net, tv, f"DC-{uuid.uuid4().hex[:8]}") is grpc.StatusCode.OK
        witness_dbs = {force: net.layout.config(force).witness_db for force in peers}
        wait_for(
            lambda: all(_witnessed(db, origin) >= 12 for db in witness_dbs.values()),
            "both peers to cosign Thames Valley's 12 records",
        )
        cosigned = {force: _witnessed(db, origin) for force, db in witness_dbs.items()}

        net.run(net.network.gateways[tv].stop(grace=0))
        conn = sqlite3.connect(net.layout.config(tv).audit.db, isolation_level=None)
        try:  # what a force could do to its own file: drop the newest records and what covers them
            conn.execute("DELETE FROM records WHERE idx >= 4")
            conn.execute("DELETE FROM checkpoints WHERE size > 4")
            conn.execute("DELETE FROM cosignatures")
        finally:
            conn.close()
        net.run(net.network.start_gateway(tv))
        assert search(net, tv, f"DC-{uuid.uuid4().hex[:8]}") is grpc.StatusCode.OK

        def reported(force: str) -> bool:
            health = net.network.gateways[force].health()
            return "rollback" in health["witness"]["conflicts"].get(origin, {})

        wait_for(lambda: all(reported(force) for force in peers), "both peer witnesses to report the rollback")
        for force in peers:
            gateway = net.network.gateways[force]
            summary = gateway.health()["witness"]["conflicts"][origin]["rollback"]
            assert summary["kept"] >= 1 and summary["cosigned_size"] == cosigned[force]
            assert summary["last_presented_size"] < cosigned[force]
            assert summary["submitter"] == "spiffe://thames-valley.se.psn/gateway"
            assert gateway.metrics.witness_conflicts.value(origin=origin, kind="rollback") >= 1
            assert b'psngw_witness_conflicts_total{origin="thames-valley.se.psn/audit",kind="rollback"}' in (
                gateway.registry.expose()
            )
            kept = read_conflicts(witness_dbs[force])  # durable, and readable while the gateway runs
            assert kept and all(e.kind is ConflictKind.ROLLBACK and e.origin == origin for e in kept)
            assert all(e.held_size == cosigned[force] > e.presented_size for e in kept)
            assert _witnessed(witness_dbs[force], origin) == cosigned[force]  # it kept the real history
        wait_for(
            lambda: (
                net.network.gateways[tv].health()["disputed_by"]
                == ["hampshire.se.psn/witness", "surrey.se.psn/witness"]
            ),
            "Thames Valley to show that its witnesses report its log rolled back",
        )
    finally:
        net.stop()
