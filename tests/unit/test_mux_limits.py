"""What each end of a relay channel takes in one message (gateway.mux: `MuxBatch.max_frame`), without a network.

Each end states, in its first message, the largest message it takes; the origin sends no call before it
has the host's. What must hold: a request over the host's figure is refused at the origin with
RESOURCE_EXHAUSTED and never sent (also one queued before the host spoke); requests are packed into
messages under the host's figure; an answer over the origin's figure is replaced by RESOURCE_EXHAUSTED
for that call alone; a streaming frame over the other side's figure ends its own stream
(RESOURCE_EXHAUSTED), never sent; and the channel serves on after each, so one large message never
ends a channel that other calls share.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.errors import GatewayError, ResourceExhausted
from gateway.mux import MuxHost, _ClientStream
from gateway.muxstream import HostStream
from tests.unit.test_muxstream import Pipe

KIB = 1024
SMALL = 64 * KIB  # what the small side takes in one message
LARGE = 8 << 20


class CountingPipe(Pipe):
    """A `Pipe` that keeps the size of every message each end sends, and the origin's stream items."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.host_sizes: list[int] = []
        self.stream_items: list[relay_pb2.MuxStream] = []

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        self.sizes.append(batch.ByteSize())
        self.stream_items.extend(batch.streams)
        await super().write(batch)

    async def host_write(self, batch: relay_pb2.MuxBatch) -> None:
        self.host_sizes.append(batch.ByteSize())
        await super().host_write(batch)


def _request(size: int) -> relay_pb2.UnaryRelayRequest:
    return relay_pb2.UnaryRelayRequest(message=b"r" * size)


async def _refuse(request: relay_pb2.MuxRequest, exc: GatewayError) -> relay_pb2.MuxResponse:
    refusal = relay_pb2.MuxRefusal(code=grpc.StatusCode.UNAVAILABLE.value[0], message=exc.reason)
    return relay_pb2.MuxResponse(id=request.id, refusal=refusal)


def _host(pipe: Pipe, *, max_frame: int, seen: list[int], answer_bytes: int = 2) -> MuxHost:
    async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
        seen.append(len(request.request.message))
        size = len(request.request.message) if answer_bytes < 0 else answer_bytes
        return relay_pb2.MuxResponse(id=request.id, response=relay_pb2.UnaryRelayResponse(message=b"a" * size))

    return MuxHost(
        pipe.host_read,
        pipe.host_write,
        handle=handle,
        refuse=_refuse,
        max_in_flight=100,
        max_frame=max_frame,
        draining=asyncio.Event(),
    )


async def _outcome(call: Any) -> Any:
    try:
        return await call
    except GatewayError as exc:
        return exc


def test_a_request_over_what_the_host_takes_is_refused_at_the_origin_and_the_channel_serves_on() -> None:
    async def run() -> tuple[Any, Any, list[int]]:
        pipe = Pipe()
        seen: list[int] = []
        serving = asyncio.ensure_future(_host(pipe, max_frame=SMALL, seen=seen).serve())
        client = _ClientStream(pipe, "thames-valley", lambda _s: None, max_frame=LARGE)  # type: ignore[arg-type]
        first = await client.call(_request(10), timeout=5)  # the host has spoken once this is answered
        assert client.peer_max == SMALL
        big = await _outcome(client.call(_request(SMALL), timeout=5))
        after = await client.call(_request(SMALL - 100), timeout=5)
        await client.close()
        await asyncio.wait_for(serving, 5)
        return first, (big, after), seen

    first, (big, after), seen = asyncio.run(run())
    assert first.HasField("response")
    assert isinstance(big, ResourceExhausted), big
    assert f"over the {SMALL} bytes the gateway of thames-valley takes" in big.reason
    assert after.HasField("response")  # the channel still serves
    assert seen == [10, SMALL - 100]  # the large request never reached the host


