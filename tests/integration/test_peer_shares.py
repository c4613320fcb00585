"""One peer force cannot take every place the host has: its share of links and long-lived RPCs, and its calls' time.

A host's relay listener serves at most `MAX_LINKS` links and its peer listener
`max_concurrent_calls` RPCs, for every force together. A peer that holds links
or relay streams open without calling (idle links, streams that never send their
envelope) is a denial of service against the other forces unless each force may
hold only its share: half of each. A `Relay/Stream` RPC must also send its
envelope within `FIRST_FRAME_SECONDS`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import grpc
import pytest

from gateway import server as server_module
from gateway._proto.psn.demo.intel.v1 import intel_pb2
from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.relaylink import MAX_LINKS
from tests.integration._hostile_common import LIFTED_RATE_LIMITS, append_config, wait_for
from tests.integration._hostile_peer import STREAM, RawPeer, envelope_frame, message_frame
from tests.netharness import NetworkThread, records_since

pytestmark = pytest.mark.integration

TV, HANTS, SURREY = "thames-valley", "hampshire", "surrey"
SEARCH = "/psn.demo.intel.v1.IntelligenceSearch/Search"
STREAM_MATCHES = "/psn.demo.intel.v1.IntelligenceSearch/StreamMatches"
SEARCH_MSG = intel_pb2.SearchRequest(subject="alpha").SerializeToString()
#: the peer listener's cap on RPCs at once, small enough to fill in a test: each force may hold 4
MAX_CALLS = 8


@pytest.fixture(scope="module")
def snet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkThread]:
    net = NetworkThread(tmp_path_factory.mktemp("shares-net"), echo=True, relay_links=True)
    append_config(net, LIFTED_RATE_LIMITS + f"\n[limits]\nmax_concurrent_calls = {MAX_CALLS}\n")
    net.start()
    yield net
    net.stop()


def _relayed_search(peer: RawPeer, via: Any) -> str:
    env = peer.envelope(SEARCH, message=SEARCH_MSG)
    return peer.unary(peer.sign(env), SEARCH_MSG, via=via).status


def _held(host: Any, force: str, want: int) -> None:
    wait_for(lambda: host._link_shares.held(force) == want, f"the host to hold {want} links of {force}")


def test_one_force_holding_its_share_of_relay_links_leaves_room_for_the_others(snet: NetworkThread) -> None:
    host = snet.network.gateways[TV]
    share = MAX_LINKS // 2
    flood = RawPeer(snet, HANTS, TV)
    since = time.time()
    with ExitStack() as links:
        # Hampshire's own gateway holds some links to Thames Valley already: open until its share is full.
        while (held := host._link_shares.held(HANTS)) < share:
            links.enter_context(flood.open_link())
            _held(host, HANTS, held + 1)
        # One more from Hampshire is refused (recorded), and Hampshire still holds its share.
        with flood.open_link() as extra:
            assert extra.read_until(lambda: False, timeout=5) is not None, "the host ends the link over the share"
        refused = records_since(snet, TV, since, status="RESOURCE_EXHAUSTED")
        assert [r.refusal_reason for r in refused] == [f"force {HANTS} holds {share} relay links already, its share"]
        # Surrey's gateway still gets a new link, and calls over it are answered.
        assert _relayed_search(RawPeer(snet, SURREY, TV), "link") == "OK"
    wait_for(lambda: host._link_shares.held(HANTS) < share, "the flood's links to be let go")
    assert _relayed_search(flood, "link") == "OK"


def test_relay_streams_that_never_send_their_envelope_hold_only_their_forces_share(snet: NetworkThread) -> None:
    host = snet.network.gateways[TV]
    share = MAX_CALLS // 2
    flood = RawPeer(snet, HANTS, TV)
    release = threading.Event()
    since = time.time()

    def silent() -> Iterator[bytes]:
        release.wait(30)
        return
        yield b""  # a generator that sends nothing until released

    held = [flood.channel.stream_stream(STREAM)(silent(), timeout=30) for _ in range(share)]
    try:
        wait_for(lambda: host._rpc_shares.held(HANTS) == share, "the silent streams to be held")
        # A further Relay/Stream from Hampshire is refused at once; Surrey's calls still get through.
        status = RawPeer(snet, HANTS, TV).stream(envelope_frame(flood.sign(flood.envelope(STREAM_MATCHES)))).status
        assert status == "RESOURCE_EXHAUSTED"
        surrey = RawPeer(snet, SURREY, TV)
        env = surrey.envelope(STREAM_MATCHES, message=SEARCH_MSG)
        outcome = surrey.stream(envelope_frame(surrey.sign(env)), message_frame(0, SEARCH_MSG))
        assert outcome.code is grpc.StatusCode.OK and outcome.sealed == "OK", outcome
        assert _relayed_search(surrey, "rpc") == "OK"
    finally:
        release.set()
        for call in held:
            call.cancel()
    refused = records_since(snet, TV, since, status="RESOURCE_EXHAUSTED")
    assert [r.refusal_reason for r in refused] == [
        f"force {HANTS} holds {share} relay channels and streams already, its share"
    ]


def test_a_relay_stream_that_sends_no_envelope_is_ended_and_recorded(
    snet: NetworkThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "FIRST_FRAME_SECONDS", 0.5)
    peer = RawPeer(snet, HANTS, TV)
    since = time.time()
    release = threading.Event()

    def silent() -> Iterator[bytes]:
        release.wait(10)
        return
        yield b""

    started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(peer.channel.stream_stream(STREAM)(silent(), timeout=10))
    finally:
        release.set()
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert time.monotonic() - started < 5
    [record] = records_since(snet, TV, since, status="DEADLINE_EXCEEDED")
    assert "sent no envelope within 0.5 s" in record.refusal_reason


#: a server stream of the benchmark's echo backend: it answers with as many bytes as the request asks for
ECHO_STREAM = "/psn.bench.v1.Echo1/ServerStream"


def test_a_peer_that_grants_no_credit_has_its_stream_ended_at_the_deadline_and_recorded(snet: NetworkThread) -> None:
    # A relay link's origin that takes the first window of an answer and grants no more credit must not hold
    # the host's call past its deadline: the stream ends DEADLINE_EXCEEDED and is recorded as closed.
    host = snet.layout.directory().route(ECHO_STREAM).host
    origin = next(f for f in (TV, HANTS, SURREY) if f != host)
    peer = RawPeer(snet, origin, host)
    since = time.time()
    wanted = b"4194304"  # 4 MiB back: four windows
    env = peer.envelope(ECHO_STREAM, message=wanted, deadline=2.0)
    with peer.open_link() as link:
        link.send(relay_pb2.MuxStream(id=1, frame=envelope_frame(peer.sign(env)).SerializeToString()))
        link.send(relay_pb2.MuxStream(id=1, frame=message_frame(0, wanted).SerializeToString()))
        started = time.monotonic()
        ended = link.read_until(lambda: link.over(1), timeout=15, credit=False)
        took = time.monotonic() - started
        assert ended is None and took < 8, (ended, took)  # the host ended the stream, near its deadline
        refusals = [i.refusal for i in link.items(1) if i.HasField("refusal")]
        sealed = link.outcome(1).sealed
        assert sealed == "DEADLINE_EXCEEDED" or [r.code for r in refusals] == [
            grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        ], (sealed, refusals)
    wait_for(
        lambda: any(r.event == "stream-close" for r in records_since(snet, host, since, request_id=env.request_id)),
        "the host's record of the stream's end",
    )
    closed = [r for r in records_since(snet, host, since, request_id=env.request_id) if r.event == "stream-close"]
    assert [r.status for r in closed] == ["DEADLINE_EXCEEDED"], closed
