"""gateway.envelope: signed request envelopes, request seals and response seals.

The network: Hampshire (origin) calls an application hosted by Thames Valley
(host); Surrey is a third force. Certificates come from gateway.pki, imposters
from its profiles with one field changed.
"""

from __future__ import annotations

import hashlib
import os
import time
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import envelope as envelope_module
from gateway import pki
from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.clock import FakeClock
from gateway.directory import CallType, NetworkDirectory, load_directory
from gateway.envelope import (
    CONTEXT_ENVELOPE,
    CONTEXT_REQUEST_SEAL,
    CONTEXT_RESPONSE_SEAL,
    Envelope,
    EnvelopeVerifier,
    MessageDigest,
    RequestSeal,
    ResponseSeal,
    Signer,
    Verified,
    check_signature,
    envelope_body,
    parse_envelope_body,
    parse_request_seal_body,
    parse_response_seal_body,
    request_seal_body,
    response_seal_body,
    seal_envelope,
    seal_request,
    seal_response,
)
from gateway.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    RevocationDataUnavailable,
    Unauthenticated,
)
from gateway.identity import PeerIdentity, TrustStore, Usage, load_trust_store
from gateway.principal import Principal, Purpose
from gateway.replay import InMemoryReplayStore

NETWORK = "se.psn"
TV, HA, SU = "thames-valley", "hampshire", "surrey"
WINDOW = 60.0
METHOD = "/psn.demo.intel.v1.IntelligenceSearch/Search"

DIRECTORY = f"""\
network = "{NETWORK}"
clearance_levels = ["NPPV2", "NPPV3", "SC", "DV"]
roles = ["analyst", "investigator"]

[forces.{TV}]
ca = "pki/{TV}/ca.pem"
crl = "pki/{TV}/crl.pem"
peer_address = "127.0.0.1:7441"

[forces.{HA}]
ca = "pki/{HA}/ca.pem"
crl = "pki/{HA}/crl.pem"
peer_address = "127.0.0.1:7442"
clients = ["analyst-desk"]

[forces.{SU}]
ca = "pki/{SU}/ca.pem"
crl = "pki/{SU}/crl.pem"
peer_address = "127.0.0.1:7443"

[units.serocu]
name = "South East Regional Organised Crime Unit"

[applications.intel-search]
host = "{TV}"
min_clearance = "SC"
[applications.intel-search.services."psn.demo.intel.v1.IntelligenceSearch"]
Search = "unary"
StreamMatches = "server_stream"
"""


def gateway_id(force: str) -> str:
    return f"spiffe://{force}.{NETWORK}/gateway"


def load_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@dataclass
class Net:
    directory: NetworkDirectory
    trust: TrustStore
    root: Path
    signers: dict[str, Signer]  # Ed25519 gateway signing keys
    p256: dict[str, Signer]  # ECDSA P-256 gateway signing keys
    tls: dict[str, PeerIdentity]  # gateways' TLS identities (the relay peer)
    tls_signer: Signer  # Hampshire's TLS key and certificate, misused to sign
    log_signer: Signer  # Hampshire's audit-log key, misused to sign envelopes
    app_signer: Signer  # a signing certificate for an application identity
    imposter: Signer  # "Hampshire's gateway" signing certificate issued by Surrey's CA
    app_peer: PeerIdentity


def _imposter(net_root: Path, profile: pki.Profile, issuer_force: str, key_type: str = "ed25519") -> Signer:
    key = pki.generate_key(key_type)
    ca_dir = net_root / "pki" / issuer_force
    now = datetime.now(UTC)
    cert = pki.build_certificate(
        profile,
        public_key=key.public_key(),
        issuer=load_cert(ca_dir / "ca.pem"),
        issuer_key=load_key(ca_dir / "ca.key"),
        not_before=now - timedelta(minutes=5),
        not_after=now + timedelta(days=30),
    )
    return Signer(key, cert)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Net:
    root = tmp_path_factory.mktemp("net")
    (root / "directory.toml").write_text(DIRECTORY)
    directory = load_directory(root / "directory.toml")
    material = pki.init_network(directory)
    trust = load_trust_store(directory)
    now = time.time()
    signers, p256, tls = {}, {}, {}
    for force, m in material.items():
        signers[force] = Signer.from_files(m.gateway_signing.cert_path, m.gateway_signing.key_path)
        issued = pki.issue(m.ca_dir, pki.CertKind.GATEWAY_SIGNING, out_stem=m.ca_dir / "signing-p256", key_type="p256")
        p256[force] = Signer.from_files(issued.cert_path, issued.key_path)
        tls[force] = trust.verify(load_cert(m.gateway_tls.cert_path), Usage.CLIENT, now)
    ha = material[HA]
    td = f"{HA}.{NETWORK}"
    app_profile = replace(
        pki.leaf_profile(pki.CertKind.GATEWAY_SIGNING, trust_domain=td, display_name="Hampshire"),
        uris=(f"spiffe://{td}/app/analyst-desk",),
    )
    return Net(
        directory=directory,
        trust=trust,
        root=root,
        signers=signers,
        p256=p256,
        tls=tls,
        tls_signer=Signer(load_key(ha.gateway_tls.key_path), load_cert(ha.gateway_tls.cert_path)),
        log_signer=Signer.from_files(ha.log_signing.cert_path, ha.log_signing.key_path),
        app_signer=_imposter(root, app_profile, HA),
        imposter=_imposter(
            root, pki.leaf_profile(pki.CertKind.GATEWAY_SIGNING, trust_domain=td, display_name="Hampshire"), SU
        ),
        app_peer=trust.verify(load_cert(ha.app_clients["analyst-desk"].cert_path), Usage.CLIENT, now),
    )


