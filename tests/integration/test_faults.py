"""Faults: what the caller sees and what the logs hold when parts of the network fail, and that it recovers.

A network of its own whose gateways give up on a peer after 3 transport
failures (circuit breaker, 1 s cooldown), wait at most 0.5 s for the audit
log's write lock, and reload files every 0.25 s.

- a backend that is down, slow (past the deadline), or dies in the middle of a stream;
- a peer gateway killed in the middle of a call and restarted: fail fast while it is away, the
  breaker opens, probes, and closes again without anyone else restarting;
- a host gateway that answers with something its seal does not vouch for;
- the audit store unwritable (another process holds SQLite's write lock), then writable again;
- a policy file corrupted in the middle of an edit;
- a stale CRL, and a clock skewed beyond the envelope window.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from gateway import pki
from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.breaker import BreakerState
from gateway.envelope import MAX_STATUS_MESSAGE, MessageDigest, ResponseSeal, Signer, seal_response
from gateway.relaylink import LinkConnection, RelayLinkListener, server_context
from gateway.server import Gateway
from gateway.tls import KeyPair
from tests.integration._hostile_common import (
    append_config,
    case_files,
    custody,
    outcome,
    records,
    search,
    still_serving,
    wait_for,
    write_in_place,
)
from tests.integration._hostile_servers import sleep_forever, start_stand_in
from tests.integration._hostile_tokens import good_token
from tests.netharness import PURPOSE, NetworkThread

pytestmark = pytest.mark.integration

TV, HANTS, SURREY = "thames-valley", "hampshire", "surrey"
FORCES = (TV, HANTS, SURREY)
COOLDOWN = 1.0
#: Every gateway caps every call's deadline at this. (All alike: a host refuses an envelope whose deadline
#: is further from its issue time than its own cap, so forces must agree on it.)
MAX_DEADLINE = 3.0
FAILURES = 3
LOCK_TIMEOUT = 0.5

_CONFIG = f"""
[limits]
max_deadline_seconds = {MAX_DEADLINE}
default_deadline_seconds = {MAX_DEADLINE}
peer_failures = {FAILURES}
peer_cooldown_seconds = {COOLDOWN}

[revocation]
reload_interval_seconds = 0.25
crl_grace_seconds = 30

[rate_limits]
force_rate = 10000.0
force_burst = 10000
unit_rate = 10000.0
unit_burst = 10000
"""


@pytest.fixture(scope="module", params=["links", "grpc"])
def fnet(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[NetworkThread]:
    # Every fault twice: gateways relaying over relay links (the default), and over gRPC only.
    net = NetworkThread(tmp_path_factory.mktemp("faults-net"), relay_links=request.param == "links")
    append_config(net, _CONFIG, audit=f"lock_timeout_seconds = {LOCK_TIMEOUT}")
    net.start()
    yield net
    net.stop()


def _officer() -> str:
    return f"DC-{hashlib.sha256(str(time.monotonic_ns()).encode()).hexdigest()[:10]}"


def _timed(fn: Any) -> tuple[tuple[str, str], float]:
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def _restart_app(net: NetworkThread, force: str, app: str) -> None:
    net.run(net.network.start_app(force, app))


def still_serving_ok(net: NetworkThread, force: str) -> bool:
    """Whether `force` serves good local and relayed calls now."""
    try:
        still_serving(net, force)
    except AssertionError:
        return False
    return True


def back_to_service(net: NetworkThread, force: str, *, timeout: float = 20) -> float:
    """Wait until `force` serves again (grpc reconnects to a restarted server after its backoff); the time it took."""
    return wait_for(lambda: still_serving_ok(net, force), f"{force} to serve again", timeout=timeout, every=0.2)


# -- backends ------------------------------------------------------------------------------------


def test_a_backend_that_is_down_fails_fast_and_both_logs_say_why(fnet: NetworkThread) -> None:
    fnet.run(fnet.network.apps["intel-search"].stop(0))
    officer = _officer()
    try:
        for force in (TV, SURREY):  # the host's own application, and relayed from another force
            with fnet.officer_channel(force, officer=officer) as ch:
                (status, details), took = _timed(lambda ch=ch: search(ch, timeout=20))  # type: ignore[misc]
            assert (status, details) == ("UNAVAILABLE", "unavailable") and took < 5, (status, details, took)
    finally:
        _restart_app(fnet, TV, "intel-search")
    host = records(fnet, TV, officer=officer)
    assert [(r.peer.rsplit("/", 1)[-1], r.status) for r in host] == [
        ("analyst-desk", "UNAVAILABLE"),
        ("gateway", "UNAVAILABLE"),
    ]
    assert all(r.refusal_stage == "forward" and "backend intel-search: UNAVAILABLE" in r.refusal_reason for r in host)
    [origin] = records(fnet, SURREY, officer=officer)
    # The host sealed its refusal: Surrey's gateway passes the status on; its breaker toward TV stays closed.
    assert origin.status == "UNAVAILABLE" and origin.seal_signature
    assert fnet.network.gateways[SURREY].relay.breaker(TV).state is BreakerState.CLOSED
    back_to_service(fnet, TV)


@contextlib.contextmanager
def _stand_in_app(fnet: NetworkThread, force: str, name: str, *, unary: Any, stream: Any) -> Iterator[None]:
    """`force`'s application `name` replaced by a stand-in that answers with `unary` and `stream`."""
    layout = fnet.layout
    app = layout.material[force].app_servers[name]
    fnet.run(fnet.network.apps[name].stop(0))
    stand_in = fnet.run(
        start_stand_in(
            f"127.0.0.1:{layout.ports[force].apps[name]}",
            cert=app.cert_path,
            key=app.key_path,
            client_ca=layout.material[force].ca.read_bytes(),
            unary=unary,
            stream=stream,
        )
    )
    try:
        yield
    finally:
        fnet.run(stand_in.stop(0))
        _restart_app(fnet, force, name)


