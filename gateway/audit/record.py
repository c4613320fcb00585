"""Audit records: what one call (or one look at the log) leaves behind, and its canonical bytes.

An `AuditRecord` holds every field a DPA 2018 s62 auditor asks about: when, which gateway, who
(the officer, their force, units, roles and vetting), why (the justification code, case reference
and text), what (application, method, call type, host force, digests of the messages), to whom
(the recipients), the decision (allowed or not, the rule, the policy version) and how it ended
(status, the full internal refusal reason, latency), plus both envelope signatures. A record of
event ``audit-access`` says who read the log and for which of the four purposes s62(4) allows.

`AuditRecord.encode` gives the canonical bytes: JSON with sorted keys, no insignificant
whitespace, ASCII only (everything else escaped), every field present, and a version field ``v``.
Those bytes are what the store keeps and what the Merkle tree hashes; nothing ever re-serialises
a record to verify it. `AuditRecord.decode` is for display and queries: it is strict (the input
must be exactly the canonical encoding of a valid record) and raises only `RecordError`.

Owns: the record's fields, their validation and the byte encoding. Does not own: where records
are stored (`gateway.audit.store`) or hashed (`gateway.audit.merkle`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from datetime import UTC, datetime
from itertools import repeat
from json.encoder import encode_basestring_ascii
from operator import itemgetter
from typing import Any

from gateway.errors import ConfigError

__all__ = [
    "ACCESS_PURPOSES",
    "EVENTS",
    "MAX_RECORD_BYTES",
    "RECORD_VERSION",
    "STATUS_NAMES",
    "AuditRecord",
    "RecordError",
    "format_time",
    "parse_time",
]

#: The version written in every record's ``v`` field; `decode` accepts only this one.
RECORD_VERSION = 1

#: No record's encoding may be larger than this (a sanity bound: real records are about 1 KiB).
MAX_RECORD_BYTES = 1 << 20

#: The kinds of record: a unary call, a stream opening or closing, and a read of the log itself.
EVENTS = ("call", "stream-open", "stream-close", "audit-access")

#: The four purposes for which DPA 2018 s62(4) lets logs be used, by the code the tools accept.
ACCESS_PURPOSES: Mapping[str, str] = {
    "lawfulness": "verifying the lawfulness of processing",
    "self-monitoring": "self-monitoring",
    "integrity": "ensuring the integrity and security of personal data",
    "criminal-proceedings": "criminal proceedings",
}

#: gRPC status code names, as the ``status`` field writes them.
STATUS_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

_CALL_TYPES = ("unary", "server_stream", "client_stream", "bidi_stream")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_MAX_COUNT = (1 << 63) - 1


class RecordError(ConfigError):
    """A record is malformed: a field has a wrong type or value, or bytes are not a canonical record.

    For the auditors' tools a log holding such bytes is a bad input file, hence a `ConfigError`.
    """


def format_time(epoch: float) -> str:
    """Render seconds since the Unix epoch as the record time: UTC, ISO 8601, microseconds, ``Z``.

    The same text as ``strftime("%Y-%m-%dT%H:%M:%S.%fZ")`` (a test proves it), in a third of the time:
    `datetime` does the rounding and the calendar, `isoformat` the digits.
    """
    moment = datetime.fromtimestamp(epoch, UTC)
    if moment.year < 1000:  # strftime does not pad the year to four digits; isoformat does
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{moment.isoformat(timespec='seconds')[:19]}.{moment.microsecond:06d}Z"


def parse_time(text: str) -> float:
    """Parse a record time (or any ISO 8601 time with a zone) into seconds since the epoch.

    A time without a zone is refused rather than guessed. Raises `RecordError`.
    """
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError as exc:
        raise RecordError(f"{text!r} is not an ISO 8601 time", field="time") from exc
    if parsed.tzinfo is None:
        raise RecordError(f"{text!r} has no time zone (write Z for UTC)", field="time")
    return parsed.timestamp()


@dataclass(frozen=True)
class AuditRecord:
    """One audit record. Fields other than event, time, gateway and force default to empty.

    Construction validates every field (types, enumerations, formats), so a record that exists
    can always be encoded. `index` is the record's position in the log; the store sets it when it
    sequences the record, and a record handed to the store has none.
    """

    #: "call", "stream-open", "stream-close" or "audit-access"
    event: str
    #: when the record was made: UTC, ISO 8601 with microseconds and Z (`format_time`)
    time: str
    #: the recording gateway's SPIFFE ID
    gateway: str
    #: the recording gateway's force
    force: str
    #: the position in the log, set by the store
    index: int | None = None
    request_id: str = ""
    #: the TLS peer's SPIFFE ID
    peer: str = ""
    origin_force: str = ""
    origin_gateway: str = ""
    officer_id: str = ""
    units: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    clearance: str = ""
    #: the justification code, case or incident reference and free text (s62)
    purpose_code: str = ""
    purpose_case: str = ""
    purpose_text: str = ""
    application: str = ""
    method: str = ""
    call_type: str = ""
    host_force: str = ""
    #: who received the data: the origin force and its units
    recipients: tuple[str, ...] = ()
    #: True allowed, False denied, None: no decision was reached (refused earlier)
    decision_allowed: bool | None = None
    decision_rule: str = ""
    policy_version: str = ""
    decision_id: str = ""
    #: the gRPC status name the caller got
    status: str = ""
    refusal_stage: str = ""
    #: the full, internal reason (never shown to the caller)
    refusal_reason: str = ""
    latency_ms: float = 0.0
    #: hex digests of the request and response messages
    request_digest: str = ""
    response_digest: str = ""
    request_messages: int = 0
    response_messages: int = 0
    #: base64 signatures of the request envelope and the response seal
    envelope_signature: str = ""
    seal_signature: str = ""
    #: audit-access only: who looked, why (a key of ACCESS_PURPOSES) and with which command
    accessor: str = ""
    access_purpose: str = ""
    access_command: str = ""

    def __post_init__(self) -> None:
        # The common case in one expression; anything it does not vouch for gets the full checks,
        # which raise the precise error (or convert lists and integral latency).
        if not _plainly_valid(self.__dict__):
            self._validate()

    def _validate(self) -> None:
        values = self.__dict__
        if not all(map(isinstance, _str_values(values), repeat(str))):
            for name in _STR_FIELDS:
                if not isinstance(values[name], str):
                    raise RecordError(f"must be a string, got {type(values[name]).__name__}", field=name)
        for name in _TUPLE_FIELDS:
            value = values[name]
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise RecordError("must be a list of strings", field=name)
        for name in _INT_FIELDS:
            value = values[name]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_COUNT:
                raise RecordError(f"must be a non-negative integer, got {value!r}", field=name)
        self._check_values()

    def _check_values(self) -> None:
        if self.event not in EVENTS:
            raise RecordError(f"{self.event!r} is not one of {', '.join(EVENTS)}", field="event")
        if not _TIME.fullmatch(self.time):
            raise RecordError(f"{self.time!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ", field="time")
        parse_time(self.time)
        for name in ("gateway", "force"):
            if not getattr(self, name):
                raise RecordError("must not be empty", field=name)
        if self.index is not None and (
            not isinstance(self.index, int) or isinstance(self.index, bool) or not 0 <= self.index <= _MAX_COUNT
        ):
            raise RecordError(f"must be a non-negative integer or null, got {self.index!r}", field="index")
        if self.decision_allowed is not None and not isinstance(self.decision_allowed, bool):
            raise RecordError("must be true, false or null", field="decision_allowed")
        latency = self.latency_ms
        if isinstance(latency, int) and not isinstance(latency, bool):
            latency = float(latency)
            object.__setattr__(self, "latency_ms", latency)
        if not isinstance(latency, float) or not math.isfinite(latency) or latency < 0:
            raise RecordError(f"must be a finite, non-negative number, got {latency!r}", field="latency_ms")
        self._check_formats()
        self._check_access()

    def _check_formats(self) -> None:
        if self.status and self.status not in STATUS_NAMES:
            raise RecordError(f"{self.status!r} is not a gRPC status name", field="status")
        if self.call_type and self.call_type not in _CALL_TYPES:
            raise RecordError(f"{self.call_type!r} is not one of {', '.join(_CALL_TYPES)}", field="call_type")
        for name in ("request_digest", "response_digest"):
            if not _is_hex(getattr(self, name)):
                raise RecordError("must be lower-case hex", field=name)
        for name in ("envelope_signature", "seal_signature"):
            if not _is_base64(getattr(self, name)):
                raise RecordError("must be standard, padded base64", field=name)

    def _check_access(self) -> None:
        if self.event == "audit-access":
            if not self.accessor:
                raise RecordError("an audit-access record names the accessor", field="accessor")
            if self.access_purpose not in ACCESS_PURPOSES:
                raise RecordError(
                    f"{self.access_purpose!r} is not one of {', '.join(ACCESS_PURPOSES)}", field="access_purpose"
                )
        elif self.accessor or self.access_purpose or self.access_command:
            raise RecordError(f"only audit-access records have access fields, not {self.event!r}", field="accessor")

    # -- encoding -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (lists for tuples), without the version field."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _TUPLE_FIELDS:
            out[name] = list(out[name])
        return out

    def encode(self) -> bytes:
        """The canonical bytes: sorted-key JSON, no whitespace, ASCII only, with ``"v": 1``.

        Raises `RecordError` if the encoding is larger than `MAX_RECORD_BYTES`.
        """
        data = _encode(self.__dict__).encode("ascii")
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"encoded record is {len(data)} bytes, more than {MAX_RECORD_BYTES}")
        return data

    @classmethod
    def decode(cls, data: bytes) -> AuditRecord:
        """Parse canonical record bytes; raise `RecordError` for anything else.

        For display and queries only: verification hashes the stored bytes, never these values.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise RecordError(f"a record is bytes, not {type(data).__name__}")
        raw = bytes(data)
        if len(raw) > MAX_RECORD_BYTES:
            raise RecordError(f"record is {len(raw)} bytes, more than {MAX_RECORD_BYTES}")
        try:
            text = raw.decode("ascii")
            # Duplicate keys need no hook: one collapses the other, and the canonical check below
            # then fails, since no record encodes to bytes holding a key twice.
            obj = json.loads(text, parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RecordError(f"not a canonical record: {exc}") from exc
        if not isinstance(obj, dict):
            raise RecordError("not a canonical record: not a JSON object")
        version = obj.pop("v", None)
        if version != RECORD_VERSION or isinstance(version, bool):
            raise RecordError(f"unsupported record version {version!r}", field="v")
        if obj.keys() != _FIELD_NAMES:
            unknown = sorted(set(obj) - _FIELD_NAMES)
            if unknown:
                raise RecordError(f"unknown field(s): {', '.join(unknown)}")
            raise RecordError(f"missing field(s): {', '.join(sorted(_FIELD_NAMES - set(obj)))}")
        record = cls.from_fields(obj)
        if record.encode() != raw:
            raise RecordError("not a canonical record: the bytes are not exactly its canonical encoding")
        return record

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> AuditRecord:
        """The record with these fields: the same as ``AuditRecord(**values)``, with the same checks, faster.

        The dataclass constructor sets each of the forty fields through ``object.__setattr__`` (the
        record is frozen); this fills the instance's dict at once and then runs the same validation.
        The audit stage builds one record per call this way. An unknown field, or a missing
        required one, is a `TypeError`, as with the constructor.
        """
        if not values.keys() <= _FIELD_NAMES:
            unknown = sorted(set(values) - _FIELD_NAMES)
            raise TypeError(f"AuditRecord got unexpected field(s): {', '.join(map(str, unknown))}")
        if not values.keys() >= _REQUIRED:
            raise TypeError(f"AuditRecord is missing field(s): {', '.join(sorted(_REQUIRED - values.keys()))}")
        record = object.__new__(cls)
        state = record.__dict__
        state.update(_DEFAULTS)
        state.update(values)
        record.__post_init__()
        return record

    def with_index(self, index: int) -> AuditRecord:
        """A copy of this record at position `index` of the log.

        Only the index changes, and it is checked here, so the copy skips re-validating the rest
        (the store calls this once per record in its writer thread).
        """
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= _MAX_COUNT:
            raise RecordError(f"must be a non-negative integer, got {index!r}", field="index")
        copy = object.__new__(AuditRecord)
        copy.__dict__.update(self.__dict__)
        copy.__dict__["index"] = index
        return copy


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_FIELD_NAMES = frozenset(f.name for f in fields(AuditRecord))
_TUPLE_FIELDS = ("units", "roles", "recipients")
_INT_FIELDS = ("request_messages", "response_messages")
_STR_FIELDS = tuple(
    sorted(_FIELD_NAMES - set(_TUPLE_FIELDS) - set(_INT_FIELDS) - {"index", "decision_allowed", "latency_ms"})
)
_str_values = itemgetter(*_STR_FIELDS)
_PLAIN_EVENTS = frozenset(EVENTS) - {"audit-access"}
_STATUS_OR_EMPTY = frozenset((*STATUS_NAMES, ""))
_CALL_TYPE_OR_EMPTY = frozenset((*_CALL_TYPES, ""))
_JUST_STR = frozenset((str,))


def _plainly_valid(v: dict[str, Any]) -> bool:
    """True only if `AuditRecord._validate` would accept these values as they are (a test proves it).

    Conservative: exact types only (no subclasses, lists or integral latency), and no audit-access
    record; anything else returns False and gets the full checks. A time that matches the pattern
    but is not a date raises the same `RecordError` the full checks would.
    """
    units, roles, recipients = v["units"], v["roles"], v["recipients"]
    requests, responses, index = v["request_messages"], v["response_messages"], v["index"]
    allowed, latency = v["decision_allowed"], v["latency_ms"]
    return (
        set(map(type, _str_values(v))) <= _JUST_STR
        and type(units) is tuple
        and type(roles) is tuple
        and type(recipients) is tuple
        and set(map(type, units + roles + recipients)) <= _JUST_STR
        and type(requests) is int
        and 0 <= requests <= _MAX_COUNT
        and type(responses) is int
        and 0 <= responses <= _MAX_COUNT
        and (index is None or (type(index) is int and 0 <= index <= _MAX_COUNT))
        and (allowed is None or type(allowed) is bool)
        and type(latency) is float
        and 0.0 <= latency < math.inf  # also refuses NaN
        and v["event"] in _PLAIN_EVENTS
        and v["gateway"] != ""
        and v["force"] != ""
        and v["status"] in _STATUS_OR_EMPTY
        and v["call_type"] in _CALL_TYPE_OR_EMPTY
        and v["accessor"] == v["access_purpose"] == v["access_command"] == ""
        and _is_hex(v["request_digest"])
        and _is_hex(v["response_digest"])
        and _is_base64(v["envelope_signature"])
        and _is_base64(v["seal_signature"])
        and _TIME.fullmatch(v["time"]) is not None
        and parse_time(v["time"]) is not None
    )


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(AuditRecord) if f.default is not MISSING}
_REQUIRED = _FIELD_NAMES - _DEFAULTS.keys()

