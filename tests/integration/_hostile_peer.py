"""Raw relay calls for the hostile tests: a peer gateway that says exactly what the test wants.

`RawPeer` holds one force's real gateway TLS certificate and signing key (as a
compromised or buggy peer gateway would) and talks to another force's peer
listener with bytes it builds itself: request envelopes with any field, frames
in any order, garbage. Answers come back as `RelayOutcome`: the gRPC status of
the relay call and, where the host sealed a refusal after the envelope
verified, the status inside the response seal.

The same peer also speaks relay links (`gateway.relaylink`: length-prefixed
`MuxBatch` frames over TLS 1.3, no gRPC) to the host's relay listener, with a
plain blocking `ssl` socket: `link_raw` sends exactly the bytes it is given and
reports how the connection ended (`LinkEnd`), `link` mirrors `mux`. Streaming
calls travel on a link as `MuxStream` items (gateway.muxstream): `stream(...,
via="link")` / `link_stream_raw` send a stream's frames on one link and read its
answer back as the same `RelayOutcome` as `Relay/Stream`; `open_link` gives a
`LinkSession` for tests that script a link item by item (credit, cancel, floods).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import grpc

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.directory import CallType
from gateway.envelope import (
    CONTEXT_ENVELOPE,
    Envelope,
    MessageDigest,
    RequestSeal,
    Signer,
    envelope_body,
    parse_response_seal_body,
    request_seal_body,
    seal_request,
)
from gateway.principal import Principal, Purpose
from gateway.relaylink import ALPN
from tests.netharness import NetworkThread

__all__ = ["LinkEnd", "LinkSession", "RawPeer", "RelayOutcome", "Unframed", "frames_of"]

UNARY = "/psn.gateway.v1.Relay/Unary"
STREAM = "/psn.gateway.v1.Relay/Stream"
MUX = "/psn.gateway.v1.Relay/Mux"
WITNESS = "/psn.gateway.v1.Witness/AddCheckpoint"
PURPOSE = Purpose("investigation", "OP-HOSTILE-1", "hostile relay test")


@dataclass(frozen=True)
class RelayOutcome:
    """How a raw relay call ended."""

    #: the relay RPC's own status (a refusal before the envelope verified ends it here)
    code: grpc.StatusCode
    details: str
    #: the status code name inside the host's response seal (a refusal after the envelope verified)
    sealed: str | None = None
    #: the response frames (stream) or the unary response
    frames: tuple[Any, ...] = ()

    @property
    def status(self) -> str:
        """The status the origin would see: the sealed one if there is a seal, else the RPC's."""
        return self.sealed if self.sealed is not None else self.code.name


_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _sealed_status(signed: relay_pb2.Signed) -> str:
    return _NAMES[parse_response_seal_body(signed.body).status_code]


#: How a unary relay request travels: its own `Relay/Unary` RPC, a `Relay/Mux` channel, or a relay link.
Via = Literal["rpc", "mux", "link"]

#: How a streaming relay call travels: its own `Relay/Stream` RPC, or as a stream on a relay link.
StreamVia = Literal["rpc", "link"]

#: A relay link frame's header: the body's length, 4 bytes big-endian (gateway.relaylink).
_LINK_HEADER = struct.Struct(">I")


class Unframed(bytes):
    """Bytes `RawPeer.link_raw` sends as they are, without a length header (a forged header, half a frame)."""


@dataclass(frozen=True)
class LinkEnd:
    """How a raw relay link ended, seen from the peer.

    `how` is one of:

    - ``"handshake"``: the TLS handshake failed, or (TLS 1.3 checks the client's certificate after the
      client thinks the handshake is done) the host's first word was a TLS alert;
    - ``"eof"``: the host closed the connection (cleanly, or without close_notify);
    - ``"reset"``: the connection was reset, or broke with a TLS error after the handshake;
    - ``"timeout"``: neither an end nor the expected answers within the timeout;
    - ``"done"``: the expected number of answers arrived; the peer closed the link.
    """

    how: str
    detail: str = ""
    #: the ALPN protocol the host selected (None: none, or the handshake failed)
    alpn: str | None = None
    #: the TLS version of the connection (None if the handshake failed)
    version: str | None = None

    @property
    def closed_by_host(self) -> bool:
        """The host ended the connection (closed or reset it)."""
        return self.how in ("eof", "reset")