def _slow_app(fnet: NetworkThread, force: str, name: str) -> contextlib.AbstractContextManager[None]:
    """`force`'s application `name` replaced by a stand-in that never answers."""
    return _stand_in_app(fnet, force, name, unary=sleep_forever, stream=sleep_forever)


@pytest.fixture
def slow_backend(fnet: NetworkThread) -> Iterator[None]:
    """Surrey's case-files backend replaced by one that never answers."""
    with _slow_app(fnet, SURREY, "case-files"):
        yield
    back_to_service(fnet, SURREY)


def test_a_slow_backend_ends_at_the_gateways_deadline_and_is_recorded(fnet: NetworkThread, slow_backend: None) -> None:
    # The caller allows 10 s; the gateways cap every call at MAX_DEADLINE.
    officer = _officer()
    for force in (SURREY, HANTS):
        with fnet.officer_channel(force, officer=officer) as ch:
            (status, details), took = _timed(lambda ch=ch: case_files(ch, timeout=10))  # type: ignore[misc]
        assert (status, details) == ("DEADLINE_EXCEEDED", "deadline exceeded"), (force, status, details)
        assert MAX_DEADLINE - 0.5 < took < MAX_DEADLINE + 2, (force, took)
    # Its own application's call ends at its own deadline. The relayed one ends at the same instant at both
    # gateways: the host sees its deadline or the origin's cancellation first. Either way nothing was disclosed.
    # The host's record of it may land just after the origin has answered its caller (a cancellation travels).
    wait_for(
        lambda: len([r for r in records(fnet, SURREY, officer=officer) if r.status]) == 2,
        "the host's record of the relayed call",
        timeout=10,
    )
    host = [r for r in records(fnet, SURREY, officer=officer) if r.status]
    assert host[0].status == "DEADLINE_EXCEEDED" and host[1].status in ("DEADLINE_EXCEEDED", "CANCELLED"), host
    assert all(r.response_messages == 0 for r in records(fnet, SURREY, officer=officer))
    assert "backend case-files: DEADLINE_EXCEEDED" in host[0].refusal_reason
    origin = records(fnet, HANTS, officer=officer)
    assert [r.status for r in origin] == ["", "DEADLINE_EXCEEDED"] and origin[0].event == "stream-open", origin
    assert origin[1].response_messages == 0