class World:
    """One test's clock, replay store and host-side verifier (Thames Valley)."""

    def __init__(self, net: Net, *, own_force: str = TV, trust: TrustStore | None = None) -> None:
        self.net = net
        self.clock = FakeClock(time.time())
        self.replay = InMemoryReplayStore()
        store = trust or net.trust
        self.verifier = EnvelopeVerifier(
            trust=lambda: store,
            own_force=own_force,
            window=WINDOW,
            replay=self.replay,
            clock=self.clock,
            max_body_bytes=8192,
            max_deadline=300.0,
        )

    def envelope(self, **kw: Any) -> Envelope:
        now = self.clock.now()
        base = Envelope(
            request_id=uuid.uuid4().hex,
            origin_force=HA,
            origin_gateway=gateway_id(HA),
            host_force=TV,
            application="intel-search",
            method=METHOD,
            call_type=CallType.UNARY,
            principal=Principal("ha-1234", HA, ("serocu",), ("analyst",), "SC"),
            purpose=Purpose("investigation", "OP-ORCHID-17", "Témoin: van sighting"),
            issued_at=round(now, 3),
            deadline=round(now + 30, 3),
            messages_digest=MessageDigest.of(b"request").digest,
            message_count=1,
            metadata=(("x-trace", b"t-1"), ("x-blob-bin", b"\x00\xff")),
            origin_decision_id="d-1",
            origin_policy_version="p-1",
        )
        return replace(base, **kw)

    def stream_envelope(self, **kw: Any) -> Envelope:
        return self.envelope(
            call_type=CallType.CLIENT_STREAM, messages_digest=None, message_count=0, method=METHOD + "s", **kw
        )

    def signed(self, signer: Signer | None = None, **kw: Any) -> relay_pb2.Signed:
        return seal_envelope(self.envelope(**kw), signer or self.net.signers[HA])[0]

    def verify(self, signed: relay_pb2.Signed, peer: str | PeerIdentity = HA) -> Verified[Envelope]:
        identity = self.net.tls[peer] if isinstance(peer, str) else peer
        return self.verifier.verify_envelope(signed, peer=identity)


@pytest.fixture
def world(net: Net) -> World:
    return World(net)


def refused(kind: type[Exception], call: Callable[[], object]) -> str:
    with pytest.raises(kind) as info:
        call()
    assert type(info.value) is kind, f"{type(info.value).__name__}: {info.value}"
    return str(info.value)


def resign(signer: Signer, body: bytes, context: bytes = CONTEXT_ENVELOPE) -> relay_pb2.Signed:
    return signer.sign(context, body)


# -- the good paths ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ed25519", "p256"])
def test_an_envelope_verifies_and_round_trips(world: World, algorithm: str) -> None:
    signer = world.net.signers[HA] if algorithm == "ed25519" else world.net.p256[HA]
    env = world.envelope()
    signed, digest = seal_envelope(env, signer)
    verified = world.verify(signed)
    assert verified.value == env
    assert verified.digest == digest == hashlib.sha256(signed.body).digest()
    assert verified.signer.spiffe_id == gateway_id(HA) and verified.signer.kind == "gateway"
    assert verified.body == signed.body and verified.signature == signed.signature
    world.verifier.verify_messages(verified, MessageDigest.of(b"request").digest, 1)


def test_the_signer_certificate_is_verified_once_and_cached(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"static": 0, "parse": 0}
    store = TrustStore(world.net.directory, {f: world.net.trust.ca_certificate(f) for f in (TV, HA, SU)}, {})
    store._require_crl = False
    original_static = store._verify_static
    original_parse = envelope_module.x509.load_der_x509_certificate

    def static(*a: Any) -> Any:
        calls["static"] += 1
        return original_static(*a)

    def parse(*a: Any) -> Any:
        calls["parse"] += 1
        return original_parse(*a)

    monkeypatch.setattr(store, "_verify_static", static)
    monkeypatch.setattr(envelope_module.x509, "load_der_x509_certificate", parse)
    w = World(world.net, trust=store)
    for _ in range(5):
        w.verify(w.signed())
    # Once by the trust store (its static checks), once for our key cache; never per envelope.
    assert calls == {"static": 1, "parse": 2}


def test_ecdsa_signatures_are_low_s_and_fixed_length(net: Net) -> None:
    for _ in range(20):
        signature = net.p256[HA].sign(CONTEXT_ENVELOPE, os.urandom(16)).signature
        assert len(signature) == 64
        assert int.from_bytes(signature[32:], "big") <= envelope_module._P256_ORDER // 2


def test_a_high_s_ecdsa_signature_is_refused(net: Net) -> None:
    body = b"body"
    signed = net.p256[HA].sign(CONTEXT_ENVELOPE, body)
    r, s = signed.signature[:32], int.from_bytes(signed.signature[32:], "big")
    high = r + (envelope_module._P256_ORDER - s).to_bytes(32, "big")
    key = net.p256[HA].certificate.public_key()
    assert check_signature(key, CONTEXT_ENVELOPE, body, signed.signature)  # type: ignore[arg-type]
    assert not check_signature(key, CONTEXT_ENVELOPE, body, high)  # type: ignore[arg-type]


