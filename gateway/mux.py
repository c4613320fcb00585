"""Relay channels: many unary relay calls over long-lived streams between two gateways.

A unary call relayed as its own RPC (`Relay/Unary`) costs each gateway a whole
gRPC call: HTTP/2 stream set-up, headers, trailers, and grpc.aio's per-call
machinery, about 0.1 to 0.25 ms of CPU at each end. On an open stream the same
request and response are two messages, and several calls that are ready at
once travel in one message (a `MuxBatch`), which costs a few microseconds each.

`Relay/Mux` is that stream. The origin gateway keeps one open per peer
channel (`[limits] peer_channels`, so calls still spread over connections and
over a peer's worker processes) and sends `MuxRequest`s, each carrying exactly
what `Relay/Unary` carries: the signed envelope and the request message. The
host runs every request through the same peer pipeline as a `Relay/Unary`
call (peer identity per request, the envelope, route, deadline from the
envelope, rate limit, policy, the durable record) and answers each by id with
the same sealed `UnaryRelayResponse`, or a `MuxRefusal` when the request was
refused before its envelope verified. Nothing about a call's security depends
on the stream: each request stands alone, signed, checked and recorded.

A channel travels on a `MuxPipe`: a `Relay/Mux` gRPC stream (`GrpcPipe`), or
a relay link (`gateway.relaylink.TlsLink`) to a force with a `relay_address`.
On a link the channel also carries streaming calls (`MuxBatch.streams`, see
`gateway.muxstream`), each run by the gateway's `Relay/Stream` handler.

What each end takes: each states, in its first message (`MuxBatch.max_frame`),
the largest message it takes, and the origin sends no call before it has the
host's. Each end packs its batches under the other's figure; a request over it
is refused at the origin (`ResourceExhausted`, never sent) and an answer over
it is replaced by RESOURCE_EXHAUSTED, so one large message never ends a
channel that other calls share.

Origin side: `MuxClient`. Host side: `MuxHost`, which reads batches, starts a
task per request or stream (the gateway's handlers), sends answers in batches
and honours cancellations. Failures: a stream that breaks fails its calls in flight with
`Unavailable` (their hosts may or may not have answered, exactly as with a
broken RPC); a host without `Relay/Mux` (UNIMPLEMENTED) makes the client fall
back to `Relay/Unary` for that host.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.clock import Clock
from gateway.errors import DeadlineExceeded, GatewayError, InvalidArgument, ResourceExhausted, Unavailable
from gateway.muxstream import ITEM_BYTES, HostStream, LinkStreamCall, StreamAborted
from gateway.relaylink import HANDSHAKE_SECONDS, LinkTarget, TlsLink
from gateway.tls import ChannelPool

__all__ = ["MUX_METHOD", "BatchHold", "MuxClient", "MuxHost", "MuxUnsupported"]

log = logging.getLogger("psngw.mux")

#: The full method name of the relay channel RPC.
MUX_METHOD = "/psn.gateway.v1.Relay/Mux"

#: Requests or answers packed into one message at most, and their bytes (under any peer's message limit).
_MAX_BATCH_ITEMS = 128
_MAX_BATCH_BYTES = 1 << 20

#: Bytes a message spends on each item and each cancelled id beyond the item itself (tags, lengths).
_ITEM_BYTES = 16
_CANCEL_BYTES = 11

#: The slot of the link that carries a host's large unary requests (the others are numbered from 0).
_BULK = -1


@dataclass(frozen=True)
class BatchHold:
    """How an origin packs unary calls on a busy relay channel (``[limits] relay_batch_*``).

    While at least `siblings` calls wait for answers on a channel, a new request is not sent straight
    out: the channel's writer holds it up to `delay` seconds for company, or until `siblings`
    requests are queued, and sends them as one message.
    """

    delay: float
    siblings: int


#: The smallest message limit a channel's other side may state (a gateway's own is far above it).
_MIN_FRAME = 1024

#: Ended stream ids a host remembers per channel, to drop the frames that were already on their way.
_ENDED_REMEMBERED = 4096

#: Seconds an origin waits for a host to accept a new `Relay/Mux` stream before writing to it regardless.
_ACCEPT_WAIT = 1.0

#: Seconds an origin gives a new channel to connect and its host to say what it takes (its first message).
_GREETING_SECONDS = 2 * HANDSHAKE_SECONDS

#: Bytes of answers a host holds for an origin that does not read them, past which it reads no more requests.
_MAX_UNSENT_BYTES = 8 << 20

#: Seconds either end waits for one message to be taken by the other before it ends the channel.
_WRITE_STALL_SECONDS = 30.0


class MuxUnsupported(Unavailable):
    """The host gateway does not serve `Relay/Mux`: the call was not delivered, and may go by `Relay/Unary`."""


class _NotTrustedNow(Unavailable):
    """An open channel's host is no longer trusted as it was at connect: the call was not sent on it."""


