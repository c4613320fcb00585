"""gateway.pki: profiles field by field, keys, revocation and CRLs, inventory, the CLI, init_network."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway import cli, pki
from gateway.directory import load_directory
from gateway.errors import ConfigError

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
TD = "thames-valley.se.psn"
DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")
SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


# -- helpers ---------------------------------------------------------------------------------


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def uris(cert: x509.Certificate) -> list[str]:
    found: list[str] = ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    return found


def load_crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tv"
    pki.init_ca(d, force="thames-valley", network="se.psn", display_name="Thames Valley Police", now=NOW)
    return d


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    d = tmp_path / "hants"
    pki.init_ca(d, force="hampshire", network="se.psn", display_name="Hampshire Constabulary", now=NOW)
    return d


# -- the CA -----------------------------------------------------------------------------------


def test_ca_profile_field_by_field(ca_dir: Path) -> None:
    ca = load(ca_dir / "ca.pem")
    bc = ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(ca, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign
    assert not (ku.value.digital_signature or ku.value.content_commitment or ku.value.key_encipherment)
    ski = ext(ca, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    with pytest.raises(x509.ExtensionNotFound):
        ext(ca, x509.ExtendedKeyUsage)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Thames Valley Police CA"
    assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Thames Valley Police"
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)  # self-signed
    assert uris(ca) == [f"spiffe://{TD}"]
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]  # public_key() is a union; checked EC above
    assert ca.not_valid_after_utc - NOW == timedelta(days=3650)
    assert ca.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)


def test_init_ca_writes_key_crl_and_inventory(ca_dir: Path) -> None:
    assert mode(ca_dir / "ca.key") == 0o600
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    pkcs8 = ("-----BEGIN " + "PRIVATE KEY-----").encode()  # spelt in two parts: this file holds no key
    assert (ca_dir / "ca.key").read_bytes().startswith(pkcs8)  # PKCS#8, unencrypted
    assert key.public_key() == load(ca_dir / "ca.pem").public_key()
    crl = load_crl(ca_dir / "crl.pem")
    assert len(crl) == 0 and crl.is_signature_valid(load(ca_dir / "ca.pem").public_key())  # type: ignore[arg-type]  # the union of key types is not narrowed; the CA key is EC
    data = json.loads((ca_dir / "inventory.json").read_text())
    assert data["trust_domain"] == TD and data["certificates"][0]["kind"] == "ca"


def test_init_ca_refuses_to_overwrite(ca_dir: Path) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="already exists") as info:
        pki.init_ca(ca_dir, force="thames-valley", network="se.psn")
    assert info.value.file is not None
    assert (ca_dir / "ca.key").read_bytes() == before
    made = pki.init_ca(ca_dir, force="thames-valley", network="se.psn", overwrite=True)
    assert (ca_dir / "ca.key").read_bytes() != before
    assert mode(ca_dir / "ca.key") == 0o600
    assert [e.serial for e in pki.inventory(ca_dir)] == [made.serial]  # a new CA, a new inventory


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"force": "Thames Valley", "network": "se.psn"}, "force name"),
        ({"force": "tv", "network": "SE.psn"}, "network"),
        ({"force": "tv", "network": "se.psn", "days": 0}, "lifetime"),
        ({"force": "tv", "network": "se.psn", "days": 99999}, "lifetime"),
        ({"force": "tv", "network": "se.psn", "display_name": "x" * 62}, "display name"),
    ],
)
def test_init_ca_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pki.init_ca(tmp_path / "ca", **kwargs)  # type: ignore[arg-type]  # bad arguments on purpose
    assert not (tmp_path / "ca" / "ca.key").exists()


# -- leaf profiles -------------------------------------------------------------------------------

LEAVES = {
    # kind: (key usage, EKU, URI, DNS, IPs, key class, default days)
    pki.CertKind.GATEWAY_TLS: (
        {"digital_signature"},
        [SERVER, CLIENT],
        f"spiffe://{TD}/gateway",
        [f"gateway.{TD}"],
        ["127.0.0.1", "::1"],
        ec.EllipticCurvePublicKey,
        30,
    ),
    pki.CertKind.GATEWAY_SIGNING: (
        {"digital_signature", "content_commitment"},
        [DOCUMENT_SIGNING],
        f"spiffe://{TD}/gateway",
        [],
        [],
        ed25519.Ed25519PublicKey,
        30,
    ),
    pki.CertKind.LOG_SIGNING: (
        {"digital_signature", "content_commitment"},
        [DOCUMENT_SIGNING],
        f"spiffe://{TD}/log",
        [],
        [],
        ed25519.Ed25519PublicKey,
        365,
    ),
    pki.CertKind.APP_CLIENT: (
        {"digital_signature"},
        [CLIENT],
        f"spiffe://{TD}/app/analyst-desk",
        [],
        [],
        ec.EllipticCurvePublicKey,
        30,
    ),
    pki.CertKind.APP_SERVER: (
        {"digital_signature"},
        [SERVER],
        f"spiffe://{TD}/app/analyst-desk",
        [f"analyst-desk.{TD}"],
        ["127.0.0.1", "::1"],
        ec.EllipticCurvePublicKey,
        30,
    ),
}
KU_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


@pytest.mark.parametrize("kind", list(LEAVES))
def test_leaf_profile_field_by_field(ca_dir: Path, tmp_path: Path, kind: pki.CertKind) -> None:
    key_usage, eku, uri, dns, ips, key_class, days = LEAVES[kind]
    app = "analyst-desk" if kind in (pki.CertKind.APP_CLIENT, pki.CertKind.APP_SERVER) else None
    made = pki.issue(ca_dir, kind, out_stem=tmp_path / "out" / str(kind), app=app, now=NOW)
    cert, ca = load(made.cert_path), load(ca_dir / "ca.pem")

    assert made.cert_path == tmp_path / "out" / f"{kind}.pem" and made.key_path == tmp_path / "out" / f"{kind}.key"
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert {f for f in KU_FIELDS if getattr(ku.value, f)} == key_usage
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == eku
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca, x509.SubjectKeyIdentifier).value.digest
    san = ext(cert, x509.SubjectAlternativeName)
    assert not san.critical  # the subject is not empty
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [uri]  # exactly one
    assert san.value.get_values_for_type(x509.DNSName) == dns
    assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == ips
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert "spiffe" not in str(cn)  # the identity is never the CN
    assert isinstance(cert.public_key(), key_class)
    cert.verify_directly_issued_by(ca)
    assert cert.issuer == ca.subject
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc - NOW == timedelta(days=days)
    assert 0 < cert.serial_number < 2**159
    assert made.serial == cert.serial_number and made.spiffe_id == uri
    assert made.fingerprint == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert mode(made.key_path) == 0o600
    key = serialization.load_pem_private_key(made.key_path.read_bytes(), None)
    assert key.public_key() == cert.public_key()


def test_extra_server_names_and_key_type_choice(ca_dir: Path, tmp_path: Path) -> None:
    made = pki.issue(
        ca_dir,
        pki.CertKind.GATEWAY_TLS,
        out_stem=tmp_path / "gw",
        dns_names=["GW1.Example.org", "gw1.example.org"],
        ip_addresses=["10.0.0.1", "::1"],
        now=NOW,
    )
    san = ext(load(made.cert_path), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [f"gateway.{TD}", "gw1.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.0.0.1"]
    signing = pki.issue(ca_dir, pki.CertKind.GATEWAY_SIGNING, out_stem=tmp_path / "s", key_type="p256", now=NOW)
    assert isinstance(load(signing.cert_path).public_key(), ec.EllipticCurvePublicKey)


@pytest.mark.parametrize(
    ("kind", "kwargs", "match"),
    [
        (pki.CertKind.LOG_SIGNING, {"key_type": "p256"}, "must be ed25519"),
        (pki.CertKind.GATEWAY_TLS, {"key_type": "ed25519"}, "must be p256"),
        (pki.CertKind.APP_CLIENT, {"key_type": "rsa", "app": "x"}, "must be p256"),
        (pki.CertKind.APP_CLIENT, {}, "needs --app"),
        (pki.CertKind.APP_SERVER, {"app": "Bad_Name"}, "needs --app"),
        (pki.CertKind.GATEWAY_TLS, {"app": "x"}, "does not take an application"),
        (pki.CertKind.APP_CLIENT, {"app": "x", "dns_names": ["a.example"]}, "no DNS or IP"),
        (pki.CertKind.GATEWAY_SIGNING, {"ip_addresses": ["10.0.0.1"]}, "no DNS or IP"),
        (pki.CertKind.GATEWAY_TLS, {"dns_names": ["*.example.org"]}, "not a DNS name"),
        (pki.CertKind.GATEWAY_TLS, {"ip_addresses": ["10.0.0.300"]}, "not an IP address"),
        (pki.CertKind.GATEWAY_TLS, {"days": 0}, "lifetime"),
        (pki.CertKind.GATEWAY_TLS, {"days": 399}, "lifetime"),
        (pki.CertKind.CA, {}, "made with `psngw pki init`"),
    ],
)
def test_issue_rejects_bad_arguments(
    ca_dir: Path, tmp_path: Path, kind: pki.CertKind, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        pki.issue(ca_dir, kind, out_stem=tmp_path / "x", now=NOW, **kwargs)  # type: ignore[arg-type]  # bad arguments on purpose
    assert not (tmp_path / "x.key").exists() and not (tmp_path / "x.pem").exists()


#: Server certificates that would carry another identity's name: a client that checks the CA and the
#: DNS name only (gateway.client, ChannelPool) would take the holder for that identity. (kind, app, --dns, match)
NAME_THEFTS: dict[str, tuple[pki.CertKind, str, tuple[str, ...], str]] = {
    "an app named gateway": (pki.CertKind.APP_SERVER, "gateway", (), "--app gateway: the name is reserved"),
    "an app named log": (pki.CertKind.APP_SERVER, "log", (), "--app log: the name is reserved"),
    "an app client named gateway": (pki.CertKind.APP_CLIENT, "gateway", (), "--app gateway: the name is reserved"),
    "an app with the gateway's name": (
        pki.CertKind.APP_SERVER,
        "intel",
        (f"gateway.{TD}",),
        f"--dns gateway.{TD}: that name belongs to the force's gateway",
    ),
    "an app with the gateway's name, upper case and a dot": (
        pki.CertKind.APP_SERVER,
        "intel",
        (f"Gateway.{TD.upper()}.",),
        f"--dns gateway.{TD}: that name belongs to the force's gateway",
    ),
    "an app with another app's name": (
        pki.CertKind.APP_SERVER,
        "intel",
        (f"pnc-lookup.{TD}",),
        f"--dns pnc-lookup.{TD}: that name belongs to another identity of {TD}",
    ),
    "an app with a name under another app's": (
        pki.CertKind.APP_SERVER,
        "intel",
        (f"x.intel.{TD}",),
        "belongs to another identity",
    ),
    "an app with another force's gateway name": (
        pki.CertKind.APP_SERVER,
        "intel",
        ("gateway.hampshire.se.psn",),
        "--dns gateway.hampshire.se.psn: that name belongs to an identity of the network se.psn",
    ),
    "an app with the network's own name": (pki.CertKind.APP_SERVER, "intel", ("se.psn",), "--dns se.psn"),
    "a gateway with an app's name": (
        pki.CertKind.GATEWAY_TLS,
        "",
        (f"intel.{TD}",),
        f"--dns intel.{TD}: that name belongs to another identity",
    ),
}


@pytest.mark.parametrize("name", list(NAME_THEFTS))
def test_issue_refuses_a_name_that_belongs_to_another_identity(ca_dir: Path, tmp_path: Path, name: str) -> None:
    kind, app, dns, match = NAME_THEFTS[name]
    with pytest.raises(ConfigError, match=re.escape(match)):
        pki.issue(ca_dir, kind, out_stem=tmp_path / "x", app=app or None, dns_names=dns, now=NOW)
    assert not (tmp_path / "x.key").exists() and not (tmp_path / "x.pem").exists()
    assert len(pki.inventory(ca_dir)) == 1  # the CA only


def test_only_the_gateway_profile_carries_the_gateways_name(ca_dir: Path, tmp_path: Path) -> None:
    gateway = f"gateway.{TD}"
    for kind in pki.CertKind:
        if kind is pki.CertKind.CA:
            continue
        app = "intel" if kind in (pki.CertKind.APP_CLIENT, pki.CertKind.APP_SERVER) else None
        made = pki.issue(ca_dir, kind, out_stem=tmp_path / str(kind), app=app, now=NOW)
        names = pki.inspect_certificate(made.cert_path)["dns_names"]
        assert (gateway in names) is (kind is pki.CertKind.GATEWAY_TLS), kind  # type: ignore[operator]  # inspect gives dict[str, object]


def test_a_server_certificate_may_add_names_outside_the_network(ca_dir: Path, tmp_path: Path) -> None:
    made = pki.issue(
        ca_dir,
        pki.CertKind.APP_SERVER,
        out_stem=tmp_path / "srv",
        app="intel",
        dns_names=[f"intel.{TD}", "intel.tvp.example", "se.psn.example"],
        now=NOW,
    )
    assert pki.inspect_certificate(made.cert_path)["dns_names"] == [
        f"intel.{TD}",
        "intel.tvp.example",
        "se.psn.example",
    ]


def test_issue_refuses_a_name_another_live_identity_of_the_ca_carries(ca_dir: Path, tmp_path: Path) -> None:
    gw_name = "gw.tvp.example"
    gw = pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", dns_names=[gw_name], now=NOW)
    with pytest.raises(ConfigError, match=re.escape(f"dns: --dns {gw_name}: spiffe://{TD}/gateway (serial")):
        pki.issue(ca_dir, pki.CertKind.APP_SERVER, out_stem=tmp_path / "a", app="intel", dns_names=[gw_name], now=NOW)
    # the same identity may renew with its names; another app may not take an app's extra name
    pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw2", dns_names=["GW.tvp.example"], now=NOW)
    pki.issue(
        ca_dir, pki.CertKind.APP_SERVER, out_stem=tmp_path / "b", app="intel", dns_names=["i.tvp.example"], now=NOW
    )
    with pytest.raises(ConfigError, match=re.escape(f"spiffe://{TD}/app/intel")):
        pki.issue(
            ca_dir, pki.CertKind.APP_SERVER, out_stem=tmp_path / "c", app="pnc", dns_names=["i.tvp.example"], now=NOW
        )
    # once every certificate carrying the name is revoked or expired, the name is free
    pki.revoke(ca_dir, serial=gw.serial, reason="superseded", now=NOW)
    with pytest.raises(ConfigError, match=re.escape(f"spiffe://{TD}/gateway")):  # gw2 still carries it
        pki.issue(ca_dir, pki.CertKind.APP_SERVER, out_stem=tmp_path / "a", app="intel", dns_names=[gw_name], now=NOW)
    later = NOW + timedelta(days=31)
    made = pki.issue(
        ca_dir, pki.CertKind.APP_SERVER, out_stem=tmp_path / "a", app="pnc", dns_names=[gw_name], now=later
    )
    assert gw_name in pki.inspect_certificate(made.cert_path)["dns_names"]  # type: ignore[operator]  # inspect gives dict[str, object]


def test_cli_refuses_a_stolen_name_in_one_line_naming_the_option(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issue: list[str | Path] = ["pki", "issue", "app-server", "--ca-dir", ca_dir, "--out", tmp_path / "srv"]
    for argv, option in (
        ([*issue, "--app", "gateway"], "--app gateway"),
        ([*issue, "--app", "intel", "--dns", f"gateway.{TD}"], f"--dns gateway.{TD}"),
        ([*issue, "--app", "intel", "--dns", f"pnc.{TD}"], f"--dns pnc.{TD}"),
    ):
        code, _, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("psngw: ") and option in lines[0], err
    assert not (tmp_path / "srv.pem").exists()


def test_unknown_kind_and_stem_with_extension(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown certificate kind"):
        pki.issue(ca_dir, "gateway", out_stem=tmp_path / "x")  # type: ignore[arg-type]  # an unknown kind on purpose
    with pytest.raises(ConfigError, match="without an extension"):
        pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "x.pem")


def test_leaf_may_not_outlive_the_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca, force="tv", network="se.psn", days=10, now=NOW)
    with pytest.raises(ConfigError, match="outlive its CA"):
        pki.issue(ca, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", now=NOW)
    pki.issue(ca, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", days=9, now=NOW)


def test_explicit_not_before_sets_the_window(ca_dir: Path, tmp_path: Path) -> None:
    start = NOW - timedelta(days=40)
    made = pki.issue(
        ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "old", app="a", days=30, not_before=start, now=NOW
    )
    cert = load(made.cert_path)
    assert cert.not_valid_before_utc == start and cert.not_valid_after_utc == start + timedelta(days=30)


def test_serials_are_random_and_distinct(ca_dir: Path, tmp_path: Path) -> None:
    serials = {
        pki.issue(ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / f"c{i}", app="a", now=NOW).serial
        for i in range(8)
    }
    assert len(serials) == 8
    assert max(s.bit_length() for s in serials) > 140  # random 159-bit, not a counter


def test_naive_datetimes_are_refused(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", now=datetime(2030, 1, 1))


# -- keys ---------------------------------------------------------------------------------------


@pytest.fixture
def wide_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_keys_are_0600_whatever_the_umask(tmp_path: Path, wide_umask: None) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca, force="tv", network="se.psn", now=NOW)
    os.umask(0o277)  # would leave an owner-read-only key without the explicit chmod
    made = pki.issue(ca, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", now=NOW)
    assert mode(made.key_path) == 0o600
    pki.publish_crl(ca, now=NOW)
    over = pki.issue(ca, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", overwrite=True, now=NOW)
    assert mode(over.key_path) == 0o600
    assert mode(ca / "ca.key") == 0o600
    assert mode(made.cert_path) == 0o644


def test_keys_are_never_overwritten_without_the_flag(ca_dir: Path, tmp_path: Path) -> None:
    first = pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", now=NOW)
    key, cert = first.key_path.read_bytes(), first.cert_path.read_bytes()
    with pytest.raises(ConfigError, match="already exists") as info:
        pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", now=NOW)
    assert info.value.file == str(first.key_path)
    assert first.key_path.read_bytes() == key and first.cert_path.read_bytes() == cert
    first.key_path.unlink()  # a lone certificate is protected too
    with pytest.raises(ConfigError, match="already exists"):
        pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", now=NOW)
    assert not first.key_path.exists()
    second = pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", overwrite=True, now=NOW)
    assert second.cert_path.read_bytes() != cert
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_refuses_to_write_a_key_into_git_unless_ignored(ca_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    with pytest.raises(ConfigError, match="git work tree"):
        pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=repo / "sub" / "gw", now=NOW)
    assert not (repo / "sub" / "gw.key").exists()
    (repo / ".gitignore").write_text("*.key\n")
    made = pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=repo / "sub" / "gw", now=NOW)
    assert made.key_path.exists()


def test_ca_key_may_be_offline(ca_dir: Path, other_ca: Path, tmp_path: Path) -> None:
    offline = tmp_path / "usb" / "tv-ca.key"
    offline.parent.mkdir()
    (ca_dir / "ca.key").rename(offline)
    with pytest.raises(ConfigError, match="--ca-key") as info:
        pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", now=NOW)
    assert info.value.file == str(ca_dir / "ca.key")
    made = pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", ca_key=offline, now=NOW)
    load(made.cert_path).verify_directly_issued_by(load(ca_dir / "ca.pem"))
    with pytest.raises(ConfigError, match="does not match the CA certificate") as info:
        pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw2", ca_key=other_ca / "ca.key", now=NOW)
    assert info.value.file == str(other_ca / "ca.key")
    with pytest.raises(ConfigError, match="does not match"):
        pki.publish_crl(ca_dir, ca_key=other_ca / "ca.key", now=NOW)
    with pytest.raises(ConfigError, match="does not match"):
        pki.revoke(ca_dir, serial=made.serial, ca_key=other_ca / "ca.key", now=NOW)
    assert not pki.inventory(ca_dir)[-1].revoked


# -- revocation and the CRL ---------------------------------------------------------------------


def test_revoke_puts_the_serial_and_reason_in_a_signed_crl(ca_dir: Path, tmp_path: Path) -> None:
    made = pki.issue(ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "c", app="a", now=NOW)
    keep = pki.issue(ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "k", app="a", now=NOW)
    number_before = ext_crl_number(ca_dir / "crl.pem")
    later = NOW + timedelta(hours=1)
    pki.revoke(ca_dir, serial=made.serial, reason="keyCompromise", now=later)

    ca = load(ca_dir / "ca.pem")
    crl = load_crl(ca_dir / "crl.pem")
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]  # the union of key types is not narrowed; the CA key is EC
    assert crl.issuer == ca.subject
    assert crl.last_update_utc == later and crl.next_update_utc == later + timedelta(days=7)
    assert ext_crl_number(ca_dir / "crl.pem") == number_before + 1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca, x509.SubjectKeyIdentifier).value.digest
    entry = crl.get_revoked_certificate_by_serial_number(made.serial)
    assert entry is not None and entry.revocation_date_utc == later
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(keep.serial) is None


def ext_crl_number(path: Path) -> int:
    return load_crl(path).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


@pytest.mark.parametrize("reason", list(pki.REVOCATION_REASONS))
def test_every_rfc5280_reason_round_trips(ca_dir: Path, tmp_path: Path, reason: str) -> None:
    made = pki.issue(ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "c", app="a", now=NOW)
    pki.revoke(ca_dir, cert_path=made.cert_path, reason=reason, now=NOW)
    info = pki.describe_crl(load_crl(ca_dir / "crl.pem"), now=NOW)
    assert info["revoked"] == [{"serial": format(made.serial, "x"), "time": "2030-06-01T12:00:00Z", "reason": reason}]
    entry = load_crl(ca_dir / "crl.pem").get_revoked_certificate_by_serial_number(made.serial)
    assert entry is not None
    has_reason = any(isinstance(e.value, x509.CRLReason) for e in entry.extensions)
    assert has_reason == (reason != "unspecified")  # RFC 5280 5.3.1: omit the code for unspecified


def test_revoking_again_updates_the_reason_and_keeps_the_time(ca_dir: Path, tmp_path: Path) -> None:
    made = pki.issue(ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "c", app="a", now=NOW)
    pki.revoke(ca_dir, serial=made.serial, reason="superseded", now=NOW)
    pki.revoke(ca_dir, serial=made.serial, reason="keyCompromise", now=NOW + timedelta(days=1))
    entry = next(e for e in pki.inventory(ca_dir, now=NOW) if e.serial == made.serial)
    assert entry.revocation_reason == "keyCompromise" and entry.revoked_at == NOW
    assert len(load_crl(ca_dir / "crl.pem")) == 1


def test_revoke_refuses_what_it_cannot_vouch_for(ca_dir: Path, other_ca: Path, tmp_path: Path) -> None:
    foreign = pki.issue(other_ca, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "f", app="a", now=NOW)
    with pytest.raises(ConfigError, match="not issued by the CA") as info:
        pki.revoke(ca_dir, cert_path=foreign.cert_path, reason="keyCompromise", now=NOW)
    assert info.value.file == str(foreign.cert_path)
    with pytest.raises(ConfigError, match="not in this CA's inventory"):
        pki.revoke(ca_dir, serial=foreign.serial, reason="keyCompromise", now=NOW)
    with pytest.raises(ConfigError, match="cannot revoke itself"):
        pki.revoke(ca_dir, serial=load(ca_dir / "ca.pem").serial_number, reason="keyCompromise", now=NOW)
    with pytest.raises(ConfigError, match="unknown reason"):
        pki.revoke(ca_dir, serial=foreign.serial, reason="key_compromise", now=NOW)
    with pytest.raises(ConfigError, match="exactly one"):
        pki.revoke(ca_dir, reason="keyCompromise", now=NOW)
    assert len(load_crl(ca_dir / "crl.pem")) == 0


def test_revoking_by_file_adds_a_missing_certificate_to_the_inventory(ca_dir: Path, tmp_path: Path) -> None:
    # Signed with the CA key but never recorded (a CA that was used behind the tool's back).
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    profile = pki.leaf_profile(pki.CertKind.APP_CLIENT, trust_domain=TD, display_name="Thames Valley Police", app="x")
    key = pki.generate_key()
    stray = pki.build_certificate(
        profile,
        public_key=key.public_key(),
        issuer=load(ca_dir / "ca.pem"),
        issuer_key=ca_key,
        not_before=NOW,
        not_after=NOW + timedelta(days=1),
    )
    path = tmp_path / "stray.pem"
    path.write_bytes(stray.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="not in this CA's inventory"):
        pki.revoke(ca_dir, serial=stray.serial_number, reason="keyCompromise", now=NOW)
    pki.revoke(ca_dir, cert_path=path, reason="keyCompromise", now=NOW)
    entry = pki.inventory(ca_dir, now=NOW)[-1]
    assert entry.serial == stray.serial_number and entry.kind == "app-client" and entry.key_path is None
    assert entry.revoked and entry.revocation_reason == "keyCompromise"
    assert load_crl(ca_dir / "crl.pem").get_revoked_certificate_by_serial_number(stray.serial_number) is not None


def test_publish_crl_numbers_grow_and_next_update_is_configurable(ca_dir: Path) -> None:
    first = ext_crl_number(ca_dir / "crl.pem")
    path = pki.publish_crl(ca_dir, next_update_days=1.5, now=NOW + timedelta(days=2))
    crl = load_crl(path)
    assert path == ca_dir / "crl.pem"
    assert ext_crl_number(path) == first + 1
    assert crl.last_update_utc == NOW + timedelta(days=2)
    assert crl.next_update_utc == NOW + timedelta(days=3, hours=12)
    for bad in (0, -1, 400):
        with pytest.raises(ConfigError, match="next update"):
            pki.publish_crl(ca_dir, next_update_days=bad, now=NOW)
    assert ext_crl_number(path) == first + 1


def test_revoke_republishes_with_the_last_interval(ca_dir: Path, tmp_path: Path) -> None:
    made = pki.issue(ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "c", app="a", now=NOW)
    pki.publish_crl(ca_dir, next_update_days=2, now=NOW)
    pki.revoke(ca_dir, serial=made.serial, reason="keyCompromise", now=NOW)
    assert load_crl(ca_dir / "crl.pem").next_update_utc == NOW + timedelta(days=2)


def test_a_failed_write_leaves_the_old_inventory_and_crl(
    ca_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = pki.issue(ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "c", app="a", now=NOW)
    inventory_before = (ca_dir / "inventory.json").read_bytes()
    crl_before = (ca_dir / "crl.pem").read_bytes()

    def broken(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(ConfigError, match="No space left") as info:
        pki.revoke(ca_dir, serial=made.serial, reason="keyCompromise", now=NOW)
    assert info.value.file == str(ca_dir / "crl.pem")
    monkeypatch.undo()
    assert (ca_dir / "inventory.json").read_bytes() == inventory_before
    assert (ca_dir / "crl.pem").read_bytes() == crl_before
    assert not list(ca_dir.glob(".*.tmp"))


# -- inventory, list, inspect -------------------------------------------------------------------


def test_inventory_entries_and_days_left(ca_dir: Path, tmp_path: Path) -> None:
    gw = pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", now=NOW)
    app = pki.issue(ca_dir, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "app", app="desk", now=NOW)
    pki.revoke(ca_dir, serial=app.serial, reason="cessationOfOperation", now=NOW)
    entries = pki.inventory(ca_dir, now=NOW + timedelta(days=10))
    assert [e.kind for e in entries] == ["ca", "gateway-tls", "app-client"]
    ca_entry, gw_entry, app_entry = entries
    assert ca_entry.spiffe_id == f"spiffe://{TD}" and ca_entry.days_left == 3640
    assert gw_entry.serial == gw.serial and gw_entry.fingerprint == gw.fingerprint
    assert gw_entry.spiffe_id == f"spiffe://{TD}/gateway"
    assert gw_entry.subject == "CN=gateway,OU=gateway-tls,O=Thames Valley Police"
    assert gw_entry.days_left == 20 and not gw_entry.revoked and not gw_entry.expired
    assert gw_entry.cert_path == gw.cert_path.resolve() and gw_entry.key_path == gw.key_path.resolve()
    assert app_entry.revoked and app_entry.revocation_reason == "cessationOfOperation"
    assert app_entry.revoked_at == NOW
    assert pki.inventory(ca_dir, now=NOW + timedelta(days=31))[1].days_left == -1  # expired a day ago
    assert pki.inventory(ca_dir, now=NOW + timedelta(days=31, hours=1))[1].days_left == -2  # floor, not round
    assert pki.inventory(ca_dir, now=NOW + timedelta(days=29, hours=23))[1].days_left == 0
    as_json = gw_entry.to_json()
    assert as_json["serial"] == format(gw.serial, "x") and as_json["not_after"] == "2030-07-01T12:00:00Z"
    assert set(as_json) >= {
        "subject",
        "spiffe_id",
        "kind",
        "serial",
        "fingerprint",
        "not_after",
        "days_left",
        "revoked",
        "revocation_reason",
    }


def test_inventory_file_records_every_issue_and_revocation(ca_dir: Path, tmp_path: Path) -> None:
    made = pki.issue(ca_dir, pki.CertKind.APP_SERVER, out_stem=tmp_path / "srv", app="intel", now=NOW)
    pki.revoke(ca_dir, serial=made.serial, reason="superseded", now=NOW)
    data = json.loads((ca_dir / "inventory.json").read_text())
    rec = data["certificates"][-1]
    assert rec == {
        "serial": format(made.serial, "x"),
        "kind": "app-server",
        "spiffe_id": f"spiffe://{TD}/app/intel",
        "dns_names": [f"intel.{TD}"],
        "subject": "CN=intel server,OU=app-server,O=Thames Valley Police",
        "fingerprint": made.fingerprint,
        "not_before": "2030-06-01T11:55:00Z",
        "not_after": "2030-07-01T12:00:00Z",
        "cert_path": str(made.cert_path.resolve()),
        "key_path": str(made.key_path.resolve()),
    }
    assert data["revocations"] == [
        {"serial": format(made.serial, "x"), "time": "2030-06-01T12:00:00Z", "reason": "superseded"}
    ]
    inside = pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=ca_dir / "gw", now=NOW)
    assert json.loads((ca_dir / "inventory.json").read_text())["certificates"][-1]["cert_path"] == "gw.pem"
    assert inside.cert_path.exists()


def test_inspect_certificate(ca_dir: Path, tmp_path: Path) -> None:
    made = pki.issue(
        ca_dir, pki.CertKind.APP_SERVER, out_stem=tmp_path / "srv", app="intel", dns_names=["x.example"], now=NOW
    )
    info = pki.inspect_certificate(made.cert_path, now=NOW + timedelta(days=29, hours=23))
    assert info["spiffe_id"] == f"spiffe://{TD}/app/intel"
    assert info["kind"] == "app-server"
    assert info["serial"] == format(made.serial, "x")
    assert info["fingerprint"] == made.fingerprint
    assert info["dns_names"] == [f"intel.{TD}", "x.example"]
    assert info["ip_addresses"] == ["127.0.0.1", "::1"]
    assert info["key_usage"] == ["digitalSignature"] and info["extended_key_usage"] == ["serverAuth"]
    assert info["is_ca"] is False and info["self_signed"] is False
    assert info["days_left"] == 0 and info["expired"] is False
    assert info["key_type"] == "p256" and info["chain_length"] == 1
    assert info["signature_algorithm"] == "ecdsa-with-SHA256"
    assert info["not_after"] == "2030-07-01T12:00:00Z"
    assert pki.inspect_certificate(made.cert_path, now=NOW + timedelta(days=31))["expired"] is True
    ca_info = pki.inspect_certificate(ca_dir / "ca.pem", now=NOW)
    assert ca_info["kind"] == "ca" and ca_info["is_ca"] is True and ca_info["self_signed"] is True
    assert ca_info["path_length"] == 0 and ca_info["key_usage"] == ["keyCertSign", "cRLSign"]
    signing = pki.issue(ca_dir, pki.CertKind.LOG_SIGNING, out_stem=tmp_path / "log", now=NOW)
    s_info = pki.inspect_certificate(signing.cert_path, now=NOW)
    assert s_info["key_type"] == "ed25519" and s_info["extended_key_usage"] == ["documentSigning"]
    assert s_info["key_usage"] == ["digitalSignature", "contentCommitment"]


@given(st.integers(min_value=1, max_value=2**159 - 1), st.sampled_from(["plain", "0x", "colons", "upper"]))
def test_serial_text_round_trips(serial: int, style: str) -> None:
    text = format(serial, "x")
    if style == "0x":
        text = "0x" + text
    elif style == "colons":
        padded = text.rjust(len(text) + len(text) % 2, "0")
        text = ":".join(padded[i : i + 2] for i in range(0, len(padded), 2))
    elif style == "upper":
        text = text.upper()
    assert pki._parse_serial(text) == serial


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(
    app=st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True),
    dns=st.lists(st.lists(_LABEL, min_size=1, max_size=4).map(".".join), max_size=3),
    ips=st.lists(st.ip_addresses().map(str), max_size=3),
)
def test_profile_names_survive_encoding(app: str, dns: list[str], ips: list[str]) -> None:
    assume(app not in pki.RESERVED_APP_NAMES and not any(n == "se.psn" or n.endswith(".se.psn") for n in dns))
    profile = pki.leaf_profile(
        pki.CertKind.APP_SERVER, trust_domain=TD, display_name="T", app=app, dns_names=dns, ip_addresses=ips
    )
    key = pki.generate_key()
    cert = pki.build_certificate(
        profile,
        public_key=key.public_key(),
        issuer=None,
        issuer_key=key,
        not_before=NOW,
        not_after=NOW + timedelta(days=1),
    )
    info = pki.describe_certificate(cert, now=NOW)
    assert info["spiffe_id"] == f"spiffe://{TD}/app/{app}"
    assert info["dns_names"] == list(profile.dns_names) and info["ip_addresses"] == list(profile.ip_addresses)
    assert set(dns) <= set(profile.dns_names)
    assert {str(ipaddress.ip_address(a)) for a in ips} <= set(profile.ip_addresses)


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    code, out, _ = run(
        capsys, "pki", "init", "--ca-dir", ca, "--force", "surrey", "--network", "se.psn", "--name", "Surrey Police"
    )
    assert code == 0 and "spiffe://surrey.se.psn" in out
    code, out, _ = run(capsys, "pki", "issue", "app-client", "--ca-dir", ca, "--out", tmp_path / "c", "--app", "desk")
    assert code == 0 and "spiffe://surrey.se.psn/app/desk" in out
    code, out, _ = run(
        capsys,
        "pki",
        "issue",
        "gateway-tls",
        "--ca-dir",
        ca,
        "--out",
        tmp_path / "gw",
        "--dns",
        "gw.surrey.example",
        "--ip",
        "10.9.8.7",
        "--days",
        "5",
    )
    assert code == 0
    gw = pki.inspect_certificate(tmp_path / "gw.pem")
    assert "gw.surrey.example" in gw["dns_names"] and "10.9.8.7" in gw["ip_addresses"]  # type: ignore[operator]  # inspect gives dict[str, object]
    serial = pki.inventory(ca)[1].serial
    colons = ":".join(f"{serial:040x}"[i : i + 2] for i in range(0, 40, 2))
    code, out, _ = run(capsys, "pki", "revoke", "--ca-dir", ca, "--serial", colons, "--reason", "keyCompromise")
    assert code == 0 and "CRL #2" in out
    code, out, _ = run(capsys, "pki", "crl", "--ca-dir", ca, "--next-update-days", "3")
    assert code == 0 and "CRL #3" in out and "1 revoked" in out
    code, out, _ = run(capsys, "pki", "list", "--ca-dir", ca)
    assert code == 0 and "revoked (keyCompromise)" in out and "spiffe://surrey.se.psn/gateway" in out
    code, out, _ = run(capsys, "pki", "list", "--ca-dir", ca, "--json")
    listing = json.loads(out)
    assert listing["trust_domain"] == "surrey.se.psn" and listing["crl"]["crl_number"] == 3
    assert listing["crl"]["stale"] is False and listing["crl"]["revoked"] == 1
    kinds = [c["kind"] for c in listing["certificates"]]
    assert kinds == ["ca", "app-client", "gateway-tls"]
    assert listing["certificates"][1]["revoked"] is True
    assert listing["certificates"][2]["days_left"] in (4, 5)


def test_cli_list_expiring_within_filters_and_signals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca, force="tv", network="se.psn")
    pki.issue(ca, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "soon", days=3)
    pki.issue(ca, pki.CertKind.GATEWAY_SIGNING, out_stem=tmp_path / "later", days=60)
    gone = pki.issue(ca, pki.CertKind.APP_CLIENT, out_stem=tmp_path / "gone", app="a", days=2)
    pki.revoke(ca, serial=gone.serial, reason="superseded")
    code, out, _ = run(capsys, "pki", "list", "--ca-dir", ca, "--json", "--expiring-within", "7")
    assert code == 1  # something needs attention
    assert [c["kind"] for c in json.loads(out)["certificates"]] == ["gateway-tls"]  # not the revoked one
    code, out, _ = run(capsys, "pki", "list", "--ca-dir", ca, "--json", "--expiring-within", "1")
    assert code == 0 and json.loads(out)["certificates"] == []


def test_cli_list_says_when_the_crl_is_stale(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # ca_dir's CRL was published at NOW (2030) + 7 days; make one that has lapsed.
    pki.publish_crl(ca_dir, next_update_days=1, now=datetime.now(UTC) - timedelta(days=2))
    code, out, _ = run(capsys, "pki", "list", "--ca-dir", ca_dir)
    assert code == 0 and "STALE" in out


def test_cli_inspect(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    made = pki.issue(ca_dir, pki.CertKind.GATEWAY_TLS, out_stem=tmp_path / "gw", now=NOW)
    code, out, _ = run(capsys, "pki", "inspect", made.cert_path, "--json", "--key", made.key_path)
    info = json.loads(out)
    assert code == 0 and info["spiffe_id"] == f"spiffe://{TD}/gateway" and info["key_matches"] is True
    code, out, _ = run(capsys, "pki", "inspect", ca_dir / "crl.pem", "--json")
    assert code == 0 and json.loads(out)["type"] == "crl"
    code, out, _ = run(capsys, "pki", "inspect", made.cert_path)
    assert code == 0 and "spiffe_id" in out and "gateway-tls" in out


def _bad_inputs(tmp: Path, ca: Path, other: Path) -> dict[str, tuple[list[str | Path], Path | None]]:
    """Each bad input: argv, and the file the one-line error must name (None: no file involved)."""
    junk = tmp / "junk.pem"
    junk.write_text("this is not PEM\n")
    enc = tmp / "encrypted.key"
    enc.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    existing = pki.issue(ca, pki.CertKind.GATEWAY_TLS, out_stem=tmp / "existing", now=NOW)
    broken_ca = tmp / "broken-ca"
    shutil.copytree(ca, broken_ca)
    (broken_ca / "ca.pem").write_text("garbage\n")
    broken_inv = tmp / "broken-inv"
    shutil.copytree(ca, broken_inv)
    (broken_inv / "inventory.json").write_text("{not json")
    bad_dir = tmp / "net"
    bad_dir.mkdir()
    (bad_dir / "directory.toml").write_text('network = "se.psn"\nclearance_levels = []\n')
    issue: list[str | Path] = ["pki", "issue", "gateway-tls", "--ca-dir", ca, "--out", tmp / "new"]
    return {
        "ca cert not PEM": (
            ["pki", "issue", "gateway-tls", "--ca-dir", broken_ca, "--out", tmp / "n1"],
            broken_ca / "ca.pem",
        ),
        "ca key not PEM": ([*issue, "--ca-key", junk], junk),
        "ca key encrypted": ([*issue, "--ca-key", enc], enc),
        "ca key does not match": ([*issue, "--ca-key", other / "ca.key"], other / "ca.key"),
        "unknown kind": (["pki", "issue", "gateway", "--ca-dir", ca, "--out", tmp / "n2"], None),
        "unknown key type": ([*issue, "--key-type", "rsa"], None),
        "existing without overwrite": (
            ["pki", "issue", "gateway-tls", "--ca-dir", ca, "--out", tmp / "existing"],
            existing.key_path,
        ),
        "not a CA directory": (["pki", "list", "--ca-dir", tmp], tmp),
        "inventory not JSON": (["pki", "list", "--ca-dir", broken_inv], broken_inv / "inventory.json"),
        "inspect not PEM": (["pki", "inspect", junk], junk),
        "inspect missing": (["pki", "inspect", tmp / "nope.pem"], tmp / "nope.pem"),
        "inspect key does not match": (
            ["pki", "inspect", existing.cert_path, "--key", other / "ca.key"],
            other / "ca.key",
        ),
        "revoke cert not PEM": (["pki", "revoke", "--ca-dir", ca, "--cert", junk, "--reason", "keyCompromise"], junk),
        "revoke foreign cert": (
            ["pki", "revoke", "--ca-dir", other, "--cert", existing.cert_path, "--reason", "superseded"],
            existing.cert_path,
        ),
        "revoke bad reason": (["pki", "revoke", "--ca-dir", ca, "--serial", "ab", "--reason", "lost"], None),
        "revoke bad serial": (["pki", "revoke", "--ca-dir", ca, "--serial", "xyz", "--reason", "superseded"], None),
        "crl bad interval": (["pki", "crl", "--ca-dir", ca, "--next-update-days", "0"], None),
        "init existing": (["pki", "init", "--ca-dir", ca, "--force", "tv", "--network", "se.psn"], None),
        "init bad directory": (["pki", "init", "--network-dir", bad_dir], bad_dir / "directory.toml"),
        "init nothing": (["pki", "init"], None),
    }


BAD_INPUT_NAMES = [
    "ca cert not PEM",
    "ca key not PEM",
    "ca key encrypted",
    "ca key does not match",
    "unknown kind",
    "unknown key type",
    "existing without overwrite",
    "not a CA directory",
    "inventory not JSON",
    "inspect not PEM",
    "inspect missing",
    "inspect key does not match",
    "revoke cert not PEM",
    "revoke foreign cert",
    "revoke bad reason",
    "revoke bad serial",
    "crl bad interval",
    "init existing",
    "init bad directory",
    "init nothing",
]


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_cli_bad_input_is_one_line_and_exit_2(
    ca_dir: Path, other_ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv, named = _bad_inputs(scratch, ca_dir, other_ca)[name]
    capsys.readouterr()
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("psngw: ") and "Traceback" not in err
    if named is not None:
        assert str(named) in lines[0]


def test_cli_help_is_accurate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["pki", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("init", "issue", "revoke", "crl", "list", "inspect"):
        assert command in out
    expected = {
        "init": ["--ca-dir", "--force", "--network", "--name", "--days", "--network-dir", "--directory", "--overwrite"],
        "issue": [
            "KIND",
            "--ca-dir",
            "--out",
            "--app",
            "--dns",
            "--ip",
            "--days",
            "--key-type",
            "--ca-key",
            "--overwrite",
            "gateway-tls",
            "app-server",
        ],
        "revoke": ["--ca-dir", "--serial", "--cert", "--reason", "--ca-key", "keyCompromise"],
        "crl": ["--ca-dir", "--next-update-days", "--ca-key"],
        "list": ["--ca-dir", "--json", "--expiring-within"],
        "inspect": ["CERT", "--json", "--key"],
    }
    for command, options in expected.items():
        with pytest.raises(SystemExit):
            cli.main(["pki", command, "--help"])
        text = capsys.readouterr().out
        for option in options:
            assert option in text, (command, option)


# -- init_network ------------------------------------------------------------------------------

THREE_FORCES = """\
network = "se.psn"
clearance_levels = ["NPPV2", "NPPV3", "SC"]

