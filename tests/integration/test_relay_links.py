"""Relay links (gateway.relaylink): relay channels over a plain mutual-TLS connection, without gRPC.

What must hold: relayed unary calls travel over relay links (not `Relay/Mux`, not `Relay/Unary`),
each call on a link signed, verified, decided and recorded on its own at both ends; only another
force's gateway opens a link (anything else is refused at the opening, and recorded); a client
without the relay ALPN, on TLS 1.2, or without a certificate gets no further than the handshake;
an oversized or unparseable frame ends the link with a recorded INVALID_ARGUMENT; a hostile request
on a link is refused and recorded without harming the calls beside it; the origin never sends a
call to a listener whose certificate is not the host's gateway's; and a host that stops lets the
calls in flight on its links finish, then ends the links. After every refusal the gateway serves on.
Streaming calls travel on links too (gateway.muxstream), each recorded at both ends with the same
seal; a peer that floods a stream past its flow-control window gets the link ended with a recorded
INVALID_ARGUMENT; a stream the origin cancels is recorded as cancelled; stream items for a stream
that never began start nothing.
(The hostile-envelope corpus also runs every unary and stream relay case over a relay link:
test_corpus.py; revocation of a link host's certificate: test_trust.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import pki
from gateway import server as server_module
from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.errors import GatewayError, Unavailable
from gateway.mux import BatchHold
from gateway.muxstream import WINDOW
from gateway.relaylink import FRAME_OVERHEAD, LinkConnection, RelayLinkListener, TlsLink, server_context
from gateway.server import LINK_METHOD, Gateway
from gateway.tls import KeyPair
from tests.integration._hostile_common import (
    SEARCH,
    SEARCH_MSG,
    append_config,
    case_files,
    fresh_officer,
    relay_network,
    still_serving,
)
from tests.integration._hostile_peer import (
    CallType,
    LinkSession,
    RawPeer,
    Unframed,
    envelope_frame,
    message_frame,
)
from tests.netharness import NetworkThread, custody, records_since, search, wait_for

pytestmark = pytest.mark.integration

TV, HANTS, SURREY = "thames-valley", "hampshire", "surrey"


@pytest.fixture(scope="module")
def lnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkThread]:
    # Every force has a relay listener and a directory relay_address: gateways relay to each other by links.
    yield from relay_network(tmp_path_factory.mktemp("link-net"), relay_links=True)


def _gateway(net: NetworkThread, force: str) -> Gateway:
    return net.network.gateways[force]


def _batch(*requests: tuple[int, relay_pb2.Signed, bytes]) -> bytes:
    """One serialized `MuxBatch` carrying these unary relay requests."""
    return relay_pb2.MuxBatch(
        requests=[
            relay_pb2.MuxRequest(id=i, request=relay_pb2.UnaryRelayRequest(envelope=signed, message=message))
            for i, signed, message in requests
        ]
    ).SerializeToString()


def _good_frame(peer: RawPeer, officer: str) -> bytes:
    """A frame with one request the host would answer OK (if the link got that far)."""
    return _batch((1, peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=officer)), SEARCH_MSG))


def _link_refusals(net: NetworkThread, since: float) -> list[Any]:
    return [r for r in records_since(net, TV, since) if r.method == LINK_METHOD]


def _shape(rows: list[Any]) -> list[tuple[str, str, str, str]]:
    return [(r.method, r.status, r.refusal_stage, r.refusal_reason) for r in rows]


# -- the calls travel over links ------------------------------------------------------------------


@pytest.fixture
def links_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Relay/Unary and Relay/Mux switched off at every gateway: only relay links can carry a call.

    An origin that tried Relay/Mux would fall back to Relay/Unary and fail.
    """
    monkeypatch.setattr(server_module, "_RELAY_UNARY", "/psn.gateway.v1.Relay/Switched-Off")
    monkeypatch.setattr(server_module, "MUX_METHOD", "/psn.gateway.v1.Relay/Switched-Off-Too")


