"""Signed request envelopes and seals between gateways (pure: no sockets, no files but `Signer.from_files`).

A relayed call carries three signed structures (protos/psn/gateway/v1/relay.proto):

- the **request envelope** (origin gateway): who asks (the verified principal),
  why (the purpose), what (host force, application, method, call type), when
  (issue time, deadline), the request id and, for unary and server-streaming
  calls, the digest of the request message;
- the **request seal** (origin gateway, client and bidi streams only): closes the
  request side with the digest and count of every message sent, bound to the
  envelope by its digest;
- the **response seal** (host gateway): the status, the response metadata and the
  digest of every response message, bound to the request envelope's digest, so a
  response cannot be moved to another call (X-Road binds responses the same way).

Signing. Each structure is a ``*Body`` protobuf, serialised canonically
(deterministic, known fields only) and signed as those exact bytes; the
signature covers ``context || 0x00 || body`` where the context names the
structure (``psn-gateway/v1 request-envelope``, ``... request-seal``,
``... response-seal``), so a signature over one kind of structure can never be
presented as another. Keys are the gateway's **signing key**, separate from its
TLS key, with a certificate from its force's CA for `Usage.SIGNING`: Ed25519
(default) or ECDSA P-256 with SHA-256, whose signature is sent as raw
``r || s`` (64 bytes) with low ``s``, so signatures are not malleable.

Verifying. The signature is checked over the body bytes before the body is
parsed; parsing is strict (right version, no unknown fields, canonical
encoding, known call type, every field within bounds), so the bytes an auditor
re-parses mean exactly one thing.

Message digests (`MessageDigest`) chain every message with its sequence number:
``d0 = SHA-256("psn-gateway/v1 messages")``,
``d_i = SHA-256(d_{i-1} || u64be(seq) || SHA-256(data))``, ``seq`` from 0.

Errors, consistently:

- `Unauthenticated`: anything that means "this is not what the origin (or host)
  gateway signed, or not for us now": a bad signature or signer certificate, a
  signer of the wrong kind or force, a signer that is not the TLS peer, a
  principal of another force, an envelope addressed to another host, an issue
  time outside the window, a replayed request id, a seal that belongs to
  another call, a missing seal, and a message digest, count or sequence that
  does not match (messages altered, dropped or reordered in transit).
- `InvalidArgument`: a body that is signed correctly but malformed (does not
  parse, wrong version, unknown fields, out-of-bounds values).
- `ResourceExhausted`: a body or certificate over the size limits (checked
  before any cryptography), or a full replay store.
- `DeadlineExceeded`: the envelope's deadline has passed, or was not after its
  issue time.
- `RevocationDataUnavailable`: the signer's force's CRL is unusable (from
  `TrustStore.verify`; fail closed).

Owns: the envelope and seal values, their encoding, signing and verification.
Does not own: relaying frames (`gateway.relay`), deciding policy, the replay
store's storage (`gateway.replay`; `ReplayStore` and `InMemoryReplayStore` are
re-exported here for convenience).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from google.protobuf.message import DecodeError, Message

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.clock import Clock
from gateway.directory import CallType
from gateway.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from gateway.identity import PeerIdentity, TrustStore, Usage
from gateway.metadata import check_relayed_metadata
from gateway.principal import Principal, Purpose
from gateway.purpose import check_carried
from gateway.replay import InMemoryReplayStore, ReplayStore

__all__ = [
    "CONTEXT_ENVELOPE",
    "CONTEXT_REQUEST_SEAL",
    "CONTEXT_RESPONSE_SEAL",
    "MAX_STATUS_MESSAGE",
    "VERSION",
    "Envelope",
    "EnvelopeVerifier",
    "InMemoryReplayStore",
    "MessageDigest",
    "ReplayStore",
    "RequestSeal",
    "ResponseSeal",
    "Signer",
    "Verified",
    "check_signature",
    "envelope_body",
    "parse_envelope_body",
    "parse_request_seal_body",
    "parse_response_seal_body",
    "request_seal_body",
    "response_seal_body",
    "seal_envelope",
    "seal_request",
    "seal_response",
]

#: The body version this code writes and accepts.
VERSION = 1
CONTEXT_ENVELOPE = b"psn-gateway/v1 request-envelope"
CONTEXT_REQUEST_SEAL = b"psn-gateway/v1 request-seal"
CONTEXT_RESPONSE_SEAL = b"psn-gateway/v1 response-seal"
_MESSAGES_CONTEXT = b"psn-gateway/v1 messages"

_DIGEST_LEN = 32
_SIGNATURE_LEN = 64
_MAX_CERT_BYTES = 16 * 1024
#: the longest status message a response seal carries (characters)
MAX_STATUS_MESSAGE = 4096
_MAX_LIST = 32
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
_OFFICER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_CLEARANCE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_METHOD = re.compile(r"/[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+/[A-Za-z_][A-Za-z0-9_]*")
_SPIFFE = re.compile(r"spiffe://[a-z0-9._-]{1,255}/[A-Za-z0-9._/-]{1,255}")
_DECISION = re.compile(r"[\x21-\x7e]{0,128}")
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

_CALL_TYPES: dict[CallType, int] = {
    CallType.UNARY: relay_pb2.UNARY,
    CallType.SERVER_STREAM: relay_pb2.SERVER_STREAM,
    CallType.CLIENT_STREAM: relay_pb2.CLIENT_STREAM,
    CallType.BIDI_STREAM: relay_pb2.BIDI_STREAM,
}
_CALL_TYPES_BACK = {v: k for k, v in _CALL_TYPES.items()}

T = TypeVar("T")
M = TypeVar("M", bound=Message)
Metadata = tuple[tuple[str, bytes], ...]


# -- message digests --------------------------------------------------------------


class MessageDigest:
    """The running digest over a call's messages in one direction (see the module docstring)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256(_MESSAGES_CONTEXT).digest()
        self._count = 0

    def update(self, data: bytes, seq: int | None = None) -> int:
        """Add the next message; return the sequence number it got.

        If `seq` is given (the number a relay frame carried), it must be the
        next one: a gap or a reordering is `Unauthenticated`.
        """
        if seq is not None and seq != self._count:
            raise Unauthenticated(f"message sequence {seq} arrived where {self._count} was expected")
        used = self._count
        self._digest = hashlib.sha256(self._digest + used.to_bytes(8, "big") + hashlib.sha256(data).digest()).digest()
        self._count += 1
        return used

    @property
    def digest(self) -> bytes:
        """The digest over every message so far."""
        return self._digest

    @property
    def count(self) -> int:
        """How many messages so far."""
        return self._count

    @classmethod
    def of(cls, *messages: bytes) -> MessageDigest:
        """The digest over `messages`, in order."""
        out = cls()
        for data in messages:
            out.update(data)
        return out