# -- the canonical encoder --------------------------------------------------------------------------
#
# The canonical bytes are defined as `_ENCODER`'s output (sorted keys, no whitespace, ASCII). A record's
# keys are always the same forty, so their sorted order and their JSON text are fixed: `_encode` fills
# a template with the JSON of each value, escaped by the same C function `json` uses for strings, and
# `repr` of the numbers (what `json` writes for int and finite float). Anything of an unexpected type
# (which validation never lets through) goes to `_ENCODER` itself, so the bytes are identical in
# every case; a hypothesis test compares the two on arbitrary records.

_KEYS = tuple(sorted(_FIELD_NAMES | {"v"}))
_TEMPLATE = "{" + ",".join(f"{encode_basestring_ascii(k)}:%s" for k in _KEYS) + "}"
_in_key_order = itemgetter(*_KEYS)
_LITERALS: dict[bool | None, str] = {None: "null", True: "true", False: "false"}
_VERSION_JSON = repr(RECORD_VERSION)


def _encode(values: dict[str, Any]) -> str:
    """`_ENCODER.encode` of the record's fields plus ``"v": 1``, faster (see above)."""
    try:
        if len(values) != len(_FIELD_NAMES):
            raise TypeError("not exactly the record's fields")
        out = dict(zip(_STR_FIELDS, map(encode_basestring_ascii, _str_values(values)), strict=True))
        for name in _TUPLE_FIELDS:
            items = values[name]
            if type(items) is not tuple:
                raise TypeError(name)
            out[name] = "[" + ",".join(map(encode_basestring_ascii, items)) + "]"
        for name in _INT_FIELDS:
            count = values[name]
            if type(count) is not int:
                raise TypeError(name)
            out[name] = repr(count)
        index = values["index"]
        if index is None:
            out["index"] = "null"
        elif type(index) is int:
            out["index"] = repr(index)
        else:
            raise TypeError("index")
        allowed = values["decision_allowed"]
        if allowed is not None and type(allowed) is not bool:
            raise TypeError("decision_allowed")
        out["decision_allowed"] = _LITERALS[allowed]
        latency = values["latency_ms"]
        if type(latency) is not float or not math.isfinite(latency):
            raise TypeError("latency_ms")
        out["latency_ms"] = repr(latency)
        out["v"] = _VERSION_JSON
    except (TypeError, KeyError):
        return _ENCODER.encode({**values, "v": RECORD_VERSION})
    text: str = _TEMPLATE % _in_key_order(out)
    return text


_HEX_DIGITS = b"0123456789abcdef"
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _is_hex(text: str) -> bool:
    """Whether `text` is lower-case hex of whole bytes (what ``_HEX.fullmatch`` accepts), without a regex."""
    return len(text) % 2 == 0 and text.isascii() and not text.encode("ascii").translate(None, _HEX_DIGITS)


def _is_base64(text: str) -> bool:
    """Whether `text` is standard, padded base64 (what ``_BASE64.fullmatch`` accepts), without a regex."""
    if len(text) % 4:
        return False
    body = text.rstrip("=")
    return len(text) - len(body) <= 2 and body.isascii() and not body.encode("ascii").translate(None, _BASE64_ALPHABET)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
