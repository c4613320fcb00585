"""Streaming calls on relay channels (gateway.muxstream, gateway.mux.MuxHost), driven without a network.

A fake channel feeds `MuxBatch`es of `MuxStream` items into a `MuxHost` and collects what it writes
back; the stream handler is a stand-in for the gateway's `Relay/Stream` handler. The origin's end
(`LinkStreamCall`) is driven directly, and once end to end through `_ClientStream` over an in-memory
pipe. What must hold: frames reach the handler in order and the host's come back in order with `end`
last; neither side sends past its window until the other grants credit, each side grants credit as
its reader takes frames, and a sender that overruns the window ends the channel (InvalidArgument);
`cancel` cancels the host's stream; `abort` is a refusal and the stream is over; streams count with
unary calls against the cap on calls in flight and the excess is refused through the handler (so it
is recorded), not dropped; draining starts nothing new but lets a running stream finish; a channel
that closes or breaks stops the running streams; and at the origin, `end`, a refusal, the deadline
and a broken channel each end the call as a `Relay/Stream` RPC would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.clock import FakeClock
from gateway.errors import DeadlineExceeded, GatewayError, InvalidArgument, Unavailable
from gateway.mux import MuxHost, _ClientStream
from gateway.muxstream import WINDOW, HostStream, LinkStreamCall, StreamAborted
from gateway.pipeline import Call, Listener
from gateway.relay import RelayHostDownstream

#: What a flooding sender of 1 MiB frames may make the receiver buffer: the window, and the one frame it
#: may start while it still has credit.
_LIMIT = WINDOW + len(
    relay_pb2.RelayFrame(message=relay_pb2.StreamMessage(seq=19, data=bytes(1 << 20))).SerializeToString()
)

EOF = grpc.aio.EOF


def frame(seq: int, size: int = 8) -> bytes:
    """A serialized request/response message frame of about `size` bytes."""
    data = bytes([seq % 251]) * size
    return relay_pb2.RelayFrame(message=relay_pb2.StreamMessage(seq=seq, data=data)).SerializeToString()


def out_frame(seq: int, size: int = 8) -> relay_pb2.RelayFrame:
    """The same frame as the message a handler writes."""
    return relay_pb2.RelayFrame.FromString(frame(seq, size))


def item(stream_id: int, data: bytes = b"", **kw: Any) -> relay_pb2.MuxStream:
    return relay_pb2.MuxStream(id=stream_id, frame=data, **kw)


class Channel:
    """A relay channel seen from the host: `read` takes from a queue (None: closed; an exception: broke)."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[Any] = asyncio.Queue()
        self.written: list[relay_pb2.MuxBatch] = []

    async def read(self) -> bytes | None:
        got = await self.incoming.get()
        if isinstance(got, BaseException):
            raise got
        return got

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        self.written.append(batch)

    def send(self, *items: relay_pb2.MuxStream, requests: tuple[int, ...] = ()) -> None:
        batch = relay_pb2.MuxBatch(streams=items, requests=[relay_pb2.MuxRequest(id=i) for i in requests])
        self.incoming.put_nowait(batch.SerializeToString())

    def close(self) -> None:
        self.incoming.put_nowait(None)

    def items(self, stream_id: int) -> list[relay_pb2.MuxStream]:
        return [i for b in self.written for i in b.streams if i.id == stream_id]

    def frames(self, stream_id: int) -> list[bytes]:
        return [i.frame for i in self.items(stream_id) if i.frame]

    def credits(self, stream_id: int) -> list[int]:
        return [i.credit for i in self.items(stream_id) if i.credit]

    def answers(self) -> list[relay_pb2.MuxResponse]:
        return [a for b in self.written for a in b.responses]


def kinds(items: list[relay_pb2.MuxStream]) -> list[str]:
    """What each item the host sent says, credit aside: "frame", "end" or "refusal"."""
    out = []
    for i in items:
        if i.frame:
            out.append("frame")
        if i.HasField("refusal"):
            out.append("refusal")
        if i.end:
            out.append("end")
        if i.cancel:
            out.append("cancel")
    return out


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Let the loop run until `predicate` holds (AssertionError after `timeout` seconds)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)
    assert predicate(), what


async def settle() -> None:
    """Let every task that can run, run (a writer flushing, a handler reading)."""
    for _ in range(50):
        await asyncio.sleep(0)
    await asyncio.sleep(0.02)


async def _ok(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
    return relay_pb2.MuxResponse(id=request.id, response=relay_pb2.UnaryRelayResponse(message=b"ok"))


async def _refuse(request: relay_pb2.MuxRequest, exc: GatewayError) -> relay_pb2.MuxResponse:
    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, InvalidArgument) else grpc.StatusCode.UNAVAILABLE
    return relay_pb2.MuxResponse(id=request.id, refusal=relay_pb2.MuxRefusal(code=code.value[0], message=exc.reason))