# -- values -----------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """A request envelope: what the origin gateway vouches for.

    Times are seconds since the epoch, carried with millisecond precision.
    `origin_gateway` is the SPIFFE ID of the origin gateway (its signing
    certificate's). For unary and server-streaming calls `messages_digest` and
    `message_count` (1) cover the one request message; for client and bidi
    streams they are None and 0, and the request seal carries them.
    """

    request_id: str
    origin_force: str
    origin_gateway: str
    host_force: str
    application: str
    method: str
    call_type: CallType
    principal: Principal
    purpose: Purpose
    issued_at: float
    deadline: float | None
    messages_digest: bytes | None
    message_count: int
    metadata: Metadata
    origin_decision_id: str = ""
    origin_policy_version: str = ""


@dataclass(frozen=True)
class RequestSeal:
    """Closes the request side of a client or bidi stream."""

    request_id: str
    envelope_digest: bytes
    messages_digest: bytes
    message_count: int
    issued_at: float


@dataclass(frozen=True)
class ResponseSeal:
    """The host gateway's signed account of a response, bound to the request envelope."""

    request_id: str
    envelope_digest: bytes
    host_force: str
    host_gateway: str
    status_code: int
    status_message: str
    initial_metadata: Metadata
    trailing_metadata: Metadata
    messages_digest: bytes
    message_count: int
    issued_at: float
    decision_id: str
    policy_version: str


@dataclass(frozen=True)
class Verified(Generic[T]):
    """A verified structure: its value, the digest and bytes of its body, who signed it and the signature."""

    value: T
    #: SHA-256 of the signed body bytes
    digest: bytes
    signer: PeerIdentity
    signature: bytes
    #: the exact signed bytes (for the audit log: re-verifiable later)
    body: bytes


# -- encoding -----------------------------------------------------------------------


def _ms(t: float) -> int:
    return round(t * 1000)


def _entries(md: Metadata) -> list[relay_pb2.MetadataEntry]:
    return [relay_pb2.MetadataEntry(key=k, value=v) for k, v in md]


def envelope_body(env: Envelope) -> bytes:
    """The canonical body bytes of `env` (what is signed)."""
    body = relay_pb2.EnvelopeBody(
        version=VERSION,
        request_id=env.request_id,
        origin_force=env.origin_force,
        origin_gateway=env.origin_gateway,
        host_force=env.host_force,
        application=env.application,
        method=env.method,
        call_type=_CALL_TYPES[env.call_type],  # type: ignore[arg-type]  # the stub's enum type is a NewType of int
        principal=relay_pb2.Principal(
            officer_id=env.principal.officer_id,
            force=env.principal.force,
            units=env.principal.units,
            roles=env.principal.roles,
            clearance=env.principal.clearance,
        ),
        purpose=relay_pb2.Purpose(
            justification=env.purpose.justification,
            case_reference=env.purpose.case_reference,
            text=env.purpose.text,
        ),
        issued_at_ms=_ms(env.issued_at),
        deadline_ms=_ms(env.deadline) if env.deadline is not None else 0,
        messages_digest=env.messages_digest or b"",
        message_count=env.message_count,
        metadata=_entries(env.metadata),
        origin_decision_id=env.origin_decision_id,
        origin_policy_version=env.origin_policy_version,
    )
    return body.SerializeToString(deterministic=True)


def request_seal_body(seal: RequestSeal) -> bytes:
    """The canonical body bytes of a request seal."""
    return relay_pb2.RequestSealBody(
        version=VERSION,
        request_id=seal.request_id,
        envelope_digest=seal.envelope_digest,
        messages_digest=seal.messages_digest,
        message_count=seal.message_count,
        issued_at_ms=_ms(seal.issued_at),
    ).SerializeToString(deterministic=True)


def response_seal_body(seal: ResponseSeal) -> bytes:
    """The canonical body bytes of a response seal."""
    return relay_pb2.ResponseSealBody(
        version=VERSION,
        request_id=seal.request_id,
        envelope_digest=seal.envelope_digest,
        host_force=seal.host_force,
        host_gateway=seal.host_gateway,
        status_code=seal.status_code,
        status_message=seal.status_message,
        initial_metadata=_entries(seal.initial_metadata),
        trailing_metadata=_entries(seal.trailing_metadata),
        messages_digest=seal.messages_digest,
        message_count=seal.message_count,
        issued_at_ms=_ms(seal.issued_at),
        decision_id=seal.decision_id,
        policy_version=seal.policy_version,
    ).SerializeToString(deterministic=True)


def _parse_strict(message: M, body: bytes, what: str) -> M:
    """Parse `body` into `message`; refuse unknown fields and non-canonical encodings."""
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise InvalidArgument(f"{what} body does not parse: {exc}") from exc
    with_unknown = message.SerializeToString(deterministic=True)
    message.DiscardUnknownFields()
    canonical = message.SerializeToString(deterministic=True)
    if canonical != with_unknown:
        raise InvalidArgument(f"{what} body has unknown fields (a newer or forged format)")
    if canonical != body:
        raise InvalidArgument(f"{what} body is not canonically encoded")
    return message


def _invalid(what: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{what}: {problem}")


def _check_version(version: int, what: str) -> None:
    if version != VERSION:
        raise _invalid(what, f"version {version} is not {VERSION}")


def _check_text(value: str, pattern: re.Pattern[str], what: str, field: str) -> str:
    if not pattern.fullmatch(value):
        raise _invalid(what, f"{field} {value[:80]!r} is malformed")
    return value


def _check_time(ms: int, what: str, field: str) -> float:
    if ms <= 0:
        raise _invalid(what, f"{field} is not a time")
    return ms / 1000


def _check_digest(value: bytes, what: str, field: str) -> bytes:
    if len(value) != _DIGEST_LEN:
        raise _invalid(what, f"{field} is not a SHA-256 digest")
    return value


def _metadata(entries: object, what: str, *, status_details: bool = False) -> Metadata:
    out = tuple((e.key, e.value) for e in entries)  # type: ignore[attr-defined]  # repeated MetadataEntry
    try:
        check_relayed_metadata(out, status_details=status_details)
    except InvalidArgument as exc:
        raise _invalid(what, exc.reason) from exc
    return out


def _principal(p: relay_pb2.Principal, what: str) -> Principal:
    if len(p.units) > _MAX_LIST or len(p.roles) > _MAX_LIST:
        raise _invalid(what, "principal has too many units or roles")
    for name in (*p.units, *p.roles):
        _check_text(name, _NAME, what, "principal unit/role")
    return Principal(
        officer_id=_check_text(p.officer_id, _OFFICER_ID, what, "principal officer_id"),
        force=_check_text(p.force, _NAME, what, "principal force"),
        units=tuple(p.units),
        roles=tuple(p.roles),
        clearance=_check_text(p.clearance, _CLEARANCE, what, "principal clearance"),
    )


def _purpose(p: relay_pb2.Purpose, what: str) -> Purpose:
    if not p.justification or not p.case_reference or not p.text:
        raise _invalid(what, "purpose is incomplete")
    purpose = Purpose(p.justification, p.case_reference, p.text)
    try:
        check_carried(purpose)
    except InvalidArgument as exc:
        raise _invalid(what, exc.reason) from exc
    return purpose


def parse_envelope_body(body: bytes) -> Envelope:
    """Strictly parse envelope body bytes; `InvalidArgument` if malformed."""
    what = "envelope"
    b = _parse_strict(relay_pb2.EnvelopeBody(), body, what)
    _check_version(b.version, what)
    call_type = _CALL_TYPES_BACK.get(b.call_type)
    if call_type is None:
        raise _invalid(what, f"call type {b.call_type} is unknown")
    if not b.HasField("principal") or not b.HasField("purpose"):
        raise _invalid(what, "principal or purpose missing")
    issued_at = _check_time(b.issued_at_ms, what, "issued_at")
    deadline = None if b.deadline_ms == 0 else _check_time(b.deadline_ms, what, "deadline")
    if deadline is not None and deadline <= issued_at:
        raise DeadlineExceeded(f"{what}: deadline is not after the issue time (it passed before the call was relayed)")
    if call_type.client_streams:
        if b.messages_digest or b.message_count:
            raise _invalid(what, "a client or bidi stream's messages belong in the request seal")
        digest: bytes | None = None
    else:
        digest = _check_digest(b.messages_digest, what, "messages_digest")
        if b.message_count != 1:
            raise _invalid(what, f"a {call_type} call has one request message, not {b.message_count}")
    return Envelope(
        request_id=_check_text(b.request_id, _REQUEST_ID, what, "request_id"),
        origin_force=_check_text(b.origin_force, _NAME, what, "origin_force"),
        origin_gateway=_check_text(b.origin_gateway, _SPIFFE, what, "origin_gateway"),
        host_force=_check_text(b.host_force, _NAME, what, "host_force"),
        application=_check_text(b.application, _NAME, what, "application"),
        method=_check_text(b.method, _METHOD, what, "method"),
        call_type=call_type,
        principal=_principal(b.principal, what),
        purpose=_purpose(b.purpose, what),
        issued_at=issued_at,
        deadline=deadline,
        messages_digest=digest,
        message_count=b.message_count,
        metadata=_metadata(b.metadata, what),
        origin_decision_id=_check_text(b.origin_decision_id, _DECISION, what, "origin_decision_id"),
        origin_policy_version=_check_text(b.origin_policy_version, _DECISION, what, "origin_policy_version"),
    )


def parse_request_seal_body(body: bytes) -> RequestSeal:
    """Strictly parse request-seal body bytes; `InvalidArgument` if malformed."""
    what = "request seal"
    b = _parse_strict(relay_pb2.RequestSealBody(), body, what)
    _check_version(b.version, what)
    return RequestSeal(
        request_id=_check_text(b.request_id, _REQUEST_ID, what, "request_id"),
        envelope_digest=_check_digest(b.envelope_digest, what, "envelope_digest"),
        messages_digest=_check_digest(b.messages_digest, what, "messages_digest"),
        message_count=b.message_count,
        issued_at=_check_time(b.issued_at_ms, what, "issued_at"),
    )


def parse_response_seal_body(body: bytes) -> ResponseSeal:
    """Strictly parse response-seal body bytes; `InvalidArgument` if malformed."""
    what = "response seal"
    b = _parse_strict(relay_pb2.ResponseSealBody(), body, what)
    _check_version(b.version, what)
    if not 0 <= b.status_code <= 16:
        raise _invalid(what, f"status code {b.status_code} is not a gRPC status")
    if len(b.status_message) > MAX_STATUS_MESSAGE:
        raise _invalid(what, "status message too long")
    return ResponseSeal(
        request_id=_check_text(b.request_id, _REQUEST_ID, what, "request_id"),
        envelope_digest=_check_digest(b.envelope_digest, what, "envelope_digest"),
        host_force=_check_text(b.host_force, _NAME, what, "host_force"),
        host_gateway=_check_text(b.host_gateway, _SPIFFE, what, "host_gateway"),
        status_code=b.status_code,
        status_message=b.status_message,
        initial_metadata=_metadata(b.initial_metadata, what),
        trailing_metadata=_metadata(b.trailing_metadata, what, status_details=True),
        messages_digest=_check_digest(b.messages_digest, what, "messages_digest"),
        message_count=b.message_count,
        issued_at=_check_time(b.issued_at_ms, what, "issued_at"),
        decision_id=_check_text(b.decision_id, _DECISION, what, "decision_id"),
        policy_version=_check_text(b.policy_version, _DECISION, what, "policy_version"),
    )


# -- signing ------------------------------------------------------------------------

SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyingKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def _message(context: bytes, body: bytes) -> bytes:
    return context + b"\x00" + body


def _spki(key: VerifyingKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class Signer:
    """One gateway signing key and its certificate: Ed25519 (default) or ECDSA P-256/SHA-256."""

    def __init__(self, private_key: SigningKey, certificate: x509.Certificate) -> None:
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            self.algorithm = "ed25519"
        elif isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(private_key.curve, ec.SECP256R1):
            self.algorithm = "ecdsa-p256-sha256"
        else:
            raise ConfigError("a signing key must be Ed25519 or ECDSA P-256")
        public = certificate.public_key()
        if not isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) or _spki(public) != _spki(
            private_key.public_key()
        ):
            raise ConfigError("the signing key does not match the signing certificate")
        self._key = private_key
        self.certificate = certificate
        self._der = certificate.public_bytes(serialization.Encoding.DER)
        try:
            sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise ConfigError("the signing certificate must carry exactly one URI SAN (its SPIFFE ID)")
        #: the SPIFFE ID the certificate names (the gateway's)
        self.spiffe_id: str = uris[0]

    @classmethod
    def from_files(cls, cert_path: Path, key_path: Path) -> Signer:
        """Load a PEM certificate and PEM private key; `ConfigError` naming the file at fault."""
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load signing certificate: {exc}", file=cert_path) from exc
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load signing key: {exc}", file=key_path) from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError("a signing key must be Ed25519 or ECDSA P-256", file=key_path)
        try:
            return cls(key, cert)
        except ConfigError as exc:
            raise ConfigError(exc.message, file=key_path) from exc

    def sign(self, context: bytes, body: bytes) -> relay_pb2.Signed:
        """Sign `body` for the structure named by `context`."""
        message = _message(context, body)
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            signature = self._key.sign(message)
        else:
            r, s = decode_dss_signature(self._key.sign(message, ec.ECDSA(hashes.SHA256())))
            if s > _P256_ORDER // 2:
                s = _P256_ORDER - s
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return relay_pb2.Signed(body=body, signer_certificate=self._der, signature=signature)


def check_signature(public_key: VerifyingKey, context: bytes, body: bytes, signature: bytes) -> bool:
    """Whether `signature` is a valid signature of `body` in `context` (for auditors re-checking bundles)."""
    if len(signature) != _SIGNATURE_LEN:
        return False
    message = _message(context, body)
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
            return True
        if not isinstance(public_key.curve, ec.SECP256R1):
            return False
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        if not (0 < r < _P256_ORDER and 0 < s <= _P256_ORDER // 2):
            return False
        public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def seal_envelope(env: Envelope, signer: Signer) -> tuple[relay_pb2.Signed, bytes]:
    """Sign a request envelope; return it and its digest (SHA-256 of the body).

    The body is parsed back first (`InvalidArgument` if malformed): a gateway
    never signs what its peer would refuse.
    """
    body = envelope_body(env)
    parse_envelope_body(body)
    return signer.sign(CONTEXT_ENVELOPE, body), hashlib.sha256(body).digest()


def seal_request(seal: RequestSeal, signer: Signer) -> relay_pb2.Signed:
    """Sign a request seal (checked like `seal_envelope`)."""
    body = request_seal_body(seal)
    parse_request_seal_body(body)
    return signer.sign(CONTEXT_REQUEST_SEAL, body)


def seal_response(seal: ResponseSeal, signer: Signer) -> relay_pb2.Signed:
    """Sign a response seal (checked like `seal_envelope`)."""
    body = response_seal_body(seal)
    parse_response_seal_body(body)
    return signer.sign(CONTEXT_RESPONSE_SEAL, body)


# -- verification ---------------------------------------------------------------------


class EnvelopeVerifier:
    """Verifies envelopes and seals for one gateway (see the module docstring for the error families).

    `trust` returns the current `TrustStore` (it is swapped on reload).
    `window` bounds the difference between an issue time and now, in both
    directions. `max_deadline` bounds how far after its issue time an
    envelope's deadline may be.
    """

    def __init__(
        self,
        *,
        trust: Callable[[], TrustStore],
        own_force: str,
        window: float,
        replay: ReplayStore,
        clock: Clock,
        max_body_bytes: int = 65536,
        max_deadline: float = 86400.0,
    ) -> None:
        self._trust = trust
        self._own_force = own_force
        self._window = window
        self._replay = replay
        self._clock = clock
        self._max_body = max_body_bytes
        self._max_deadline = max_deadline
        self._keys: OrderedDict[bytes, VerifyingKey] = OrderedDict()
        self._keys_lock = threading.Lock()

    # -- the shared signature check --

    def _public_key(self, der: bytes) -> VerifyingKey:
        """The public key of a certificate the trust store already accepted (parsed once, LRU)."""
        fingerprint = hashlib.sha256(der).digest()
        with self._keys_lock:
            key = self._keys.get(fingerprint)
            if key is not None:
                self._keys.move_to_end(fingerprint)
                return key
        public = x509.load_der_x509_certificate(der).public_key()
        if not isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise Unauthenticated("signer key is not Ed25519 or ECDSA")
        with self._keys_lock:
            self._keys[fingerprint] = public
            if len(self._keys) > 256:
                self._keys.popitem(last=False)
        return public

    def _check_signed(self, signed: relay_pb2.Signed, context: bytes, what: str) -> tuple[PeerIdentity, bytes]:
        """Check sizes, the signer certificate and the signature; return (signer, body digest)."""
        if len(signed.body) > self._max_body:
            raise ResourceExhausted(f"{what} body is {len(signed.body)} bytes, over {self._max_body}")
        if not signed.signer_certificate or len(signed.signer_certificate) > _MAX_CERT_BYTES:
            raise Unauthenticated(f"{what} has no signer certificate, or one over {_MAX_CERT_BYTES} bytes")
        if not signed.body:
            raise InvalidArgument(f"{what} body is empty")
        if signed.signer_certificate.lstrip().startswith(b"-----"):
            raise Unauthenticated(f"{what} signer certificate is not DER")
        try:
            signer = self._trust().verify(signed.signer_certificate, Usage.SIGNING, self._clock.now())
        except (ValueError, x509.DuplicateExtension, x509.InvalidVersion) as exc:
            # cryptography parses lazily: a corrupt certificate can fail inside the trust store's checks
            # with these rather than Unauthenticated (reported against gateway.identity).
            raise Unauthenticated(f"{what} signer certificate is malformed: {exc!r}") from exc
        if signer.kind != "gateway":
            raise Unauthenticated(f"{what} signed by {signer.describe()}, which is not a gateway")
        key = self._public_key(signed.signer_certificate)
        if not check_signature(key, context, signed.body, signed.signature):
            raise Unauthenticated(f"{what} signature by {signer.describe()} does not verify")
        return signer, hashlib.sha256(signed.body).digest()

    def _check_window(self, issued_at: float, what: str) -> None:
        skew = self._clock.now() - issued_at
        if abs(skew) > self._window:
            direction = "old" if skew > 0 else "in the future"
            raise Unauthenticated(
                f"{what} issue time is {abs(skew):.1f} s {direction}, outside the {self._window:g} s window"
            )

    # -- request envelope --

    def verify_envelope(self, signed: relay_pb2.Signed, *, peer: PeerIdentity) -> Verified[Envelope]:
        """Verify a request envelope from the TLS peer `peer` (module docstring: what is checked)."""
        if peer.kind != "gateway":
            raise Unauthenticated(f"relay peer {peer.describe()} is not a gateway")
        signer, digest = self._check_signed(signed, CONTEXT_ENVELOPE, "envelope")
        if signer.force != peer.force:
            raise Unauthenticated(
                f"envelope signed by force {signer.force}'s gateway but relayed by {peer.describe()} of force "
                f"{peer.force}"
            )
        env = parse_envelope_body(signed.body)
        if env.origin_force != signer.force:
            raise Unauthenticated(f"envelope names origin force {env.origin_force} but is signed by {signer.force}")
        if env.origin_gateway != signer.spiffe_id:
            raise Unauthenticated(f"envelope names origin gateway {env.origin_gateway}, signer is {signer.spiffe_id}")
        if env.principal.force != env.origin_force:
            raise Unauthenticated(
                f"envelope principal {env.principal.officer_id} is of force {env.principal.force}, "
                f"not the origin force {env.origin_force}"
            )
        if env.host_force != self._own_force:
            raise Unauthenticated(f"envelope is addressed to force {env.host_force}, not to {self._own_force}")
        self._check_window(env.issued_at, "envelope")
        now = self._clock.now()
        if env.deadline is not None:
            if env.deadline - env.issued_at > self._max_deadline:
                raise InvalidArgument(f"envelope deadline is more than {self._max_deadline:g} s after its issue time")
            if env.deadline <= now:
                raise DeadlineExceeded(f"envelope deadline passed {now - env.deadline:.3f} s ago")
        key = f"{env.origin_force}/{env.request_id}"
        if not self._replay.remember(key, env.issued_at + self._window, now, force=env.origin_force):
            raise Unauthenticated(f"replayed request id {env.request_id} from force {env.origin_force}")
        return Verified(env, digest, signer, signed.signature, signed.body)

    def verify_messages(self, env: Verified[Envelope], digest: bytes, count: int) -> None:
        """Check that the request message that arrived is the one a unary/server-stream envelope signed."""
        value = env.value
        if value.messages_digest is None:
            raise InvalidArgument(f"a {value.call_type} call's messages are checked by its request seal")
        if count != value.message_count or not hmac.compare_digest(digest, value.messages_digest):
            raise Unauthenticated(
                f"request {value.request_id}: the message that arrived is not the one the envelope signed "
                f"({count} message(s), digest {digest.hex()[:16]}...)"
            )

    # -- request seal --

    def verify_request_seal(
        self, signed: relay_pb2.Signed | None, *, envelope: Verified[Envelope], digest: bytes, count: int
    ) -> Verified[RequestSeal]:
        """Verify the seal closing a client/bidi stream against the envelope and what arrived.

        `signed` None means the stream half-closed without a seal: `Unauthenticated`.
        """
        env = envelope.value
        if not env.call_type.client_streams:
            raise InvalidArgument(f"a {env.call_type} call has no request seal")
        if signed is None:
            raise Unauthenticated(f"request {env.request_id}: stream ended without a request seal")
        signer, seal_digest = self._check_signed(signed, CONTEXT_REQUEST_SEAL, "request seal")
        if signer.spiffe_id != envelope.signer.spiffe_id:
            raise Unauthenticated(
                f"request seal signed by {signer.spiffe_id}, the envelope by {envelope.signer.spiffe_id}"
            )
        seal = parse_request_seal_body(signed.body)
        if seal.request_id != env.request_id or not hmac.compare_digest(seal.envelope_digest, envelope.digest):
            raise Unauthenticated(f"request seal belongs to another call (request {seal.request_id})")
        if seal.issued_at < env.issued_at or seal.issued_at > self._clock.now() + self._window:
            raise Unauthenticated("request seal issue time is before the envelope's or in the future")
        if seal.message_count != count or not hmac.compare_digest(seal.messages_digest, digest):
            raise Unauthenticated(
                f"request {env.request_id}: the messages that arrived ({count}) are not the ones sealed "
                f"({seal.message_count})"
            )
        return Verified(seal, seal_digest, signer, signed.signature, signed.body)

    # -- response seal --

    def verify_response_seal(
        self,
        signed: relay_pb2.Signed | None,
        *,
        envelope_digest: bytes,
        request_id: str,
        host_force: str,
        digest: bytes,
        count: int,
    ) -> Verified[ResponseSeal]:
        """Verify the host's response seal against our request and the response messages that arrived."""
        if signed is None:
            raise Unauthenticated(f"request {request_id}: the response carries no seal")
        signer, seal_digest = self._check_signed(signed, CONTEXT_RESPONSE_SEAL, "response seal")
        if signer.force != host_force:
            raise Unauthenticated(f"response seal signed by force {signer.force}, not the host force {host_force}")
        seal = parse_response_seal_body(signed.body)
        if seal.host_force != host_force or seal.host_gateway != signer.spiffe_id:
            raise Unauthenticated(
                f"response seal names host {seal.host_force} ({seal.host_gateway}), signer is {signer.spiffe_id}"
            )
        if seal.request_id != request_id or not hmac.compare_digest(seal.envelope_digest, envelope_digest):
            raise Unauthenticated(f"response seal belongs to another call (request {seal.request_id})")
        self._check_window(seal.issued_at, "response seal")
        if seal.message_count != count or not hmac.compare_digest(seal.messages_digest, digest):
            raise Unauthenticated(
                f"request {request_id}: the response messages that arrived ({count}) are not the ones sealed "
                f"({seal.message_count})"
            )
        return Verified(seal, seal_digest, signer, signed.signature, signed.body)