[forces.thames-valley]
name = "Thames Valley Police"
ca = "pki/thames-valley/ca.pem"
crl = "pki/thames-valley/crl.pem"
peer_address = "127.0.0.1:7443"
clients = ["analyst-desk"]

[forces.hampshire]
name = "Hampshire Constabulary"
ca = "pki/hampshire/hants-ca.pem"
crl = "crls/hampshire.crl"
peer_address = "127.0.0.1:7444"
clients = ["custody-desk", "analyst-desk"]

[forces.surrey]
name = "Surrey Police"
ca = "pki/surrey/ca.pem"
peer_address = "127.0.0.1:7445"

[applications.intel-search]
name = "Intelligence search"
host = "thames-valley"
min_clearance = "SC"
[applications.intel-search.services."psn.demo.intel.v1.IntelligenceSearch"]
Search = "unary"

[applications.custody]
name = "Custody records"
host = "hampshire"
min_clearance = "NPPV2"
[applications.custody.services."psn.demo.custody.v1.CustodyRecords"]
GetRecord = "unary"

[applications.case-files]
name = "Case files"
host = "surrey"
min_clearance = "NPPV3"
[applications.case-files.services."psn.demo.casefiles.v1.CaseFiles"]
FetchDocument = "server_stream"
"""


def write_network(tmp_path: Path) -> Path:
    path = tmp_path / "net" / "directory.toml"
    path.parent.mkdir(parents=True)
    path.write_text(THREE_FORCES)
    return path


def test_init_network_makes_everything_for_three_forces(tmp_path: Path) -> None:
    directory = load_directory(write_network(tmp_path))
    material = pki.init_network(directory, now=NOW)
    assert set(material) == {"thames-valley", "hampshire", "surrey"}
    expected_servers = {"thames-valley": {"intel-search"}, "hampshire": {"custody"}, "surrey": {"case-files"}}
    expected_clients = {
        "thames-valley": {"analyst-desk"},
        "hampshire": {"custody-desk", "analyst-desk"},
        "surrey": set(),
    }
    for name, m in material.items():
        force = directory.forces[name]
        td = force.trust_domain
        assert m.ca == force.ca_path and m.ca_dir == force.ca_path.parent
        assert m.crl == (force.crl_path or force.ca_path.parent / "crl.pem")
        assert m.ca_key == m.ca_dir / "ca.key" and mode(m.ca_key) == 0o600
        ca = load(m.ca)
        crl = load_crl(m.crl)
        assert crl.is_signature_valid(ca.public_key()) and crl.issuer == ca.subject  # type: ignore[arg-type]  # the CA key is EC; the union is not narrowed
        assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == force.display_name
        assert set(m.app_servers) == expected_servers[name] and set(m.app_clients) == expected_clients[name]
        leaves = {
            m.gateway_tls: (f"spiffe://{td}/gateway", "gateway-tls", "gateway-tls"),
            m.gateway_signing: (f"spiffe://{td}/gateway", "gateway-signing", "gateway-signing"),
            m.log_signing: (f"spiffe://{td}/log", "log-signing", "log-signing"),
            **{i: (f"spiffe://{td}/app/{a}", f"app-{a}-server", "app-server") for a, i in m.app_servers.items()},
            **{i: (f"spiffe://{td}/app/{a}", f"app-{a}-client", "app-client") for a, i in m.app_clients.items()},
        }
        for issued, (spiffe, stem, kind) in leaves.items():
            assert issued.cert_path == m.ca_dir / f"{stem}.pem" and issued.key_path == m.ca_dir / f"{stem}.key"
            cert = load(issued.cert_path)
            cert.verify_directly_issued_by(ca)
            assert uris(cert) == [spiffe] and issued.spiffe_id == spiffe
            assert mode(issued.key_path) == 0o600
            assert pki.inspect_certificate(issued.cert_path, now=NOW)["kind"] == kind
        assert len(pki.inventory(m.ca_dir, now=NOW)) == 1 + len(leaves)
    # the CAs are distinct trust domains: no force's CA issued another's gateway
    tv, hants = material["thames-valley"], material["hampshire"]
    with pytest.raises(ValueError):
        load(hants.gateway_tls.cert_path).verify_directly_issued_by(load(tv.ca))


def test_init_network_writes_nothing_if_any_file_exists(tmp_path: Path) -> None:
    directory = load_directory(write_network(tmp_path))
    surrey = directory.forces["surrey"].ca_path.parent
    surrey.mkdir(parents=True)
    (surrey / "gateway-tls.key").write_text("precious")
    with pytest.raises(ConfigError, match="already exists") as info:
        pki.init_network(directory, now=NOW)
    assert info.value.file == str(surrey / "gateway-tls.key")
    assert not directory.forces["thames-valley"].ca_path.exists()
    assert (surrey / "gateway-tls.key").read_text() == "precious"
    pki.init_network(directory, overwrite=True, now=NOW)
    assert mode(surrey / "gateway-tls.key") == 0o600


def test_init_network_needs_one_folder_per_force(tmp_path: Path) -> None:
    path = write_network(tmp_path)
    path.write_text(THREE_FORCES.replace("pki/surrey/ca.pem", "pki/thames-valley/surrey-ca.pem"))
    with pytest.raises(ConfigError, match="same folder") as info:
        pki.init_network(load_directory(path), now=NOW)
    assert info.value.file == str(path)


def test_cli_init_network_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_network(tmp_path)
    code, out, _ = run(capsys, "pki", "init", "--network-dir", path.parent)
    assert code == 0 and "app-server intel-search" in out
    assert (path.parent / "pki" / "hampshire" / "hants-ca.pem").exists()
    assert (path.parent / "crls" / "hampshire.crl").exists()
    code, _, err = run(capsys, "pki", "init", "--directory", path)
    assert code == 2 and "already exists" in err
    code, _, _ = run(capsys, "pki", "init", "--directory", path, "--overwrite")
    assert code == 0
