"""certs/testcases.py: every case is produced, and each is what it says it is."""

from __future__ import annotations

import importlib.util
import json
import re
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import pki
from gateway.directory import NetworkDirectory, load_directory
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "certs" / "testcases.py"

DIRECTORY = """\
network = "se.psn"
clearance_levels = ["NPPV2", "SC"]

[forces.thames-valley]
name = "Thames Valley Police"
ca = "pki/thames-valley/ca.pem"
crl = "pki/thames-valley/crl.pem"
peer_address = "127.0.0.1:7443"
clients = ["analyst-desk"]

[forces.hampshire]
name = "Hampshire Constabulary"
ca = "pki/hampshire/ca.pem"
crl = "pki/hampshire/crl.pem"
peer_address = "127.0.0.1:7444"

[forces.surrey]
name = "Surrey Police"
ca = "pki/surrey/ca.pem"
crl = "pki/surrey/crl.pem"
peer_address = "127.0.0.1:7445"

[applications.custody]
name = "Custody records"
host = "hampshire"
min_clearance = "NPPV2"
[applications.custody.services."psn.demo.custody.v1.CustodyRecords"]
GetRecord = "unary"
"""

MALFORMED = {
    "spiffe-wrong-scheme": "https://thames-valley.se.psn/app/analyst-desk",
    "spiffe-uppercase-scheme": "SPIFFE://thames-valley.se.psn/app/analyst-desk",
    "spiffe-uppercase-td": "spiffe://THAMES-VALLEY.SE.PSN/app/analyst-desk",
    "spiffe-invalid-td": "spiffe://thames-valley!.se.psn/app/analyst-desk",
    "spiffe-percent-encoded-td": "spiffe://%74hames-valley.se.psn/app/analyst-desk",
    "spiffe-empty-td": "spiffe:///app/analyst-desk",
    "spiffe-empty-path": "spiffe://thames-valley.se.psn",
    "spiffe-trailing-slash": "spiffe://thames-valley.se.psn/app/analyst-desk/",
    "spiffe-empty-segment": "spiffe://thames-valley.se.psn/app//analyst-desk",
    "spiffe-dot-segment": "spiffe://thames-valley.se.psn/app/./analyst-desk",
    "spiffe-dot-dot": "spiffe://thames-valley.se.psn/app/../gateway",
    "spiffe-percent-path": "spiffe://thames-valley.se.psn/app%2Fanalyst-desk",
    "spiffe-query": "spiffe://thames-valley.se.psn/app/analyst-desk?role=gateway",
    "spiffe-fragment": "spiffe://thames-valley.se.psn/app/analyst-desk#gateway",
    "spiffe-port": "spiffe://thames-valley.se.psn:8443/app/analyst-desk",
    "spiffe-userinfo": "spiffe://gateway@thames-valley.se.psn/app/analyst-desk",
}

EXPECTED = {
    "valid-app-client",
    "self-signed-gateway",
    "self-signed-app",
    "forged-issuer-app",
    "cross-force-gateway",
    "cross-force-app",
    "expired",
    "not-yet-valid",
    "revoked",
    "server-eku-as-client",
    "signing-cert-as-tls",
    "ca-as-leaf",
    "no-san",
    "no-uri-san",
    "two-spiffe-ids",
    "spiffe-plus-other-uri",
    "unlisted-intermediate",
    *MALFORMED,
}


def is_valid_spiffe_leaf_id(uri: str) -> bool:
    """A reference reading of the SPIFFE-ID spec (section 2), independent of gateway.identity."""
    m = re.fullmatch(r"spiffe://([a-z0-9._-]+)(/.*)", uri)
    if not m:
        return False
    segments = m.group(2).split("/")[1:]
    return all(re.fullmatch(r"[A-Za-z0-9._-]+", s) and s not in (".", "..") for s in segments)


