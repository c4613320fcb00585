"""The bad-input corpus, against live gateways: every case a status, a record where it reached us, and still serving.

Each named case sends one hostile input to a running gateway of a network of
its own (module-scoped: cases change replay stores and audit logs) and checks:

1. the status the caller sees (for relayed calls refused after the envelope
   verified, the status inside the host's response seal, which is what the
   origin gateway passes on);
2. where the call reached the gateway's own code, exactly one audit record with
   that status, the refusal stage and the reason (found with the auditors' own
   `LogReader` + `query`, by the case's unique officer id when the token was
   verified, else by time, stage and reason); where grpc itself refused it
   (an illegal header name, a message over the size limit) or the TLS handshake
   failed, no record at all;
3. that the caller's details carry no internals (addresses, protobuf errors,
   the gateway's own header names, rule files);
4. that the gateway still serves a good local call and a good relayed call.

Local listener cases use a raw HTTP/2 client (tests/integration/_hostile_h2.py)
where grpcio would refuse to send the input; relay cases use a peer gateway's
real TLS certificate and signing key (tests/integration/_hostile_peer.py).
Certificates come from certs/testcases.py.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import client
from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2
from gateway._proto.psn.demo.intel.v1 import intel_pb2
from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.directory import CallType
from gateway.envelope import Signer, envelope_body
from gateway.purpose import encode_text
from tests.certcases import load_testcases
from tests.integration._hostile_common import (
    LIFTED_RATE_LIMITS,
    Outcome,
    append_config,
    outcome,
    records_since,
    search,
    still_serving,
    wait_for,
)
from tests.integration._hostile_h2 import grpc_call
from tests.integration._hostile_peer import (
    UNARY,
    WITNESS,
    RawPeer,
    RelayOutcome,
    StreamVia,
    Via,
    envelope_frame,
    message_frame,
    seal_frame,
)
from tests.integration._hostile_tokens import TOKEN_ATTACKS, good_token
from tests.netharness import PURPOSE, NetworkThread

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

TV, HANTS, SURREY = "thames-valley", "hampshire", "surrey"
SEARCH = "/psn.demo.intel.v1.IntelligenceSearch/Search"
STREAM_MATCHES = "/psn.demo.intel.v1.IntelligenceSearch/StreamMatches"
REVIEW = "/psn.demo.casefiles.v1.CaseFiles/Review"
GET_RECORD = "/psn.demo.custody.v1.CustodyRecords/GetRecord"
SEARCH_MSG = intel_pb2.SearchRequest(subject="alpha").SerializeToString()
COMMENT = casefiles_pb2.ReviewComment(case_reference="C1", paragraph="1", comment="ok").SerializeToString()

#: What a caller's status details must never show (gateway-made refusals).
LEAKS = ("127.0.0.1", "DecodeError", "Traceback", "Exception", "psn-gw-", "rules/", ".csv", "spiffe://")


@dataclass(frozen=True)
class Audit:
    """The record a case must leave at the gateway it reached."""

    #: the refusal stage ("" for a call that ended with the upstream's own status)
    stage: str
    #: a fragment of the full refusal reason
    reason: str = ""
    #: the token was verified before the refusal: the record carries the case's officer id
    by_officer: bool = True
    event: str = "call"
    #: the call may have ended in grpc before reaching the gateway (a deadline of a nanosecond)
    optional: bool = False


@dataclass(frozen=True)
class Case:
    """One hostile input and what must follow."""

    run: Callable[[Ctx], Outcome]
    status: str
    #: None: refused by grpc or TLS before any gateway code: no record
    audit: Audit | None
    #: the gateway the call reaches (its log, its still-serving check)
    at: str = TV
    #: gateways that must have recorded nothing (nothing was relayed)
    nothing_at: tuple[str, ...] = ()


@dataclass
class Ctx:
    """What a case runs with: the network, a fresh officer id, raw peers."""

    net: NetworkThread
    officer: str
    peers: dict[tuple[str, str], RawPeer] = field(default_factory=dict)
    #: how unary relay cases send their request: `Relay/Unary` ("rpc"), or as the only call on a relay
    #: channel over `Relay/Mux` ("mux") or over a relay link ("link", gateway.relaylink)
    via: Via = "rpc"
    #: how stream relay cases send their frames: a `Relay/Stream` RPC ("rpc"), or as a stream on a relay link
    #: ("link", gateway.muxstream)
    stream_via: StreamVia = "rpc"

    def peer(self, origin: str, host: str) -> RawPeer:
        """`origin`'s gateway, talking raw relay to `host`."""
        if (origin, host) not in self.peers:
            self.peers[(origin, host)] = RawPeer(self.net, origin, host)
        return self.peers[(origin, host)]

    def token(self, force: str = TV, **kw: Any) -> str:
        """A good token of `force` for this case's officer."""
        return good_token(self.net, force, self.officer, **kw)

    def metadata(self, force: str = TV, *, token: str | None = None, purpose: bool = True) -> list[tuple[str, str]]:
        """Good call metadata (token and purpose) for `force`'s gateway."""
        md = [("authorization", f"Bearer {token or self.token(force)}")]
        if purpose:
            md += [
                ("psn-purpose-code", "investigation"),
                ("psn-purpose-case", "OP-CORPUS-1"),
                ("psn-purpose-text", "hostile input corpus"),
            ]
        return md


# -- how cases call ---------------------------------------------------------------------------