def test_requests_queued_before_the_host_speaks_are_packed_under_its_limit_and_an_oversize_one_is_refused() -> None:
    async def run() -> tuple[list[Any], CountingPipe, list[int]]:
        pipe = CountingPipe()
        seen: list[int] = []
        client = _ClientStream(pipe, "thames-valley", lambda _s: None, max_frame=LARGE)  # type: ignore[arg-type]
        sizes = [20 * KIB] * 12 + [SMALL + 1] + [20 * KIB] * 3
        calls = [asyncio.ensure_future(_outcome(client.call(_request(n), timeout=5))) for n in sizes]
        for _ in range(20):
            await asyncio.sleep(0)
        assert pipe.sizes and all(n < 100 for n in pipe.sizes), pipe.sizes  # only the origin's own limit so far
        serving = asyncio.ensure_future(_host(pipe, max_frame=SMALL, seen=seen).serve())
        outcomes = await asyncio.gather(*calls)
        await client.close()
        await asyncio.wait_for(serving, 5)
        return outcomes, pipe, seen

    outcomes, pipe, seen = asyncio.run(run())
    assert [type(o) for o in outcomes].count(ResourceExhausted) == 1
    assert isinstance(outcomes[12], ResourceExhausted)
    assert all(o.HasField("response") for i, o in enumerate(outcomes) if i != 12)
    assert sorted(seen) == [20 * KIB] * 15
    assert max(pipe.sizes) <= SMALL, pipe.sizes
    assert sum(1 for n in pipe.sizes if n > 40 * KIB) >= 3  # packed, not one request a message


@pytest.mark.parametrize("alone", [True, False])
def test_an_answer_over_what_the_origin_takes_is_refused_in_its_place_and_the_others_arrive(alone: bool) -> None:
    async def run() -> tuple[list[Any], list[int], list[int]]:
        pipe = CountingPipe()
        seen: list[int] = []
        serving = asyncio.ensure_future(_host(pipe, max_frame=LARGE, seen=seen, answer_bytes=-1).serve())
        client = _ClientStream(pipe, "thames-valley", lambda _s: None, max_frame=SMALL)  # type: ignore[arg-type]
        sizes = [SMALL] if alone else [10 * KIB] * 4 + [SMALL] + [10 * KIB] * 4
        outcomes = await asyncio.gather(*(_outcome(client.call(_request(n), timeout=5)) for n in sizes))
        outcomes.append(await client.call(_request(10), timeout=5))  # and the channel serves on
        got = [len(a.response.message) if a.HasField("response") else a.refusal.code for a in outcomes]
        await client.close()
        await asyncio.wait_for(serving, 5)
        return got, seen, pipe.host_sizes

    got, seen, host_sizes = asyncio.run(run())
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    if alone:
        assert got == [exhausted, 10]
    else:
        assert got == [10 * KIB] * 4 + [exhausted] + [10 * KIB] * 4 + [10]
    assert SMALL in seen  # the host ran the call (and recorded it); only its answer was too large to send
    assert max(host_sizes) <= SMALL, host_sizes  # answers packed under what the origin takes


# -- streaming calls: a frame too large for the other side ends its own stream, not the channel --------------


def _frame(size: int) -> relay_pb2.RelayFrame:
    return relay_pb2.RelayFrame(message=relay_pb2.StreamMessage(seq=0, data=b"f" * size))


def _streaming_channel(
    pipe: Pipe, handle_stream: Any, *, host_takes: int, origin_takes: int
) -> tuple[MuxHost, asyncio.Future[None], _ClientStream]:
    """A host serving `handle_stream` and an origin on `pipe`, each taking what it is told in one message."""
    host = _host(pipe, max_frame=host_takes, seen=[])
    host._handle_stream = handle_stream
    serving = asyncio.ensure_future(host.serve())
    client = _ClientStream(pipe, "thames-valley", lambda _s: None, max_frame=origin_takes)  # type: ignore[arg-type]
    return host, serving, client


def test_a_stream_frame_over_what_the_host_takes_ends_that_stream_and_the_channel_serves_on() -> None:
    frames: list[int] = []

    async def handle_stream(stream: HostStream, _problem: GatewayError | None) -> None:
        while (data := await stream.read()) is not grpc.aio.EOF:
            frames.append(len(data))

    async def run() -> tuple[Any, Any, CountingPipe, int]:
        pipe = CountingPipe()
        host, serving, client = _streaming_channel(pipe, handle_stream, host_takes=SMALL, origin_takes=LARGE)
        call = client.open_stream(timeout=5)
        await call.write(_frame(100))
        await call.write(_frame(SMALL))  # too large for the host: not sent
        try:
            outcome: Any = await call.read()
        except grpc.aio.AioRpcError as exc:
            outcome = exc
        after = await client.call(_request(10), timeout=5)  # answered after the cancel was read
        running = len(host._streams)
        await client.close()
        await asyncio.wait_for(serving, 5)
        return outcome, after, pipe, running

    outcome, after, pipe, running = asyncio.run(run())
    assert isinstance(outcome, grpc.aio.AioRpcError) and outcome.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too large" in (outcome.details() or "")
    assert after.HasField("response")  # the channel serves on
    assert all(len(i.frame) < SMALL for i in pipe.stream_items)  # the large frame was never sent
    assert [i.id for i in pipe.stream_items if i.cancel] == [1]  # the host was told to stop the call
    assert running == 0 and all(n < SMALL for n in frames)