@pytest.mark.usefixtures("links_only")
def test_relayed_unary_calls_travel_over_relay_links_and_each_is_recorded_at_both_ends(lnet: NetworkThread) -> None:
    officer = fresh_officer()
    since = time.time()
    with lnet.officer_channel(SURREY, officer=officer) as channel, ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda _: search(channel), range(48)))
    assert all(code is grpc.StatusCode.OK for code, _ in outcomes), outcomes
    origin_gateway = _gateway(lnet, SURREY)
    mux = origin_gateway.relay.mux
    assert mux is not None
    assert mux.transport(TV) == "link" and mux.supports(TV)
    assert 1 <= mux.streams(TV) <= origin_gateway.config.limits.peer_channels
    pipes = [s.pipe for (host, _), s in mux._streams.items() if host == TV and s.closed is None]
    assert pipes and all(isinstance(p, TlsLink) for p in pipes), pipes
    # Busy links pack calls ([limits] relay_batch_*); each call above is still its own envelope and record.
    holds = {s._hold for (host, _), s in mux._streams.items() if host == TV}
    assert holds == {BatchHold(delay=0.003, siblings=8)}, holds
    # The host served them on its relay listener.
    listener = _gateway(lnet, TV)._relay_listener
    assert listener is not None and len(listener._links) >= mux.streams(TV)
    # What operators see: the links in /healthz and /metrics.
    assert origin_gateway.health()["relay_channels"][TV] == {
        "open": mux.streams(TV),
        "by_unary_rpc": False,
        "transport": "link",
    }
    exposed = origin_gateway.registry.expose().decode()
    [value] = re.findall(rf'^psngw_relay_channels_open\{{force="{TV}"\}} (\S+)$', exposed, re.MULTILINE)
    assert float(value) == mux.streams(TV) >= 1
    # The requests sent and the messages that carried them (calls per message, for tuning relay_batch_*).
    [requests] = re.findall(r"^psngw_relay_requests_total (\S+)$", exposed, re.MULTILINE)
    [messages] = re.findall(r"^psngw_relay_messages_total (\S+)$", exposed, re.MULTILINE)
    assert float(requests) >= 48 and 1 <= float(messages) <= float(requests), (requests, messages)

    origin = [r for r in records_since(lnet, SURREY, since) if r.officer_id == officer]
    host = [r for r in records_since(lnet, TV, since) if r.officer_id == officer]
    assert len(origin) == len(host) == 48
    assert {r.request_id for r in origin} == {r.request_id for r in host}
    assert all(r.status == "OK" and r.method == SEARCH for r in origin + host)
    assert all(r.peer == f"spiffe://{SURREY}.se.psn/gateway" for r in host), {r.peer for r in host}
    # Each call's own envelope and seal signatures, at both ends: nothing is shared between calls.
    assert len({r.envelope_signature for r in host}) == len({r.seal_signature for r in host}) == 48
    assert {r.envelope_signature for r in host} == {r.envelope_signature for r in origin}
    assert {r.seal_signature for r in host} == {r.seal_signature for r in origin}


def _padded_custody_request(extra: int) -> bytes:
    """GetRecord for a record that exists, made `extra` bytes larger by an unknown field the backend skips."""
    request = custody_pb2.GetRecordRequest(custody_number="HC/00001/26").SerializeToString()
    length, size = bytearray(), extra
    while True:  # the length as a protobuf varint
        length.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    return request + b"\xfa\x06" + bytes(length) + b"p" * extra  # field 111, length-delimited


@pytest.mark.usefixtures("links_only")
def test_a_unary_request_over_256_kib_travels_on_a_link_of_its_own_and_is_recorded_at_both_ends(
    lnet: NetworkThread,
) -> None:
    officer = fresh_officer()
    since = time.time()
    large = _padded_custody_request(300 * 1024)
    with lnet.officer_channel(SURREY, officer=officer) as channel, ThreadPoolExecutor(8) as pool:
        get = channel.unary_unary("/psn.demo.custody.v1.CustodyRecords/GetRecord")
        calls = [pool.submit(get, large, timeout=10)] + [pool.submit(search, channel) for _ in range(6)]
        reply = custody_pb2.CustodyRecord.FromString(calls[0].result())
        assert reply.custody_number == "HC/00001/26"
        assert all(c.result() == (grpc.StatusCode.OK, "") for c in calls[1:])
    mux = _gateway(lnet, SURREY).relay.mux
    assert mux is not None
    # The large request had a link to itself (the bulk slot); the searches went on the others.
    bulk = mux._streams.get((HANTS, -1))
    assert bulk is not None and isinstance(bulk.pipe, TlsLink) and bulk.closed is None
    origin = [r for r in records_since(lnet, SURREY, since) if r.officer_id == officer and r.host_force == HANTS]
    host = [r for r in records_since(lnet, HANTS, since) if r.officer_id == officer]
    assert [(r.status, r.request_id, r.request_digest) for r in origin] == [
        (r.status, r.request_id, r.request_digest) for r in host
    ]
    assert [r.status for r in host] == ["OK"]


def test_a_request_larger_than_the_host_takes_is_refused_at_the_origin_and_the_shared_link_serves_on(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Hampshire takes messages of 64 KiB (its links, frames of 128 KiB); Surrey's applications may send 4 MiB.
    # A 200 KiB request goes on the links shared with small calls: the origin must refuse it, not send it and
    # have the host end the link under its neighbours.
    net = NetworkThread(tmp_path_factory.mktemp("link-limits-net"), relay_links=True)
    append_config(net, {HANTS: "[limits]\nmax_message_bytes = 65536\n"})
    net.start()
    try:
        officer = fresh_officer()
        since = time.time()
        large = _padded_custody_request(200 * 1024)
        with net.officer_channel(SURREY, officer=officer) as channel, ThreadPoolExecutor(8) as pool:
            get = channel.unary_unary("/psn.demo.custody.v1.CustodyRecords/GetRecord")

            def large_call() -> str:
                try:
                    get(large, timeout=10)
                except grpc.RpcError as exc:
                    return exc.code().name
                return "OK"

            small = [pool.submit(custody, channel) for _ in range(12)]
            refused = [pool.submit(large_call) for _ in range(3)]
            small += [pool.submit(custody, channel) for _ in range(12)]
            assert [f.result() for f in refused] == ["RESOURCE_EXHAUSTED"] * 3
            assert all(f.result() == (grpc.StatusCode.OK, "") for f in small), [f.result() for f in small]
        origin = [r for r in records_since(net, SURREY, since) if r.officer_id == officer]
        host = [r for r in records_since(net, HANTS, since) if r.officer_id == officer]
        over = [r for r in origin if r.status == "RESOURCE_EXHAUSTED"]
        assert len(over) == 3 and all("over the" in r.refusal_reason for r in over), [r.refusal_reason for r in over]
        assert len(host) == 24 and all(r.status == "OK" for r in host)  # nothing of the large ones reached it
        assert not [r for r in records_since(net, HANTS, since) if r.method == LINK_METHOD]  # no link was ended
        mux = _gateway(net, SURREY).relay.mux
        assert mux is not None and mux.streams(HANTS) >= 1
    finally:
        net.stop()


# -- who may open a link --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("an application client certificate", "is not a gateway"),
        ("the host force's own gateway certificate", "this force's own gateway"),
    ],
)
def test_a_peer_that_is_not_another_forces_gateway_is_refused_at_link_open(
    lnet: NetworkThread, who: str, reason: str
) -> None:
    if who.startswith("an application"):
        app = lnet.layout.material[SURREY].app_clients["analyst-desk"]
        peer, cert = RawPeer(lnet, SURREY, TV), (app.cert_path, app.key_path)
    else:
        peer, cert = RawPeer(lnet, SURREY, TV, tls_of=TV), None
    officer = fresh_officer()
    since = time.time()
    try:
        end, answers = peer.link_raw([_good_frame(peer, officer)], cert=cert)
    finally:
        peer.close()
    # The handshake succeeds (the certificate is from a network CA); the gateway then ends the link unanswered.
    assert end.alpn == "psngw-relay/1" and end.closed_by_host and answers == [], (end, answers)
    rows = records_since(lnet, TV, since)
    assert [(r.method, r.status, r.refusal_stage) for r in rows] == [(LINK_METHOD, "UNAUTHENTICATED", "peer-identity")]
    assert reason in rows[0].refusal_reason, _shape(rows)
    assert not [r for r in rows if r.officer_id == officer], "the request on a refused link never ran"
    still_serving(lnet, TV)


