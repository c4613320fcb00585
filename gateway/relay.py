"""The relay between gateways: signed envelopes out, signed seals back.

Origin side (the caller's force): `RelayClient` signs a request envelope for
the call and sends it with the request messages to the host force's gateway
over mTLS; it verifies the host's response seal before the call completes.

Host side (the force that hosts the application): `RelayHost` serves the
`psn.gateway.v1.Relay` service on the peer listener. The envelope is verified
(stage `envelope`) before anything is forwarded; the response is sealed, bound
to the envelope's digest, the status and the digest of the response messages.

Unary calls use the `Unary` RPC (one message each way). Every streaming call
uses `Stream`: the origin sends the envelope, the messages (numbered), and for
client and bidi streams a request seal over the running digest; the host sends
headers, the messages (numbered), and the response seal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.breaker import Breaker
from gateway.clock import Clock, SystemClock
from gateway.directory import CallType
from gateway.envelope import (
    MAX_STATUS_MESSAGE,
    Envelope,
    EnvelopeVerifier,
    MessageDigest,
    RequestSeal,
    ResponseSeal,
    Signer,
    seal_envelope,
    seal_request,
)
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidArgument,
    RequestRefused,
    Unauthenticated,
    Unavailable,
)
from gateway.forward import Metadata, Reply
from gateway.metadata import check_forwarded_size, check_relayed_metadata, from_relay_entries, to_relay_entries
from gateway.mux import MuxClient, MuxUnsupported
from gateway.pipeline import Call
from gateway.tls import ChannelPool

__all__ = [
    "EnvelopeStage",
    "RelayClient",
    "RelayHostDownstream",
    "RelayUpstream",
    "carried_metadata",
    "parse_relay_request",
    "response_seal_for",
    "sealable",
]

log = logging.getLogger("psngw.relay")

_UNARY = "/psn.gateway.v1.Relay/Unary"
#: Larger unary requests go on a relay link of their own to a host with links (`MuxClient.call`'s
#: `bulk`); to any other host, as their own `Relay/Unary` RPC, not packed into a `Relay/Mux` batch.
_MUX_MAX_MESSAGE = 256 * 1024
_STREAM = "/psn.gateway.v1.Relay/Stream"


def _unverified(host: str, exc: GatewayError) -> Unavailable:
    # The host's answer did not verify: our side of the network failed the
    # caller, whose own request was fine. Never UNAUTHENTICATED to the caller.
    return Unavailable(f"response from the gateway of {host} failed verification: {exc.reason}")


class RelayClient:
    """The origin side of the relay."""

    def __init__(
        self,
        *,
        force: str,
        gateway_id: str,
        signer: Callable[[], Signer],
        verifier: EnvelopeVerifier,
        peers: ChannelPool,
        clock: Clock,
        breaker_failures: int = 5,
        breaker_cooldown: float = 5.0,
        mux: MuxClient | None = None,
    ) -> None:
        self.force = force
        self.gateway_id = gateway_id
        self._signer = signer
        self._verifier = verifier
        self._peers = peers
        self._clock = clock
        self._breaker_failures = breaker_failures
        self._breaker_cooldown = breaker_cooldown
        self.breakers: dict[str, Breaker] = {}
        #: relay channels (`Relay/Mux`) for unary calls; None: one `Relay/Unary` RPC per call
        self.mux = mux

    def envelope(self, call: Call, *, digest: bytes | None, count: int) -> Envelope:
        """The request envelope for `call` (its principal and purpose are verified)."""
        assert call.route is not None and call.principal is not None and call.purpose is not None  # noqa: S101
        remaining = call.remaining(self._clock.monotonic())
        now = self._clock.now()
        decision = call.decision
        return Envelope(
            request_id=call.request_id,
            origin_force=self.force,
            origin_gateway=self.gateway_id,
            host_force=call.route.host,
            application=call.route.application.name,
            method=call.method,
            call_type=call.route.method.call_type,
            principal=call.principal,
            purpose=call.purpose,
            issued_at=now,
            deadline=None if remaining is None else now + remaining,
            messages_digest=digest,
            message_count=count,
            metadata=to_relay_entries(call.passthrough),
            origin_decision_id=getattr(decision, "decision_id", "") or "",
            origin_policy_version=getattr(decision, "policy_version", "") or "",
        )

    def _sign(self, call: Call, env: Envelope) -> tuple[relay_pb2.Signed, bytes]:
        signed, digest = seal_envelope(env, self._signer())
        call.envelope_signature = signed.signature
        return signed, digest

    def breaker(self, host: str) -> Breaker:
        """The circuit breaker toward `host`'s gateway."""
        breaker = self.breakers.get(host)
        if breaker is None:
            breaker = self.breakers[host] = Breaker(
                host, clock=self._clock, failures=self._breaker_failures, cooldown=self._breaker_cooldown
            )
        return breaker

    async def unary(self, call: Call, request: bytes) -> Reply:
        """Relay a unary call; verify the response seal; return the host's reply."""
        assert call.route is not None  # noqa: S101  # the route stage sets it
        host = call.route.host
        digest = MessageDigest()
        digest.update(request)
        call.request_digest = digest.digest
        signed, env_digest = self._sign(call, self.envelope(call, digest=digest.digest, count=1))
        request_pb = relay_pb2.UnaryRelayRequest(envelope=signed, message=request)
        breaker = self.breaker(host)
        breaker.allow()
        answer: relay_pb2.UnaryRelayResponse | Reply | None = None
        large = len(request) > _MUX_MAX_MESSAGE
        if self.mux is not None and self.mux.supports(host) and (not large or self.mux.transport(host) == "link"):
            answer = await self._over_mux(breaker, host, call, request_pb, bulk=large)
            if answer is None:  # the host has no relay channels: this call was not delivered
                breaker.allow()
        if answer is None:
            answer = await self._over_rpc(breaker, host, call, request_pb)
        if isinstance(answer, Reply):
            return answer
        response = answer
        message = response.message if response.HasField("message") else None
        received = MessageDigest()
        if message is not None:
            received.update(message)
        try:
            seal = self._verifier.verify_response_seal(
                response.seal,
                envelope_digest=env_digest,
                request_id=call.request_id,
                host_force=host,
                digest=received.digest,
                count=received.count,
            )
        except RequestRefused as exc:
            raise _unverified(host, exc) from exc
        call.response_digest = received.digest
        call.seal_signature = response.seal.signature
        return _reply_from_seal(seal.value, message)

    async def _over_mux(
        self, breaker: Breaker, host: str, call: Call, request: relay_pb2.UnaryRelayRequest, *, bulk: bool
    ) -> relay_pb2.UnaryRelayResponse | Reply | None:
        """Send over a relay channel: the host's response, a refusal it sent (a Reply), None if unsupported."""
        assert self.mux is not None  # noqa: S101  # the caller checked
        try:
            answer = await self.mux.call(host, request, timeout=call.remaining(self._clock.monotonic()), bulk=bulk)
        except MuxUnsupported:
            breaker.release()
            return None
        except Unavailable:
            breaker.failure()
            raise
        except BaseException:
            breaker.release()
            raise
        if answer.HasField("refusal"):
            code = _STATUS_BY_VALUE.get(answer.refusal.code, grpc.StatusCode.UNKNOWN)
            return _judge(breaker, code, answer.refusal.message, what=f"relay to {host}")
        breaker.success()
        if not answer.HasField("response"):
            raise _unverified(host, InvalidArgument("relay channel answer carries neither response nor refusal"))
        return answer.response

    async def _over_rpc(
        self, breaker: Breaker, host: str, call: Call, request: relay_pb2.UnaryRelayRequest
    ) -> relay_pb2.UnaryRelayResponse | Reply:
        """Send as one `Relay/Unary` RPC: the host's response, or a refusal it sent (a Reply)."""
        channel = self._peers.channel(host)
        # The response comes back as bytes and is parsed here: grpc's own deserialiser turns garbage from
        # the host into None plus a log line, which would end the call outside the gateway's error handling.
        multi: grpc.aio.UnaryUnaryMultiCallable[relay_pb2.UnaryRelayRequest, bytes]
        multi = channel.unary_unary(_UNARY, request_serializer=relay_pb2.UnaryRelayRequest.SerializeToString)
        try:
            raw = await multi(request, timeout=call.remaining(self._clock.monotonic()))
        except grpc.aio.AioRpcError as exc:
            return _judge(breaker, exc.code(), exc.details() or "", what=f"relay to {host}")
        except BaseException:
            breaker.release()
            raise
        breaker.success()
        try:
            return relay_pb2.UnaryRelayResponse.FromString(raw)
        except DecodeError as exc:
            raise _unverified(host, InvalidArgument(f"relay response does not parse: {exc}")) from exc

    async def stream(self, call: Call) -> RelayUpstream:
        """Open a streaming relay call toward the host force.

        If opening fails or is cancelled (the caller gave up while the envelope waited to be sent),
        the call is abandoned and a breaker probe it held is given back: a probe left out would
        refuse every later call to the host.
        """
        upstream = RelayUpstream(self, call)
        try:
            await upstream.open()
        except BaseException:
            upstream.cancel()
            raise
        return upstream