def load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("psn_certs_testcases", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def testcases() -> ModuleType:
    return load_module()


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> NetworkDirectory:
    path = tmp_path_factory.mktemp("net") / "directory.toml"
    path.write_text(DIRECTORY)
    directory = load_directory(path)
    pki.init_network(directory)
    return directory


@pytest.fixture(scope="module")
def cases(testcases: ModuleType, network: NetworkDirectory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: dict[str, Any] = testcases.build(tmp_path_factory.mktemp("cases"), network)
    return out


def cert(case: Any) -> x509.Certificate:
    return x509.load_pem_x509_certificate(case.cert_path.read_bytes())


def ca(network: NetworkDirectory, force: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(network.forces[force].ca_path.read_bytes())


def issued_by(leaf: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def san_uris(c: x509.Certificate) -> list[str]:
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def eku(c: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def is_ca(c: x509.Certificate) -> bool:
    return bool(c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)


# -- every case is there, with its files ----------------------------------------------------------


def test_every_case_is_produced(cases: dict[str, Any]) -> None:
    assert set(cases) == EXPECTED
    assert [n for n, c in cases.items() if c.accept] == ["valid-app-client"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_case_has_a_matching_key_and_metadata(cases: dict[str, Any], name: str) -> None:
    case = cases[name]
    assert case.name == name
    assert case.cert_path.name == f"{name}.pem" and case.key_path.name == f"{name}.key"
    assert stat.S_IMODE(case.key_path.stat().st_mode) == 0o600
    c = cert(case)
    key = serialization.load_pem_private_key(case.key_path.read_bytes(), None)
    assert key.public_key() == c.public_key()
    assert case.serial == c.serial_number
    assert case.fingerprint == pki.fingerprint(c)
    assert list(case.uris) == san_uris(c)
    assert case.listener in ("local", "peer") and case.proves
    assert case.spiffe_id == (case.uris[0] if len(case.uris) == 1 else None)


def test_manifest_lists_every_case(cases: dict[str, Any]) -> None:
    folder = next(iter(cases.values())).cert_path.parent
    manifest = json.loads((folder / "cases.json").read_text())
    assert set(manifest) == EXPECTED
    assert manifest["revoked"]["serial"] == format(cases["revoked"].serial, "x")


# -- each case is what it says ---------------------------------------------------------------------


def test_control_is_a_good_client(cases: dict[str, Any], network: NetworkDirectory) -> None:
    c = cert(cases["valid-app-client"])
    assert issued_by(c, ca(network, "thames-valley"))
    assert san_uris(c) == ["spiffe://thames-valley.se.psn/app/analyst-desk"]
    assert is_valid_spiffe_leaf_id(san_uris(c)[0])
    assert eku(c) == [ExtendedKeyUsageOID.CLIENT_AUTH] and not is_ca(c)
    now = datetime.now(UTC)
    assert c.not_valid_before_utc < now < c.not_valid_after_utc
    crl = x509.load_pem_x509_crl(network.forces["thames-valley"].crl_path.read_bytes())  # type: ignore[union-attr]  # set in DIRECTORY
    assert crl.get_revoked_certificate_by_serial_number(c.serial_number) is None
    assert (cases["valid-app-client"].listener, cases["valid-app-client"].gateway) == ("local", "thames-valley")


def test_self_signed_cases(cases: dict[str, Any], network: NetworkDirectory) -> None:
    gw, app = cert(cases["self-signed-gateway"]), cert(cases["self-signed-app"])
    assert san_uris(gw) == ["spiffe://thames-valley.se.psn/gateway"]
    assert san_uris(app) == ["spiffe://thames-valley.se.psn/app/analyst-desk"]
    for c in (gw, app):
        assert issued_by(c, c) and c.issuer == c.subject
        assert not any(issued_by(c, ca(network, f)) for f in network.forces)
    assert cases["self-signed-gateway"].listener == "peer" and cases["self-signed-gateway"].gateway == "hampshire"


def test_forged_issuer_copies_the_name_but_not_the_signature(cases: dict[str, Any], network: NetworkDirectory) -> None:
    c, tv = cert(cases["forged-issuer-app"]), ca(network, "thames-valley")
    assert c.issuer == tv.subject
    aki = c.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == tv.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert not issued_by(c, tv)


def test_cross_force_cases_are_really_signed_by_force_a(cases: dict[str, Any], network: NetworkDirectory) -> None:
    gw, app = cert(cases["cross-force-gateway"]), cert(cases["cross-force-app"])
    tv, hants = ca(network, "thames-valley"), ca(network, "hampshire")
    assert issued_by(gw, tv) and issued_by(app, tv)  # a genuine signature, by the wrong force
    assert not issued_by(gw, hants) and not issued_by(app, hants)
    assert san_uris(gw) == ["spiffe://hampshire.se.psn/gateway"]
    assert eku(gw) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert san_uris(app) == ["spiffe://hampshire.se.psn/app/custody"]  # hampshire hosts custody
    assert (cases["cross-force-gateway"].listener, cases["cross-force-gateway"].gateway) == ("peer", "surrey")
    assert (cases["cross-force-app"].listener, cases["cross-force-app"].gateway) == ("local", "hampshire")


def test_lifetime_cases(cases: dict[str, Any], network: NetworkDirectory) -> None:
    now = datetime.now(UTC)
    expired, early = cert(cases["expired"]), cert(cases["not-yet-valid"])
    assert expired.not_valid_after_utc < now and issued_by(expired, ca(network, "thames-valley"))
    assert early.not_valid_before_utc > now and issued_by(early, ca(network, "thames-valley"))


def test_revoked_case_is_on_the_republished_crl(cases: dict[str, Any], network: NetworkDirectory) -> None:
    c = cert(cases["revoked"])
    tv = ca(network, "thames-valley")
    crl = x509.load_pem_x509_crl(network.forces["thames-valley"].crl_path.read_bytes())  # type: ignore[union-attr]  # set in DIRECTORY
    assert crl.is_signature_valid(tv.public_key())  # type: ignore[arg-type]  # the CA key is EC; the union is not narrowed
    entry = crl.get_revoked_certificate_by_serial_number(c.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert issued_by(c, tv) and c.not_valid_after_utc > datetime.now(UTC)  # revoked is its only fault


def test_wrong_purpose_cases(cases: dict[str, Any], network: NetworkDirectory) -> None:
    server = cert(cases["server-eku-as-client"])
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert san_uris(server) == ["spiffe://thames-valley.se.psn/app/analyst-desk"]
    signing = cert(cases["signing-cert-as-tls"])
    assert not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} & set(eku(signing))
    assert signing.extensions.get_extension_for_class(x509.KeyUsage).value.content_commitment
    assert pki.inspect_certificate(cases["signing-cert-as-tls"].cert_path)["key_type"] == "p256"  # TLS-capable key
    assert san_uris(signing) == ["spiffe://thames-valley.se.psn/gateway"]
    assert all(issued_by(c, ca(network, "thames-valley")) for c in (server, signing))


def test_ca_as_leaf(cases: dict[str, Any], network: NetworkDirectory) -> None:
    c = cert(cases["ca-as-leaf"])
    assert is_ca(c) and c.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert issued_by(c, ca(network, "thames-valley"))
    assert san_uris(c) == ["spiffe://thames-valley.se.psn/app/analyst-desk"]
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku(c)


def test_san_count_cases(cases: dict[str, Any]) -> None:
    no_san = cert(cases["no-san"])
    with pytest.raises(x509.ExtensionNotFound):
        no_san.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    cn = no_san.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "spiffe://thames-valley.se.psn/app/analyst-desk"  # the bait: an ID in the CN
    no_uri = cert(cases["no-uri-san"])
    san = no_uri.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
    assert san.get_values_for_type(x509.DNSName) == ["analyst-desk.thames-valley.se.psn"]
    two = san_uris(cert(cases["two-spiffe-ids"]))
    assert len(two) == 2 and all(is_valid_spiffe_leaf_id(u) for u in two)
    other = san_uris(cert(cases["spiffe-plus-other-uri"]))
    assert len(other) == 2 and other[1].startswith("https://")


@pytest.mark.parametrize(("name", "uri"), MALFORMED.items())
def test_malformed_spiffe_ids_are_malformed(
    cases: dict[str, Any], network: NetworkDirectory, name: str, uri: str
) -> None:
    c = cert(cases[name])
    assert san_uris(c) == [uri]  # exactly one URI SAN: the malformed ID is the only fault
    assert not is_valid_spiffe_leaf_id(uri)
    assert issued_by(c, ca(network, "thames-valley"))
    assert eku(c) == [ExtendedKeyUsageOID.CLIENT_AUTH] and not is_ca(c)


def test_unlisted_intermediate_chain(cases: dict[str, Any], network: NetworkDirectory) -> None:
    case = cases["unlisted-intermediate"]
    assert case.chain_path is not None
    chain = x509.load_pem_x509_certificates(case.chain_path.read_bytes())
    assert len(chain) == 2
    leaf, inter = chain
    assert leaf == cert(case)
    tv = ca(network, "thames-valley")
    assert is_ca(inter) and issued_by(inter, tv)
    assert issued_by(leaf, inter) and not issued_by(leaf, tv)
    assert all(inter != ca(network, f) for f in network.forces)  # in no directory
    assert san_uris(leaf) == ["spiffe://thames-valley.se.psn/app/analyst-desk"]


# -- other ways in ------------------------------------------------------------------------------------


def test_build_from_ca_directories(testcases: ModuleType, tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    pki.init_ca(dirs[0], force="kent", network="se.psn", display_name="Kent Police")
    pki.init_ca(dirs[1], force="sussex", network="se.psn", display_name="Sussex Police")
    pki.issue(dirs[0], pki.CertKind.APP_CLIENT, out_stem=dirs[0] / "desk", app="desk")
    built = testcases.build(tmp_path / "cases", dirs)
    assert set(built) == EXPECTED
    assert built["valid-app-client"].uris == ("spiffe://kent.se.psn/app/desk",)
    assert built["cross-force-gateway"].uris == ("spiffe://sussex.se.psn/gateway",)
    assert built["cross-force-gateway"].gateway == "kent"  # no third force: presented to A


def test_refuses_to_overwrite_without_the_flag(
    testcases: ModuleType, network: NetworkDirectory, tmp_path: Path
) -> None:
    out = tmp_path / "again"
    testcases.build(out, network)
    key = (out / "no-san.key").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        testcases.build(out, network)
    assert (out / "no-san.key").read_bytes() == key
    testcases.build(out, network, overwrite=True)
    assert (out / "no-san.key").read_bytes() != key


def test_script_runs_and_has_help(testcases: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert testcases.main(["--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "valid-app-client" in out and f"{len(EXPECTED)} cases" in out
    assert (tmp_path / "out" / "network" / "directory.toml").exists()
    assert testcases.main(["--out", str(tmp_path / "out")]) == 2  # exists: one line, exit 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "already exists" in err
    with pytest.raises(SystemExit) as info:
        testcases.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in EXPECTED:
        assert name in text  # the table of cases is in --help


def test_module_loads_by_path_more_than_once() -> None:
    first, second = load_module(), load_module()
    assert first is not second and "psn_certs_testcases" not in sys.modules