def test_a_gateway_posing_on_a_link_as_another_force_is_refused_per_call(lnet: NetworkThread) -> None:
    # Hampshire's gateway TLS certificate opens the link (it is a gateway), but the envelope is surrey's.
    peer = RawPeer(lnet, SURREY, TV, tls_of=HANTS)
    officer = fresh_officer()
    since = time.time()
    try:
        answers = peer.link((1, peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=officer)), SEARCH_MSG))
    finally:
        peer.close()
    assert answers[1].code is grpc.StatusCode.UNAUTHENTICATED, answers[1]
    rows = records_since(lnet, TV, since)
    assert len(rows) == 1 and rows[0].refusal_stage == "envelope", _shape(rows)
    assert rows[0].peer == f"spiffe://{HANTS}.se.psn/gateway" and f"spiffe://{HANTS}" in rows[0].refusal_reason


@pytest.mark.parametrize(
    ("what", "kwargs", "ends"),
    [
        ("no ALPN", {"alpn": ()}, ("eof", "reset")),
        ("another ALPN", {"alpn": ("h2",)}, ("eof", "reset")),
        ("TLS 1.2", {"tls_version": ssl.TLSVersion.TLSv1_2}, ("handshake",)),
        ("no client certificate", {"anonymous": True}, ("handshake", "eof", "reset")),
    ],
)
def test_a_client_without_the_relay_protocol_tls_13_or_a_certificate_gets_no_answer(
    lnet: NetworkThread, what: str, kwargs: dict[str, Any], ends: tuple[str, ...]
) -> None:
    peer = RawPeer(lnet, SURREY, TV)
    officer = fresh_officer()
    since = time.time()
    try:
        # A good request: had the connection been served, it would have been answered OK.
        end, answers = peer.link_raw([_good_frame(peer, officer)], **kwargs)
    finally:
        peer.close()
    assert end.how in ends and answers == [], (what, end, answers)
    assert end.alpn != "psngw-relay/1" or what == "no client certificate", end
    if what == "TLS 1.2":
        assert end.version is None, end  # no TLS 1.2 connection was ever made
    # Refused by TLS or before the gateway: logged, not recorded (as on the gRPC listeners).
    assert records_since(lnet, TV, since) == [], _shape(records_since(lnet, TV, since))
    still_serving(lnet, TV)


# -- frames that end a link -----------------------------------------------------------------------


def _over_the_limit(net: NetworkThread) -> list[bytes]:
    limit = _gateway(net, TV).config.limits.max_message_bytes + FRAME_OVERHEAD
    return [Unframed(struct.pack(">I", limit + 1))]  # the header alone: the host must not wait for the body


@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("a length header over the limit", "over the limit"),
        ("a frame that does not parse", "does not parse"),
        ("a frame of more than 128 requests", "more than 128 items"),
    ],
)
def test_a_bad_frame_ends_the_link_with_a_recorded_refusal_and_the_gateway_serves_on(
    lnet: NetworkThread, what: str, reason: str
) -> None:
    peer = RawPeer(lnet, SURREY, TV)
    frames: list[bytes]
    if what.startswith("a length header"):
        frames = _over_the_limit(lnet)
    elif what.startswith("a frame that does not"):
        frames = [b"\xff\xff\xff\xff"]
    else:
        frames = [relay_pb2.MuxBatch(requests=[relay_pb2.MuxRequest(id=i) for i in range(129)]).SerializeToString()]
    since = time.time()
    try:
        end, answers = peer.link_raw(frames, timeout=5)
    finally:
        peer.close()
    assert end.closed_by_host and answers == [], (end, answers)
    rows = records_since(lnet, TV, since)
    assert [(r.method, r.status) for r in rows] == [(LINK_METHOD, "INVALID_ARGUMENT")], _shape(rows)
    assert reason in rows[0].refusal_reason and rows[0].peer == f"spiffe://{SURREY}.se.psn/gateway", _shape(rows)
    still_serving(lnet, TV)