#: Statuses a host gateway never sends unsealed on purpose (its refusals are the classes `gateway.status`
#: names): grpc made them up (a reset stream is INTERNAL), so they are our transport failing, never an
#: answer to pass on to the caller with grpc's words in it.
_NOT_AN_ANSWER = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS}
)


#: Statuses a relay stream may end with, unsealed, after response messages: the transport's (the link
#: broke, the deadline passed, a message too large for one side) and those `_judge` counts as failures.
_UNSEALED_MID_STREAM = _NOT_AN_ANSWER | {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}


def _judge(breaker: Breaker, code: grpc.StatusCode, details: str, *, what: str) -> Reply:
    """A relay call that ended in a status instead of a sealed response, on either transport.

    The host's gateway refused the call (PERMISSION_DENIED, INVALID_ARGUMENT, ...): that is its answer,
    passed on to the caller, and the peer counts as up. UNAVAILABLE, OK without a response, and codes a
    gateway never sends (INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS) are failures of the relay and count
    against the host. DEADLINE_EXCEEDED ends the call and counts neither way: the peer may just be slow.
    """
    reason = f"{what}: {code.name}: {details}"
    if code is grpc.StatusCode.OK or code is grpc.StatusCode.UNAVAILABLE or code in _NOT_AN_ANSWER:
        breaker.failure()
        raise Unavailable(reason)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        breaker.release()
        raise DeadlineExceeded(reason)
    breaker.success()
    return Reply(code=code, details=details)


