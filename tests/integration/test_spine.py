"""The spine end to end: real gateways and applications on loopback, real mTLS, every call type.

One gateway: a force calls the application it hosts itself. Two gateways: a
force calls an application another force hosts (signed relay between them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway._proto.psn.gateway.v1 import relay_pb2
from tests.netharness import NetworkThread

pytestmark = pytest.mark.integration

#: (caller force, hops): intel-search is hosted by thames-valley.
ROUTES = [("thames-valley", 1), ("surrey", 2)]


@pytest.fixture(params=ROUTES, ids=lambda r: f"{r[1]}-gateway")
def intel(request: pytest.FixtureRequest, net: NetworkThread) -> Iterator[intel_pb2_grpc.IntelligenceSearchStub]:
    force, _ = request.param
    with net.officer_channel(force) as ch:
        yield intel_pb2_grpc.IntelligenceSearchStub(ch)


def test_unary(intel: intel_pb2_grpc.IntelligenceSearchStub) -> None:
    reply = intel.Search(intel_pb2.SearchRequest(subject="alpha"), timeout=10)
    assert [m.report_id for m in reply.matches] == ["IR-0001", "IR-0002", "IR-0004"]


def test_server_stream(intel: intel_pb2_grpc.IntelligenceSearchStub) -> None:
    got = [m.report_id for m in intel.StreamMatches(intel_pb2.SearchRequest(subject="alpha"), timeout=10)]
    assert got == ["IR-0001", "IR-0002", "IR-0004"]


CUSTODY_UNIT = {"hampshire": "hants-custody", "thames-valley": "tvp-custody"}


@pytest.mark.parametrize("force", ["hampshire", "thames-valley"])
def test_client_stream(net: NetworkThread, force: str) -> None:
    # Bulk look-ups are for each force's custody unit (policies/rules/custody-records.csv).
    with net.officer_channel(force, units=(CUSTODY_UNIT[force],), roles=("custody-officer",), clearance="NPPV3") as ch:
        stub = custody_pb2_grpc.CustodyRecordsStub(ch)
        numbers = [f"HC/{n:05d}/26" for n in (1, 2, 3)] + ["HC/88888/26"]
        summary = stub.BulkLookup((custody_pb2.GetRecordRequest(custody_number=n) for n in numbers), timeout=10)
    assert [r.custody_number for r in summary.found] == numbers[:3]
    assert list(summary.not_found) == ["HC/88888/26"]


@pytest.mark.parametrize("force", ["surrey", "hampshire"])
def test_bidi_stream_interleaves(net: NetworkThread, force: str) -> None:
    # Each acknowledgement arrives before the next comment is sent: a true bidirectional stream.
    with net.officer_channel(force) as ch:
        stub = casefiles_pb2_grpc.CaseFilesStub(ch)
        outbox: list[casefiles_pb2.ReviewComment] = []
        ready = threading.Event()

        def comments() -> Iterator[casefiles_pb2.ReviewComment]:
            for i in range(5):
                ready.wait(10)
                ready.clear()
                yield casefiles_pb2.ReviewComment(case_reference="C1", paragraph=str(i), comment="ok")

        ready.set()
        acks = []
        for ack in stub.Review(comments(), timeout=10):
            acks.append(ack.sequence)
            ready.set()
        assert acks == [1, 2, 3, 4, 5]
        assert not outbox


@pytest.mark.parametrize("force", ["surrey", "thames-valley"])
def test_server_stream_of_a_document(net: NetworkThread, force: str) -> None:
    with net.officer_channel(force) as ch:
        stub = casefiles_pb2_grpc.CaseFilesStub(ch)
        chunks = list(
            stub.FetchDocument(casefiles_pb2.FetchDocumentRequest(case_reference="C", document_id="D"), timeout=10)
        )
    assert sum(len(c.data) for c in chunks) == 65536 and chunks[-1].last


@pytest.mark.parametrize("force", ["hampshire", "surrey"])
def test_status_details_and_trailers_come_back(net: NetworkThread, force: str) -> None:
    with net.officer_channel(force) as ch, pytest.raises(grpc.RpcError) as err:
        custody_pb2_grpc.CustodyRecordsStub(ch).GetRecord(custody_pb2.GetRecordRequest(custody_number="X"), timeout=10)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such custody record"
    details = dict(err.value.trailing_metadata())["grpc-status-details-bin"]
    status = custody_pb2.ErrorStatus.FromString(details)
    hint = custody_pb2.NotFoundDetail()
    assert status.details[0].Unpack(hint) and hint.custody_number == "X"


def test_unknown_service_is_not_found(net: NetworkThread) -> None:
    with net.officer_channel("surrey") as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary("/psn.demo.nothing.v1.Nothing/Nope")(b"", timeout=10)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "not found"  # the caller sees the class, not the directory


def test_unknown_method_of_a_known_service_is_not_found(net: NetworkThread) -> None:
    with net.officer_channel("surrey") as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary("/psn.demo.intel.v1.IntelligenceSearch/DeleteAll")(b"", timeout=10)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("force", ["thames-valley", "hampshire"])
def test_deadline_expires(net: NetworkThread, force: str) -> None:
    with net.officer_channel(force) as ch, pytest.raises(grpc.RpcError) as err:
        intel_pb2_grpc.IntelligenceSearchStub(ch).Search(intel_pb2.SearchRequest(subject="alpha"), timeout=0.001)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("force", ["surrey", "hampshire"])
def test_cancellation_reaches_the_application(net: NetworkThread, force: str) -> None:
    # A bidi call cancelled by the caller must not stay open upstream.
    with net.officer_channel(force) as ch:
        stub = casefiles_pb2_grpc.CaseFilesStub(ch)
        stop = threading.Event()

        def comments() -> Iterator[casefiles_pb2.ReviewComment]:
            yield casefiles_pb2.ReviewComment(case_reference="C", paragraph="1", comment="ok")
            stop.wait(10)

        call = stub.Review(comments(), timeout=10)
        assert next(call).sequence == 1
        call.cancel()
        stop.set()
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() is grpc.StatusCode.CANCELLED
    # The gateway stays healthy: the next call works.
    with net.officer_channel(force) as ch:
        assert intel_pb2_grpc.IntelligenceSearchStub(ch).Search(intel_pb2.SearchRequest(subject="bravo"), timeout=10)


@pytest.mark.parametrize("force", ["thames-valley", "hampshire"])
def test_oversized_request_is_resource_exhausted(net: NetworkThread, force: str) -> None:
    big = intel_pb2.SearchRequest(subject="x" * (5 * 1024 * 1024))
    options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
    with net.officer_channel(force, options=options) as ch, pytest.raises(grpc.RpcError) as err:
        intel_pb2_grpc.IntelligenceSearchStub(ch).Search(big, timeout=10)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def _peer_call(net: NetworkThread, host: str, cert: object, key: object) -> grpc.RpcError:
    layout = net.layout
    roots = b"".join(layout.material[f].ca.read_bytes() for f in layout.material)
    creds = grpc.ssl_channel_credentials(roots, key.read_bytes(), cert.read_bytes())  # type: ignore[attr-defined]
    target = layout.directory().forces[host]
    options = [("grpc.ssl_target_name_override", target.gateway_server_name)]
    with grpc.secure_channel(target.peer_address, creds, options=options) as ch:
        unary = ch.unary_unary(
            "/psn.gateway.v1.Relay/Unary",
            request_serializer=relay_pb2.UnaryRelayRequest.SerializeToString,
            response_deserializer=relay_pb2.UnaryRelayResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            unary(relay_pb2.UnaryRelayRequest(), timeout=10)
    return err.value


def test_application_certificate_on_the_peer_listener_is_refused(net: NetworkThread) -> None:
    app = net.layout.material["surrey"].app_clients["analyst-desk"]
    assert _peer_call(net, "thames-valley", app.cert_path, app.key_path).code() is grpc.StatusCode.UNAUTHENTICATED


def test_own_gateway_certificate_on_own_peer_listener_is_refused(net: NetworkThread) -> None:
    tls = net.layout.material["surrey"].gateway_tls
    assert _peer_call(net, "surrey", tls.cert_path, tls.key_path).code() is grpc.StatusCode.UNAUTHENTICATED


def test_another_forces_certificate_on_the_local_listener_is_refused(net: NetworkThread) -> None:
    other = net.layout.material["hampshire"].app_clients["analyst-desk"]
    roots = b"".join(net.layout.material[f].ca.read_bytes() for f in net.layout.material)
    from gateway import client

    endpoint = client.from_manifest(net.manifest(), "thames-valley")
    token = endpoint.unsafe_dev_token(officer="DC-1", units=["serocu"], roles=["investigator"], clearance="SC")
    channel = client.secure_channel(
        endpoint.local_address,
        ca=roots,
        cert=other.cert_path,
        key=other.key_path,
        server_name=endpoint.server_name,
        token=token,
    )
    with channel as ch, pytest.raises(grpc.RpcError) as err:
        intel_pb2_grpc.IntelligenceSearchStub(ch).Search(intel_pb2.SearchRequest(subject="a"), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_gateway_that_is_down_fails_fast(net: NetworkThread) -> None:
    # Stop Hampshire's gateway: Surrey's calls to custody records fail quickly with UNAVAILABLE.
    hants = net.network.gateways["hampshire"]
    net.run(hants.stop(grace=0))
    try:
        with net.officer_channel("surrey") as ch:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                custody_pb2_grpc.CustodyRecordsStub(ch).GetRecord(
                    custody_pb2.GetRecordRequest(custody_number="HC/00001/26"), timeout=20
                )
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "unavailable"  # no addresses or internals
            assert time.monotonic() - start < 5
    finally:
        net.run(net.network.start_gateway("hampshire"))
    with net.officer_channel("surrey") as ch:
        stub = custody_pb2_grpc.CustodyRecordsStub(ch)
        deadline = time.monotonic() + 15
        while True:  # the relay channel reconnects by itself
            try:
                assert stub.GetRecord(custody_pb2.GetRecordRequest(custody_number="HC/00001/26"), timeout=5)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def test_a_backend_that_is_down_fails_fast(net: NetworkThread) -> None:
    app = net.network.apps["case-files"]
    net.run(app.stop(0))
    try:
        with net.officer_channel("surrey") as ch:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(
                    casefiles_pb2_grpc.CaseFilesStub(ch).FetchDocument(
                        casefiles_pb2.FetchDocumentRequest(case_reference="C", document_id="D"), timeout=20
                    )
                )
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "127.0.0.1" not in (err.value.details() or "")
            assert time.monotonic() - start < 5
    finally:
        net.run(net.network.start_app("surrey", "case-files"))