def raw(
    ctx: Ctx,
    extra: list[tuple[bytes, bytes]],
    *,
    force: str = TV,
    path: str = SEARCH,
    message: bytes = SEARCH_MSG,
    md: list[tuple[bytes, bytes]] | None = None,
    grpc_timeout: bytes | None = b"10S",
    body: bytes | None = None,
) -> Outcome:
    """A raw HTTP/2 call to `force`'s local listener: good metadata (unless `md`) plus `extra`, exactly."""
    endpoint = client.from_manifest(ctx.net.manifest(), force)
    app = ctx.net.layout.material[force].app_clients["analyst-desk"]
    base = md if md is not None else [(k.encode(), v.encode()) for k, v in ctx.metadata(force)]
    result = grpc_call(
        endpoint.local_address,
        server_name=endpoint.server_name,
        ca=endpoint.ca,
        cert=app.cert_path,
        key=app.key_path,
        path=path,
        metadata=base + extra,
        message=message,
        grpc_timeout=grpc_timeout,
        body=body,
    )
    if result.grpc_status is not None:
        return grpc.StatusCode(_CODES[result.grpc_status]).name, result.header("grpc-message") or ""
    return ("RST_STREAM" if result.reset is not None else "NO_STATUS"), ""


_CODES = {code.value[0]: code.value for code in grpc.StatusCode}


def plain(
    ctx: Ctx,
    md: list[tuple[str, str]],
    *,
    force: str = TV,
    method: str = SEARCH,
    message: bytes = SEARCH_MSG,
    timeout: float = 10,
) -> Outcome:
    """A call through grpcio with exactly the metadata `md` (no client helper adding its own)."""
    with ctx.net.channel(force) as ch:
        return outcome(lambda: ch.unary_unary(method)(message, metadata=md, timeout=timeout))


def relay(result: RelayOutcome) -> Outcome:
    """A raw relay outcome as the origin gateway would see it."""
    return result.status, result.details


def _with_purpose_text(ctx: Ctx, text: str) -> list[tuple[str, str]]:
    return [(k, text if k == "psn-purpose-text" else v) for k, v in ctx.metadata()]


def _replace(ctx: Ctx, key: str, value: str) -> list[tuple[str, str]]:
    return [(k, value if k == key else v) for k, v in ctx.metadata()]


def _big_message(ctx: Ctx, force: str) -> Outcome:
    big = intel_pb2.SearchRequest(subject="x" * (5 * 1024 * 1024))
    options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
    with ctx.net.officer_channel(force, officer=ctx.officer, options=options) as ch:
        return outcome(lambda: ch.unary_unary(SEARCH)(big.SerializeToString(), timeout=10))


# -- relay cases ----------------------------------------------------------------------------


def _unary(ctx: Ctx, mutate: Callable[[RawPeer, Any], Any] | None = None, **env_kw: Any) -> Outcome:
    """A unary relay (surrey -> thames-valley, Search), its envelope changed by `mutate(peer, env)`."""
    p = ctx.peer(SURREY, TV)
    env = p.envelope(env_kw.pop("method", SEARCH), message=SEARCH_MSG, officer=ctx.officer, **env_kw)
    if mutate is not None:
        env = mutate(p, env)
    signed = env if isinstance(env, relay_pb2.Signed) else p.sign(env)
    return relay(p.unary(signed, SEARCH_MSG, via=ctx.via))


def _flip_signature(p: RawPeer, env: Any) -> relay_pb2.Signed:
    signed = p.sign(env)
    sig = bytearray(signed.signature)
    sig[7] ^= 0x01
    return relay_pb2.Signed(body=signed.body, signer_certificate=signed.signer_certificate, signature=bytes(sig))


def _truncate_body(p: RawPeer, env: Any) -> relay_pb2.Signed:
    signed = p.sign(env)
    return relay_pb2.Signed(
        body=signed.body[:-9], signer_certificate=signed.signer_certificate, signature=signed.signature
    )


def _other_signer(ctx: Ctx) -> Signer:
    material = ctx.net.layout.material[HANTS]
    return Signer.from_files(material.gateway_signing.cert_path, material.gateway_signing.key_path)


def _replayed(ctx: Ctx) -> Outcome:
    p = ctx.peer(SURREY, TV)
    signed = p.sign(p.envelope(SEARCH, message=SEARCH_MSG, officer=ctx.officer))
    first = p.unary(signed, SEARCH_MSG, via=ctx.via)
    assert first.status == "OK", first  # captured from a call that succeeded
    return relay(p.unary(signed, SEARCH_MSG))  # replayed over the other relay path (Relay/Unary)


def _stream(ctx: Ctx, build: Callable[[RawPeer, Any, relay_pb2.Signed], list[Any]], **env_kw: Any) -> Outcome:
    """A stream relay (hampshire -> surrey, Review bidi) with the frames `build(peer, env, signed)` makes."""
    p = ctx.peer(HANTS, SURREY)
    env = p.envelope(env_kw.pop("method", REVIEW), officer=ctx.officer, **env_kw)
    signed = p.sign(env)
    return relay(p.stream(*build(p, env, signed), via=ctx.stream_via))


def _server_stream(ctx: Ctx, messages: list[bytes]) -> Outcome:
    """A server-streaming relay (surrey -> thames-valley, StreamMatches) whose envelope signed SEARCH_MSG."""
    p = ctx.peer(SURREY, TV)
    env = p.envelope(STREAM_MATCHES, message=SEARCH_MSG, officer=ctx.officer)
    frames = [envelope_frame(p.sign(env)), *(message_frame(i, m) for i, m in enumerate(messages))]
    return relay(p.stream(*frames, via=ctx.stream_via))


def _posed_as_client_stream(ctx: Ctx) -> list[relay_pb2.RelayFrame]:
    """StreamMatches (a server stream) under a client-stream envelope, which signs no request message."""
    p = ctx.peer(SURREY, TV)
    env = p.with_(
        p.envelope(STREAM_MATCHES, officer=ctx.officer),
        call_type=CallType.CLIENT_STREAM,
        messages_digest=None,
        message_count=0,
    )
    unsigned = intel_pb2.SearchRequest(subject="not what anyone signed").SerializeToString()
    return [envelope_frame(p.sign(env)), message_frame(0, unsigned)]


def _seal_of_another_call(p: RawPeer, env: Any, signed: relay_pb2.Signed) -> list[Any]:
    other = p.envelope(REVIEW)
    other_signed = p.sign(other)
    return [
        envelope_frame(signed),
        message_frame(0, COMMENT),
        seal_frame(p.request_seal(other, other_signed, [COMMENT])),
    ]


