"""Streaming calls on relay channels: the frames of `Relay/Stream`, with flow control per stream.

A streaming relay call over gRPC is one `Relay/Stream` RPC: the origin sends
`RelayFrame`s (envelope, messages, request seal), the host answers with
`RelayFrame`s (headers, messages, response seal), and gRPC's HTTP/2 windows
keep either side from being flooded. On a relay link (`gateway.relaylink`)
the same frames travel as `MuxStream` items of the channel's batches, each
tagged with the stream's id, and this module supplies what HTTP/2 did:

- **Flow control.** Each side may send a stream's frames while it has
  credit: a window of `WINDOW` bytes to start, and what the receiver grants
  back (`credit`) as its reader takes frames. A sender checks before each
  frame, so the last frame may overshoot. The receiver counts the same
  credit (what it granted, not what is unread): a frame that arrives when
  the sender had none left ends the channel (`InvalidArgument`), so one
  stream can make the other side buffer at most `WINDOW` bytes plus one
  frame (itself within the one message that side takes).
- **Deadline.** The host waits for credit no longer than the call's
  deadline (`gateway.relay.RelayHostDownstream`): an origin that grants
  none ends its stream DEADLINE_EXCEEDED, recorded as any deadline; the
  seal goes if there is credit for it, else the stream ends with an
  unsealed DEADLINE_EXCEEDED.
- **Size.** A frame that would make a channel message larger than the other
  side takes (`MuxBatch.max_frame`) is not sent: the host's handler gets
  `ResourceExhausted` (recorded, the stream refused), the origin's call ends
  RESOURCE_EXHAUSTED and the host's is cancelled. The channel serves on.
- **The ends.** The origin half-closes with `end`, abandons with `cancel`;
  the host ends with `end` after the response seal, or with a `refusal` (a
  status, unsealed: a refusal before the envelope verified), exactly the
  outcomes `Relay/Stream` has.

`HostStream` is the host's end, shaped as the gRPC servicer context that the
gateway's `Relay/Stream` handler reads and writes, so the same handler (peer
identity, envelope, pipeline, pump, records, seal) serves both transports.
`LinkStreamCall` is the origin's end, shaped as the grpc.aio call that
`gateway.relay.RelayUpstream` drives; failures come out as `grpc.aio.AioRpcError`
with the status gRPC would have given.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.errors import InvalidArgument, ResourceExhausted

__all__ = ["ITEM_BYTES", "WINDOW", "HostStream", "LinkStreamCall", "StreamAborted"]

log = logging.getLogger("psngw.mux")

#: Bytes a channel message spends on one stream item beyond its frame (id, tags, lengths).
ITEM_BYTES = 64

#: Bytes of frames either side may send on one stream before the other grants more.
WINDOW = 1 << 20

_NAMES = {code.value[0]: code for code in grpc.StatusCode}


class _End:
    """The other side sends nothing more on the stream."""


_END = _End()

#: What an inbox holds: a frame, the end, or why the stream failed.
_Item = bytes | _End | BaseException


class _Credit:
    """The bytes this side may still send on one stream, and a wait for more."""

    def __init__(self) -> None:
        self.allowed = WINDOW
        self._more = asyncio.Event()
        self._failed: BaseException | None = None

    def grant(self, size: int) -> None:
        self.allowed += size
        self._more.set()

    def fail(self, reason: BaseException) -> None:
        self._failed = reason
        self._more.set()

    async def take(self, size: int) -> None:
        while self.allowed <= 0 and self._failed is None:
            self._more.clear()
            await self._more.wait()
        if self._failed is not None:
            raise self._failed
        self.allowed -= size


class _Inbox:
    """Frames received on one stream, in order; what the reader takes is granted back to the sender."""

    def __init__(self, grant: Callable[[int], None]) -> None:
        self._items: collections.deque[_Item] = collections.deque()
        self._ready = asyncio.Event()
        self._grant = grant
        self._taken = 0
        #: bytes of frames received and not read yet
        self.buffered = 0
        #: the credit the other side has left, as this side granted it (its `_Credit.allowed`, or more)
        self.allowed = WINDOW

    def put_frame(self, stream_id: int, frame: bytes) -> None:
        """Queue a frame from the other side; `InvalidArgument` if it had no credit left to send it.

        The sender checks its credit before a frame, as `_Credit.take` does, and its credit is never
        more than what this side granted: so what this side buffers stays under the credit it granted
        plus that one frame.
        """
        if self.allowed <= 0:
            raise InvalidArgument(f"relay stream {stream_id} was sent past its flow-control window")
        self.allowed -= len(frame)
        self.put(frame)

    def put(self, item: _Item) -> None:
        if isinstance(item, bytes):
            self.buffered += len(item)
        self._items.append(item)
        self._ready.set()

    async def get(self) -> _Item:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, bytes):
            self.buffered -= len(item)
            self._taken += len(item)
            if self._taken >= WINDOW // 4:
                self.allowed += self._taken
                self._grant(self._taken)
                self._taken = 0
        return item


class StreamAborted(Exception):  # named for what happened, like grpc.aio.AbortError
    """The host's handler ended the stream with a status (`HostStream.abort`); nothing more to send."""


