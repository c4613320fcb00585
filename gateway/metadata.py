"""Header hygiene: which metadata an application may send, and what travels on.

The contract with applications (language-neutral; `gateway.client` implements
it for Python):

========================== ============ ============================================================
key                        from the app what the gateway does
========================== ============ ============================================================
``authorization``          required     ``Bearer <jwt>``, the officer token (`gateway.token`); one
                                        entry. Verified at the origin gateway and **never forwarded**:
                                        the host gateway sees the signed, verified principal instead.
``psn-purpose-code``       required     justification code (`gateway.purpose`); one entry
``psn-purpose-case``       required     case or incident reference; one entry
``psn-purpose-text``       required     free text, percent-encoded UTF-8; one entry
``psn-gw-*``               refused      the gateway's own headers: an application sending one gets
                                        INVALID_ARGUMENT (it could otherwise pose as the gateway
                                        toward a backend)
other ``psn-*``            refused      the gateway's namespace; refused so a typo is not ignored
``grpc-*``, ``:*``,        dropped      gRPC and HTTP/2 transport headers: set by each hop's own
``content-type``, ``te``,               gRPC stack, never copied from one call to the next
``user-agent``, ``host``,
``connection``, ...
anything else              forwarded    end to end to the hosted application (``-bin`` keys carry
                                        bytes, others printable ASCII)
========================== ============ ============================================================

In responses, ``grpc-status-details-bin`` (the application's rich error
status) is the one transport key carried back, in trailing metadata only.

Toward the hosted application the gateway adds (`backend_metadata`) — the
backend trusts them because only its gateway can reach it over mTLS:

=========================== ==================================================
``psn-gw-request-id``       the gateway request id (also in the audit log)
``psn-gw-officer``          the officer id
``psn-gw-force``            the officer's (origin) force
``psn-gw-units``            the officer's units, comma-separated
``psn-gw-roles``            the officer's roles, comma-separated
``psn-gw-clearance``        the officer's vetting level
``psn-gw-purpose-code``     the justification code
``psn-gw-purpose-case``     the case reference
``psn-gw-purpose-text``     the free text, percent-encoded UTF-8
=========================== ==================================================

and strips every ``psn-*`` key (the gateway's namespace), ``authorization`` and
the transport headers from what the application answers
(`strip_response_metadata`), so a response cannot pose as the gateway either.

Limits (`split_metadata`): at most ``max_entries`` entries and
``max_total_bytes`` of keys plus values (counted after the transport headers are
dropped); keys are gRPC header names (``0-9 a-z _ - .``, at most 255); values
of keys not ending ``-bin`` are printable ASCII. Every breach is
`InvalidArgument`, except a malformed ``authorization`` value (not ``Bearer``),
which is `Unauthenticated` like every other token failure, so clients know to
fix their credentials.

Owns: sorting metadata into token, purpose fields and pass-through; the
gateway's own headers. Does not own: verifying the token or the purpose.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from gateway.errors import InvalidArgument, Unauthenticated
from gateway.principal import Principal, Purpose
from gateway.purpose import PURPOSE_PREFIX, encode_text

__all__ = [
    "AUTHORIZATION",
    "GATEWAY_PREFIX",
    "STATUS_DETAILS",
    "CallMetadata",
    "backend_metadata",
    "check_forwarded_size",
    "check_relayed_metadata",
    "from_relay_entries",
    "is_transport_key",
    "split_metadata",
    "strip_response_metadata",
    "to_relay_entries",
]

AUTHORIZATION = "authorization"
#: The trailing-metadata key that carries a rich error status (google.rpc.Status); travels in responses only.
STATUS_DETAILS = "grpc-status-details-bin"
GATEWAY_PREFIX = "psn-gw-"
_PSN_PREFIX = "psn-"

#: Transport headers: dropped, never forwarded (each hop's gRPC stack sets its own).
_TRANSPORT_KEYS = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "user-agent",
        "te",
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
    }
)
_TRANSPORT_PREFIXES = ("grpc-", ":")
_KEY = re.compile(r"[0-9a-z_.-]{1,255}")
_ASCII_VALUE = re.compile(r"[\x20-\x7e]*")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([!-~]+)")


@dataclass(frozen=True)
class CallMetadata:
    """An application's call metadata, sorted: token, purpose fields, the rest."""

    token: str | None
    purpose_fields: Mapping[str, str]
    passthrough: tuple[tuple[str, str | bytes], ...]
    #: transport keys that were dropped (for debugging; never forwarded)
    dropped: tuple[str, ...] = field(default=())


def is_transport_key(key: str) -> bool:
    """Whether `key` is a gRPC/HTTP transport header that is never forwarded."""
    return key in _TRANSPORT_KEYS or key.startswith(_TRANSPORT_PREFIXES)