def _tv_signer(ctx: Ctx) -> Signer:
    material = ctx.net.layout.material[TV]
    return Signer.from_files(material.gateway_signing.cert_path, material.gateway_signing.key_path)


# -- the corpus -------------------------------------------------------------------------------


def _metadata_cases() -> dict[str, Any]:
    ascii_refused = Audit("metadata", "printable ASCII", by_officer=False)
    return {
        "metadata: UTF-8 value": Case(
            lambda c: raw(c, [(b"x-note", "caf\u00e9".encode())]), "INVALID_ARGUMENT", ascii_refused
        ),
        "metadata: Latin-1 bytes": Case(
            lambda c: raw(c, [(b"x-note", b"\xff\xfe")]), "INVALID_ARGUMENT", ascii_refused
        ),
        "metadata: control character": Case(
            lambda c: raw(c, [(b"x-note", b"a\x01b")]), "INVALID_ARGUMENT", ascii_refused
        ),
        "metadata: NUL byte": Case(lambda c: raw(c, [(b"x-note", b"a\x00b")]), "INVALID_ARGUMENT", ascii_refused),
        "metadata: raw newline in the purpose text": Case(
            lambda c: raw(
                c,
                [],
                md=[
                    (k.encode(), b"line one\nline two" if k == "psn-purpose-text" else v.encode())
                    for k, v in c.metadata()
                ],
            ),
            "INVALID_ARGUMENT",
            ascii_refused,
        ),
        # Over the gateway's 16 KiB, under grpc's own ceiling (4x): refused and recorded by the gateway.
        # (Far larger metadata is grpc's to refuse, before any gateway code: RESOURCE_EXHAUSTED.)
        "metadata: 40 KB value": Case(
            lambda c: raw(c, [(b"x-note", b"v" * 40_000)]),
            "INVALID_ARGUMENT",
            Audit("metadata", "metadata larger than", by_officer=False),
        ),
        "metadata: 65 headers": Case(
            lambda c: raw(c, [(b"x-%d" % i, b"v") for i in range(65)]),
            "INVALID_ARGUMENT",
            Audit("metadata", "more than 64 metadata entries", by_officer=False),
        ),
        # 1,000 headers stay under grpc's own metadata limit (4 times the gateway's), so they always reach the
        # metadata stage. A flood above it (20,000) was refused by grpc (RESOURCE_EXHAUSTED, unrecorded) or by
        # the stage (recorded) depending on timing inside grpc: about one run in 25 went grpc's way.
        "metadata: 1,000 headers": Case(
            lambda c: raw(c, [(b"x-%d" % i, b"v") for i in range(1_000)]),
            "INVALID_ARGUMENT",
            Audit("metadata", "more than 64 metadata entries", by_officer=False),
        ),
        "metadata: duplicate authorization": Case(
            lambda c: raw(c, [(b"authorization", b"Bearer " + c.token().encode())]),
            "INVALID_ARGUMENT",
            Audit("metadata", "more than one authorization entry", by_officer=False),
        ),
        "metadata: duplicate purpose code": Case(
            lambda c: raw(c, [(b"psn-purpose-code", b"safeguarding")]),
            "INVALID_ARGUMENT",
            Audit("metadata", "more than one psn-purpose-code entry", by_officer=False),
        ),
        "metadata: duplicate pass-through key": Case(
            lambda c: raw(c, [(b"x-trace", b"1"), (b"x-trace", b"2")]), "OK", Audit("")
        ),
        "metadata: upper-case key": Case(lambda c: raw(c, [(b"X-Note", b"v")]), "INTERNAL", None),
        "metadata: space in a key": Case(lambda c: raw(c, [(b"x note", b"v")]), "INTERNAL", None),
        "metadata: -bin value not base64": Case(lambda c: raw(c, [(b"x-blob-bin", b"!!not base64")]), "INTERNAL", None),
        # Today the gateway passes it and the backend's grpc refuses it (RESOURCE_EXHAUSTED, its text
        # listing the gateway's own headers reaches the caller); the gateway must refuse it itself.
        "metadata: 15 KB value (under the gateway's limit, over a backend's)": pytest.param(
            Case(
                lambda c: raw(c, [(b"x-note", b"v" * 15_000)]),
                "INVALID_ARGUMENT",
                Audit("metadata", "larger than", by_officer=False),
            ),
        ),
        # the gateway's own headers, sent by an application
        "header: psn-gw-officer": Case(
            lambda c: raw(c, [(b"psn-gw-officer", b"DCI-9999")]),
            "INVALID_ARGUMENT",
            Audit("metadata", "reserved for the gateway", by_officer=False),
        ),
        "header: psn-gw-request-id": Case(
            lambda c: raw(c, [(b"psn-gw-request-id", b"0" * 32)]),
            "INVALID_ARGUMENT",
            Audit("metadata", "reserved for the gateway", by_officer=False),
        ),
        "header: psn-gw-clearance-bin": Case(
            lambda c: raw(c, [(b"psn-gw-clearance-bin", b"RFY=")]),
            "INVALID_ARGUMENT",
            Audit("metadata", "reserved for the gateway", by_officer=False),
        ),
        "header: psn-gw-force on a relayed call": Case(
            lambda c: raw(c, [(b"psn-gw-force", b"thames-valley")], force=SURREY),
            "INVALID_ARGUMENT",
            Audit("metadata", "reserved for the gateway", by_officer=False),
            at=SURREY,
            nothing_at=(TV,),
        ),
        "header: unknown psn-* key": Case(
            lambda c: raw(c, [(b"psn-override", b"1")]),
            "INVALID_ARGUMENT",
            Audit("metadata", "psn-* namespace", by_officer=False),
        ),
        "header: misspelt purpose key": Case(
            lambda c: raw(c, [(b"psn-purpose-cod", b"investigation")]),
            "INVALID_ARGUMENT",
            Audit("purpose", "unknown purpose metadata key"),
        ),
        "header: transport headers from the application": Case(
            lambda c: raw(c, [(b"grpc-internal-encoding-request", b"gzip"), (b"user-agent", b"evil/1.0")]),
            "OK",
            Audit(""),
        ),
        "header: authorization not Bearer": Case(
            lambda c: raw(c, [], md=[(b"authorization", b"Basic dXNlcjpwYXNz")]),
            "UNAUTHENTICATED",
            Audit("metadata", "not 'Bearer <token>'", by_officer=False),
        ),
        "header: authorization with Latin-1 bytes": Case(
            lambda c: raw(c, [], md=[(b"authorization", b"Bearer \xff\xfe")]),
            "INVALID_ARGUMENT",
            Audit("metadata", "printable ASCII", by_officer=False),
        ),
    }


