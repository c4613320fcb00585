"""The host side of a relay channel (gateway.mux.MuxHost), driven without a network.

A fake stream context feeds batches in and collects the batches written back; the handler is a
stand-in for the gateway's relayed-unary path. What must hold: every request gets exactly one
answer under its id; answers ready together travel together; a cap on calls in flight refuses
the excess (recorded by `refuse`, not dropped); a cancellation reaches the running call;
draining takes no new batches but answers the calls in flight before the stream ends; garbage
ends the stream with InvalidArgument.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.errors import GatewayError, InvalidArgument, Unavailable
from gateway.mux import _MAX_UNSENT_BYTES, MuxHost


class FakeStream:
    """A channel: `read` takes from a queue (None: the origin closed it), `write` collects."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[Any] = asyncio.Queue()
        self.written: list[relay_pb2.MuxBatch] = []

    async def read(self) -> Any:
        return await self.incoming.get()

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        self.written.append(batch)

    def send(self, *ids: int, cancels: tuple[int, ...] = ()) -> None:
        batch = relay_pb2.MuxBatch(requests=[relay_pb2.MuxRequest(id=i) for i in ids], cancels=cancels)
        self.incoming.put_nowait(batch.SerializeToString())

    def answers(self) -> list[relay_pb2.MuxResponse]:
        return [a for batch in self.written for a in batch.responses]


def _ok(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
    return relay_pb2.MuxResponse(id=request.id, response=relay_pb2.UnaryRelayResponse(message=b"ok"))


async def _refuse(request: relay_pb2.MuxRequest, exc: GatewayError) -> relay_pb2.MuxResponse:
    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, InvalidArgument) else grpc.StatusCode.UNAVAILABLE
    return relay_pb2.MuxResponse(id=request.id, refusal=relay_pb2.MuxRefusal(code=code.value[0], message=exc.reason))


def _host(
    stream: FakeStream, handle: Any, *, max_in_flight: int = 100, draining: asyncio.Event | None = None
) -> MuxHost:
    return MuxHost(
        stream.read,
        stream.write,
        handle=handle,
        refuse=_refuse,
        max_in_flight=max_in_flight,
        max_frame=8 << 20,
        draining=draining or asyncio.Event(),
    )


def test_every_request_is_answered_once_under_its_id_and_ready_answers_share_a_batch() -> None:
    async def run() -> FakeStream:
        stream = FakeStream()

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            return _ok(request)

        stream.send(*range(1, 21))
        stream.send(21, 22)
        stream.incoming.put_nowait(None)
        await _host(stream, handle).serve()
        return stream

    stream = asyncio.run(run())
    ids = [a.id for a in stream.answers()]
    assert sorted(ids) == list(range(1, 23))
    assert len(stream.written) < 22  # answers ready together went out together


def test_a_lone_call_is_answered_straight_out_and_calls_in_company_go_packed_by_the_writer() -> None:
    async def run() -> tuple[FakeStream, list[relay_pb2.MuxBatch]]:
        stream = FakeStream()
        straight: list[relay_pb2.MuxBatch] = []

        def send_now(batch: relay_pb2.MuxBatch) -> bool:
            straight.append(batch)
            return True

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            return _ok(request)

        host = MuxHost(
            stream.read,
            stream.write,
            send_now=send_now,
            handle=handle,
            refuse=_refuse,
            max_in_flight=100,
            max_frame=8 << 20,
            draining=asyncio.Event(),
        )
        serving = asyncio.ensure_future(host.serve())
        stream.send(1)
        while not straight:
            await asyncio.sleep(0)
        stream.send(*range(2, 22))
        stream.incoming.put_nowait(None)
        await serving
        return stream, straight

    stream, straight = asyncio.run(run())
    assert straight[0].responses[0].id == 1  # alone: no loop turn for the writer
    ids = sorted([a.id for a in stream.answers()] + [a.id for b in straight for a in b.responses])
    assert ids == list(range(1, 22))  # each answered once, whichever way
    # In company: packed by the writer (which offers each message to send_now first, as a link takes it).
    assert max(len(b.responses) for b in [*stream.written, *straight[1:]]) > 1