def frames_of(*frames: relay_pb2.RelayFrame | bytes) -> list[bytes]:
    """Frames as the bytes a raw stream sends (bytes pass through untouched)."""
    return [f if isinstance(f, bytes) else f.SerializeToString() for f in frames]


class RawPeer:
    """`origin`'s gateway, speaking raw relay to `host`'s peer listener."""

    def __init__(self, net: NetworkThread, origin: str, host: str, *, tls_of: str | None = None) -> None:
        layout = net.layout
        self.net = net
        self.origin = origin
        self.host = host
        self.directory = layout.directory()
        material = layout.material[origin]
        self.signer = Signer.from_files(material.gateway_signing.cert_path, material.gateway_signing.key_path)
        tls = layout.material[tls_of or origin].gateway_tls
        roots = b"".join(layout.material[f].ca.read_bytes() for f in layout.material)
        self._tls = (tls.cert_path, tls.key_path)
        self._roots = roots
        creds = grpc.ssl_channel_credentials(roots, tls.key_path.read_bytes(), tls.cert_path.read_bytes())
        target = self.directory.forces[host]
        self.channel = grpc.secure_channel(
            target.peer_address, creds, options=[("grpc.ssl_target_name_override", target.gateway_server_name)]
        )

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    # -- building ------------------------------------------------------------------------

    def envelope(
        self,
        method: str,
        *,
        message: bytes | None = None,
        officer: str | None = None,
        units: tuple[str, ...] = ("serocu",),
        roles: tuple[str, ...] = ("investigator",),
        clearance: str = "SC",
        issued_at: float | None = None,
        deadline: float | None = 30.0,
    ) -> Envelope:
        """A well-formed envelope for `method` from this origin (the digest covers `message` if unary/server-stream)."""
        route = self.directory.route(method)
        call_type = route.method.call_type
        now = time.time() if issued_at is None else issued_at
        digest: bytes | None = None
        count = 0
        if not call_type.client_streams:
            digest, count = MessageDigest.of(message or b"").digest, 1
        return Envelope(
            request_id=secrets.token_hex(16),
            origin_force=self.origin,
            origin_gateway=self.directory.forces[self.origin].gateway_spiffe_id,
            host_force=route.host,
            application=route.application.name,
            method=method,
            call_type=call_type,
            principal=Principal(officer or f"DC-{secrets.token_hex(4)}", self.origin, units, roles, clearance),
            purpose=PURPOSE,
            issued_at=now,
            deadline=None if deadline is None else now + deadline,
            messages_digest=digest,
            message_count=count,
            metadata=(),
        )

    def sign(self, env: Envelope, *, signer: Signer | None = None) -> relay_pb2.Signed:
        """Sign `env` as it is (no check that the host would accept it)."""
        return (signer or self.signer).sign(CONTEXT_ENVELOPE, envelope_body(env))

    def sign_body(self, body: bytes, *, signer: Signer | None = None) -> relay_pb2.Signed:
        """Sign arbitrary envelope body bytes."""
        return (signer or self.signer).sign(CONTEXT_ENVELOPE, body)

    def request_seal(
        self, env: Envelope, signed: relay_pb2.Signed, messages: Sequence[bytes], *, signer: Signer | None = None
    ) -> relay_pb2.Signed:
        """The request seal closing a client/bidi stream that sent `messages`."""
        digest = MessageDigest.of(*messages)
        seal = RequestSeal(
            request_id=env.request_id,
            envelope_digest=hashlib.sha256(signed.body).digest(),
            messages_digest=digest.digest,
            message_count=digest.count,
            issued_at=time.time(),
        )
        if signer is None:
            return seal_request(seal, self.signer)
        return signer.sign(b"psn-gateway/v1 request-seal", request_seal_body(seal))

    @staticmethod
    def with_(env: Envelope, **changes: Any) -> Envelope:
        """`env` with fields changed."""
        return replace(env, **changes)

    # -- sending -------------------------------------------------------------------------

    def unary(
        self,
        signed: relay_pb2.Signed,
        message: bytes,
        *,
        timeout: float = 10,
        via_mux: bool = False,
        via: Via = "rpc",
    ) -> RelayOutcome:
        """A Unary relay call: its own `Relay/Unary` RPC (`via` "rpc"), or the only call on a relay channel.

        `via` "mux" (or `via_mux=True`): over `Relay/Mux`; "link": over a relay link.
        """
        if via_mux:
            via = "mux"
        if via == "mux":
            return self.mux((1, signed, message), timeout=timeout)[1]
        if via == "link":
            return self.link((1, signed, message), timeout=timeout)[1]
        return self.unary_raw(
            relay_pb2.UnaryRelayRequest(envelope=signed, message=message).SerializeToString(), timeout
        )

    def unary_raw(self, data: bytes, timeout: float = 10, *, method: str = UNARY) -> RelayOutcome:
        """A Unary relay call whose request is exactly `data`."""
        call = self.channel.unary_unary(method)
        try:
            raw = call(data, timeout=timeout)
        except grpc.RpcError as exc:
            return RelayOutcome(exc.code(), exc.details() or "")
        if method != UNARY:
            return RelayOutcome(grpc.StatusCode.OK, "", frames=(raw,))
        response = relay_pb2.UnaryRelayResponse.FromString(raw)
        return RelayOutcome(grpc.StatusCode.OK, "", _sealed_status(response.seal), (response,))

    def stream_raw(self, frames: Iterable[bytes], *, timeout: float = 10, via: StreamVia = "rpc") -> RelayOutcome:
        """A Stream relay call sending exactly `frames` (bytes each), then half-closing.

        `via` "rpc": its own `Relay/Stream` RPC; "link": a stream on a relay link (`link_stream_raw`).
        """
        if via == "link":
            return self.link_stream_raw(frames, timeout=timeout)
        call = self.channel.stream_stream(STREAM)
        got: list[relay_pb2.RelayFrame] = []
        try:
            for raw in call(iter(list(frames)), timeout=timeout):
                got.append(relay_pb2.RelayFrame.FromString(raw))
        except grpc.RpcError as exc:
            return RelayOutcome(exc.code(), exc.details() or "", frames=tuple(got))
        return _stream_outcome(got)

    def stream(
        self, *frames: relay_pb2.RelayFrame | bytes, timeout: float = 10, via: StreamVia = "rpc"
    ) -> RelayOutcome:
        """A Stream relay call sending `frames` (over `Relay/Stream`, or on a relay link: `via`)."""
        return self.stream_raw(frames_of(*frames), timeout=timeout, via=via)

    def mux_raw(self, batches: Iterable[bytes], *, timeout: float = 10) -> tuple[RelayOutcome, list[Any]]:
        """A relay channel (`Relay/Mux`) sending exactly `batches`, then half-closing: its end and the answers."""
        call = self.channel.stream_stream(MUX)
        answers: list[relay_pb2.MuxResponse] = []
        try:
            for raw in call(iter(list(batches)), timeout=timeout):
                answers.extend(relay_pb2.MuxBatch.FromString(raw).responses)
        except grpc.RpcError as exc:
            return RelayOutcome(exc.code(), exc.details() or ""), answers
        return RelayOutcome(grpc.StatusCode.OK, ""), answers

    def mux(self, *requests: tuple[int, relay_pb2.Signed, bytes], timeout: float = 10) -> dict[int, RelayOutcome]:
        """Unary calls over one relay channel, all in one batch: each answer's outcome by request id."""
        batch = relay_pb2.MuxBatch(
            requests=[
                relay_pb2.MuxRequest(id=i, request=relay_pb2.UnaryRelayRequest(envelope=signed, message=message))
                for i, signed, message in requests
            ]
        )
        end, answers = self.mux_raw([batch.SerializeToString()], timeout=timeout)
        assert end.code is grpc.StatusCode.OK, end
        return _outcomes(answers)

    # -- relay links (gateway.relaylink) -------------------------------------------------

    def link_raw(
        self,
        frames: Iterable[bytes],
        *,
        timeout: float = 10,
        expect: int | None = None,
        alpn: Sequence[str] = (ALPN,),
        tls_version: ssl.TLSVersion | None = None,
        cert: tuple[Path, Path] | None = None,
        anonymous: bool = False,
    ) -> tuple[LinkEnd, list[relay_pb2.MuxResponse]]:
        """A relay link to the host's relay listener sending exactly `frames`: how it ended and the answers.

        Each frame body gets its 4-byte length header, except `Unframed` bytes, which go as they are.
        After sending, answers are read until `expect` of them arrived (then this peer closes the link:
        "done"), the host ends the connection, or `timeout` seconds pass. The link never half-closes:
        like the gateway's own origin side, it stays open while answers are due.

        The client certificate is this peer's gateway TLS certificate (or `tls_of`'s), or `cert`
        (certificate and key files), or none at all (`anonymous`); `alpn` the protocols offered (empty:
        no ALPN extension); `tls_version` pins the TLS version offered (default: TLS 1.2 to 1.3).
        """
        deadline = time.monotonic() + timeout
        opened = self._connect_link(timeout, alpn=alpn, tls_version=tls_version, cert=cert, anonymous=anonymous)
        if isinstance(opened, LinkEnd):
            return opened, []
        sock = opened
        with sock:
            chosen, version = sock.selected_alpn_protocol(), sock.version()
            try:
                for frame in frames:
                    sock.sendall(frame if isinstance(frame, Unframed) else _LINK_HEADER.pack(len(frame)) + frame)
            except OSError:
                pass  # the host may already have ended the link: what it said before that is read below
            end, answers = _read_link(sock, deadline, expect)
        return replace(end, alpn=chosen, version=version), answers

    def _connect_link(
        self,
        timeout: float,
        *,
        alpn: Sequence[str] = (ALPN,),
        tls_version: ssl.TLSVersion | None = None,
        cert: tuple[Path, Path] | None = None,
        anonymous: bool = False,
    ) -> ssl.SSLSocket | LinkEnd:
        """A TLS connection to the host's relay listener, or how connecting failed."""
        target = self.directory.forces[self.host]
        if target.relay_address is None:
            raise AssertionError(f"{self.host} has no relay_address in the directory")
        name, _, port = target.relay_address.rpartition(":")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=self._roots.decode("ascii"))
        context.check_hostname = True
        if tls_version is not None:
            context.minimum_version = context.maximum_version = tls_version
        if not anonymous:
            cert_path, key_path = cert or self._tls
            context.load_cert_chain(cert_path, key_path)
        if alpn:
            context.set_alpn_protocols(list(alpn))
        try:
            raw_sock = socket.create_connection((name.strip("[]"), int(port)), timeout=timeout)
        except OSError as exc:
            return LinkEnd("refused", repr(exc))
        try:
            return context.wrap_socket(raw_sock, server_hostname=target.gateway_server_name)
        except (ssl.SSLError, OSError) as exc:
            raw_sock.close()
            return LinkEnd("handshake", repr(exc))

    def open_link(self, *, timeout: float = 10) -> LinkSession:
        """An open relay link to script item by item (close it, or use it as a context manager)."""
        opened = self._connect_link(timeout)
        if isinstance(opened, LinkEnd):
            raise AssertionError(f"relay link to {self.host} did not open: {opened}")
        return LinkSession(opened)

    def link_stream_raw(
        self, frames: Iterable[bytes], *, timeout: float = 10, end: bool = True, stream_id: int = 1
    ) -> RelayOutcome:
        """A streaming relay call on a relay link: `frames` (bytes each) as `MuxStream` items of one stream.

        Each frame goes in its own link frame, then `end` (unless `end` is False). The host's items for
        the stream are read until its `end` or refusal, the link's end, or `timeout` seconds, granting
        credit for every frame read (as the gateway's origin side does), and returned as `stream_raw`
        returns them: a refusal's code as the status, else OK and the sealed status of the response
        seal, and the frames. A link that ends first is UNAVAILABLE; a timeout DEADLINE_EXCEEDED.
        """
        with self.open_link(timeout=timeout) as link:
            try:
                for data in frames:
                    link.send(relay_pb2.MuxStream(id=stream_id, frame=data))
                if end:
                    link.send(relay_pb2.MuxStream(id=stream_id, end=True))
            except OSError:
                pass  # the host may already have ended the link: what it said before that is read below
            ended = link.read_until(lambda: link.over(stream_id), timeout=timeout, credit=True)
            return link.outcome(stream_id, ended)

    def link(self, *requests: tuple[int, relay_pb2.Signed, bytes], timeout: float = 10) -> dict[int, RelayOutcome]:
        """Unary calls over one relay link, all in one frame: each answer's outcome by request id."""
        batch = relay_pb2.MuxBatch(
            requests=[
                relay_pb2.MuxRequest(id=i, request=relay_pb2.UnaryRelayRequest(envelope=signed, message=message))
                for i, signed, message in requests
            ]
        )
        end, answers = self.link_raw([batch.SerializeToString()], timeout=timeout, expect=len(requests))
        assert end.how == "done", (end, answers)
        return _outcomes(answers)