def test_each_audit_writer_is_told_the_unary_calls_in_flight_not_the_streams(fnet: NetworkThread) -> None:
    """What `[audit] commit_siblings` counts: a unary call brings its record within moments, so a busy
    gateway holds a group commit open for it; a stream held open brings none until it ends, and must
    not make a quiet gateway's commits wait."""
    gateways = fnet.network.gateways

    def unary_in_flight(force: str) -> int:
        told = gateways[force].audit_log.busy
        assert told is not None, f"{force}'s audit writer is not told the calls in flight"
        return told()

    assert [unary_in_flight(f) for f in FORCES] == [0, 0, 0]
    with (
        _slow_app(fnet, SURREY, "case-files"),
        _slow_app(fnet, HANTS, "custody-records"),
        ThreadPoolExecutor(2) as pool,
        fnet.officer_channel(TV) as ch,
    ):
        stream = pool.submit(case_files, ch, timeout=MAX_DEADLINE)  # relayed to Surrey, held by its backend
        wait_for(lambda: gateways[SURREY]._calls_now == 1, "the stream at Surrey's gateway", timeout=10)
        assert unary_in_flight(TV) == unary_in_flight(SURREY) == 0
        unary = pool.submit(custody, ch, timeout=MAX_DEADLINE)  # relayed to Hampshire, held by its backend
        wait_for(lambda: unary_in_flight(HANTS) == unary_in_flight(TV) == 1, "the unary call at both", timeout=10)
        assert unary_in_flight(SURREY) == 0
        assert stream.result(10)[0] == unary.result(10)[0] == "DEADLINE_EXCEEDED"
    wait_for(lambda: [unary_in_flight(f) for f in FORCES] == [0, 0, 0], "no calls in flight", timeout=10)
    back_to_service(fnet, SURREY)
    back_to_service(fnet, HANTS)


def test_a_stream_refused_after_it_opened_is_recorded_as_closed(fnet: NetworkThread, slow_backend: None) -> None:
    officer = _officer()
    with fnet.officer_channel(SURREY, officer=officer) as ch:
        assert case_files(ch, timeout=10)[0] == "DEADLINE_EXCEEDED"
    events = [(r.event, r.status) for r in records(fnet, SURREY, officer=officer)]
    assert events == [("stream-open", ""), ("stream-close", "DEADLINE_EXCEEDED")], events


def test_a_backend_that_dies_mid_stream_ends_the_call_unavailable(fnet: NetworkThread) -> None:
    officer = _officer()
    for force in (SURREY, HANTS):  # the host's own application, and relayed
        acks: list[int] = []
        stop = threading.Event()

        def comments(stop: threading.Event = stop) -> Iterator[casefiles_pb2.ReviewComment]:
            yield casefiles_pb2.ReviewComment(case_reference="C1", paragraph="1", comment="ok")
            stop.wait(15)
            yield casefiles_pb2.ReviewComment(case_reference="C1", paragraph="2", comment="ok")

        with fnet.officer_channel(force, officer=officer) as ch:
            call = casefiles_pb2_grpc.CaseFilesStub(ch).Review(comments(), timeout=20)
            acks.append(next(call).sequence)
            fnet.run(fnet.network.apps["case-files"].stop(0))  # the backend dies with the stream open
            try:
                status, details = outcome(lambda call=call: list(call))  # type: ignore[misc]
            finally:
                stop.set()
                _restart_app(fnet, SURREY, "case-files")
        assert acks == [1]
        assert (status, details) == ("UNAVAILABLE", "unavailable"), (status, details)
    # One message was disclosed (and recorded) before the backend died. (The local stream's end is
    # recorded as event "call": see test_a_stream_refused_after_it_opened_is_recorded_as_closed.)
    host = [(r.event == "stream-open", r.status, r.response_messages) for r in records(fnet, SURREY, officer=officer)]
    assert host == [(True, "", 0), (False, "UNAVAILABLE", 1)] * 2, host
    assert all("backend case-files" in r.refusal_reason for r in records(fnet, SURREY, officer=officer) if r.status)
    origin = [(r.event, r.status) for r in records(fnet, HANTS, officer=officer)]
    assert origin == [("stream-open", ""), ("stream-close", "UNAVAILABLE")], origin
    back_to_service(fnet, SURREY)


# -- answers a response seal cannot carry ---------------------------------------------------------

#: More metadata entries than a seal carries (64): a backend may send them, the relay cannot.
_TOO_MANY = tuple((f"x-note-{i}", "v") for i in range(70))


def _relayed_search(fnet: NetworkThread, officer: str) -> tuple[str, str]:
    with fnet.officer_channel(SURREY, officer=officer) as ch:
        stub = intel_pb2_grpc.IntelligenceSearchStub(ch)
        return outcome(lambda: stub.Search(intel_pb2.SearchRequest(subject="alpha"), timeout=10))


