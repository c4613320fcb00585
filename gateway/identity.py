"""Workload identity: who a certificate says it is, and whether to believe it.

Each force is its own trust domain (SPIFFE federation semantics). A certificate
is believed only if:

- it carries exactly one URI SAN, a well-formed SPIFFE ID (never the CN);
- the SPIFFE ID's trust domain is a force in the network directory, and the
  certificate was issued (signature verified, not just a name) by that force's
  own CA: no force's CA can mint an identity in another force;
- it is a leaf (not a CA), inside its validity period, with the key usage and
  extended key usage its use needs (a server certificate is not a client
  certificate; a TLS certificate is not a signing certificate);
- its DNS SANs claim no other identity than its SPIFFE ID: under the network's
  names (``<network>``) it carries at most its own (``gateway.<td>`` for the
  gateway, ``<app>.<td>`` for an application), because TLS clients that can check
  only the DNS name (grpcio) would take it for whoever that name belongs to;
- it is not revoked according to that force's CRL; a CRL that is missing,
  unreadable, not signed by the CA or past nextUpdate plus a grace makes the
  force's certificates unusable (fail closed: `RevocationDataUnavailable`).

`TrustStore` is an immutable snapshot of CA certificates and CRLs; reloading
makes a new one. The expensive, time-independent checks are cached per
certificate fingerprint; time and revocation are checked on every use. On a
reload, a CA certificate or CRL file that fails to load keeps the last good one
(`load_trust_store(..., previous=...)`), so one broken file neither blocks the
other forces' new revocations nor drops a force whose CRL in force is still
fresh; a CRL older than the one in force is refused (a rollback would
un-revoke).

Owns: certificate verification. Does not own: issuing certificates
(`gateway.pki`), the TLS handshake (grpc), or reading files except in
`load_trust_store`, the edge.
"""

from __future__ import annotations

import enum
import hashlib
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.directory import NetworkDirectory
from gateway.errors import ConfigError, RevocationDataUnavailable, Unauthenticated

__all__ = [
    "CrlStatus",
    "PeerIdentity",
    "SpiffeId",
    "TrustStore",
    "Usage",
    "load_certificate",
    "load_trust_store",
    "parse_spiffe_id",
]

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_CACHE_SIZE = 4096


class Usage(enum.Enum):
    """What a certificate is presented for."""

    CLIENT = "tls-client"
    SERVER = "tls-server"
    SIGNING = "envelope-signing"
    LOG = "log-signing"


@dataclass(frozen=True)
class SpiffeId:
    """A parsed SPIFFE ID: ``spiffe://<trust_domain><path>``."""

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse a SPIFFE ID strictly (SPIFFE-ID spec section 2); `Unauthenticated` if malformed."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise Unauthenticated(f"URI SAN {uri!r} is not a spiffe:// ID")
    if len(uri) > 2048:
        raise Unauthenticated("SPIFFE ID longer than 2048 bytes")
    rest = uri[len(prefix) :]
    domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise Unauthenticated(f"SPIFFE ID {uri!r} has an invalid trust domain (lower-case letters, digits, . - _)")
    if not slash:
        raise Unauthenticated(f"SPIFFE ID {uri!r} names no workload path")
    segments = path.split("/")
    for segment in segments:
        if not segment:
            raise Unauthenticated(f"SPIFFE ID {uri!r} has an empty path segment")
        if segment in (".", ".."):
            raise Unauthenticated(f"SPIFFE ID {uri!r} has a relative path segment")
        if not _SEGMENT.fullmatch(segment):
            raise Unauthenticated(f"SPIFFE ID {uri!r} has invalid characters in its path")
    return SpiffeId(domain, "/" + path)


@dataclass(frozen=True)
class PeerIdentity:
    """A verified workload identity."""

    spiffe_id: str
    force: str
    #: "gateway", "app" or "log"
    kind: str
    #: the application name, for kind "app"
    app: str | None
    fingerprint: str
    serial: int
    not_after: float

    def describe(self) -> str:
        """A short text for logs: SPIFFE ID and fingerprint prefix."""
        return f"{self.spiffe_id} (sha256:{self.fingerprint[:16]})"


@dataclass(frozen=True)
class CrlStatus:
    """Whether a force's revocation data is usable now, and why not."""

    force: str
    usable: bool
    reason: str
    next_update: float | None


@dataclass(frozen=True)
class _Static:
    """The time-independent result of verifying one certificate."""

    identity: PeerIdentity
    not_before: float
    usages: frozenset[Usage]