def test_a_link_that_breaks_inside_a_frame_is_logged_not_recorded(lnet: NetworkThread) -> None:
    listener = _gateway(lnet, TV)._relay_listener
    assert listener is not None
    open_before = len(listener._links)
    peer = RawPeer(lnet, SURREY, TV)
    since = time.time()
    try:
        # Half a frame, then the peer closes (expect=0): a connection that broke, not a refusal of anything.
        end, answers = peer.link_raw([Unframed(struct.pack(">I", 100) + b"abc")], expect=0)
    finally:
        peer.close()
    assert end.how == "done" and answers == [], end
    wait_for(lambda: len(listener._links) <= open_before, "the host to end the broken link", timeout=5)
    assert records_since(lnet, TV, since) == [], _shape(records_since(lnet, TV, since))
    still_serving(lnet, TV)


# -- hostile requests on a link -------------------------------------------------------------------


def test_a_hostile_request_on_a_link_is_refused_and_recorded_and_its_neighbours_are_answered(
    lnet: NetworkThread,
) -> None:
    peer = RawPeer(lnet, SURREY, TV)
    try:
        good = [peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer())) for _ in range(2)]
        forged = peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer()))
        forged.signature = bytes([forged.signature[0] ^ 1]) + forged.signature[1:]
        since = time.time()
        answers = peer.link((1, good[0], SEARCH_MSG), (2, forged, SEARCH_MSG), (3, good[1], SEARCH_MSG))
        assert answers[1].status == answers[3].status == "OK", answers
        assert answers[2].code is grpc.StatusCode.UNAUTHENTICATED, answers[2]
        assert "verify" not in answers[2].details  # the caller sees the class, not the reason
        rows = records_since(lnet, TV, since)
        refused = [r for r in rows if r.status == "UNAUTHENTICATED"]
        assert len(refused) == 1, _shape(rows)
        assert refused[0].refusal_stage == "envelope" and "does not verify" in refused[0].refusal_reason
        assert refused[0].method == LINK_METHOD  # refused before its envelope verified: the link's method
        assert sorted(r.status for r in rows) == ["OK", "OK", "UNAUTHENTICATED"], _shape(rows)
    finally:
        peer.close()
    still_serving(lnet, TV)


def test_a_replayed_request_on_a_link_is_refused(lnet: NetworkThread) -> None:
    peer = RawPeer(lnet, SURREY, TV)
    try:
        signed = peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer()))
        assert peer.unary(signed, SEARCH_MSG, via="link").status == "OK"
        since = time.time()
        again = peer.unary(signed, SEARCH_MSG, via="link")  # a second link: the replay store is the gateway's
        assert again.code is grpc.StatusCode.UNAUTHENTICATED, again
        # Replayed on the same link as the original: refused too.
        fresh = peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer()))
        end, answers = peer.link_raw([_batch((1, fresh, SEARCH_MSG)), _batch((2, fresh, SEARCH_MSG))], expect=2)
        assert end.how == "done", end
        # Whichever of the two runs first is answered; the other is a replay.
        codes = sorted(a.refusal.code if a.HasField("refusal") else 0 for a in answers)
        assert codes == [0, grpc.StatusCode.UNAUTHENTICATED.value[0]], answers
    finally:
        peer.close()
    replays = [r for r in records_since(lnet, TV, since) if "replayed request id" in r.refusal_reason]
    assert len(replays) == 2, _shape(records_since(lnet, TV, since))


def test_a_request_id_already_in_flight_on_a_link_is_refused(lnet: NetworkThread) -> None:
    peer = RawPeer(lnet, SURREY, TV)
    try:
        first, second = (
            peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer())) for _ in range(2)
        )
        since = time.time()
        end, answers = peer.link_raw([_batch((7, first, SEARCH_MSG), (7, second, SEARCH_MSG))], expect=2)
    finally:
        peer.close()
    assert end.how == "done", end
    codes = sorted(a.refusal.code if a.HasField("refusal") else 0 for a in answers)
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]], answers
    refused = [r for r in records_since(lnet, TV, since) if r.status == "INVALID_ARGUMENT"]
    assert len(refused) == 1 and "already in flight" in refused[0].refusal_reason, _shape(refused)


# -- streaming calls on links ---------------------------------------------------------------------

#: An officer of Thames Valley's custody unit: bulk look-ups (a client stream hosted by Hampshire) are theirs.
CUSTODY_OFFICER: dict[str, Any] = {"units": ("tvp-custody",), "roles": ("custody-officer",), "clearance": "NPPV3"}

#: Bytes of each bidi message (and its acknowledgement): the stream crosses its window many times each way.
BIG = 200_000

REVIEW = "/psn.demo.casefiles.v1.CaseFiles/Review"
COMMENT = casefiles_pb2.ReviewComment(case_reference="C1", paragraph="1", comment="ok").SerializeToString()


