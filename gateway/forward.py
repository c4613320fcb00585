"""Moving a call's messages between the caller and where its data is.

Two ends meet in the gateway. The *downstream* is the caller (an application
on the local listener, or the origin gateway on the peer listener); the
*upstream* is where the data is (a backend application, or the host force's
gateway). Both are small protocols so that one pump serves every pairing:
application -> backend, application -> peer gateway, peer gateway -> backend.

Messages are raw bytes: the gateway never needs the application's protos.

Owns: the pumps, the backend upstream, and turning upstream failures into a
`Reply` (carried end to end) or a gateway error (our own failure, never shown
to the caller in detail).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import grpc

from gateway.errors import DeadlineExceeded, Unavailable
from gateway.metadata import strip_response_metadata

__all__ = [
    "BackendUpstream",
    "Downstream",
    "Metadata",
    "Reply",
    "Upstream",
    "backend_unary",
    "pump_stream",
    "reply_from_error",
]

Metadata = tuple[tuple[str, str | bytes], ...]

# Status codes that grpc core makes up itself when a connection or deadline
# fails; their details name internal addresses and must not reach a caller.
_TRANSPORT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)


@dataclass(frozen=True)
class Reply:
    """How a call ended upstream: status, message text and metadata, carried end to end."""

    code: grpc.StatusCode
    details: str = ""
    initial_metadata: Metadata = ()
    trailing_metadata: Metadata = ()
    #: the response message of a unary call (None if the call failed)
    message: bytes | None = None

    @property
    def ok(self) -> bool:
        """Whether the call succeeded."""
        return self.code is grpc.StatusCode.OK


def clean_metadata(md: Iterable[tuple[str, str | bytes]] | None, *, keep_status_details: bool = False) -> Metadata:
    """Upstream response metadata safe to pass on (see `gateway.metadata.strip_response_metadata`)."""
    return strip_response_metadata(md or (), keep_status_details=keep_status_details)


def reply_from_error(exc: grpc.aio.AioRpcError, *, what: str) -> Reply:
    """The `Reply` for an upstream error; a transport failure of ours raises instead.

    A status the upstream application chose is carried back as it is (code,
    details, trailing metadata with status details). A failure made up by
    grpc itself (cannot connect, deadline) becomes `Unavailable` or
    `DeadlineExceeded`, whose reason names `what` for the log.
    """
    code = exc.code()
    initial = exc.initial_metadata()
    if code in _TRANSPORT_CODES and not initial:
        reason = f"{what}: {code.name}: {exc.details()}"
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(reason)
        raise Unavailable(reason)
    return Reply(
        code=code,
        details=exc.details() or "",
        initial_metadata=clean_metadata(initial),
        trailing_metadata=clean_metadata(exc.trailing_metadata(), keep_status_details=True),
    )


async def backend_unary(
    channel: grpc.aio.Channel, method: str, request: bytes, *, metadata: Metadata, timeout: float | None, what: str
) -> Reply:
    """One unary call to a backend, as a `Reply`."""
    multi: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
    call = multi(request, metadata=metadata, timeout=timeout)
    try:
        message = await call
        initial = await call.initial_metadata()
        trailing = await call.trailing_metadata()
    except grpc.aio.AioRpcError as exc:
        return reply_from_error(exc, what=what)
    return Reply(
        code=grpc.StatusCode.OK,
        initial_metadata=clean_metadata(initial),
        trailing_metadata=clean_metadata(trailing, keep_status_details=True),
        message=message,
    )


class Upstream(Protocol):
    """Where a streaming call's data is."""

    async def write(self, data: bytes) -> None:
        """Send one request message."""
        ...

    async def done_writing(self) -> None:
        """No more request messages."""
        ...

    async def initial_metadata(self) -> Metadata:
        """The response headers (waits for them)."""
        ...

    async def read(self) -> bytes | None:
        """The next response message, or None at the end."""
        ...

    async def finish(self) -> Reply:
        """How the call ended (after `read` returned None)."""
        ...

    def cancel(self) -> None:
        """Abandon the call."""
        ...


class Downstream(Protocol):
    """The caller of a streaming call."""

    async def read(self) -> bytes | None:
        """The next request message, or None when the caller is done."""
        ...

    async def send_initial_metadata(self, md: Metadata) -> None:
        """Send the response headers."""
        ...

    async def write(self, data: bytes) -> None:
        """Send one response message."""
        ...


class BackendUpstream:
    """A streaming call to a backend application (any call type, as bytes)."""

    def __init__(
        self, channel: grpc.aio.Channel, method: str, *, metadata: Metadata, timeout: float | None, what: str
    ) -> None:
        multi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method)
        self._call = multi(metadata=metadata, timeout=timeout)
        self._what = what
        self._reply: Reply | None = None

    async def write(self, data: bytes) -> None:
        """Send one request message (a failed call surfaces at `read`)."""
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self._call.write(data)

    async def done_writing(self) -> None:
        """Half-close toward the backend."""
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self._call.done_writing()

    async def initial_metadata(self) -> Metadata:
        """The backend's response headers, cleaned."""
        try:
            return clean_metadata(await self._call.initial_metadata())
        except grpc.aio.AioRpcError:
            return ()

    async def read(self) -> bytes | None:
        """The next response message; None at the end (then `finish`)."""
        if self._reply is not None:
            return None
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._reply = reply_from_error(exc, what=self._what)
            return None
        if message is grpc.aio.EOF:
            self._reply = Reply(
                code=grpc.StatusCode.OK,
                details="",
                trailing_metadata=clean_metadata(await self._call.trailing_metadata(), keep_status_details=True),
            )
            return None
        assert isinstance(message, bytes)  # noqa: S101  # no deserializer: raw bytes
        return message

    async def finish(self) -> Reply:
        """How the backend ended the call."""
        while self._reply is None:
            await self.read()
        return self._reply

    def cancel(self) -> None:
        """Cancel the backend call."""
        self._call.cancel()


async def pump_stream(downstream: Downstream, upstream: Upstream) -> Reply:
    """Move a streaming call's messages both ways until the upstream ends it.

    Request messages flow caller -> upstream on a task of their own (so that
    bidirectional calls stream both ways at once). A failure on the request
    side (say, a bad seal) ends the call with that error. If anything fails,
    the upstream call is cancelled.
    """

    async def requests() -> None:
        while (data := await downstream.read()) is not None:
            await upstream.write(data)
        await upstream.done_writing()

    sender = asyncio.create_task(requests())
    try:
        headers_sent = False
        while True:
            if sender.done():
                # The request side is over (a server stream's one message, or a client stream's end):
                # read straight on, without a task and a wait per message.
                sender.result()  # raises the request side's error
                data = await upstream.read()
            else:
                read = asyncio.ensure_future(upstream.read())
                await asyncio.wait({read, sender}, return_when=asyncio.FIRST_COMPLETED)
                if sender.done() and sender.exception() is not None:
                    read.cancel()
                    sender.result()  # raises the request side's error
                data = await read
            if data is None:
                break
            if not headers_sent:
                await downstream.send_initial_metadata(await upstream.initial_metadata())
                headers_sent = True
            await downstream.write(data)
        reply = await upstream.finish()
        if sender.done():
            sender.result()
        else:
            # The upstream ended the call before the caller finished sending.
            sender.cancel()
        if not headers_sent and reply.ok:
            await downstream.send_initial_metadata(await upstream.initial_metadata())
        return reply
    except BaseException:
        upstream.cancel()
        sender.cancel()
        raise