def _purpose_cases() -> dict[str, Case]:
    return {
        "purpose: missing": Case(
            lambda c: plain(c, c.metadata(purpose=False)), "INVALID_ARGUMENT", Audit("purpose", "no purpose")
        ),
        "purpose: unknown justification code": Case(
            lambda c: plain(c, _replace(c, "psn-purpose-code", "curiosity")),
            "INVALID_ARGUMENT",
            Audit("purpose", "is not one of this force's codes"),
        ),
        "purpose: case reference with a space": Case(
            lambda c: plain(c, _replace(c, "psn-purpose-case", "OP 1")),
            "INVALID_ARGUMENT",
            Audit("purpose", "without spaces"),
        ),
        "purpose: 600-character text": Case(
            lambda c: plain(c, _with_purpose_text(c, "x" * 600)), "INVALID_ARGUMENT", Audit("purpose", "over 500")
        ),
        "purpose: right-to-left override in the text": Case(
            lambda c: plain(c, _with_purpose_text(c, encode_text("routine \u202eenil on"))),
            "INVALID_ARGUMENT",
            Audit("purpose", "refused character"),
        ),
        "purpose: encoded newline (a forged log line)": Case(
            lambda c: plain(c, _with_purpose_text(c, "ok%0Aallowed by rule 1")),
            "INVALID_ARGUMENT",
            Audit("purpose", "refused character"),
        ),
        "purpose: '%' without two hex digits": Case(
            lambda c: plain(c, _with_purpose_text(c, "50% sure")),
            "INVALID_ARGUMENT",
            Audit("purpose", "not followed by two hex digits"),
        ),
        "purpose: not UTF-8 once decoded": Case(
            lambda c: plain(c, _with_purpose_text(c, "bad %FF%FE bytes")),
            "INVALID_ARGUMENT",
            Audit("purpose", "not percent-encoded UTF-8"),
        ),
    }


def _token_cases() -> dict[str, Case]:
    def run(forge: Callable[[NetworkThread, str, str], str | None]) -> Callable[[Ctx], Outcome]:
        def call(c: Ctx) -> Outcome:
            token = forge(c.net, TV, c.officer)
            md = c.metadata()[1:] if token is None else [("authorization", f"Bearer {token}"), *c.metadata()[1:]]
            return plain(c, md)

        return call

    return {
        f"token: {name}": Case(run(forge), "UNAUTHENTICATED", Audit("token", reason, by_officer=False))
        for name, (forge, reason) in TOKEN_ATTACKS.items()
    }


def _path_cases() -> dict[str, Case]:
    not_found = Audit("route", "")
    return {
        "path: unknown service": Case(
            lambda c: plain(c, c.metadata(), method="/psn.demo.firearms.v1.Licensing/Lookup"), "NOT_FOUND", not_found
        ),
        "path: unknown method of a known service": Case(
            lambda c: plain(c, c.metadata(), method="/psn.demo.intel.v1.IntelligenceSearch/DeleteAll"),
            "NOT_FOUND",
            not_found,
        ),
        "path: empty": Case(lambda c: raw(c, [], path=""), "NOT_FOUND", not_found),
        "path: non-ASCII": Case(
            lambda c: raw(c, [], path="/psn.demo.intel.v1.IntelligenceSearch/S\u00e9arch"), "NOT_FOUND", not_found
        ),
        "path: no leading slash": Case(
            lambda c: raw(c, [], path="psn.demo.intel.v1.IntelligenceSearch/Search"), "NOT_FOUND", not_found
        ),
        "path: the relay service, on the local listener": Case(
            lambda c: plain(c, c.metadata(), method="/psn.gateway.v1.Relay/Unary"), "NOT_FOUND", not_found
        ),
        "path: the witness, on the local listener": Case(
            lambda c: plain(c, c.metadata(), method=WITNESS), "NOT_FOUND", not_found
        ),
    }


def _message_cases() -> dict[str, Case]:
    # The gateway never parses an application's messages: the application judges them. A Python
    # backend that cannot parse a request ends the call with UNKNOWN, which the gateway treats like
    # a transport failure (UNAVAILABLE, details withheld), recording the backend's own words.
    backend_refused = Audit("forward", "backend intel-search: UNKNOWN")
    return {
        "message: garbage bytes": Case(
            lambda c: plain(c, c.metadata(), message=b"\xff\xff\xff\xff"), "UNAVAILABLE", backend_refused
        ),
        "message: truncated protobuf": Case(
            lambda c: plain(c, c.metadata(), message=SEARCH_MSG[:-2]), "UNAVAILABLE", backend_refused
        ),
        "message: an unknown field": Case(
            lambda c: plain(c, c.metadata(), message=SEARCH_MSG + b"\xf8\x01\x01"), "OK", Audit("")
        ),
        # grpc waits for the rest of the message until the deadline: the gateway's code never runs.
        "message: length prefix longer than the data": Case(
            lambda c: raw(c, [], body=b"\x00\x00\x00\x01\x00" + SEARCH_MSG, grpc_timeout=b"1S"),
            "DEADLINE_EXCEEDED",
            None,
        ),
        "message: compressed flag with no encoding": Case(
            lambda c: raw(c, [], body=b"\x01" + len(SEARCH_MSG).to_bytes(4, "big") + SEARCH_MSG), "INTERNAL", None
        ),
        "message: 5 MiB (over the 4 MiB limit)": Case(lambda c: _big_message(c, TV), "RESOURCE_EXHAUSTED", None),
        "message: 5 MiB, to be relayed": Case(
            lambda c: _big_message(c, SURREY), "RESOURCE_EXHAUSTED", None, at=SURREY, nothing_at=(TV,)
        ),
    }