def test_a_backend_status_message_longer_than_a_seal_carries_is_cut_and_both_gateways_record_it(
    fnet: NetworkThread,
) -> None:
    # An application error whose text echoes the caller's input can be any length; a seal carries 4,096
    # characters. The host must still seal, record and answer: not drop the call with no record.
    long_text = "no match for " + "x" * 6000

    async def not_found(method: str, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.NOT_FOUND, long_text)

    officer = _officer()
    with _stand_in_app(fnet, TV, "intel-search", unary=not_found, stream=sleep_forever):
        (status, details), took = _timed(lambda: _relayed_search(fnet, officer))
    assert status == "NOT_FOUND" and details == long_text[:MAX_STATUS_MESSAGE], (status, details[:40], len(details))
    assert took < 5, took
    [host] = records(fnet, TV, officer=officer)
    [origin] = records(fnet, SURREY, officer=officer)
    assert (host.status, origin.status) == ("NOT_FOUND", "NOT_FOUND")
    assert origin.seal_signature == host.seal_signature != b""
    assert fnet.network.gateways[SURREY].relay.breaker(TV).state is BreakerState.CLOSED
    back_to_service(fnet, TV)


def test_a_backend_answer_with_metadata_a_seal_cannot_carry_is_a_recorded_refusal(fnet: NetworkThread) -> None:
    # Trailers over the relay's limits: the host refuses the call (UNAVAILABLE, sealed and recorded with
    # the reason) instead of failing to seal it, and the origin passes the refusal on.
    async def many_trailers(method: str, request: Any, context: Any) -> Any:
        context.set_trailing_metadata(_TOO_MANY)
        return intel_pb2.SearchResponse().SerializeToString()

    officer = _officer()
    with _stand_in_app(fnet, TV, "intel-search", unary=many_trailers, stream=sleep_forever):
        (status, details), took = _timed(lambda: _relayed_search(fnet, officer))
    assert (status, details) == ("UNAVAILABLE", "unavailable") and took < 5, (status, details, took)
    [host] = records(fnet, TV, officer=officer)
    assert host.status == "UNAVAILABLE" and host.response_messages == 0, host
    assert "cannot be relayed" in host.refusal_reason and "more than 64 entries" in host.refusal_reason
    [origin] = records(fnet, SURREY, officer=officer)
    assert origin.status == "UNAVAILABLE" and origin.seal_signature == host.seal_signature != b""
    assert fnet.network.gateways[SURREY].relay.breaker(TV).state is BreakerState.CLOSED
    back_to_service(fnet, TV)


def test_a_backend_stream_with_headers_a_seal_cannot_carry_is_refused_before_anything_leaves(
    fnet: NetworkThread,
) -> None:
    async def many_headers(method: str, requests: Any, context: Any) -> Any:
        async for _ in requests:
            break
        await context.send_initial_metadata(_TOO_MANY)
        return [casefiles_pb2.DocumentChunk(offset=0, data=b"case file", last=True).SerializeToString()]

    officer = _officer()
    with (
        _stand_in_app(fnet, SURREY, "case-files", unary=sleep_forever, stream=many_headers),
        fnet.officer_channel(HANTS, officer=officer) as ch,
    ):
        (status, details), took = _timed(lambda: case_files(ch))
    assert (status, details) == ("UNAVAILABLE", "unavailable") and took < 5, (status, details, took)
    opened, closed = records(fnet, SURREY, officer=officer)
    assert (opened.event, closed.event, closed.status) == ("stream-open", "stream-close", "UNAVAILABLE")
    assert "cannot be relayed" in closed.refusal_reason and closed.response_messages == 0
    assert records(fnet, HANTS, officer=officer)[-1].response_messages == 0
    back_to_service(fnet, SURREY)


# -- a peer gateway killed and restarted -----------------------------------------------------------


def _open_value(gateway: Gateway, force: str) -> float | None:
    for line in gateway.registry.expose().decode().splitlines():
        if line.startswith(f'psngw_peer_circuit_open{{force="{force}"}} '):
            return float(line.split()[-1])
    return None


