"""Relay channels (`Relay/Mux`): many unary relay calls over one long-lived stream between two gateways.

What must hold (gateway.mux): relayed unary calls really travel over relay channels, at most one per
peer connection; each call on a channel is signed, verified, decided and recorded on its own, at both
ends, exactly as on `Relay/Unary`; a hostile request on a channel is refused and recorded without
harming the calls beside it or the channel; garbage or a non-gateway peer ends the channel with a
recorded refusal; and an origin whose peer does not serve `Relay/Mux` falls back to `Relay/Unary`.
(The hostile-envelope corpus also runs every unary relay case over a relay channel: test_corpus.py.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from gateway import server as server_module
from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.server import Gateway
from tests.integration._hostile_common import SEARCH, SEARCH_MSG, fresh_officer, relay_network, still_serving
from tests.integration._hostile_peer import RawPeer
from tests.netharness import NetworkThread, records_since, search, wait_for

pytestmark = pytest.mark.integration

TV, HANTS, SURREY = "thames-valley", "hampshire", "surrey"


@pytest.fixture(scope="module")
def mnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkThread]:
    # Relay channels over gRPC (`Relay/Mux`): no relay listeners (relay links: test_relay_links.py).
    yield from relay_network(tmp_path_factory.mktemp("mux-net"), relay_links=False)


def _gateway(net: NetworkThread, force: str) -> Gateway:
    return net.network.gateways[force]


def test_relayed_unary_calls_travel_over_relay_channels_and_each_is_recorded_at_both_ends(
    mnet: NetworkThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With Relay/Unary switched off at every gateway, only relay channels can carry a relayed call.
    monkeypatch.setattr(server_module, "_RELAY_UNARY", "/psn.gateway.v1.Relay/Switched-Off")
    officer = fresh_officer()
    since = time.time()
    with mnet.officer_channel(SURREY, officer=officer) as channel, ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda _: search(channel), range(48)))
    assert all(code is grpc.StatusCode.OK for code, _ in outcomes), outcomes
    origin_gateway = _gateway(mnet, SURREY)
    mux = origin_gateway.relay.mux
    assert mux is not None
    assert 1 <= mux.streams(TV) <= origin_gateway.config.limits.peer_channels
    # What operators see: the channels in /healthz and /metrics.
    assert origin_gateway.health()["relay_channels"][TV] == {
        "open": mux.streams(TV),
        "by_unary_rpc": False,
        "transport": "grpc",
    }
    exposed = origin_gateway.registry.expose().decode()
    [value] = re.findall(rf'^psngw_relay_channels_open\{{force="{TV}"\}} (\S+)$', exposed, re.MULTILINE)
    assert float(value) == mux.streams(TV)

    origin = [r for r in records_since(mnet, SURREY, since) if r.officer_id == officer]
    host = [r for r in records_since(mnet, TV, since) if r.officer_id == officer]
    assert len(origin) == len(host) == 48
    assert {r.request_id for r in origin} == {r.request_id for r in host}
    assert all(r.status == "OK" and r.method == SEARCH for r in origin + host)
    # Each call's own envelope and seal signatures, at both ends: nothing is shared between calls.
    assert len({r.envelope_signature for r in host}) == 48
    assert {r.envelope_signature for r in host} == {r.envelope_signature for r in origin}
    assert {r.seal_signature for r in host} == {r.seal_signature for r in origin}


def test_a_hostile_request_on_a_channel_is_refused_and_recorded_and_its_neighbours_are_answered(
    mnet: NetworkThread,
) -> None:
    peer = RawPeer(mnet, SURREY, TV)
    try:
        good = [peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer())) for _ in range(2)]
        bad_env = peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer())
        forged = peer.sign(bad_env)
        forged.signature = bytes([forged.signature[0] ^ 1]) + forged.signature[1:]
        since = time.time()
        answers = peer.mux((1, good[0], SEARCH_MSG), (2, forged, SEARCH_MSG), (3, good[1], SEARCH_MSG))
        assert answers[1].status == answers[3].status == "OK", answers
        assert answers[2].code is grpc.StatusCode.UNAUTHENTICATED, answers[2]
        assert "verify" not in answers[2].details  # the caller sees the class, not the reason
        refused = [r for r in records_since(mnet, TV, since) if r.status == "UNAUTHENTICATED"]
        assert len(refused) == 1
        assert refused[0].refusal_stage == "envelope" and "does not verify" in refused[0].refusal_reason
    finally:
        peer.close()
    still_serving(mnet, TV)


def test_a_request_id_already_in_flight_on_a_channel_is_refused(mnet: NetworkThread) -> None:
    peer = RawPeer(mnet, SURREY, TV)
    try:
        first, second = (
            peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer())) for _ in range(2)
        )
        batch = relay_pb2.MuxBatch(
            requests=[
                relay_pb2.MuxRequest(id=7, request=relay_pb2.UnaryRelayRequest(envelope=s, message=SEARCH_MSG))
                for s in (first, second)
            ]
        )
        end, answers = peer.mux_raw([batch.SerializeToString()])
        assert end.code is grpc.StatusCode.OK, end
        codes = sorted(a.refusal.code if a.HasField("refusal") else 0 for a in answers)
        assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]], answers
    finally:
        peer.close()


def test_a_replayed_request_on_a_channel_is_refused(mnet: NetworkThread) -> None:
    peer = RawPeer(mnet, SURREY, TV)
    try:
        signed = peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer()))
        assert peer.unary(signed, SEARCH_MSG, via_mux=True).status == "OK"
        again = peer.unary(signed, SEARCH_MSG, via_mux=True)
        assert again.code is grpc.StatusCode.UNAUTHENTICATED, again
    finally:
        peer.close()


def test_a_garbage_batch_ends_the_channel_with_a_recorded_refusal_and_the_gateway_serves_on(
    mnet: NetworkThread,
) -> None:
    peer = RawPeer(mnet, SURREY, TV)
    since = time.time()
    try:
        end, answers = peer.mux_raw([b"\xff\xff\xff\xff"])
    finally:
        peer.close()
    assert end.code is grpc.StatusCode.INVALID_ARGUMENT and answers == [], end
    assert "parse" not in end.details
    refused = [r for r in records_since(mnet, TV, since) if r.status == "INVALID_ARGUMENT"]
    assert any("does not parse" in r.refusal_reason for r in refused), refused
    still_serving(mnet, TV)


def test_a_peer_that_is_not_a_gateway_cannot_open_a_channel(mnet: NetworkThread) -> None:
    material = mnet.layout.material[SURREY]
    app = material.app_clients["analyst-desk"]
    roots = b"".join(mnet.layout.material[f].ca.read_bytes() for f in mnet.layout.material)
    creds = grpc.ssl_channel_credentials(roots, app.key_path.read_bytes(), app.cert_path.read_bytes())
    target = mnet.layout.directory().forces[TV]
    since = time.time()
    with grpc.secure_channel(
        target.peer_address, creds, options=[("grpc.ssl_target_name_override", target.gateway_server_name)]
    ) as channel:
        peer = RawPeer(mnet, SURREY, TV)
        signed = peer.sign(peer.envelope(SEARCH, message=SEARCH_MSG, officer=fresh_officer()))
        peer.close()
        batch = relay_pb2.MuxBatch(
            requests=[relay_pb2.MuxRequest(id=1, request=relay_pb2.UnaryRelayRequest(envelope=signed, message=b"x"))]
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(channel.stream_stream("/psn.gateway.v1.Relay/Mux")(iter([batch.SerializeToString()]), timeout=10))
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    refused = [r for r in records_since(mnet, TV, since) if r.refusal_stage == "peer-identity"]
    assert len(refused) == 1 and "not a gateway" in refused[0].refusal_reason, refused


def test_an_origin_falls_back_to_unary_rpcs_when_its_peer_has_no_relay_channels(
    mnet: NetworkThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = _gateway(mnet, HANTS)
    mux = origin.relay.mux
    assert mux is not None
    mnet.run(mux.close())  # the next call opens a new channel, which the host now refuses
    monkeypatch.setattr(server_module, "MUX_METHOD", "/psn.gateway.v1.Relay/Switched-Off")
    # Many at once: calls still queued on the channel when the host refuses it were not delivered either.
    with mnet.officer_channel(HANTS, officer=fresh_officer()) as channel, ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda _: search(channel)[0], range(48)))
    assert outcomes == [grpc.StatusCode.OK] * 48
    assert not mux.supports(TV)
    assert origin.health()["relay_channels"][TV]["by_unary_rpc"] is True
    assert origin.relay.breaker(TV).state.name == "CLOSED"
    monkeypatch.undo()
    mux._unsupported.clear()  # a minute later, in effect
    with mnet.officer_channel(HANTS, officer=fresh_officer()) as channel:
        assert search(channel)[0] is grpc.StatusCode.OK
    assert mux.supports(TV) and mux.streams() >= 1


def test_a_channel_whose_connection_is_closed_is_dropped_and_the_next_call_opens_a_new_one(
    mnet: NetworkThread,
) -> None:
    origin = _gateway(mnet, HANTS)
    mux = origin.relay.mux
    assert mux is not None
    with mnet.officer_channel(HANTS, officer=fresh_officer()) as channel:
        assert search(channel)[0] is grpc.StatusCode.OK
        assert mux.streams() >= 1
        # What a reload does to a retired connection, once its grace is over: the relay channel on it dies.
        mnet.run(origin.peers.close())
        wait_for(lambda: mux.streams() == 0, "the closed relay channels to be dropped", timeout=10)
        assert search(channel)[0] is grpc.StatusCode.OK
    assert mux.streams() >= 1


def test_a_host_that_stops_ends_its_relay_channels_at_once_and_the_origin_drops_them(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    net = NetworkThread(tmp_path_factory.mktemp("mux-stop-net")).start()
    try:
        with net.officer_channel(SURREY, officer=fresh_officer()) as channel:
            assert search(channel)[0] is grpc.StatusCode.OK
        mux = _gateway(net, SURREY).relay.mux
        assert mux is not None and mux.streams(TV) >= 1
        host = _gateway(net, TV)
        started = time.monotonic()
        net.run(host.stop())
        # An open channel does not hold the stop for its grace (10 s): the host drains it and ends it.
        assert time.monotonic() - started < host.config.limits.shutdown_grace / 2
        wait_for(lambda: mux.streams(TV) == 0, "the origin to drop the ended relay channels", timeout=5)
    finally:
        net.stop()