def _deadline_cases() -> dict[str, Case]:
    return {
        "deadline: none": Case(lambda c: raw(c, [], grpc_timeout=None), "OK", Audit("")),
        "deadline: none, relayed": Case(
            lambda c: raw(c, [], force=SURREY, grpc_timeout=None), "OK", Audit(""), at=SURREY
        ),
        # Capped at [limits] max_deadline_seconds: uncapped, the host would refuse an envelope whose
        # deadline is more than its own max_deadline after its issue time.
        "deadline: 99,999,999 hours, relayed": Case(
            lambda c: raw(c, [], force=SURREY, grpc_timeout=b"99999999H"), "OK", Audit(""), at=SURREY
        ),
        "deadline: not a grpc-timeout": Case(lambda c: raw(c, [], grpc_timeout=b"soon"), "INTERNAL", None),
        "deadline: one nanosecond": Case(
            lambda c: raw(c, [], grpc_timeout=b"1n"), "DEADLINE_EXCEEDED", Audit("deadline", optional=True)
        ),
    }


def _relay_cases() -> dict[str, Any]:
    unauth = "UNAUTHENTICATED"
    return {
        "relay: garbage bytes (unary)": pytest.param(
            Case(
                lambda c: relay(c.peer(SURREY, TV).unary_raw(b"\xff\xff\xff\xff")),
                "INVALID_ARGUMENT",
                Audit("envelope", "does not parse", by_officer=False),
            ),
        ),
        "relay: garbage bytes (first stream frame)": pytest.param(
            Case(
                lambda c: relay(c.peer(HANTS, SURREY).stream(b"\xff\xff\xff", via=c.stream_via)),
                "INVALID_ARGUMENT",
                Audit("envelope", "does not parse", by_officer=False),
                at=SURREY,
            ),
        ),
        "relay: garbage bytes to the witness": pytest.param(
            Case(lambda c: relay(c.peer(SURREY, TV).unary_raw(b"\xff\xff", method=WITNESS)), "INVALID_ARGUMENT", None),
        ),
        "relay: empty request": Case(
            lambda c: relay(c.peer(SURREY, TV).unary_raw(b"")),
            unauth,
            Audit("envelope", "no signer certificate", by_officer=False),
        ),
        "relay: one bit of the signature flipped": Case(
            lambda c: _unary(c, _flip_signature), unauth, Audit("envelope", "does not verify", by_officer=False)
        ),
        "relay: envelope body truncated": Case(
            lambda c: _unary(c, _truncate_body), unauth, Audit("envelope", "does not verify", by_officer=False)
        ),
        "relay: garbage body, correctly signed": Case(
            lambda c: _unary(c, lambda p, e: p.sign_body(b"\xff" * 40)),
            "INVALID_ARGUMENT",
            Audit("envelope", "does not parse", by_officer=False),
        ),
        "relay: unknown field in a signed body": Case(
            lambda c: _unary(c, lambda p, e: p.sign_body(envelope_body(e) + b"\xf8\x06\x01")),
            "INVALID_ARGUMENT",
            Audit("envelope", "unknown fields", by_officer=False),
        ),
        "relay: signer certificate is garbage": Case(
            lambda c: _unary(
                c,
                lambda p, e: relay_pb2.Signed(
                    body=p.sign(e).body, signer_certificate=b"\x30\x82garbage", signature=p.sign(e).signature
                ),
            ),
            unauth,
            Audit("envelope", "", by_officer=False),
        ),
        "relay: signed by another force's gateway": Case(
            lambda c: _unary(c, lambda p, e: p.sign(p.with_(e), signer=_other_signer(c))),
            unauth,
            Audit("envelope", "but relayed by", by_officer=False),
        ),
        "relay: envelope names another origin force": Case(
            lambda c: _unary(c, lambda p, e: p.with_(e, origin_force=HANTS)),
            unauth,
            Audit("envelope", "names origin force hampshire", by_officer=False),
        ),
        "relay: principal of another force": Case(
            lambda c: _unary(
                c,
                lambda p, e: p.with_(
                    e, principal=type(e.principal)(c.officer, HANTS, ("serocu",), ("investigator",), "SC")
                ),
            ),
            unauth,
            Audit("envelope", "not the origin force", by_officer=False),
        ),
        "relay: addressed to another host": Case(
            lambda c: _unary(c, lambda p, e: p.with_(e, host_force=HANTS)),
            unauth,
            Audit("envelope", "addressed to force hampshire", by_officer=False),
        ),
        "relay: issued ten minutes ago": Case(
            lambda c: _unary(c, issued_at=time.time() - 600),
            unauth,
            Audit("envelope", "s old, outside the 30 s window", by_officer=False),
        ),
        "relay: issued ten minutes ahead": Case(
            lambda c: _unary(c, issued_at=time.time() + 600),
            unauth,
            Audit("envelope", "in the future, outside the 30 s window", by_officer=False),
        ),
        "relay: deadline already passed": Case(
            lambda c: _unary(c, issued_at=time.time() - 5, deadline=4),
            "DEADLINE_EXCEEDED",
            Audit("envelope", "deadline passed", by_officer=False),
        ),
        "relay: deadline a day after issue": Case(
            lambda c: _unary(c, deadline=86_400),
            "INVALID_ARGUMENT",
            Audit("envelope", "more than 300 s after its issue time", by_officer=False),
        ),
        "relay: a captured envelope replayed": Case(
            _replayed, unauth, Audit("envelope", "replayed request id", by_officer=False)
        ),
        "relay: message is not the one the envelope signed": Case(
            lambda c: relay(
                c.peer(SURREY, TV).unary(
                    c.peer(SURREY, TV).sign(c.peer(SURREY, TV).envelope(SEARCH, message=SEARCH_MSG)),
                    SEARCH_MSG + b"\x10\x01",
                )
            ),
            unauth,
            Audit("envelope", "not the one the envelope signed", by_officer=False),
        ),
        "relay: envelope body over 64 KiB": Case(
            lambda c: _unary(c, lambda p, e: p.sign_body(envelope_body(e) + b"\x00" * 70_000)),
            "RESOURCE_EXHAUSTED",
            Audit("envelope", "over 65536", by_officer=False),
        ),
        "relay: a server-stream envelope on the unary relay": Case(
            lambda c: _unary(c, lambda p, e: p.envelope(STREAM_MATCHES, message=SEARCH_MSG, officer=c.officer)),
            "INVALID_ARGUMENT",
            Audit("envelope", "on the unary relay", by_officer=False),
        ),
        "relay: purpose with a forged line inside the envelope": Case(
            lambda c: _unary(c, lambda p, e: p.with_(e, purpose=replace(e.purpose, text="ok\nofficer: DCI-9"))),
            "INVALID_ARGUMENT",
            Audit("envelope", "refused character U+000A", by_officer=False),
        ),
        "relay: justification code with a header break inside the envelope": Case(
            lambda c: _unary(c, lambda p, e: p.with_(e, purpose=replace(e.purpose, justification="a\r\nx-b: c"))),
            "INVALID_ARGUMENT",
            Audit("envelope", "is not a code", by_officer=False),
        ),
        "relay: envelope metadata over what the host forwards to a backend": Case(
            lambda c: _unary(c, lambda p, e: p.with_(e, metadata=(("x-filler", b"a" * 7000),))),
            "INVALID_ARGUMENT",
            Audit("envelope", "larger than the 6144 allowed", by_officer=False),
        ),
        "relay: authorization inside the envelope": Case(
            lambda c: _unary(c, lambda p, e: p.with_(e, metadata=(("authorization", b"Bearer x"),))),
            "INVALID_ARGUMENT",
            Audit("envelope", "carries authorization", by_officer=False),
        ),
        "relay: psn-gw-officer inside the envelope": Case(
            lambda c: _unary(c, lambda p, e: p.with_(e, metadata=(("psn-gw-officer", b"DCI-1"),))),
            "INVALID_ARGUMENT",
            Audit("envelope", "reserved key", by_officer=False),
        ),
        # refused after the envelope verified: the host seals its refusal and records the officer
        "relay: transit to another force's application": Case(
            lambda c: _unary(c, lambda p, e: p.with_(e, host_force=TV), method=GET_RECORD),
            "PERMISSION_DENIED",
            Audit("route", "no transit relaying"),
        ),
        "relay: a method no application serves": Case(
            lambda c: _unary(c, lambda p, e: p.with_(e, method="/psn.demo.intel.v1.IntelligenceSearch/DeleteAll")),
            "NOT_FOUND",
            Audit("route", "has no method"),
        ),
        "relay: principal below the application's vetting level": Case(
            lambda c: _unary(c, clearance="NPPV3"), "PERMISSION_DENIED", Audit("policy", "")
        ),
        "relay: an unknown relay method": Case(
            lambda c: relay(c.peer(SURREY, TV).unary_raw(b"", method="/psn.gateway.v1.Relay/Admin")),
            "UNIMPLEMENTED",
            None,
        ),
    }