def test_calls_over_the_in_flight_cap_are_refused_through_refuse_not_dropped() -> None:
    async def run() -> FakeStream:
        stream = FakeStream()
        release = asyncio.Event()

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            await release.wait()
            return _ok(request)

        stream.send(1, 2, 3, 4, 5)
        host = asyncio.ensure_future(_host(stream, handle, max_in_flight=3).serve())
        await asyncio.sleep(0.05)
        release.set()
        stream.incoming.put_nowait(None)
        await host
        return stream

    answers = {a.id: a for a in asyncio.run(run()).answers()}
    assert sorted(answers) == [1, 2, 3, 4, 5]
    refused = [i for i, a in answers.items() if a.HasField("refusal")]
    assert refused == [4, 5]
    assert answers[4].refusal.code == grpc.StatusCode.UNAVAILABLE.value[0]


def test_a_cancellation_reaches_the_running_call() -> None:
    cancelled: list[int] = []

    async def run() -> FakeStream:
        stream = FakeStream()

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(request.id)
                raise
            return _ok(request)

        stream.send(9)
        host = asyncio.ensure_future(_host(stream, handle).serve())
        await asyncio.sleep(0.02)
        stream.send(cancels=(9,))
        await asyncio.sleep(0.02)
        stream.incoming.put_nowait(None)
        await asyncio.wait_for(host, 5)
        return stream

    stream = asyncio.run(run())
    assert cancelled == [9]
    assert stream.answers() == []  # the origin gave up on it: nothing to answer


def test_draining_takes_no_new_batches_and_answers_the_calls_in_flight_before_ending() -> None:
    async def run() -> tuple[FakeStream, list[int]]:
        stream = FakeStream()
        draining = asyncio.Event()
        started: list[int] = []

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            started.append(request.id)
            await asyncio.sleep(0.05)
            return _ok(request)

        stream.send(1, 2)
        host = asyncio.ensure_future(_host(stream, handle, draining=draining).serve())
        await asyncio.sleep(0.01)
        draining.set()
        await asyncio.sleep(0)
        stream.send(3)  # arrives after draining began: never started
        await asyncio.wait_for(host, 5)  # ends without the origin closing the stream
        return stream, started

    stream, started = asyncio.run(run())
    assert started == [1, 2]
    assert sorted(a.id for a in stream.answers()) == [1, 2]


def test_a_batch_that_does_not_parse_ends_the_stream_with_invalid_argument() -> None:
    async def run() -> None:
        stream = FakeStream()

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            return _ok(request)

        stream.incoming.put_nowait(b"\xff\xff\xff")
        await _host(stream, handle).serve()

    with pytest.raises(InvalidArgument, match="does not parse"):
        asyncio.run(run())


def test_a_batch_of_too_many_items_is_refused() -> None:
    async def run() -> None:
        stream = FakeStream()

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            return _ok(request)

        stream.send(*range(1, 1000))
        await _host(stream, handle).serve()

    with pytest.raises(InvalidArgument, match="more than"):
        asyncio.run(run())


def test_a_refusal_still_being_recorded_when_the_origin_closes_is_answered_before_the_stream_ends() -> None:
    async def run() -> FakeStream:
        stream = FakeStream()

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            return _ok(request)

        async def slow_refuse(request: relay_pb2.MuxRequest, exc: GatewayError) -> relay_pb2.MuxResponse:
            await asyncio.sleep(0.05)  # the refusal's durable record takes its time
            return await _refuse(request, exc)

        stream.send(1, 1)  # the second is a duplicate id while the first is in flight
        stream.incoming.put_nowait(None)
        host = MuxHost(
            stream.read,
            stream.write,
            handle=handle,
            refuse=slow_refuse,
            max_in_flight=10,
            max_frame=8 << 20,
            draining=asyncio.Event(),
        )
        await host.serve()
        return stream

    answers = asyncio.run(run()).answers()
    assert sorted(a.HasField("refusal") for a in answers) == [False, True]