def _read_link(sock: ssl.SSLSocket, deadline: float, expect: int | None) -> tuple[LinkEnd, list[relay_pb2.MuxResponse]]:
    """Read answer frames from a relay link until `expect` answers, its end, or `deadline` (monotonic)."""
    answers: list[relay_pb2.MuxResponse] = []
    buffer = b""
    received = False
    while expect is None or len(answers) < expect:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return LinkEnd("timeout", f"{len(answers)} answers"), answers
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            return LinkEnd("timeout", f"{len(answers)} answers"), answers
        except ssl.SSLError as exc:
            alert = "ALERT" in str(exc).upper()
            return LinkEnd("handshake" if alert and not received else "reset", repr(exc)), answers
        except OSError as exc:
            return LinkEnd("reset", repr(exc)), answers
        if not chunk:
            return LinkEnd("eof", f"{len(buffer)} bytes of an unfinished frame" if buffer else ""), answers
        received = True
        buffer += chunk
        while len(buffer) >= _LINK_HEADER.size:
            (size,) = _LINK_HEADER.unpack_from(buffer)
            if len(buffer) < _LINK_HEADER.size + size:
                break
            body = buffer[_LINK_HEADER.size : _LINK_HEADER.size + size]
            buffer = buffer[_LINK_HEADER.size + size :]
            answers.extend(relay_pb2.MuxBatch.FromString(body).responses)
    return LinkEnd("done"), answers