def _reply_from_seal(seal: ResponseSeal, message: bytes | None) -> Reply:
    code = _STATUS_BY_VALUE.get(seal.status_code, grpc.StatusCode.UNKNOWN)
    return Reply(
        code=code,
        details=seal.status_message,
        initial_metadata=from_relay_entries(seal.initial_metadata),
        trailing_metadata=from_relay_entries(seal.trailing_metadata, status_details=True),
        message=message if code is grpc.StatusCode.OK else None,
    )


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class RelayUpstream:
    """The origin side of a streaming relay call (an `Upstream` for the pump)."""

    def __init__(self, client: RelayClient, call: Call) -> None:
        assert call.route is not None  # noqa: S101  # the route stage sets it
        self._client = client
        self._call = call
        self._host = call.route.host
        self._type = call.route.method.call_type
        self._breaker = client.breaker(self._host)
        self._breaker.allow()
        self._reached = False
        try:
            self._rpc: Any = self._start(client, call.remaining(client._clock.monotonic()))
        except Unavailable:
            self._breaker.failure()
            raise
        except BaseException:
            self._breaker.release()  # nothing was sent: a probe this call held is given back
            raise
        self._sent = MessageDigest()
        self._received = MessageDigest()
        self._env_digest: bytes | None = None
        self._headers: Metadata = ()
        self._reply: Reply | None = None

    def _start(self, client: RelayClient, timeout: float | None) -> Any:
        """The relay call: a stream on a relay link (`gateway.muxstream`), or a `Relay/Stream` RPC."""
        mux = client.mux
        if mux is not None and mux.transport(self._host) == "link":
            # Over a relay link: the same frames, the host's certificate checked first.
            return mux.open_stream(self._host, timeout=timeout)
        # Response frames are parsed in `read` (see `RelayClient.unary`).
        multi: grpc.aio.StreamStreamMultiCallable[relay_pb2.RelayFrame, bytes]
        multi = client._peers.channel(self._host).stream_stream(
            _STREAM, request_serializer=relay_pb2.RelayFrame.SerializeToString
        )
        return multi(timeout=timeout)

    async def _send_envelope(self, digest: bytes | None, count: int) -> None:
        env = self._client.envelope(self._call, digest=digest, count=count)
        signed, self._env_digest = self._client._sign(self._call, env)
        await self._rpc.write(relay_pb2.RelayFrame(envelope=signed))

    async def open(self) -> None:
        """Client and bidi streams: send the envelope now, so the host can start the call."""
        if self._type.client_streams:
            try:
                await self._send_envelope(None, 0)
            except grpc.aio.AioRpcError:
                return  # the failure surfaces at read()

    async def write(self, data: bytes) -> None:
        """Send one request message (for a server stream, with the envelope that covers it)."""
        try:
            if self._type is CallType.SERVER_STREAM:
                seq = self._sent.update(data)
                await self._send_envelope(self._sent.digest, self._sent.count)
            else:
                seq = self._sent.update(data)
            await self._rpc.write(_message_frame(seq, data))
        except grpc.aio.AioRpcError:
            return  # the failure surfaces at read()

    async def done_writing(self) -> None:
        """Close the request side: a request seal for client and bidi streams."""
        try:
            if self._type.client_streams and self._env_digest is not None:
                seal = RequestSeal(
                    request_id=self._call.request_id,
                    envelope_digest=self._env_digest,
                    messages_digest=self._sent.digest,
                    message_count=self._sent.count,
                    issued_at=self._client._clock.now(),
                )
                signed = seal_request(seal, self._client._signer())
                await self._rpc.write(relay_pb2.RelayFrame(request_seal=signed))
            await self._rpc.done_writing()
        except grpc.aio.AioRpcError:
            return
        self._call.request_digest = self._sent.digest
        self._call.request_messages = self._sent.count

    async def initial_metadata(self) -> Metadata:
        """The host's response headers (they arrive before the first message)."""
        return self._headers

    async def read(self) -> bytes | None:
        """The next response message; None once the verified response seal has arrived."""
        if self._reply is not None:
            return None
        while True:
            try:
                frame: Any = await self._rpc.read()
            except grpc.aio.AioRpcError as exc:
                self._reply = self._unsealed_end(exc)
                return None
            if not self._reached:
                self._reached = True
                self._breaker.success()
            if frame is grpc.aio.EOF:
                raise _unverified(self._host, Unauthenticated("relay stream ended without a response seal"))
            try:
                frame = parse_relay_request(frame, unary=False)
            except InvalidArgument as exc:
                raise _unverified(self._host, exc) from exc
            kind = frame.WhichOneof("kind")
            if kind == "headers":
                if self._received.count:
                    raise _unverified(self._host, InvalidArgument("headers after messages"))
                try:
                    self._headers = from_relay_entries([(m.key, m.value) for m in frame.headers.metadata])
                except InvalidArgument as exc:
                    raise _unverified(self._host, exc) from exc
                continue
            if kind == "message":
                message = frame.message
                if message.seq != self._received.count:
                    raise _unverified(self._host, InvalidArgument("response messages out of sequence"))
                # Counted in the record by the downstream that delivers it (what the caller got), not here:
                # counting both over-counted every relayed stream's responses by one at the origin.
                data: bytes = message.data  # each read of the field is a fresh copy of the payload: read it once
                self._received.update(data)
                return data
            if kind == "response_seal":
                self._finish(frame.response_seal)
                return None
            raise _unverified(self._host, InvalidArgument(f"unexpected relay frame {kind!r}"))

    def _unsealed_end(self, exc: grpc.aio.AioRpcError) -> Reply:
        """The call ended in a status, not a seal: the host's unsealed refusal, or a failure (`_judge`).

        A host refuses unsealed only before its envelope verified, so before any message: a refusal
        after messages is not its answer, whoever sent it (only the transport's statuses may end a
        stream there, `_UNSEALED_MID_STREAM`).
        """
        code = exc.code()
        if self._received.count and code not in _UNSEALED_MID_STREAM:
            raise _unverified(
                self._host,
                Unauthenticated(
                    f"relay stream ended {code.name} without a response seal after {self._received.count} message(s)"
                ),
            ) from exc
        return _judge(self._breaker, code, exc.details() or "", what=f"relay to {self._host}")

    def _finish(self, signed: relay_pb2.Signed) -> None:
        if self._env_digest is None:
            raise _unverified(self._host, InvalidArgument("response seal before the envelope was sent"))
        try:
            seal = self._client._verifier.verify_response_seal(
                signed,
                envelope_digest=self._env_digest,
                request_id=self._call.request_id,
                host_force=self._host,
                digest=self._received.digest,
                count=self._received.count,
            )
        except RequestRefused as exc:
            raise _unverified(self._host, exc) from exc
        # Compared even when no Headers frame came (the host sends none for empty headers): a seal over
        # headers the caller never got does not verify.
        if to_relay_entries(self._headers) != seal.value.initial_metadata:
            raise _unverified(self._host, InvalidArgument("headers differ from the sealed headers"))
        self._call.response_digest = self._received.digest
        self._call.seal_signature = signed.signature
        self._reply = _reply_from_seal(seal.value, None)

    async def finish(self) -> Reply:
        """How the host ended the call (verified)."""
        while self._reply is None:
            await self.read()
        return self._reply

    def cancel(self) -> None:
        """Cancel the relay call."""
        if not self._reached:
            self._breaker.release()
        self._rpc.cancel()


