"""Audit records: validation, the canonical encoding, and a decoder that accepts nothing else."""

from __future__ import annotations

import contextlib
import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit import record as record_module
from gateway.audit.record import (
    ACCESS_PURPOSES,
    EVENTS,
    MAX_RECORD_BYTES,
    STATUS_NAMES,
    AuditRecord,
    RecordError,
    format_time,
    parse_time,
)
from gateway.errors import ConfigError, GatewayError

from ._helpers import make_record

# -- strategies -----------------------------------------------------------------------------------

_text = st.text(max_size=40)
_names = st.lists(st.text(max_size=12), max_size=4).map(tuple)
_hex = st.binary(max_size=32).map(bytes.hex)
_b64 = st.binary(max_size=48).map(lambda b: __import__("base64").b64encode(b).decode())
_times = st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False).map(format_time)
_counts = st.integers(min_value=0, max_value=(1 << 63) - 1)


@st.composite
def records(draw: st.DrawFn) -> AuditRecord:
    event = draw(st.sampled_from(EVENTS))
    access: dict[str, Any] = {}
    if event == "audit-access":
        access = {
            "accessor": draw(st.text(min_size=1, max_size=20)),
            "access_purpose": draw(st.sampled_from(tuple(ACCESS_PURPOSES))),
            "access_command": draw(_text),
        }
    return AuditRecord(
        event=event,
        time=draw(_times),
        gateway=draw(st.text(min_size=1, max_size=40)),
        force=draw(st.text(min_size=1, max_size=20)),
        index=draw(st.none() | _counts),
        request_id=draw(_text),
        peer=draw(_text),
        origin_force=draw(_text),
        origin_gateway=draw(_text),
        officer_id=draw(_text),
        units=draw(_names),
        roles=draw(_names),
        clearance=draw(_text),
        purpose_code=draw(_text),
        purpose_case=draw(_text),
        purpose_text=draw(st.text(max_size=200)),
        application=draw(_text),
        method=draw(_text),
        call_type=draw(st.sampled_from(("", "unary", "server_stream", "client_stream", "bidi_stream"))),
        host_force=draw(_text),
        recipients=draw(_names),
        decision_allowed=draw(st.none() | st.booleans()),
        decision_rule=draw(_text),
        policy_version=draw(_hex),
        decision_id=draw(_text),
        status=draw(st.sampled_from(("", *STATUS_NAMES))),
        refusal_stage=draw(_text),
        refusal_reason=draw(st.text(max_size=200)),
        latency_ms=draw(st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)),
        request_digest=draw(_hex),
        response_digest=draw(_hex),
        request_messages=draw(_counts),
        response_messages=draw(_counts),
        envelope_signature=draw(_b64),
        seal_signature=draw(_b64),
        **access,
    )


# -- the encoding ---------------------------------------------------------------------------------


@given(records())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(record: AuditRecord) -> None:
    data = record.encode()
    assert data.isascii()
    assert AuditRecord.decode(data) == record
    assert AuditRecord.decode(data).encode() == data