class MuxPipe(Protocol):
    """What a relay channel travels on: `Relay/Mux` on a gRPC channel, or a relay link (`gateway.relaylink`)."""

    async def read(self) -> bytes | None:
        """The next batch from the host, serialized; None when the host closed the channel."""

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        """Send one batch to the host."""

    def send_now(self, batch: relay_pb2.MuxBatch) -> bool:
        """Send one batch at once if that cannot block; False if it must go by `write`."""

    def abort(self) -> None:
        """Close the channel now."""

    def recheck(self) -> None:
        """Raise `Unavailable` if the channel must not carry another call (its host is no longer trusted)."""

    async def failure(self, exc: BaseException) -> BaseException:
        """Why the channel failed, given what a read or write raised (the channel's own status if it has one)."""


class GrpcPipe:
    """A `Relay/Mux` stream on one gRPC channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        # Answers arrive as bytes and are parsed by the stream (see `RelayClient.unary`: grpc's own
        # deserialiser would turn garbage into None plus a log line).
        multi: grpc.aio.StreamStreamMultiCallable[relay_pb2.MuxBatch, bytes]
        multi = channel.stream_stream(MUX_METHOD, request_serializer=relay_pb2.MuxBatch.SerializeToString)
        self._rpc = multi()
        self._accepted = False

    async def read(self) -> bytes | None:
        """The next batch, None at the end of the stream."""
        raw: Any = await self._rpc.read()
        return None if raw is grpc.aio.EOF else bytes(raw)

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        """Send one batch; the first waits for the host to accept the RPC (its response headers)."""
        if not self._accepted:
            # A host that refuses the RPC (UNIMPLEMENTED) answers at once; a write racing that answer
            # fails with INTERNAL, and the status with it, so the refusal would be lost. Hosts send their
            # headers as they accept the stream; one that does not is written to after a second anyway.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rpc.initial_metadata(), _ACCEPT_WAIT)
            self._accepted = True
            if self._rpc.done():
                code = await self._rpc.code()
                if code is grpc.StatusCode.UNIMPLEMENTED:
                    raise MuxUnsupported(f"relay channel refused: UNIMPLEMENTED: {await self._rpc.details()}")
        await self._rpc.write(batch)

    def send_now(self, _batch: relay_pb2.MuxBatch) -> bool:
        """Never: a grpc.aio write is always awaited."""
        return False

    def abort(self) -> None:
        """Cancel the RPC."""
        self._rpc.cancel()

    def recheck(self) -> None:
        """Nothing to check: grpcio checked the host's certificate at the handshake and exposes it no further."""

    async def failure(self, exc: BaseException) -> BaseException:
        """What a read or write raised, as a refusal of the RPC if the host did not serve it."""
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            return MuxUnsupported(f"relay channel refused: UNIMPLEMENTED: {exc.details()}")
        return exc