def parse_relay_request(data: bytes, *, unary: bool) -> Any:
    """A relay request from the wire: `UnaryRelayRequest` (unary) or `RelayFrame`; `InvalidArgument` if garbage.

    The peer listener should hand the relay raw bytes and parse them here, so that garbage from a
    peer is a refusal that is logged and recorded like any other (grpc's own deserialiser would end
    the call with UNKNOWN and protobuf's error text before any gateway code runs).
    """
    kind = relay_pb2.UnaryRelayRequest if unary else relay_pb2.RelayFrame
    try:
        return kind.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"relay {'request' if unary else 'frame'} does not parse: {exc}") from exc


def carried_metadata(md: Metadata, *, what: str, status_details: bool = False) -> tuple[tuple[str, bytes], ...]:
    """`md` as a seal carries it; `Unavailable` naming `what` when the relay contract cannot carry it.

    The host checks the backend's headers and trailers before they leave, against the limits the
    origin checks them by (over 64 entries or 16 KiB, a value that is not ASCII): an answer that
    cannot be sealed must end the call as a recorded refusal, not fail to seal.
    """
    try:
        wire = to_relay_entries(md)
        check_relayed_metadata(wire, status_details=status_details)
    except UnicodeEncodeError:
        raise Unavailable(f"{what}: its answer's metadata is not ASCII and cannot be relayed") from None
    except InvalidArgument as exc:
        raise Unavailable(f"{what}: its answer cannot be relayed: {exc.reason}") from exc
    return wire