def test_a_peer_killed_mid_call_fails_fast_opens_the_breaker_and_recovers_without_restarts(
    fnet: NetworkThread,
) -> None:
    others = {f: fnet.network.gateways[f] for f in (TV, HANTS)}
    hants = others[HANTS]
    breaker = hants.relay.breaker(SURREY)
    assert breaker.state is BreakerState.CLOSED and _open_value(hants, SURREY) == 0.0
    officer = _officer()
    stop = threading.Event()

    def comments() -> Iterator[casefiles_pb2.ReviewComment]:
        yield casefiles_pb2.ReviewComment(case_reference="C1", paragraph="1", comment="ok")
        stop.wait(15)

    # 1. Killed in the middle of a relayed bidi stream.
    with fnet.officer_channel(HANTS, officer=officer) as ch:
        call = casefiles_pb2_grpc.CaseFilesStub(ch).Review(comments(), timeout=20)
        assert next(call).sequence == 1
        fnet.run(fnet.network.gateways[SURREY].stop(grace=0))
        (status, _), took = _timed(lambda: outcome(lambda: list(call)))
        stop.set()
    assert status == "UNAVAILABLE" and took < 5, (status, took)

    # 2. While it is away: UNAVAILABLE at once; after FAILURES transport failures the breaker opens.
    try:
        seen = []
        with fnet.officer_channel(HANTS, officer=officer) as ch:
            for _ in range(FAILURES + 3):
                (status, details), took = _timed(lambda ch=ch: case_files(ch, timeout=10))  # type: ignore[misc]
                seen.append((status, details, took < 2))
        assert seen == [("UNAVAILABLE", "unavailable", True)] * (FAILURES + 3), seen
        assert breaker.state is BreakerState.OPEN and _open_value(hants, SURREY) == 1.0
        reasons = [r.refusal_reason for r in records(fnet, HANTS, officer=officer) if r.status == "UNAVAILABLE"]
        assert any("relay to surrey: UNAVAILABLE" in r for r in reasons), reasons
        assert any("circuit to surrey is open" in r for r in reasons), reasons
        # Other peers are not affected.
        with fnet.officer_channel(HANTS) as ch:
            assert search(ch) == ("OK", "")
    finally:
        # 3. It comes back on the same address; nobody else restarts.
        fnet.run(fnet.network.start_gateway(SURREY))

    def recovered() -> bool:
        with fnet.officer_channel(HANTS) as ch:
            return case_files(ch, timeout=5) == ("OK", "")

    took = wait_for(recovered, "relayed calls to surrey to succeed again", timeout=20, every=0.3)
    assert breaker.state is BreakerState.CLOSED and _open_value(hants, SURREY) == 0.0
    assert all(fnet.network.gateways[f] is gw for f, gw in others.items()), "nobody else was restarted"
    print(f"recovered {took:.1f} s after the restart")


# -- a host gateway that lies ----------------------------------------------------------------------


def _lying_host(fnet: NetworkThread, answer: Any) -> Any:
    layout = fnet.layout
    tls = layout.material[SURREY].gateway_tls
    roots = b"".join(layout.material[f].ca.read_bytes() for f in layout.material)
    return fnet.run(
        start_stand_in(
            f"127.0.0.1:{layout.ports[SURREY].peer}",
            cert=tls.cert_path,
            key=tls.key_path,
            client_ca=roots,
            unary=answer,
            stream=answer,
        )
    )


def _lying_link_host(fnet: NetworkThread, current: dict[str, list[Any]]) -> RelayLinkListener | None:
    """On Surrey's relay port (if the network has one): a stand-in answering each stream with `current["frames"]`."""
    layout = fnet.layout
    if not layout.ports[SURREY].relay:
        return None
    tls = layout.material[SURREY].gateway_tls
    roots = b"".join(layout.material[f].ca.read_bytes() for f in layout.material)
    context = server_context(KeyPair.load(tls.cert_path, tls.key_path), roots)

    async def serve(_certificate: bytes, connection: LinkConnection) -> None:
        await connection.send(relay_pb2.MuxBatch(max_frame=8 << 20))  # what it takes: a relay link's first message
        seen: set[int] = set()
        while (raw := await connection.read()) is not None:
            for item in relay_pb2.MuxBatch.FromString(raw).streams:
                if not item.frame or item.id in seen:
                    continue
                seen.add(item.id)
                frames = current["frames"]
                if frames in ([b"INTERNAL"], [b"UNKNOWN"]):
                    code = grpc.StatusCode[frames[0].decode()].value[0]
                    refusal = relay_pb2.MuxRefusal(code=code, message="Traceback: /srv/psn/gateway.py line 12")
                    items = [relay_pb2.MuxStream(id=item.id, refusal=refusal)]
                else:
                    items = [relay_pb2.MuxStream(id=item.id, frame=f) for f in frames if isinstance(f, bytes)]
                    if isinstance(frames[-1], grpc.StatusCode):  # then refused, unsealed
                        refusal = relay_pb2.MuxRefusal(code=frames[-1].value[0], message="refused, after the messages")
                        items.append(relay_pb2.MuxStream(id=item.id, refusal=refusal))
                    else:
                        items.append(relay_pb2.MuxStream(id=item.id, end=True))
                await connection.send(relay_pb2.MuxBatch(streams=items))

    listener = RelayLinkListener(
        f"127.0.0.1:{layout.ports[SURREY].relay}",
        context=lambda: context,
        handle=serve,
        reuse_port=False,
        max_frame=8 << 20,
    )
    fnet.run(listener.start())
    return listener