class HostStream:
    """The host's end of one streaming call on a relay channel, as a gRPC servicer context.

    The gateway's `Relay/Stream` handler calls `read`, `write`, `abort`,
    `time_remaining`, `invocation_metadata` and `auth_context` on it, as on a
    gRPC context. `send` queues one item for the channel's writer.
    """

    def __init__(
        self,
        stream_id: int,
        *,
        certificate: bytes | None,
        send: Callable[[relay_pb2.MuxStream], None],
        limit: Callable[[], int] | None = None,
    ):
        self.id = stream_id
        self._certificate = certificate
        self._send = send
        self._limit = limit
        self._credit = _Credit()
        self._inbox = _Inbox(lambda size: send(relay_pb2.MuxStream(id=stream_id, credit=size)))
        #: set once the handler aborted: later frames from the origin are dropped
        self.ended = False
        #: set once the channel is gone (`stop`)
        self.stopped = False
        #: set once a wait for credit was given up (the call's deadline): the next frame without credit ends it
        self._starved = False

    def received(self, item: relay_pb2.MuxStream) -> None:
        """Take one item from the origin; `InvalidArgument` if it overran its window."""
        if item.credit:
            self._credit.grant(item.credit)
        if self.ended:
            return
        if item.frame:
            self._inbox.put_frame(self.id, item.frame)
        if item.end:
            self._inbox.put(_END)

    def stop(self, reason: BaseException) -> None:
        """The channel is gone: a handler waiting to read or to send fails."""
        self.stopped = True
        self._inbox.put(reason)
        self._credit.fail(reason)

    # -- the servicer context the handler sees --

    async def read(self) -> Any:
        """The next frame (bytes), or `grpc.aio.EOF` once the origin's request side is done."""
        item = await self._inbox.get()
        if isinstance(item, _End):
            return grpc.aio.EOF
        if isinstance(item, BaseException):
            raise item
        return item

    async def write(self, frame: relay_pb2.RelayFrame) -> None:
        """Send one frame to the origin, within the stream's window (`ResourceExhausted` if it is too large)."""
        data = frame.SerializeToString()
        limit = None if self._limit is None else self._limit()
        if limit is not None and len(data) + ITEM_BYTES > limit:
            raise ResourceExhausted(
                f"relay stream frame of {len(data)} bytes is over the {limit} bytes the origin gateway takes"
                " in one message"
            )
        if self._starved and self._credit.allowed <= 0:
            # The origin granted nothing within the call's deadline (its record and seal are made): waiting
            # again, for the seal, would hold the stream open for ever. It ends unsealed instead.
            self.ended = True
            refusal = relay_pb2.MuxRefusal(code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message="Deadline Exceeded")
            self._send(relay_pb2.MuxStream(id=self.id, refusal=refusal))
            raise StreamAborted(f"relay stream {self.id}: the origin granted no credit within the call's deadline")
        try:
            await self._credit.take(len(data))
        except asyncio.CancelledError:
            self._starved = True  # given up waiting (`gateway.relay.RelayHostDownstream` bounds it by the deadline)
            raise
        self._send(relay_pb2.MuxStream(id=self.id, frame=data))

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str]] = ()
    ) -> None:
        """End the stream with a status (unsealed), as `context.abort` does; raises `StreamAborted`."""
        del trailing_metadata  # the request id travels in the record; a channel item has no trailers
        self.ended = True
        self._send(relay_pb2.MuxStream(id=self.id, refusal=relay_pb2.MuxRefusal(code=code.value[0], message=details)))
        raise StreamAborted(f"relay stream {self.id} ended with {code.name}")

    def time_remaining(self) -> float | None:
        """No transport deadline: the envelope stage takes the call's deadline from the signed envelope."""
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """A channel item carries no metadata."""
        return ()

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        """The origin gateway's TLS certificate (DER), where gRPC would give it as `x509_pem_cert`."""
        return {"x509_pem_cert": [self._certificate]} if self._certificate else {}