def _stream_cases() -> dict[str, Case]:
    unauth = "UNAUTHENTICATED"
    return {
        "stream: closed before its envelope": Case(
            lambda c: relay(c.peer(HANTS, SURREY).stream(via=c.stream_via)),
            "INVALID_ARGUMENT",
            Audit("forward", "closed before its envelope", by_officer=False),
            at=SURREY,
        ),
        "stream: a message before the envelope": Case(
            lambda c: relay(c.peer(HANTS, SURREY).stream(message_frame(0, COMMENT), via=c.stream_via)),
            "INVALID_ARGUMENT",
            Audit("envelope", "did not start with an envelope", by_officer=False),
            at=SURREY,
        ),
        "stream: a server stream posed as a client stream (its request unsigned, no seal)": Case(
            lambda c: relay(c.peer(SURREY, TV).stream(*_posed_as_client_stream(c), via=c.stream_via)),
            "INVALID_ARGUMENT",
            Audit("route", "signs a client_stream call, but"),
        ),
        "stream: a unary envelope on the stream relay": Case(
            lambda c: relay(
                c.peer(SURREY, TV).stream(
                    envelope_frame(c.peer(SURREY, TV).sign(c.peer(SURREY, TV).envelope(SEARCH, message=SEARCH_MSG))),
                    via=c.stream_via,
                )
            ),
            "INVALID_ARGUMENT",
            Audit("envelope", "on the stream relay", by_officer=False),
        ),
        "stream: garbage frame after the envelope": Case(
            lambda c: _stream(c, lambda p, e, s: [envelope_frame(s), b"\xff\xff\xff"]),
            "INVALID_ARGUMENT",
            Audit("forward", "does not parse", event="stream-close"),
            at=SURREY,
        ),
        "stream: messages out of sequence": Case(
            lambda c: _stream(c, lambda p, e, s: [envelope_frame(s), message_frame(1, COMMENT)]),
            "INVALID_ARGUMENT",
            Audit("forward", "out of sequence", event="stream-close"),
            at=SURREY,
        ),
        "stream: a message sent twice": Case(
            lambda c: _stream(
                c, lambda p, e, s: [envelope_frame(s), message_frame(0, COMMENT), message_frame(0, COMMENT)]
            ),
            "INVALID_ARGUMENT",
            Audit("forward", "out of sequence", event="stream-close"),
            at=SURREY,
        ),
        "stream: no request seal": Case(
            lambda c: _stream(c, lambda p, e, s: [envelope_frame(s), message_frame(0, COMMENT)]),
            unauth,
            Audit("forward", "without a request seal", event="stream-close"),
            at=SURREY,
        ),
        "stream: request seal over other messages": Case(
            lambda c: _stream(
                c,
                lambda p, e, s: [
                    envelope_frame(s),
                    message_frame(0, COMMENT),
                    seal_frame(p.request_seal(e, s, [COMMENT, COMMENT])),
                ],
            ),
            unauth,
            Audit("forward", "are not the ones sealed", event="stream-close"),
            at=SURREY,
        ),
        "stream: request seal signed by another force": Case(
            lambda c: _stream(
                c,
                lambda p, e, s: [
                    envelope_frame(s),
                    message_frame(0, COMMENT),
                    seal_frame(p.request_seal(e, s, [COMMENT], signer=_tv_signer(c))),
                ],
            ),
            unauth,
            Audit("forward", "request seal signed by", event="stream-close"),
            at=SURREY,
        ),
        "stream: request seal of another call": Case(
            lambda c: _stream(c, _seal_of_another_call),
            unauth,
            Audit("forward", "belongs to another call", event="stream-close"),
            at=SURREY,
        ),
        "stream: a second envelope mid-stream": Case(
            lambda c: _stream(c, lambda p, e, s: [envelope_frame(s), message_frame(0, COMMENT), envelope_frame(s)]),
            "INVALID_ARGUMENT",
            Audit("forward", "unexpected relay frame 'envelope'", event="stream-close"),
            at=SURREY,
        ),
        "stream: a response frame sent as a request": Case(
            lambda c: _stream(
                c, lambda p, e, s: [envelope_frame(s), relay_pb2.RelayFrame(headers=relay_pb2.Headers())]
            ),
            "INVALID_ARGUMENT",
            Audit("forward", "unexpected relay frame 'headers'", event="stream-close"),
            at=SURREY,
        ),
        "stream: server stream with two requests": Case(
            lambda c: _server_stream(c, [SEARCH_MSG, SEARCH_MSG]),
            "INVALID_ARGUMENT",
            Audit("forward", "more than one request message", event="stream-close"),
        ),
        "stream: server stream request not the one signed": Case(
            lambda c: _server_stream(c, [SEARCH_MSG + b"\x10\x01"]),
            unauth,
            Audit("forward", "not the one the envelope signed", event="stream-close"),
        ),
    }


