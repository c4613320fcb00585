"""gateway.metadata: what an application may send, what is dropped, what travels, what the backend sees."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import InvalidArgument, Unauthenticated
from gateway.metadata import (
    backend_metadata,
    check_relayed_metadata,
    from_relay_entries,
    split_metadata,
    strip_response_metadata,
    to_relay_entries,
)
from gateway.principal import Principal, Purpose
from gateway.purpose import decode_text

GOOD = [
    ("authorization", "Bearer aaa.bbb.ccc"),
    ("psn-purpose-code", "investigation"),
    ("psn-purpose-case", "OP-1"),
    ("psn-purpose-text", "why"),
    ("x-trace", "t1"),
    ("x-trace", "t2"),
    ("x-blob-bin", b"\x00\xff"),
]


def test_split_sorts_token_purpose_and_passthrough() -> None:
    md = split_metadata(GOOD)
    assert md.token == "aaa.bbb.ccc"
    assert dict(md.purpose_fields) == {
        "psn-purpose-code": "investigation",
        "psn-purpose-case": "OP-1",
        "psn-purpose-text": "why",
    }
    assert md.passthrough == (("x-trace", "t1"), ("x-trace", "t2"), ("x-blob-bin", b"\x00\xff"))


@pytest.mark.parametrize(
    "key", ["grpc-timeout", "grpc-accept-encoding", ":authority", "user-agent", "te", "content-type", "host"]
)
def test_transport_headers_are_dropped_not_forwarded(key: str) -> None:
    md = split_metadata([*GOOD, (key, "v")])
    assert key not in dict(md.passthrough) and key in md.dropped


def test_no_authorization_gives_no_token() -> None:
    assert split_metadata([("x-a", "1")]).token is None


def test_the_bearer_scheme_is_case_insensitive() -> None:
    assert split_metadata([("authorization", "bearer t.t.t")]).token == "t.t.t"


CASES: list[tuple[str, list[tuple[str, str | bytes]], type[Exception], str]] = [
    ("gateway header from the app", [("psn-gw-officer", "chief")], InvalidArgument, "reserved for the gateway"),
    ("gateway request id from the app", [("psn-gw-request-id", "x")], InvalidArgument, "reserved for the gateway"),
    ("unknown psn key", [("psn-purpose", "x")], InvalidArgument, "psn-* namespace"),
    ("two tokens", [("authorization", "Bearer a"), ("authorization", "Bearer b")], InvalidArgument, "more than one"),
    ("two purpose codes", [("psn-purpose-code", "a"), ("psn-purpose-code", "b")], InvalidArgument, "more than one"),
    ("basic auth", [("authorization", "Basic dXNlcjpwYXNz")], Unauthenticated, "not 'Bearer <token>'"),
    ("bearer without token", [("authorization", "Bearer ")], Unauthenticated, "not 'Bearer <token>'"),
    ("bearer with two spaces", [("authorization", "Bearer  a")], Unauthenticated, "not 'Bearer <token>'"),
    ("too many entries", [(f"x-{i}", "v") for i in range(65)], InvalidArgument, "more than 64"),
    ("too large", [("x-big", "v" * 9000), ("x-big2", "v" * 9000)], InvalidArgument, "larger than 16384"),
    ("upper-case key", [("X-Trace", "v")], InvalidArgument, "not a valid gRPC header name"),
    ("key with a space", [("x trace", "v")], InvalidArgument, "not a valid gRPC header name"),
    ("newline in a value", [("x-a", "v\r\nx-b: w")], InvalidArgument, "printable ASCII"),
    ("bytes on a text key", [("x-a", b"v")], InvalidArgument, "printable ASCII"),
    ("text on a -bin key", [("x-a-bin", "v")], InvalidArgument, "must carry bytes"),
    ("bytes purpose", [("psn-purpose-text-bin", b"x")], InvalidArgument, "must be a text value"),
]


@pytest.mark.parametrize("name,md,error,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_metadata_is_refused(name: str, md: list[tuple[str, str | bytes]], error: type, reason: str) -> None:
    with pytest.raises(error) as info:
        split_metadata(md)
    assert type(info.value) is error
    assert reason in info.value.reason  # type: ignore[attr-defined]


def test_dropped_transport_headers_do_not_count_toward_the_limits() -> None:
    md = [(f"grpc-x{i}", "v") for i in range(100)] + [(f"x-{i}", "v") for i in range(64)]
    assert len(split_metadata(md).passthrough) == 64


def test_backend_metadata_names_the_officer_and_the_purpose() -> None:
    principal = Principal("tvp-1", "thames-valley", ("serocu", "tvp-cid"), ("analyst",), "SC")
    purpose = Purpose("investigation", "OP-1", "Témoin 100%")
    md = dict(backend_metadata(request_id="r1", principal=principal, purpose=purpose))
    assert md["psn-gw-request-id"] == "r1"
    assert md["psn-gw-officer"] == "tvp-1" and md["psn-gw-force"] == "thames-valley"
    assert md["psn-gw-units"] == "serocu,tvp-cid" and md["psn-gw-roles"] == "analyst"
    assert md["psn-gw-clearance"] == "SC" and md["psn-gw-purpose-code"] == "investigation"
    assert md["psn-gw-purpose-case"] == "OP-1"
    assert md["psn-gw-purpose-text"] == "T%C3%A9moin 100%25"
    assert all(k.startswith("psn-gw-") and v.isascii() for k, v in md.items())
    assert decode_text(md["psn-gw-purpose-text"], max_len=100) == "Témoin 100%"


def test_response_metadata_loses_gateway_and_transport_headers() -> None:
    md = [
        ("psn-gw-officer", "x"),
        ("psn-purpose-code", "y"),
        ("authorization", "Bearer z"),
        ("content-type", "application/grpc"),
        ("grpc-status", "0"),
        ("x-result", "ok"),
    ]
    assert strip_response_metadata(md) == (("x-result", "ok"),)


@pytest.mark.parametrize(
    "entries,reason",
    [
        ([("authorization", b"Bearer t")], "tokens never leave the origin gateway"),
        ([("psn-gw-officer", b"x")], "reserved key"),
        ([("psn-purpose-code", b"x")], "reserved key"),
        ([("grpc-timeout", b"1S")], "reserved key"),
        ([("x-a", b"\xff")], "not ASCII"),
        ([("x-a", b"a\nb")], "printable ASCII"),
        ([(f"x-{i}", b"v") for i in range(65)], "more than 64"),
    ],
)
def test_relayed_metadata_is_checked(entries: list[tuple[str, bytes]], reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_relayed_metadata(entries)
    assert reason in info.value.reason


_keys = st.from_regex(r"x-[a-z0-9_.-]{1,20}", fullmatch=True)
_entries = st.lists(
    st.one_of(
        st.tuples(_keys, st.from_regex(r"[\x20-\x7e]{0,40}", fullmatch=True)),
        st.tuples(_keys.map(lambda k: k + "-bin"), st.binary(max_size=40)),
    ),
    max_size=20,
)


@given(_entries)
def test_relay_entries_round_trip(md: list[tuple[str, str | bytes]]) -> None:
    assert from_relay_entries(to_relay_entries(md)) == tuple(md)


def test_status_details_travel_in_response_trailers_only() -> None:
    details = [("grpc-status-details-bin", b"\x08\x05")]
    with pytest.raises(InvalidArgument, match="reserved key"):
        check_relayed_metadata(details)
    check_relayed_metadata(details, status_details=True)
    assert from_relay_entries(details, status_details=True) == (("grpc-status-details-bin", b"\x08\x05"),)
    assert strip_response_metadata(details) == ()
    assert strip_response_metadata(details, keep_status_details=True) == tuple(details)
    assert "grpc-status-details-bin" in split_metadata(details).dropped  # never from an application
