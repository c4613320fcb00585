"""One force's certificate authority: issuing, revoking, listing (`psngw pki`).

Each force is its own trust domain, ``<force>.<network>``, with its own CA. This
module is the operator's tool for that CA: it makes the CA, issues the leaf
certificates the gateway and the force's applications present, revokes them and
publishes the CRL, and keeps an inventory of everything it issued.

Owns:

- the certificate profiles (`CertKind`, `leaf_profile`, `ca_profile`) and building
  certificates and CRLs from them (`build_certificate`, `build_crl`): a pure core
  that takes keys and values and returns cryptography objects;
- the CA directory on disk (``ca.pem``, ``ca.key``, ``crl.pem``, ``inventory.json``):
  private keys written once with mode 0600, the inventory and CRL replaced
  atomically (temporary file, fsync, rename), one writer at a time (a lock file);
- `init_network`, which makes the whole demo PKI for a network directory;
- the ``psngw pki`` command group (`register_cli`).

Does not own: deciding whether a presented certificate is acceptable. That is
`gateway.identity`, which reads the CA certificates and CRLs written here.

SPIFFE IDs are carried as exactly one URI SAN, never in the CN (X.509-SVID
section 2): ``spiffe://<td>/gateway`` for a gateway's TLS and signing
certificates, ``spiffe://<td>/log`` for the force's audit-log key and
``spiffe://<td>/app/<name>`` for applications. The CA carries ``spiffe://<td>``
(a signing certificate's ID has no path, X.509-SVID section 3.2).

Two deliberate departures from plain defaults, both closed rather than open:

- Application certificates carry one TLS purpose each (``app-client``: clientAuth,
  ``app-server``: serverAuth), so a server certificate cannot be replayed as a
  client. X.509-SVID suggests both; we split them on purpose.
- Signing certificates (``gateway-signing``, ``log-signing``) carry an extended key
  usage of id-kp-documentSigning (RFC 9336) only. A certificate without the
  extension would be good for *any* purpose to a TLS library; with it, a TLS stack
  refuses a signing key presented in a handshake even before our own checks.

The CA key may live offline: every command that signs takes ``--ca-key PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import fcntl
import hashlib
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from gateway.directory import NAME_PATTERN, NetworkDirectory, load_directory
from gateway.errors import ConfigError

__all__ = [
    "DEFAULT_DAYS",
    "KEY_TYPES",
    "RESERVED_APP_NAMES",
    "REVOCATION_REASONS",
    "CertKind",
    "ForceMaterial",
    "InventoryEntry",
    "Issued",
    "PrivateKey",
    "Profile",
    "Revocation",
    "build_certificate",
    "build_crl",
    "ca_profile",
    "describe_certificate",
    "describe_crl",
    "fingerprint",
    "generate_key",
    "init_ca",
    "init_network",
    "inspect_certificate",
    "inventory",
    "issue",
    "leaf_profile",
    "publish_crl",
    "register_cli",
    "revoke",
    "spiffe_id_for",
]

_E = TypeVar("_E", bound=x509.ExtensionType)

#: The private keys this module makes and reads.
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class CertKind(enum.StrEnum):
    """What a certificate is for; each kind has one fixed profile."""

    CA = "ca"
    GATEWAY_TLS = "gateway-tls"
    GATEWAY_SIGNING = "gateway-signing"
    LOG_SIGNING = "log-signing"
    APP_CLIENT = "app-client"
    APP_SERVER = "app-server"


#: Key types by name, as ``--key-type`` takes them.
KEY_TYPES = ("p256", "ed25519")

#: Allowed key types per kind, the default first. TLS keys are P-256 (what every
#: gRPC TLS stack accepts); keys that only sign may be Ed25519.
_KEY_TYPES_BY_KIND: Mapping[CertKind, tuple[str, ...]] = MappingProxyType(
    {
        CertKind.CA: ("p256",),
        CertKind.GATEWAY_TLS: ("p256",),
        CertKind.GATEWAY_SIGNING: ("ed25519", "p256"),
        CertKind.LOG_SIGNING: ("ed25519",),
        CertKind.APP_CLIENT: ("p256",),
        CertKind.APP_SERVER: ("p256",),
    }
)

#: Default lifetime in days per kind: the CA long, leaves short.
DEFAULT_DAYS: Mapping[CertKind, int] = MappingProxyType(
    {
        CertKind.CA: 3650,
        CertKind.GATEWAY_TLS: 30,
        CertKind.GATEWAY_SIGNING: 30,
        CertKind.LOG_SIGNING: 365,
        CertKind.APP_CLIENT: 30,
        CertKind.APP_SERVER: 30,
    }
)

#: Upper bounds on lifetimes (bounded defaults: a typo must not mint a 100-year leaf).
_MAX_CA_DAYS = 7300
_MAX_LEAF_DAYS = 398
_MAX_CRL_DAYS = 366.0

#: not_before is set this far in the past, so a peer whose clock is a little behind
#: does not see a freshly issued certificate as not yet valid.
_BACKDATE = timedelta(minutes=5)

#: RFC 5280 section 5.3.1 reason names, as `revoke` takes them.
REVOCATION_REASONS: Mapping[str, x509.ReasonFlags] = MappingProxyType(
    {
        "unspecified": x509.ReasonFlags.unspecified,
        "keyCompromise": x509.ReasonFlags.key_compromise,
        "cACompromise": x509.ReasonFlags.ca_compromise,
        "affiliationChanged": x509.ReasonFlags.affiliation_changed,
        "superseded": x509.ReasonFlags.superseded,
        "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
        "certificateHold": x509.ReasonFlags.certificate_hold,
        "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    }
)
_REASON_NAMES = {flag: name for name, flag in REVOCATION_REASONS.items()}

#: id-kp-documentSigning (RFC 9336): the only EKU of keys that sign envelopes and checkpoints.
_OID_DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")
_EKU_OIDS: Mapping[str, x509.ObjectIdentifier] = MappingProxyType(
    {
        "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
        "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
        "documentSigning": _OID_DOCUMENT_SIGNING,
        "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
        "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
        "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
        "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
        "anyExtendedKeyUsage": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    }
)
_EKU_NAMES = {oid: name for name, oid in _EKU_OIDS.items()}

#: RFC 5280 key usage bit names, in bit order, and cryptography's attribute for each.
_KEY_USAGE_BITS = (
    ("digitalSignature", "digital_signature"),
    ("contentCommitment", "content_commitment"),
    ("keyEncipherment", "key_encipherment"),
    ("dataEncipherment", "data_encipherment"),
    ("keyAgreement", "key_agreement"),
    ("keyCertSign", "key_cert_sign"),
    ("cRLSign", "crl_sign"),
)

_SIGNATURE_NAMES: Mapping[x509.ObjectIdentifier, str] = MappingProxyType(
    {
        SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
        SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
        SignatureAlgorithmOID.ED25519: "ed25519",
        SignatureAlgorithmOID.RSA_WITH_SHA256: "sha256WithRSAEncryption",
    }
)

#: Application names the profiles give to other identities: ``gateway`` (``spiffe://<td>/gateway``, DNS
#: ``gateway.<td>``) and ``log`` (``spiffe://<td>/log``). An application so named would carry their names.
RESERVED_APP_NAMES = frozenset({"gateway", "log"})

_LOOPBACK = ("127.0.0.1", "::1")
_NETWORK_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_DNS_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_NAME_RE = re.compile(NAME_PATTERN)

_INVENTORY = "inventory.json"
_INVENTORY_FORMAT = "psngw-pki-inventory/1"
_LOCK = ".lock"


# -- values -------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate written to disk with its private key."""

    cert_path: Path
    key_path: Path
    serial: int
    fingerprint: str
    spiffe_id: str | None