def test_a_host_whose_answer_its_seal_does_not_vouch_for_is_not_believed(fnet: NetworkThread) -> None:
    # Surrey's gateway is replaced by one that holds Surrey's real TLS and signing keys but answers
    # unsealed, garbage, or with a seal of another call. Hampshire's gateway must believe none of it.
    material = fnet.layout.material[SURREY]
    signer = Signer.from_files(material.gateway_signing.cert_path, material.gateway_signing.key_path)
    gid = fnet.layout.directory().forces[SURREY].gateway_spiffe_id

    def foreign_seal(data: bytes) -> relay_pb2.Signed:
        digest = MessageDigest.of(data)
        seal = ResponseSeal("0" * 32, b"\x01" * 32, SURREY, gid, 0, "", (), (), digest.digest, 1, time.time(), "", "")
        return seal_response(seal, signer)

    doc = casefiles_pb2.DocumentChunk(offset=0, data=b"forged", last=True).SerializeToString()
    answers: dict[str, list[Any]] = {
        "no seal": [relay_pb2.RelayFrame(message=relay_pb2.StreamMessage(seq=0, data=doc)).SerializeToString()],
        "garbage": [b"\xff\xff\xff"],
        "a seal of another call": [
            relay_pb2.RelayFrame(message=relay_pb2.StreamMessage(seq=0, data=doc)).SerializeToString(),
            relay_pb2.RelayFrame(response_seal=foreign_seal(doc)).SerializeToString(),
        ],
    }
    # Unsealed statuses a host gateway never sends on purpose: grpc's own, with internals in their text.
    answers["an unsealed INTERNAL"] = [b"INTERNAL"]
    answers["an unsealed UNKNOWN"] = [b"UNKNOWN"]
    # A host refuses unsealed only before its envelope verified: never after messages.
    answers["messages, then an unsealed refusal"] = [answers["no seal"][0], grpc.StatusCode.PERMISSION_DENIED]
    current: dict[str, list[Any]] = {}

    async def answer(method: str, requests: Any, context: Any) -> Any:
        async for _ in requests:
            break
        frames = current["frames"]
        if frames in ([b"INTERNAL"], [b"UNKNOWN"]):
            await context.abort(grpc.StatusCode[frames[0].decode()], "Traceback: /srv/psn/gateway.py line 12")
        return frames

    fnet.run(fnet.network.gateways[SURREY].stop(grace=0))
    liar = _lying_host(fnet, answer)
    link_liar = _lying_link_host(fnet, current)
    try:
        for name, frames in answers.items():
            current["frames"] = frames
            last: list[Any] = []

            def believed_not(name: str = name, last: list[Any] = last) -> bool:
                # Until Hampshire's channel has reconnected to the stand-in, calls fail to connect: retry.
                officer = _officer()
                with fnet.officer_channel(HANTS, officer=officer) as ch:
                    got = case_files(ch)
                [*_, closed] = records(fnet, HANTS, officer=officer)
                last[:] = [got, closed]
                return "failed verification" in closed.refusal_reason or "Traceback" in closed.refusal_reason

            wait_for(believed_not, f"the {name} answer to reach hampshire", timeout=15, every=0.2)
            (status, details), closed = last
            assert (status, details) == ("UNAVAILABLE", "unavailable"), (name, status, details)
            assert closed.status == "UNAVAILABLE" and closed.event != "stream-open", name
            # Stream messages go to the caller as they arrive (TLS pins the host); the seal, checked at the
            # end, fails the call: the forged chunk was delivered once, and counted once.
            sent = 1 if name in ("no seal", "a seal of another call", "messages, then an unsealed refusal") else 0
            assert closed.response_messages == sent, (name, closed.response_messages)
    finally:
        fnet.run(liar.stop(0))
        if link_liar is not None:
            fnet.run(link_liar.stop(0))
        fnet.run(fnet.network.start_gateway(SURREY))
    back_to_service(fnet, SURREY)


# -- the audit store ---------------------------------------------------------------------------------