class _ClientStream:
    """One open relay channel to one host, and the calls waiting on it."""

    def __init__(
        self,
        pipe: MuxPipe,
        host: str,
        on_closed: Callable[[_ClientStream], None],
        *,
        max_frame: int,
        hold: BatchHold | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        self.host = host
        self._hold = hold
        self._on_sent = on_sent
        self._on_closed = on_closed
        self.pipe = pipe
        self._max_frame = max_frame
        #: the largest message the host takes on this channel (its first message says); no call goes before it
        self.peer_max: int | None = None
        self._spoke = asyncio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[relay_pb2.MuxResponse]] = {}
        self._outbox: list[relay_pb2.MuxRequest] = []
        self._cancels: list[int] = []
        self._calls: dict[int, LinkStreamCall] = {}
        self._stream_out: list[relay_pb2.MuxStream] = []
        self._wake = asyncio.Event()
        #: set when a held batch should go now: it is full, or stream frames or cancellations wait
        self._full = asyncio.Event()
        self._retiring = False
        self.closed: BaseException | None = None
        self._tasks = (
            asyncio.get_running_loop().create_task(self._write_loop()),
            asyncio.get_running_loop().create_task(self._read_loop()),
        )

    def check(self) -> None:
        """Check the channel before a call on it.

        `Unavailable` if it is closed; `_NotTrustedNow` (closing it) if its host is no longer trusted as it was
        at connect.
        """
        if self.closed is not None:
            raise _as_unavailable(self.closed, self.host)
        try:
            self.pipe.recheck()
        except Unavailable as exc:
            self._close(exc)
            raise _NotTrustedNow(exc.reason) from exc

    async def call(self, request: relay_pb2.UnaryRelayRequest, timeout: float | None) -> relay_pb2.MuxResponse:
        """Send one request; its answer, `Unavailable` if the stream breaks, `DeadlineExceeded` at `timeout`."""
        if self.closed is not None:
            raise _as_unavailable(self.closed, self.host)
        call_id = next(self._ids)
        item = relay_pb2.MuxRequest(id=call_id, request=request)
        if self.peer_max is not None:
            _check_fits(item, self.peer_max, f"the gateway of {self.host}")
        future: asyncio.Future[relay_pb2.MuxResponse] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        # Straight out when nothing waits before it and the pipe can take it now (a relay link whose
        # buffer has room): one loop turn less for the call (about 0.1 ms unloaded); else by the writer,
        # which holds the batch open for company while the channel is busy (`BatchHold`).
        if (
            self._outbox
            or self.peer_max is None
            or self._holding()
            or not self.pipe.send_now(relay_pb2.MuxBatch(requests=[item]))
        ):
            self._outbox.append(item)
            self._wake.set()
            if self._hold is not None and len(self._outbox) >= self._hold.siblings:
                self._full.set()
        elif self._on_sent is not None:
            self._on_sent(1)
        try:
            if timeout is None:
                return await future
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            self._give_up(call_id)
            raise DeadlineExceeded(f"relay to {self.host}: no answer within the call's deadline") from exc
        except asyncio.CancelledError:
            self._give_up(call_id)
            raise

    def open_stream(self, timeout: float | None) -> LinkStreamCall:
        """Start a streaming call on this channel (its frames go by `LinkStreamCall.write`)."""
        if self.closed is not None:
            raise _as_unavailable(self.closed, self.host)
        stream_id = next(self._ids)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        call = LinkStreamCall(
            stream_id,
            self.host,
            send=self._send_stream,
            forget=self._forget_stream,
            deadline=deadline,
            limit=self._peer_limit,
        )
        self._calls[stream_id] = call
        return call

    def _holding(self) -> bool:
        """Whether requests wait for company: enough calls are waiting on this channel that more will come."""
        return self._hold is not None and len(self._pending) >= self._hold.siblings

    def _send_stream(self, item: relay_pb2.MuxStream) -> None:
        self._stream_out.append(item)
        self._wake.set()
        self._full.set()

    async def _peer_limit(self) -> int | None:
        """What the host takes in one message, once it has said (None: the channel closed first)."""
        if self.peer_max is None:
            await self._spoke.wait()
        return self.peer_max

    def _forget_stream(self, stream_id: int) -> None:
        self._calls.pop(stream_id, None)
        self._close_if_retired()

    def _give_up(self, call_id: int) -> None:
        future = self._pending.pop(call_id, None)
        if future is None or self.closed is not None:
            return
        future.cancel()
        unsent = [i for i, request in enumerate(self._outbox) if request.id == call_id]
        if unsent:  # never sent (the host is not reading): drop it, nothing to cancel there
            del self._outbox[unsent[0]]
        else:
            self._cancels.append(call_id)
            self._wake.set()
            self._full.set()
        self._close_if_retired()

    def retire(self) -> None:
        """Take no new calls (the caller forgets this stream); close once the calls in flight are answered."""
        self._retiring = True
        self._close_if_retired()

    def _close_if_retired(self) -> None:
        if self._retiring and not self._pending and not self._calls and self.closed is None:
            self._close(Unavailable(f"relay channel to {self.host} retired"))

    async def _write_loop(self) -> None:
        try:
            await self.pipe.write(relay_pb2.MuxBatch(max_frame=self._max_frame))
            while True:
                await self._wake.wait()
                if self.peer_max is not None:
                    await self._gather()
                self._wake.clear()
                if self.peer_max is None:
                    continue  # calls wait for the host's first message
                budget = min(self.peer_max, _MAX_BATCH_BYTES)
                while self._outbox or self._cancels or self._stream_out:
                    batch = relay_pb2.MuxBatch(cancels=self._cancels[:_MAX_BATCH_ITEMS])
                    del self._cancels[:_MAX_BATCH_ITEMS]
                    size = _take_stream_items(self._stream_out, batch, budget) + _CANCEL_BYTES * len(batch.cancels)
                    alone = not batch.streams and not batch.cancels
                    for request in _take_items(self._outbox, budget - size, alone=alone):
                        try:
                            _check_fits(request, self.peer_max, f"the gateway of {self.host}")
                        except ResourceExhausted as exc:  # queued before the host said its limit
                            future = self._pending.pop(request.id, None)
                            if future is not None and not future.done():
                                future.set_exception(exc)
                            continue
                        batch.requests.append(request)
                    if batch.ByteSize():
                        # While this write waits for flow control, new calls queue up for the next batch.
                        await self._write_within(batch)
                        if batch.requests and self._on_sent is not None:
                            self._on_sent(len(batch.requests))
        except asyncio.CancelledError:
            self._cancelled()
            raise
        except Exception as exc:  # noqa: BLE001  # the stream is unusable: every waiting call must hear so
            self._close(await self.pipe.failure(exc))

    async def _write_within(self, batch: relay_pb2.MuxBatch) -> None:
        """Write one message; `Unavailable` if the host takes none of it for `_WRITE_STALL_SECONDS`.

        The channel then ends, its calls with it: a host that stopped reading, or a path that went
        silent, must not hold the channel and every call queued on it for ever (the next call opens
        a new one).
        """
        if self.pipe.send_now(batch):
            return  # the transport took it at once: no write to watch (and no timer a message)
        try:
            async with asyncio.timeout(_WRITE_STALL_SECONDS):
                await self.pipe.write(batch)
        except TimeoutError:
            raise Unavailable(
                f"relay channel to {self.host}: the host took no message for {_WRITE_STALL_SECONDS:g} s"
            ) from None

    async def _gather(self) -> None:
        """Hold a batch of requests open for company while the channel is busy (`BatchHold`).

        Only requests wait: stream frames and cancellations, queued or arriving, end the wait, and so
        does a full batch. Each message then carries several calls, and the host reads, wakes for and
        answers them together: fewer messages, TLS records and wake-ups at both ends.
        """
        hold = self._hold
        if hold is None or not self._outbox or self._stream_out or self._cancels or not self._holding():
            return
        if len(self._outbox) >= hold.siblings:
            return
        self._full.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(hold.delay):
                await self._full.wait()

    async def _next_batch(self, greet_by: float) -> bytes | None:
        """The host's next message; `Unavailable` if its first has not come by `greet_by` (loop time)."""
        if self.peer_max is not None:
            return await self.pipe.read()
        # No call goes before the host's first message: a host that never sends it must not hold them
        # (nor a breaker's probe) for longer than a connect and a handshake.
        try:
            async with asyncio.timeout_at(greet_by):
                return await self.pipe.read()
        except TimeoutError:
            raise Unavailable(
                f"relay channel to {self.host}: the host said nothing for {_GREETING_SECONDS:g} s"
            ) from None

    async def _read_loop(self) -> None:
        greet_by = asyncio.get_running_loop().time() + _GREETING_SECONDS
        try:
            while True:
                raw = await self._next_batch(greet_by)
                if raw is None:
                    self._close(Unavailable(f"relay channel to {self.host} closed by the host"))
                    return
                try:
                    batch = relay_pb2.MuxBatch.FromString(raw)
                except DecodeError as exc:
                    self._close(Unavailable(f"relay channel to {self.host} sent a batch that does not parse: {exc}"))
                    return
                if batch.max_frame:
                    if batch.max_frame < _MIN_FRAME:
                        self._close(Unavailable(f"relay channel to {self.host}: it takes {batch.max_frame} bytes"))
                        return
                    self.peer_max = batch.max_frame
                    self._spoke.set()
                    self._wake.set()
                for answer in batch.responses:
                    future = self._pending.pop(answer.id, None)
                    if future is not None and not future.done():
                        future.set_result(answer)
                for item in batch.streams:
                    call = self._calls.get(item.id)
                    if call is not None:
                        call.received(item)
                self._close_if_retired()
                if self.closed is not None:
                    return
        except asyncio.CancelledError:
            self._cancelled()
            raise
        except Exception as exc:  # noqa: BLE001  # the stream is unusable: every waiting call must hear so
            self._close(await self.pipe.failure(exc))

    def _cancelled(self) -> None:
        # grpc.aio raises CancelledError from read() and write() once the call is cancelled, which closing
        # its channel does (a retired channel after a reload): the stream is then dead, not just this task.
        if self.closed is None:
            self._close(Unavailable(f"relay channel to {self.host} was cancelled (its channel closed)"))

    def _close(self, reason: BaseException) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        error = _as_unavailable(reason, self.host)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._outbox.clear()
        for call in list(self._calls.values()):
            call.fail(reason)
        self._calls.clear()
        self._stream_out.clear()
        self._spoke.set()
        self.pipe.abort()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._on_closed(self)

    async def close(self) -> None:
        """Close the stream now; calls waiting on it fail with `Unavailable`."""
        self._close(Unavailable(f"relay channel to {self.host} closed by this gateway"))
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _as_unavailable(reason: BaseException, host: str) -> Unavailable:
    if isinstance(reason, Unavailable):
        return reason
    if isinstance(reason, grpc.aio.AioRpcError):
        text = f"relay channel to {host} failed: {reason.code().name}: {reason.details()}"
        if reason.code() is grpc.StatusCode.UNIMPLEMENTED:
            return MuxUnsupported(text)
        return Unavailable(text)
    return Unavailable(f"relay channel to {host} failed: {reason!r}")