#: What cryptography raises while parsing a malformed certificate (some of it lazily, on first use).
_MALFORMED = (ValueError, TypeError, x509.DuplicateExtension, x509.InvalidVersion, x509.UnsupportedGeneralNameType)


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse a certificate in PEM or DER; `Unauthenticated` if it is not one (warnings included)."""
    try:
        with warnings.catch_warnings():
            # A negative serial and similar non-conformance only warns in cryptography: refuse it.
            warnings.simplefilter("error")
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
    except (*_MALFORMED, Warning) as exc:
        raise Unauthenticated(f"not a valid X.509 certificate: {exc}") from exc


def _usages(cert: x509.Certificate) -> frozenset[Usage]:
    """The uses this certificate's key usage and EKU allow (empty if it is a CA)."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            return frozenset()
    except x509.ExtensionNotFound:
        pass
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return frozenset()
    if not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
        return frozenset()
    try:
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = set()
    out: set[Usage] = set()
    if ExtendedKeyUsageOID.CLIENT_AUTH in eku:
        out.add(Usage.CLIENT)
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        out.add(Usage.SERVER)
    # A signing key is a separate key: content commitment set, and no TLS EKU.
    if ku.content_commitment and not eku & {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}:
        out.update((Usage.SIGNING, Usage.LOG))
    return frozenset(out)


def _check_dns_names(names: Sequence[str], spiffe: SpiffeId, own: str | None, network: str) -> None:
    """Refuse a DNS SAN under the network's names that is not the identity's own: it names another identity."""
    for name in names:
        low = name.lower().rstrip(".")
        if low != own and (low == network or low.endswith(f".{network}")):
            allowed = f"only {own}" if own else "none"
            raise Unauthenticated(
                f"{spiffe}: DNS name {name!r} names another identity (under {network} it may carry {allowed})"
            )


def _check_key(cert: x509.Certificate) -> None:
    key = cert.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
        return
    raise Unauthenticated(f"public key type {type(key).__name__} is not allowed (ECDSA P-256/P-384 or Ed25519 only)")


