"""Trust domains in the running network: imposters, revocation, stale CRLs, rotation, expiry (issue 3).

Every test here changes certificates, keys or CRLs, so the module runs a
network of its own (never the session's shared one), whose gateways poll their
files every `RELOAD_INTERVAL` seconds instead of the default 2 s. Nothing is
ever restarted: each change reaches the running gateways through their file
watcher (`Gateway._watch` -> `Gateway.reload`).

Tests run in file order and leave the network serving: a test that breaks a
force's material repairs it before it ends.

Imposters refused by the TLS handshake never reach the gateway's code; their
log line is grpc core's, on stderr, at INFO: it is checked unless
GRPC_VERBOSITY silences it.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway import pki
from gateway.envelope import CONTEXT_ENVELOPE, check_signature
from gateway.errors import Unauthenticated
from gateway.identity import Usage
from gateway.server import LINK_METHOD, Gateway
from tests.certcases import load_testcases
from tests.integration._trust_helpers import (
    CRL_GRACE,
    EXPIRY_WARNING_DAYS,
    RELOAD_INTERVAL,
    Outcome,
    app_channel,
    atomic_write,
    bulk_lookup_until,
    case_files,
    custody,
    fingerprint_of,
    gateways,
    metric_value,
    patched,
    peer_channel,
    records_since,
    reissue,
    relay_probe,
    review_until,
    search,
    served_leaf,
    trust_network,
    wait_for,
)
from tests.netharness import NetworkThread

pytestmark = pytest.mark.integration

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

#: The application each force hosts, and a call to it.
HOSTED: dict[str, Callable[[grpc.Channel], Outcome]] = {
    "thames-valley": search,
    "hampshire": custody,
    "surrey": case_files,
}

#: How long a change may take to reach every gateway: a few reload intervals, plus the watcher's settle time.
PROPAGATION = 20 * RELOAD_INTERVAL + 5


@pytest.fixture(scope="module")
def tnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkThread]:
    net = trust_network(tmp_path_factory.mktemp("trust"))
    yield net
    net.stop()


def _server_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "psngw.server"]


def _serves(net: NetworkThread, force: str, *, listener: str = "local") -> str:
    """The fingerprint of the leaf `force`'s gateway serves to a new connection on `listener`."""
    directory = net.layout.directory()
    material = net.layout.material[force]
    if listener == "local":
        address = net.layout.local_address(force)
        client = material.app_clients["analyst-desk"]
        ca = material.ca
    else:  # as a peer gateway would connect: another force's gateway certificate
        address = f"127.0.0.1:{net.layout.ports[force].peer}"
        other = net.layout.material[next(f for f in HOSTED if f != force)]
        client = other.gateway_tls
        ca = material.ca
    der = served_leaf(
        address,
        server_name=directory.forces[force].gateway_server_name,
        ca=ca,
        cert=client.cert_path,
        key=client.key_path,
    )
    return fingerprint_of(der)


def _still_serving(net: NetworkThread, force: str) -> None:
    """Good clients still get through `force`'s gateway: on its local listener, and relayed into its peer listener."""
    with net.officer_channel(force) as ch:
        assert search(ch) == (OK, ""), f"{force}'s own application no longer served"
    other = next(f for f in HOSTED if f != force)
    with net.officer_channel(other) as ch:
        assert HOSTED[force](ch) == (OK, ""), f"{other} can no longer reach the application {force} hosts"


# -- 1. imposters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Handshake:
    """Refused by the TLS handshake (grpc core/BoringSSL, against the directory's CA roots).

    The call never reaches the gateway's code: the client sees UNAVAILABLE, the
    gateway writes no audit record and no `psngw.server` line; grpc core logs
    the handshake failure (to stderr) with `reason`.
    """

    reason: str


@dataclass(frozen=True)
class Stage:
    """Passes the handshake, refused by the peer-identity stage (gateway.identity): UNAUTHENTICATED,
    logged by `psngw.server` and audited with `reason`."""

    reason: str


#: grpc core logs a failed handshake at INFO (its default here); GRPC_VERBOSITY=ERROR or NONE silences it.
CORE_LOGS_HANDSHAKES = os.environ.get("GRPC_VERBOSITY", "INFO").upper() in ("INFO", "DEBUG")

A, B = "thames-valley", "hampshire"