class MuxClient:
    """The origin side: calls to each host force over open relay channels, one per peer channel.

    A host with a relay link target (`set_links`: the directory gives its
    `relay_address`) is reached over `peer_channels` TLS relay links; any other
    host over `Relay/Mux` streams, one per gRPC peer channel. A host whose
    gateway answers UNIMPLEMENTED to `Relay/Mux` is remembered for
    `fallback_seconds`: `supports(host)` is False meanwhile, and the relay
    uses `Relay/Unary`.
    """

    def __init__(
        self,
        peers: ChannelPool,
        *,
        clock: Clock,
        links: int = 1,
        fallback_seconds: float = 60.0,
        hold: BatchHold | None = None,
    ) -> None:
        self._peers = peers
        self._hold = hold
        #: told the number of unary requests in each message sent on a relay channel (metrics)
        self.on_sent: Callable[[int], None] | None = None
        self._clock = clock
        self._fallback = fallback_seconds
        self._links = links
        self._streams: dict[tuple[str, int], _ClientStream] = {}
        self._unsupported: dict[str, float] = {}
        self._targets: dict[str, LinkTarget] = {}
        self._turn: dict[str, itertools.cycle[int]] = {}
        self._check: Callable[[str, bytes], None] = _refuse_all
        self._max_frame = 0

    def set_links(self, targets: dict[str, LinkTarget], *, check: Callable[[str, bytes], None], max_frame: int) -> None:
        """Reach these hosts over relay links from now on; links whose target changed are retired.

        `check(host, der)` raises if `der` is not a certificate to believe for `host`'s gateway.
        """
        self._check, self._max_frame = check, max_frame
        for host in set(self._targets) | set(targets):
            if self._targets.get(host) != targets.get(host):
                self._retire(host)
        self._targets = dict(targets)

    def _sent(self, requests: int) -> None:
        if self.on_sent is not None:
            self.on_sent(requests)

    def transport(self, host: str) -> str:
        """``link``, ``grpc`` or ``unary-rpc``: how calls to `host` travel now."""
        if host in self._targets:
            return "link"
        return "grpc" if self.supports(host) else "unary-rpc"

    def supports(self, host: str) -> bool:
        """Whether calls to `host` go over a relay channel now."""
        if host in self._targets:
            return True
        until = self._unsupported.get(host)
        if until is None:
            return True
        if self._clock.monotonic() >= until:
            del self._unsupported[host]
            return True
        return False

    def _stream(self, host: str, *, bulk: bool = False) -> _ClientStream:
        target = self._targets.get(host)
        if target is not None:
            turn = self._turn.get(host)
            if turn is None:
                turn = self._turn[host] = itertools.cycle(range(self._links))
            key = (host, _BULK if bulk else next(turn))
        else:
            channel = self._peers.channel(host)
            key = (host, id(channel))
        stream = self._streams.get(key)
        if stream is None or stream.closed is not None:
            pipe: MuxPipe
            if target is not None:
                pipe = TlsLink(host, target, check=partial(self._check, host), max_frame=self._max_frame)
                limit = self._max_frame
            else:
                pipe = GrpcPipe(channel)
                limit = self._peers.max_message_bytes
            stream = self._streams[key] = _ClientStream(
                pipe, host, self._forget, max_frame=limit, hold=self._hold, on_sent=self._sent
            )
        return stream

    async def call(
        self, host: str, request: relay_pb2.UnaryRelayRequest, *, timeout: float | None, bulk: bool = False
    ) -> relay_pb2.MuxResponse:
        """Relay one unary request to `host`; the host's answer (sealed response or refusal).

        A `bulk` request (a large one, to a host with relay links) goes on a link of its own, so that
        sending it holds up no small call. Raises `MuxUnsupported` (nothing was delivered), `Unavailable`,
        `DeadlineExceeded`, or `ResourceExhausted` (nothing sent: over what the host takes in one message).
        """
        try:
            return await self._trusted(host, bulk=bulk).call(request, timeout)
        except MuxUnsupported:
            self._unsupported[host] = self._clock.monotonic() + self._fallback
            log.warning("the gateway of %s does not serve Relay/Mux: relaying by Relay/Unary", host)
            raise

    def open_stream(self, host: str, *, timeout: float | None) -> LinkStreamCall:
        """Start a streaming call to `host` over a relay link (`Unavailable` if none can carry it now)."""
        return self._trusted(host).open_stream(timeout)

    def _trusted(self, host: str, *, bulk: bool = False) -> _ClientStream:
        """A channel to `host` whose host is still trusted as it was at connect (`Unavailable` if none is)."""
        for _ in range(1 if bulk else self._links):
            stream = self._stream(host, bulk=bulk)
            try:
                stream.check()
            except _NotTrustedNow:
                # That channel is closed, nothing sent on it. The host may have a new certificate (a revoked
                # one replaced): a new channel checks what it presents at connect, and fails the call if that
                # is no better.
                continue
            return stream
        stream = self._stream(host, bulk=bulk)
        stream.check()
        return stream

    def _retire(self, host: str) -> None:
        for key, stream in list(self._streams.items()):
            if key[0] == host and isinstance(stream.pipe, TlsLink):
                del self._streams[key]
                stream.retire()

    def _forget(self, stream: _ClientStream) -> None:
        for key, value in list(self._streams.items()):
            if value is stream:
                del self._streams[key]

    def streams(self, host: str | None = None) -> int:
        """Open channels (to `host`, or to every host), for health, metrics and tests."""
        return sum(1 for (h, _), s in self._streams.items() if s.closed is None and host in (None, h))

    async def close(self) -> None:
        """Close every channel."""
        streams = list(self._streams.values())
        self._streams.clear()
        await asyncio.gather(*(s.close() for s in streams))