def _cases() -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for group in (
        _metadata_cases(),
        _purpose_cases(),
        _token_cases(),
        _path_cases(),
        _message_cases(),
        _deadline_cases(),
        _relay_cases(),
        _stream_cases(),
    ):
        assert not set(group) & set(cases), "case names are unique"
        cases.update(group)
    return cases


CASES = _cases()


def _params() -> Iterator[Any]:
    for name, case in CASES.items():
        if isinstance(case, type(pytest.param(None))):
            yield pytest.param(*case.values, marks=case.marks, id=name)
        else:
            yield pytest.param(case, id=name)


# -- the network ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkThread]:
    net = NetworkThread(tmp_path_factory.mktemp("corpus-net"))
    # Reload fast (the certificate cases republish a CRL); generous rate limits (the corpus is quick).
    append_config(
        net,
        "[revocation]\nreload_interval_seconds = 0.25\n\n" + LIFTED_RATE_LIMITS,
    )
    net.start()
    yield net
    net.stop()


@pytest.fixture
def ctx(cnet: NetworkThread) -> Iterator[Ctx]:
    c = Ctx(cnet, f"DC-{secrets.token_hex(5)}")
    yield c
    for p in c.peers.values():
        p.close()


def _find(ctx: Ctx, case: Case, since: float) -> list[Any]:
    audit = case.audit
    assert audit is not None
    rows = records_since(ctx.net, case.at, since)
    if audit.by_officer:
        rows = [r for r in rows if r.officer_id == ctx.officer]
    return [
        r
        for r in rows
        if r.event == audit.event
        and r.status == case.status
        and r.refusal_stage == audit.stage
        and audit.reason in r.refusal_reason
    ]


def _unary_relay_params() -> Iterator[Any]:
    for name, case in CASES.items():
        run = getattr(case, "run", None)
        if run is not None and ("_unary" in run.__code__.co_names or run is _replayed):
            yield pytest.param(case, id=name)


@pytest.mark.parametrize("case", list(_params()))
def test_corpus_case(ctx: Ctx, case: Case) -> None:
    _check_case(ctx, case)


@pytest.mark.parametrize("case", list(_unary_relay_params()))
def test_unary_relay_case_over_a_relay_channel(ctx: Ctx, case: Case) -> None:
    """Every hostile unary relay request meets the same refusal and record on `Relay/Mux` as on `Relay/Unary`."""
    ctx.via = "mux"
    _check_case(ctx, case)


@pytest.mark.parametrize("case", list(_unary_relay_params()))
def test_unary_relay_case_over_a_relay_link(ctx: Ctx, case: Case) -> None:
    """Every hostile unary relay request meets the same refusal and record on a relay link (plain TLS frames)."""
    assert ctx.net.layout.directory().forces[case.at].relay_address is not None, "the corpus network has links"
    ctx.via = "link"
    _check_case(ctx, case)


def test_some_unary_relay_cases_run_over_relay_channels() -> None:
    assert len(list(_unary_relay_params())) >= 15


#: Stream cases a relay link cannot carry: a stream on a link begins with its first frame, so a stream
#: "closed before its envelope" is an `end` for a stream that never began, which starts nothing
#: (test_relay_links.py: test_stream_items_for_a_stream_that_never_began_start_nothing_and_record_nothing).
_NOT_ON_A_LINK = ("stream: closed before its envelope",)


def _stream_relay_params() -> Iterator[Any]:
    for name, entry in CASES.items():
        case, marks = (entry, ()) if isinstance(entry, Case) else (entry.values[0], entry.marks)
        if {"stream", "_stream", "_server_stream"} & set(case.run.__code__.co_names) and name not in _NOT_ON_A_LINK:
            yield pytest.param(case, marks=marks, id=name)


