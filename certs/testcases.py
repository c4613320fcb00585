#!/usr/bin/env python3
"""Build the imposter and edge-case certificates the gateway's identity checks must refuse.

Given an already-initialised network (the force CA directories that
``psngw pki init --network-dir`` makes) and an output folder, this writes one
certificate and private key per case below and returns ``{name: Case}``. Force A
is the first force of the network, force B the second; X is an application
force A's local listener accepts (one of A's ``clients``, else one it hosts) and
Y one of force B's.

Every case differs from the control case (``valid-app-client``) in exactly one
way, so a refusal can only be for that reason. ``Case.listener`` (``local`` or
``peer``) and ``Case.gateway`` (a force name) say where to present it;
``Case.accept`` is true only for the control case.

=========================  =========  =====================================================================
case                       listener   what it is, and what refusing it proves
=========================  =========  =====================================================================
valid-app-client           local (A)  control: an app-client of X issued by A's CA. Good clients still pass.
self-signed-gateway        peer (B)   self-signed, claims A's gateway. Trust comes from a directory CA.
self-signed-app            local (A)  self-signed, claims A's app X. Same, on the local listener.
forged-issuer-app          local (A)  issuer name and AKI copied from A's CA, signed by another key.
                                      The issuer is verified by signature, not by name.
cross-force-gateway        peer (C/A) issued by A's CA, claims B's gateway. A force's CA cannot mint an
                                      identity in another force (pinning to the trust domain's own CA).
cross-force-app            local (B)  issued by A's CA, claims B's app Y. Same, on B's local listener.
expired                    local (A)  app-client of X whose notAfter has passed.
not-yet-valid              local (A)  app-client of X whose notBefore is tomorrow.
revoked                    local (A)  app-client of X revoked (keyCompromise); A's CRL is republished.
server-eku-as-client       local (A)  app-server of X (serverAuth only) presented as a client.
signing-cert-as-tls        peer (B)   A's gateway-signing certificate (P-256, documentSigning EKU only)
                                      presented for TLS. The signing key is not a TLS key (X-Road split).
ca-as-leaf                 local (A)  CA:true with keyCertSign, claims X, issued by A's CA. Leaves only.
no-san                     local (A)  no SAN at all; the SPIFFE ID is in the CN. Identity is never the CN.
no-uri-san                 local (A)  a DNS SAN but no URI SAN. Exactly one URI SAN is required.
two-spiffe-ids             local (A)  two URI SANs: A's app X and A's gateway. Exactly one URI SAN.
spiffe-plus-other-uri      local (A)  A's app X plus an https URI SAN. Exactly one URI SAN, of any scheme.
spiffe-wrong-scheme        local (A)  ``https://<A>/app/X``.
spiffe-uppercase-scheme    local (A)  ``SPIFFE://<A>/app/X``.
spiffe-uppercase-td        local (A)  ``spiffe://<A upper-cased>/app/X``: trust domains are lower case.
spiffe-invalid-td          local (A)  a trust domain with a character SPIFFE forbids (``!``).
spiffe-percent-encoded-td  local (A)  its first letter percent-encoded: percent-encoding is forbidden.
spiffe-empty-td            local (A)  ``spiffe:///app/X``.
spiffe-empty-path          local (A)  ``spiffe://<A>``: a leaf's ID must have a path.
spiffe-trailing-slash      local (A)  ``spiffe://<A>/app/X/``: no empty segments.
spiffe-empty-segment       local (A)  ``spiffe://<A>/app//X``.
spiffe-dot-segment         local (A)  ``spiffe://<A>/app/./X``.
spiffe-dot-dot             local (A)  ``spiffe://<A>/app/../gateway``: no climbing out of the app space.
spiffe-percent-path        local (A)  ``%2F`` in the path.
spiffe-query               local (A)  ``spiffe://<A>/app/X?role=gateway``.
spiffe-fragment            local (A)  ``spiffe://<A>/app/X#gateway``.
spiffe-port                local (A)  ``spiffe://<A>:8443/app/X``.
spiffe-userinfo            local (A)  ``spiffe://gateway@<A>/app/X``.
unlisted-intermediate      local (A)  leaf <- intermediate CA <- A's CA; the intermediate is in no
                                      directory. Present ``chain_path`` (leaf + intermediate). A's CA
                                      has pathlen:0, and only a directory CA may issue a leaf.
=========================  =========  =====================================================================

The certificates issued through ``gateway.pki.issue`` (the control, expired,
not-yet-valid, revoked, server-eku-as-client and signing-cert-as-tls cases) are
in A's inventory; the imposters signed directly with A's CA key stand for a CA
that misbehaves and are not. ``cases.json`` in the output folder lists every
case for tools that are not Python.

Use from tests (the module is not a package member; load it from its path)::

    spec = importlib.util.spec_from_file_location("psn_testcases", "certs/testcases.py")
    testcases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(testcases)
    cases = testcases.build(tmp_path / "cases", directory)      # or a list of CA directories

Or run it: ``python certs/testcases.py --out certs/out`` makes a two-force
network in ``certs/out/network`` first when no ``--network-dir``/``--ca-dir`` is
given. ``certs/out/`` is ignored by git.
"""