# -- attacks on the request envelope: a table of named cases ----------------------------------


def _tamper(field: str, value: Any) -> Callable[[World], relay_pb2.Signed]:
    """Change one field of a signed body without re-signing (an attacker on the wire)."""

    def make(w: World) -> relay_pb2.Signed:
        signed = w.signed()
        body = relay_pb2.EnvelopeBody()
        body.ParseFromString(signed.body)
        target: Any = body
        *path, last = field.split(".")
        for part in path:
            target = getattr(target, part)
        if isinstance(value, list):
            del getattr(target, last)[:]
            getattr(target, last).extend(value)
        else:
            setattr(target, last, value)
        return relay_pb2.Signed(
            body=body.SerializeToString(deterministic=True),
            signer_certificate=signed.signer_certificate,
            signature=signed.signature,
        )

    return make


TAMPERED_FIELDS = [
    ("request_id", "f" * 32),
    ("origin_force", SU),
    ("origin_gateway", gateway_id(SU)),
    ("host_force", SU),
    ("application", "custody"),
    ("method", "/psn.demo.intel.v1.IntelligenceSearch/StreamMatches"),
    ("call_type", relay_pb2.SERVER_STREAM),
    ("principal.officer_id", "ha-9999"),
    ("principal.force", SU),
    ("principal.units", ["serocu", "ct-policing"]),
    ("principal.roles", ["investigator"]),
    ("principal.clearance", "DV"),
    ("purpose.justification", "safeguarding"),
    ("purpose.case_reference", "OP-OTHER"),
    ("purpose.text", "another reason"),
    ("issued_at_ms", 1),
    ("deadline_ms", 0),
    ("messages_digest", b"\x00" * 32),
    ("message_count", 2),
    ("origin_decision_id", "d-2"),
    ("origin_policy_version", "p-2"),
    ("version", 2),
]


def test_every_field_of_the_body_is_tampered_in_the_table() -> None:
    names = {f for f, _ in TAMPERED_FIELDS} | {"metadata"}
    top = {f.name for f in relay_pb2.EnvelopeBody.DESCRIPTOR.fields}
    assert top <= {n.split(".")[0] for n in names}


@pytest.mark.parametrize("field,value", TAMPERED_FIELDS, ids=[f for f, _ in TAMPERED_FIELDS])
def test_a_field_changed_on_the_wire_breaks_the_signature(world: World, field: str, value: Any) -> None:
    assert "signature by" in refused(Unauthenticated, lambda: world.verify(_tamper(field, value)(world)))


def test_metadata_changed_on_the_wire_breaks_the_signature(world: World) -> None:
    signed = world.signed()
    body = relay_pb2.EnvelopeBody()
    body.ParseFromString(signed.body)
    body.metadata.add(key="x-injected", value=b"1")
    forged = relay_pb2.Signed(
        body=body.SerializeToString(deterministic=True),
        signer_certificate=signed.signer_certificate,
        signature=signed.signature,
    )
    assert "does not verify" in refused(Unauthenticated, lambda: world.verify(forged))


def _signed_body(w: World, mutate: Callable[[relay_pb2.EnvelopeBody], None]) -> relay_pb2.Signed:
    """A body changed and then validly signed by Hampshire's gateway (a buggy or malicious origin)."""
    body = relay_pb2.EnvelopeBody()
    body.ParseFromString(envelope_body(w.envelope()))
    mutate(body)
    return resign(w.net.signers[HA], body.SerializeToString(deterministic=True))


def _set(**kw: Any) -> Callable[[relay_pb2.EnvelopeBody], None]:
    def mutate(body: relay_pb2.EnvelopeBody) -> None:
        for k, v in kw.items():
            setattr(body, k, v)

    return mutate


