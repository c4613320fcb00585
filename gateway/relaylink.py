"""Relay links: relay channels carried over a plain mutual-TLS connection, without gRPC.

A relay channel (`gateway.mux`) over `Relay/Mux` pays grpc.aio's machinery for
every message: each is handed between the event loop, grpc's poller thread and
grpc core's threads at both ends (about 0.27 ms a round trip and 147 us of CPU
a message on this project's machine). The same batches over an asyncio TLS
stream cost 0.10 ms and 42 to 53 us. A relay link is that stream:

- **The connection.** TLS 1.3 only, both sides present certificates, ALPN
  `psngw-relay/1` required (a client speaking anything else is refused before
  it is read). The origin pins the host's CA (the host force's only), checks
  the gateway DNS name, and then checks the host's certificate with the trust
  store: chain, usage, SPIFFE ID and **the host force's CRL**. grpcio's channel
  credentials have no hook for that last check; here it runs at connect time
  and again before every call, so a revocation bites on an open link.
- **The frames.** Each frame is a 4-byte big-endian length and one serialized
  `MuxBatch`, exactly the messages of `Relay/Mux`. A frame over the receiver's
  limit, or one that does not parse, ends the link. `LinkConnection` cuts
  frames out of the byte stream as they arrive and wakes its reader once per
  frame.
- **The host side** (`RelayLinkListener`) accepts connections on its own port,
  `[listeners] relay`, advertised to the other forces as the directory's
  `relay_address`. After the handshake it hands the link to the gateway, which
  runs the same `MuxHost` and the same per-call pipeline as for `Relay/Mux`:
  peer identity per call, the envelope, route, deadline, rate limit, policy,
  the durable record, the sealed answer.

Streaming calls travel on the same links (`gateway.muxstream`: the frames of
`Relay/Stream`, with flow control per stream). A force without a
`relay_address` is reached by `Relay/Mux` and `Relay/Stream` (and a host
without `Relay/Mux`, by `Relay/Unary`), so forces can move to links one at a
time. Unary requests over 256 KiB go on a link of their own (`MuxClient.call`'s
`bulk`), so that a large message holds up no small call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.errors import GatewayError, InvalidArgument, Unavailable
from gateway.tls import KeyPair

__all__ = [
    "ALPN",
    "MAX_LINKS",
    "LinkConnection",
    "LinkTarget",
    "RelayLinkListener",
    "TlsLink",
    "client_context",
    "frame_of",
    "server_context",
]

log = logging.getLogger("psngw.relaylink")

#: The application protocol a relay link speaks (ALPN); both ends require it.
ALPN = "psngw-relay/1"

#: A frame's header: the length of the serialized `MuxBatch` that follows.
_HEADER = struct.Struct(">I")

#: Seconds for a TCP connect plus TLS handshake, either side.
HANDSHAKE_SECONDS = 10.0

#: Room above the message limit for a frame's envelopes, seals and ids.
FRAME_OVERHEAD = 64 * 1024

#: Bytes queued on a link past which frames wait for the connection to drain.
SEND_BUFFER = 256 * 1024

#: Frames waiting for a link's reader past which the connection stops reading until it catches up.
_QUEUED = 64


def _context(purpose: ssl.Purpose, keypair: KeyPair, roots_pem: bytes) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # pinned: no downgrade, no renegotiation
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=roots_pem.decode("ascii"))
    try:
        context.load_cert_chain(keypair.cert_path, keypair.key_path)
    except (OSError, ssl.SSLError) as exc:  # the files changed since they were checked
        raise Unavailable(f"relay link TLS material cannot be loaded: {exc}") from exc
    context.set_alpn_protocols([ALPN])
    return context


def server_context(keypair: KeyPair, client_roots_pem: bytes) -> ssl.SSLContext:
    """The listener's context: TLS 1.3, a client certificate from one of `client_roots_pem` required."""
    return _context(ssl.Purpose.CLIENT_AUTH, keypair, client_roots_pem)


def client_context(keypair: KeyPair, host_roots_pem: bytes) -> ssl.SSLContext:
    """An origin's context for one host force: TLS 1.3, that force's CA only, the host name checked."""
    context = _context(ssl.Purpose.SERVER_AUTH, keypair, host_roots_pem)
    context.check_hostname = True
    return context