@pytest.mark.parametrize("case", list(_stream_relay_params()))
def test_stream_relay_case_on_a_relay_link(ctx: Ctx, case: Case) -> None:
    """Every hostile streaming relay call meets the same refusal and record as a stream on a relay link."""
    assert ctx.net.layout.directory().forces[case.at].relay_address is not None, "the corpus network has links"
    ctx.stream_via = "link"
    _check_case(ctx, case)


def test_every_stream_relay_case_runs_on_a_relay_link() -> None:
    ids = {p.id for p in _stream_relay_params()}
    streams = {name for name in CASES if name.startswith("stream:") or "stream frame" in name}
    assert streams - ids == set(_NOT_ON_A_LINK), sorted(streams - ids)
    assert len(ids) >= 14


def _check_case(ctx: Ctx, case: Case) -> None:
    since = time.time()
    status, details = case.run(ctx)
    assert status == case.status, (status, details)
    if case.status != "OK" and case.audit is not None:
        leaked = [word for word in LEAKS if word in details]
        assert not leaked, f"the caller's details show {leaked}: {details!r}"
    if case.audit is None:
        assert records_since(ctx.net, case.at, since) == [], "refused before the gateway: nothing is recorded"
    else:
        found = _find(ctx, case, since)
        if not (case.audit.optional and not found):
            assert len(found) == 1, [
                (r.event, r.status, r.refusal_stage, r.refusal_reason) for r in records_since(ctx.net, case.at, since)
            ]
    for force in case.nothing_at:
        assert records_since(ctx.net, force, since) == [], f"something reached {force}"
    still_serving(ctx.net, case.at)


def test_every_case_is_named_once() -> None:
    assert len(CASES) >= 90
    groups = {name.split(":")[0] for name in CASES}
    assert groups == {"metadata", "header", "purpose", "token", "path", "message", "deadline", "relay", "stream"}


# -- certificates from certs/testcases.py -----------------------------------------------------------

#: Cases refused by the TLS handshake itself (grpc core's verification): the gateway's code never runs.
HANDSHAKE = frozenset(
    {
        "self-signed-gateway",
        "self-signed-app",
        "forged-issuer-app",
        "expired",
        "not-yet-valid",
        "server-eku-as-client",
        "signing-cert-as-tls",
    }
)


def _app_channel(net: NetworkThread, force: str, cert: Path, key: Path, officer: str) -> grpc.Channel:
    endpoint = client.from_manifest(net.manifest(), force)
    token = endpoint.unsafe_dev_token(officer=officer, units=("serocu",), roles=("investigator",), clearance="SC")
    return client.secure_channel(
        endpoint.local_address,
        ca=endpoint.ca,
        cert=cert,
        key=key,
        server_name=endpoint.server_name,
        token=token,
        purpose=PURPOSE,
    )


def test_certificate_cases_from_testcases(
    cnet: NetworkThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="psngw")
    cases: dict[str, Any] = load_testcases().build(tmp_path / "imposters", cnet.layout.directory())
    revoked = cases["revoked"]
    # Building the cases revoked one certificate and republished its force's CRL: let every gateway load it.
    for gateway in cnet.network.gateways.values():
        wait_for(
            lambda gw=gateway: _revoked_at(gw, revoked.cert_path),  # type: ignore[misc]
            f"{gateway.force} to load the new CRL",
        )
    failures = []
    for name, case in cases.items():
        since = time.time()
        cert = case.chain_path or case.cert_path
        if case.listener == "local":
            with _app_channel(cnet, case.gateway, cert, case.key_path, "DC-CERT") as ch:
                status, details = search(ch)
        else:
            status, details = _relay_with_cert(cnet, case.gateway, cert, case.key_path)
        got = records_since(cnet, case.gateway, since)
        if case.accept:
            expected = ("OK", [""])
        elif name in HANDSHAKE:
            expected = ("UNAVAILABLE", [])
        else:
            expected = ("UNAUTHENTICATED", ["peer-identity"])
        seen = (status, [r.refusal_stage for r in got])
        if seen != expected:
            failures.append(f"{name}: expected {expected}, got {seen} {details!r}")
        elif not case.accept and got and not got[0].refusal_reason:
            failures.append(f"{name}: recorded with no reason")
        still_serving(cnet, case.gateway)
    assert not failures, "\n".join(failures)


def _revoked_at(gateway: Any, cert: Path) -> bool:
    from gateway.errors import Unauthenticated
    from gateway.identity import Usage

    try:
        gateway.trust().verify(cert.read_bytes(), Usage.CLIENT, time.time())
    except Unauthenticated as exc:
        return "revoked" in exc.reason
    return False


def _relay_with_cert(net: NetworkThread, force: str, cert: Path, key: Path) -> Outcome:
    endpoint = client.from_manifest(net.manifest(), force)
    roots = b"".join(net.layout.material[f].ca.read_bytes() for f in net.layout.material)
    creds = grpc.ssl_channel_credentials(roots, key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(
        endpoint.peer_address, creds, options=[("grpc.ssl_target_name_override", endpoint.server_name)]
    ) as ch:
        return outcome(lambda: ch.unary_unary(UNARY)(b"", timeout=10))


# -- the threat model names only tests that exist ------------------------------------------------------

_TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)(?:\[([^\]]+)\])?")


def test_the_threat_model_names_only_tests_that_exist() -> None:
    text = (ROOT / "docs" / "threat-model.md").read_text()
    refs = _TEST_REF.findall(text)
    assert len(refs) > 60
    missing = []
    for path, name, param in refs:
        source = ROOT / path
        if not source.is_file() or not re.search(rf"^(async )?def {name}\(", source.read_text(), re.M):
            missing.append(f"{path}::{name}")
        elif param and name == "test_corpus_case" and param not in CASES:
            missing.append(f"{path}::{name}[{param}]")
    assert not missing, missing
    # every row of every boundary's table names at least one test
    rows = [line for line in text.splitlines() if re.match(r"\| [STRIDE] \|", line)]
    assert len(rows) > 40 and all(_TEST_REF.search(row) for row in rows), [r for r in rows if not _TEST_REF.search(r)]