@given(records())
@settings(max_examples=100)
def test_encoding_is_canonical_json(record: AuditRecord) -> None:
    data = record.encode()
    obj = json.loads(data)
    assert obj["v"] == 1
    assert list(obj) == sorted(obj)
    assert json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() == data


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_garbage_raises_only_record_error(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        AuditRecord.decode(data)


@given(records(), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_a_changed_encoding_is_refused_or_is_itself_canonical(record: AuditRecord, data: st.DataObject) -> None:
    raw = bytearray(record.encode())
    at = data.draw(st.integers(0, len(raw) - 1))
    op = data.draw(st.sampled_from(("flip", "delete", "insert")))
    if op == "flip":
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "delete":
        del raw[at]
    else:
        raw.insert(at, data.draw(st.sampled_from(b' ,:{}[]"\\0aZ\n')))
    try:
        decoded = AuditRecord.decode(bytes(raw))
    except RecordError:
        return
    assert decoded.encode() == bytes(raw)  # accepted only if it is exactly some record's canonical form


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@given(_json_values)
def test_json_that_is_not_a_record_raises_only_record_error(value: Any) -> None:
    with pytest.raises(RecordError):
        AuditRecord.decode(json.dumps(value).encode())


@given(records(), st.sampled_from(sorted(AuditRecord.__dataclass_fields__)), _json_values)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_field_replaced_by_any_json_is_refused_or_valid(record: AuditRecord, name: str, value: Any) -> None:
    obj = json.loads(record.encode())
    obj[name] = value
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    try:
        decoded = AuditRecord.decode(data)
    except RecordError:
        return
    assert decoded.encode() == data


def test_record_error_is_a_config_error_in_the_gateway_family() -> None:
    assert issubclass(RecordError, ConfigError)
    assert issubclass(RecordError, GatewayError)


# -- named refusals -------------------------------------------------------------------------------

GOOD = make_record(3).with_index(3)


def _mutate(**changes: Any) -> bytes:
    obj = json.loads(GOOD.encode())
    for key, value in changes.items():
        if value is _DELETE:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


_DELETE = object()

REFUSED: list[tuple[str, bytes]] = [
    ("whitespace", GOOD.encode().replace(b",", b", ", 1)),
    ("keys out of order", b'{"v":1,' + GOOD.encode()[1:].replace(b',"v":1}', b"}")),
    ("upper-case unicode escape", make_record(1, purpose_text="caf\u00e9").encode().replace(b"\\u00e9", b"\\u00E9")),
    ("raw non-ASCII byte", make_record(1, purpose_text="caf\u00e9").encode().replace(b"\\u00e9", "\u00e9".encode())),
    ("duplicate key", GOOD.encode()[:-1] + b',"status":"OK"}'),
    ("unknown field", _mutate(extra="x")),
    ("missing field", _mutate(seal_signature=_DELETE)),
    ("version 2", _mutate(v=2)),
    ("version true", _mutate(v=True)),
    ("no version", _mutate(v=_DELETE)),
    ("latency as an integer", _mutate(latency_ms=3)),
    ("NaN latency", GOOD.encode().replace(f'"latency_ms":{GOOD.latency_ms!r}'.encode(), b'"latency_ms":NaN')),
    ("negative latency", _mutate(latency_ms=-1.0)),
    ("count as a boolean", _mutate(request_messages=True)),
    ("negative count", _mutate(response_messages=-1)),
    ("negative index", _mutate(index=-1)),
    ("index as a string", _mutate(index="3")),
    ("unknown event", _mutate(event="read")),
    ("time without Z", _mutate(time="2027-01-15T08:00:00.000000")),
    ("time without microseconds", _mutate(time="2027-01-15T08:00:00Z")),
    ("impossible date", _mutate(time="2027-02-30T08:00:00.000000Z")),
    ("empty gateway", _mutate(gateway="")),
    ("unknown status", _mutate(status="FINE")),
    ("unknown call type", _mutate(call_type="stream")),
    ("upper-case hex digest", _mutate(request_digest="AB")),
    ("odd hex digest", _mutate(request_digest="abc")),
    ("unpadded base64", _mutate(seal_signature="c2VhbA")),
    ("decision as a string", _mutate(decision_allowed="yes")),
    ("units as a string", _mutate(units="serocu")),
    ("units holding a number", _mutate(units=[1])),
    ("access fields on a call", _mutate(accessor="auditor-1")),
    ("audit access without a purpose", _mutate(event="audit-access", accessor="a1")),
    ("audit access for another purpose", _mutate(event="audit-access", accessor="a1", access_purpose="curiosity")),
    ("not an object", b"[1,2,3]"),
    ("empty", b""),
    ("not UTF-8", b"\xff\xfe"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
]


@pytest.mark.parametrize(("name", "data"), REFUSED, ids=[n for n, _ in REFUSED])
def test_decode_refuses(name: str, data: bytes) -> None:
    with pytest.raises(RecordError):
        AuditRecord.decode(data)


def test_decode_takes_only_bytes() -> None:
    with pytest.raises(RecordError):
        AuditRecord.decode(GOOD.encode().decode())  # type: ignore[arg-type]  # the point of the test


def test_too_large_records_are_refused_both_ways() -> None:
    big = make_record(1, purpose_text="x" * MAX_RECORD_BYTES)
    with pytest.raises(RecordError, match="more than"):
        big.encode()
    with pytest.raises(RecordError, match="more than"):
        AuditRecord.decode(b" " * (MAX_RECORD_BYTES + 1))


# -- construction ---------------------------------------------------------------------------------


def test_lists_become_tuples_and_integral_latency_a_float() -> None:
    r = AuditRecord(event="call", time=format_time(0), gateway="g", force="f", units=["a"], latency_ms=2)  # type: ignore[arg-type]  # lists are accepted
    assert r.units == ("a",)
    assert isinstance(r.latency_ms, float)
    assert r.encode() == AuditRecord(event="call", time=format_time(0), gateway="g", force="f", units=("a",),
                                     latency_ms=2.0).encode()  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [
        {"event": "stream"},
        {"time": "yesterday"},
        {"force": ""},
        {"officer_id": 7},
        {"index": True},
        {"latency_ms": float("inf")},
        {"access_purpose": "lawfulness"},
        {"status": "ok"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_construction_validates(changes: dict[str, Any]) -> None:
    fields = {"event": "call", "time": format_time(0), "gateway": "g", "force": "f", **changes}
    with pytest.raises(RecordError):
        AuditRecord(**fields)


def test_every_access_purpose_is_accepted_on_an_access_record() -> None:
    for purpose in ACCESS_PURPOSES:
        r = AuditRecord(
            event="audit-access", time=format_time(0), gateway="g", force="f", accessor="a", access_purpose=purpose
        )
        assert AuditRecord.decode(r.encode()) == r
    assert len(ACCESS_PURPOSES) == 4


def test_with_index_changes_only_the_index_and_checks_it() -> None:
    r = make_record(9)
    placed = r.with_index(41)
    assert placed.index == 41 and r.index is None
    assert {k: v for k, v in placed.to_dict().items() if k != "index"} == {
        k: v for k, v in r.to_dict().items() if k != "index"
    }
    assert AuditRecord.decode(placed.encode()) == placed
    with pytest.raises(RecordError):
        r.with_index(-1)


@given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False))
def test_time_round_trip(epoch: float) -> None:
    text = format_time(epoch)
    assert text.endswith("Z") and len(text) == 27
    assert abs(parse_time(text) - epoch) < 2e-6  # microsecond resolution
    assert format_time(parse_time(text)) == text


def test_parse_time_needs_a_zone() -> None:
    with pytest.raises(RecordError, match="no time zone"):
        parse_time("2027-01-01T00:00:00")
    with pytest.raises(RecordError):
        parse_time("not a time")
    assert parse_time("2027-01-01T01:00:00+01:00") == parse_time("2027-01-01T00:00:00.000000Z")


def test_all_text_survives_including_controls_and_astral() -> None:
    text = string.printable + "\x00\x1b[31m\u2028\U0001f46e\ud800"
    r = make_record(1, purpose_text=text, refusal_reason=text)
    data = r.encode()
    assert data.isascii() and b"\x1b" not in data and b"\x00" not in data
    assert AuditRecord.decode(data).purpose_text == text


# -- the fast paths produce exactly what the reference code does ----------------------------------
#
# The canonical bytes are defined by the json module's sorted-key encoder; `encode` fills a fixed
# template instead, `format_time` avoids strftime and the format checks avoid regexes. Each is
# compared here with the reference it replaced, on arbitrary input.

_REFERENCE_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _reference_encode(values: dict[str, Any]) -> bytes:
    return _REFERENCE_ENCODER.encode({**values, "v": 1}).encode("ascii")


@given(records(), st.none() | _counts)
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_encode_is_byte_identical_to_the_json_module(record: AuditRecord, index: int | None) -> None:
    placed = record if index is None else record.with_index(index)
    assert placed.encode() == _reference_encode(placed.__dict__)


_odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.text(max_size=3), max_size=2)
)


@given(records(), st.sampled_from(sorted(AuditRecord.__dataclass_fields__)), _odd_values)
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_the_template_encoder_matches_the_json_module_even_for_values_validation_refuses(
    record: AuditRecord, name: str, value: Any
) -> None:
    values = {**record.__dict__, name: value}
    try:
        expected: bytes | type[BaseException] = _reference_encode(values)
    except (TypeError, ValueError) as exc:
        expected = type(exc)
    try:
        got: bytes | type[BaseException] = record_module._encode(values).encode("ascii")
    except (TypeError, ValueError) as exc:
        got = type(exc)
    assert got == expected


def test_extra_or_missing_keys_go_to_the_json_module() -> None:
    values = dict(make_record(3).__dict__)
    assert record_module._encode({**values, "zz": 1}).encode() == _reference_encode({**values, "zz": 1})
    del values["clearance"]
    assert record_module._encode(values).encode() == _reference_encode(values)


@given(st.floats(min_value=-62_135_596_800, max_value=253_402_300_799, allow_nan=False))
@settings(max_examples=1000)
def test_format_time_is_strftime(epoch: float) -> None:
    from datetime import UTC, datetime

    assert format_time(epoch) == datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_format_time_is_strftime_at_edges() -> None:
    from datetime import UTC, datetime

    for epoch in (0.0, -1e-7, 0.9999995, 1.0000005, 1_800_000_000.999_999_5, -62_135_596_800.0, -30_000_000_000.0):
        assert format_time(epoch) == datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_hexish = st.text(alphabet="0123456789abcdefABCDEFg =\n\u0660", max_size=12)
_b64ish = st.text(alphabet="ABYZaz09+/=-_ \n\u0660", max_size=14)


@given(_hexish | st.text(max_size=8))
@settings(max_examples=1000)
def test_hex_check_is_the_regex(text: str) -> None:
    assert record_module._is_hex(text) == bool(record_module._HEX.fullmatch(text))


@given(_b64ish | st.text(max_size=8) | st.binary(max_size=9).map(lambda b: __import__("base64").b64encode(b).decode()))
@settings(max_examples=1000)
def test_base64_check_is_the_regex(text: str) -> None:
    assert record_module._is_base64(text) == bool(record_module._BASE64.fullmatch(text))


@given(records(), st.sampled_from(sorted(AuditRecord.__dataclass_fields__)), _odd_values)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_from_fields_is_the_constructor(record: AuditRecord, name: str, value: Any) -> None:
    values = {**record.__dict__, name: value}
    try:
        expected: AuditRecord | type[BaseException] = AuditRecord(**values)
    except RecordError as exc:
        expected = type(exc)
    try:
        got: AuditRecord | type[BaseException] = AuditRecord.from_fields(values)
    except RecordError as exc:
        got = type(exc)
    assert got == expected
    if isinstance(got, AuditRecord) and isinstance(expected, AuditRecord):
        assert got.__dict__ == expected.__dict__


def test_from_fields_refuses_unknown_and_missing_fields_like_the_constructor() -> None:
    values = dict(make_record(1).__dict__)
    with pytest.raises(TypeError, match="unexpected"):
        AuditRecord.from_fields({**values, "colour": "red"})
    with pytest.raises(TypeError):
        AuditRecord(**{**values, "colour": "red"})
    del values["force"]
    with pytest.raises(TypeError, match="missing"):
        AuditRecord.from_fields(values)
    with pytest.raises(TypeError):
        AuditRecord(**values)
    assert AuditRecord.from_fields(
        {"event": "call", "time": format_time(0), "gateway": "g", "force": "f"}
    ) == AuditRecord(event="call", time=format_time(0), gateway="g", force="f")


def _unvalidated(values: dict[str, Any]) -> AuditRecord:
    record = object.__new__(AuditRecord)
    record.__dict__.update(values)
    return record


@given(records(), st.sampled_from(sorted(AuditRecord.__dataclass_fields__)), _odd_values | _hexish | _b64ish)
@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
def test_the_quick_check_vouches_only_for_what_the_full_checks_accept_unchanged(
    record: AuditRecord, name: str, value: Any
) -> None:
    values = {**record.__dict__, name: value}
    try:
        vouched = record_module._plainly_valid(values)
    except RecordError:  # a time of the right shape that is no date: the full checks say the same
        with pytest.raises(RecordError, match="ISO 8601"):
            _unvalidated(values)._validate()
        return
    if vouched:
        checked = _unvalidated(values)
        checked._validate()  # raises if the quick check let something through
        assert checked.__dict__ == values and all(type(checked.__dict__[k]) is type(v) for k, v in values.items())


def test_the_quick_check_covers_the_records_the_gateway_makes() -> None:
    assert record_module._plainly_valid(make_record(4).__dict__)
    assert record_module._plainly_valid(make_record(4).with_index(9).__dict__)
    access = AuditRecord(
        event="audit-access", time=format_time(0), gateway="g", force="f", accessor="a", access_purpose="integrity"
    )
    assert not record_module._plainly_valid(access.__dict__)  # access records always get the full checks