# (name, make the signed envelope, relay peer, error class, reason)
ENVELOPE_CASES: list[tuple[str, Callable[[World], relay_pb2.Signed], str, type[Exception], str]] = [
    (
        "signer from another force",
        lambda w: w.signed(w.net.signers[SU]),
        SU,
        Unauthenticated,
        "names origin force hampshire but is signed by surrey",
    ),
    (
        "signer is not the TLS peer",
        lambda w: w.signed(),
        SU,
        Unauthenticated,
        "signed by force hampshire's gateway but relayed by",
    ),
    (
        "origin gateway is not the signer",
        lambda w: w.signed(origin_gateway=f"spiffe://{HA}.{NETWORK}/gateway2"),
        HA,
        Unauthenticated,
        "names origin gateway",
    ),
    (
        "principal of another force",
        lambda w: w.signed(principal=Principal("su-1", SU, ("serocu",), (), "DV")),
        HA,
        Unauthenticated,
        "is of force surrey, not the origin force hampshire",
    ),
    ("addressed to another host", lambda w: w.signed(host_force=SU), HA, Unauthenticated, "addressed to force surrey"),
    (
        "TLS certificate used as signer",
        lambda w: w.signed(w.net.tls_signer),
        HA,
        Unauthenticated,
        "not valid for envelope-signing",
    ),
    ("audit-log key used as signer", lambda w: w.signed(w.net.log_signer), HA, Unauthenticated, "not a gateway"),
    ("application signing certificate", lambda w: w.signed(w.net.app_signer), HA, Unauthenticated, "not a gateway"),
    (
        "signer certificate from another force's CA",
        lambda w: w.signed(w.net.imposter),
        HA,
        Unauthenticated,
        "was not issued by the CA of force hampshire",
    ),
    (
        "signed as another structure",
        lambda w: resign(w.net.signers[HA], envelope_body(w.envelope()), CONTEXT_RESPONSE_SEAL),
        HA,
        Unauthenticated,
        "does not verify",
    ),
    (
        "issue time too old",
        lambda w: w.signed(issued_at=w.clock.now() - WINDOW - 1, deadline=None),
        HA,
        Unauthenticated,
        "s old, outside the 60 s window",
    ),
    (
        "issue time in the future",
        lambda w: w.signed(issued_at=w.clock.now() + WINDOW + 1, deadline=None),
        HA,
        Unauthenticated,
        "in the future, outside the 60 s window",
    ),
    (
        "deadline passed",
        lambda w: w.signed(issued_at=w.clock.now() - 10, deadline=w.clock.now() - 1),
        HA,
        DeadlineExceeded,
        "deadline passed",
    ),
    (
        "deadline too far",
        lambda w: w.signed(deadline=w.clock.now() + 301),
        HA,
        InvalidArgument,
        "more than 300 s after its issue time",
    ),
    (
        "deadline before the issue time",
        lambda w: _signed_body(w, _set(deadline_ms=int(w.clock.now() * 1000) - 5000)),
        HA,
        DeadlineExceeded,
        "deadline is not after the issue time",
    ),
    ("wrong version", lambda w: _signed_body(w, _set(version=2)), HA, InvalidArgument, "version 2 is not 1"),
    ("unknown call type", lambda w: _signed_body(w, _set(call_type=9)), HA, InvalidArgument, "call type 9"),
    (
        "unknown field",
        lambda w: resign(w.net.signers[HA], envelope_body(w.envelope()) + b"\xa8\x1f\x01"),
        HA,
        InvalidArgument,
        "unknown fields",
    ),
    (
        "non-canonical encoding",
        lambda w: resign(w.net.signers[HA], b"\x08\x01" + envelope_body(w.envelope())),
        HA,
        InvalidArgument,
        "not canonically encoded",
    ),
    ("garbage body", lambda w: resign(w.net.signers[HA], b"\xff\xff\xff"), HA, InvalidArgument, "does not parse"),
    ("malformed request id", lambda w: w.signed(request_id="a/b"), HA, InvalidArgument, "request_id"),
    (
        "unary with two messages",
        lambda w: _signed_body(w, _set(message_count=2)),
        HA,
        InvalidArgument,
        "one request message",
    ),
    (
        "stream envelope with a message digest",
        lambda w: _signed_body(w, _set(call_type=relay_pb2.CLIENT_STREAM)),
        HA,
        InvalidArgument,
        "belong in the request seal",
    ),
    (
        "purpose text with a newline (a forged line in the audit record)",
        lambda w: resign(
            w.net.signers[HA],
            envelope_body(w.envelope(purpose=Purpose("investigation", "OP-1", "looking\nofficer: someone-else"))),
        ),
        HA,
        InvalidArgument,
        "refused character U+000A (category Cc)",
    ),
    (
        "purpose text with a right-to-left override",
        lambda w: resign(
            w.net.signers[HA], envelope_body(w.envelope(purpose=Purpose("investigation", "OP-1", "case \u202e51-po")))
        ),
        HA,
        InvalidArgument,
        "refused character RIGHT-TO-LEFT OVERRIDE",
    ),
    (
        "purpose text not in NFC",
        lambda w: resign(
            w.net.signers[HA], envelope_body(w.envelope(purpose=Purpose("investigation", "OP-1", "Te\u0301moin")))
        ),
        HA,
        InvalidArgument,
        "not in NFC",
    ),
    (
        "justification code with CR LF (it goes into the backend's headers)",
        lambda w: resign(
            w.net.signers[HA],
            envelope_body(w.envelope(purpose=Purpose("investigation\r\nx-evil: 1", "OP-1", "reason"))),
        ),
        HA,
        InvalidArgument,
        "is not a code",
    ),
    (
        "case reference that is not ASCII",
        lambda w: resign(
            w.net.signers[HA], envelope_body(w.envelope(purpose=Purpose("investigation", "OP-café", "reason")))
        ),
        HA,
        InvalidArgument,
        "printable ASCII, no spaces",
    ),
    (
        "token relayed in metadata",
        lambda w: w.signed(metadata=(("authorization", b"Bearer x"),)),
        HA,
        InvalidArgument,
        "tokens never leave the origin gateway",
    ),
    (
        "gateway header relayed in metadata",
        lambda w: w.signed(metadata=(("psn-gw-officer", b"x"),)),
        HA,
        InvalidArgument,
        "reserved key",
    ),
    (
        "oversized body",
        lambda w: resign(w.net.signers[HA], b"\x00" * 8193),
        HA,
        ResourceExhausted,
        "over 8192",
    ),
    (
        "no signer certificate",
        lambda w: relay_pb2.Signed(body=envelope_body(w.envelope()), signature=b"\x00" * 64),
        HA,
        Unauthenticated,
        "no signer certificate",
    ),
]


@pytest.mark.parametrize("name,make,peer,error,reason", ENVELOPE_CASES, ids=[c[0] for c in ENVELOPE_CASES])
def test_bad_envelopes_are_refused(
    world: World, name: str, make: Callable[[World], relay_pb2.Signed], peer: str, error: type, reason: str
) -> None:
    assert reason in refused(error, lambda: world.verify(make(world), peer))
    assert len(world.replay) == 0  # nothing refused consumed a request id