def _backend(call: Call) -> str:
    return f"backend {call.route.application.name}" if call.route is not None else "the backend"


def sealable(call: Call, reply: Reply) -> Reply:
    """The backend's `reply` to `call` as a response seal can carry it (see `carried_metadata`).

    A status message longer than a seal carries is cut to `MAX_STATUS_MESSAGE` characters (the
    application's text, which may echo the caller's input); metadata that cannot be carried
    raises `Unavailable`.
    """
    what = _backend(call)
    carried_metadata(reply.initial_metadata, what=what)
    carried_metadata(reply.trailing_metadata, what=what, status_details=True)
    if len(reply.details) > MAX_STATUS_MESSAGE:
        return dataclasses.replace(reply, details=reply.details[:MAX_STATUS_MESSAGE])
    return reply


def _message_frame(seq: int, data: bytes) -> relay_pb2.RelayFrame:
    """The `RelayFrame` carrying message `seq`, built in place.

    `RelayFrame(message=StreamMessage(seq=seq, data=data))` copies the nested
    message into the frame (about 45 us for 64 KiB, on every message of a
    stream); setting the fields of the frame's own submessage does not copy the
    payload (under 2 us). The frame and its bytes on the wire are the same.
    """
    frame = relay_pb2.RelayFrame()
    message = frame.message
    message.seq = seq
    message.data = data
    return frame