def test_an_unwritable_audit_store_closes_the_gate_discloses_nothing_and_recovers(fnet: NetworkThread) -> None:
    import sqlite3

    db = fnet.layout.config(SURREY).audit.db
    surrey = fnet.network.gateways[SURREY]
    officer = _officer()
    holder = sqlite3.connect(db, isolation_level=None, timeout=10)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock past lock_timeout_seconds
    try:
        with fnet.officer_channel(SURREY, officer=officer) as ch:
            (status, _), took = _timed(lambda: case_files(ch))
        assert status == "UNAVAILABLE" and took < 5, (status, took)
        with fnet.officer_channel(HANTS, officer=officer) as ch:
            assert case_files(ch)[0] == "UNAVAILABLE"  # relayed: refused by the host, nothing disclosed
        assert surrey.health()["serving"] is False
        assert "database is locked" in (surrey.health()["audit"]["last_error"] or "")
    finally:
        holder.execute("COMMIT")
        holder.close()
    wait_for(lambda: surrey.health()["serving"] is True, "surrey's audit log to recover", timeout=15)
    # Nothing of those calls is in Surrey's log (it could not be written, so nothing was disclosed);
    # Hampshire's log holds its refusal.
    assert records(fnet, SURREY, officer=officer) == []
    origin = records(fnet, HANTS, officer=officer)
    assert [(r.status, r.response_messages) for r in origin] == [("", 0), ("UNAVAILABLE", 0)], origin
    back_to_service(fnet, SURREY)
    after = _officer()
    with fnet.officer_channel(SURREY, officer=after) as ch:
        assert case_files(ch) == ("OK", "")
    assert [(r.event, r.status) for r in records(fnet, SURREY, officer=after)] == [
        ("stream-open", ""),
        ("stream-close", "OK"),
    ]


