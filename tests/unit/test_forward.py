"""`pump_stream`: messages both ways, headers before the first message, failures end the call."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.errors import InvalidArgument
from gateway.forward import Metadata, Reply, pump_stream

HEADERS: Metadata = (("x-app", "1"),)


class _Up:
    """An upstream answering `responses`; a read waits for `gate` (when set) before each answer."""

    def __init__(self, responses: list[bytes], *, gate: asyncio.Event | None = None) -> None:
        self.responses = list(responses)
        self.gate = gate
        self.writes: list[bytes] = []
        self.closed = False
        self.cancelled = False
        self.reads = 0

    async def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def done_writing(self) -> None:
        self.closed = True

    async def initial_metadata(self) -> Metadata:
        return HEADERS

    async def read(self) -> bytes | None:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        return self.responses.pop(0) if self.responses else None

    async def finish(self) -> Reply:
        return Reply(code=grpc.StatusCode.OK)

    def cancel(self) -> None:
        self.cancelled = True


class _Down:
    """A caller sending `requests` (an exception in the list is raised at that read)."""

    def __init__(
        self,
        requests: list[bytes | BaseException],
        *,
        hold: asyncio.Event | None = None,
        failure: BaseException | None = None,
    ) -> None:
        self.requests = list(requests)
        self.hold = hold  # once the requests are used up, the next read waits for this ...
        self.failure = failure  # ... then raises this (or returns None: the caller is done)
        self.events: list[tuple[str, object]] = []
        self.write_gate: asyncio.Event | None = None

    async def read(self) -> bytes | None:
        await asyncio.sleep(0)
        if not self.requests:
            if self.hold is not None:
                await self.hold.wait()
            if self.failure is not None:
                raise self.failure
            return None
        item = self.requests.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def send_initial_metadata(self, md: Metadata) -> None:
        self.events.append(("headers", md))

    async def write(self, data: bytes) -> None:
        self.events.append(("message", data))
        if self.write_gate is not None:
            await self.write_gate.wait()


def test_a_server_stream_passes_every_message_in_order_headers_first() -> None:
    responses = [bytes([i]) * 100 for i in range(16)]
    up, down = _Up(responses), _Down([b"request"])
    reply = asyncio.run(pump_stream(down, up))
    assert reply.ok
    assert up.writes == [b"request"] and up.closed
    assert down.events == [("headers", HEADERS)] + [("message", r) for r in responses]
    assert not up.cancelled


def test_a_client_stream_sends_every_request_then_reads_the_answer() -> None:
    requests: list[bytes | BaseException] = [b"a", b"b", b"c"]
    up, down = _Up([b"answer"]), _Down(requests)
    reply = asyncio.run(pump_stream(down, up))
    assert reply.ok
    assert up.writes == [b"a", b"b", b"c"] and up.closed
    assert down.events == [("headers", HEADERS), ("message", b"answer")]


def test_headers_are_sent_when_an_ok_call_has_no_message() -> None:
    up, down = _Up([]), _Down([b"request"])
    assert asyncio.run(pump_stream(down, up)).ok
    assert down.events == [("headers", HEADERS)]


def test_a_request_side_failure_while_a_read_waits_ends_the_call() -> None:
    async def run() -> None:
        up = _Up([b"never"], gate=asyncio.Event())  # the upstream never answers
        down = _Down([b"one", InvalidArgument("bad seal")])
        with pytest.raises(InvalidArgument, match="bad seal"):
            await pump_stream(down, up)
        assert up.cancelled

    asyncio.run(run())


def test_a_request_side_failure_while_the_pump_writes_is_raised_before_the_next_read() -> None:
    # The request side fails while the pump is busy writing a response to the caller, not waiting on a
    # read: the pump must raise at its next turn, before reading on.
    async def run() -> None:
        up = _Up([b"r1", b"r2", b"r3"])
        fail = asyncio.Event()
        down = _Down([b"one"], hold=fail, failure=InvalidArgument("frame out of sequence"))
        down.write_gate = asyncio.Event()
        pump = asyncio.create_task(pump_stream(down, up))
        while ("message", b"r1") not in down.events:
            await asyncio.sleep(0)
        fail.set()  # the pump is inside write(r1); the caller now sends garbage
        for _ in range(5):
            await asyncio.sleep(0)
        reads = up.reads
        down.write_gate.set()
        with pytest.raises(InvalidArgument, match="out of sequence"):
            await pump
        assert up.reads == reads  # nothing read after the failure
        assert up.cancelled
        assert ("message", b"r2") not in down.events

    asyncio.run(run())


def test_the_upstream_ending_first_stops_the_request_side() -> None:
    async def run() -> None:
        up = _Up([b"r1"])
        hold = asyncio.Event()  # the caller would send more, but never does
        down = _Down([b"one"], hold=hold)
        reply = await pump_stream(down, up)
        assert reply.ok
        assert down.events == [("headers", HEADERS), ("message", b"r1")]
        assert not up.cancelled

    asyncio.run(run())