def _refuse_all(host: str, _certificate: bytes) -> None:
    raise Unavailable(f"relay link to {host}: no trust store to check its certificate with")


#: The host's handler for one request: it returns the answer to send (it never raises a GatewayError).
MuxHandler = Callable[[relay_pb2.MuxRequest], Awaitable[relay_pb2.MuxResponse]]

#: The host's handler for one streaming call: the stream, and the problem to refuse it for (None: serve it).
#: It ends the stream by returning (the response seal sent) or through `HostStream.abort`.
StreamHandler = Callable[[HostStream, GatewayError | None], Awaitable[None]]


def _take_stream_items(items: list[relay_pb2.MuxStream], batch: relay_pb2.MuxBatch, budget: int) -> int:
    """Move stream items, in order, from `items` into `batch` (at least one, else within `budget`); their bytes."""
    take, size = 0, 0
    for item in items[:_MAX_BATCH_ITEMS]:
        size += len(item.frame) + ITEM_BYTES
        if take and size > budget:
            size -= len(item.frame) + ITEM_BYTES
            break
        take += 1
    batch.streams.extend(items[:take])
    del items[:take]
    return size


_Item = TypeVar("_Item", relay_pb2.MuxRequest, relay_pb2.MuxResponse)


def _take_items(items: list[_Item], room: int, *, alone: bool) -> list[_Item]:
    """The first of `items` while they fit in `room` bytes, taken out; at least one when `alone` (nothing else to send).

    The sender checks each taken item against the other side's limit (`_check_fits`): one that is
    over it alone is refused, never sent.
    """
    take, size = 0, 0
    for item in items[:_MAX_BATCH_ITEMS]:
        size += item.ByteSize() + _ITEM_BYTES
        if size > room and (take or not alone):
            break
        take += 1
    taken = items[:take]
    del items[:take]
    return taken