def _search_with_headers(fnet: NetworkThread, force: str, officer: str) -> tuple[str, dict[str, Any]]:
    """IntelligenceSearch.Search from an application of `force`: its status, and the headers it received."""
    with fnet.officer_channel(force, officer=officer) as ch:
        stub = intel_pb2_grpc.IntelligenceSearchStub(ch)
        try:
            _, call = stub.Search.with_call(intel_pb2.SearchRequest(subject="alpha"), timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name, dict(exc.initial_metadata() or ())  # type: ignore[attr-defined]
        return "OK", dict(call.initial_metadata() or ())


@contextlib.contextmanager
def _audit_locked(fnet: NetworkThread, force: str) -> Iterator[None]:
    """Another process holds `force`'s audit write lock (past lock_timeout_seconds); the log recovers after."""
    import sqlite3

    holder = sqlite3.connect(fnet.layout.config(force).audit.db, isolation_level=None, timeout=10)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("COMMIT")
        holder.close()
    gateway = fnet.network.gateways[force]
    wait_for(lambda: gateway.health()["serving"] is True, f"{force}'s audit log to recover", timeout=15)


def test_a_unary_answer_s_headers_leave_only_after_its_record(fnet: NetworkThread) -> None:
    # Response headers are part of the answer (an application may put personal data there). With the
    # log unwritable they must not reach the caller: at the host's own edge, and at an origin whose
    # own record fails after the host answered.
    async def with_headers(method: str, request: Any, context: Any) -> Any:
        await context.send_initial_metadata((("x-detainee-name", "J Example"),))
        return intel_pb2.SearchResponse().SerializeToString()

    with _stand_in_app(fnet, TV, "intel-search", unary=with_headers, stream=sleep_forever):
        for force in (TV, SURREY):  # the host's own application; relayed from another force
            status, headers = _search_with_headers(fnet, force, _officer())
            assert status == "OK" and headers.get("x-detainee-name") == "J Example", (force, status, headers)
            officer = _officer()
            with _audit_locked(fnet, force):
                status, headers = _search_with_headers(fnet, force, officer)
            assert status == "UNAVAILABLE" and "x-detainee-name" not in headers, (force, status, headers)
            assert records(fnet, force, officer=officer) == []
    back_to_service(fnet, TV)


# -- policy ---------------------------------------------------------------------------------------


def test_a_policy_file_corrupted_mid_edit_keeps_the_last_good_policy(fnet: NetworkThread) -> None:
    path = fnet.layout.root / "policies" / "rules" / "intel-search.csv"
    original = path.read_bytes()
    gateway = fnet.network.gateways[TV]
    good = gateway.policy.current.version
    officer = _officer()
    try:
        # The editor crashed half way through writing: half the file, then bytes that are not UTF-8.
        write_in_place(path, original[: len(original) // 2] + b"\xc3\x28\x00\xff garbage")
        wait_for(lambda: gateway.policy.last_error is not None, "the corrupted edit to be rejected", timeout=10)
        assert gateway.policy.current.version == good
        assert gateway.health()["policy"]["last_error"] and "intel-search.csv" in gateway.policy.last_error
        with fnet.officer_channel(TV, officer=officer) as ch:
            assert search(ch) == ("OK", "")  # decided by the last good policy
        with fnet.officer_channel(TV, officer=officer, units=("tvp-custody",), roles=("custody-officer",)) as ch:
            assert search(ch)[0] == "PERMISSION_DENIED"  # and its denials still hold
    finally:
        path.write_bytes(original)
    wait_for(lambda: gateway.policy.last_error is None, "a clean reload", timeout=10)
    decided = [r for r in records(fnet, TV, officer=officer) if r.decision_allowed is not None]
    assert len(decided) == 2 and {r.policy_version for r in decided} == {good}
    assert gateway.policy.current.version == good


# -- revocation data and clocks --------------------------------------------------------------------------


def test_a_stale_crl_refuses_that_force_only_and_a_fresh_one_restores_it(fnet: NetworkThread) -> None:
    material = fnet.layout.material[HANTS]
    gateways = fnet.network.gateways
    officer = _officer()
    now = datetime.now(UTC)
    pki.publish_crl(material.ca_dir, next_update_days=1, now=now - timedelta(days=1, seconds=90))  # past the 30 s grace
    try:
        for gw in gateways.values():
            wait_for(lambda gw=gw: not gw.health()["crl"][HANTS]["usable"], f"{gw.force} to see the stale CRL")  # type: ignore[misc]
        with fnet.officer_channel(HANTS, officer=officer) as ch:
            assert custody(ch) == ("UNAVAILABLE", "unavailable")  # its own applications, at its own gateway
        with fnet.officer_channel(TV, officer=officer) as ch:
            assert custody(ch)[0] == "UNAVAILABLE"  # its gateway's seal cannot be believed
        with fnet.officer_channel(SURREY, officer=officer) as ch:
            assert search(ch) == ("OK", "")  # the other forces carry on
    finally:
        pki.publish_crl(material.ca_dir, next_update_days=7)
    for gw in gateways.values():
        wait_for(lambda gw=gw: gw.health()["crl"][HANTS]["usable"], f"{gw.force} to load the fresh CRL")  # type: ignore[misc]
    [local] = [r for r in records(fnet, HANTS) if r.status == "UNAVAILABLE" and r.refusal_stage == "peer-identity"][-1:]
    assert "revocation data of force hampshire unusable (CRL is stale" in local.refusal_reason
    [relayed] = [r for r in records(fnet, TV, officer=officer) if r.origin_force == TV]
    # Thames Valley cannot check the signer of Hampshire's response seal against a usable CRL: refused.
    assert relayed.status == "UNAVAILABLE" and "revocation data of force hampshire unusable" in relayed.refusal_reason
    back_to_service(fnet, HANTS)


class _SkewedClock:
    """The system clock, `offset` seconds off (wall clock only; durations stay true)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


def test_a_clock_skewed_beyond_the_envelope_window_is_refused_both_ways(fnet: NetworkThread) -> None:
    # Ahead, not behind: a clock behind the CRLs' thisUpdate already fails everything closed.
    skew = 200.0  # the envelope window is 30 s by default
    net = fnet
    net.run(net.network.gateways[TV].stop(grace=0))
    net.run(net.network.start_gateway(TV, clock=_SkewedClock(skew)))
    officer = _officer()
    try:
        token = good_token(net, TV, officer, now=time.time() + skew)  # its own identity provider agrees with it
        from gateway import client

        endpoint = client.from_manifest(net.manifest(), TV)
        with endpoint.secure_channel(token=lambda: token, purpose=PURPOSE) as ch:
            assert search(ch) == ("OK", "")  # its own application: no envelope involved
            status, _ = custody(ch)  # relayed out: the host sees an envelope 200 s ahead
        assert status == "UNAUTHENTICATED", status
        with net.officer_channel(SURREY, officer=officer) as ch:
            assert search(ch)[0] == "UNAUTHENTICATED"  # relayed in: it sees an envelope 200 s old
    finally:
        net.run(net.network.gateways[TV].stop(grace=0))
        net.run(net.network.start_gateway(TV))
    [host] = [r for r in records(net, HANTS) if r.refusal_stage == "envelope" and "in the future" in r.refusal_reason][
        -1:
    ]
    assert "outside the 30 s window" in host.refusal_reason
    [inbound] = [r for r in records(net, TV) if r.refusal_stage == "envelope" and "s old, outside" in r.refusal_reason][
        -1:
    ]
    assert "outside the 30 s window" in inbound.refusal_reason
    back_to_service(net, TV)