class EnvelopeStage:
    """Peer listener: the request envelope verifies before anything is forwarded."""

    name = "envelope"

    def __init__(
        self, verifier: EnvelopeVerifier, clock: Clock | None = None, *, max_forwarded_bytes: int | None = None
    ) -> None:
        self._verifier = verifier
        self._clock = clock or SystemClock()
        #: the most metadata this host forwards to a backend (`[limits] max_forwarded_metadata_bytes`), as
        #: at the local edge: past it the backend's grpc refuses the call and names every header in its text
        self._max_forwarded = max_forwarded_bytes

    async def __call__(self, call: Call) -> None:
        """Verify the envelope in `call.relay_request`; fill the call from it."""
        assert call.peer is not None  # noqa: S101  # the peer-identity stage runs first
        request = call.relay_request
        if isinstance(request, bytes):
            request = call.relay_request = parse_relay_request(request, unary=call.method == _UNARY)
        is_frame = isinstance(request, relay_pb2.RelayFrame)
        if isinstance(request, relay_pb2.UnaryRelayRequest) or (is_frame and request.WhichOneof("kind") == "envelope"):
            signed = request.envelope
        else:
            raise InvalidArgument("relay call did not start with an envelope")
        verified = self._verifier.verify_envelope(signed, peer=call.peer)
        env: Envelope = verified.value
        if self._max_forwarded is not None:
            check_forwarded_size(env.metadata, self._max_forwarded, what="envelope metadata to forward")
        if isinstance(request, relay_pb2.UnaryRelayRequest):
            if env.call_type is not CallType.UNARY:
                raise InvalidArgument(f"envelope for a {env.call_type} call on the unary relay")
            digest = MessageDigest()
            digest.update(request.message)
            self._verifier.verify_messages(verified, digest.digest, digest.count)
            call.request_digest, call.request_messages = digest.digest, 1
        elif env.call_type is CallType.UNARY:
            raise InvalidArgument("envelope for a unary call on the stream relay")
        call.envelope = verified
        if env.deadline is not None:
            # The signed deadline bounds the call even where the transport carries none (a relay channel).
            mono = self._clock.monotonic() + (env.deadline - self._clock.now())
            call.deadline_mono = mono if call.deadline_mono is None else min(call.deadline_mono, mono)
        call.method = env.method
        call.principal = env.principal
        call.purpose = env.purpose
        call.passthrough = from_relay_entries(env.metadata)
        call.origin_force = env.origin_force
        call.origin_gateway = env.origin_gateway
        call.request_id = env.request_id
        call.envelope_signature = verified.signature