def test_a_replayed_request_id_is_refused(world: World) -> None:
    signed = world.signed(deadline=None)
    world.verify(signed)
    world.clock.advance(WINDOW - 1)  # still inside the window
    assert "replayed request id" in refused(Unauthenticated, lambda: world.verify(signed))


def test_request_ids_count_against_their_origin_forces_share_of_the_replay_store(world: World) -> None:
    world.verifier._replay = world.replay = InMemoryReplayStore(max_entries=2)  # one id per origin force
    world.verify(world.signed())
    assert "force hampshire holds 1 request ids" in refused(ResourceExhausted, lambda: world.verify(world.signed()))


def test_a_replay_after_the_window_is_refused_by_the_time_check(world: World) -> None:
    signed = world.signed(deadline=None)
    world.verify(signed)
    world.clock.advance(WINDOW + 0.001)
    assert "outside the 60 s window" in refused(Unauthenticated, lambda: world.verify(signed))


def test_a_request_id_reused_with_a_new_signature_is_still_a_replay(world: World) -> None:
    env = world.envelope()
    world.verify(seal_envelope(env, world.net.signers[HA])[0])
    again = seal_envelope(replace(env, purpose=Purpose("safeguarding", "X-1", "again")), world.net.p256[HA])[0]
    assert "replayed" in refused(Unauthenticated, lambda: world.verify(again))


def test_the_relay_peer_must_be_a_gateway(world: World) -> None:
    assert "is not a gateway" in refused(Unauthenticated, lambda: world.verify(world.signed(), world.net.app_peer))


def test_unusable_revocation_data_fails_closed(world: World) -> None:
    cas = {f: world.net.trust.ca_certificate(f) for f in (TV, HA, SU)}
    store = TrustStore(world.net.directory, cas, {HA: "CRL missing", TV: None, SU: None})
    w = World(world.net, trust=store)
    refused(RevocationDataUnavailable, lambda: w.verify(w.signed()))


def test_a_message_that_does_not_match_the_envelope_is_refused(world: World) -> None:
    verified = world.verify(world.signed())
    wrong = MessageDigest.of(b"another request").digest
    assert "not the one the envelope signed" in refused(
        Unauthenticated, lambda: world.verifier.verify_messages(verified, wrong, 1)
    )
    right = MessageDigest.of(b"request").digest
    assert "not the one" in refused(Unauthenticated, lambda: world.verifier.verify_messages(verified, right, 2))


def test_sealing_refuses_an_envelope_the_peer_would_refuse(net: Net, world: World) -> None:
    with pytest.raises(InvalidArgument, match="one request message"):
        seal_envelope(world.envelope(message_count=3), net.signers[HA])


# -- message digests ----------------------------------------------------------------------------


def test_message_digest_known_answer() -> None:
    d0 = hashlib.sha256(b"psn-gateway/v1 messages").digest()
    d1 = hashlib.sha256(d0 + (0).to_bytes(8, "big") + hashlib.sha256(b"a").digest()).digest()
    d2 = hashlib.sha256(d1 + (1).to_bytes(8, "big") + hashlib.sha256(b"").digest()).digest()
    md = MessageDigest()
    assert md.digest == d0 and md.count == 0
    assert md.update(b"a") == 0 and md.update(b"", seq=1) == 1
    assert (md.digest, md.count) == (d2, 2)


def test_message_digest_detects_reordering_and_gaps() -> None:
    assert MessageDigest.of(b"a", b"b").digest != MessageDigest.of(b"b", b"a").digest
    assert MessageDigest.of(b"ab").digest != MessageDigest.of(b"a", b"b").digest
    md = MessageDigest()
    md.update(b"a", seq=0)
    assert "sequence 2 arrived where 1" in refused(Unauthenticated, lambda: md.update(b"c", seq=2))


# -- streams: the request seal ----------------------------------------------------------------


def _stream(w: World) -> tuple[Verified[Envelope], MessageDigest]:
    verified = w.verify(seal_envelope(w.stream_envelope(), w.net.signers[HA])[0])
    md = MessageDigest()
    for i, data in enumerate((b"m0", b"m1", b"m2")):
        md.update(data, seq=i)
    return verified, md


def _request_seal(w: World, env: Verified[Envelope], md: MessageDigest, **kw: Any) -> RequestSeal:
    base = RequestSeal(env.value.request_id, env.digest, md.digest, md.count, round(w.clock.now(), 3))
    return replace(base, **kw)


def test_a_sealed_stream_verifies(world: World) -> None:
    env, md = _stream(world)
    seal = _request_seal(world, env, md)
    verified = world.verifier.verify_request_seal(
        seal_request(seal, world.net.signers[HA]), envelope=env, digest=md.digest, count=md.count
    )
    assert verified.value == seal


