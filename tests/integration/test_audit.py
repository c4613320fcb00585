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
        conn = sqlite3.connect(f"file:{hants_witness}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT size FROM witness_checkpoint WHERE origin = ?", (origin,)).fetchone()
        except sqlite3.OperationalError:
            row = None
        finally:
            conn.close()
        return int(row[0]) if row else 0

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