StreamHandler = Callable[[HostStream, GatewayError | None], Awaitable[None]]


async def _refusing(stream: HostStream, problem: GatewayError | None) -> None:
    """What the gateway does with a stream refused before it runs: record it (here: nothing), abort."""
    assert problem is not None
    await stream.abort(grpc.StatusCode.UNAVAILABLE, problem.public)


def _host(
    channel: Channel,
    handle_stream: StreamHandler | None,
    *,
    handle: Callable[[relay_pb2.MuxRequest], Awaitable[relay_pb2.MuxResponse]] = _ok,
    max_in_flight: int = 100,
    draining: asyncio.Event | None = None,
) -> MuxHost:
    return MuxHost(
        channel.read,
        channel.write,
        handle=handle,
        refuse=_refuse,
        handle_stream=handle_stream,
        certificate=b"DER",
        max_in_flight=max_in_flight,
        max_frame=8 << 20,
        draining=draining or asyncio.Event(),
    )


# -- the host's end: MuxHost and HostStream ---------------------------------------------------------


def test_frames_reach_the_handler_in_order_and_the_hosts_frames_come_back_in_order_with_end_last() -> None:
    got: dict[int, list[bytes]] = {1: [], 3: []}

    async def handler(stream: HostStream, problem: GatewayError | None) -> None:
        assert problem is None
        while (data := await stream.read()) is not EOF:
            got[stream.id].append(data)
        for seq in range(3):
            await stream.write(out_frame(100 * stream.id + seq))

    async def run() -> Channel:
        channel = Channel()
        # Two streams interleaved over several batches.
        channel.send(item(1, frame(0)), item(3, frame(10)), item(1, frame(1)))
        channel.send(item(3, frame(11)), item(1, frame(2)), item(1, end=True))
        channel.send(item(3, frame(12)), item(3, end=True))
        host = asyncio.ensure_future(_host(channel, handler).serve())
        await until(lambda: all(kinds(channel.items(i))[-1:] == ["end"] for i in (1, 3)), "both streams to end")
        channel.close()
        await asyncio.wait_for(host, 5)
        return channel

    channel = asyncio.run(run())
    assert got == {1: [frame(0), frame(1), frame(2)], 3: [frame(10), frame(11), frame(12)]}
    for stream_id in (1, 3):
        assert kinds(channel.items(stream_id)) == ["frame", "frame", "frame", "end"]
        assert channel.frames(stream_id) == [frame(100 * stream_id + seq) for seq in range(3)]


def test_the_host_stops_sending_at_the_window_until_the_origin_grants_credit() -> None:
    size = WINDOW // 4  # each frame a little over a quarter of the window (its header)
    wrote: list[int] = []

    async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
        assert await stream.read() == frame(0)
        for seq in range(8):
            await stream.write(out_frame(seq, size))
            wrote.append(seq)

    async def run() -> tuple[Channel, list[int], list[str]]:
        channel = Channel()
        channel.send(item(1, frame(0)), item(1, end=True))
        host = asyncio.ensure_future(_host(channel, handler).serve())
        await until(lambda: sum(map(len, channel.frames(1))) >= WINDOW, "the host to send its window")
        await settle()
        stalled = list(wrote)
        sent = channel.frames(1)
        # It stopped at the first frame that took it to the window: nothing after that went.
        assert sum(map(len, sent)) >= WINDOW > sum(map(len, sent[:-1])), [len(f) for f in sent]
        assert "end" not in kinds(channel.items(1))
        channel.send(item(1, credit=WINDOW))  # the origin's reader took a window's worth
        await until(lambda: "end" in kinds(channel.items(1)), "the host to finish")
        channel.close()
        await asyncio.wait_for(host, 5)
        return channel, stalled, kinds(channel.items(1))

    channel, stalled, sent_kinds = asyncio.run(run())
    assert len(stalled) == 4  # four frames of a quarter window each, then the fifth waited for credit
    assert sent_kinds == ["frame"] * 8 + ["end"]
    assert channel.frames(1) == [frame(seq, size) for seq in range(8)]