@dataclass(frozen=True)
class Revocation:
    """One revoked serial, as the CRL lists it."""

    serial: int
    time: datetime
    reason: str


@dataclass(frozen=True)
class InventoryEntry:
    """One certificate a CA issued, with its state at a given time."""

    subject: str
    spiffe_id: str | None
    kind: str
    serial: int
    fingerprint: str
    not_before: datetime
    not_after: datetime
    days_left: int
    revoked: bool
    revocation_reason: str | None
    revoked_at: datetime | None
    cert_path: Path
    key_path: Path | None

    @property
    def expired(self) -> bool:
        """Whether not_after has passed (days_left below zero)."""
        return self.days_left < 0

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (serial in lower-case hex, times in ISO 8601 UTC)."""
        return {
            "subject": self.subject,
            "spiffe_id": self.spiffe_id,
            "kind": self.kind,
            "serial": _hex(self.serial),
            "fingerprint": self.fingerprint,
            "not_before": _iso(self.not_before),
            "not_after": _iso(self.not_after),
            "days_left": self.days_left,
            "revoked": self.revoked,
            "revocation_reason": self.revocation_reason,
            "revoked_at": _iso(self.revoked_at) if self.revoked_at else None,
            "cert_path": str(self.cert_path),
            "key_path": str(self.key_path) if self.key_path else None,
        }


@dataclass(frozen=True)
class ForceMaterial:
    """Everything `init_network` wrote for one force."""

    force: str
    ca_dir: Path
    ca: Path
    ca_key: Path
    crl: Path
    gateway_tls: Issued
    gateway_signing: Issued
    log_signing: Issued
    app_servers: Mapping[str, Issued] = field(default_factory=dict)
    app_clients: Mapping[str, Issued] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    """The content of a certificate apart from its key, issuer, serial and dates.

    `leaf_profile` and `ca_profile` give the fixed profile of each kind; test
    builders change fields with `dataclasses.replace` to make imposters.
    Key usages use the RFC 5280 bit names (``digitalSignature``...), extended
    key usages their short names (``serverAuth``, ``clientAuth``, ``documentSigning``).
    """

    kind: CertKind
    common_name: str
    organization: str
    organizational_unit: str | None
    uris: tuple[str, ...]
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    is_ca: bool = False
    path_length: int | None = None
    key_usage: frozenset[str] = frozenset({"digitalSignature"})
    extended_key_usage: tuple[str, ...] = ()


# -- the pure core: profiles, certificates, CRLs ------------------------------------


def spiffe_id_for(kind: CertKind, trust_domain: str, app: str | None = None) -> str:
    """The SPIFFE ID a certificate of `kind` carries in trust domain `trust_domain`."""
    if kind is CertKind.CA:
        return f"spiffe://{trust_domain}"
    if kind in (CertKind.GATEWAY_TLS, CertKind.GATEWAY_SIGNING):
        return f"spiffe://{trust_domain}/gateway"
    if kind is CertKind.LOG_SIGNING:
        return f"spiffe://{trust_domain}/log"
    if app is None:
        raise ValueError(f"a {kind} certificate needs an application name")
    return f"spiffe://{trust_domain}/app/{app}"


def ca_profile(*, trust_domain: str, display_name: str) -> Profile:
    """The profile of a force CA: CA:true pathlen:0, keyCertSign and cRLSign."""
    return Profile(
        kind=CertKind.CA,
        common_name=f"{display_name} CA",
        organization=display_name,
        organizational_unit=None,
        uris=(spiffe_id_for(CertKind.CA, trust_domain),),
        is_ca=True,
        path_length=0,
        key_usage=frozenset({"keyCertSign", "cRLSign"}),
    )


def leaf_profile(
    kind: CertKind,
    *,
    trust_domain: str,
    display_name: str,
    app: str | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> Profile:
    """The fixed profile of a leaf of `kind`; raises ValueError on arguments it does not take.

    Names are normalised (DNS names to lower case, IP addresses to their
    canonical text) and de-duplicated in order; loopback IPs come first on server
    certificates.

    A DNS name under the network (``<network>``, the trust domain without its force
    label) names an identity: ``gateway.<td>`` the gateway, ``<app>.<td>`` an
    application. Clients check only the CA and that name (grpcio cannot check the
    URI SAN), so a certificate carrying another identity's name would be accepted
    as it. A server certificate therefore carries exactly one name under the
    network, its own, and extra ``--dns`` names only outside it; application names
    in `RESERVED_APP_NAMES` are refused.
    """
    kind = CertKind(kind)
    if kind is CertKind.CA:
        raise ValueError("the CA is made by init_ca, not issued")
    takes_app = kind in (CertKind.APP_CLIENT, CertKind.APP_SERVER)
    takes_names = kind in (CertKind.GATEWAY_TLS, CertKind.APP_SERVER)
    if takes_app:
        if not app or not _NAME_RE.fullmatch(app):
            raise ValueError(f"a {kind} certificate needs --app NAME (lower-case letters, digits, '-'), got {app!r}")
        if app in RESERVED_APP_NAMES:
            raise ValueError(
                f"--app {app}: the name is reserved (spiffe://{trust_domain}/{app} is not an application); "
                "choose another application name"
            )
    elif app is not None:
        raise ValueError(f"a {kind} certificate does not take an application name")
    if not takes_names and (dns_names or ip_addresses):
        raise ValueError(f"a {kind} certificate takes no DNS or IP names")
    dns = tuple(dict.fromkeys(_check_dns(n) for n in dns_names))
    ips = tuple(dict.fromkeys(_check_ip(a) for a in ip_addresses))
    if takes_names:
        own = f"gateway.{trust_domain}" if kind is CertKind.GATEWAY_TLS else f"{app}.{trust_domain}"
        _check_extra_dns(dns, own=own, trust_domain=trust_domain)
    uri = spiffe_id_for(kind, trust_domain, app)
    signing = frozenset({"digitalSignature", "contentCommitment"})
    loopback = tuple(dict.fromkeys((*_LOOPBACK, *ips)))
    if kind is CertKind.GATEWAY_TLS:
        return Profile(
            kind=kind,
            common_name="gateway",
            organization=display_name,
            organizational_unit=str(kind),
            uris=(uri,),
            dns_names=tuple(dict.fromkeys((f"gateway.{trust_domain}", *dns))),
            ip_addresses=loopback,
            extended_key_usage=("serverAuth", "clientAuth"),
        )
    if kind in (CertKind.GATEWAY_SIGNING, CertKind.LOG_SIGNING):
        return Profile(
            kind=kind,
            common_name="gateway signing" if kind is CertKind.GATEWAY_SIGNING else "audit log",
            organization=display_name,
            organizational_unit=str(kind),
            uris=(uri,),
            key_usage=signing,
            extended_key_usage=("documentSigning",),
        )
    if kind is CertKind.APP_CLIENT:
        return Profile(
            kind=kind,
            common_name=f"{app} client",
            organization=display_name,
            organizational_unit=str(kind),
            uris=(uri,),
            extended_key_usage=("clientAuth",),
        )
    return Profile(
        kind=kind,
        common_name=f"{app} server",
        organization=display_name,
        organizational_unit=str(kind),
        uris=(uri,),
        dns_names=tuple(dict.fromkeys((f"{app}.{trust_domain}", *dns))),
        ip_addresses=loopback,
        extended_key_usage=("serverAuth",),
    )


def generate_key(key_type: str = "p256") -> PrivateKey:
    """A fresh private key: ``p256`` (ECDSA on NIST P-256) or ``ed25519``."""
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}; one of: {', '.join(KEY_TYPES)}")


def build_certificate(
    profile: Profile,
    *,
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    issuer: x509.Certificate | None,
    issuer_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
    serial: int | None = None,
) -> x509.Certificate:
    """Sign a certificate with `profile`'s content; `issuer` None means self-signed.

    Every certificate gets basicConstraints and keyUsage (both critical) and a
    SubjectKeyIdentifier; every leaf and every certificate with an issuer gets an
    AuthorityKeyIdentifier. The serial is random, 159 bits, unless given.
    """
    subject = _name(profile)
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=profile.is_ca, path_length=profile.path_length), critical=True)
        .add_extension(_key_usage(profile.key_usage), critical=True)
        .add_extension(ski, critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(_aki_of(issuer), critical=False)
    elif not profile.is_ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    if profile.extended_key_usage:
        usages = [_EKU_OIDS.get(name) or x509.ObjectIdentifier(name) for name in profile.extended_key_usage]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in profile.uris]
    sans += [x509.DNSName(d) for d in profile.dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in profile.ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, _digest_for(issuer_key))


def build_crl(
    ca: x509.Certificate,
    ca_key: PrivateKey,
    revocations: Sequence[Revocation],
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """An X.509 v2 CRL signed by the CA: CRL number, AKI, and a reason on each entry.

    Following RFC 5280 section 5.3.1, an entry revoked for ``unspecified`` carries
    no reason code extension; every other entry carries its reason.
    """
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki_of(ca), critical=False)
    )
    for rev in revocations:
        entry = x509.RevokedCertificateBuilder().serial_number(rev.serial).revocation_date(rev.time)
        flag = REVOCATION_REASONS[rev.reason]
        if flag is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, _digest_for(ca_key))


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lower-case hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def describe_certificate(cert: x509.Certificate, *, now: datetime | None = None) -> dict[str, object]:
    """What an operator needs to know about a certificate, as a JSON-ready dict."""
    at = _now(now)
    bc = _ext(cert, x509.BasicConstraints)
    ku = _ext(cert, x509.KeyUsage)
    eku = _ext(cert, x509.ExtendedKeyUsage)
    san = _ext(cert, x509.SubjectAlternativeName)
    ski = _ext(cert, x509.SubjectKeyIdentifier)
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san else []
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": _hex(cert.serial_number),
        "fingerprint": fingerprint(cert),
        "kind": _infer_kind(cert),
        "spiffe_id": spiffe[0] if len(spiffe) == 1 and len(uris) == 1 else None,
        "uris": uris,
        "dns_names": san.get_values_for_type(x509.DNSName) if san else [],
        "ip_addresses": [str(a) for a in san.get_values_for_type(x509.IPAddress)] if san else [],
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "days_left": _days_left(cert.not_valid_after_utc, at),
        "expired": at > cert.not_valid_after_utc,
        "not_yet_valid": at < cert.not_valid_before_utc,
        "is_ca": bool(bc and bc.ca),
        "path_length": bc.path_length if bc else None,
        "key_usage": _key_usage_names(ku) if ku else [],
        "extended_key_usage": [_EKU_NAMES.get(o, o.dotted_string) for o in eku] if eku else [],
        "key_type": _key_type(cert.public_key()),
        "signature_algorithm": _SIGNATURE_NAMES.get(
            cert.signature_algorithm_oid, cert.signature_algorithm_oid.dotted_string
        ),
        "subject_key_identifier": ski.digest.hex() if ski else None,
        "authority_key_identifier": aki.key_identifier.hex() if aki and aki.key_identifier else None,
        "self_signed": _is_issued_by(cert, cert),
    }


def describe_crl(crl: x509.CertificateRevocationList, *, now: datetime | None = None) -> dict[str, object]:
    """What an operator needs to know about a CRL, as a JSON-ready dict."""
    at = _now(now)
    number = _crl_ext(crl, x509.CRLNumber)
    next_update = crl.next_update_utc
    entries = []
    for rev in crl:
        reason = _crl_entry_reason(rev)
        entries.append({"serial": _hex(rev.serial_number), "time": _iso(rev.revocation_date_utc), "reason": reason})
    return {
        "type": "crl",
        "issuer": crl.issuer.rfc4514_string(),
        "crl_number": number.crl_number if number else None,
        "this_update": _iso(crl.last_update_utc),
        "next_update": _iso(next_update) if next_update else None,
        "stale": next_update is None or at > next_update,
        "revoked": entries,
    }


# -- the CA directory ---------------------------------------------------------------


def init_ca(
    ca_dir: Path,
    *,
    force: str,
    network: str,
    display_name: str | None = None,
    days: int = 3650,
    overwrite: bool = False,
    now: datetime | None = None,
) -> Issued:
    """Make a force's CA in `ca_dir`: ca.pem, ca.key (0600), an empty crl.pem and inventory.json.

    Existing files are a `ConfigError` unless `overwrite` (which starts a new CA:
    the old inventory is replaced).
    """
    ca_dir = Path(ca_dir)
    at = _now(now)
    plan = _CaPlan.single(ca_dir, force=force, network=network, display_name=display_name, days=days)
    plan.check_free(overwrite)
    with _locked(ca_dir):
        state = plan.create(at, overwrite=overwrite)
        state.publish_crl(state.key, now=at, next_update_days=7)
        state.save()
        _fsync_dir(ca_dir)
    return state.ca_issued


def issue(
    ca_dir: Path,
    kind: CertKind,
    *,
    out_stem: Path,
    app: str | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int | None = None,
    key_type: str | None = None,
    ca_key: Path | None = None,
    overwrite: bool = False,
    now: datetime | None = None,
    not_before: datetime | None = None,
) -> Issued:
    """Issue a leaf of `kind` from the CA in `ca_dir`, writing ``<out_stem>.key`` and ``<out_stem>.pem``.

    The certificate is valid from `not_before` (default: `now` less five minutes,
    for clock skew) until `not_before` or `now` plus `days` (the kind's default).
    It must not outlive the CA. The inventory records it.
    """
    at = _now(now)
    start = _now(not_before) if not_before is not None else None
    with _locked(Path(ca_dir)):
        state = _CaState.open(Path(ca_dir))
        key = state.load_key(ca_key)
        issued = state.issue(
            key,
            _kind(kind),
            out_stem=Path(out_stem),
            app=app,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            days=days,
            key_type=key_type,
            overwrite=overwrite,
            now=at,
            not_before=start,
        )
        state.save()
    return issued


def revoke(
    ca_dir: Path,
    *,
    serial: int | None = None,
    cert_path: Path | None = None,
    reason: str = "unspecified",
    ca_key: Path | None = None,
    now: datetime | None = None,
) -> None:
    """Revoke a certificate this CA issued (by serial or by its file) and republish the CRL.

    A serial must be in the inventory; a certificate file must verify as issued by
    this CA (and is added to the inventory if it was missing). Revoking again
    updates the reason and keeps the first revocation time. The CRL keeps the
    next-update interval it was last published with.
    """
    at = _now(now)
    if (serial is None) == (cert_path is None):
        raise ConfigError("give exactly one of a serial or a certificate file to revoke", field="revoke")
    if reason not in REVOCATION_REASONS:
        raise ConfigError(f"unknown reason {reason!r}; one of: {', '.join(REVOCATION_REASONS)}", field="reason")
    with _locked(Path(ca_dir)):
        state = _CaState.open(Path(ca_dir))
        key = state.load_key(ca_key)
        if cert_path is not None:
            cert = _load_certificate(Path(cert_path))
            if not _is_issued_by(cert, state.cert):
                raise ConfigError(f"not issued by the CA in {state.ca_dir}", file=cert_path)
            serial = cert.serial_number
            if not state.has_issued(serial):  # ours (the signature says so) but missing from the inventory
                state.record(_infer_kind(cert), cert, Path(cert_path), None)
        if serial is None:  # unreachable: exactly one of the two was given
            raise ConfigError("no serial to revoke", field="serial")
        state.revoke(serial, reason, at)
        state.publish_crl(key, now=at, next_update_days=state.next_update_days)
        state.save()


def publish_crl(
    ca_dir: Path,
    *,
    next_update_days: float = 7,
    ca_key: Path | None = None,
    now: datetime | None = None,
) -> Path:
    """Sign and write a fresh CRL (next CRL number, thisUpdate now); return its path.

    Run it well before the last CRL's nextUpdate: gateways refuse a force's
    certificates once its CRL is stale.
    """
    at = _now(now)
    with _locked(Path(ca_dir)):
        state = _CaState.open(Path(ca_dir))
        key = state.load_key(ca_key)
        path = state.publish_crl(key, now=at, next_update_days=next_update_days)
        state.save()
    return path


def inventory(ca_dir: Path, *, now: datetime | None = None) -> list[InventoryEntry]:
    """Every certificate the CA in `ca_dir` issued, the CA first, with days left and revocation."""
    return _CaState.open(Path(ca_dir)).entries(_now(now))


def inspect_certificate(path: Path, *, now: datetime | None = None) -> dict[str, object]:
    """`describe_certificate` for the first certificate in a PEM file, plus its path and chain length."""
    certs = _load_certificates(Path(path))
    out = describe_certificate(certs[0], now=now)
    out["path"] = str(path)
    out["chain_length"] = len(certs)
    return out


def init_network(
    directory: NetworkDirectory,
    *,
    overwrite: bool = False,
    now: datetime | None = None,
    signing_key_type: str | None = None,
) -> dict[str, ForceMaterial]:
    """Make the whole PKI of a network directory: for every force, its CA and every leaf it needs.

    Each force's CA directory is the folder of its ``ca`` path: the CA certificate
    goes exactly there, the CRL exactly at its ``crl`` path (``crl.pem`` beside the
    CA if unset), and the key, inventory and leaves beside it: ``gateway-tls``,
    ``gateway-signing``, ``log-signing``, ``app-<name>-server`` for each application
    the force hosts and ``app-<name>-client`` for each of its ``clients``. Nothing is
    written if any file exists and `overwrite` is false. `signing_key_type` (``ed25519``,
    the default, or ``p256``) is the key type of the gateways' envelope-signing keys.
    """
    at = _now(now)
    plans: dict[str, _CaPlan] = {}
    seen: dict[Path, str] = {}
    for force in directory.forces.values():
        ca_dir = force.ca_path.parent
        where = ca_dir.resolve()
        if where in seen:
            raise ConfigError(
                f"forces {seen[where]} and {force.name} keep their CA in the same folder {ca_dir}; give each its own",
                file=directory.path,
                field=f"forces.{force.name}.ca",
            )
        seen[where] = force.name
        hosted = tuple(a.name for a in directory.applications.values() if a.host == force.name)
        plans[force.name] = _CaPlan(
            ca_dir=ca_dir,
            force=force.name,
            network=directory.network,
            display_name=force.display_name,
            days=DEFAULT_DAYS[CertKind.CA],
            cert_path=force.ca_path,
            crl_path=force.crl_path or ca_dir / "crl.pem",
            servers=hosted,
            clients=force.clients,
            signing_key_type=signing_key_type,
        )
    for plan in plans.values():
        plan.check_free(overwrite)
    return {name: plan.make_all(at, overwrite=overwrite) for name, plan in plans.items()}


# -- internals: the CA directory state ---------------------------------------------------


@dataclass
class _CaPlan:
    """What one CA directory will hold, before anything is written."""

    ca_dir: Path
    force: str
    network: str
    display_name: str
    days: int
    cert_path: Path
    crl_path: Path
    servers: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    signing_key_type: str | None = None

    @classmethod
    def single(cls, ca_dir: Path, *, force: str, network: str, display_name: str | None, days: int) -> _CaPlan:
        return cls(ca_dir, force, network, display_name or force, days, ca_dir / "ca.pem", ca_dir / "crl.pem")

    def leaf_stems(self) -> list[tuple[CertKind, str | None, str]]:
        stems: list[tuple[CertKind, str | None, str]] = [
            (CertKind.GATEWAY_TLS, None, "gateway-tls"),
            (CertKind.GATEWAY_SIGNING, None, "gateway-signing"),
            (CertKind.LOG_SIGNING, None, "log-signing"),
        ]
        stems += [(CertKind.APP_SERVER, a, f"app-{a}-server") for a in self.servers]
        stems += [(CertKind.APP_CLIENT, a, f"app-{a}-client") for a in self.clients]
        return stems

    def check_free(self, overwrite: bool) -> None:
        """Validate the names and, unless overwriting, refuse if any file exists."""
        if not _NAME_RE.fullmatch(self.force):
            raise ConfigError(f"force name {self.force!r} must be lower-case letters, digits and '-'", field="force")
        if not _NETWORK_RE.fullmatch(self.network) or len(self.network) > 200:
            raise ConfigError(f"network {self.network!r} must be a lower-case DNS-style name", field="network")
        if not 0 < len(self.display_name) <= 61:
            raise ConfigError("display name must be 1 to 61 characters", field="name")
        if not 1 <= self.days <= _MAX_CA_DAYS:
            raise ConfigError(f"CA lifetime must be 1 to {_MAX_CA_DAYS} days, got {self.days}", field="days")
        if overwrite:
            return
        paths = [self.cert_path, self.ca_dir / "ca.key", self.ca_dir / _INVENTORY, self.crl_path]
        for _kind, _app, stem in self.leaf_stems():
            paths += [self.ca_dir / f"{stem}.key", self.ca_dir / f"{stem}.pem"]
        for path in paths:
            if path.exists():
                raise ConfigError("already exists; pass --overwrite to replace it", file=path)

    def create(self, at: datetime, *, overwrite: bool) -> _CaState:
        """Write the CA key and certificate; return the state (inventory not yet saved)."""
        self.ca_dir.mkdir(parents=True, exist_ok=True)
        key_path = self.ca_dir / "ca.key"
        _refuse_key_in_git(key_path)
        key = generate_key("p256")
        td = f"{self.force}.{self.network}"
        cert = build_certificate(
            ca_profile(trust_domain=td, display_name=self.display_name),
            public_key=key.public_key(),
            issuer=None,
            issuer_key=key,
            not_before=at - _BACKDATE,
            not_after=at + timedelta(days=self.days),
        )
        _write_private_key(key_path, key, overwrite=overwrite)
        self.cert_path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
        data: dict[str, Any] = {
            "format": _INVENTORY_FORMAT,
            "force": self.force,
            "network": self.network,
            "trust_domain": td,
            "display_name": self.display_name,
            "ca_cert": _rel(self.cert_path, self.ca_dir),
            "crl": _rel(self.crl_path, self.ca_dir),
            "crl_number": 0,
            "crl_next_update_days": 7,
            "certificates": [],
            "revocations": [],
        }
        state = _CaState(self.ca_dir, data, cert, key)
        state.record(CertKind.CA, cert, self.cert_path, key_path)
        return state

    def make_all(self, at: datetime, *, overwrite: bool) -> ForceMaterial:
        """The CA, its CRL and every leaf of the plan, with one inventory write."""
        with _locked(self.ca_dir):
            state = self.create(at, overwrite=overwrite)
            made: dict[str, Issued] = {}
            for kind, app, stem in self.leaf_stems():
                key_type = self.signing_key_type if kind is CertKind.GATEWAY_SIGNING else None
                made[stem] = state.issue(
                    state.key,
                    kind,
                    out_stem=self.ca_dir / stem,
                    app=app,
                    key_type=key_type,
                    overwrite=overwrite,
                    now=at,
                )
            crl = state.publish_crl(state.key, now=at, next_update_days=7)
            state.save()
            _fsync_dir(self.ca_dir)
        return ForceMaterial(
            force=self.force,
            ca_dir=self.ca_dir,
            ca=self.cert_path,
            ca_key=self.ca_dir / "ca.key",
            crl=crl,
            gateway_tls=made["gateway-tls"],
            gateway_signing=made["gateway-signing"],
            log_signing=made["log-signing"],
            app_servers=MappingProxyType({a: made[f"app-{a}-server"] for a in self.servers}),
            app_clients=MappingProxyType({a: made[f"app-{a}-client"] for a in self.clients}),
        )


class _CaState:
    """A CA directory loaded in memory: its certificate, inventory and (once loaded) key."""

    def __init__(self, ca_dir: Path, data: dict[str, Any], cert: x509.Certificate, key: PrivateKey | None) -> None:
        self.ca_dir = ca_dir
        self.data = data
        self.cert = cert
        self._key = key
        self.inventory_path = ca_dir / _INVENTORY

    @classmethod
    def open(cls, ca_dir: Path) -> _CaState:
        path = ca_dir / _INVENTORY
        if not path.exists():
            raise ConfigError(f"not a CA directory (no {_INVENTORY}); make one with `psngw pki init`", file=ca_dir)
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"unreadable inventory: {exc}", file=path) from exc
        if not isinstance(data, dict) or data.get("format") != _INVENTORY_FORMAT:
            raise ConfigError(f"not a {_INVENTORY_FORMAT} inventory", file=path)
        for key, kind in (
            ("trust_domain", str),
            ("display_name", str),
            ("ca_cert", str),
            ("crl", str),
            ("crl_number", int),
            ("certificates", list),
            ("revocations", list),
        ):
            if not isinstance(data.get(key), kind):
                raise ConfigError(f"inventory field {key!r} is missing or of the wrong type", file=path)
        cert = _load_certificate(ca_dir / data["ca_cert"])
        return cls(ca_dir, data, cert, None)

    # -- facts -------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return str(self.data["trust_domain"])

    @property
    def crl_path(self) -> Path:
        return self.ca_dir / str(self.data["crl"])

    @property
    def next_update_days(self) -> float:
        value = self.data.get("crl_next_update_days", 7)
        return float(value) if isinstance(value, int | float) else 7.0

    @property
    def key(self) -> PrivateKey:
        if self._key is None:
            raise RuntimeError("the CA key is not loaded (call load_key first)")
        return self._key

    @property
    def ca_issued(self) -> Issued:
        rec = self.data["certificates"][0]
        return Issued(
            cert_path=self.ca_dir / rec["cert_path"],
            key_path=self.ca_dir / rec["key_path"],
            serial=self.cert.serial_number,
            fingerprint=fingerprint(self.cert),
            spiffe_id=spiffe_id_for(CertKind.CA, self.trust_domain),
        )

    def load_key(self, ca_key: Path | None) -> PrivateKey:
        """Read the CA key (default ``<ca_dir>/ca.key``) and check it is the CA certificate's key."""
        path = Path(ca_key) if ca_key is not None else self.ca_dir / "ca.key"
        if not path.exists():
            raise ConfigError("CA key not found (kept offline? pass --ca-key PATH)", file=path)
        key = _load_private_key(path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("the CA key must be an ECDSA P-256 key", file=path)
        if not _same_public_key(key, self.cert):
            raise ConfigError(
                f"this key does not match the CA certificate {self.ca_dir / self.data['ca_cert']}", file=path
            )
        self._key = key
        return key

    # -- changes -----------------------------------------------------------------------

    def issue(
        self,
        ca_key: PrivateKey,
        kind: CertKind,
        *,
        out_stem: Path,
        app: str | None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        days: int | None = None,
        key_type: str | None = None,
        overwrite: bool = False,
        now: datetime,
        not_before: datetime | None = None,
    ) -> Issued:
        if kind is CertKind.CA:
            raise ConfigError("the CA is made with `psngw pki init`, not issued", field="kind")
        allowed = _KEY_TYPES_BY_KIND[kind]
        key_type = key_type or allowed[0]
        if key_type not in allowed:
            raise ConfigError(f"a {kind} key must be {' or '.join(allowed)}, not {key_type!r}", field="key-type")
        lifetime = DEFAULT_DAYS[kind] if days is None else days
        if not 1 <= lifetime <= _MAX_LEAF_DAYS:
            raise ConfigError(f"a leaf lifetime must be 1 to {_MAX_LEAF_DAYS} days, got {lifetime}", field="days")
        if out_stem.suffix in (".pem", ".key", ".crt"):
            raise ConfigError("give the output stem without an extension (writes STEM.key and STEM.pem)", file=out_stem)
        try:
            profile = leaf_profile(
                kind,
                trust_domain=self.trust_domain,
                display_name=str(self.data["display_name"]),
                app=app,
                dns_names=dns_names,
                ip_addresses=ip_addresses,
            )
        except ValueError as exc:
            raise ConfigError(str(exc), field=str(kind)) from exc
        self.check_names_free(profile, now)
        start = not_before if not_before is not None else now - _BACKDATE
        end = (not_before if not_before is not None else now) + timedelta(days=lifetime)
        if end > self.cert.not_valid_after_utc:
            raise ConfigError(
                f"the certificate would outlive its CA (CA expires {_iso(self.cert.not_valid_after_utc)})",
                file=self.ca_dir / self.data["ca_cert"],
            )
        if now > self.cert.not_valid_after_utc:
            raise ConfigError("the CA certificate has expired", file=self.ca_dir / self.data["ca_cert"])
        key_path = Path(f"{out_stem}.key")
        cert_path = Path(f"{out_stem}.pem")
        for path in (key_path, cert_path):
            if path.exists() and not overwrite:
                raise ConfigError("already exists; pass --overwrite to replace it", file=path)
        key_path.parent.mkdir(parents=True, exist_ok=True)
        _refuse_key_in_git(key_path)
        key = generate_key(key_type)
        cert = build_certificate(
            profile, public_key=key.public_key(), issuer=self.cert, issuer_key=ca_key, not_before=start, not_after=end
        )
        _write_private_key(key_path, key, overwrite=overwrite)
        _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
        self.record(kind, cert, cert_path, key_path)
        return Issued(cert_path, key_path, cert.serial_number, fingerprint(cert), profile.uris[0])

    def check_names_free(self, profile: Profile, at: datetime) -> None:
        """Refuse a DNS name that an unrevoked, unexpired certificate of another identity from this CA carries.

        Names outside the network (``--dns``) are the operator's choice; this keeps
        two identities from sharing one, so a backend cannot be issued the name a
        gateway or another backend is verified by. Records from before the inventory
        kept DNS names have none to compare.
        """
        revoked = {r.serial for r in self.revocations()}
        for rec in self.data["certificates"]:
            taken = [n for n in profile.dns_names if n in (rec.get("dns_names") or ())]
            if not taken or rec.get("spiffe_id") == profile.uris[0]:
                continue
            serial = int(rec["serial"], 16)
            if serial in revoked or _parse_iso(rec["not_after"]) <= at:
                continue
            raise ConfigError(
                f"--dns {taken[0]}: {rec.get('spiffe_id')} (serial {_hex(serial)}, until {rec['not_after']}) "
                "carries that name; revoke it first or choose another name",
                field="dns",
            )

    def has_issued(self, serial: int) -> bool:
        return any(int(rec["serial"], 16) == serial for rec in self.data["certificates"])

    def record(self, kind: str, cert: x509.Certificate, cert_path: Path, key_path: Path | None) -> None:
        san = _ext(cert, x509.SubjectAlternativeName)
        uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san else []
        self.data["certificates"].append(
            {
                "serial": _hex(cert.serial_number),
                "kind": str(kind),
                "spiffe_id": uris[0] if uris else None,
                "dns_names": san.get_values_for_type(x509.DNSName) if san else [],
                "subject": cert.subject.rfc4514_string(),
                "fingerprint": fingerprint(cert),
                "not_before": _iso(cert.not_valid_before_utc),
                "not_after": _iso(cert.not_valid_after_utc),
                "cert_path": _rel(cert_path, self.ca_dir),
                "key_path": _rel(key_path, self.ca_dir) if key_path is not None else None,
            }
        )

    def revoke(self, serial: int, reason: str, at: datetime) -> None:
        if serial == self.cert.serial_number:
            raise ConfigError(
                "that is the CA's own certificate; a CA cannot revoke itself (make a new CA)", field="serial"
            )
        if not self.has_issued(serial):
            raise ConfigError(f"serial {_hex(serial)} is not in this CA's inventory", file=self.inventory_path)
        for rec in self.data["revocations"]:
            if int(rec["serial"], 16) == serial:
                rec["reason"] = reason
                return
        self.data["revocations"].append({"serial": _hex(serial), "time": _iso(at), "reason": reason})

    def revocations(self) -> list[Revocation]:
        return [
            Revocation(int(r["serial"], 16), _parse_iso(r["time"]), str(r["reason"])) for r in self.data["revocations"]
        ]

    def publish_crl(self, ca_key: PrivateKey, *, now: datetime, next_update_days: float) -> Path:
        if not 0 < next_update_days <= _MAX_CRL_DAYS:
            raise ConfigError(
                f"next update must be more than 0 and at most {_MAX_CRL_DAYS:g} days", field="next-update-days"
            )
        number = int(self.data["crl_number"]) + 1
        crl = build_crl(
            self.cert,
            ca_key,
            self.revocations(),
            number=number,
            this_update=now,
            next_update=now + timedelta(days=next_update_days),
        )
        self.crl_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_replace(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
        self.data["crl_number"] = number
        self.data["crl_next_update_days"] = next_update_days
        self.data["crl_this_update"] = _iso(now)
        self.data["crl_next_update"] = _iso(now + timedelta(days=next_update_days))
        return self.crl_path

    def save(self) -> None:
        text = json.dumps(self.data, indent=2, sort_keys=False) + "\n"
        _atomic_replace(self.inventory_path, text.encode("utf-8"), mode=0o644)

    # -- reading -----------------------------------------------------------------------

    def entries(self, at: datetime) -> list[InventoryEntry]:
        revoked = {r.serial: r for r in self.revocations()}
        out = []
        for rec in self.data["certificates"]:
            try:
                serial = int(rec["serial"], 16)
                not_after = _parse_iso(rec["not_after"])
                rev = revoked.get(serial)
                out.append(
                    InventoryEntry(
                        subject=str(rec["subject"]),
                        spiffe_id=rec.get("spiffe_id"),
                        kind=str(rec["kind"]),
                        serial=serial,
                        fingerprint=str(rec["fingerprint"]),
                        not_before=_parse_iso(rec["not_before"]),
                        not_after=not_after,
                        days_left=_days_left(not_after, at),
                        revoked=rev is not None,
                        revocation_reason=rev.reason if rev else None,
                        revoked_at=rev.time if rev else None,
                        cert_path=self.ca_dir / rec["cert_path"],
                        key_path=self.ca_dir / rec["key_path"] if rec.get("key_path") else None,
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"malformed certificate record: {exc!r}", file=self.inventory_path) from exc
        return out


# -- internals: files -----------------------------------------------------------------


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    """One writer per CA directory at a time (an advisory lock on ``<ca_dir>/.lock``)."""
    ca_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(ca_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_private_key(path: Path, key: PrivateKey, *, overwrite: bool) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if overwrite:
        _atomic_replace(path, pem, mode=0o600)
    else:
        _write_new(path, pem, mode=0o600)


def _write_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    if overwrite:
        _atomic_replace(path, data, mode=0o644)
    else:
        _write_new(path, data, mode=0o644)


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create `path` (never replacing a file) with exactly `mode`, and flush it to disk."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise ConfigError("already exists; pass --overwrite to replace it", file=path) from exc
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc.strerror or exc}", file=path) from exc
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exact
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_replace(path: Path, data: bytes, *, mode: int) -> None:
    """Replace `path` atomically: a temporary file beside it, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"cannot write: {exc.strerror or exc}", file=path) from exc
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_key_in_git(path: Path) -> None:
    """Refuse to write a private key into a git work tree unless git ignores it there."""
    here = path.parent.resolve()
    root = next((d for d in (here, *here.parents) if (d / ".git").exists()), None)
    if root is None:
        return
    git = shutil.which("git")
    if git is None:
        raise ConfigError(
            f"inside the git work tree {root} and git is not installed to check it is ignored; "
            "write private keys outside the work tree",
            file=path,
        )
    target = here / path.name
    result = subprocess.run(  # noqa: S603 -- fixed argv from shutil.which, no shell
        [git, "-C", str(root), "check-ignore", "-q", "--", str(target)],
        capture_output=True,
        check=False,
        timeout=10,
    )
    if result.returncode != 0:
        raise ConfigError(
            f"refusing to write a private key into the git work tree {root} where git does not "
            "ignore it; write it elsewhere or ignore it in .gitignore",
            file=path,
        )


def _load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=path) from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError("not a PEM certificate", file=path) from exc
    return certs


def _load_certificate(path: Path) -> x509.Certificate:
    return _load_certificates(path)[0]


def _load_private_key(path: Path) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=path) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise ConfigError("encrypted private keys are not supported", file=path) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError("not a PEM private key", file=path) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise ConfigError(f"unsupported key type {type(key).__name__}; P-256 or Ed25519 only", file=path)
    return key


def _same_public_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki))


# -- internals: small helpers ----------------------------------------------------------


def _now(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC).replace(microsecond=0)
    if value.tzinfo is None:
        raise ValueError("times must be timezone-aware (use datetime.now(UTC))")
    return value.astimezone(UTC).replace(microsecond=0)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _hex(serial: int) -> str:
    return format(serial, "x")


def _parse_serial(text: str) -> int:
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or not re.fullmatch(r"[0-9a-f]{1,40}", cleaned):
        raise ConfigError(f"serial {text!r} is not hexadecimal", field="serial")
    return int(cleaned, 16)


def _days_left(not_after: datetime, at: datetime) -> int:
    return math.floor((not_after - at).total_seconds() / 86400)


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _check_dns(name: str) -> str:
    low = name.strip().lower().rstrip(".")
    if len(low) > 253 or not _DNS_RE.fullmatch(low):
        raise ValueError(f"{name!r} is not a DNS name (letters, digits, '-', dots; no wildcards)")
    return low


def _check_extra_dns(names: Sequence[str], *, own: str, trust_domain: str) -> None:
    """Refuse a name under the network other than `own`: it names another identity (see `leaf_profile`)."""
    network = trust_domain.partition(".")[2] or trust_domain
    for name in names:
        if name == own or not (name == network or name.endswith(f".{network}")):
            continue
        if name == f"gateway.{trust_domain}":
            whose = "the force's gateway (only a gateway-tls certificate carries it)"
        elif name.endswith(f".{trust_domain}"):
            whose = f"another identity of {trust_domain} (<app>.{trust_domain} is application <app>'s)"
        else:
            whose = f"an identity of the network {network} (names under it are <app or gateway>.<force>.{network})"
        raise ValueError(
            f"--dns {name}: that name belongs to {whose}; this certificate carries {own} and may add only "
            f"names outside {network}"
        )


def _check_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an IP address") from exc


def _name(profile: Profile) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, profile.organization)]
    if profile.organizational_unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, profile.organizational_unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, profile.common_name))
    return x509.Name(attrs)


def _key_usage(names: frozenset[str]) -> x509.KeyUsage:
    unknown = names - {n for n, _ in _KEY_USAGE_BITS}
    if unknown:
        raise ValueError(f"unknown key usage {sorted(unknown)}")
    flags = {attr: name in names for name, attr in _KEY_USAGE_BITS}
    return x509.KeyUsage(**flags, encipher_only=False, decipher_only=False)


def _key_usage_names(ku: x509.KeyUsage) -> list[str]:
    return [name for name, attr in _KEY_USAGE_BITS if getattr(ku, attr)]


def _aki_of(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = _ext(issuer, x509.SubjectKeyIdentifier)
    if ski is not None:
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]  # issuers here are EC or Ed25519


def _digest_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _ext(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _crl_ext(crl: x509.CertificateRevocationList, kind: type[_E]) -> _E | None:
    try:
        return crl.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    number = _crl_ext(crl, x509.CRLNumber)
    return number.crl_number if number else None


def _crl_entry_reason(rev: x509.RevokedCertificate) -> str:
    try:
        flag = rev.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return "unspecified"
    return _REASON_NAMES.get(flag, flag.value)


def _key_type(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "p256" if isinstance(key.curve, ec.SECP256R1) else f"ec-{key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return type(key).__name__


def _is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _infer_kind(cert: x509.Certificate) -> str:
    """The kind from the OU this module writes, else from the extensions; ``unknown`` if neither fits."""
    ou = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if len(ou) == 1 and ou[0] in CertKind.__members__.values():
        return str(ou[0])
    bc = _ext(cert, x509.BasicConstraints)
    if bc is not None and bc.ca:
        return str(CertKind.CA)
    eku = set(_ext(cert, x509.ExtendedKeyUsage) or ())
    tls = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    if eku >= tls:
        return str(CertKind.GATEWAY_TLS)
    if ExtendedKeyUsageOID.CLIENT_AUTH in eku:
        return str(CertKind.APP_CLIENT)
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        return str(CertKind.APP_SERVER)
    return "unknown"


def _kind(kind: object) -> CertKind:
    try:
        return CertKind(str(kind))
    except ValueError:
        kinds = ", ".join(k for k in CertKind if k is not CertKind.CA)
        raise ConfigError(f"unknown certificate kind {kind!r}; one of: {kinds}", field="kind") from None


# -- the `psngw pki` command group ------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``psngw pki`` and its commands to the top-level parser."""
    pki = subparsers.add_parser(
        "pki",
        help="a force's certificate authority: init, issue, revoke, crl, list, inspect",
        description="Run one force's certificate authority (its trust domain), or make the demo PKI of a network.",
    )
    sub = pki.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "init",
        help="make a force CA, or the whole demo PKI of a network directory",
        description="With --ca-dir: make one force's CA (ca.pem, ca.key 0600, crl.pem, inventory.json). "
        "With --network-dir or --directory: read the network directory and make, for every force, its CA, "
        "CRL, gateway TLS and signing certificates, audit-log key and application certificates.",
    )
    p.add_argument("--ca-dir", type=Path, help="the CA directory to create (one force)")
    p.add_argument("--force", help="the force's name, e.g. thames-valley (with --ca-dir)")
    p.add_argument("--network", help="the network's name, e.g. se.psn (with --ca-dir)")
    p.add_argument("--name", help="the force's display name, e.g. 'Thames Valley Police' (with --ca-dir)")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS[CertKind.CA], help="CA lifetime (default %(default)s)")
    p.add_argument("--network-dir", type=Path, help="a folder holding directory.toml (the whole network)")
    p.add_argument("--directory", type=Path, help="the network directory file (default NETWORK_DIR/directory.toml)")
    p.add_argument("--overwrite", action="store_true", help="replace existing keys and certificates (a new CA)")
    p.set_defaults(func=_cmd_init)

    kinds = ", ".join(k for k in CertKind if k is not CertKind.CA)
    p = sub.add_parser(
        "issue",
        help="issue a leaf certificate and its key",
        description=f"Issue a leaf certificate from the force CA. KIND is one of: {kinds}. "
        "Writes STEM.key (mode 0600, PKCS#8) and STEM.pem and records the certificate in the inventory.",
    )
    p.add_argument("kind", metavar="KIND", help=kinds)
    p.add_argument("--ca-dir", type=Path, required=True, help="the CA directory")
    p.add_argument("--out", type=Path, required=True, metavar="STEM", help="output path without extension")
    p.add_argument("--app", help="application name (app-client, app-server; not gateway or log)")
    p.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS SAN (servers; repeatable): only outside the network's names, and not one another "
        "unrevoked certificate of this CA carries",
    )
    p.add_argument("--ip", action="append", default=[], metavar="ADDR", help="extra IP SAN (servers; repeatable)")
    p.add_argument("--days", type=int, help="lifetime in days (default: 30, log-signing 365)")
    p.add_argument("--key-type", help="ed25519 or p256 (gateway-signing only; default ed25519 there, else p256)")
    _ca_key_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing key and certificate")
    p.set_defaults(func=_cmd_issue)

    p = sub.add_parser(
        "revoke",
        help="revoke a certificate and republish the CRL",
        description="Revoke a certificate this CA issued and republish the CRL. "
        f"REASON is one of: {', '.join(REVOCATION_REASONS)}.",
    )
    p.add_argument("--ca-dir", type=Path, required=True, help="the CA directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", metavar="HEX", help="serial number in hex (as `list` shows it)")
    which.add_argument("--cert", type=Path, metavar="PATH", help="the certificate file")
    p.add_argument("--reason", required=True, metavar="REASON", help="RFC 5280 reason, e.g. keyCompromise")
    _ca_key_arg(p)
    p.set_defaults(func=_cmd_revoke)

    p = sub.add_parser(
        "crl",
        help="publish a fresh CRL",
        description="Sign and write a fresh CRL (thisUpdate now). Run it on a schedule well inside the "
        "next-update interval: gateways refuse a force's certificates once its CRL is past nextUpdate.",
    )
    p.add_argument("--ca-dir", type=Path, required=True, help="the CA directory")
    p.add_argument("--next-update-days", type=float, help="days until nextUpdate (default: as last published, 7)")
    _ca_key_arg(p)
    p.set_defaults(func=_cmd_crl)

    p = sub.add_parser(
        "list",
        help="the inventory: every certificate issued, days left, revoked or not",
        description="List every certificate the CA issued. With --expiring-within, list only unrevoked "
        "certificates that expire within DAYS (or have expired) and exit 1 if there are any (for monitoring).",
    )
    p.add_argument("--ca-dir", type=Path, required=True, help="the CA directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--expiring-within", type=float, metavar="DAYS", help="only those expiring within DAYS")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "inspect",
        help="show a certificate (or CRL) file",
        description="Show what a PEM certificate or CRL says: SPIFFE ID, SANs, usages, lifetime, issuer.",
    )
    p.add_argument("cert", type=Path, metavar="CERT", help="a PEM certificate (first of a chain) or CRL")
    p.add_argument("--key", type=Path, help="also check that this private key matches the certificate")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_inspect)