REQUEST_SEAL_CASES: list[tuple[str, Callable[[World, Verified[Envelope], MessageDigest], Any], str]] = [
    ("missing seal", lambda w, e, m: None, "stream ended without a request seal"),
    (
        "seal over other messages",
        lambda w, e, m: seal_request(
            _request_seal(w, e, m, messages_digest=MessageDigest.of(b"m0", b"m1", b"X").digest), w.net.signers[HA]
        ),
        "are not the ones sealed",
    ),
    (
        "seal over fewer messages",
        lambda w, e, m: seal_request(
            _request_seal(w, e, m, messages_digest=MessageDigest.of(b"m0", b"m1").digest, message_count=2),
            w.net.signers[HA],
        ),
        "are not the ones sealed",
    ),
    (
        "seal of another call",
        lambda w, e, m: seal_request(
            _request_seal(w, e, m, request_id="0" * 32, envelope_digest=b"\x01" * 32), w.net.signers[HA]
        ),
        "belongs to another call",
    ),
    (
        "seal with another envelope digest",
        lambda w, e, m: seal_request(_request_seal(w, e, m, envelope_digest=b"\x01" * 32), w.net.signers[HA]),
        "belongs to another call",
    ),
    (
        "seal signed by another force's gateway",
        lambda w, e, m: seal_request(_request_seal(w, e, m), w.net.signers[SU]),
        "request seal signed by spiffe://surrey.se.psn/gateway",
    ),
    (
        "seal issued before the envelope",
        lambda w, e, m: seal_request(_request_seal(w, e, m, issued_at=e.value.issued_at - 1), w.net.signers[HA]),
        "before the envelope's",
    ),
    (
        "envelope signature presented as a seal",
        lambda w, e, m: resign(w.net.signers[HA], request_seal_body(_request_seal(w, e, m)), CONTEXT_ENVELOPE),
        "does not verify",
    ),
]


@pytest.mark.parametrize(
    "name,make", [(c[0], c[1]) for c in REQUEST_SEAL_CASES], ids=[c[0] for c in REQUEST_SEAL_CASES]
)
def test_bad_request_seals_abort_the_stream(world: World, name: str, make: Any) -> None:
    reason = dict((c[0], c[2]) for c in REQUEST_SEAL_CASES)[name]
    env, md = _stream(world)
    signed = make(world, env, md)
    assert reason in refused(
        Unauthenticated,
        lambda: world.verifier.verify_request_seal(signed, envelope=env, digest=md.digest, count=md.count),
    )


def test_a_unary_call_has_no_request_seal(world: World) -> None:
    env = world.verify(world.signed())
    md = MessageDigest.of(b"request")
    seal = seal_request(_request_seal(world, env, md), world.net.signers[HA])
    refused(InvalidArgument, lambda: world.verifier.verify_request_seal(seal, envelope=env, digest=md.digest, count=1))
    refused(InvalidArgument, lambda: world.verifier.verify_messages(_stream(world)[0], md.digest, 1))


# -- the response seal ----------------------------------------------------------------------------


def _response(w: World, env_digest: bytes, request_id: str, **kw: Any) -> ResponseSeal:
    md = MessageDigest.of(b"response")
    base = ResponseSeal(
        request_id=request_id,
        envelope_digest=env_digest,
        host_force=TV,
        host_gateway=gateway_id(TV),
        status_code=0,
        status_message="",
        initial_metadata=(("x-result", b"ok"),),
        trailing_metadata=(("x-count-bin", b"\x01"),),
        messages_digest=md.digest,
        message_count=1,
        issued_at=round(w.clock.now(), 3),
        decision_id="dec-1",
        policy_version="pv-1",
    )
    return replace(base, **kw)


def test_a_response_seal_verifies_at_the_origin(world: World) -> None:
    _, digest = seal_envelope(world.envelope(request_id="a" * 32), world.net.signers[HA])
    seal = _response(world, digest, "a" * 32)
    origin = World(world.net, own_force=HA)
    verified = origin.verifier.verify_response_seal(
        seal_response(seal, world.net.signers[TV]),
        envelope_digest=digest,
        request_id="a" * 32,
        host_force=TV,
        digest=MessageDigest.of(b"response").digest,
        count=1,
    )
    assert verified.value == seal and verified.signer.force == TV


def _other_call(w: World) -> ResponseSeal:
    _, other_digest = seal_envelope(w.envelope(request_id="b" * 32), w.net.signers[HA])
    return _response(w, other_digest, "b" * 32)


RESPONSE_CASES: list[tuple[str, Callable[[World, bytes], Any], str]] = [
    ("missing seal", lambda w, d: None, "carries no seal"),
    ("seal swapped from another call", lambda w, d: seal_response(_other_call(w), w.net.signers[TV]), "another call"),
    (
        "seal with our request id but another envelope",
        lambda w, d: seal_response(_response(w, b"\x02" * 32, "a" * 32), w.net.signers[TV]),
        "another call",
    ),
    (
        "seal signed by a non-host force",
        lambda w, d: seal_response(_response(w, d, "a" * 32), w.net.signers[SU]),
        "signed by force surrey, not the host force thames-valley",
    ),
    (
        "seal naming another host gateway",
        lambda w, d: seal_response(
            _response(w, d, "a" * 32, host_gateway=f"spiffe://{TV}.{NETWORK}/gateway-b"), w.net.signers[TV]
        ),
        "names host",
    ),
    (
        "seal over another response",
        lambda w, d: seal_response(
            _response(w, d, "a" * 32, messages_digest=MessageDigest.of(b"forged").digest), w.net.signers[TV]
        ),
        "are not the ones sealed",
    ),
    (
        "seal over more responses",
        lambda w, d: seal_response(_response(w, d, "a" * 32, message_count=2), w.net.signers[TV]),
        "are not the ones sealed",
    ),
    (
        "stale seal",
        lambda w, d: seal_response(_response(w, d, "a" * 32, issued_at=w.clock.now() - 61), w.net.signers[TV]),
        "outside the 60 s window",
    ),
    (
        "request seal signature presented as a response seal",
        lambda w, d: resign(w.net.signers[TV], response_seal_body(_response(w, d, "a" * 32)), CONTEXT_REQUEST_SEAL),
        "does not verify",
    ),
]