def _switch_off_grpc_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Relay/Unary, Relay/Stream and Relay/Mux answer UNIMPLEMENTED at every gateway: only links carry calls."""
    monkeypatch.setattr(server_module, "_RELAY_UNARY", "/psn.gateway.v1.Relay/Switched-Off")
    monkeypatch.setattr(server_module, "_RELAY_STREAM", "/psn.gateway.v1.Relay/Switched-Off-Stream")
    monkeypatch.setattr(server_module, "MUX_METHOD", "/psn.gateway.v1.Relay/Switched-Off-Too")


def _stream_calls(net: NetworkThread, officer: str) -> None:
    """A server, a bidi and a client stream, each to another force, each checked."""
    with net.officer_channel(SURREY, officer=officer) as ch:  # intel-search: Thames Valley
        matches = intel_pb2_grpc.IntelligenceSearchStub(ch).StreamMatches(
            intel_pb2.SearchRequest(subject="alpha"), timeout=10
        )
        assert [m.report_id for m in matches] == ["IR-0001", "IR-0002", "IR-0004"]
    with net.officer_channel(TV, officer=officer) as ch:  # case-files: Surrey
        assert case_files(ch) == ("OK", "")
        comments = [
            casefiles_pb2.ReviewComment(case_reference="C1", paragraph=chr(97 + i) * BIG, comment="ok")
            for i in range(16)
        ]
        acks = list(casefiles_pb2_grpc.CaseFilesStub(ch).Review(iter(comments), timeout=30))
        assert [a.sequence for a in acks] == list(range(1, 17))
        assert [a.paragraph for a in acks] == [c.paragraph for c in comments]  # 3.2 MB each way, intact
    with net.officer_channel(TV, officer=officer, **CUSTODY_OFFICER) as ch:  # custody-records: Hampshire
        numbers = [f"HC/{n:05d}/26" for n in (1, 2, 3)] + ["HC/88888/26"]
        summary = custody_pb2_grpc.CustodyRecordsStub(ch).BulkLookup(
            (custody_pb2.GetRecordRequest(custody_number=n) for n in numbers), timeout=10
        )
        assert [r.custody_number for r in summary.found] == numbers[:3]
        assert list(summary.not_found) == ["HC/88888/26"]


def test_streaming_calls_travel_over_relay_links_and_each_is_recorded_at_both_ends(
    lnet: NetworkThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With every gRPC relay method switched off, only relay links can carry a relayed stream.
    _switch_off_grpc_relay(monkeypatch)
    officer = fresh_officer()
    since = time.time()
    _stream_calls(lnet, officer)
    for origin, host in ((SURREY, TV), (TV, SURREY), (TV, HANTS)):
        mux = _gateway(lnet, origin).relay.mux
        assert mux is not None and mux.transport(host) == "link"
        links = [s for (h, _), s in mux._streams.items() if h == host and s.closed is None]
        assert links and all(isinstance(s.pipe, TlsLink) for s in links), (origin, host)

    def final(force: str) -> list[Any]:
        rows = [r for r in records_since(lnet, force, since) if r.officer_id == officer]
        return [r for r in rows if r.event != "stream-open"]

    origin = final(SURREY) + final(TV)
    host = [r for force in (TV, SURREY, HANTS) for r in final(force) if r.peer.endswith(".se.psn/gateway")]
    assert sorted(r.method for r in host) == sorted(
        [
            "/psn.demo.intel.v1.IntelligenceSearch/StreamMatches",
            "/psn.demo.casefiles.v1.CaseFiles/FetchDocument",
            REVIEW,
            "/psn.demo.custody.v1.CustodyRecords/BulkLookup",
        ]
    ), [(r.method, r.event, r.status) for r in host]
    assert all(r.status == "OK" for r in host), [(r.method, r.status, r.refusal_reason) for r in host]
    by_id = {r.request_id: r for r in origin}
    for r in host:
        mine = by_id[r.request_id]  # the same call, recorded at its origin
        assert mine.status == "OK" and mine.method == r.method
        assert r.seal_signature and mine.seal_signature == r.seal_signature, r.method
        assert r.envelope_signature and mine.envelope_signature == r.envelope_signature, r.method


def test_a_finished_stream_is_forgotten_by_its_link(lnet: NetworkThread) -> None:
    with lnet.officer_channel(SURREY, officer=fresh_officer()) as ch:
        matches = intel_pb2_grpc.IntelligenceSearchStub(ch).StreamMatches(
            intel_pb2.SearchRequest(subject="alpha"), timeout=10
        )
        assert len(list(matches)) == 3
    mux = _gateway(lnet, SURREY).relay.mux
    assert mux is not None

    def held() -> dict[int, Any]:
        return {i: c for (h, _), s in list(mux._streams.items()) if h == TV for i, c in s._calls.items()}

    wait_for(lambda: not held(), "the origin to forget the finished stream", timeout=2)


def _stream_item(stream_id: int, frame: relay_pb2.RelayFrame) -> relay_pb2.MuxStream:
    return relay_pb2.MuxStream(id=stream_id, frame=frame.SerializeToString())


def _fetch(peer: RawPeer, link: LinkSession, stream_id: int) -> str:
    """A good FetchDocument (a server stream Surrey hosts) on `link`: the status it ended with."""
    request = casefiles_pb2.FetchDocumentRequest(case_reference="C", document_id="D").SerializeToString()
    env = peer.envelope("/psn.demo.casefiles.v1.CaseFiles/FetchDocument", message=request, officer=fresh_officer())
    assert env.call_type is CallType.SERVER_STREAM
    link.send(
        _stream_item(stream_id, envelope_frame(peer.sign(env))),
        _stream_item(stream_id, message_frame(0, request)),
        relay_pb2.MuxStream(id=stream_id, end=True),
    )
    assert link.read_until(lambda: link.over(stream_id), credit=True) is None, link.ended
    return link.outcome(stream_id).status


def test_a_peer_that_floods_a_stream_past_its_window_gets_the_link_ended_with_a_recorded_refusal(
    lnet: NetworkThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold the stream at the host once it is admitted and recorded open, before its application is
    # called: from then on nothing reads the stream's frames, so nothing is granted back.
    host = _gateway(lnet, SURREY)
    entered = threading.Event()
    gate = asyncio.Event()
    open_upstream = host.open_upstream

    async def held(call: Any) -> Any:
        entered.set()
        await gate.wait()
        return await open_upstream(call)

    monkeypatch.setattr(host, "open_upstream", held)
    peer = RawPeer(lnet, HANTS, SURREY)
    officer = fresh_officer()
    since = time.time()
    big = _stream_item(1, message_frame(0, b"x" * (1 << 20)))
    flood = WINDOW // len(big.frame) + 3  # past the window and the one frame that may overshoot it
    try:
        with peer.open_link() as link:
            link.send(_stream_item(1, envelope_frame(peer.sign(peer.envelope(REVIEW, officer=officer)))))
            assert entered.wait(10), "the stream never reached the host's application stage"
            with contextlib.suppress(OSError):  # the host may end the link while the flood is still going out
                for _ in range(flood):
                    link.send(big)
            ended = link.read_until(lambda: False, timeout=10)
    finally:
        lnet.loop.call_soon_threadsafe(gate.set)
        peer.close()
    assert ended is not None and ended.closed_by_host, ended
    assert kinds_sent(link, 1) == [], "the host sent nothing for the flooded stream"
    rows = records_since(lnet, SURREY, since)
    refused = [r for r in rows if r.method == LINK_METHOD]
    assert [r.status for r in refused] == ["INVALID_ARGUMENT"], _shape(rows)
    assert "flow-control window" in refused[0].refusal_reason, _shape(rows)
    assert refused[0].peer == f"spiffe://{HANTS}.se.psn/gateway"
    # The stream itself: recorded open, then cancelled as its link ended.
    wait_for(
        lambda: [r.status for r in records_since(lnet, SURREY, since) if r.officer_id == officer][-1:] == ["CANCELLED"],
        "the flooded stream to be recorded as cancelled",
        timeout=5,
    )
    still_serving(lnet, SURREY)


def kinds_sent(link: LinkSession, stream_id: int) -> list[str]:
    """What the host sent on one stream, credit aside."""
    out = []
    for item in link.items(stream_id):
        out += ["frame"] * bool(item.frame) + ["refusal"] * item.HasField("refusal") + ["end"] * item.end
    return out


def test_a_stream_the_origin_cancels_mid_way_is_recorded_cancelled_and_the_link_serves_on(lnet: NetworkThread) -> None:
    peer = RawPeer(lnet, HANTS, SURREY)
    officer = fresh_officer()
    since = time.time()
    try:
        with peer.open_link() as link:
            link.send(
                _stream_item(1, envelope_frame(peer.sign(peer.envelope(REVIEW, officer=officer)))),
                _stream_item(1, message_frame(0, COMMENT)),
            )
            # The first acknowledgement: the call is running at the host's application.
            first_ack = link.read_until(lambda: bool(link.frames(1)) and link.frames(1)[-1].HasField("message"))
            assert first_ack is None, link.ended
            link.send(relay_pb2.MuxStream(id=1, cancel=True))
            wait_for(
                lambda: any(
                    r.status == "CANCELLED" for r in records_since(lnet, SURREY, since) if r.officer_id == officer
                ),
                "the host to record the stream as cancelled",
                timeout=5,
            )
            # The link serves on: a second stream on it.
            assert _fetch(peer, link, 3) == "OK"
            assert "end" not in kinds_sent(link, 1) and "refusal" not in kinds_sent(link, 1)
    finally:
        peer.close()
    mine = [(r.event, r.status) for r in records_since(lnet, SURREY, since) if r.officer_id == officer]
    assert mine == [("stream-open", ""), ("stream-close", "CANCELLED")], mine
    still_serving(lnet, SURREY)


def test_stream_items_for_a_stream_that_never_began_start_nothing_and_record_nothing(lnet: NetworkThread) -> None:
    # An end, a cancel, a credit, or an empty frame for an id that never had a frame: no stream begins.
    peer = RawPeer(lnet, SURREY, TV)
    officer = fresh_officer()
    since = time.time()
    try:
        with peer.open_link() as link:
            link.send(
                relay_pb2.MuxStream(id=1, end=True),
                relay_pb2.MuxStream(id=3, cancel=True),
                relay_pb2.MuxStream(id=5, credit=1 << 20),
                relay_pb2.MuxStream(id=7, frame=b""),
            )
            signed = peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=officer))
            link.send(
                requests=[
                    relay_pb2.MuxRequest(id=9, request=relay_pb2.UnaryRelayRequest(envelope=signed, message=SEARCH_MSG))
                ]
            )
            assert link.read_until(lambda: bool(link.responses())) is None, link.ended
            assert all(not b.streams for b in link.batches), link.batches
    finally:
        peer.close()
    [answer] = link.responses()
    assert answer.id == 9 and answer.HasField("response"), answer
    rows = records_since(lnet, TV, since)
    assert [(r.officer_id, r.status) for r in rows] == [(officer, "OK")], _shape(rows)


def test_frames_still_arriving_for_a_stream_the_host_ended_start_nothing(lnet: NetworkThread) -> None:
    # The host refuses a stream at its envelope (a bad signature) while the origin still sends its messages.
    peer = RawPeer(lnet, HANTS, SURREY)
    signed = peer.sign(peer.envelope(REVIEW, officer=fresh_officer()))
    signed.signature = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    since = time.time()
    try:
        with peer.open_link() as link:
            link.send(_stream_item(1, envelope_frame(signed)))
            assert link.read_until(lambda: link.over(1)) is None, link.ended
            assert link.outcome(1).code is grpc.StatusCode.UNAUTHENTICATED
            link.send(_stream_item(1, message_frame(0, COMMENT)), _stream_item(1, message_frame(1, COMMENT)))
            assert _fetch(peer, link, 3) == "OK"
            link.read_until(lambda: kinds_sent(link, 1).count("refusal") > 1, timeout=1)
            refusals = kinds_sent(link, 1).count("refusal")
    finally:
        peer.close()
    rows = records_since(lnet, SURREY, since)
    assert [r.refusal_stage for r in rows if r.refusal_stage] == ["envelope"], _shape(rows)
    assert refusals == 1


# -- the origin checks the host -------------------------------------------------------------------


def _impostor_material(net: NetworkThread, tmp: Path) -> KeyPair:
    """A certificate from the host force's own CA, with its gateway's DNS name, but an application's identity.

    `psngw pki` refuses to issue it (an application's certificate with the gateway's name): this is a
    CA that mis-issues, built by hand.
    """
    material = net.layout.material[TV]
    force = net.layout.directory().forces[TV]
    ca = x509.load_pem_x509_certificate(material.ca.read_bytes())
    ca_key: Any = serialization.load_pem_private_key(material.ca_key.read_bytes(), password=None)
    profile = pki.leaf_profile(
        pki.CertKind.APP_SERVER,
        trust_domain=force.trust_domain,
        display_name="Thames Valley Police",
        app="intel-search",
    )
    profile = dataclasses.replace(profile, dns_names=(*profile.dns_names, force.gateway_server_name))
    key = pki.generate_key()
    now = ca.not_valid_before_utc
    cert = pki.build_certificate(
        profile,
        public_key=key.public_key(),
        issuer=ca,
        issuer_key=ca_key,
        not_before=now,
        not_after=ca.not_valid_after_utc,
    )
    cert_path, key_path = tmp / "impostor.pem", tmp / "impostor.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return KeyPair.load(cert_path, key_path)


def test_the_origin_sends_nothing_over_a_link_whose_host_is_not_that_forces_gateway(
    lnet: NetworkThread, tmp_path: Path
) -> None:
    origin = _gateway(lnet, SURREY)
    mux = origin.relay.mux
    assert mux is not None
    real_target = mux._targets[TV]
    # The origin's side of the handshake: TLS 1.3 only, the host force's CA only, the gateway's name checked.
    context = real_target.context
    assert context.minimum_version is context.maximum_version is ssl.TLSVersion.TLSv1_3
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    tv_ca = x509.load_pem_x509_certificate(lnet.layout.material[TV].ca.read_bytes())
    assert [ssl.DER_cert_to_PEM_cert(c) for c in context.get_ca_certs(binary_form=True)] == [
        tv_ca.public_bytes(serialization.Encoding.PEM).decode()
    ]
    assert real_target.server_name == f"gateway.{TV}.se.psn"
    roots = b"".join(lnet.layout.material[f].ca.read_bytes() for f in lnet.layout.material)
    hants_tls = lnet.layout.material[HANTS].gateway_tls
    impostors = {
        # passes the CA pin, the host name and the trust store (serverAuth, unrevoked): only the identity differs
        "an application of the host force with the gateway's name": _impostor_material(lnet, tmp_path),
        "another force's real gateway": KeyPair.load(hants_tls.cert_path, hants_tls.key_path),
    }
    received: list[bytes] = []

    async def swallow(_cert: bytes, connection: LinkConnection) -> None:
        try:
            received.append(await connection.read() or b"")  # None: closed without a frame
        except (GatewayError, OSError):
            received.append(b"")

    async def attempt(keypair: KeyPair | None) -> str:
        listener = None
        target = real_target
        if keypair is not None:
            context = server_context(keypair, roots)
            listener = RelayLinkListener(
                "127.0.0.1:0", context=lambda: context, handle=swallow, reuse_port=False, max_frame=1 << 20
            )
            target = dataclasses.replace(real_target, address=f"127.0.0.1:{await listener.start()}")
        link = TlsLink(TV, target, check=partial(origin._check_link_host, TV), max_frame=1 << 20)
        try:
            await link.write(relay_pb2.MuxBatch())  # an empty batch: nothing for a real host to answer
        except Unavailable as exc:
            return exc.reason
        finally:
            link.abort()
            if listener is not None:
                await listener.stop(5)
        return "written"

    # The control: the same target at the real host's address carries frames.
    assert lnet.run(attempt(None)) == "written"
    for what, keypair in impostors.items():
        reason = lnet.run(attempt(keypair))
        assert reason != "written", what
        if what.startswith("an application"):
            assert "the host's TLS certificate is refused" in reason and "/app/intel-search" in reason, reason
    assert all(data == b"" for data in received), received  # no frame ever reached an impostor

    # The check itself, on the running gateway: the host's own gateway certificate only.
    def der(path: Path) -> bytes:
        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)

    origin._check_link_host(TV, der(lnet.layout.material[TV].gateway_tls.cert_path))
    for cert in (
        lnet.layout.material[HANTS].gateway_tls.cert_path,
        lnet.layout.material[TV].app_clients["analyst-desk"].cert_path,
        tmp_path / "impostor.pem",
    ):
        with pytest.raises(GatewayError):
            origin._check_link_host(TV, der(cert))


# -- connections that never finish a handshake ---------------------------------------------------


def test_connections_that_never_finish_a_handshake_are_capped_and_the_listener_serves_on(lnet: NetworkThread) -> None:
    origin = _gateway(lnet, SURREY)
    mux = origin.relay.mux
    assert mux is not None
    real_target = mux._targets[TV]
    tv_tls = lnet.layout.material[TV].gateway_tls
    roots = b"".join(lnet.layout.material[f].ca.read_bytes() for f in lnet.layout.material)
    context = server_context(KeyPair.load(tv_tls.cert_path, tv_tls.key_path), roots)
    served: list[bytes] = []

    async def handle(certificate: bytes, connection: LinkConnection) -> None:
        served.append(certificate)
        with contextlib.suppress(GatewayError, OSError):
            await connection.read()

    async def run() -> dict[str, Any]:
        listener = RelayLinkListener(
            "127.0.0.1:0", context=lambda: context, handle=handle, reuse_port=False, max_frame=1 << 20,
            max_handshakes=8, max_handshakes_per_address=4,
        )  # fmt: skip
        port = await listener.start()
        seen: dict[str, Any] = {}
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def connect(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            # A client that connects and says nothing: its handshake waits for a ClientHello.
            return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))

        async def settle(count: int) -> int:
            for _ in range(200):
                if len(listener._handshakes) == count:
                    break
                await asyncio.sleep(0.01)
            return len(listener._handshakes)

        async def closed_at_once(source: str) -> bool:
            reader, writer = await connect(source)
            try:
                return await asyncio.wait_for(reader.read(), 2) == b""  # not held for the handshake timeout
            except ConnectionResetError:
                return True
            finally:
                writer.close()

        try:
            idle += [await connect("127.0.0.2") for _ in range(4)]
            seen["one address"] = await settle(4)
            seen["its fifth"] = await closed_at_once("127.0.0.2")  # over the per-address cap
            idle += [await connect("127.0.0.3") for _ in range(4)]  # another address still gets in
            seen["two addresses"] = await settle(8)
            seen["a third address"] = await closed_at_once("127.0.0.4")  # over the listener's cap
            for _, writer in idle:  # the idle clients leave: their handshakes end and free their places
                writer.close()
            seen["left"] = await settle(0)
            target = dataclasses.replace(real_target, address=f"127.0.0.1:{port}")
            link = TlsLink(TV, target, check=partial(origin._check_link_host, TV), max_frame=1 << 20)
            try:
                await link.write(relay_pb2.MuxBatch())  # a gateway that does handshake is served
                seen["gateway"] = "written"
            except Unavailable as exc:
                seen["gateway"] = exc.reason
            finally:
                link.abort()
            return seen
        finally:
            await listener.stop(1)

    seen = lnet.run(run())
    assert seen == {
        "one address": 4,
        "its fifth": True,
        "two addresses": 8,
        "a third address": True,
        "left": 0,
        "gateway": "written",
    }, seen
    assert len(served) == 1


# -- stopping ---------------------------------------------------------------------------------------


def test_a_host_that_stops_finishes_the_calls_on_its_links_then_ends_them_and_the_origin_drops_them(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    net = NetworkThread(tmp_path_factory.mktemp("link-stop-net")).start()
    try:
        mux = _gateway(net, SURREY).relay.mux
        assert mux is not None and mux.transport(TV) == "link"
        host = _gateway(net, TV)
        with net.officer_channel(SURREY, officer=fresh_officer()) as channel:
            assert search(channel)[0] is grpc.StatusCode.OK
        assert mux.streams(TV) >= 1

        # Hold the next call at the host, after it was admitted and before its application answers.
        entered = threading.Event()
        gate = asyncio.Event()
        forward = host.forward_unary

        async def held(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            await gate.wait()
            return await forward(*args, **kwargs)

        host.forward_unary = held  # type: ignore[method-assign]
        officer = fresh_officer()
        with net.officer_channel(SURREY, officer=officer) as channel, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(search, channel)
            assert entered.wait(10), "the call never reached the host"
            # A grace far longer than the test: an open link must not hold the stop for it.
            stopping = asyncio.run_coroutine_threadsafe(host.stop(grace=120), net.loop)
            wait_for(host._draining.is_set, "the host to start draining", timeout=5)
            assert not in_flight.done() and mux.streams(TV) >= 1  # the drain waits for the call on the link
            net.loop.call_soon_threadsafe(gate.set)
            assert in_flight.result(10) == (grpc.StatusCode.OK, "")
            stopping.result(20)
        wait_for(lambda: mux.streams(TV) == 0, "the origin to drop the ended relay links", timeout=5)
        for force in (SURREY, TV):  # the call that finished during the drain is recorded at both ends
            assert [r.status for r in records_since(net, force, 0) if r.officer_id == officer] == ["OK"], force
    finally:
        net.stop()