def _stream_outcome(got: Sequence[relay_pb2.RelayFrame]) -> RelayOutcome:
    """A stream that ended OK: the sealed status if its last frame is the response seal."""
    sealed = None
    if got and got[-1].WhichOneof("kind") == "response_seal":
        sealed = _sealed_status(got[-1].response_seal)
    return RelayOutcome(grpc.StatusCode.OK, "", sealed, tuple(got))


class LinkSession:
    """An open raw relay link (`RawPeer.open_link`): send batches, read what the host sends, step by step."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        #: every batch the host sent, in order
        self.batches: list[relay_pb2.MuxBatch] = []
        self._buffer = b""
        self._granted: dict[int, int] = {}
        #: how the link ended, once it has
        self.ended: LinkEnd | None = None

    def __enter__(self) -> LinkSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the link (no close_notify wait)."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(
        self,
        *items: relay_pb2.MuxStream,
        requests: Sequence[relay_pb2.MuxRequest] = (),
        cancels: Sequence[int] = (),
    ) -> None:
        """Send one link frame: a batch of these stream items, requests and cancels."""
        batch = relay_pb2.MuxBatch(streams=items, requests=requests, cancels=cancels)
        self.send_raw(batch.SerializeToString())

    def send_raw(self, body: bytes) -> None:
        """Send `body` as one link frame (its length header added)."""
        self.sock.sendall(_LINK_HEADER.pack(len(body)) + body)

    def items(self, stream_id: int) -> list[relay_pb2.MuxStream]:
        """The host's items for one stream, in order."""
        return [i for b in self.batches for i in b.streams if i.id == stream_id]

    def frames(self, stream_id: int) -> list[relay_pb2.RelayFrame]:
        """The host's frames for one stream, parsed."""
        return [relay_pb2.RelayFrame.FromString(i.frame) for i in self.items(stream_id) if i.frame]

    def responses(self) -> list[relay_pb2.MuxResponse]:
        """The host's answers to unary requests."""
        return [a for b in self.batches for a in b.responses]

    def over(self, stream_id: int) -> bool:
        """The host ended the stream (`end` or a refusal)."""
        return any(i.end or i.HasField("refusal") for i in self.items(stream_id))

    def read_until(self, done: Callable[[], bool], *, timeout: float = 10, credit: bool = False) -> LinkEnd | None:
        """Read batches until `done()` holds (None), or how the link ended first (also kept in `ended`).

        `credit`: grant each stream back the bytes of the frames read, as a reading origin does.
        """
        deadline = time.monotonic() + timeout
        while not done():
            if self.ended is not None:
                return self.ended
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return LinkEnd("timeout", f"{len(self.batches)} batches")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                return LinkEnd("timeout", f"{len(self.batches)} batches")
            except OSError as exc:  # ssl.SSLError included
                self.ended = LinkEnd("reset", repr(exc))
                continue
            if not chunk:
                self.ended = LinkEnd("eof", f"{len(self._buffer)} bytes of an unfinished frame" if self._buffer else "")
                continue
            self._buffer += chunk
            while len(self._buffer) >= _LINK_HEADER.size:
                (size,) = _LINK_HEADER.unpack_from(self._buffer)
                if len(self._buffer) < _LINK_HEADER.size + size:
                    break
                body = self._buffer[_LINK_HEADER.size : _LINK_HEADER.size + size]
                self._buffer = self._buffer[_LINK_HEADER.size + size :]
                batch = relay_pb2.MuxBatch.FromString(body)
                self.batches.append(batch)
                if credit:
                    self._grant(batch)
        return None

    def _grant(self, batch: relay_pb2.MuxBatch) -> None:
        grants: dict[int, int] = {}
        for item in batch.streams:
            if item.frame:
                grants[item.id] = grants.get(item.id, 0) + len(item.frame)
        if grants:
            with contextlib.suppress(OSError):
                self.send(*(relay_pb2.MuxStream(id=i, credit=n) for i, n in grants.items()))

    def outcome(self, stream_id: int, ended: LinkEnd | None = None) -> RelayOutcome:
        """How one stream ended, as `RawPeer.stream_raw` reports it."""
        got = tuple(self.frames(stream_id))
        for item in self.items(stream_id):
            if item.HasField("refusal"):
                code = grpc.StatusCode(_CODES.get(item.refusal.code, grpc.StatusCode.UNKNOWN.value))
                return RelayOutcome(code, item.refusal.message, frames=got)
            if item.end:
                return _stream_outcome(got)
        if ended is not None and ended.how == "timeout":
            return RelayOutcome(grpc.StatusCode.DEADLINE_EXCEEDED, f"no end of the stream: {ended}", frames=got)
        return RelayOutcome(grpc.StatusCode.UNAVAILABLE, f"relay link ended: {ended}", frames=got)