def test_the_host_grants_credit_back_only_as_its_handler_reads() -> None:
    frames = [frame(seq, 64 * 1024) for seq in range(8)]
    gate = asyncio.Event()

    async def run() -> tuple[Channel, list[int]]:
        channel = Channel()
        started = asyncio.Event()

        async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
            started.set()
            await gate.wait()
            while await stream.read() is not EOF:
                pass

        channel.send(*(item(1, f) for f in frames), item(1, end=True))  # all buffered before the handler runs
        host = asyncio.ensure_future(_host(channel, handler).serve())
        await asyncio.wait_for(started.wait(), 5)
        await settle()
        before = channel.credits(1)
        gate.set()
        await until(lambda: "end" in kinds(channel.items(1)), "the handler to finish")
        channel.close()
        await asyncio.wait_for(host, 5)
        return channel, before

    channel, before = asyncio.run(run())
    assert before == []  # nothing read, nothing granted
    credits = channel.credits(1)
    assert sum(credits) == sum(map(len, frames))  # every byte read is granted back
    assert all(c >= WINDOW // 4 for c in credits), credits  # in batches, not an item per frame


def _flooded(sizes: list[int]) -> None:
    """A host whose stream handler reads nothing until the channel closes, sent one frame of each size."""

    async def run() -> None:
        channel = Channel()
        gate = asyncio.Event()

        async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
            await gate.wait()
            with contextlib.suppress(Unavailable):
                while await stream.read() is not EOF:
                    pass

        for seq, size in enumerate(sizes):
            channel.send(item(1, frame(seq, size)))
        channel.close()
        serving = asyncio.ensure_future(_host(channel, handler).serve())
        await until(lambda: channel.incoming.empty() or serving.done(), "the host to take every frame")
        await settle()
        gate.set()  # only now does the handler read (and the channel may end)
        await asyncio.wait_for(serving, 10)

    asyncio.run(run())


def test_a_sender_that_overruns_the_window_ends_the_channel_with_invalid_argument() -> None:
    # Ten frames of 1 MiB that nobody reads: past the window and the one frame that may overshoot it.
    with pytest.raises(InvalidArgument, match="flow-control window"):
        _flooded([1 << 20] * 10)


def test_a_sender_past_the_credit_granted_is_ended_however_little_it_is_over() -> None:
    # 1.5 MiB unread: a third frame sent when the first two had spent the window. Counting unread bytes
    # against the window plus 8 MiB of slack let a stream make the host hold 9 MiB.
    with pytest.raises(InvalidArgument, match="flow-control window"):
        _flooded([WINDOW // 2] * 3)


def test_a_sender_within_its_credit_and_one_frame_over_is_not_ended() -> None:
    # The control: an honest sender checks its credit before each frame, so overshoots by one frame at most.
    _flooded([WINDOW // 2] * 2)  # just over 1 MiB, unread: the channel closes normally


def test_what_a_stream_makes_the_host_buffer_is_the_credit_it_granted_plus_one_frame() -> None:
    async def run() -> tuple[int, int, int]:
        sent: list[relay_pb2.MuxStream] = []
        stream = HostStream(1, certificate=None, send=sent.append)
        frames = [frame(seq, 200_000) for seq in range(100)]
        size = max(map(len, frames))
        accepted = 0
        with pytest.raises(InvalidArgument, match="flow-control window"):
            for data in frames:
                stream.received(item(1, data))
                accepted += 1
        peak = stream._inbox.buffered
        assert peak == sum(map(len, frames[:accepted]))
        assert WINDOW <= peak < WINDOW + size
        # Reading grants credit back, and the stream takes that much more (and no more).
        for _ in range(2):
            await stream.read()
        granted = sum(i.credit for i in sent)
        more = accepted
        with pytest.raises(InvalidArgument, match="flow-control window"):
            for data in frames[accepted:]:
                stream.received(item(1, data))
                more += 1
        return granted, sum(map(len, frames[accepted:more])), size

    granted, more, size = asyncio.run(run())
    assert granted >= WINDOW // 4
    assert granted <= more < granted + size


def test_a_host_waiting_for_credit_ends_at_the_calls_deadline_and_the_seal_does_not_wait_again() -> None:
    """An origin that grants no credit: the pump's write ends DEADLINE_EXCEEDED at the deadline, not never."""

    async def run() -> tuple[float, list[relay_pb2.MuxStream]]:
        sent: list[relay_pb2.MuxStream] = []
        stream = HostStream(1, certificate=None, send=sent.append)
        clock = FakeClock()
        call = Call(Listener.PEER, "/psn.gateway.v1.Relay/Stream", (), None, clock.now(), clock.monotonic())
        call.deadline_mono = clock.monotonic() + 0.2
        downstream = RelayHostDownstream(stream, call, verifier=None, clock=clock)  # type: ignore[arg-type]
        started = asyncio.get_running_loop().time()
        with pytest.raises(DeadlineExceeded):
            while True:  # a window's worth goes out, then nothing is granted
                await asyncio.wait_for(downstream.write(b"x" * (WINDOW // 4)), 5)
        waited = asyncio.get_running_loop().time() - started
        # The gateway then records and seals the deadline and writes the seal: with no credit, the stream
        # ends with an unsealed DEADLINE_EXCEEDED at once rather than wait for credit again.
        with pytest.raises(StreamAborted):
            await asyncio.wait_for(stream.write(relay_pb2.RelayFrame(response_seal=relay_pb2.Signed())), 1)
        return waited, sent

    waited, sent = asyncio.run(run())
    assert 0.15 < waited < 2
    assert kinds(sent) == ["frame"] * 4 + ["refusal"]
    assert sent[-1].refusal.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def test_a_host_writing_within_the_deadline_is_not_cut_short() -> None:
    async def run() -> list[relay_pb2.MuxStream]:
        sent: list[relay_pb2.MuxStream] = []
        stream = HostStream(1, certificate=None, send=sent.append)
        clock = FakeClock()
        call = Call(Listener.PEER, "/psn.gateway.v1.Relay/Stream", (), None, clock.now(), clock.monotonic())
        call.deadline_mono = clock.monotonic() + 30
        downstream = RelayHostDownstream(stream, call, verifier=None, clock=clock)  # type: ignore[arg-type]
        for _ in range(6):
            writing = asyncio.ensure_future(downstream.write(b"x" * (WINDOW // 4)))
            await settle()
            if not writing.done():
                stream.received(item(1, credit=WINDOW))
            await asyncio.wait_for(writing, 5)
        return sent

    assert kinds(asyncio.run(run())) == ["frame"] * 6


def test_a_cancel_cancels_the_hosts_stream_and_nothing_more_is_sent_for_it() -> None:
    cancelled: list[int] = []

    async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
        assert await stream.read() == frame(0)
        try:
            await stream.read()
        except asyncio.CancelledError:
            cancelled.append(stream.id)
            raise

    async def run() -> Channel:
        channel = Channel()
        channel.send(item(5, frame(0)))
        host = asyncio.ensure_future(_host(channel, handler).serve())
        await settle()
        channel.send(item(5, cancel=True))
        await until(lambda: cancelled == [5], "the stream's task to be cancelled")
        channel.send(item(5, cancel=True), item(5, end=True), item(5, credit=10))  # late items: nothing starts
        channel.close()
        await asyncio.wait_for(host, 5)
        return channel

    channel = asyncio.run(run())
    assert cancelled == [5]
    assert kinds(channel.items(5)) == []  # the origin gave up on it: no end, no refusal


def test_abort_sends_a_refusal_and_ends_the_stream_without_an_end() -> None:
    calls: list[int] = []

    async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
        calls.append(stream.id)
        assert await stream.read() == frame(0)
        await stream.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you", trailing_metadata=(("k", "v"),))
        raise AssertionError("abort returned")  # pragma: no cover

    async def run() -> Channel:
        channel = Channel()
        channel.send(item(1, frame(0)), item(1, frame(1)))
        channel.close()
        await asyncio.wait_for(_host(channel, handler).serve(), 5)
        return channel

    channel = asyncio.run(run())
    assert calls == [1]
    [refusal] = channel.items(1)
    assert refusal.refusal.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert refusal.refusal.message == "not for you" and not refusal.end


def test_frames_after_abort_are_dropped_by_the_stream() -> None:
    async def run() -> tuple[list[relay_pb2.MuxStream], Any]:
        sent: list[relay_pb2.MuxStream] = []
        stream = HostStream(1, certificate=None, send=sent.append)
        stream.received(item(1, frame(0)))
        with pytest.raises(Exception, match="PERMISSION_DENIED"):
            await stream.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        stream.received(item(1, frame(1)))
        stream.received(item(1, end=True))
        stream.received(item(1, frame(2, 20 << 20)))  # not even an overrun counts now
        first = await stream.read()
        assert stream._inbox.buffered == 0
        return sent, first

    sent, first = asyncio.run(run())
    assert first == frame(0)
    assert [s.refusal.code for s in sent] == [grpc.StatusCode.PERMISSION_DENIED.value[0]]


def test_frames_that_arrive_after_a_stream_ended_start_nothing() -> None:
    # An honest origin's frames still in flight when the host refused (or finished) its stream.
    calls: list[int] = []

    async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
        calls.append(stream.id)
        await stream.read()
        await stream.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you")

    async def run() -> Channel:
        channel = Channel()
        channel.send(item(1, frame(0)))
        host = asyncio.ensure_future(_host(channel, handler).serve())
        await until(lambda: kinds(channel.items(1)) == ["refusal"], "the refusal")
        channel.send(item(1, frame(1)), item(1, frame(2)))  # sent before the origin heard
        await settle()
        channel.close()
        await asyncio.wait_for(host, 5)
        return channel

    channel = asyncio.run(run())
    assert calls == [1], calls
    assert kinds(channel.items(1)) == ["refusal"]


def test_a_handler_that_fails_ends_its_own_stream_with_unknown_and_the_channel_serves_on() -> None:
    async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
        if stream.id == 1:
            raise RuntimeError("a bug")
        while await stream.read() is not EOF:
            pass

    async def run() -> Channel:
        channel = Channel()
        channel.send(item(1, frame(0)))
        channel.send(item(3, frame(0)), item(3, end=True))
        channel.close()
        await asyncio.wait_for(_host(channel, handler).serve(), 5)
        return channel

    channel = asyncio.run(run())
    [refusal] = channel.items(1)
    assert refusal.refusal.code == grpc.StatusCode.UNKNOWN.value[0] and "bug" not in refusal.refusal.message
    assert kinds(channel.items(3)) == ["end"]


def test_streams_and_calls_over_the_in_flight_cap_are_refused_through_the_handler_not_dropped() -> None:
    release = asyncio.Event()
    problems: dict[int, GatewayError | None] = {}

    async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
        await release.wait()
        return await _ok(request)

    async def handler(stream: HostStream, problem: GatewayError | None) -> None:
        problems[stream.id] = problem
        if problem is not None:
            await _refusing(stream, problem)
        await release.wait()

    async def run() -> Channel:
        channel = Channel()
        channel.send(requests=(1,))  # a unary call in flight
        channel.send(item(3, frame(0)))  # a stream: two in flight, the cap
        channel.send(item(5, frame(0)), item(7, frame(0)))  # over it: refused
        host = asyncio.ensure_future(_host(channel, handler, handle=handle, max_in_flight=2).serve())
        await until(lambda: len(channel.items(5)) == len(channel.items(7)) == 1, "the excess to be refused")
        release.set()
        channel.close()
        await asyncio.wait_for(host, 5)
        return channel

    channel = asyncio.run(run())
    assert problems[3] is None
    for stream_id in (5, 7):
        problem = problems[stream_id]
        assert isinstance(problem, Unavailable) and "in flight" in problem.reason, problem
        assert kinds(channel.items(stream_id)) == ["refusal"]
        assert channel.items(stream_id)[0].refusal.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert kinds(channel.items(3)) == ["end"]  # the one within the cap ran
    assert [a.id for a in channel.answers()] == [1] and not channel.answers()[0].HasField("refusal")


def test_a_unary_call_over_the_cap_taken_by_streams_is_refused() -> None:
    release = asyncio.Event()

    async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
        await release.wait()

    async def run() -> Channel:
        channel = Channel()
        channel.send(item(1, frame(0)), item(3, frame(0)))  # two streams: the cap
        channel.send(requests=(5,))
        host = asyncio.ensure_future(_host(channel, handler, max_in_flight=2).serve())
        await until(lambda: bool(channel.answers()), "the unary call's answer")
        release.set()
        channel.close()
        await asyncio.wait_for(host, 5)
        return channel

    [answer] = asyncio.run(run()).answers()
    assert answer.HasField("refusal"), answer


def test_draining_starts_no_new_stream_but_a_running_one_gets_its_frames_and_finishes() -> None:
    got: list[bytes] = []
    started: list[int] = []

    async def run() -> Channel:
        channel = Channel()
        draining = asyncio.Event()

        async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
            started.append(stream.id)
            while (data := await stream.read()) is not EOF:
                got.append(data)
            await stream.write(out_frame(99))

        channel.send(item(1, frame(0)))
        host = asyncio.ensure_future(_host(channel, handler, draining=draining).serve())
        await until(lambda: got == [frame(0)], "the stream to start")
        draining.set()
        await settle()
        channel.send(item(1, frame(1)), item(3, frame(0)), requests=(9,))  # a new stream and call: not started
        channel.send(item(1, frame(2)), item(1, end=True))
        await asyncio.wait_for(host, 5)  # ends without the origin closing the channel
        return channel

    channel = asyncio.run(run())
    assert started == [1]
    assert got == [frame(0), frame(1), frame(2)]
    assert kinds(channel.items(1)) == ["frame", "end"]
    assert channel.items(3) == [] and channel.answers() == []


def test_draining_with_no_stream_running_ends_the_channel() -> None:
    async def run() -> None:
        channel = Channel()
        draining = asyncio.Event()
        draining.set()
        await asyncio.wait_for(_host(channel, _refusing, draining=draining).serve(), 5)

    asyncio.run(run())


@pytest.mark.parametrize("end", ["closed", "broke"])
def test_a_channel_that_ends_stops_its_running_streams_reading_and_writing(end: str) -> None:
    # A stream reading waits for a frame, one writing waits for credit: neither ever comes now.
    failures: dict[int, BaseException] = {}

    async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
        await stream.read()
        try:
            if stream.id == 1:
                await stream.read()
            else:
                for seq in range(100):
                    await stream.write(out_frame(seq, WINDOW // 2))
        except (GatewayError, asyncio.CancelledError) as exc:
            failures[stream.id] = exc
            raise

    async def run() -> BaseException | None:
        channel = Channel()
        channel.send(item(1, frame(0)), item(3, frame(0)))
        host = asyncio.ensure_future(_host(channel, handler).serve())
        await until(lambda: len(channel.frames(3)) >= 2, "stream 3 to send its window")
        await settle()
        assert failures == {}
        channel.incoming.put_nowait(None if end == "closed" else ConnectionResetError("reset"))
        await asyncio.wait((host,), timeout=5)
        assert host.done(), "the host still waits on its streams"
        return host.exception()

    raised = asyncio.run(run())
    assert sorted(failures) == [1, 3]
    if end == "closed":
        # The origin closed the channel: a read or a write fails as on a broken `Relay/Stream`.
        assert raised is None
        assert all(isinstance(e, Unavailable) for e in failures.values()), failures
    else:
        # The channel broke: the host stops serving it and cancels its streams (recorded as cancelled).
        assert isinstance(raised, ConnectionResetError)
        assert all(isinstance(e, (Unavailable, asyncio.CancelledError)) for e in failures.values()), failures


def test_a_stream_on_a_channel_without_a_stream_handler_ends_the_channel() -> None:
    async def run() -> None:
        channel = Channel()
        channel.send(item(1, frame(0)))
        await asyncio.wait_for(_host(channel, None).serve(), 5)

    with pytest.raises(InvalidArgument, match="no streaming calls"):
        asyncio.run(run())


def test_the_host_stream_is_shaped_as_a_servicer_context() -> None:
    stream = HostStream(1, certificate=b"DER", send=lambda _item: None)
    assert stream.time_remaining() is None
    assert stream.invocation_metadata() == ()
    assert stream.auth_context() == {"x509_pem_cert": [b"DER"]}
    assert HostStream(1, certificate=None, send=lambda _item: None).auth_context() == {}


# -- the origin's end: LinkStreamCall -------------------------------------------------------------


class Origin:
    """A `LinkStreamCall` and what it sent and forgot."""

    def __init__(self, *, timeout: float | None = None) -> None:
        self.sent: list[relay_pb2.MuxStream] = []
        self.forgotten: list[int] = []
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self.call = LinkStreamCall(
            7, "thames-valley", send=self.sent.append, forget=self.forgotten.append, deadline=deadline
        )

    def kinds(self) -> list[str]:
        return kinds(self.sent)


def test_a_writer_waiting_for_credit_is_released_when_the_host_ends_the_stream() -> None:
    # A host may end a stream (a refusal, a sealed error) while the origin still has request frames to send:
    # it grants no more credit then, so a writer waiting for some must stop, not hang until the deadline.
    async def run() -> tuple[list[int], BaseException | None, Any]:
        origin = Origin(timeout=30)
        wrote: list[int] = []

        async def writer() -> None:
            for seq in range(3):
                await origin.call.write(out_frame(seq, WINDOW // 2 + 1024))
                wrote.append(seq)

        writing = asyncio.ensure_future(writer())
        while len(wrote) < 2:
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        stuck = not writing.done()
        refusal = relay_pb2.MuxRefusal(code=grpc.StatusCode.PERMISSION_DENIED.value[0], message="denied")
        origin.call.received(item(7, refusal=refusal))
        error = None
        try:
            await asyncio.wait_for(writing, 5)
        except grpc.aio.AioRpcError as exc:
            error = exc
        assert stuck
        with pytest.raises(grpc.aio.AioRpcError) as outcome:
            await origin.call.read()
        return wrote, error, outcome.value.code()

    wrote, error, code = asyncio.run(run())
    assert wrote == [0, 1]  # the third waited for credit, then stopped
    assert isinstance(error, grpc.aio.AioRpcError) and error.code() is grpc.StatusCode.CANCELLED
    assert code is grpc.StatusCode.PERMISSION_DENIED  # the host's outcome still reaches the reader


def test_read_returns_the_hosts_frames_then_eof_at_its_end() -> None:
    async def run() -> tuple[list[Any], Origin]:
        origin = Origin(timeout=30)
        origin.call.received(item(7, frame(0)))
        origin.call.received(item(7, frame(1)))
        origin.call.received(item(7, end=True))
        got = [await origin.call.read() for _ in range(3)]
        origin.call.received(item(7, frame(2)))  # after the end: ignored
        origin.call.cancel()  # over already: no cancel goes out
        return got, origin

    got, origin = asyncio.run(run())
    assert got == [frame(0), frame(1), EOF]
    assert origin.forgotten == [7] and origin.kinds() == []


def test_read_raises_the_refusals_status() -> None:
    async def run() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError, Origin]:
        origin = Origin()
        refusal = relay_pb2.MuxRefusal(code=grpc.StatusCode.PERMISSION_DENIED.value[0], message="not for you")
        origin.call.received(item(7, refusal=refusal))
        with pytest.raises(grpc.aio.AioRpcError) as first:
            await origin.call.read()
        other = Origin()
        other.call.received(item(7, refusal=relay_pb2.MuxRefusal(code=999, message="?")))
        with pytest.raises(grpc.aio.AioRpcError) as second:
            await other.call.read()
        return first.value, second.value, origin

    first, second, origin = asyncio.run(run())
    assert first.code() is grpc.StatusCode.PERMISSION_DENIED and first.details() == "not for you"
    assert second.code() is grpc.StatusCode.UNKNOWN  # a code gRPC does not have
    assert origin.forgotten == [7]


def test_read_past_the_deadline_raises_deadline_exceeded_and_cancels_the_stream() -> None:
    async def run() -> tuple[grpc.aio.AioRpcError, Origin]:
        origin = Origin(timeout=0.05)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await origin.call.read()
        origin.call.cancel()  # the caller cancels too: one cancel item only
        await origin.call.write(out_frame(0))  # over: nothing more goes out
        return err.value, origin

    err, origin = asyncio.run(run())
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert origin.kinds() == ["cancel"] and origin.sent[0].id == 7
    assert origin.forgotten == [7]


def test_a_failed_channel_fails_the_read_and_a_writer_waiting_for_credit_with_unavailable() -> None:
    async def run() -> tuple[list[int], BaseException | None, grpc.aio.AioRpcError]:
        origin = Origin()
        wrote: list[int] = []

        async def writer() -> None:
            for seq in range(10):
                await origin.call.write(out_frame(seq, WINDOW // 2))
                wrote.append(seq)

        writing = asyncio.ensure_future(writer())
        await settle()
        assert not writing.done() and len(wrote) == 2  # stopped at the window
        origin.call.fail(ConnectionResetError("reset"))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writing, 5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await origin.call.read()
        return wrote, writing.exception(), err.value

    wrote, write_error, read_error = asyncio.run(run())
    assert len(wrote) == 2
    assert isinstance(write_error, grpc.aio.AioRpcError) and write_error.code() is grpc.StatusCode.UNAVAILABLE
    assert read_error.code() is grpc.StatusCode.UNAVAILABLE and "thames-valley" in (read_error.details() or "")


def test_the_origin_stops_at_the_window_until_the_host_grants_credit() -> None:
    async def run() -> tuple[list[int], list[int], Origin]:
        origin = Origin()
        wrote: list[int] = []

        async def writer() -> None:
            for seq in range(8):
                await origin.call.write(out_frame(seq, WINDOW // 4))
                wrote.append(seq)
            await origin.call.done_writing()

        writing = asyncio.ensure_future(writer())
        await settle()
        stalled = list(wrote)
        origin.call.received(item(7, credit=WINDOW))
        await asyncio.wait_for(writing, 5)
        return stalled, wrote, origin

    stalled, wrote, origin = asyncio.run(run())
    assert len(stalled) == 4
    assert wrote == list(range(8))
    assert origin.kinds() == ["frame"] * 8 + ["end"]
    assert [s.frame for s in origin.sent[:8]] == [frame(seq, WINDOW // 4) for seq in range(8)]


def test_the_origin_grants_credit_as_it_reads_and_a_host_overrunning_the_window_is_invalid_argument() -> None:
    async def run() -> tuple[list[int], list[int]]:
        origin = Origin()
        frames = [frame(seq, 64 * 1024) for seq in range(8)]
        for data in frames:
            origin.call.received(item(7, data))
        before = [s.credit for s in origin.sent if s.credit]
        for data in frames:
            assert await origin.call.read() == data
        credits = [s.credit for s in origin.sent if s.credit]
        assert sum(credits) == sum(map(len, frames))

        flooded = Origin()
        with pytest.raises(InvalidArgument, match="flow-control window"):
            for seq in range(20):
                flooded.call.received(item(7, frame(seq, 1 << 20)))
        assert flooded.call._inbox.buffered <= _LIMIT
        return before, credits

    before, credits = asyncio.run(run())
    assert before == []
    assert all(c >= WINDOW // 4 for c in credits)


def test_done_writing_sends_end_and_cancel_sends_cancel_once() -> None:
    async def run() -> Origin:
        origin = Origin()
        await origin.call.write(out_frame(0))
        await origin.call.done_writing()
        origin.call.cancel()
        origin.call.cancel()
        await origin.call.write(out_frame(1))
        await origin.call.done_writing()
        return origin

    origin = asyncio.run(run())
    assert origin.kinds() == ["frame", "end", "cancel"]
    assert origin.forgotten == [7]


# -- both ends over an in-memory pipe ---------------------------------------------------------------


class Pipe:
    """Both directions of a relay channel in memory: the origin's `MuxPipe` and the host's read/write."""

    def __init__(self) -> None:
        self.to_host: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.to_origin: asyncio.Queue[bytes | None] = asyncio.Queue()

    # the origin's MuxPipe
    async def read(self) -> bytes | None:
        return await self.to_origin.get()

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        self.to_host.put_nowait(batch.SerializeToString())

    def send_now(self, _batch: relay_pb2.MuxBatch) -> bool:
        return False

    def abort(self) -> None:
        self.to_host.put_nowait(None)

    def recheck(self) -> None:
        pass

    async def failure(self, exc: BaseException) -> BaseException:
        return exc

    # the host's end
    async def host_read(self) -> bytes | None:
        return await self.to_host.get()

    async def host_write(self, batch: relay_pb2.MuxBatch) -> None:
        self.to_origin.put_nowait(batch.SerializeToString())


def test_a_stream_of_many_windows_each_way_between_origin_and_host_arrives_whole_and_in_order() -> None:
    count, size = 24, 256 * 1024  # 6 MiB each way: six windows, so credit must flow both ways

    async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
        while (data := await stream.read()) is not EOF:  # echo each frame as it comes
            await stream.write(relay_pb2.RelayFrame.FromString(data))

    async def run() -> list[Any]:
        pipe = Pipe()
        draining = asyncio.Event()
        host = MuxHost(
            pipe.host_read,
            pipe.host_write,
            handle=_ok,
            refuse=_refuse,
            handle_stream=handler,
            max_in_flight=10,
            max_frame=8 << 20,
            draining=draining,
        )
        serving = asyncio.ensure_future(host.serve())
        client = _ClientStream(pipe, "thames-valley", lambda _s: None, max_frame=8 << 20)  # type: ignore[arg-type]
        call = client.open_stream(timeout=30)

        async def writer() -> None:
            for seq in range(count):
                await call.write(out_frame(seq, size))
            await call.done_writing()

        writing = asyncio.ensure_future(writer())
        got = []
        while (data := await call.read()) is not EOF:
            got.append(data)
        await asyncio.wait_for(writing, 5)
        await client.close()
        await asyncio.wait_for(serving, 5)
        return got

    got = asyncio.run(run())
    assert got == [frame(seq, 256 * 1024) for seq in range(count)]


def test_streams_whose_first_frames_go_out_in_another_order_than_they_were_opened_are_both_served() -> None:
    # What `RelayUpstream` does: a stream's id is taken when it opens, but its first frame goes when it has
    # one: a bidi stream sends its envelope at once, a server stream only with the caller's request. So a
    # server stream opened first (id 1) can send its first frame after a bidi stream opened next (id 2).
    served: list[int] = []

    async def handler(stream: HostStream, _problem: GatewayError | None) -> None:
        while await stream.read() is not EOF:
            pass
        served.append(stream.id)
        await stream.write(out_frame(0))

    async def run() -> list[list[Any]]:
        pipe = Pipe()
        host = MuxHost(
            pipe.host_read,
            pipe.host_write,
            handle=_ok,
            refuse=_refuse,
            handle_stream=handler,
            max_in_flight=10,
            max_frame=8 << 20,
            draining=asyncio.Event(),
        )
        serving = asyncio.ensure_future(host.serve())
        client = _ClientStream(pipe, "thames-valley", lambda _s: None, max_frame=8 << 20)  # type: ignore[arg-type]
        server_stream = client.open_stream(timeout=2)
        bidi = client.open_stream(timeout=2)
        assert server_stream.id < bidi.id
        await bidi.write(out_frame(0))  # the bidi stream's envelope, at once
        await until(lambda: served == [] and host._streams != {}, "the bidi stream to start at the host")
        await server_stream.write(out_frame(0))  # the caller's request arrives: the server stream's envelope

        async def outcome(call: LinkStreamCall) -> list[Any]:
            await call.done_writing()
            try:
                return [await call.read(), await call.read()]
            except grpc.aio.AioRpcError as exc:
                return [exc.code()]

        outcomes = await asyncio.gather(outcome(server_stream), outcome(bidi))
        await client.close()
        await asyncio.wait_for(serving, 5)
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes == [[frame(0), EOF], [frame(0), EOF]], outcomes


# -- a host that never says what it takes (its first message) ------------------------------------------


def test_a_stream_to_a_host_that_never_greets_ends_deadline_exceeded_at_the_calls_deadline() -> None:
    async def run() -> tuple[grpc.StatusCode, float]:
        pipe = Pipe()  # the host reads, and never writes its first message
        client = _ClientStream(pipe, "surrey", lambda _s: None, max_frame=8 << 20)  # type: ignore[arg-type]
        call = client.open_stream(timeout=0.2)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(call.write(out_frame(0)), 5)  # the envelope, as `RelayUpstream.open` sends it
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 5)
        waited = asyncio.get_running_loop().time() - started
        await client.close()
        return caught.value.code(), waited

    code, waited = asyncio.run(run())
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert waited < 2


def test_a_channel_whose_host_never_greets_closes_unavailable_after_the_greeting_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.mux._GREETING_SECONDS", 0.2)

    async def run() -> tuple[grpc.StatusCode, BaseException | None]:
        pipe = Pipe()
        client = _ClientStream(pipe, "surrey", lambda _s: None, max_frame=8 << 20)  # type: ignore[arg-type]
        call = client.open_stream(timeout=None)  # a call without a deadline is held to the greeting time
        writing = asyncio.ensure_future(call.write(out_frame(0)))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 5)
        with contextlib.suppress(grpc.aio.AioRpcError):  # as `RelayUpstream.open`: the failure surfaces at read
            await asyncio.wait_for(writing, 5)
        return caught.value.code(), client.closed

    code, closed = asyncio.run(run())
    assert code is grpc.StatusCode.UNAVAILABLE
    assert isinstance(closed, Unavailable) and "said nothing" in closed.reason