def frame_of(body: bytes) -> bytes:
    """One frame on the wire: the length header, then `body`."""
    return _HEADER.pack(len(body)) + body


class LinkConnection(asyncio.Protocol):
    """One relay link's connection: whole frames in, frames out with back-pressure.

    Frames are cut out of the byte stream as data arrives and the reader is
    woken once per frame (asyncio's `StreamReader` wakes it for every TLS
    record, some 64 times for a 1 MiB batch of stream frames). At most
    `_QUEUED` frames wait for the reader; past that the connection stops
    reading until it catches up. A frame header over `max_frame` ends the
    reading with `InvalidArgument`; a connection that ends inside a frame ends
    it with `Unavailable`. `on_open` is called once the (TLS) connection is up.
    """

    def __init__(self, max_frame: int, on_open: Callable[[LinkConnection], None] | None = None) -> None:
        self._max = max_frame
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._frames: collections.deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self._ended = False
        self._error: BaseException | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; tell the owner."""
        self.transport = cast(asyncio.Transport, transport)  # a TCP (TLS) connection reads and writes
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # a frame goes out when written, not when the last one is acked
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_open is not None:
            self._on_open(self)

    def data_received(self, data: bytes) -> None:
        """Cut whole frames out of what arrived."""
        if self._ended:
            return
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if size > self._max:
                self._end(InvalidArgument(f"relay link frame of {size} bytes is over the limit of {self._max}"))
                return
            if len(buffer) < _HEADER.size + size:
                break
            self._frames.append(bytes(buffer[_HEADER.size : _HEADER.size + size]))
            del buffer[: _HEADER.size + size]
        if self._frames:
            self._readable.set()
            if len(self._frames) >= _QUEUED and self.transport is not None and not self._paused:
                self._paused = True
                self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        """The other side is done sending: a clean end only between frames."""
        inside = len(self._buffer)
        self._end(Unavailable(f"relay link closed inside a frame ({inside} bytes)") if inside else None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: readers and writers waiting are woken."""
        if exc is not None and not self._ended:
            self._end(Unavailable(f"relay link lost: {exc!r}"))
        elif self._buffer and not self._ended:
            self._end(Unavailable(f"relay link closed inside a frame ({len(self._buffer)} bytes)"))
        else:
            self._end(None)
        self._writable.set()

    def pause_writing(self) -> None:
        """The send buffer is full: `drain` waits."""
        self._writable.clear()

    def resume_writing(self) -> None:
        """The send buffer has room again."""
        self._writable.set()

    def _end(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended, self._error = True, error
        self._readable.set()

    # -- frames --

    async def read(self) -> bytes | None:
        """The next frame's body; None once the other side closed cleanly between frames."""
        while not self._frames:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return None
            self._readable.clear()
            await self._readable.wait()
        frame = self._frames.popleft()
        if self._paused and len(self._frames) < _QUEUED // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return frame

    def write(self, body: bytes) -> None:
        """Queue one frame (`drain` for back-pressure)."""
        if self.transport is None or self.transport.is_closing():
            raise Unavailable("relay link is closed")
        if len(body) > 16384:
            self.transport.writelines((_HEADER.pack(len(body)), body))  # no copy of a large body
        else:
            self.transport.write(frame_of(body))

    async def send(self, batch: relay_pb2.MuxBatch) -> None:
        """Write one batch as a frame, then wait while the send buffer is over its high-water mark."""
        self.write(batch.SerializeToString())
        await self.drain()

    async def drain(self) -> None:
        """Wait while the send buffer is over its high-water mark."""
        await self._writable.wait()
        if self.transport is None or self.transport.is_closing():
            raise Unavailable("relay link is closed")

    def send_now(self, batch: relay_pb2.MuxBatch) -> bool:
        """Queue one batch at once if the connection is open and below `SEND_BUFFER`; else False."""
        transport = self.transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size() >= SEND_BUFFER:
            return False
        transport.write(frame_of(batch.SerializeToString()))
        return True

    def abort(self) -> None:
        """Close the connection now."""
        if self.transport is not None:
            self.transport.abort()


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into host and port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class LinkTarget:
    """Where and how to reach one host force's relay listener."""

    address: str
    server_name: str
    context: ssl.SSLContext


class TlsLink:
    """The origin's end of one relay link: connect, check the host, then frames in and out.

    `check(der)` is the trust store's verdict on the host's certificate (it
    raises a `GatewayError` if the certificate is not to be believed); it runs
    after the handshake and again from `recheck` before every call.
    """

    def __init__(self, host: str, target: LinkTarget, *, check: Callable[[bytes], None], max_frame: int) -> None:
        self.host = host
        self._target = target
        self._check = check
        self._max = max_frame
        self._connection: LinkConnection | None = None
        self._certificate = b""
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._opening = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            name, port = split_address(self._target.address)
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: LinkConnection(self._max),
                    name,
                    port,
                    ssl=self._target.context,
                    server_hostname=self._target.server_name,
                    ssl_handshake_timeout=HANDSHAKE_SECONDS,
                ),
                HANDSHAKE_SECONDS,
            )
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            self._opened.set_exception(Unavailable(f"relay link to {self.host} cannot connect: {exc!r}"))
            return
        self._connection = connection
        transport = connection.transport
        ssl_object: ssl.SSLObject | None = None if transport is None else transport.get_extra_info("ssl_object")
        try:
            if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
                raise Unavailable(f"relay link to {self.host}: the listener does not speak {ALPN}")
            self._certificate = ssl_object.getpeercert(binary_form=True) or b""
            if not self._certificate:
                raise Unavailable(f"relay link to {self.host}: the listener presented no certificate")
            self.recheck()
        except Unavailable as exc:
            connection.abort()
            self._opened.set_exception(exc)
            return
        self._opened.set_result(None)

    def recheck(self) -> None:
        """Check the host's certificate again (revocation, expiry, a changed trust store); raise if refused.

        A link still connecting is checked when its handshake ends.
        """
        if not self._certificate:
            return
        try:
            self._check(self._certificate)
        except GatewayError as exc:
            raise Unavailable(
                f"relay link to {self.host}: the host's TLS certificate is refused: {exc.reason}"
            ) from exc

    def send_now(self, batch: relay_pb2.MuxBatch) -> bool:
        """Write the frame now if the link is open and its send buffer has room."""
        return self.ready and self._connection is not None and self._connection.send_now(batch)

    async def failure(self, exc: BaseException) -> BaseException:
        """What a read or write raised is the reason (a connection has no status of its own)."""
        return exc

    @property
    def ready(self) -> bool:
        """Connected and checked."""
        return self._opened.done() and not self._opened.cancelled() and self._opened.exception() is None

    async def read(self) -> bytes | None:
        """The next batch from the host (bytes), None at its clean close."""
        await asyncio.shield(self._opened)
        assert self._connection is not None  # noqa: S101  # set before _opened
        return await self._connection.read()

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        """Send one batch to the host."""
        await asyncio.shield(self._opened)
        assert self._connection is not None  # noqa: S101  # set before _opened
        await self._connection.send(batch)

    def abort(self) -> None:
        """Close the connection now."""
        self._opening.cancel()
        if not self._opened.done():
            self._opened.set_exception(Unavailable(f"relay link to {self.host} closed"))
        self._opened.exception()  # retrieved: a link that never opened is reported by its calls, not by asyncio
        if self._connection is not None:
            self._connection.abort()