class LinkStreamCall:
    """The origin's end of one streaming call on a relay channel, as the grpc.aio call `RelayUpstream` drives.

    `send` queues one item for the channel's writer; `forget` drops the stream
    from the channel once it is over. `deadline` (monotonic seconds) bounds
    every read; past it the stream is cancelled and DEADLINE_EXCEEDED raised.
    """

    def __init__(
        self,
        stream_id: int,
        host: str,
        *,
        send: Callable[[relay_pb2.MuxStream], None],
        forget: Callable[[int], None],
        deadline: float | None,
        limit: Callable[[], Awaitable[int | None]] | None = None,
    ) -> None:
        self.id = stream_id
        self._host = host
        self._send = send
        self._limit = limit
        self._forget = forget
        self._deadline = deadline
        self._credit = _Credit()
        self._inbox = _Inbox(self._grant)
        self._over = False

    def _grant(self, size: int) -> None:
        if not self._over:  # a stream the host has ended needs no more credit
            self._send(relay_pb2.MuxStream(id=self.id, credit=size))

    def received(self, item: relay_pb2.MuxStream) -> None:
        """Take one item from the host; `InvalidArgument` if it overran its window."""
        if item.credit:
            self._credit.grant(item.credit)
        if self._over:
            return
        if item.frame:
            self._inbox.put_frame(self.id, item.frame)
        if item.HasField("refusal"):
            code = _NAMES.get(item.refusal.code, grpc.StatusCode.UNKNOWN)
            self._inbox.put(_status(code, item.refusal.message))
            self._finish()  # the host has ended: what is left is in the inbox
        elif item.end:
            self._inbox.put(_END)
            self._finish()

    def fail(self, reason: BaseException) -> None:
        """The channel broke: the stream ends UNAVAILABLE, as a broken `Relay/Stream` would."""
        error = _status(grpc.StatusCode.UNAVAILABLE, f"relay channel to {self._host} failed: {reason}")
        self._inbox.put(error)
        self._credit.fail(error)

    # -- the grpc.aio call RelayUpstream drives --

    async def write(self, frame: relay_pb2.RelayFrame) -> None:
        """Send one frame, within the stream's window (`AioRpcError` if the stream fails or ends meanwhile)."""
        if self._over:
            return  # the host has ended the stream: its outcome waits in the inbox
        data = frame.SerializeToString()
        try:
            # The host says what it takes in its first message: no longer than the call's deadline
            # (`gateway.mux` closes a channel whose host says nothing for long).
            limit = None if self._limit is None else await self._by_deadline(self._limit())
        except TimeoutError:
            self._inbox.put(_status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            self.cancel()  # read() gives the status
            return
        if limit is not None and len(data) + ITEM_BYTES > limit:
            log.warning(
                "relay stream %d to %s: a frame of %d bytes is over the %d bytes its gateway takes in one message",
                self.id, self._host, len(data), limit,
            )  # fmt: skip
            self._inbox.put(_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large for the host gateway"))
            self.cancel()  # the host's call ends too; read() gives the status
            return
        await self._credit.take(len(data))
        self._send(relay_pb2.MuxStream(id=self.id, frame=data))

    async def _by_deadline(self, wait: Awaitable[int | None]) -> int | None:
        """What `wait` gives, or `TimeoutError` at the deadline."""
        if self._deadline is None:
            return await wait
        async with asyncio.timeout_at(self._deadline):
            return await wait

    async def done_writing(self) -> None:
        """The request side is done."""
        if not self._over:
            self._send(relay_pb2.MuxStream(id=self.id, end=True))

    async def read(self) -> Any:
        """The next frame (bytes), `grpc.aio.EOF` at the host's end; `AioRpcError` for a status or a failure."""
        try:
            if self._deadline is None:
                item = await self._inbox.get()
            else:
                remaining = self._deadline - asyncio.get_running_loop().time()
                item = await asyncio.wait_for(self._inbox.get(), max(0.0, remaining))
        except TimeoutError:
            self.cancel()
            raise _status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        if isinstance(item, _End):
            self._finish()
            return grpc.aio.EOF
        if isinstance(item, BaseException):
            self._finish()
            raise item
        return item

    def cancel(self) -> None:
        """Abandon the stream: the host cancels its call."""
        if not self._over:
            self._send(relay_pb2.MuxStream(id=self.id, cancel=True))
        self._finish()

    def _finish(self) -> None:
        if not self._over:
            self._over = True
            # A writer waiting for credit the host will no longer grant stops (its outcome is in the inbox).
            self._credit.fail(_status(grpc.StatusCode.CANCELLED, f"relay stream {self.id} is over"))
            self._forget(self.id)


def _status(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