@pytest.mark.parametrize("name", [c[0] for c in RESPONSE_CASES])
def test_bad_response_seals_fail_the_call(world: World, name: str) -> None:
    make, reason = {c[0]: (c[1], c[2]) for c in RESPONSE_CASES}[name]
    _, digest = seal_envelope(world.envelope(request_id="a" * 32), world.net.signers[HA])
    signed = make(world, digest)
    assert reason in refused(
        Unauthenticated,
        lambda: world.verifier.verify_response_seal(
            signed,
            envelope_digest=digest,
            request_id="a" * 32,
            host_force=TV,
            digest=MessageDigest.of(b"response").digest,
            count=1,
        ),
    )


def test_status_details_travel_in_the_response_seal_trailers_only(world: World) -> None:
    details = (("grpc-status-details-bin", b"\x08\x05\x12\x03bad"),)
    seal = _response(world, b"\x00" * 32, "a" * 32, status_code=5, trailing_metadata=details)
    assert parse_response_seal_body(response_seal_body(seal)).trailing_metadata == details
    with pytest.raises(InvalidArgument, match="reserved key"):
        parse_response_seal_body(response_seal_body(replace(seal, initial_metadata=details)))
    with pytest.raises(InvalidArgument, match="reserved key"):
        seal_envelope(world.envelope(metadata=details), world.net.signers[HA])


def test_a_response_seal_with_a_bad_status_is_malformed(world: World) -> None:
    body = relay_pb2.ResponseSealBody()
    body.ParseFromString(response_seal_body(_response(world, b"\x00" * 32, "a" * 32)))
    body.status_code = 17
    with pytest.raises(InvalidArgument, match="not a gRPC status"):
        parse_response_seal_body(body.SerializeToString(deterministic=True))


# -- Signer ------------------------------------------------------------------------------------


def test_signer_from_files_names_the_file_at_fault(net: Net, tmp_path: Path) -> None:
    ha = net.root / "pki" / HA
    with pytest.raises(ConfigError, match=r"gateway-signing\.key.*does not match"):
        Signer.from_files(ha / "gateway-tls.pem", ha / "gateway-signing.key")
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(ConfigError, match=r"bad\.pem"):
        Signer.from_files(tmp_path / "bad.pem", ha / "gateway-signing.key")
    with pytest.raises(ConfigError, match=r"missing\.key"):
        Signer.from_files(ha / "gateway-signing.pem", tmp_path / "missing.key")


def test_signer_knows_its_identity(net: Net) -> None:
    assert net.signers[HA].spiffe_id == gateway_id(HA)
    assert (net.signers[HA].algorithm, net.p256[HA].algorithm) == ("ed25519", "ecdsa-p256-sha256")


# -- properties (hypothesis) --------------------------------------------------------------------

_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
_ms = st.integers(min_value=1, max_value=4_000_000_000_000)
_digest = st.binary(min_size=32, max_size=32)
_metadata = st.lists(
    st.one_of(
        st.tuples(
            st.from_regex(r"x-[a-z0-9]{1,10}", fullmatch=True),
            st.from_regex(r"[ -~]{0,20}", fullmatch=True).map(str.encode),
        ),
        st.tuples(st.from_regex(r"x-[a-z0-9]{1,10}-bin", fullmatch=True), st.binary(max_size=20)),
    ),
    max_size=5,
).map(tuple)
#: free text a gateway sends: no refused character (`gateway.purpose`), NFC, no spaces around it
_text = (
    st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")), min_size=1, max_size=50)
    .map(lambda t: unicodedata.normalize("NFC", t).strip(" "))
    .filter(bool)
)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    call_type = draw(st.sampled_from(list(CallType)))
    issued = draw(_ms)
    deadline = draw(st.one_of(st.none(), st.integers(issued + 1, issued + 10_000_000)))
    streams = call_type.client_streams
    return Envelope(
        request_id=draw(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)),
        origin_force=draw(_names),
        origin_gateway=gateway_id(draw(_names)),
        host_force=draw(_names),
        application=draw(_names),
        method=METHOD,
        call_type=call_type,
        principal=Principal(
            draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,30}", fullmatch=True)),
            draw(_names),
            tuple(draw(st.lists(_names, max_size=5))),
            tuple(draw(st.lists(_names, max_size=5))),
            draw(st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True)),
        ),
        purpose=Purpose(draw(_names), draw(st.from_regex(r"[A-Z0-9]{1,20}", fullmatch=True)), draw(_text)),
        issued_at=issued / 1000,
        deadline=None if deadline is None else deadline / 1000,
        messages_digest=None if streams else draw(_digest),
        message_count=0 if streams else 1,
        metadata=draw(_metadata),
        origin_decision_id=draw(st.from_regex(r"[!-~]{0,20}", fullmatch=True)),
        origin_policy_version=draw(st.from_regex(r"[!-~]{0,20}", fullmatch=True)),
    )


@given(envelopes())
def test_envelope_encoding_round_trips(env: Envelope) -> None:
    body = envelope_body(env)
    assert parse_envelope_body(body) == env
    assert envelope_body(parse_envelope_body(body)) == body