#: How each case of certs/testcases.py is refused (None: the control, accepted).
EXPECTED: dict[str, Handshake | Stage | None] = {
    "valid-app-client": None,
    "self-signed-gateway": Handshake("unable to get local issuer certificate"),
    "self-signed-app": Handshake("unable to get local issuer certificate"),
    "forged-issuer-app": Handshake("certificate signature failure"),
    "cross-force-gateway": Stage(f"spiffe://{B}.se.psn/gateway was not issued by the CA of force {B}"),
    "cross-force-app": Stage(f"spiffe://{B}.se.psn/app/analyst-desk was not issued by the CA of force {B}"),
    "expired": Handshake("certificate has expired"),
    "not-yet-valid": Handshake("certificate is not yet valid"),
    "revoked": Stage("certificate is revoked"),
    "server-eku-as-client": Handshake("unsupported certificate purpose"),
    "signing-cert-as-tls": Handshake("unsupported certificate purpose"),
    "ca-as-leaf": Stage("is not a leaf"),
    "no-san": Stage("no subject alternative name"),
    "no-uri-san": Stage("exactly one URI SAN (SPIFFE ID), it has 0"),
    "two-spiffe-ids": Stage("exactly one URI SAN (SPIFFE ID), it has 2"),
    "spiffe-plus-other-uri": Stage("exactly one URI SAN (SPIFFE ID), it has 2"),
    "spiffe-wrong-scheme": Stage("is not a spiffe:// ID"),
    "spiffe-uppercase-scheme": Stage("is not a spiffe:// ID"),
    "spiffe-uppercase-td": Stage("has an invalid trust domain"),
    "spiffe-invalid-td": Stage("has an invalid trust domain"),
    "spiffe-percent-encoded-td": Stage("has an invalid trust domain"),
    "spiffe-empty-td": Stage("has an invalid trust domain"),
    "spiffe-empty-path": Stage("names no workload path"),
    "spiffe-trailing-slash": Stage("has an empty path segment"),
    "spiffe-empty-segment": Stage("has an empty path segment"),
    "spiffe-dot-segment": Stage("has a relative path segment"),
    "spiffe-dot-dot": Stage("has a relative path segment"),
    "spiffe-percent-path": Stage("has invalid characters in its path"),
    "spiffe-query": Stage("has invalid characters in its path"),
    "spiffe-fragment": Stage("has invalid characters in its path"),
    "spiffe-port": Stage("has an invalid trust domain"),
    "spiffe-userinfo": Stage("has an invalid trust domain"),
    # BoringSSL does not apply the trust anchor's pathlen:0, so the chain passes the handshake;
    # only a directory CA may issue a leaf (verify_directly_issued_by).
    "unlisted-intermediate": Stage(f"spiffe://{A}.se.psn/app/analyst-desk was not issued by the CA of force {A}"),
}


def _is_revoked_at(gateway: Gateway, cert: Path, usage: Usage) -> bool:
    try:
        gateway.trust().verify(cert.read_bytes(), usage, time.time())
    except Unauthenticated as exc:
        return "revoked" in exc.reason
    return False


