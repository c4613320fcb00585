"""The streaming relay's frames and seals: the origin's `RelayUpstream`, the host's `RelayHostDownstream`."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.clock import FakeClock
from gateway.demo.network import write_network
from gateway.directory import NetworkDirectory
from gateway.envelope import EnvelopeVerifier, MessageDigest, ResponseSeal, Signer, seal_response
from gateway.errors import InvalidArgument, RequestRefused, Unavailable
from gateway.identity import PeerIdentity, Usage, load_trust_store
from gateway.metadata import to_relay_entries
from gateway.pipeline import Call, Listener
from gateway.principal import Principal, Purpose
from gateway.relay import RelayClient, RelayHostDownstream, RelayUpstream, _message_frame, parse_relay_request
from gateway.replay import InMemoryReplayStore

HA, SURREY = "hampshire", "surrey"
FETCH = "/psn.demo.casefiles.v1.CaseFiles/FetchDocument"  # a server stream hosted by Surrey
REVIEW = "/psn.demo.casefiles.v1.CaseFiles/Review"  # a bidi stream hosted by Surrey


# -- message frames ------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(seq=st.integers(0, 2**64 - 1), data=st.binary(max_size=70_000))
def test_a_message_frame_built_in_place_is_the_nested_frame(seq: int, data: bytes) -> None:
    frame = _message_frame(seq, data)
    nested = relay_pb2.RelayFrame(message=relay_pb2.StreamMessage(seq=seq, data=data))
    wire = frame.SerializeToString()
    assert frame == nested
    assert wire == nested.SerializeToString()
    parsed = parse_relay_request(wire, unary=False)
    assert parsed.WhichOneof("kind") == "message"
    assert (parsed.message.seq, parsed.message.data) == (seq, data)


# -- the host side --------------------------------------------------------------------------------


class _WriteContext:
    """A servicer context that keeps what the host writes."""

    def __init__(self) -> None:
        self.written: list[relay_pb2.RelayFrame] = []

    async def write(self, frame: relay_pb2.RelayFrame) -> None:
        self.written.append(frame)


def _host_downstream() -> tuple[RelayHostDownstream, _WriteContext, Call]:
    context = _WriteContext()
    call = Call(Listener.PEER, "/psn.gateway.v1.Relay/Stream", (), None, time.time(), 0.0)
    return RelayHostDownstream(context, call, verifier=None), context, call  # type: ignore[arg-type]  # fakes


def test_the_host_numbers_and_digests_every_response_message() -> None:
    downstream, context, call = _host_downstream()
    messages = [bytes([i]) * (1000 + i) for i in range(5)]

    async def send() -> None:
        for data in messages:
            await downstream.write(data)

    asyncio.run(send())
    assert [(f.message.seq, f.message.data) for f in context.written] == list(enumerate(messages))
    assert downstream.sent_digest.digest == MessageDigest.of(*messages).digest
    assert downstream.sent_digest.count == call.response_messages == 5


def test_the_host_sends_no_headers_frame_for_empty_headers() -> None:
    downstream, context, _ = _host_downstream()
    asyncio.run(downstream.send_initial_metadata(()))
    assert context.written == []
    assert downstream.headers == ()


def test_the_host_sends_non_empty_headers_as_a_frame_and_keeps_them_for_the_seal() -> None:
    downstream, context, _ = _host_downstream()
    asyncio.run(downstream.send_initial_metadata((("x-app", "1"),)))
    [frame] = context.written
    assert frame.WhichOneof("kind") == "headers"
    assert [(m.key, m.value) for m in frame.headers.metadata] == list(to_relay_entries((("x-app", "1"),)))
    assert downstream.headers == (("x-app", "1"),)


# -- the origin side ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _World:
    directory: NetworkDirectory
    origin_signer: Signer  # Hampshire's gateway
    host_signer: Signer  # Surrey's gateway
    host_gateway: str
    verifier: Callable[..., EnvelopeVerifier]
    origin_peer: PeerIdentity  # Hampshire's gateway as the TLS peer of Surrey's peer listener


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> _World:
    layout = write_network(Path(tmp_path_factory.mktemp("relay-net")))
    directory = layout.directory()
    trust = load_trust_store(directory)

    def signer(force: str) -> Signer:
        material = layout.material[force].gateway_signing
        return Signer.from_files(material.cert_path, material.key_path)

    def verifier(own_force: str = HA) -> EnvelopeVerifier:
        return EnvelopeVerifier(
            trust=lambda: trust,
            own_force=own_force,
            window=120.0,
            replay=InMemoryReplayStore(),
            clock=FakeClock(time.time()),
            max_deadline=300.0,
        )

    peer = trust.verify(layout.material[HA].gateway_tls.cert_path.read_bytes(), Usage.CLIENT, time.time())
    host_gateway = directory.forces[SURREY].gateway_spiffe_id
    return _World(directory, signer(HA), signer(SURREY), host_gateway, verifier, peer)


class _Rpc:
    """A relay stream call: keeps the frames written, answers reads from a script (frames, or a builder)."""

    def __init__(self) -> None:
        self.written: list[relay_pb2.RelayFrame] = []
        self.replies: list[Callable[[], relay_pb2.RelayFrame]] = []

    async def write(self, frame: relay_pb2.RelayFrame) -> None:
        self.written.append(frame)

    async def done_writing(self) -> None:
        return None

    async def read(self) -> Any:
        if not self.replies:
            return grpc.aio.EOF
        return self.replies.pop(0)().SerializeToString()

    def cancel(self) -> None:
        return None


class _Channel:
    def __init__(self, rpc: _Rpc) -> None:
        self._rpc = rpc

    def stream_stream(self, _method: str, **_kwargs: Any) -> Callable[..., _Rpc]:
        return lambda **_kw: self._rpc


class _Peers:
    def __init__(self, rpc: _Rpc) -> None:
        self._channel = _Channel(rpc)

    def channel(self, _host: str) -> _Channel:
        return self._channel


def _client(world: _World, rpc: _Rpc, clock: FakeClock | None = None) -> RelayClient:
    return RelayClient(
        force=HA,
        gateway_id=world.directory.forces[HA].gateway_spiffe_id,
        signer=lambda: world.origin_signer,
        verifier=world.verifier(),
        peers=_Peers(rpc),  # type: ignore[arg-type]  # a fake pool
        clock=clock or FakeClock(time.time()),
        breaker_failures=1,
        breaker_cooldown=5.0,
    )


def _call(world: _World, method: str) -> Call:
    call = Call(Listener.LOCAL, method, (), None, time.time(), 0.0)
    call.route = world.directory.route(method)
    call.principal = Principal("DC-1", HA, ("serocu",), ("investigator",), "SC")
    call.purpose = Purpose("investigation", "OP-1", "relay test")
    return call


def _upstream(world: _World, method: str = FETCH) -> tuple[RelayUpstream, _Rpc, Call]:
    rpc = _Rpc()
    call = _call(world, method)
    return RelayUpstream(_client(world, rpc), call), rpc, call


def _seal(world: _World, rpc: _Rpc, call: Call, messages: list[bytes], headers: Any) -> relay_pb2.RelayFrame:
    """The host's response seal over `messages` and `headers` (wire entries), for the envelope the origin sent."""
    envelope = next(f.envelope for f in rpc.written if f.WhichOneof("kind") == "envelope")
    digest = MessageDigest.of(*messages)
    seal = ResponseSeal(
        request_id=call.request_id,
        envelope_digest=hashlib.sha256(envelope.body).digest(),
        host_force=SURREY,
        host_gateway=world.host_gateway,
        status_code=0,
        status_message="",
        initial_metadata=headers,
        trailing_metadata=(),
        messages_digest=digest.digest,
        message_count=digest.count,
        issued_at=round(time.time(), 3),
        decision_id="",
        policy_version="",
    )
    return relay_pb2.RelayFrame(response_seal=seal_response(seal, world.host_signer))