#: the most links a relay listener serves at once (each peer force may hold half: `gateway.ratelimit.PlaceShares`)
MAX_LINKS = 256

#: The gateway's handler for one accepted link: the peer's certificate (DER) and the connection.
LinkHandler = Callable[[bytes, LinkConnection], Awaitable[None]]


class RelayLinkListener:
    """The host's relay listener: accept, handshake with the newest material, hand each link to the gateway.

    Connections are accepted here (nothing is read from them) and then
    handshaken with `context()` as it is at that moment, so a rotated
    certificate or a changed set of trusted CAs applies from the next
    connection on. At most `max_handshakes` handshakes run at once, at most
    `max_handshakes_per_address` of them from one address, and at most
    `max_links` links are served; a connection over any of these is closed the
    moment it is accepted. So clients that connect and never finish a handshake
    hold at most `max_handshakes` sockets, each for at most `HANDSHAKE_SECONDS`,
    and one address cannot take every place: the other forces' gateways still
    get through.
    """

    def __init__(
        self,
        address: str,
        *,
        context: Callable[[], ssl.SSLContext],
        handle: LinkHandler,
        reuse_port: bool,
        max_frame: int,
        max_links: int = MAX_LINKS,
        max_handshakes: int = 64,
        max_handshakes_per_address: int = 16,
    ) -> None:
        self._address = address
        self._context = context
        self._handle = handle
        self._reuse_port = reuse_port
        self._max_frame = max_frame
        self._max = max_links
        self._max_handshakes = max_handshakes
        self._max_per_address = max_handshakes_per_address
        #: handshakes under way, by the client's address
        self._from: collections.Counter[str] = collections.Counter()
        self._socket: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._last: ssl.SSLContext | None = None

    async def start(self) -> int:
        """Bind and listen; the bound port."""
        host, port = split_address(self._address)
        self._last = self._context()  # material that cannot be loaded fails the start, not the first handshake
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.create_server((host, port), family=family, backlog=512, reuse_port=self._reuse_port)
        listening.setblocking(False)
        self._socket = listening
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_loop(listening))
        return int(listening.getsockname()[1])

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listening)
            except OSError as exc:  # out of descriptors, or the socket closed under us: try again shortly
                log.warning("relay listener: accept failed: %r", exc)
                await asyncio.sleep(0.1)
                continue
            address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
            refusal = None
            if len(self._handshakes) >= self._max_handshakes:
                refusal = f"{self._max_handshakes} handshakes under way already"
            elif self._from[address] >= self._max_per_address:
                refusal = f"{self._max_per_address} handshakes under way from {address} already"
            elif len(self._links) + len(self._handshakes) >= self._max:
                refusal = f"{self._max} links open already"
            if refusal is not None:
                log.warning("relay listener: %s, refusing %s", refusal, peer)
                conn.close()
                continue
            self._from[address] += 1
            task = loop.create_task(self._handshake(conn, peer))
            self._handshakes.add(task)
            task.add_done_callback(partial(self._handshake_done, address))

    def _handshake_done(self, address: str, task: asyncio.Task[None]) -> None:
        self._handshakes.discard(task)
        self._from[address] -= 1
        if self._from[address] <= 0:
            del self._from[address]

    def _newest(self) -> ssl.SSLContext:
        """The context for the next handshake: the newest material, or the last that loaded."""
        try:
            self._last = self._context()
        except Unavailable as exc:
            log.error("relay listener keeps its previous TLS material: %s", exc.reason)
        assert self._last is not None  # noqa: S101  # set by start()
        return self._last

    async def _handshake(self, conn: socket.socket, peer: object) -> None:
        connection = LinkConnection(self._max_frame)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: connection, conn, ssl=self._newest(), ssl_handshake_timeout=HANDSHAKE_SECONDS
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as exc:  # noqa: BLE001 - the edge: whatever ended the handshake, this connection is over
            # Refused by TLS before the gateway sees a peer: logged, not recorded (as on the gRPC listeners).
            log.info("relay listener: handshake with %s failed: %r", peer, exc)
            conn.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(connection, peer))
        self._links.add(task)
        task.add_done_callback(self._links.discard)

    async def _serve(self, connection: LinkConnection, peer: object) -> None:
        try:
            transport = connection.transport
            ssl_object: ssl.SSLObject | None = None if transport is None else transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
                log.info("relay listener: %s does not speak %s; closed", peer, ALPN)
                return
            await self._handle(ssl_object.getpeercert(binary_form=True) or b"", connection)
        finally:
            connection.abort()

    async def stop(self, grace: float) -> None:
        """Stop accepting; links end when the gateway's handler returns (it drains); after `grace` s, cut."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
        if self._socket is not None:
            self._socket.close()
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
        if not self._links:
            return
        _, late = await asyncio.wait(set(self._links), timeout=grace)
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)