class RelayHostDownstream:
    """The origin gateway, as the caller of a streaming call at the host."""

    def __init__(
        self,
        context: grpc.aio.ServicerContext[relay_pb2.RelayFrame, relay_pb2.RelayFrame],
        call: Call,
        verifier: EnvelopeVerifier,
        *,
        clock: Clock | None = None,
    ) -> None:
        self._context = context
        self._call = call
        self._verifier = verifier
        #: the clock of `call.deadline_mono`: with it, every write waits no longer than the call's deadline
        self._clock = clock
        self._received = MessageDigest()
        self._sent = MessageDigest()
        self._done = False
        self._headers_sent: Metadata | None = None

    @property
    def sent_digest(self) -> MessageDigest:
        """The running digest of the response messages sent."""
        return self._sent

    @property
    def headers(self) -> Metadata:
        """The headers sent (empty if none yet)."""
        return self._headers_sent or ()

    async def read(self) -> bytes | None:
        """The next request message; None only after a valid request seal (or for server streams, after one)."""
        if self._done:
            return None
        env = self._call.envelope
        call_type: CallType = env.value.call_type
        try:
            frame: Any = await self._context.read()
            if isinstance(frame, bytes):
                frame = parse_relay_request(frame, unary=False)
        except DecodeError as exc:
            # grpc deserialises each frame inside read(): a garbage frame must end the call as a
            # refusal (sealed, recorded), not escape as UNKNOWN with protobuf's text and no close record.
            raise InvalidArgument(f"relay frame {self._received.count} does not parse: {exc}") from exc
        if frame is grpc.aio.EOF:
            if call_type is CallType.SERVER_STREAM and self._received.count == 1:
                self._done = True
                return None
            raise Unauthenticated("request stream ended without a request seal")
        kind = frame.WhichOneof("kind")
        if kind == "message":
            message = frame.message
            if message.seq != self._received.count:
                raise InvalidArgument(f"request message {message.seq} out of sequence")
            data: bytes = message.data  # each read of the field is a fresh copy of the payload: read it once
            self._received.update(data)
            self._call.request_messages = self._received.count
            if call_type is CallType.SERVER_STREAM:
                if self._received.count > 1:
                    raise InvalidArgument("server-streaming call with more than one request message")
                self._verifier.verify_messages(env, self._received.digest, self._received.count)
                self._call.request_digest = self._received.digest
            return data
        if kind == "request_seal" and call_type.client_streams:
            self._verifier.verify_request_seal(
                frame.request_seal, envelope=env, digest=self._received.digest, count=self._received.count
            )
            self._call.request_digest = self._received.digest
            self._done = True
            return None
        raise InvalidArgument(f"unexpected relay frame {kind!r} in the request stream")

    async def send_initial_metadata(self, md: Metadata) -> None:
        """Send the backend's headers as a Headers frame (none when they are empty: the seal still binds them).

        `Unavailable` (nothing sent) when the seal could not carry them (`carried_metadata`).
        """
        wire = carried_metadata(md, what=_backend(self._call))
        self._headers_sent = md
        if not wire:
            return  # the origin takes no Headers frame as empty headers, and checks that against the seal
        await self._send(
            relay_pb2.RelayFrame(
                headers=relay_pb2.Headers(metadata=[relay_pb2.MetadataEntry(key=k, value=v) for k, v in wire])
            )
        )

    async def write(self, data: bytes) -> None:
        """Send one response message, numbered (`DeadlineExceeded` if the origin takes none before the deadline)."""
        seq = self._sent.update(data)
        self._call.response_messages = self._sent.count
        await self._send(_message_frame(seq, data))

    async def _send(self, frame: relay_pb2.RelayFrame) -> None:
        # An origin that takes nothing (grants no credit on a relay link) must not hold the call past its
        # deadline: the pump waits here, where no backend's timeout reaches it.
        remaining = None if self._clock is None else self._call.remaining(self._clock.monotonic())
        if remaining is None:
            await self._context.write(frame)
            return
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                await self._context.write(frame)
        except TimeoutError:
            raise DeadlineExceeded(
                "the origin gateway took no more of the response within the call's deadline"
            ) from None


def response_seal_for(
    call: Call, reply: Reply, *, host_gateway: str, force: str, digest: MessageDigest, headers: Metadata, clock: Clock
) -> ResponseSeal:
    """The response seal for a call the host answered (allowed or refused after the envelope verified)."""
    verified = call.envelope
    decision = call.decision
    return ResponseSeal(
        request_id=call.request_id,
        envelope_digest=verified.digest,
        host_force=force,
        host_gateway=host_gateway,
        status_code=reply.code.value[0],
        status_message=reply.details,
        initial_metadata=to_relay_entries(headers),
        trailing_metadata=to_relay_entries(reply.trailing_metadata),
        messages_digest=digest.digest,
        message_count=digest.count,
        issued_at=clock.now(),
        decision_id=getattr(decision, "decision_id", "") or "",
        policy_version=getattr(decision, "policy_version", "") or "",
    )