def test_a_stream_frame_over_what_the_origin_takes_is_refused_to_the_hosts_handler() -> None:
    raised: list[BaseException] = []

    async def handle_stream(stream: HostStream, _problem: GatewayError | None) -> None:
        while await stream.read() is not grpc.aio.EOF:
            pass
        await stream.write(_frame(100))
        try:
            await stream.write(_frame(SMALL))
        except ResourceExhausted as exc:  # the gateway's handler records it and refuses the stream
            raised.append(exc)
            await stream.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "resource exhausted")

    async def run() -> tuple[list[Any], Any]:
        _host_end, serving, client = _streaming_channel(Pipe(), handle_stream, host_takes=LARGE, origin_takes=SMALL)
        call = client.open_stream(timeout=5)
        await call.write(_frame(10))
        await call.done_writing()
        got: list[Any] = []
        try:
            while (data := await call.read()) is not grpc.aio.EOF:
                got.append(len(data))
        except grpc.aio.AioRpcError as exc:
            got.append(exc.code())
        after = await client.call(_request(10), timeout=5)
        await client.close()
        await asyncio.wait_for(serving, 5)
        return got, after

    got, after = asyncio.run(run())
    assert len(raised) == 1 and f"over the {SMALL} bytes the origin gateway takes" in str(raised[0])
    assert got[-1] is grpc.StatusCode.RESOURCE_EXHAUSTED and len(got) == 2, got
    assert after.HasField("response")


def test_mixed_requests_stream_frames_and_cancels_are_packed_under_the_hosts_limit() -> None:
    # Requests, stream frames and a cancellation queued together before the host speaks, in sizes that
    # fill messages unevenly: every message the origin sends stays within what the host takes, and
    # every request and frame still arrives.
    frames: list[int] = []

    async def handle_stream(stream: HostStream, _problem: GatewayError | None) -> None:
        while (data := await stream.read()) is not grpc.aio.EOF:
            frames.append(len(data))

    async def run() -> tuple[list[Any], CountingPipe]:
        pipe = CountingPipe()
        client = _ClientStream(pipe, "thames-valley", lambda _s: None, max_frame=LARGE)  # type: ignore[arg-type]
        streams = [client.open_stream(timeout=5) for _ in range(3)]
        sizes = [1, 30 * KIB, 5 * KIB, 50 * KIB, 20 * KIB, 63 * KIB, 2 * KIB, 40 * KIB]
        calls = [asyncio.ensure_future(_outcome(client.call(_request(n), timeout=5))) for n in sizes]
        writes = [asyncio.ensure_future(s.write(_frame(n))) for s in streams for n in (40 * KIB, 25 * KIB, 60 * KIB)]
        gone = asyncio.ensure_future(_outcome(client.call(_request(10), timeout=0.001)))  # gives up: a cancel
        for _ in range(20):
            await asyncio.sleep(0)
        host = _host(pipe, max_frame=SMALL, seen=[])
        host._handle_stream = handle_stream
        serving = asyncio.ensure_future(host.serve())
        await asyncio.gather(*writes)
        for s in streams:
            await s.done_writing()
        outcomes = await asyncio.gather(*calls)
        await gone
        await client.close()
        await asyncio.wait_for(serving, 5)
        return outcomes, pipe

    outcomes, pipe = asyncio.run(run())
    assert all(o.HasField("response") for o in outcomes), outcomes
    assert max(pipe.sizes) <= SMALL, pipe.sizes
    assert len(frames) == 9 and all(n > 25 * KIB for n in frames), frames  # each frame whole, none lost