class TrustStore:
    """An immutable snapshot of every force's CA certificate and CRL."""

    def __init__(
        self,
        directory: NetworkDirectory,
        cas: Mapping[str, x509.Certificate],
        crls: Mapping[str, x509.CertificateRevocationList | str | None],
        *,
        crl_grace: float = 3600.0,
        require_crl: bool = True,
        load_errors: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        #: What the load that made this store rejected, each naming its file (the last good value was kept).
        self.load_errors: tuple[str, ...] = tuple(load_errors)
        self._cas = dict(cas)
        self._crl_grace = crl_grace
        self._require_crl = require_crl
        self._crls: dict[str, tuple[x509.CertificateRevocationList | None, str, frozenset[int]]] = {}
        for force, crl in crls.items():
            self._crls[force] = self._check_crl(force, crl)
        self._cache: OrderedDict[bytes, _Static | Unauthenticated] = OrderedDict()
        self._lock = threading.Lock()

    def _check_crl(
        self, force: str, crl: x509.CertificateRevocationList | str | None
    ) -> tuple[x509.CertificateRevocationList | None, str, frozenset[int]]:
        if crl is None:
            return None, "no CRL", frozenset()
        if isinstance(crl, str):  # the reason it could not be loaded
            return None, crl, frozenset()
        if not _signed_by(crl, self._cas[force]):
            return None, "CRL is not signed by the force's CA", frozenset()
        return crl, "ok", frozenset(r.serial_number for r in crl)

    def _good_crl(self, force: str, ca: x509.Certificate) -> x509.CertificateRevocationList | None:
        """The CRL this store holds for `force` if it was accepted and `ca` signed it (for a reload to keep)."""
        crl = self._crls.get(force, (None, "", frozenset()))[0]
        return crl if crl is not None and _signed_by(crl, ca) else None

    @property
    def forces(self) -> tuple[str, ...]:
        """The forces this store holds CA certificates for."""
        return tuple(self._cas)

    def ca_certificate(self, force: str) -> x509.Certificate:
        """The CA certificate of `force`."""
        return self._cas[force]

    def crl_status(self, force: str, now: float) -> CrlStatus:
        """Whether `force`'s revocation data is usable at `now`."""
        crl, why, _ = self._crls.get(force, (None, "no CRL", frozenset()))
        if crl is None:
            if not self._require_crl and why == "no CRL":
                return CrlStatus(force, True, "no CRL configured (revocation not checked)", None)
            return CrlStatus(force, False, why, None)
        next_update = crl.next_update_utc.timestamp() if crl.next_update_utc else None
        if next_update is None:
            return CrlStatus(force, False, "CRL has no nextUpdate", None)
        if now > next_update + self._crl_grace:
            return CrlStatus(
                force, False, f"CRL is stale: nextUpdate passed {int(now - next_update)} s ago", next_update
            )
        if now < crl.last_update_utc.timestamp() - self._crl_grace:
            return CrlStatus(force, False, "CRL thisUpdate is in the future", next_update)
        return CrlStatus(force, True, "ok", next_update)

    def verify(self, cert: bytes | x509.Certificate, usage: Usage, now: float) -> PeerIdentity:
        """Verify a presented certificate for `usage` at time `now`.

        Raises `Unauthenticated` if it is not to be believed, and
        `RevocationDataUnavailable` if its force's CRL is unusable.
        """
        # The cache is keyed by the bytes as presented (PEM or DER), so a repeated
        # certificate costs one hash, not a parse; the fingerprint is of the DER.
        if isinstance(cert, x509.Certificate):
            parsed: x509.Certificate | None = cert
            key = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
        else:
            parsed = None
            key = hashlib.sha256(cert).digest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is None:
            try:
                certificate = parsed or load_certificate(cert)  # type: ignore[arg-type]  # bytes when not parsed
                fingerprint = hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()
                cached = self._verify_static(certificate, fingerprint)
            except Unauthenticated as exc:
                cached = exc
            except _MALFORMED as exc:  # cryptography parses extensions lazily
                cached = Unauthenticated(f"malformed certificate: {exc}")
            with self._lock:
                self._cache[key] = cached
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(cached, Unauthenticated):
            raise Unauthenticated(cached.reason)
        return self._verify_dynamic(cached, usage, now)

    def _verify_static(self, cert: x509.Certificate, fingerprint: str) -> _Static:
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise Unauthenticated("certificate has no subject alternative name (SPIFFE ID)") from exc
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise Unauthenticated(f"certificate must carry exactly one URI SAN (SPIFFE ID), it has {len(uris)}")
        spiffe = parse_spiffe_id(uris[0])
        force = self.directory.force_of_trust_domain(spiffe.trust_domain)
        if force is None or force.name not in self._cas:
            raise Unauthenticated(f"trust domain {spiffe.trust_domain!r} is not a force in the network directory")
        ca = self._cas[force.name]
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise Unauthenticated(
                f"{spiffe} was not issued by the CA of force {force.name} (trust domains are pinned)"
            ) from exc
        _check_key(cert)
        usages = _usages(cert)
        if not usages:
            raise Unauthenticated(f"{spiffe}: a CA certificate or one without digitalSignature key usage is not a leaf")
        path = spiffe.path.split("/")[1:]
        if path == ["gateway"]:
            kind, app = "gateway", None
        elif path == ["log"]:
            kind, app = "log", None
        elif len(path) == 2 and path[0] == "app":
            kind, app = "app", path[1]
        else:
            raise Unauthenticated(f"{spiffe} is not a gateway, log or application identity")
        own = force.gateway_server_name if kind == "gateway" else f"{app}.{force.trust_domain}" if app else None
        _check_dns_names(sans.get_values_for_type(x509.DNSName), spiffe, own, self.directory.network)
        identity = PeerIdentity(
            spiffe_id=str(spiffe),
            force=force.name,
            kind=kind,
            app=app,
            fingerprint=fingerprint,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc.timestamp(),
        )
        return _Static(identity, cert.not_valid_before_utc.timestamp(), usages)

    def _verify_dynamic(self, static: _Static, usage: Usage, now: float) -> PeerIdentity:
        identity = static.identity
        if usage not in static.usages:
            raise Unauthenticated(f"{identity.spiffe_id}: certificate is not valid for {usage.value}")
        if now < static.not_before:
            raise Unauthenticated(f"{identity.spiffe_id}: certificate is not yet valid")
        if now > identity.not_after:
            raise Unauthenticated(f"{identity.spiffe_id}: certificate expired")
        status = self.crl_status(identity.force, now)
        if not status.usable:
            raise RevocationDataUnavailable(
                f"revocation data of force {identity.force} unusable ({status.reason}): refusing {identity.spiffe_id}"
            )
        _, _, revoked = self._crls.get(identity.force, (None, "", frozenset()))
        if identity.serial in revoked:
            raise Unauthenticated(f"{identity.describe()}: certificate is revoked (serial {identity.serial:x})")
        return identity

    def expiring(
        self, certs: Mapping[str, x509.Certificate], now: float, within_days: float
    ) -> list[tuple[str, float]]:
        """(label, days left) for each of `certs` that expires within `within_days`."""
        out = []
        for label, cert in certs.items():
            days = (cert.not_valid_after_utc.timestamp() - now) / 86400
            if days <= within_days:
                out.append((label, days))
        return out


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]  # CA keys are EC or Ed25519
    except (TypeError, ValueError):  # a key type the CRL's signature algorithm does not fit
        return False


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _rollback(new: x509.CertificateRevocationList, current: x509.CertificateRevocationList) -> str | None:
    """Why `new` is older than `current` (same issuer), or None if it is not."""
    new_number, current_number = _crl_number(new), _crl_number(current)
    if new_number is not None and current_number is not None:
        if new_number < current_number:
            return f"CRL number {new_number} is lower than {current_number}"
        return None
    if new.last_update_utc < current.last_update_utc:
        return f"thisUpdate {_iso(new.last_update_utc)} is earlier than {_iso(current.last_update_utc)}"
    return None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror or exc}", file=path) from exc