@given(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), _digest, _digest, st.integers(0, 2**40), _ms)
def test_request_seal_encoding_round_trips(rid: str, env_digest: bytes, digest: bytes, count: int, ms: int) -> None:
    seal = RequestSeal(rid, env_digest, digest, count, ms / 1000)
    assert parse_request_seal_body(request_seal_body(seal)) == seal


@given(
    st.integers(0, 16),
    st.text(max_size=100),
    _metadata,
    _metadata,
    _digest,
    st.integers(0, 2**40),
    _ms,
)
def test_response_seal_encoding_round_trips(
    code: int, message: str, initial: Any, trailing: Any, digest: bytes, count: int, ms: int
) -> None:
    seal = ResponseSeal(
        "r" * 10, b"\x07" * 32, TV, gateway_id(TV), code, message, initial, trailing, digest, count, ms / 1000, "d", "p"
    )
    assert parse_response_seal_body(response_seal_body(seal)) == seal


def _refused_or_same_signer(w: World, forged: relay_pb2.Signed, where: str, signed: relay_pb2.Signed) -> None:
    """A changed body or signature is refused. A changed certificate is refused too, except where the change
    does not change the certificate: the unused-bits octet of its signature BIT STRING is not covered by the
    CA's signature and cryptography accepts some values of it (same TBS, same key, same identity) as the
    certificate of `signed`, the envelope before the change."""
    try:
        verified = w.verify(forged)
    except Unauthenticated:
        return
    assert where == "certificate", f"a changed {where} was accepted"
    original = x509.load_der_x509_certificate(signed.signer_certificate)
    changed = x509.load_der_x509_certificate(forged.signer_certificate)
    assert changed.tbs_certificate_bytes == original.tbs_certificate_bytes
    assert changed.signature == original.signature
    assert verified.signer.spiffe_id == gateway_id(HA) and verified.signer.serial == original.serial_number


def _flip(signed: relay_pb2.Signed, where: str, index: int, flip: int) -> relay_pb2.Signed:
    fields = {"body": signed.body, "signature": signed.signature, "certificate": signed.signer_certificate}
    data = bytearray(fields[where])
    data[index % len(data)] ^= flip
    fields[where] = bytes(data)
    return relay_pb2.Signed(
        body=fields["body"], signature=fields["signature"], signer_certificate=fields["certificate"]
    )


# A flipped byte in a certificate's serial can make it negative: cryptography then warns (an error under
# pytest) from gateway.identity.load_certificate; the certificate is still refused. Reported to the lead.
@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    where=st.sampled_from(["body", "signature", "certificate"]), index=st.integers(0, 10_000), flip=st.integers(1, 255)
)
def test_any_single_byte_change_is_detected(net: Net, where: str, index: int, flip: int) -> None:
    for signer in (net.signers[HA], net.p256[HA]):
        w = World(net)
        signed = w.signed(signer)
        _refused_or_same_signer(w, _flip(signed, where, index, flip), where, signed)


@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
@pytest.mark.parametrize("key", ["ed25519", "p256"])
@pytest.mark.parametrize("where", ["body", "signature", "certificate"])
def test_every_single_byte_flip_is_refused_exhaustively(net: Net, where: str, key: str) -> None:
    signed = World(net).signed(net.signers[HA] if key == "ed25519" else net.p256[HA])
    size = {"body": len(signed.body), "signature": 64, "certificate": len(signed.signer_certificate)}[where]
    for index in range(size):
        _refused_or_same_signer(World(net), _flip(signed, where, index, 0x01), where, signed)
    World(net).verify(signed)  # and the untouched one verifies


# -- benchmark (not a test: pytest -m bench) ------------------------------------------------------


@pytest.mark.bench
def test_bench_sign_and_verify(net: Net) -> None:
    w = World(net)
    w.replay = InMemoryReplayStore(max_entries=1_000_000)
    w.verifier._replay = w.replay
    n = 2000
    out = {}
    for name, signer in (("ed25519", net.signers[HA]), ("p256", net.p256[HA])):
        envs = [w.envelope() for _ in range(n)]
        t0 = time.perf_counter()
        signed = [seal_envelope(e, signer)[0] for e in envs]
        t1 = time.perf_counter()
        for s in signed:
            w.verify(s)
        t2 = time.perf_counter()
        out[name] = (n / (t1 - t0), n / (t2 - t1))
    raw = {}
    for name, signer in (("ed25519", net.signers[HA]), ("p256", net.p256[HA])):
        key = signer.certificate.public_key()
        one = signer.sign(CONTEXT_ENVELOPE, b"x" * 300)
        t0 = time.perf_counter()
        for _ in range(n):
            check_signature(key, CONTEXT_ENVELOPE, one.body, one.signature)  # type: ignore[arg-type]
        raw[name] = n / (time.perf_counter() - t0)
    ed, p = out["ed25519"], out["p256"]
    print(
        f"\nenvelopes/s  ed25519 sign {ed[0]:.0f} verify {ed[1]:.0f} | p256 sign {p[0]:.0f} verify {p[1]:.0f}"
        f" | ed25519/p256 sign x{ed[0] / p[0]:.2f} verify x{ed[1] / p[1]:.2f}"
        f" | signature check alone: ed25519 {raw['ed25519']:.0f}/s p256 {raw['p256']:.0f}/s"
    )