def _outcomes(answers: Iterable[relay_pb2.MuxResponse]) -> dict[int, RelayOutcome]:
    """Relay channel answers as outcomes by request id (a refusal's code as the RPC status)."""
    out: dict[int, RelayOutcome] = {}
    for answer in answers:
        if answer.HasField("refusal"):
            out[answer.id] = RelayOutcome(grpc.StatusCode(_CODES[answer.refusal.code]), answer.refusal.message)
        else:
            out[answer.id] = RelayOutcome(
                grpc.StatusCode.OK, "", _sealed_status(answer.response.seal), (answer.response,)
            )
    return out


_CODES = {code.value[0]: code.value for code in grpc.StatusCode}


def message_frame(seq: int, data: bytes) -> relay_pb2.RelayFrame:
    """A numbered request message frame."""
    return relay_pb2.RelayFrame(message=relay_pb2.StreamMessage(seq=seq, data=data))


def envelope_frame(signed: relay_pb2.Signed) -> relay_pb2.RelayFrame:
    """An envelope frame."""
    return relay_pb2.RelayFrame(envelope=signed)


def seal_frame(signed: relay_pb2.Signed) -> relay_pb2.RelayFrame:
    """A request seal frame."""
    return relay_pb2.RelayFrame(request_seal=signed)


__all__ += [
    "MUX",
    "PURPOSE",
    "STREAM",
    "UNARY",
    "WITNESS",
    "CallType",
    "StreamVia",
    "Via",
    "envelope_frame",
    "message_frame",
    "seal_frame",
]