def _check_fits(item: relay_pb2.MuxRequest | relay_pb2.MuxResponse, limit: int, peer: str) -> None:
    """`ResourceExhausted` if `item` alone makes a message over `limit` bytes (what the other side takes)."""
    size = item.ByteSize() + _ITEM_BYTES
    if size > limit:
        raise ResourceExhausted(f"relay message of {size} bytes is over the {limit} bytes {peer} takes in one message")


class MuxHost:
    """The host side of one `Relay/Mux` stream: read batches, run each request, send answers in batches.

    `handle` runs one request through the gateway (it records and seals, and
    answers refusals itself). `refuse` builds the answer for a request that
    is refused before it runs (a duplicate id, too many in flight). At most
    `max_in_flight` requests and streams of this channel run or wait for their
    answers to be written at once. When `draining` is set the stream takes no
    new batches, lets its calls finish, and ends.

    Backpressure: while the origin leaves answers unread (`max_in_flight` of
    them, or `_MAX_UNSENT_BYTES`), the host reads no more batches, so an origin
    that stops reading holds at most that much at the host; a message it takes
    nothing of for `_WRITE_STALL_SECONDS` ends the channel (`Unavailable`).
    """

    def __init__(
        self,
        read: Callable[[], Awaitable[bytes | None]],
        write: Callable[[relay_pb2.MuxBatch], Awaitable[None]],
        *,
        send_now: Callable[[relay_pb2.MuxBatch], bool] | None = None,
        handle: MuxHandler,
        refuse: Callable[[relay_pb2.MuxRequest, InvalidArgument | Unavailable], Awaitable[relay_pb2.MuxResponse]],
        handle_stream: StreamHandler | None = None,
        certificate: bytes | None = None,
        max_in_flight: int,
        max_frame: int,
        draining: asyncio.Event,
    ) -> None:
        self._read = read
        self._write = write
        self._send_now = send_now
        self._handle = handle
        self._refuse = refuse
        self._handle_stream = handle_stream
        self._certificate = certificate
        self._streams: dict[int, tuple[HostStream, asyncio.Task[None]]] = {}
        self._streams_idle = asyncio.Event()
        #: ids of the streams that ended most recently (frames the origin sent before it heard are dropped)
        self._ended: dict[int, None] = {}
        self._stream_out: list[relay_pb2.MuxStream] = []
        self._max = max_in_flight
        self._draining = draining
        self._running: dict[int, asyncio.Task[None]] = {}
        self._refusing: set[asyncio.Task[None]] = set()
        self._answers: list[relay_pb2.MuxResponse] = []
        #: bytes of `_answers` (and of the batch being written)
        self._unsent = 0
        #: set whenever answers were written (or the writer is gone): a reader waiting for room looks again
        self._room = asyncio.Event()
        #: set once the writer is gone; `_failed` says why, when that must end the channel
        self._writer_gone = asyncio.Event()
        self._failed: Unavailable | None = None
        self._wake = asyncio.Event()
        self._finishing = False
        self._max_frame = max_frame
        #: the largest message the origin takes (its first message says; until then, what this side takes)
        self.peer_max = max_frame
        self._greeted = False

    async def serve(self) -> None:
        """Serve the channel until the origin closes it (or the gateway drains); then let calls and streams finish.

        `InvalidArgument` if the origin sends a batch that does not parse, too many items or a stream past
        its window; a failed read raises what it raised. Either way the channel ends at once: calls and
        streams still running are cancelled (each recorded as cancelled), since their answers would have
        nowhere to go.
        """
        writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            await self._read_loop()
            streams = [task for _, task in self._streams.values()]
            if self._running or self._refusing or streams:
                await asyncio.gather(*self._running.values(), *self._refusing, *streams, return_exceptions=True)
            self._finishing = True
            self._wake.set()
            await writer
        finally:
            for task in (*self._running.values(), *self._refusing, *(t for _, t in self._streams.values())):
                task.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _full(self) -> bool:
        """Whether the origin has left as many answers unread as this channel holds for it."""
        return len(self._answers) + len(self._refusing) >= self._max or self._unsent >= _MAX_UNSENT_BYTES

    async def _wait_for_room(self) -> None:
        """Read no more until the origin has taken enough answers (a writer that is gone ends the wait)."""
        while self._full() and not self._writer_gone.is_set():
            self._room.clear()
            await self._room.wait()

    async def _next_batch(self, writer_gone: asyncio.Future[Any]) -> bytes | None:
        if self._full():
            await self._wait_for_room()
        read = asyncio.ensure_future(self._read())
        while True:
            if writer_gone.done():
                # Nothing more can be answered: read no more (the calls running finish as the channel ends).
                read.cancel()
                if self._failed is not None:
                    raise self._failed
                return None
            if self._draining.is_set() and not self._streams:
                # Draining: a batch that arrives now is not started (its calls fail at the origin when the
                # stream ends, as on any broken relay), so that nothing new begins while the gateway stops.
                if read.done() and not read.cancelled():
                    read.exception()  # retrieved: a read that failed as the stream ended is not worth a warning
                read.cancel()
                return None
            # While draining, streaming calls already running still need their frames: read on for them.
            other = self._streams_idle if self._draining.is_set() else self._draining
            wait = asyncio.ensure_future(other.wait())
            try:
                await asyncio.wait((read, wait, writer_gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                wait.cancel()
            if read.done():
                return read.result()

    async def _read_loop(self) -> None:
        try:
            await self._read_batches()
        except BaseException as exc:
            self._stop_streams(exc)
            raise
        self._stop_streams(Unavailable("the relay channel closed"))

    def _stop_streams(self, reason: BaseException) -> None:
        # Whatever ended the reading, no more frames and no more credit will come for streams still running.
        error = reason if isinstance(reason, GatewayError) else Unavailable(f"the relay channel failed: {reason!r}")
        for stream, _ in self._streams.values():
            stream.stop(error)

    async def _read_batches(self) -> None:
        writer_gone = asyncio.ensure_future(self._writer_gone.wait())
        try:
            while True:
                raw = await self._next_batch(writer_gone)
                if raw is None:
                    return
                self._take_batch(raw)
        finally:
            writer_gone.cancel()

    def _take_batch(self, raw: bytes) -> None:
        try:
            batch = relay_pb2.MuxBatch.FromString(raw)
        except DecodeError as exc:
            raise InvalidArgument(f"relay channel batch does not parse: {exc}") from exc
        if max(len(batch.requests), len(batch.cancels), len(batch.streams)) > _MAX_BATCH_ITEMS:
            raise InvalidArgument(f"relay channel batch of more than {_MAX_BATCH_ITEMS} items")
        if batch.max_frame:
            if batch.max_frame < _MIN_FRAME:
                raise InvalidArgument(f"relay channel origin takes {batch.max_frame} bytes a message")
            self.peer_max = batch.max_frame
        for item in batch.streams:
            self._stream_item(item)
        for call_id in batch.cancels:
            task = self._running.get(call_id)
            if task is not None:
                task.cancel()
        if self._draining.is_set():
            return  # not started: see _next_batch
        for request in batch.requests:
            self._start(request)

    def _start(self, request: relay_pb2.MuxRequest) -> None:
        call_id = request.id
        problem: InvalidArgument | Unavailable | None = None
        if call_id in self._running:
            problem = InvalidArgument(f"relay channel request id {call_id} is already in flight")
        elif self._in_flight() >= self._max:
            problem = Unavailable(f"relay channel has {self._max} calls in flight already")
        if problem is not None:
            # Not tracked under its id (that may be another call's); answered after its refusal is recorded.
            task = asyncio.get_running_loop().create_task(self._answer(self._refuse(request, problem)))
            self._refusing.add(task)
            task.add_done_callback(self._refusing.discard)
            task.add_done_callback(_log_failure)
            return
        task = asyncio.get_running_loop().create_task(self._answer(self._handle(request)))
        self._running[call_id] = task
        task.add_done_callback(partial(self._finished, call_id))

    def _in_flight(self) -> int:
        """Calls and streams running, and answers not yet written: what the cap on calls in flight counts."""
        return len(self._running) + len(self._streams) + len(self._answers)

    def _finished(self, call_id: int, _task: asyncio.Task[None]) -> None:
        self._running.pop(call_id, None)

    # -- streaming calls --

    def _stream_item(self, item: relay_pb2.MuxStream) -> None:
        entry = self._streams.get(item.id)
        if entry is not None:
            stream, task = entry
            stream.received(item)
            if item.cancel:
                task.cancel()
            return
        if not item.frame or item.cancel or self._draining.is_set() or item.id in self._ended:
            # A late credit, end, cancel or frame of a stream that is over, or a new stream while draining:
            # nothing starts.
            return
        if self._handle_stream is None:
            raise InvalidArgument("this relay channel carries no streaming calls")
        problem: GatewayError | None = None
        if self._in_flight() >= self._max:
            problem = Unavailable(f"relay channel has {self._max} calls in flight already")
        stream = HostStream(item.id, certificate=self._certificate, send=self._send_stream, limit=self._origin_max)
        stream.received(item)
        task = asyncio.get_running_loop().create_task(self._run_stream(stream, problem))
        self._streams[item.id] = (stream, task)
        self._streams_idle.clear()
        task.add_done_callback(partial(self._stream_finished, item.id))

    async def _run_stream(self, stream: HostStream, problem: GatewayError | None) -> None:
        assert self._handle_stream is not None  # noqa: S101  # checked before the stream started
        try:
            await self._handle_stream(stream, problem)
        except StreamAborted:
            return  # the refusal is on its way
        except Exception as exc:  # noqa: BLE001  # a handler bug ends its own stream, not the channel
            if stream.stopped:
                log.info("relay stream %d ended with its channel: %r", stream.id, exc)
                return  # the channel is gone: nothing to tell the origin
            log.error("relay stream %d failed: %r", stream.id, exc)
            refusal = relay_pb2.MuxRefusal(code=grpc.StatusCode.UNKNOWN.value[0], message="unknown")
            self._send_stream(relay_pb2.MuxStream(id=stream.id, refusal=refusal))
            return
        self._send_stream(relay_pb2.MuxStream(id=stream.id, end=True))

    def _stream_finished(self, stream_id: int, _task: asyncio.Task[None]) -> None:
        self._streams.pop(stream_id, None)
        self._ended[stream_id] = None
        if len(self._ended) > _ENDED_REMEMBERED:
            del self._ended[next(iter(self._ended))]
        if not self._streams:
            self._streams_idle.set()

    def _send_stream(self, item: relay_pb2.MuxStream) -> None:
        self._stream_out.append(item)
        self._wake.set()

    def _origin_max(self) -> int:
        return self.peer_max

    def _fitting(self, answer: relay_pb2.MuxResponse) -> relay_pb2.MuxResponse:
        """`answer`, or RESOURCE_EXHAUSTED in its place if it is over what the origin takes in one message."""
        try:
            _check_fits(answer, self.peer_max, "the origin gateway")
        except ResourceExhausted as exc:
            # Its record is already durable (as for any answer, before it leaves); it never leaves.
            log.error("relay channel answer %d not sent: %s", answer.id, exc.reason)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            refusal = relay_pb2.MuxRefusal(code=code, message="response too large for the origin gateway")
            return relay_pb2.MuxResponse(id=answer.id, refusal=refusal)
        return answer

    async def _answer(self, answer: Awaitable[relay_pb2.MuxResponse]) -> None:
        ready = self._fitting(await answer)
        # Alone on the channel: straight out (a loop turn less). With company: by the writer, which packs
        # the answers a group commit settles together into one message.
        send_now = self._send_now if len(self._running) <= 1 and not self._answers and self._greeted else None
        if send_now is None or not send_now(relay_pb2.MuxBatch(responses=[ready])):
            self._answers.append(ready)
            self._unsent += ready.ByteSize()
            self._wake.set()

    async def _write_loop(self) -> None:
        try:
            await self._write_within(relay_pb2.MuxBatch(max_frame=self._max_frame), at_once=False)
            self._greeted = True
            while True:
                await self._wake.wait()
                # One turn of the loop first: answers becoming ready together (a group commit settles many
                # calls at once) join this message (measured: 3.5 answers a message with it, 2 without).
                await asyncio.sleep(0)
                self._wake.clear()
                if self._finishing and not self._answers and not self._stream_out:
                    return
                budget = min(self.peer_max, _MAX_BATCH_BYTES)
                while self._answers or self._stream_out:
                    batch = relay_pb2.MuxBatch()
                    size = _take_stream_items(self._stream_out, batch, budget)
                    answers = _take_items(self._answers, budget - size, alone=not batch.streams)
                    batch.responses.extend(answers)
                    await self._write_within(batch)
                    self._unsent -= sum(answer.ByteSize() for answer in answers)
                    self._room.set()
                if self._finishing:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  # the origin went away: its calls end with the stream
            log.info("relay channel closed while answering: %r", exc)
        finally:
            self._writer_gone.set()
            self._room.set()

    async def _write_within(self, batch: relay_pb2.MuxBatch, *, at_once: bool = True) -> None:
        """Write one message; `Unavailable` (the channel ends) if the origin takes none of it for a while.

        `at_once`: first offer it to `send_now` (a link with room takes it there and then, with no
        write to watch and no timer a message).
        """
        if at_once and self._send_now is not None and self._send_now(batch):
            return
        try:
            async with asyncio.timeout(_WRITE_STALL_SECONDS):
                await self._write(batch)
        except TimeoutError:
            self._failed = Unavailable(
                f"the relay channel's origin took no message for {_WRITE_STALL_SECONDS:g} s"
                f" ({len(self._answers)} answers waiting)"
            )
            raise self._failed from None


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("relay channel refusal failed: %r", task.exception())
