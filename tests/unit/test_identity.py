"""Workload identity: every imposter of certs/testcases.py is refused, for its reason."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import pki
from gateway.directory import NetworkDirectory, load_directory
from gateway.errors import ConfigError, RevocationDataUnavailable, Unauthenticated
from gateway.identity import TrustStore, Usage, load_trust_store, parse_spiffe_id
from tests.certcases import load_testcases

DIRECTORY = """\
network = "se.psn"
clearance_levels = ["NPPV1", "SC"]
[forces.thames-valley]
ca = "pki/thames-valley/ca.pem"
crl = "pki/thames-valley/crl.pem"
peer_address = "127.0.0.1:7441"
clients = ["analyst-desk"]
[forces.hampshire]
ca = "pki/hampshire/ca.pem"
crl = "pki/hampshire/crl.pem"
peer_address = "127.0.0.1:7442"
clients = ["analyst-desk"]
[forces.surrey]
ca = "pki/surrey/ca.pem"
crl = "pki/surrey/crl.pem"
peer_address = "127.0.0.1:7443"
clients = ["analyst-desk"]
"""

#: The reason each refusal must give (a substring of the error's reason).
REASONS = {
    "self-signed-gateway": "was not issued by the CA",
    "self-signed-app": "was not issued by the CA",
    "forged-issuer-app": "was not issued by the CA",
    "cross-force-gateway": "was not issued by the CA",
    "cross-force-app": "was not issued by the CA",
    "expired": "expired",
    "not-yet-valid": "not yet valid",
    "revoked": "revoked",
    "server-eku-as-client": "not valid for tls-client",
    "signing-cert-as-tls": "not valid for tls-client",
    "ca-as-leaf": "not a leaf",
    "no-san": "no subject alternative name",
    "no-uri-san": "exactly one URI SAN",
    "two-spiffe-ids": "exactly one URI SAN",
    "spiffe-plus-other-uri": "exactly one URI SAN",
    "spiffe-wrong-scheme": "not a spiffe:// ID",
    "spiffe-uppercase-scheme": "not a spiffe:// ID",
    "spiffe-uppercase-td": "invalid trust domain",
    "spiffe-invalid-td": "invalid trust domain",
    "spiffe-percent-encoded-td": "invalid trust domain",
    "spiffe-empty-td": "invalid trust domain",
    "spiffe-empty-path": "names no workload path",
    "spiffe-trailing-slash": "empty path segment",
    "spiffe-empty-segment": "empty path segment",
    "spiffe-dot-segment": "relative path segment",
    "spiffe-dot-dot": "relative path segment",
    "spiffe-percent-path": "invalid characters",
    "spiffe-query": "invalid characters",
    "spiffe-fragment": "invalid characters",
    "spiffe-port": "invalid trust domain",
    "spiffe-userinfo": "invalid trust domain",
    "unlisted-intermediate": "was not issued by the CA",
}


@dataclass
class World:
    directory: NetworkDirectory
    cases: dict[str, Any]
    material: dict[str, pki.ForceMaterial]

    def store(self, **kw: Any) -> TrustStore:
        return load_trust_store(self.directory, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("identity")
    (root / "directory.toml").write_text(DIRECTORY)
    directory = load_directory(root / "directory.toml")
    material = pki.init_network(directory)
    cases = load_testcases().build(root / "cases", directory)
    yield World(directory, cases, material)


def now() -> float:
    return datetime.now(UTC).timestamp()


def test_every_case_has_an_expected_reason(world: World) -> None:
    refused = {name for name, case in world.cases.items() if not case.accept}
    assert refused == set(REASONS), "a new imposter case needs its expected reason here"


@pytest.mark.parametrize("name", sorted(REASONS))
def test_imposter_is_refused_for_its_reason(world: World, name: str) -> None:
    case = world.cases[name]
    with pytest.raises(Unauthenticated) as err:
        world.store().verify(case.cert_path.read_bytes(), Usage.CLIENT, now())
    assert REASONS[name] in err.value.reason, err.value.reason


def test_control_case_is_accepted(world: World) -> None:
    case = world.cases["valid-app-client"]
    identity = world.store().verify(case.cert_path.read_bytes(), Usage.CLIENT, now())
    assert (identity.force, identity.kind, identity.app) == ("thames-valley", "app", "analyst-desk")
    assert identity.spiffe_id == "spiffe://thames-valley.se.psn/app/analyst-desk"


def test_issued_material_is_accepted_for_its_own_use_only(world: World) -> None:
    store = world.store()
    tv = world.material["thames-valley"]
    tls = tv.gateway_tls.cert_path.read_bytes()
    signing = tv.gateway_signing.cert_path.read_bytes()
    log_cert = tv.log_signing.cert_path.read_bytes()
    assert store.verify(tls, Usage.CLIENT, now()).kind == "gateway"
    assert store.verify(tls, Usage.SERVER, now()).kind == "gateway"
    assert store.verify(signing, Usage.SIGNING, now()).kind == "gateway"
    assert store.verify(log_cert, Usage.LOG, now()).kind == "log"
    with pytest.raises(Unauthenticated, match="not valid for envelope-signing"):
        store.verify(tls, Usage.SIGNING, now())
    with pytest.raises(Unauthenticated, match="not valid for tls-client"):
        store.verify(signing, Usage.CLIENT, now())


TV = "thames-valley.se.psn"

#: Certificates of the right force's CA whose DNS names claim another identity than their SPIFFE ID:
#: (kind, app, DNS names, usage). `psngw pki` no longer issues them; a CA that does is not believed.
NAME_CLAIMS: dict[str, tuple[pki.CertKind, str | None, tuple[str, ...], Usage]] = {
    "app server named as its gateway": (pki.CertKind.APP_SERVER, "intel-search", (f"gateway.{TV}",), Usage.SERVER),
    "app server named as another app": (
        pki.CertKind.APP_SERVER,
        "intel-search",
        (f"intel-search.{TV}", f"pnc-lookup.{TV}"),
        Usage.SERVER,
    ),
    "app server named as another force's gateway": (
        pki.CertKind.APP_SERVER,
        "intel-search",
        ("gateway.hampshire.se.psn",),
        Usage.SERVER,
    ),
    "app server with a wildcard over its force": (pki.CertKind.APP_SERVER, "intel-search", (f"*.{TV}",), Usage.SERVER),
    "app server named as its gateway, upper case": (
        pki.CertKind.APP_SERVER,
        "intel-search",
        (f"GATEWAY.{TV.upper()}",),
        Usage.SERVER,
    ),
    "app client named as its gateway": (pki.CertKind.APP_CLIENT, "analyst-desk", (f"gateway.{TV}",), Usage.CLIENT),
    "gateway named as an app": (pki.CertKind.GATEWAY_TLS, None, (f"gateway.{TV}", f"intel-search.{TV}"), Usage.SERVER),
    "log key named as the gateway": (pki.CertKind.LOG_SIGNING, None, (f"gateway.{TV}",), Usage.LOG),
}


def _signed_by_tv(world: World, kind: pki.CertKind, app: str | None, dns: tuple[str, ...]) -> bytes:
    """A certificate of `kind` from Thames Valley's own CA, with `dns` as its DNS SANs (as a mis-issuing CA would)."""
    material = world.material["thames-valley"]
    ca = x509.load_pem_x509_certificate(material.ca.read_bytes())
    ca_key: Any = serialization.load_pem_private_key(material.ca_key.read_bytes(), password=None)
    base = pki.leaf_profile(kind, trust_domain=TV, display_name="Thames Valley Police", app=app)
    key = pki.generate_key("ed25519" if kind is pki.CertKind.LOG_SIGNING else "p256")
    start = datetime.now(UTC) - timedelta(minutes=5)
    cert = pki.build_certificate(
        dataclasses.replace(base, dns_names=dns),
        public_key=key.public_key(),
        issuer=ca,
        issuer_key=ca_key,
        not_before=start,
        not_after=start + timedelta(days=1),
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("name", list(NAME_CLAIMS))
def test_a_certificate_whose_dns_names_claim_another_identity_is_refused(world: World, name: str) -> None:
    kind, app, dns, usage = NAME_CLAIMS[name]
    cert = _signed_by_tv(world, kind, app, dns)
    with pytest.raises(Unauthenticated, match="names another identity"):
        world.store().verify(cert, usage, now())


def test_a_certificate_with_its_own_name_and_names_outside_the_network_is_accepted(world: World) -> None:
    store = world.store()
    app = _signed_by_tv(world, pki.CertKind.APP_SERVER, "intel-search", (f"intel-search.{TV}", "intel.tvp.example"))
    assert store.verify(app, Usage.SERVER, now()).app == "intel-search"
    gateway = _signed_by_tv(world, pki.CertKind.GATEWAY_TLS, None, (f"gateway.{TV}.", "gw1.tvp.example"))
    assert store.verify(gateway, Usage.SERVER, now()).kind == "gateway"
    for force, m in world.material.items():  # everything `psngw pki` issued for the network
        for issued, usage in ((m.gateway_tls, Usage.SERVER), *((s, Usage.SERVER) for s in m.app_servers.values())):
            assert store.verify(issued.cert_path.read_bytes(), usage, now()).force == force


def test_cached_result_still_checks_time(world: World) -> None:
    # The static checks are cached per fingerprint; expiry must not be.
    store = world.store()
    cert = world.material["surrey"].gateway_tls.cert_path.read_bytes()
    store.verify(cert, Usage.CLIENT, now())
    later = now() + 400 * 86400
    with pytest.raises((Unauthenticated, RevocationDataUnavailable)):
        store.verify(cert, Usage.CLIENT, later)


def test_stale_crl_refuses_that_force_only(world: World) -> None:
    crl = x509.load_pem_x509_crl(world.material["hampshire"].crl.read_bytes())
    assert crl.next_update_utc is not None
    after = crl.next_update_utc.timestamp() + 10
    store = world.store(crl_grace=5)
    hants = world.material["hampshire"].gateway_tls.cert_path.read_bytes()
    with pytest.raises(RevocationDataUnavailable, match="stale"):
        store.verify(hants, Usage.CLIENT, after)
    assert not store.crl_status("hampshire", after).usable
    # Inside the grace period it is still accepted.
    assert load_trust_store(world.directory, crl_grace=60).verify(hants, Usage.CLIENT, after).force == "hampshire"


def test_missing_crl_fails_closed(world: World, tmp_path: Path) -> None:
    crl_path = world.material["surrey"].crl
    saved = crl_path.read_bytes()
    crl_path.write_bytes(b"not a crl")
    try:
        store = world.store()
        with pytest.raises(RevocationDataUnavailable, match="missing or unreadable"):
            store.verify(world.material["surrey"].gateway_tls.cert_path.read_bytes(), Usage.CLIENT, now())
        # Other forces are unaffected.
        assert store.verify(world.material["thames-valley"].gateway_tls.cert_path.read_bytes(), Usage.CLIENT, now())
    finally:
        crl_path.write_bytes(saved)


def test_crl_signed_by_another_ca_is_unusable(world: World) -> None:
    forged = world.material["thames-valley"].crl.read_bytes()
    store = TrustStore(
        world.directory,
        {f: world.store().ca_certificate(f) for f in world.directory.forces},
        {"surrey": x509.load_pem_x509_crl(forged), "thames-valley": None, "hampshire": None},
    )
    assert store.crl_status("surrey", now()).reason == "CRL is not signed by the force's CA"


def test_unreadable_ca_is_a_config_error(world: World, tmp_path: Path) -> None:
    text = DIRECTORY.replace("pki/surrey/ca.pem", str(tmp_path / "missing.pem"))
    assert world.directory.path is not None
    (tmp_path / "d.toml").write_text(text.replace("pki/", str(world.directory.path.parent) + "/pki/"))
    with pytest.raises(ConfigError, match="cannot read CA certificate of force surrey"):
        load_trust_store(load_directory(tmp_path / "d.toml"))


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("spiffe://se.psn/app/x", True),
        ("spiffe://a.b-c_d/x/y.z", True),
        ("spiffe://A/x", False),
        ("spiffe://a", False),
        ("spiffe://a/", False),
        ("spiffe://a//x", False),
        ("spiffe://a/x/..", False),
        ("spiffe://a/x?y", False),
        ("spiffe://a:1/x", False),
        ("http://a/x", False),
        ("spiffe://" + "a" * 256 + "/x", False),
    ],
)
def test_parse_spiffe_id(uri: str, ok: bool) -> None:
    if ok:
        assert str(parse_spiffe_id(uri)) == uri
    else:
        with pytest.raises(Unauthenticated):
            parse_spiffe_id(uri)


def test_certificate_expiring_is_reported(world: World) -> None:
    store = world.store()
    cert = x509.load_pem_x509_certificate(world.material["surrey"].gateway_tls.cert_path.read_bytes())
    soon = store.expiring({"tls": cert}, cert.not_valid_after_utc.timestamp() - 86400 * 3, 14)
    assert [(label, round(days)) for label, days in soon] == [("tls", 3)]
    assert store.expiring({"tls": cert}, (datetime.now(UTC) - timedelta(days=1)).timestamp(), 14) == []


def test_corrupted_certificates_are_refused_cleanly(world: World) -> None:
    # Any single-byte change of a good certificate is refused as Unauthenticated, never another exception.
    from cryptography.hazmat.primitives.serialization import Encoding

    store = world.store()
    good = x509.load_pem_x509_certificate(world.cases["valid-app-client"].cert_path.read_bytes())
    der = good.public_bytes(Encoding.DER)
    for i in range(0, len(der), 3):
        mangled = bytearray(der)
        mangled[i] ^= 0x41
        with contextlib.suppress(Unauthenticated, RevocationDataUnavailable):
            store.verify(bytes(mangled), Usage.CLIENT, now())