def _check_entry(key: str, value: str | bytes) -> int:
    """Check one forwarded entry's syntax; return its size in bytes."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidArgument(f"metadata key {key!r} is not a valid gRPC header name")
    if key.endswith("-bin"):
        if not isinstance(value, bytes):
            raise InvalidArgument(f"metadata {key}: a -bin key must carry bytes")
        return len(key) + len(value)
    if not isinstance(value, str) or not _ASCII_VALUE.fullmatch(value):
        raise InvalidArgument(f"metadata {key}: value must be printable ASCII (or use a -bin key)")
    return len(key) + len(value)


def _bearer(value: str | bytes) -> str:
    match = _BEARER.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise Unauthenticated("authorization metadata is not 'Bearer <token>'")
    return match.group(1)


def split_metadata(
    md: Sequence[tuple[str, str | bytes]], *, max_entries: int = 64, max_total_bytes: int = 16384
) -> CallMetadata:
    """Sort an application's metadata into token, purpose fields and pass-through; refuse what is not allowed."""
    token: str | None = None
    purpose: dict[str, str] = {}
    passthrough: list[tuple[str, str | bytes]] = []
    dropped: list[str] = []
    count = total = 0
    for key, value in md:
        if isinstance(key, str) and is_transport_key(key):
            dropped.append(key)
            continue
        total += _check_entry(key, value)
        count += 1
        if count > max_entries:
            raise InvalidArgument(f"more than {max_entries} metadata entries")
        if total > max_total_bytes:
            raise InvalidArgument(f"metadata larger than {max_total_bytes} bytes")
        if key == AUTHORIZATION:
            if token is not None:
                raise InvalidArgument("more than one authorization entry")
            token = _bearer(value)
        elif key.startswith(GATEWAY_PREFIX):
            raise InvalidArgument(f"metadata key {key!r} is reserved for the gateway (psn-gw-*)")
        elif key.startswith(PURPOSE_PREFIX):
            if key in purpose:
                raise InvalidArgument(f"more than one {key} entry")
            if not isinstance(value, str):
                raise InvalidArgument(f"{key} must be a text value")
            purpose[key] = value
        elif key.startswith(_PSN_PREFIX):
            raise InvalidArgument(f"metadata key {key!r} is in the gateway's psn-* namespace but unknown")
        else:
            passthrough.append((key, value))
    return CallMetadata(token, MappingProxyType(purpose), tuple(passthrough), tuple(dropped))


def backend_metadata(*, request_id: str, principal: Principal, purpose: Purpose) -> tuple[tuple[str, str], ...]:
    """The ``psn-gw-*`` headers the gateway adds toward a hosted application."""
    return (
        ("psn-gw-request-id", request_id),
        ("psn-gw-officer", principal.officer_id),
        ("psn-gw-force", principal.force),
        ("psn-gw-units", ",".join(principal.units)),
        ("psn-gw-roles", ",".join(principal.roles)),
        ("psn-gw-clearance", principal.clearance),
        ("psn-gw-purpose-code", purpose.justification),
        ("psn-gw-purpose-case", purpose.case_reference),
        ("psn-gw-purpose-text", encode_text(purpose.text)),
    )


def strip_response_metadata(
    md: Iterable[tuple[str, str | bytes]], *, keep_status_details: bool = False
) -> tuple[tuple[str, str | bytes], ...]:
    """Response metadata without ``psn-*``, ``authorization`` or transport headers.

    `keep_status_details` keeps ``grpc-status-details-bin`` (for trailing metadata).
    """
    return tuple(
        (k, v)
        for k, v in md
        if (keep_status_details and k == STATUS_DETAILS)
        or not (k.startswith(_PSN_PREFIX) or k == AUTHORIZATION or is_transport_key(k))
    )


def check_relayed_metadata(
    entries: Iterable[tuple[str, bytes]],
    *,
    status_details: bool = False,
    max_entries: int = 64,
    max_total_bytes: int = 16384,
) -> None:
    """Check metadata carried in an envelope or seal; `InvalidArgument` if it breaks the contract.

    Relayed metadata holds only pass-through entries: no ``authorization``, no
    ``psn-*`` keys, no transport headers, and the syntax and limits above. With
    `status_details` (a response's trailing metadata), ``grpc-status-details-bin``
    is allowed: it carries the application's rich error status end to end.
    """
    total = 0
    for count, (key, value) in enumerate(entries, start=1):
        if count > max_entries:
            raise InvalidArgument(f"relayed metadata has more than {max_entries} entries")
        if key == AUTHORIZATION:
            raise InvalidArgument("relayed metadata carries authorization (tokens never leave the origin gateway)")
        if status_details and key == STATUS_DETAILS:
            pass
        elif key.startswith(_PSN_PREFIX) or is_transport_key(key):
            raise InvalidArgument(f"relayed metadata carries the reserved key {key!r}")
        if not isinstance(value, bytes):
            raise InvalidArgument(f"relayed metadata {key}: value is not bytes")
        if key.endswith("-bin"):
            total += _check_entry(key, value)
        else:
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(f"relayed metadata {key}: value is not ASCII") from exc
            total += _check_entry(key, text)
        if total > max_total_bytes:
            raise InvalidArgument(f"relayed metadata larger than {max_total_bytes} bytes")


def check_forwarded_size(md: Iterable[tuple[str, str | bytes]], max_bytes: int, *, what: str) -> None:
    """`InvalidArgument` if the metadata a gateway would forward to a backend is over `max_bytes`.

    The size is the sum of keys and values (`[limits] max_forwarded_metadata_bytes`): past grpc's
    own limit the backend refuses the call with a text that names every header, the gateway's too.
    """
    forwarded = sum(len(k) + len(v) for k, v in md)
    if forwarded > max_bytes:
        raise InvalidArgument(f"{what} is {forwarded} bytes, larger than the {max_bytes} allowed")


def to_relay_entries(md: Iterable[tuple[str, str | bytes]]) -> tuple[tuple[str, bytes], ...]:
    """Pass-through metadata as envelope entries (text values as ASCII bytes)."""
    return tuple((k, v if isinstance(v, bytes) else v.encode("ascii")) for k, v in md)


def from_relay_entries(
    entries: Iterable[tuple[str, bytes]], *, status_details: bool = False
) -> tuple[tuple[str, str | bytes], ...]:
    """Envelope entries back as gRPC metadata (``-bin`` keys bytes, others text); checked first."""
    items = tuple(entries)
    check_relayed_metadata(items, status_details=status_details)
    return tuple((k, v if k.endswith("-bin") else v.decode("ascii")) for k, v in items)