# No `from __future__ import annotations` here on purpose: loaded with importlib
# from its path, this module is not in sys.modules while its dataclass is built,
# and dataclasses cannot resolve string annotations then.

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from gateway import pki
from gateway.directory import NetworkDirectory, load_directory
from gateway.errors import ConfigError, GatewayError

__all__ = ["Case", "Network", "build", "main"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One test certificate: its files, what it claims, where to present it, what must happen."""

    __test__ = False  # not a pytest test class

    name: str
    cert_path: Path
    key_path: Path
    serial: int
    fingerprint: str
    uris: tuple[str, ...]
    listener: str  # "local" or "peer"
    gateway: str  # the force whose gateway it is presented to
    accept: bool
    proves: str
    chain_path: Path | None = None

    @property
    def spiffe_id(self) -> str | None:
        """The one URI SAN if there is exactly one (as in `gateway.pki.Issued`), else None."""
        return self.uris[0] if len(self.uris) == 1 else None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict of this case."""
        out = dataclasses.asdict(self)
        out["serial"] = format(self.serial, "x")
        for key in ("cert_path", "key_path", "chain_path"):
            out[key] = str(out[key]) if out[key] is not None else None
        out["uris"] = list(self.uris)
        return out


@dataclasses.dataclass(frozen=True)
class _Force:
    name: str
    trust_domain: str
    ca_dir: Path
    ca_cert: x509.Certificate
    ca_key: pki.PrivateKey
    display_name: str
    app: str


@dataclasses.dataclass(frozen=True)
class Network:
    """The forces the cases are built from: A (issues most), B (is claimed), and C if there is one."""

    a: _Force
    b: _Force
    c: _Force | None = None


def build(
    out_dir: Path,
    network: NetworkDirectory | Sequence[Path],
    *,
    overwrite: bool = False,
    now: datetime | None = None,
) -> dict[str, Case]:
    """Write every case into `out_dir` and return them by name.

    `network` is the network directory (forces in file order) or the CA
    directories of two or more forces (A first). Force A's inventory and CRL are
    updated (the revoked case).
    """
    at = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    net = _load_network(network)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    maker = _Maker(out_dir, net, at, overwrite)
    cases: dict[str, Case] = {}
    for make in (
        _control,
        _self_signed,
        _forged_issuer,
        _cross_force,
        _lifetimes,
        _revoked,
        _wrong_purpose,
        _ca_as_leaf,
        _san_counts,
        _malformed_ids,
        _unlisted_intermediate,
    ):
        for case in make(maker):
            cases[case.name] = case
    manifest = {name: case.to_json() for name, case in cases.items()}
    (out_dir / "cases.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
    return cases


# -- the cases --------------------------------------------------------------------------------


def _control(m: "_Maker") -> list[Case]:
    a = m.net.a
    return [
        m.issued(
            "valid-app-client",
            pki.CertKind.APP_CLIENT,
            a.app,
            "local",
            a.name,
            accept=True,
            proves="control: a good client of force A is still served",
        )
    ]


def _self_signed(m: "_Maker") -> list[Case]:
    a, b = m.net.a, m.net.b
    gw = pki.leaf_profile(pki.CertKind.GATEWAY_TLS, trust_domain=a.trust_domain, display_name=a.display_name)
    app = m.app_profile(a)
    return [
        m.signed(
            "self-signed-gateway",
            gw,
            issuer=None,
            listener="peer",
            gateway=b.name,
            proves="a self-signed certificate claiming A's gateway is not trusted",
        ),
        m.signed(
            "self-signed-app",
            app,
            issuer=None,
            listener="local",
            gateway=a.name,
            proves="a self-signed certificate claiming A's application is not trusted",
        ),
    ]


def _forged_issuer(m: "_Maker") -> list[Case]:
    a = m.net.a
    rogue = pki.generate_key("p256")
    # A's real CA certificate gives the issuer name and AKI; the rogue key signs.
    return [
        m.signed(
            "forged-issuer-app",
            m.app_profile(a),
            issuer=(a.ca_cert, rogue),
            listener="local",
            gateway=a.name,
            proves="the issuer is checked by signature, not by its name or AKI",
        )
    ]


def _cross_force(m: "_Maker") -> list[Case]:
    a, b = m.net.a, m.net.b
    target = m.net.c.name if m.net.c is not None else a.name
    gw_b = pki.leaf_profile(pki.CertKind.GATEWAY_TLS, trust_domain=b.trust_domain, display_name=b.display_name)
    return [
        m.signed(
            "cross-force-gateway",
            gw_b,
            issuer=m.ca_of(a),
            listener="peer",
            gateway=target,
            proves="force A's CA cannot mint force B's gateway identity",
        ),
        m.signed(
            "cross-force-app",
            m.app_profile(b),
            issuer=m.ca_of(a),
            listener="local",
            gateway=b.name,
            proves="force A's CA cannot mint an application identity of force B",
        ),
    ]


def _lifetimes(m: "_Maker") -> list[Case]:
    a = m.net.a
    return [
        m.issued(
            "expired",
            pki.CertKind.APP_CLIENT,
            a.app,
            "local",
            a.name,
            days=30,
            not_before=m.at - timedelta(days=31),
            proves="an expired certificate is refused",
        ),
        m.issued(
            "not-yet-valid",
            pki.CertKind.APP_CLIENT,
            a.app,
            "local",
            a.name,
            days=30,
            not_before=m.at + timedelta(days=1),
            proves="a certificate before its notBefore is refused",
        ),
    ]


def _revoked(m: "_Maker") -> list[Case]:
    a = m.net.a
    case = m.issued(
        "revoked", pki.CertKind.APP_CLIENT, a.app, "local", a.name, proves="a certificate on its force's CRL is refused"
    )
    pki.revoke(a.ca_dir, serial=case.serial, reason="keyCompromise", now=m.at)
    return [case]


def _wrong_purpose(m: "_Maker") -> list[Case]:
    a, b = m.net.a, m.net.b
    return [
        m.issued(
            "server-eku-as-client",
            pki.CertKind.APP_SERVER,
            a.app,
            "local",
            a.name,
            proves="a serverAuth-only certificate is refused as a client",
        ),
        m.issued(
            "signing-cert-as-tls",
            pki.CertKind.GATEWAY_SIGNING,
            None,
            "peer",
            b.name,
            key_type="p256",
            proves="the gateway's signing certificate is not a TLS certificate",
        ),
    ]


def _ca_as_leaf(m: "_Maker") -> list[Case]:
    a = m.net.a
    profile = dataclasses.replace(
        m.app_profile(a),
        is_ca=True,
        path_length=None,
        key_usage=frozenset({"digitalSignature", "keyCertSign", "cRLSign"}),
    )
    return [
        m.signed(
            "ca-as-leaf",
            profile,
            issuer=m.ca_of(a),
            listener="local",
            gateway=a.name,
            proves="a CA certificate (CA:true) is refused as a leaf",
        )
    ]


def _san_counts(m: "_Maker") -> list[Case]:
    a = m.net.a
    base = m.app_profile(a)
    app_id = base.uris[0]
    cases = [
        (
            "no-san",
            dataclasses.replace(base, uris=(), common_name=app_id),
            "a certificate with no SAN is refused, even with a SPIFFE ID in its CN",
        ),
        (
            "no-uri-san",
            dataclasses.replace(base, uris=(), dns_names=(f"{a.app}.{a.trust_domain}",)),
            "a certificate without a URI SAN is refused",
        ),
        (
            "two-spiffe-ids",
            dataclasses.replace(base, uris=(app_id, f"spiffe://{a.trust_domain}/gateway")),
            "a certificate with two SPIFFE IDs is refused",
        ),
        (
            "spiffe-plus-other-uri",
            dataclasses.replace(base, uris=(app_id, "https://example.org/")),
            "a certificate with more than one URI SAN is refused",
        ),
    ]
    return [m.signed(n, p, issuer=m.ca_of(a), listener="local", gateway=a.name, proves=why) for n, p, why in cases]


def _malformed_ids(m: "_Maker") -> list[Case]:
    a = m.net.a
    td, app = a.trust_domain, a.app
    first, _, rest = td.partition(".")
    bad = {
        "spiffe-wrong-scheme": f"https://{td}/app/{app}",
        "spiffe-uppercase-scheme": f"SPIFFE://{td}/app/{app}",
        "spiffe-uppercase-td": f"spiffe://{td.upper()}/app/{app}",
        "spiffe-invalid-td": f"spiffe://{first}!.{rest}/app/{app}",
        "spiffe-percent-encoded-td": f"spiffe://%{ord(td[0]):02X}{td[1:]}/app/{app}",
        "spiffe-empty-td": f"spiffe:///app/{app}",
        "spiffe-empty-path": f"spiffe://{td}",
        "spiffe-trailing-slash": f"spiffe://{td}/app/{app}/",
        "spiffe-empty-segment": f"spiffe://{td}/app//{app}",
        "spiffe-dot-segment": f"spiffe://{td}/app/./{app}",
        "spiffe-dot-dot": f"spiffe://{td}/app/../gateway",
        "spiffe-percent-path": f"spiffe://{td}/app%2F{app}",
        "spiffe-query": f"spiffe://{td}/app/{app}?role=gateway",
        "spiffe-fragment": f"spiffe://{td}/app/{app}#gateway",
        "spiffe-port": f"spiffe://{td}:8443/app/{app}",
        "spiffe-userinfo": f"spiffe://gateway@{td}/app/{app}",
    }
    base = m.app_profile(a)
    return [
        m.signed(
            name,
            dataclasses.replace(base, uris=(uri,)),
            issuer=m.ca_of(a),
            listener="local",
            gateway=a.name,
            proves=f"a malformed SPIFFE ID ({uri!r}) is refused",
        )
        for name, uri in bad.items()
    ]


def _unlisted_intermediate(m: "_Maker") -> list[Case]:
    a = m.net.a
    inter_key = pki.generate_key("p256")
    inter_profile = dataclasses.replace(
        pki.ca_profile(trust_domain=a.trust_domain, display_name=a.display_name),
        common_name=f"{a.display_name} Issuing CA (in no directory)"[:64],
    )
    inter = pki.build_certificate(
        inter_profile,
        public_key=inter_key.public_key(),
        issuer=a.ca_cert,
        issuer_key=a.ca_key,
        not_before=m.at - timedelta(minutes=5),
        not_after=m.at + timedelta(days=60),
    )
    name = "unlisted-intermediate"
    case = m.signed(
        name,
        m.app_profile(a),
        issuer=(inter, inter_key),
        listener="local",
        gateway=a.name,
        proves="only a force CA in the directory may issue a leaf; no intermediates",
    )
    pem = serialization.Encoding.PEM
    chain = m.out / f"{name}-chain.pem"
    m.write(chain, case.cert_path.read_bytes() + inter.public_bytes(pem), 0o644)
    m.write(m.out / f"{name}-ca.pem", inter.public_bytes(pem), 0o644)
    return [dataclasses.replace(case, chain_path=chain)]


# -- the machinery ------------------------------------------------------------------------------


class _Maker:
    """Writes cases into one folder."""

    def __init__(self, out: Path, net: Network, at: datetime, overwrite: bool) -> None:
        self.out = out
        self.net = net
        self.at = at
        self.overwrite = overwrite

    def ca_of(self, force: _Force) -> tuple[x509.Certificate, pki.PrivateKey]:
        return force.ca_cert, force.ca_key

    def app_profile(self, force: _Force) -> pki.Profile:
        return pki.leaf_profile(
            pki.CertKind.APP_CLIENT, trust_domain=force.trust_domain, display_name=force.display_name, app=force.app
        )

    def issued(
        self,
        name: str,
        kind: pki.CertKind,
        app: str | None,
        listener: str,
        gateway: str,
        *,
        proves: str,
        accept: bool = False,
        days: int | None = None,
        not_before: datetime | None = None,
        key_type: str | None = None,
    ) -> Case:
        """A certificate issued the ordinary way, through `gateway.pki.issue`."""
        made = pki.issue(
            self.net.a.ca_dir,
            kind,
            out_stem=self.out / name,
            app=app,
            days=days,
            key_type=key_type,
            overwrite=self.overwrite,
            now=self.at,
            not_before=not_before,
        )
        uris = (made.spiffe_id,) if made.spiffe_id else ()
        return Case(
            name, made.cert_path, made.key_path, made.serial, made.fingerprint, uris, listener, gateway, accept, proves
        )

    def signed(
        self,
        name: str,
        profile: pki.Profile,
        *,
        issuer: tuple[x509.Certificate, pki.PrivateKey] | None,
        listener: str,
        gateway: str,
        proves: str,
    ) -> Case:
        """A certificate built directly from a (doctored) profile; `issuer` None means self-signed."""
        key = pki.generate_key("p256")
        cert = pki.build_certificate(
            profile,
            public_key=key.public_key(),
            issuer=issuer[0] if issuer else None,
            issuer_key=issuer[1] if issuer else key,
            not_before=self.at - timedelta(minutes=5),
            not_after=self.at + timedelta(days=30),
        )
        key_path, cert_path = self.out / f"{name}.key", self.out / f"{name}.pem"
        pem = serialization.Encoding.PEM
        self.write(
            key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600
        )
        self.write(cert_path, cert.public_bytes(pem), 0o644)
        return Case(
            name,
            cert_path,
            key_path,
            cert.serial_number,
            pki.fingerprint(cert),
            profile.uris,
            listener,
            gateway,
            False,
            proves,
        )

    def write(self, path: Path, data: bytes, mode: int) -> None:
        """Write a file with exactly `mode`; an existing file only with overwrite."""
        if self.overwrite and path.exists():
            path.unlink()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise ConfigError("already exists; pass --overwrite to replace it", file=path) from None
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)


def _load_network(network: NetworkDirectory | Sequence[Path]) -> Network:
    if isinstance(network, NetworkDirectory):
        forces = []
        for force in network.forces.values():
            hosted = [app.name for app in network.applications.values() if app.host == force.name]
            forces.append(_load_force(force.ca_path.parent, app=(*force.clients, *hosted)))
    else:
        forces = [_load_force(Path(d), app=()) for d in network]
    if len(forces) < 2:
        raise ValueError("the test cases need at least two forces")
    return Network(forces[0], forces[1], forces[2] if len(forces) > 2 else None)


def _load_force(ca_dir: Path, *, app: Sequence[str]) -> _Force:
    entries = pki.inventory(ca_dir)
    ca = next(e for e in entries if e.kind == pki.CertKind.CA)
    if ca.spiffe_id is None or ca.key_path is None:
        raise ValueError(f"{ca_dir}: the inventory's CA entry has no SPIFFE ID or key")
    cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    if not isinstance(key, pki.PrivateKey):
        raise ValueError(f"{ca.key_path}: not a P-256 or Ed25519 key")
    trust_domain = ca.spiffe_id.removeprefix("spiffe://")
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    display = str(org[0].value) if org else trust_domain
    if not app:  # from CA directories only: take an application from the inventory
        app = [e.spiffe_id.rsplit("/", 1)[1] for e in entries if e.spiffe_id and "/app/" in e.spiffe_id]
    return _Force(trust_domain.partition(".")[0], trust_domain, ca_dir, cert, key, display, app[0] if app else "app")


_DEMO_DIRECTORY = """\
# A two-force network for the test cases, written by certs/testcases.py.
network = "se.psn"
clearance_levels = ["NPPV2", "NPPV3", "SC"]

[forces.thames-valley]
name = "Thames Valley Police"
ca = "thames-valley/ca.pem"
crl = "thames-valley/crl.pem"
peer_address = "127.0.0.1:7443"
clients = ["analyst-desk"]

[forces.hampshire]
name = "Hampshire Constabulary"
ca = "hampshire/ca.pem"
crl = "hampshire/crl.pem"
peer_address = "127.0.0.1:7444"
clients = ["custody-desk"]

[applications.intel-search]
name = "Intelligence search"
host = "thames-valley"
min_clearance = "SC"
[applications.intel-search.services."psn.demo.intel.v1.IntelligenceSearch"]
Search = "unary"
"""


def _demo_network(folder: Path, *, overwrite: bool) -> NetworkDirectory:
    """Write a two-force directory into `folder` and initialise its PKI."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "directory.toml"
    if path.exists() and not overwrite:
        raise ConfigError("already exists; pass --overwrite to replace it", file=path)
    path.write_text(_DEMO_DIRECTORY, "utf-8")
    directory = load_directory(path)
    pki.init_network(directory, overwrite=overwrite)
    return directory


# -- the script ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run as a script: build the cases into --out and print a table of them."""
    parser = argparse.ArgumentParser(
        prog="testcases.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the cases into")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--network-dir", type=Path, help="a folder with directory.toml whose PKI is initialised")
    src.add_argument("--directory", type=Path, help="the network directory file")
    src.add_argument("--ca-dir", type=Path, action="append", help="a force CA directory (A first; two or more)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    parser.add_argument("--json", action="store_true", help="print the cases as JSON")
    args = parser.parse_args(argv)
    try:
        network: NetworkDirectory | list[Path]
        if args.network_dir or args.directory:
            network = load_directory(args.directory or args.network_dir / "directory.toml")
        elif args.ca_dir:
            network = list(args.ca_dir)
        else:
            network = _demo_network(args.out / "network", overwrite=args.overwrite)
        cases = build(args.out, network, overwrite=args.overwrite)
    except (GatewayError, ValueError) as exc:
        print(f"testcases: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({n: c.to_json() for n, c in cases.items()}, indent=2))
    else:
        for case in cases.values():
            verdict = "ACCEPT" if case.accept else "refuse"
            print(f"{case.name:<26} {case.listener:>5}@{case.gateway:<16} {verdict:<7} {case.proves}")
        print(f"{len(cases)} cases in {args.out} (manifest: {args.out / 'cases.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