def _drain(upstream: RelayUpstream) -> list[bytes]:
    async def run() -> list[bytes]:
        await upstream.write(b"doc-1")
        await upstream.done_writing()
        out = []
        while (data := await upstream.read()) is not None:
            out.append(data)
        return out

    return asyncio.run(run())


def test_a_stream_without_headers_frames_verifies_against_a_seal_over_empty_headers(world: _World) -> None:
    upstream, rpc, call = _upstream(world)
    messages = [b"a" * 70_000, b"b", b""]
    rpc.replies = [partial(_message_frame, i, m) for i, m in enumerate(messages)]
    rpc.replies.append(lambda: _seal(world, rpc, call, messages, ()))
    assert _drain(upstream) == messages
    assert call.response_digest == MessageDigest.of(*messages).digest
    assert asyncio.run(upstream.finish()).code is grpc.StatusCode.OK


def test_a_seal_over_headers_the_origin_never_received_is_refused(world: _World) -> None:
    # The host sent no Headers frame (so the caller got empty headers) but sealed some: not the response sealed.
    upstream, rpc, call = _upstream(world)
    rpc.replies = [lambda: _message_frame(0, b"m"), lambda: _seal(world, rpc, call, [b"m"], (("x-app", b"1"),))]
    with pytest.raises(Unavailable, match="headers differ from the sealed headers"):
        _drain(upstream)