def _ca_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-key", type=Path, metavar="PATH", help="the CA key if kept elsewhere (default CA_DIR/ca.key)")


def _cmd_init(args: argparse.Namespace) -> int:
    if args.ca_dir is not None:
        if args.network_dir is not None or args.directory is not None:
            raise ConfigError("give either --ca-dir (one force) or --network-dir/--directory (a network)", field="init")
        if not args.force or not args.network:
            raise ConfigError("--ca-dir needs --force and --network", field="init")
        made = init_ca(
            args.ca_dir,
            force=args.force,
            network=args.network,
            display_name=args.name,
            days=args.days,
            overwrite=args.overwrite,
        )
        print(f"CA {made.spiffe_id}: {made.cert_path} (key {made.key_path}, mode 0600)")
        print(f"  serial {_hex(made.serial)}  sha256 {made.fingerprint}")
        print("  keep ca.key offline if you can: every signing command takes --ca-key PATH")
        return 0
    if args.directory is None and args.network_dir is None:
        raise ConfigError("give --ca-dir (one force) or --network-dir/--directory (a network)", field="init")
    path = args.directory if args.directory is not None else args.network_dir / "directory.toml"
    directory = load_directory(path)
    for name, m in init_network(directory, overwrite=args.overwrite).items():
        print(f"{name}: CA {m.ca}, CRL {m.crl}")
        print(
            f"  gateway-tls {m.gateway_tls.cert_path}, gateway-signing {m.gateway_signing.cert_path}, "
            f"log-signing {m.log_signing.cert_path}"
        )
        for app, issued in m.app_servers.items():
            print(f"  app-server {app}: {issued.cert_path}")
        for app, issued in m.app_clients.items():
            print(f"  app-client {app}: {issued.cert_path}")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    kind = _kind(args.kind)
    if args.key_type is not None and args.key_type not in KEY_TYPES:
        raise ConfigError(f"unknown key type {args.key_type!r}; one of: {', '.join(KEY_TYPES)}", field="key-type")
    made = issue(
        args.ca_dir,
        kind,
        out_stem=args.out,
        app=args.app,
        dns_names=args.dns,
        ip_addresses=args.ip,
        days=args.days,
        key_type=args.key_type,
        ca_key=args.ca_key,
        overwrite=args.overwrite,
    )
    info = inspect_certificate(made.cert_path)
    print(f"issued {kind} {made.spiffe_id}: {made.cert_path} (key {made.key_path}, mode 0600)")
    print(f"  serial {_hex(made.serial)}  sha256 {made.fingerprint}  expires {info['not_after']}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    serial = _parse_serial(args.serial) if args.serial is not None else None
    revoke(args.ca_dir, serial=serial, cert_path=args.cert, reason=args.reason, ca_key=args.ca_key)
    state = _CaState.open(args.ca_dir)
    print(f"revoked ({args.reason}); CRL #{state.data['crl_number']} written to {state.crl_path}")
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    days = args.next_update_days
    if days is None:
        days = _CaState.open(args.ca_dir).next_update_days
    path = publish_crl(args.ca_dir, next_update_days=days, ca_key=args.ca_key)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    print(
        f"CRL #{_crl_number(crl)} written to {path}: next update {_iso(crl.next_update_utc or crl.last_update_utc)}, "
        f"{len(crl)} revoked"
    )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    at = _now(None)
    state = _CaState.open(args.ca_dir)
    entries = state.entries(at)
    if args.expiring_within is not None:
        limit = at + timedelta(days=args.expiring_within)
        entries = [e for e in entries if not e.revoked and e.not_after <= limit]
    crl = _crl_status(state, at)
    if args.json:
        out = {"trust_domain": state.trust_domain, "crl": crl, "certificates": [e.to_json() for e in entries]}
        print(json.dumps(out, indent=2))
    else:
        print(f"CA {state.trust_domain} ({state.cert.subject.rfc4514_string()})")
        print(
            f"CRL {crl['path']}: #{crl['crl_number']}, next update {crl['next_update']}"
            + ("  STALE: run `psngw pki crl`" if crl["stale"] else "")
        )
        print(f"{'KIND':<16} {'SPIFFE ID':<48} {'SERIAL':<40} {'NOT AFTER':<20} {'DAYS':>5}  STATUS")
        for e in entries:
            print(
                f"{e.kind:<16} {e.spiffe_id or '-':<48} {_hex(e.serial):<40} {_iso(e.not_after):<20} "
                f"{e.days_left:>5}  {_status(e, at)}"
            )
    return 1 if args.expiring_within is not None and entries else 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    path: Path = args.cert
    try:
        head = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=path) from exc
    if b"-----BEGIN X509 CRL-----" in head:
        try:
            info = describe_crl(x509.load_pem_x509_crl(head))
        except ValueError as exc:
            raise ConfigError("not a PEM CRL", file=path) from exc
        info["path"] = str(path)
    else:
        info = inspect_certificate(path)
        if args.key is not None:
            if not _same_public_key(_load_private_key(args.key), _load_certificate(path)):
                raise ConfigError(f"this key does not match the certificate {path}", file=args.key)
            info["key_matches"] = True
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            shown = ", ".join(str(v) for v in value) if isinstance(value, list) else value
            print(f"{key:>24}: {shown}")
    return 0


def _crl_status(state: _CaState, at: datetime) -> dict[str, object]:
    try:
        crl = x509.load_pem_x509_crl(state.crl_path.read_bytes())
    except (OSError, ValueError):
        return {"path": str(state.crl_path), "crl_number": None, "next_update": None, "stale": True}
    info = describe_crl(crl, now=at)
    return {
        "path": str(state.crl_path),
        "crl_number": info["crl_number"],
        "this_update": info["this_update"],
        "next_update": info["next_update"],
        "stale": info["stale"],
        "revoked": len(crl),
    }


def _status(entry: InventoryEntry, at: datetime) -> str:
    if entry.revoked:
        return f"revoked ({entry.revocation_reason})"
    if entry.expired:
        return "expired"
    if entry.not_before > at:
        return "not yet valid"
    return "valid"


if __name__ == "__main__":  # pragma: no cover - `psngw pki` is the entry point
    from gateway.cli import main

    sys.exit(main(["pki", *sys.argv[1:]]))