@pytest.fixture(scope="module")
def imposters(tnet: NetworkThread, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cases: dict[str, Any] = load_testcases().build(tmp_path_factory.mktemp("imposters"), tnet.layout.directory())
    # Building the cases revoked one of A's client certificates and republished A's CRL: let it arrive.
    for gw in gateways(tnet).values():
        wait_for(
            lambda gw=gw: _is_revoked_at(gw, cases["revoked"].cert_path, Usage.CLIENT),  # type: ignore[misc]
            f"the gateway of {gw.force} to load {A}'s new CRL",
            timeout=PROPAGATION,
        )
    return cases


def _present(net: NetworkThread, case: Any) -> Outcome:
    cert = case.chain_path or case.cert_path
    if case.listener == "local":
        with app_channel(net, case.gateway, cert, case.key_path) as ch:
            return search(ch)
    with peer_channel(net, case.gateway, cert, case.key_path) as ch:
        return relay_probe(ch)


def test_every_imposter_case_is_classified(imposters: dict[str, Any]) -> None:
    assert set(imposters) == set(EXPECTED), "a case was added to certs/testcases.py: say here how it is refused"
    assert [n for n, c in imposters.items() if c.accept] == ["valid-app-client"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_an_imposter_is_refused_where_it_matters(
    tnet: NetworkThread,
    imposters: dict[str, Any],
    name: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    case, expected = imposters[name], EXPECTED[name]
    caplog.set_level(logging.INFO, logger="psngw")
    capfd.readouterr()
    since = time.time()
    code, details = _present(tnet, case)
    logs = _server_logs(caplog)
    refused = records_since(tnet, case.gateway, since, status="UNAUTHENTICATED")
    if expected is None:
        assert (code, details) == (OK, "")
        assert refused == []
    elif isinstance(expected, Handshake):
        assert code is UNAVAILABLE, details
        assert refused == [] and not [line for line in logs if "refused" in line]  # it never reached the gateway
        if CORE_LOGS_HANDSHAKES:
            assert expected.reason in capfd.readouterr().err  # grpc core's operator log line names the reason
    else:
        assert (code, details) == (UNAUTHENTICATED, "unauthenticated")  # the class of failure, nothing more
        method = (
            "/psn.gateway.v1.Relay/Unary" if case.listener == "peer" else "/psn.demo.intel.v1.IntelligenceSearch/Search"
        )
        assert [line for line in logs if line.startswith(f"refused {method} at peer-identity:")], logs
        assert any(expected.reason in line for line in logs), logs
        [record] = refused
        assert record.refusal_stage == "peer-identity" and expected.reason in record.refusal_reason
        assert record.method == method and record.officer_id == ""  # refused before the token was read
    _still_serving(tnet, case.gateway)


# -- 2. revocation without restart ----------------------------------------------------------------


def test_revoking_an_application_certificate_refuses_its_next_call(
    tnet: NetworkThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    force = "hampshire"
    gw, material = gateways(tnet)[force], tnet.layout.material[force]
    caplog.set_level(logging.INFO, logger="psngw")
    second = pki.issue(material.ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "desk-2", app="analyst-desk")
    with (
        app_channel(tnet, force, second.cert_path, second.key_path) as doomed,
        tnet.officer_channel(force) as other,
    ):
        assert search(doomed) == (OK, "") and custody(doomed) == (OK, "")
        since = time.time()
        pki.revoke(material.ca_dir, cert_path=second.cert_path, reason="keyCompromise")
        # The same channel (its TLS connection stays open): refused from the next call on, nothing restarted.
        outcomes: list[Outcome] = []

        def refused() -> bool:
            outcomes.append(search(doomed))
            return outcomes[-1][0] is not OK

        wait_for(refused, "the revoked certificate to be refused", timeout=PROPAGATION)
        assert outcomes[-1] == (UNAUTHENTICATED, "unauthenticated")
        assert {o for o in outcomes[:-1]} <= {(OK, "")}
        assert search(doomed)[0] is UNAUTHENTICATED and custody(doomed)[0] is UNAUTHENTICATED
        # Every other client is unaffected, in this force and the others.
        assert search(other) == (OK, "") and custody(other) == (OK, "")
        _still_serving(tnet, force)
    assert gateways(tnet)[force] is gw
    assert any(f"serial {second.serial:x}" in line and "revoked" in line for line in _server_logs(caplog))
    [first, *_] = records_since(tnet, force, since, status="UNAUTHENTICATED")
    assert first.refusal_stage == "peer-identity" and "certificate is revoked" in first.refusal_reason


def test_revoking_a_peer_gateway_tls_certificate_refuses_its_relays_until_it_has_a_new_one(
    tnet: NetworkThread, caplog: pytest.LogCaptureFixture
) -> None:
    origin, host = "surrey", "thames-valley"
    material = tnet.layout.material[origin]
    caplog.set_level(logging.INFO, logger="psngw")
    with tnet.officer_channel(origin) as ch, tnet.officer_channel("hampshire") as bystander:
        assert search(ch) == (OK, "")
        since = time.time()
        pki.revoke(material.ca_dir, cert_path=material.gateway_tls.cert_path, reason="keyCompromise")
        wait_for(lambda: search(ch)[0] is UNAUTHENTICATED, f"{host} to refuse {origin}'s gateway", timeout=PROPAGATION)
        assert [search(ch)[0] for _ in range(3)] == [UNAUTHENTICATED] * 3  # and it stays refused
        assert search(bystander) == (OK, "")  # other forces still relay to the same host
        [refusal, *_] = records_since(tnet, host, since, status="UNAUTHENTICATED")
        assert refusal.refusal_stage == "peer-identity" and "certificate is revoked" in refusal.refusal_reason
        # Refused on the relay link that was already open: peer identity is checked per call, not per link.
        assert refusal.method == LINK_METHOD
        assert any(f"refused {LINK_METHOD} at peer-identity" in line for line in _server_logs(caplog))
        # The operator issues a new certificate: the gateway picks it up, relays work again.
        fresh = reissue(material, pki.CertKind.GATEWAY_TLS)
        wait_for(lambda: search(ch) == (OK, ""), f"{origin}'s new certificate to be used", timeout=PROPAGATION)
        assert _serves(tnet, origin) == fresh.fingerprint
    _still_serving(tnet, origin)


def test_revoking_a_gateway_signing_certificate_refuses_what_it_signs(
    tnet: NetworkThread, caplog: pytest.LogCaptureFixture
) -> None:
    force, host = "hampshire", "thames-valley"
    material = tnet.layout.material[force]
    gw = gateways(tnet)[force]
    caplog.set_level(logging.INFO, logger="psngw")
    with tnet.officer_channel(force) as out, tnet.officer_channel(host) as into:
        assert search(out) == (OK, "") and custody(into) == (OK, "")
        since = time.time()
        pki.revoke(material.ca_dir, cert_path=material.gateway_signing.cert_path, reason="keyCompromise")
        # Its request envelopes are refused by the host; its response seals are not believed by the origin.
        wait_for(lambda: search(out)[0] is UNAUTHENTICATED, "the host to refuse the envelope", timeout=PROPAGATION)
        wait_for(lambda: custody(into)[0] is UNAVAILABLE, "the origin to refuse the seal", timeout=PROPAGATION)
        [refusal, *_] = records_since(tnet, host, since, status="UNAUTHENTICATED")
        assert refusal.refusal_stage == "envelope" and "certificate is revoked" in refusal.refusal_reason
        with tnet.officer_channel("surrey") as bystander:
            assert search(bystander) == (OK, "")
        fresh = reissue(material, pki.CertKind.GATEWAY_SIGNING)
        wait_for(lambda: fingerprint_of(gw.signer().certificate) == fresh.fingerprint, "the new signing key")
        assert search(out) == (OK, "") and custody(into) == (OK, "")


def test_relays_to_a_force_whose_gateway_tls_certificate_is_revoked_are_refused(tnet: NetworkThread) -> None:
    host = "hampshire"
    material = tnet.layout.material[host]
    pki.revoke(material.ca_dir, cert_path=material.gateway_tls.cert_path, reason="keyCompromise")
    try:
        origin = gateways(tnet)["thames-valley"]
        wait_for(
            lambda: _is_revoked_at(origin, material.gateway_tls.cert_path, Usage.SERVER),
            "the origin to load the host's CRL",
            timeout=PROPAGATION,
        )
        # Over a relay link the origin checks the host's TLS certificate against the host force's CRL, at
        # connect and before every call: the request is never sent (a gRPC channel has no such hook).
        since = time.time()
        with tnet.officer_channel("thames-valley", officer="DC-REVOKED-HOST") as ch:
            assert custody(ch) == (UNAVAILABLE, "unavailable")
            # A request over 256 KiB goes on a link of its own, checked the same way.
            with pytest.raises(grpc.RpcError) as large:
                ch.unary_unary("/psn.demo.custody.v1.CustodyRecords/GetRecord")(b"\n\x01x" * 100_000, timeout=10)
            assert large.value.code() is UNAVAILABLE
        refusals = records_since(tnet, "thames-valley", since, officer="DC-REVOKED-HOST")
        assert len(refusals) == 2
        for refused in refusals:
            assert refused.status == "UNAVAILABLE" and "certificate is revoked" in refused.refusal_reason
            assert "TLS certificate is refused" in refused.refusal_reason
        assert not records_since(tnet, host, since, officer="DC-REVOKED-HOST")  # nothing reached the host
    finally:
        fresh = reissue(material, pki.CertKind.GATEWAY_TLS)
        wait_for(lambda: _serves(tnet, host) == fresh.fingerprint, "the host's new certificate", timeout=PROPAGATION)
        with tnet.officer_channel(host) as ch:
            wait_for(lambda: search(ch) == (OK, ""), f"{host}'s relays to work again", timeout=PROPAGATION)
        # The origin's links still hold the revoked certificate: the next call replaces its link and goes through.
        with tnet.officer_channel("thames-valley") as ch:
            assert custody(ch) == (OK, "")


# -- 3. stale CRL ----------------------------------------------------------------------------


def test_a_stale_crl_fails_its_force_closed_and_a_fresh_one_restores_it(
    tnet: NetworkThread, caplog: pytest.LogCaptureFixture
) -> None:
    force = "hampshire"
    material = tnet.layout.material[force]
    gws = gateways(tnet)
    caplog.set_level(logging.INFO, logger="psngw")

    def publish(next_update_ago: float) -> float:
        """Publish a one-day CRL whose nextUpdate was `next_update_ago` seconds ago; wait until all gateways have it."""
        now = datetime.now(UTC)
        pki.publish_crl(material.ca_dir, next_update_days=1, now=now - timedelta(days=1, seconds=next_update_ago))
        next_update = (now - timedelta(seconds=next_update_ago)).replace(microsecond=0).timestamp()
        for gw in gws.values():
            wait_for(
                lambda gw=gw: gw.trust().crl_status(force, time.time()).next_update == next_update,  # type: ignore[misc]
                f"the gateway of {gw.force} to load the new CRL",
                timeout=PROPAGATION,
            )
        return next_update

    # Past nextUpdate but inside the configured grace: still usable.
    publish(CRL_GRACE / 3)
    assert all(gw.health()["crl"][force]["usable"] for gw in gws.values())
    _still_serving(tnet, force)

    # Past nextUpdate plus the grace: every gateway refuses the force's certificates (fail closed).
    since = time.time()
    publish(CRL_GRACE + 60)
    for gw in gws.values():
        crl = gw.health()["crl"]
        assert crl[force]["usable"] is False and "CRL is stale" in crl[force]["reason"]
        assert all(crl[f]["usable"] for f in HOSTED if f != force)
        assert metric_value(gw, "psngw_crl_usable", force=force) == 0.0
    with tnet.officer_channel(force) as ch:  # the force's own application, at its own gateway
        assert search(ch) == (UNAVAILABLE, "unavailable")
    with tnet.officer_channel("thames-valley") as ch:  # the force's gateway seals the answer: not believed
        assert custody(ch)[0] is UNAVAILABLE
    [record, *_] = records_since(tnet, force, since, status="UNAVAILABLE")
    assert record.refusal_stage == "peer-identity"
    assert f"revocation data of force {force} unusable (CRL is stale" in record.refusal_reason
    assert any(f"revocation data of force {force} unusable" in line for line in _server_logs(caplog))
    # Other forces still work, among themselves.
    for origin, call in (("surrey", search), ("thames-valley", case_files), ("thames-valley", search)):
        with tnet.officer_channel(origin) as ch:
            assert call(ch) == (OK, ""), origin

    # A fresh CRL restores the force, without a restart.
    pki.publish_crl(material.ca_dir, next_update_days=7)
    for gw in gws.values():
        wait_for(lambda gw=gw: gw.health()["crl"][force]["usable"], "a fresh CRL", timeout=PROPAGATION)  # type: ignore[misc]
        assert metric_value(gw, "psngw_crl_usable", force=force) == 1.0
    _still_serving(tnet, force)


# -- 4. rotation under load ----------------------------------------------------------------


@dataclass
class _Load:
    """One caller making calls back to back until told to stop."""

    label: str
    force: str
    call: Callable[[grpc.Channel], Outcome]
    results: list[tuple[float, Outcome]]


def _run_load(net: NetworkThread, load: _Load, stop: threading.Event) -> None:
    with net.officer_channel(load.force) as ch:
        while not stop.is_set():
            started = time.monotonic()
            load.results.append((started, load.call(ch)))


def _rotate_under_load(net: NetworkThread, *, rounds: int, settle: float) -> None:
    """Rotate surrey's TLS and signing material `rounds` times while calls of every kind run; no call may fail."""
    force, host = "surrey", "thames-valley"
    gw, tv = gateways(net)[force], gateways(net)[host]
    material = net.layout.material[force]
    old_tls, old_signing = _serves(net, force), fingerprint_of(gw.signer().certificate)
    clients_seen: list[str] = []  # surrey's TLS client certificate, as thames-valley's peer listener sees it
    envelopes: list[Any] = []  # request envelopes from surrey, verified at thames-valley
    seals: list[Any] = []  # response seals from surrey, verified at thames-valley

    def watch_admit(original: Any) -> Any:
        async def admit(call: Any) -> None:
            await original(call)
            if call.peer is not None and call.peer.force == force:
                clients_seen.append(call.peer.fingerprint)

        return admit

    def watch(into: list[Any]) -> Callable[[Any], Any]:
        def wrap(original: Any) -> Any:
            def verify(*args: Any, **kwargs: Any) -> Any:
                verified = original(*args, **kwargs)
                if verified.signer.force == force:
                    into.append(verified)
                return verified

            return verify

        return wrap

    loads = [
        _Load("surrey app -> surrey case-files (local)", force, case_files, []),
        _Load("surrey app -> thames-valley intel-search (relayed out)", force, search, []),
        _Load("surrey app -> hampshire custody-records (relayed out)", force, custody, []),
        _Load("thames-valley app -> surrey case-files (relayed in)", host, case_files, []),
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=_run_load, args=(net, load, stop), name=load.label) for load in loads]
    # Streams that open before the first rotation and end after the last: in-flight calls are not broken.
    streams: dict[str, Outcome] = {}
    clerk = {"units": ("surrey-custody",), "roles": ("custody-officer",)}  # the policy allows them bulk look-ups
    for label, origin, stream, officer in (
        ("surrey app <-> surrey case-files Review (local bidi)", force, review_until, {}),
        (
            "surrey app -> hampshire custody BulkLookup (relayed client stream)",
            force,
            bulk_lookup_until,
            clerk,
        ),
        ("thames-valley app <-> surrey case-files Review (relayed bidi)", host, review_until, {}),
    ):

        def hold(label: str = label, origin: str = origin, stream: Any = stream, officer: Any = officer) -> None:
            with net.officer_channel(origin, **officer) as ch:
                streams[label] = stream(ch, stop)

        threads.append(threading.Thread(target=hold, name=label))
    with (
        patched(tv.peer_identity, "admit", watch_admit),
        patched(tv.envelope_verifier, "verify_envelope", watch(envelopes)),
        patched(tv.envelope_verifier, "verify_response_seal", watch(seals)),
    ):
        for thread in threads:
            thread.start()
        try:
            time.sleep(settle)
            rotated_at = time.monotonic()
            for _ in range(rounds):
                new_tls = reissue(material, pki.CertKind.GATEWAY_TLS)
                new_signing = reissue(material, pki.CertKind.GATEWAY_SIGNING)
                wait_for(
                    lambda tls=new_tls.fingerprint, signing=new_signing.fingerprint: (  # type: ignore[misc]
                        fingerprint_of(gw.signer().certificate) == signing and _serves(net, force) == tls
                    ),
                    "the rotation to be picked up",
                    timeout=PROPAGATION,
                )
                reloaded_at = time.monotonic()
                time.sleep(settle)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        # One more relayed call each way, on fresh material only.
        with net.officer_channel(force) as ch:
            assert search(ch) == (OK, "")
        with net.officer_channel(host) as ch:
            assert case_files(ch) == (OK, "")

    assert streams == dict.fromkeys(streams, (OK, "")) and len(streams) == 3, streams
    for load in loads:
        failed = [outcome for _, outcome in load.results if outcome != (OK, "")]
        assert failed == [], f"{load.label}: {len(failed)} of {len(load.results)} calls failed: {failed[:3]}"
        assert sum(1 for t, _ in load.results if t < rotated_at) >= 3, f"{load.label}: no load before the rotation"
        assert sum(1 for t, _ in load.results if t > reloaded_at) >= 3, f"{load.label}: no load after the reload"
    assert gw.reload_errors == []
    # Peers see the new TLS certificate: served on both listeners, presented as a client to the host.
    assert new_tls.fingerprint != old_tls
    assert _serves(net, force, listener="local") == new_tls.fingerprint
    assert _serves(net, force, listener="peer") == new_tls.fingerprint
    assert clients_seen[0] == old_tls and clients_seen[-1] == new_tls.fingerprint
    # Envelopes and seals are signed by the new signing key, and the host recorded that signature.
    assert new_signing.fingerprint != old_signing
    new_key = x509.load_pem_x509_certificate(new_signing.cert_path.read_bytes()).public_key()
    assert isinstance(new_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
    assert envelopes[0].signer.fingerprint == old_signing
    last = envelopes[-1]
    assert last.signer.fingerprint == new_signing.fingerprint
    assert check_signature(new_key, CONTEXT_ENVELOPE, last.body, last.signature)
    [recorded] = records_since(net, host, 0, request_id=last.value.request_id)
    assert base64.b64decode(recorded.envelope_signature) == last.signature
    assert seals[0].signer.fingerprint == old_signing and seals[-1].signer.fingerprint == new_signing.fingerprint


def test_rotating_tls_and_signing_certificates_under_load_fails_no_call(tnet: NetworkThread) -> None:
    _rotate_under_load(tnet, rounds=1, settle=1.0)


@pytest.mark.slow
def test_repeated_rotations_under_a_longer_load_fail_no_call(tnet: NetworkThread) -> None:
    _rotate_under_load(tnet, rounds=8, settle=1.5)


# -- 5. a bad rotation ---------------------------------------------------------------------------

_GARBAGE_CERT = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
# Not a key: a PEM frame around garbage. (The label is spelt in two parts so that no scan for
# private keys in the repository mistakes this file for one.)
_PEM_LABEL = "PRIVATE" + " KEY"
_GARBAGE_KEY = f"-----BEGIN {_PEM_LABEL}-----\nbm90IGEga2V5\n-----END {_PEM_LABEL}-----\n".encode()


def test_a_bad_rotation_is_rejected_and_the_old_material_stays(
    tnet: NetworkThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    force = "hampshire"
    gw, material, config = gateways(tnet)[force], tnet.layout.material[force], tnet.layout.config(force)
    caplog.set_level(logging.INFO, logger="psngw")
    old_tls, old_signing = _serves(tnet, force), fingerprint_of(gw.signer().certificate)
    failed_before = metric_value(gw, "psngw_reloads_total", result="failed") or 0.0

    def rejected(path: Path, text: str) -> None:
        wait_for(
            lambda: any(str(path) in e and text in e for e in gw.health()["reload_errors"]),
            f"a reload error naming {path}",
            timeout=PROPAGATION,
        )
        assert any(
            line.startswith("reload rejected, keeping the last good version") and str(path) in line
            for line in _server_logs(caplog)
        )

    def unchanged(tls: str, signing: str) -> None:
        assert _serves(tnet, force) == tls and _serves(tnet, force, listener="peer") == tls
        assert fingerprint_of(gw.signer().certificate) == signing
        _still_serving(tnet, force)  # relays out are signed and relays in are served with the kept material

    # TLS: a garbage certificate, then a good certificate with the old key, then its own key.
    atomic_write(config.tls.cert, _GARBAGE_CERT)
    rejected(config.tls.cert, "not a PEM certificate")
    unchanged(old_tls, old_signing)
    fresh = pki.issue(material.ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "tls-next")
    atomic_write(config.tls.cert, fresh.cert_path.read_bytes())
    rejected(config.tls.key, "does not match")
    unchanged(old_tls, old_signing)
    atomic_write(config.tls.key, fresh.key_path.read_bytes(), mode=0o600)
    wait_for(lambda: _serves(tnet, force) == fresh.fingerprint, "the good TLS pair", timeout=PROPAGATION)
    wait_for(lambda: gw.health()["reload_errors"] == [], "the reload errors to clear", timeout=PROPAGATION)
    unchanged(fresh.fingerprint, old_signing)

    # Signing: a garbage key, then a good key with the old certificate, then its own certificate.
    atomic_write(config.signing.key, _GARBAGE_KEY, mode=0o600)
    rejected(config.signing.key, "cannot load signing key")
    unchanged(fresh.fingerprint, old_signing)
    signing = pki.issue(material.ca_dir, pki.CertKind.GATEWAY_SIGNING, out_stem=tmp_path / "signing-next")
    atomic_write(config.signing.key, signing.key_path.read_bytes(), mode=0o600)
    rejected(config.signing.key, "does not match")
    unchanged(fresh.fingerprint, old_signing)
    atomic_write(config.signing.cert, signing.cert_path.read_bytes())
    wait_for(
        lambda: fingerprint_of(gw.signer().certificate) == signing.fingerprint,
        "the good signing pair",
        timeout=PROPAGATION,
    )
    wait_for(lambda: gw.health()["reload_errors"] == [], "the reload errors to clear", timeout=PROPAGATION)
    unchanged(fresh.fingerprint, signing.fingerprint)
    assert (metric_value(gw, "psngw_reloads_total", result="failed") or 0.0) >= failed_before + 4


def _reload(net: NetworkThread, gw: Gateway) -> list[str]:
    """Reload `gw` now, on its own loop (what SIGHUP asks for); its errors."""

    async def run() -> list[str]:
        return gw.reload()

    return net.run(run())


_GARBAGE_CRL = b"-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n"


def test_a_bad_crl_is_rejected_and_the_last_good_one_stays(
    tnet: NetworkThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    force = "surrey"
    material, gws = tnet.layout.material[force], gateways(tnet)
    crl = material.crl
    caplog.set_level(logging.INFO, logger="psngw")
    doomed = pki.issue(material.ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "desk-3", app="analyst-desk")
    before_revocation = crl.read_bytes()
    pki.revoke(material.ca_dir, cert_path=doomed.cert_path, reason="keyCompromise")
    in_force = crl.read_bytes()
    assert {f: _reload(tnet, gw) for f, gw in gws.items()} == {f: [] for f in gws}
    try:
        with app_channel(tnet, force, doomed.cert_path, doomed.key_path) as doomed_channel:
            assert search(doomed_channel)[0] is UNAUTHENTICATED
            bad: list[tuple[str, bytes | None, str]] = [
                ("garbage", _GARBAGE_CRL, "unreadable"),
                ("another force's CRL", tnet.layout.material["hampshire"].crl.read_bytes(), "not signed by"),
                ("an older CRL of the force (a rollback)", before_revocation, "older than the CRL in force"),
                ("no file", None, "missing"),
            ]
            for label, data, text in bad:
                if data is None:
                    crl.unlink()
                else:
                    atomic_write(crl, data)
                for gw in gws.values():
                    errors = _reload(tnet, gw)
                    assert any(str(crl) in e and text in e for e in errors), (label, gw.force, errors)
                    assert gw.health()["reload_errors"] == errors
                    assert gw.health()["crl"][force]["usable"], (label, gw.force)
                # The last good CRL stays in force: what it revoked stays revoked, everything else is served.
                assert search(doomed_channel)[0] is UNAUTHENTICATED, label
                _still_serving(tnet, force)
            assert any(
                line.startswith("reload rejected, keeping the last good version") and str(crl) in line
                for line in _server_logs(caplog)
            )
            # The good CRL comes back, then a newer one: accepted.
            atomic_write(crl, in_force)
            assert {f: _reload(tnet, gw) for f, gw in gws.items()} == {f: [] for f in gws}
            pki.publish_crl(material.ca_dir, next_update_days=7)
            assert {f: _reload(tnet, gw) for f, gw in gws.items()} == {f: [] for f in gws}
            assert search(doomed_channel)[0] is UNAUTHENTICATED
    finally:
        if not crl.exists() or crl.read_bytes() != in_force:
            pki.publish_crl(material.ca_dir, next_update_days=7)
            for gw in gws.values():
                _reload(tnet, gw)
    _still_serving(tnet, force)


def test_a_bad_ca_file_keeps_the_last_good_ca_and_other_forces_revocations_still_apply(
    tnet: NetworkThread, tmp_path: Path
) -> None:
    broken, force = "hampshire", "surrey"
    gws = gateways(tnet)
    ca_path = tnet.layout.material[broken].ca
    good = ca_path.read_bytes()
    material = tnet.layout.material[force]
    doomed = pki.issue(material.ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "desk-4", app="analyst-desk")
    with app_channel(tnet, force, doomed.cert_path, doomed.key_path) as doomed_channel:
        assert search(doomed_channel) == (OK, "")
        atomic_write(ca_path, _GARBAGE_CERT)
        try:
            pki.revoke(material.ca_dir, cert_path=doomed.cert_path, reason="keyCompromise")
            for gw in gws.values():
                errors = _reload(tnet, gw)
                assert any(str(ca_path) in e for e in errors), (gw.force, errors)
            # Surrey's revocation applies although an unrelated force's CA file is broken ...
            assert search(doomed_channel)[0] is UNAUTHENTICATED
            # ... and the broken force is still trusted through its last good CA certificate, by its own gateway
            # (its application's certificate) and by the others (its gateway's certificates). This test's client
            # trusts a copy of the good CA: it reads the file too.
            (tmp_path / "ca.pem").write_bytes(good)
            own = tnet.layout.material[broken].app_clients["analyst-desk"]
            with app_channel(tnet, broken, own.cert_path, own.key_path, ca=tmp_path / "ca.pem") as ch:
                assert search(ch) == (OK, "")
            with tnet.officer_channel("thames-valley") as ch:
                assert custody(ch) == (OK, "")
        finally:
            atomic_write(ca_path, good)
            assert {f: _reload(tnet, gw) for f, gw in gws.items()} == {f: [] for f in gws}
    _still_serving(tnet, broken)


def test_a_reload_can_be_requested_as_on_sighup(tnet: NetworkThread) -> None:
    gw = gateways(tnet)["hampshire"]

    def reloads() -> float:
        return sum(metric_value(gw, "psngw_reloads_total", result=r) or 0.0 for r in ("ok", "failed"))

    before = reloads()
    tnet.loop.call_soon_threadsafe(gw.request_reload)  # nothing changed on disk
    wait_for(lambda: reloads() > before, "the requested reload", timeout=PROPAGATION)
    assert gw.reload_errors == []


# -- 6. expiry warnings ---------------------------------------------------------------------------


def test_a_certificate_near_expiry_is_reported_in_health_metrics_and_logs(
    tnet: NetworkThread, caplog: pytest.LogCaptureFixture
) -> None:
    force = "thames-valley"
    gw = gateways(tnet)[force]
    caplog.set_level(logging.INFO, logger="psngw")
    assert gw.health()["expiring_certificates"] == []  # 30-day leaves, long-lived CAs: none within the window
    assert (metric_value(gw, "psngw_certificate_expiry_days", certificate="tls") or 0) > EXPIRY_WARNING_DAYS
    fresh = reissue(tnet.layout.material[force], pki.CertKind.GATEWAY_TLS, days=3)
    wait_for(lambda: gw.health()["expiring_certificates"] != [], "the expiry warning", timeout=PROPAGATION)
    assert gw.health()["expiring_certificates"] == [{"certificate": "tls", "days_left": 3.0}]
    days = metric_value(gw, "psngw_certificate_expiry_days", certificate="tls")
    assert days is not None and 2.99 < days <= 3.0
    assert any(line == "tls certificate expires in 3.0 days" for line in _server_logs(caplog))
    assert _serves(tnet, force) == fresh.fingerprint
    _still_serving(tnet, force)


def test_a_rotated_certificate_its_peers_would_refuse_is_not_swapped_in(tnet: NetworkThread, tmp_path: Path) -> None:
    # Thames Valley's TLS files replaced by a valid pair of the wrong identity (an application of the
    # same force) and then of the wrong trust domain (Surrey's gateway): both are refused at reload.
    force = "thames-valley"
    gw, config = gateways(tnet)[force], tnet.layout.config(force)
    old = fingerprint_of(gw._tls.certificate)
    cert, key = config.tls.cert.read_bytes(), config.tls.key.read_bytes()
    wrong_app = pki.issue(
        tnet.layout.material[force].ca_dir, pki.CertKind.APP_SERVER, app="intel-search", out_stem=tmp_path / "app"
    )
    wrong_force = pki.issue(tnet.layout.material["surrey"].ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "sy")
    try:
        for issued, why in ((wrong_app, "not spiffe://thames-valley.se.psn/gateway"), (wrong_force, "not spiffe")):
            atomic_write(config.tls.key, issued.key_path.read_bytes(), mode=0o600)
            atomic_write(config.tls.cert, issued.cert_path.read_bytes())
            wait_for(
                lambda why=why: any("new certificate" in e and why in e for e in gw.health()["reload_errors"]),
                "the rotation to be refused",
                timeout=PROPAGATION,
            )
            assert fingerprint_of(gw._tls.certificate) == old
            with tnet.officer_channel("surrey") as ch:  # relays into Thames Valley still work
                assert search(ch)[0] is grpc.StatusCode.OK
    finally:
        atomic_write(config.tls.key, key, mode=0o600)
        atomic_write(config.tls.cert, cert)
    wait_for(lambda: gw.health()["reload_errors"] == [], "the errors to clear", timeout=PROPAGATION)