def load_trust_store(
    directory: NetworkDirectory,
    *,
    crl_grace: float = 3600.0,
    require_crl: bool = True,
    previous: TrustStore | None = None,
) -> TrustStore:
    """Read every force's CA certificate and CRL named by the directory.

    At start (`previous` None), a CA certificate that cannot be read or parsed
    is a `ConfigError` (the gateway cannot start); a CRL that cannot be read or
    parsed is not: that force's certificates are refused until it is fixed.

    On a reload, `previous` is the store in force, and a part that fails keeps
    its last good value from it, with the failure in the new store's
    `load_errors` (one `ConfigError` line each, naming the file):

    - a CA certificate that cannot be read or parsed (a force new to the
      directory has no last good one: that is still a `ConfigError`);
    - a CRL that is missing, unreadable, not signed by the force's CA, or older
      than the CRL in force (a lower CRL number, or without numbers an earlier
      thisUpdate): replaying an old CRL that is still fresh would un-revoke.

    A kept CRL still goes stale at its own nextUpdate plus the grace.
    """
    cas: dict[str, x509.Certificate] = {}
    crls: dict[str, x509.CertificateRevocationList | str | None] = {}
    errors: list[str] = []
    for force in directory.forces.values():
        try:
            ca = _load_ca(force.name, force.ca_path)
        except ConfigError as exc:
            kept_ca = previous._cas.get(force.name) if previous is not None else None
            if kept_ca is None:
                raise
            errors.append(f"{exc} (keeping the last good CA certificate)")
            ca = kept_ca
        cas[force.name] = ca
        crls[force.name] = None
        if force.crl_path is not None:
            kept = previous._good_crl(force.name, ca) if previous is not None else None
            crls[force.name] = _load_crl(force.crl_path, ca, kept, errors)
    return TrustStore(directory, cas, crls, crl_grace=crl_grace, require_crl=require_crl, load_errors=errors)


def _load_ca(force: str, path: Path) -> x509.Certificate:
    raw = _read(path, f"CA certificate of force {force}")
    try:
        ca = x509.load_pem_x509_certificate(raw)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}", file=path) from exc
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ConfigError(f"CA certificate of force {force} is not a CA (basicConstraints)", file=path)
    return ca


def _load_crl(
    path: Path, ca: x509.Certificate, kept: x509.CertificateRevocationList | None, errors: list[str]
) -> x509.CertificateRevocationList | str:
    """The CRL at `path`; or, if it fails and there is one, the `kept` CRL in force (noting why in `errors`)."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError) as exc:
        if kept is None:
            return f"CRL {path} missing or unreadable ({exc})"
        problem = f"CRL missing or unreadable ({exc})"
    else:
        if kept is None:
            return crl  # not signed by the CA: the store refuses it, and the force with it (fail closed)
        if not _signed_by(crl, ca):
            problem = "CRL is not signed by the force's CA"
        else:
            rollback = _rollback(crl, kept)
            if rollback is None:
                return crl
            problem = f"CRL is older than the CRL in force ({rollback}): refusing a rollback"
    number = _crl_number(kept)
    errors.append(
        str(
            ConfigError(
                f"{problem}; keeping the last good CRL (number {number}, nextUpdate {_next_update(kept)})", file=path
            )
        )
    )
    return kept


def _next_update(crl: x509.CertificateRevocationList) -> str:
    return _iso(crl.next_update_utc) if crl.next_update_utc is not None else "none"


def _iso(when: datetime) -> str:
    return f"{when:%Y-%m-%dT%H:%M:%SZ}"