# -- an origin that stops reading its answers ---------------------------------------------------------


class UnreadStream(FakeStream):
    """A channel whose origin takes the host's first message (its greeting) and then nothing more."""

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        if self.written:
            await asyncio.Event().wait()  # never taken: the write waits, as a full connection's drain does
        self.written.append(batch)


def _big(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
    return relay_pb2.MuxResponse(id=request.id, response=relay_pb2.UnaryRelayResponse(message=bytes(1 << 20)))


def test_an_origin_that_reads_no_answers_holds_at_most_the_unsent_bytes_bound_and_no_more_batches_are_read() -> None:
    async def run() -> tuple[int, int, int]:
        stream = UnreadStream()

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            return _big(request)

        for call_id in range(1, 61):  # 60 MiB of answers asked for, one request a batch
            stream.send(call_id)
        host = _host(stream, handle, max_in_flight=1000)
        serving = asyncio.ensure_future(host.serve())
        await asyncio.sleep(0.3)
        left, queued = stream.incoming.qsize(), sum(a.ByteSize() for a in host._answers)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        return left, queued, len(host._answers)

    left, queued, answers = asyncio.run(run())
    assert left > 0, "the host read every batch while none of its answers were taken"
    # Each batch read starts one call: the reader stops once the bound is reached, one answer over at most.
    assert queued <= _MAX_UNSENT_BYTES + (2 << 20), queued
    assert answers < 60


def test_answers_not_yet_written_count_against_the_in_flight_cap_and_stop_the_reader() -> None:
    async def run() -> tuple[int, list[relay_pb2.MuxResponse]]:
        stream = UnreadStream()

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            return _ok(request)

        for call_id in range(1, 41):
            stream.send(call_id)
        host = _host(stream, handle, max_in_flight=5)
        serving = asyncio.ensure_future(host.serve())
        await asyncio.sleep(0.2)
        left, answers = stream.incoming.qsize(), list(host._answers)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        return left, answers

    left, answers = asyncio.run(run())
    assert left >= 40 - 10, "the host read on while it held the cap's worth of unwritten answers"
    assert len(answers) <= 5 + 1  # the cap, and the one batch (of one request here) read as it was reached


def test_an_origin_that_takes_nothing_for_the_stall_time_ends_the_channel_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.mux._WRITE_STALL_SECONDS", 0.2)

    async def run() -> float:
        stream = UnreadStream()

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            return _ok(request)

        stream.send(1, 2)
        started = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable, match="took no message"):
            await asyncio.wait_for(_host(stream, handle).serve(), 5)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(run()) < 2


def test_an_origin_that_reads_slowly_gets_every_answer() -> None:
    """The control: backpressure holds the reader back, it never drops or refuses what fits."""

    async def run() -> list[relay_pb2.MuxResponse]:
        stream = FakeStream()
        slow_write = stream.write

        async def write(batch: relay_pb2.MuxBatch) -> None:
            await asyncio.sleep(0.002)
            await slow_write(batch)

        async def handle(request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
            return _big(request)

        for call_id in range(1, 31):
            stream.send(call_id)
        stream.incoming.put_nowait(None)
        host = MuxHost(
            stream.read,
            write,
            handle=handle,
            refuse=_refuse,
            max_in_flight=1000,
            max_frame=8 << 20,
            draining=asyncio.Event(),
        )
        await asyncio.wait_for(host.serve(), 10)
        return stream.answers()

    answers = asyncio.run(run())
    assert sorted(a.id for a in answers) == list(range(1, 31))
    assert not any(a.HasField("refusal") for a in answers)