def test_headers_that_arrived_must_be_the_sealed_ones(world: _World) -> None:
    upstream, rpc, call = _upstream(world)
    headers = relay_pb2.RelayFrame(
        headers=relay_pb2.Headers(metadata=[relay_pb2.MetadataEntry(key="x-app", value=b"1")])
    )
    rpc.replies = [lambda: headers, lambda: _message_frame(0, b"m"), lambda: _seal(world, rpc, call, [b"m"], ())]
    with pytest.raises(Unavailable, match="headers differ from the sealed headers"):
        _drain(upstream)


def test_sealed_headers_that_arrived_verify(world: _World) -> None:
    upstream, rpc, call = _upstream(world)
    headers = relay_pb2.RelayFrame(
        headers=relay_pb2.Headers(metadata=[relay_pb2.MetadataEntry(key="x-app", value=b"1")])
    )
    rpc.replies = [
        lambda: headers,
        lambda: _message_frame(0, b"m"),
        lambda: _seal(world, rpc, call, [b"m"], (("x-app", b"1"),)),
    ]
    assert _drain(upstream) == [b"m"]
    assert asyncio.run(upstream.initial_metadata()) == (("x-app", "1"),)


def _ended(code: grpc.StatusCode) -> Callable[[], relay_pb2.RelayFrame]:
    def end() -> relay_pb2.RelayFrame:
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="denied by the host")

    return end


def test_an_unsealed_refusal_after_messages_is_not_the_hosts_answer(world: _World) -> None:
    # A host refuses unsealed only before its envelope verified, so before any message: a refusal after
    # messages is not an answer to pass on with the messages already delivered.
    upstream, rpc, _ = _upstream(world)
    rpc.replies = [lambda: _message_frame(0, b"unsealed data"), _ended(grpc.StatusCode.PERMISSION_DENIED)]
    with pytest.raises(Unavailable, match="ended PERMISSION_DENIED without a response seal after 1 message"):
        _drain(upstream)


@pytest.mark.parametrize("code", [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_the_transport_may_still_end_a_stream_after_messages(world: _World, code: grpc.StatusCode) -> None:
    upstream, rpc, _ = _upstream(world)
    rpc.replies = [lambda: _message_frame(0, b"m"), _ended(code)]
    try:
        _drain(upstream)
    except RequestRefused as exc:  # DEADLINE_EXCEEDED is raised as the call's end, not as a failed verification
        assert "failed verification" not in exc.reason
    else:
        assert asyncio.run(upstream.finish()).code is code


def test_an_unsealed_refusal_before_any_message_is_the_hosts_answer(world: _World) -> None:
    upstream, rpc, _ = _upstream(world)
    rpc.replies = [_ended(grpc.StatusCode.PERMISSION_DENIED)]
    assert _drain(upstream) == []
    assert asyncio.run(upstream.finish()).code is grpc.StatusCode.PERMISSION_DENIED


def test_a_stream_given_up_while_opening_gives_back_its_breaker_probe(world: _World) -> None:
    # The caller cancels while the envelope of a bidi stream waits to be sent (a host that reads nothing).
    # If that call was the half-open breaker's probe, the probe must come back: else every later call to
    # the host is refused for good ("a probe is in flight").
    rpc = _Rpc()
    stuck = asyncio.Event()

    async def never(_frame: relay_pb2.RelayFrame) -> None:
        await stuck.wait()

    rpc.write = never  # type: ignore[method-assign]
    clock = FakeClock(time.time())
    client = _client(world, rpc, clock)
    breaker = client.breaker(SURREY)
    breaker.failure()  # open
    clock.advance(6.0)  # past the cooldown: the next call is the probe

    async def give_up() -> None:
        opening = asyncio.ensure_future(client.stream(_call(world, REVIEW)))
        await asyncio.sleep(0.01)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening

    asyncio.run(give_up())
    breaker.allow()  # the next call may probe the host again


def test_the_origin_sends_envelope_then_numbered_message(world: _World) -> None:
    upstream, rpc, _ = _upstream(world)
    rpc.replies = []

    async def send() -> None:
        await upstream.write(b"doc-1")

    asyncio.run(send())
    assert [f.WhichOneof("kind") for f in rpc.written] == ["envelope", "message"]
    assert (rpc.written[1].message.seq, rpc.written[1].message.data) == (0, b"doc-1")


class _ReadContext:
    """A servicer context whose reads are the frames given (as bytes), then EOF."""

    def __init__(self, frames: list[bytes]) -> None:
        self._frames = list(frames)

    async def read(self) -> Any:
        return self._frames.pop(0) if self._frames else grpc.aio.EOF


def _origin_frames(world: _World, messages: list[bytes]) -> list[relay_pb2.RelayFrame]:
    """What the origin sends for a bidi stream of `messages`: envelope, numbered messages, request seal."""
    upstream, rpc, _ = _upstream(world, REVIEW)

    async def send() -> None:
        await upstream.open()
        for data in messages:
            await upstream.write(data)
        await upstream.done_writing()

    asyncio.run(send())
    return rpc.written


def _host_reads(world: _World, frames: list[relay_pb2.RelayFrame]) -> tuple[list[bytes], Call]:
    """The host verifies the envelope (first frame), then reads the rest as the pump would."""
    verifier = world.verifier(SURREY)
    call = Call(Listener.PEER, "/psn.gateway.v1.Relay/Stream", (), None, time.time(), 0.0)
    call.envelope = verifier.verify_envelope(frames[0].envelope, peer=world.origin_peer)
    downstream = RelayHostDownstream(
        _ReadContext([f.SerializeToString() for f in frames[1:]]),  # type: ignore[arg-type]  # a fake context
        call,
        verifier,
    )

    async def drain() -> list[bytes]:
        out = []
        while (data := await downstream.read()) is not None:
            out.append(data)
        return out

    return asyncio.run(drain()), call


def test_the_host_reads_what_the_origin_sent_and_verifies_the_request_seal(world: _World) -> None:
    messages = [b"x" * 70_000, b"", b"y"]
    frames = _origin_frames(world, messages)
    assert [f.WhichOneof("kind") for f in frames] == ["envelope", "message", "message", "message", "request_seal"]
    got, call = _host_reads(world, frames)
    assert got == messages
    assert (call.request_digest, call.request_messages) == (MessageDigest.of(*messages).digest, 3)


def test_the_host_refuses_request_messages_out_of_sequence(world: _World) -> None:
    frames = _origin_frames(world, [b"a", b"b"])
    frames[1], frames[2] = frames[2], frames[1]
    with pytest.raises(InvalidArgument, match="out of sequence"):
        _host_reads(world, frames)


def test_the_host_refuses_a_request_message_changed_on_the_way(world: _World) -> None:
    frames = _origin_frames(world, [b"a", b"b"])
    frames[2].message.data = b"c"
    with pytest.raises(RequestRefused):
        _host_reads(world, frames)
