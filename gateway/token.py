"""Officer tokens: verifying the JWT that names the officer behind a local call.

A force's identity provider (IdP) issues each officer a JWT; the application
passes it in ``authorization: Bearer <jwt>`` and the local listener turns it into
a frozen `Principal`. This is the only module that imports pyjwt (ARCHITECTURE:
one wrapper per third-party library); pyjwt exceptions never leave it.

What a token must be (RFC 8725, the JWT best current practice):

- a compact JWS of at most ``max_token_bytes``, three base64url segments;
- signed with an algorithm the configuration allows (ES256, EdDSA, RS256; ``none``
  and HS* are refused when the configuration is read, so no token can choose
  them); the header names a ``kid`` and its ``alg`` must equal the algorithm of
  that key, so an RSA key never verifies an ES256 header and a public key is
  never used as an HMAC secret. Keys come only from the configured key source,
  never from the token (``jwk``, ``jku``, ``x5c``, ``x5u`` headers are ignored);
  ``crit`` is refused;
- JSON without duplicate member names or NaN; claims ``exp``, ``iat``, ``iss``,
  ``aud``, ``sub`` present, ``nbf`` honoured, times checked against the
  gateway's `Clock` with the configured leeway; ``iss`` equal to this force's
  issuer and ``aud`` equal to (or a list containing) this gateway's audience;
- claims mapped by `ClaimMapping` into the principal: the force claim must be
  this gateway's force; units and roles are bounded lists of names; clearance is
  one short name.

Verified tokens are cached (key: SHA-256 of the token bytes) in a bounded LRU
until ``exp`` plus leeway, so a repeated token costs no signature check. A
cache hit still asks the key source for the token's ``kid`` (a dictionary
look-up): a key that was withdrawn or replaced, or key data that went stale,
stops cached tokens too.

Key sources (`KeySource`): `JwksFileSource` (a JWKS file, re-read on an unknown
``kid``), `HttpsJwksSource` (an HTTPS JWKS endpoint, TLS verified against a
configured CA) and `StaticKeySource` (tests). An unknown ``kid`` triggers at
most one refetch per ``refetch_min_interval``. When the endpoint fails, the last
good keys keep working until they are ``max_key_staleness`` old; after that
every token is refused with `Unavailable`: the failure is ours (the key
publisher), not the caller's, so the caller sees UNAVAILABLE and retries rather
than UNAUTHENTICATED (which tells a client to throw its credentials away), and
the gate stays closed (fail closed) until fresh keys arrive.

Refusals raise `Unauthenticated` with a precise ``reason`` for the audit log;
the caller sees only the class.

The ``psngw token`` commands are a **development identity provider for the demo
and tests only** (`init_dev_idp`, `DevIdp`): every token it issues carries an
``unsafe_dev_idp`` header parameter and claim, and the commands warn on stderr.

Owns: token verification, JWKS parsing and fetching, the dev IdP. Does not own:
where the token comes from in metadata (`gateway.metadata`), policy on units
and roles (`gateway.policy`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from gateway.clock import Clock, SystemClock
from gateway.errors import ConfigError, GatewayError, Unauthenticated, Unavailable
from gateway.principal import Principal
from gateway.tomlconf import Section

__all__ = [
    "ALLOWED_ALGORITHMS",
    "ClaimMapping",
    "DevIdp",
    "HttpsJwksSource",
    "JwksFileSource",
    "JwtKey",
    "KeySource",
    "StaticKeySource",
    "TokenConfig",
    "TokenStats",
    "TokenVerifier",
    "VerifiedToken",
    "build_key_source",
    "init_dev_idp",
    "parse_jwks",
    "register_cli",
]

_log = logging.getLogger(__name__)

#: The algorithms a configuration may allow. Everything else (``none``, HS*,
#: PS*, ES384...) is a `ConfigError`.
ALLOWED_ALGORITHMS: tuple[str, ...] = ("ES256", "EdDSA", "RS256")

_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_CLAIM_NAME = r"[A-Za-z_][A-Za-z0-9_:./-]{0,63}"
_OFFICER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
_CLEARANCE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_KID = re.compile(r"[\x21-\x7e]{1,256}")
_MAX_LIST = 32
_MAX_AUDIENCES = 16
_MAX_JWKS_KEYS = 64
_MIN_RSA_BITS = 2048
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

#: The marker every dev-IdP token carries (header parameter and claim).
UNSAFE_DEV_IDP = "unsafe_dev_idp"

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


# -- configuration --------------------------------------------------------------


@dataclass(frozen=True)
class ClaimMapping:
    """Which JWT claim holds each field of the principal (names are configurable)."""

    officer_id: str = "sub"
    force: str = "force"
    units: str = "units"
    roles: str = "roles"
    clearance: str = "clearance"

    @classmethod
    def from_section(cls, sec: Section) -> ClaimMapping:
        """Parse the ``[tokens.claims]`` table."""
        d = cls()
        out = cls(
            officer_id=sec.text("officer_id", d.officer_id, pattern=_CLAIM_NAME),
            force=sec.text("force", d.force, pattern=_CLAIM_NAME),
            units=sec.text("units", d.units, pattern=_CLAIM_NAME),
            roles=sec.text("roles", d.roles, pattern=_CLAIM_NAME),
            clearance=sec.text("clearance", d.clearance, pattern=_CLAIM_NAME),
        )
        names = [out.officer_id, out.force, out.units, out.roles, out.clearance]
        if len(set(names)) != len(names):
            sec.fail(None, "two principal fields are mapped to the same claim")
        sec.finish()
        return out


@dataclass(frozen=True)
class TokenConfig:
    """How this force's officer tokens are verified (the ``[tokens]`` table).

    Example::

        [tokens]
        issuer = "https://idp.thames-valley.se.psn"
        audience = "psn-gateway/thames-valley"
        algorithms = ["ES256"]
        jwks_url = "https://idp.thames-valley.se.psn/jwks.json"   # or jwks_file = "idp/jwks.json"
        jwks_ca = "pki/idp-ca.pem"
        leeway_seconds = 30
        refetch_min_interval_seconds = 30
        refresh_interval_seconds = 300
        max_key_staleness_seconds = 3600
        cache_size = 10000
        max_token_bytes = 8192
        [tokens.claims]
        officer_id = "sub"
    """

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    leeway: float = 30.0
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks_ca: Path | None = None
    #: at most one refetch of the key set per this many seconds (unknown kid, retries)
    refetch_min_interval: float = 30.0
    #: keys older than this are refreshed on next use (HTTPS: refetched; file: re-read)
    refresh_interval: float = 300.0
    #: during an endpoint outage, the last good keys work until they are this old
    max_key_staleness: float = 3600.0
    cache_size: int = 10_000
    max_token_bytes: int = 8192
    claims: ClaimMapping = field(default_factory=ClaimMapping)
    #: timeout of one JWKS fetch, and the largest JWKS document accepted
    fetch_timeout: float = 5.0
    max_jwks_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            field_name, message = problems[0]
            raise ConfigError(message, field=f"tokens.{field_name}")

    @classmethod
    def from_section(cls, sec: Section) -> TokenConfig:
        """Parse the ``[tokens]`` table; every problem is a `ConfigError` with file:line."""
        d_leeway, d_refetch, d_refresh, d_stale = 30.0, 30.0, 300.0, 3600.0
        issuer = sec.text("issuer", max_len=512)
        audience = sec.text("audience", max_len=512)
        algorithms = sec.text_list("algorithms", non_empty=True)  # checked by __post_init__
        values: dict[str, Any] = {
            "issuer": issuer,
            "audience": audience,
            "algorithms": algorithms,
            "leeway": sec.number("leeway_seconds", d_leeway, minimum=0, maximum=300),
            "jwks_file": sec.file_path("jwks_file", None),
            "jwks_url": sec.text("jwks_url", None, max_len=2048),
            "jwks_ca": sec.file_path("jwks_ca", None, must_exist=True),
            "refetch_min_interval": sec.number("refetch_min_interval_seconds", d_refetch, minimum=1, maximum=3600),
            "refresh_interval": sec.number("refresh_interval_seconds", d_refresh, minimum=1, maximum=86400),
            "max_key_staleness": sec.number("max_key_staleness_seconds", d_stale, minimum=1, maximum=7 * 86400),
            "cache_size": sec.integer("cache_size", 10_000, minimum=0, maximum=1_000_000),
            "max_token_bytes": sec.integer("max_token_bytes", 8192, minimum=256, maximum=65536),
            "fetch_timeout": sec.number("fetch_timeout_seconds", 5.0, minimum=0.1, maximum=60),
            "max_jwks_bytes": sec.integer("max_jwks_bytes", 256 * 1024, minimum=1024, maximum=16 << 20),
            "claims": ClaimMapping.from_section(sec.table("claims")),
        }
        try:
            out = cls(**values)
        except ConfigError as exc:
            name = (exc.field or "").removeprefix("tokens.")
            sec.fail(_TOML_KEYS.get(name, name) or None, exc.message)
        sec.finish()
        return out


#: TokenConfig field -> its key in the [tokens] table, where they differ.
_TOML_KEYS = {
    "leeway": "leeway_seconds",
    "refetch_min_interval": "refetch_min_interval_seconds",
    "refresh_interval": "refresh_interval_seconds",
    "max_key_staleness": "max_key_staleness_seconds",
    "fetch_timeout": "fetch_timeout_seconds",
}


def _algorithm_refusal(alg: str) -> str:
    if alg.lower() == "none":
        return "algorithm 'none' is never allowed (unsigned tokens)"
    if alg.upper().startswith("HS"):
        return f"algorithm {alg!r} is never allowed (a shared secret is not a public key; RFC 8725 2.1)"
    return f"algorithm {alg!r} is not supported; allowed: {', '.join(ALLOWED_ALGORITHMS)}"


def _config_problems(c: TokenConfig) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if not c.issuer:
        out.append(("issuer", "issuer is empty"))
    if not c.audience:
        out.append(("audience", "audience is empty"))
    if not c.algorithms:
        out.append(("algorithms", "no algorithms allowed"))
    out.extend(("algorithms", _algorithm_refusal(alg)) for alg in c.algorithms if alg not in ALLOWED_ALGORITHMS)
    if (c.jwks_file is None) == (c.jwks_url is None):
        out.append(("jwks_file", "exactly one of jwks_file and jwks_url is required"))
    if c.jwks_url is not None and not c.jwks_url.startswith("https://"):
        out.append(("jwks_url", "jwks_url must be an https:// URL"))
    if c.jwks_ca is not None and c.jwks_url is None:
        out.append(("jwks_ca", "jwks_ca is only used with jwks_url"))
    if c.max_key_staleness < c.refresh_interval:
        out.append(("max_key_staleness", "max_key_staleness must be at least refresh_interval"))
    numbers = (c.leeway, c.refetch_min_interval, c.refresh_interval, c.max_key_staleness, c.fetch_timeout)
    if any(not math.isfinite(x) or x < 0 for x in numbers):
        out.append(("leeway", "times must be finite and not negative"))
    if c.cache_size < 0 or c.max_token_bytes < 256 or c.max_jwks_bytes < 1024:
        out.append(("cache_size", "sizes out of range"))
    return out


# -- keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class JwtKey:
    """One verification key from a JWKS, bound to exactly one algorithm."""

    kid: str
    algorithm: str
    public_key: PublicKey
    #: SHA-256 (hex) of the key's SubjectPublicKeyInfo DER
    fingerprint: str


class KeySource(Protocol):
    """Where the verifier gets the key for a ``kid``."""

    async def get(self, kid: str) -> JwtKey | None:
        """The key for `kid`, or None if unknown (after at most one rate-limited refetch).

        Raises `Unavailable` when the key data cannot be trusted any more
        (never fetched, or older than the configured staleness limit).
        """
        ...


class _JwksError(Exception):
    """A JWKS document is unusable (translated by each source)."""


def _key_fingerprint(key: PublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _algorithm_of(jwk: Mapping[str, Any]) -> str | None:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "EC" and crv == "P-256":
        return "ES256"
    if kty == "OKP" and crv == "Ed25519":
        return "EdDSA"
    if kty == "RSA":
        return "RS256"
    return None


def _key_matches(alg: str, key: object) -> bool:
    if alg == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey)
    if alg == "RS256":
        return isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS
    return False


def _strict_json(data: bytes | str, what: str) -> Any:
    """JSON with duplicate member names and NaN/Infinity refused (no parser differentials)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise _JwksError(f"{what} has a duplicate member {k!r}")
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise _JwksError(f"{what} contains {name}")

    try:
        return json.loads(data, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError) as exc:
        raise _JwksError(f"{what} is not valid JSON: {exc}") from exc


def parse_jwks(data: bytes, algorithms: Sequence[str]) -> dict[str, JwtKey]:
    """Parse a JWKS document into the keys usable with `algorithms`, by ``kid``.

    Keys for other algorithms, or marked for another ``use`` or ``key_ops``, are
    skipped. The whole set is refused (`ValueError`) if it is not JSON, publishes
    private or symmetric key material, has two usable keys with one ``kid``, has
    more than 64 keys or has no usable key at all.
    """
    try:
        return _parse_jwks(data, algorithms)
    except _JwksError as exc:
        raise ValueError(str(exc)) from exc


def _parse_jwk(i: int, jwk: Any, algorithms: Sequence[str]) -> JwtKey | None:
    """One JWKS entry: the key, None if it is not for us, `_JwksError` if it poisons the set."""
    if not isinstance(jwk, dict):
        raise _JwksError(f"JWKS key {i} is not an object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise _JwksError(f"JWKS key {i} has no valid 'kid'")
    private = _PRIVATE_JWK_MEMBERS & jwk.keys()
    if private:
        raise _JwksError(f"JWKS key {kid!r} publishes private or symmetric key material ({sorted(private)})")
    alg = _algorithm_of(jwk)
    if alg is None or alg not in algorithms:
        return None
    if jwk.get("alg", alg) != alg or jwk.get("use", "sig") != "sig":
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    try:
        public = jwt.PyJWK(jwk, alg).key
    except jwt.PyJWTError as exc:
        raise _JwksError(f"JWKS key {kid!r} is malformed: {exc}") from exc
    if not _key_matches(alg, public):
        _log.warning("JWKS key %r skipped: not a usable %s key (RSA keys need %d bits)", kid, alg, _MIN_RSA_BITS)
        return None
    return JwtKey(kid, alg, public, _key_fingerprint(public))


def _parse_jwks(data: bytes, algorithms: Sequence[str]) -> dict[str, JwtKey]:
    doc = _strict_json(data, "JWKS")
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise _JwksError("JWKS is not an object with a 'keys' list")
    entries: list[Any] = doc["keys"]
    if len(entries) > _MAX_JWKS_KEYS:
        raise _JwksError(f"JWKS has {len(entries)} keys, more than {_MAX_JWKS_KEYS}")
    keys: dict[str, JwtKey] = {}
    for i, jwk in enumerate(entries):
        key = _parse_jwk(i, jwk, algorithms)
        if key is None:
            continue
        if key.kid in keys:
            raise _JwksError(f"JWKS has two usable keys with kid {key.kid!r}")
        keys[key.kid] = key
    if not keys:
        raise _JwksError(f"JWKS has no usable key for algorithms {', '.join(algorithms)}")
    return keys


class StaticKeySource:
    """A fixed set of keys (tests, and keys given in code)."""

    def __init__(self, keys: Mapping[str, JwtKey]) -> None:
        self._keys = dict(keys)
        #: how many times `get` was called
        self.lookups = 0

    @classmethod
    def from_jwks(cls, data: bytes, algorithms: Sequence[str]) -> StaticKeySource:
        """Keys parsed from a JWKS document."""
        return cls(parse_jwks(data, algorithms))

    def replace(self, keys: Mapping[str, JwtKey]) -> None:
        """Swap the key set (tests: rotation, withdrawal)."""
        self._keys = dict(keys)

    async def get(self, kid: str) -> JwtKey | None:
        """The key for `kid`, or None."""
        self.lookups += 1
        return self._keys.get(kid)


class JwksFileSource:
    """Keys from a JWKS file, re-read on an unknown kid (rate-limited) and every `refresh_interval`.

    The first read happens at construction: a missing or bad file is a
    `ConfigError` naming it. Later, a file that cannot be read or parsed keeps
    the last good keys (an operator may be mid-edit) and is logged.
    """

    def __init__(
        self,
        path: Path,
        *,
        algorithms: Sequence[str],
        clock: Clock,
        refetch_min_interval: float = 30.0,
        refresh_interval: float = 300.0,
        max_bytes: int = 256 * 1024,
    ) -> None:
        self._path = path
        self._algorithms = tuple(algorithms)
        self._clock = clock
        self._min_interval = refetch_min_interval
        self._refresh_interval = refresh_interval
        self._max_bytes = max_bytes
        try:
            self._keys = self._read()
        except _JwksError as exc:
            raise ConfigError(str(exc), file=path) from exc
        self._loaded_at = self._last_attempt = clock.monotonic()
        #: how many times the file was read after construction
        self.reloads = 0

    def _read(self) -> dict[str, JwtKey]:
        try:
            with self._path.open("rb") as f:
                data = f.read(self._max_bytes + 1)
        except OSError as exc:
            raise _JwksError(f"cannot read JWKS file: {exc.strerror or exc}") from exc
        if len(data) > self._max_bytes:
            raise _JwksError(f"JWKS file is larger than {self._max_bytes} bytes")
        return _parse_jwks(data, self._algorithms)

    def _reload(self, why: str) -> None:
        now = self._clock.monotonic()
        if now - self._last_attempt < self._min_interval:
            return
        self._last_attempt = now
        self.reloads += 1
        try:
            self._keys = self._read()
            self._loaded_at = now
        except _JwksError as exc:
            _log.warning("JWKS file %s not reloaded (%s): keeping the last good keys: %s", self._path, why, exc)

    async def get(self, kid: str) -> JwtKey | None:
        """The key for `kid`; re-reads the file if it is unknown or the keys are old."""
        if self._clock.monotonic() - self._loaded_at >= self._refresh_interval:
            self._reload("refresh")
        if kid not in self._keys:
            self._reload(f"unknown kid {kid!r}")
        return self._keys.get(kid)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: a JWKS endpoint is configured exactly, never followed elsewhere."""

    def redirect_request(  # noqa: PLR0917  # the signature is urllib's
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> None:
        raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl} refused", headers, fp)


class HttpsJwksSource:
    """Keys from an HTTPS JWKS endpoint, TLS verified against `ca_file` (system CAs if None).

    Fetches with urllib in a worker thread (timeout, size limit, no redirects).
    Keys are refreshed when older than `refresh_interval`, and refetched on an
    unknown kid; attempts (successful or not) are at most one per
    `refetch_min_interval`. If fetching fails, the last good keys serve until
    they are `max_key_staleness` old; then `get` raises `Unavailable` (fail
    closed) until a fetch succeeds.
    """

    def __init__(
        self,
        url: str,
        *,
        algorithms: Sequence[str],
        clock: Clock,
        ca_file: Path | None = None,
        refetch_min_interval: float = 30.0,
        refresh_interval: float = 300.0,
        max_key_staleness: float = 3600.0,
        timeout: float = 5.0,
        max_bytes: int = 256 * 1024,
    ) -> None:
        if not url.startswith("https://"):
            raise ConfigError(f"JWKS URL {url!r} is not https://", field="tokens.jwks_url")
        self._url = url
        self._algorithms = tuple(algorithms)
        self._clock = clock
        self._min_interval = refetch_min_interval
        self._refresh_interval = refresh_interval
        self._max_staleness = max_key_staleness
        self._timeout = timeout
        self._max_bytes = max_bytes
        try:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load JWKS CA certificate: {exc}", file=ca_file) from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())
        self._keys: dict[str, JwtKey] | None = None
        self._fetched_at = -math.inf
        self._last_attempt = -math.inf
        self._last_error = "never fetched"
        self._lock: asyncio.Lock | None = None
        #: how many fetches were attempted
        self.fetches = 0

    def _fetch_blocking(self) -> bytes:
        request = urllib.request.Request(self._url, headers={"Accept": "application/json"})  # noqa: S310  # https:// checked in __init__
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                data: bytes = response.read(self._max_bytes + 1)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise _JwksError(f"fetching {self._url} failed: {exc}") from exc
        if len(data) > self._max_bytes:
            raise _JwksError(f"JWKS from {self._url} is larger than {self._max_bytes} bytes")
        return data

    async def _refresh(self, why: str) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = self._clock.monotonic()
            if now - self._last_attempt < self._min_interval:
                return  # rate limit; also: another task just fetched
            self._last_attempt = now
            self.fetches += 1
            try:
                data = await asyncio.to_thread(self._fetch_blocking)
                keys = _parse_jwks(data, self._algorithms)
            except _JwksError as exc:
                self._last_error = str(exc)
                _log.warning("JWKS refresh (%s) failed; keeping the last good keys: %s", why, exc)
                return
            self._keys = keys
            self._fetched_at = self._clock.monotonic()
            self._last_error = ""

    async def get(self, kid: str) -> JwtKey | None:
        """The key for `kid`; `Unavailable` if the keys are missing or too stale."""
        if self._keys is None or self._clock.monotonic() - self._fetched_at >= self._refresh_interval:
            await self._refresh("refresh")
        if self._keys is not None and kid not in self._keys:
            await self._refresh(f"unknown kid {kid!r}")
        if self._keys is None:
            raise Unavailable(f"no officer-token keys: JWKS endpoint {self._url} unusable ({self._last_error})")
        age = self._clock.monotonic() - self._fetched_at
        if age > self._max_staleness:
            raise Unavailable(
                f"officer-token keys are stale: last good JWKS from {self._url} is {age:.0f} s old "
                f"(limit {self._max_staleness:.0f} s); endpoint failing: {self._last_error}"
            )
        return self._keys.get(kid)


def build_key_source(config: TokenConfig, clock: Clock) -> KeySource:
    """The key source `config` names (a JWKS file or an HTTPS endpoint)."""
    if config.jwks_file is not None:
        return JwksFileSource(
            config.jwks_file,
            algorithms=config.algorithms,
            clock=clock,
            refetch_min_interval=config.refetch_min_interval,
            refresh_interval=config.refresh_interval,
            max_bytes=config.max_jwks_bytes,
        )
    assert config.jwks_url is not None  # noqa: S101  # TokenConfig requires exactly one of the two
    return HttpsJwksSource(
        config.jwks_url,
        algorithms=config.algorithms,
        clock=clock,
        ca_file=config.jwks_ca,
        refetch_min_interval=config.refetch_min_interval,
        refresh_interval=config.refresh_interval,
        max_key_staleness=config.max_key_staleness,
        timeout=config.fetch_timeout,
        max_bytes=config.max_jwks_bytes,
    )


# -- verification -------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedToken:
    """A verified officer token: the principal and what the audit log may record about it."""

    principal: Principal
    #: SHA-256 of the token bytes (hex): names the token in logs without the token
    digest: str
    kid: str
    algorithm: str
    issuer: str
    issued_at: float
    expires_at: float
    jti: str | None
    #: True if the token came from the development IdP (`psngw token issue`)
    unsafe_dev_idp: bool
    key_fingerprint: str


@dataclass
class TokenStats:
    """Counters for metrics and tests."""

    verified: int = 0
    cache_hits: int = 0
    signature_checks: int = 0
    refused: int = 0


_JWS = jwt.PyJWS(options={"verify_signature": True, "enforce_minimum_key_length": True})


class TokenVerifier:
    """Verifies officer tokens for one force's gateway (see the module docstring for the rules)."""

    def __init__(self, config: TokenConfig, *, force: str, keys: KeySource, clock: Clock) -> None:
        self._config = config
        self._force = force
        self._keys = keys
        self._clock = clock
        self._cache: OrderedDict[bytes, VerifiedToken] = OrderedDict()
        self._warned_dev_idp = False
        self.stats = TokenStats()

    async def verify(self, token: str | None) -> Principal:
        """The principal of a valid token; `Unauthenticated` (precise reason) otherwise."""
        return (await self.verify_token(token)).principal

    async def verify_token(self, token: str | None) -> VerifiedToken:
        """Like `verify`, with the token's digest, kid and times for the audit log."""
        try:
            verified = await self._verify(token)
        except Unauthenticated:
            self.stats.refused += 1
            raise
        self.stats.verified += 1
        if verified.unsafe_dev_idp and not self._warned_dev_idp:
            self._warned_dev_idp = True
            _log.warning("accepting tokens from an UNSAFE development identity provider (kid %s)", verified.kid)
        return verified

    def clear_cache(self) -> None:
        """Forget every cached token (e.g. after a key compromise)."""
        self._cache.clear()

    async def _verify(self, token: str | None) -> VerifiedToken:
        cfg = self._config
        if not token:
            raise Unauthenticated("no officer token (metadata 'authorization: Bearer <jwt>' is missing)")
        if not token.isascii():
            raise Unauthenticated("officer token contains non-ASCII characters")
        raw = token.encode("ascii")
        if len(raw) > cfg.max_token_bytes:
            raise Unauthenticated(f"officer token is {len(raw)} bytes, over the limit of {cfg.max_token_bytes}")
        if not _COMPACT.fullmatch(token):
            raise Unauthenticated("officer token is not a compact JWS (three base64url segments)")
        digest = hashlib.sha256(raw).digest()
        now = self._clock.now()

        cached = self._cache.get(digest)
        if cached is not None:
            if now >= cached.expires_at + cfg.leeway:
                del self._cache[digest]
                raise Unauthenticated(f"officer token expired at {_iso(cached.expires_at)} (cached)")
            current = await self._keys.get(cached.kid)
            if current is not None and current.fingerprint == cached.key_fingerprint:
                self._cache.move_to_end(digest)
                self.stats.cache_hits += 1
                return cached
            # The key was withdrawn or replaced: forget the entry and verify afresh.
            del self._cache[digest]

        header_b64, payload_b64, _ = token.split(".")
        header = self._segment(header_b64, "header")
        key = await self._key_for(header)
        self.stats.signature_checks += 1
        try:
            _JWS.decode_complete(token, key=key.public_key, algorithms=[key.algorithm])
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated(
                f"officer token signature does not verify with key {key.kid!r} ({key.algorithm})"
            ) from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"officer token rejected: {exc}") from exc

        claims = self._segment(payload_b64, "payload")
        verified = self._check_claims(claims, header, key, digest, now)
        if cfg.cache_size > 0:
            self._cache[digest] = verified
            if len(self._cache) > cfg.cache_size:
                self._cache.popitem(last=False)
        return verified

    async def _key_for(self, header: Mapping[str, Any]) -> JwtKey:
        """The key the header names, if its algorithm is allowed and is that key's algorithm."""
        allowed = self._config.algorithms
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise Unauthenticated("officer token header has no 'alg'")
        if alg not in allowed:
            raise Unauthenticated(f"officer token algorithm {alg!r} is not allowed (allowed: {', '.join(allowed)})")
        if "crit" in header:
            raise Unauthenticated("officer token header has 'crit' extensions, which are not supported")
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise Unauthenticated("officer token header has no valid 'kid'")
        key = await self._keys.get(kid)
        if key is None:
            raise Unauthenticated(f"officer token key id {kid!r} is unknown to this force's identity provider")
        if key.algorithm != alg:
            raise Unauthenticated(
                f"officer token algorithm {alg} does not match key {kid!r}, which is an {key.algorithm} key"
            )
        return key

    def _check_registered(self, claims: Mapping[str, Any], now: float) -> tuple[float, float]:
        """Times, issuer, audience and subject; returns (iat, exp)."""
        cfg = self._config
        exp = _time_claim(claims, "exp")
        iat = _time_claim(claims, "iat")
        if exp <= now - cfg.leeway:
            raise Unauthenticated(f"officer token expired at {_iso(exp)}")
        if iat > now + cfg.leeway:
            raise Unauthenticated(f"officer token issued in the future ({_iso(iat)})")
        if "nbf" in claims:
            nbf = _time_claim(claims, "nbf")
            if nbf > now + cfg.leeway:
                raise Unauthenticated(f"officer token not yet valid (nbf {_iso(nbf)})")
        iss = claims["iss"]
        if iss != cfg.issuer:
            raise Unauthenticated(f"officer token issuer {_short(iss)} is not this force's issuer {cfg.issuer!r}")
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if (
            not isinstance(audiences, list)
            or len(audiences) > _MAX_AUDIENCES
            or not all(isinstance(a, str) for a in audiences)
        ):
            raise Unauthenticated("officer token 'aud' is not a string or a short list of strings")
        if cfg.audience not in audiences:
            raise Unauthenticated(f"officer token audience {_short(aud)} does not include {cfg.audience!r}")
        if not isinstance(claims["sub"], str):
            raise Unauthenticated("officer token 'sub' is not a string")
        return iat, exp

    @staticmethod
    def _segment(segment: str, what: str) -> dict[str, Any]:
        try:
            data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
            value = _strict_json(data, f"officer token {what}")
        except _JwksError as exc:
            raise Unauthenticated(str(exc)) from exc
        except ValueError as exc:
            raise Unauthenticated(f"officer token {what} is not base64url JSON") from exc
        if not isinstance(value, dict):
            raise Unauthenticated(f"officer token {what} is not a JSON object")
        return value

    def _check_claims(
        self, claims: dict[str, Any], header: dict[str, Any], key: JwtKey, digest: bytes, now: float
    ) -> VerifiedToken:
        cfg = self._config
        mapping = cfg.claims
        for name in ("exp", "iat", "iss", "aud", "sub"):
            if name not in claims:
                raise Unauthenticated(f"officer token has no {name!r} claim")
        iat, exp = self._check_registered(claims, now)
        officer_id = _string_claim(claims, mapping.officer_id, _OFFICER_ID, "officer id")
        force = claims.get(mapping.force)
        if force is None:
            raise Unauthenticated(f"officer token has no force claim {mapping.force!r}")
        if force != self._force:
            raise Unauthenticated(f"officer token is for force {_short(force)}, not this gateway's force {self._force}")
        units = _name_list_claim(claims, mapping.units, "units")
        roles = _name_list_claim(claims, mapping.roles, "roles")
        clearance = _string_claim(claims, mapping.clearance, _CLEARANCE, "clearance")
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or len(jti) > 256):
            raise Unauthenticated("officer token 'jti' is not a short string")
        dev = header.get(UNSAFE_DEV_IDP) is True or claims.get(UNSAFE_DEV_IDP) is True
        return VerifiedToken(
            principal=Principal(officer_id, self._force, units, roles, clearance),
            digest=digest.hex(),
            kid=key.kid,
            algorithm=key.algorithm,
            issuer=cfg.issuer,
            issued_at=iat,
            expires_at=exp,
            jti=jti,
            unsafe_dev_idp=dev,
            key_fingerprint=key.fingerprint,
        )


def _iso(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    except (OverflowError, ValueError, OSError):
        return repr(t)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _time_claim(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unauthenticated(f"officer token {name!r} is not a number of seconds")
    return float(value)


def _string_claim(claims: Mapping[str, Any], name: str, pattern: re.Pattern[str], what: str) -> str:
    value = claims.get(name)
    if value is None:
        raise Unauthenticated(f"officer token has no {what} claim {name!r}")
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise Unauthenticated(f"officer token {what} claim {name!r} is malformed: {_short(value)}")
    return value


def _name_list_claim(claims: Mapping[str, Any], name: str, what: str) -> tuple[str, ...]:
    value = claims.get(name)
    if value is None:
        raise Unauthenticated(f"officer token has no {what} claim {name!r}")
    if not isinstance(value, list) or len(value) > _MAX_LIST:
        raise Unauthenticated(f"officer token {what} claim {name!r} is not a list of at most {_MAX_LIST} names")
    for item in value:
        if not isinstance(item, str) or not _NAME.fullmatch(item):
            raise Unauthenticated(f"officer token {what} claim has a malformed entry {_short(item)}")
    return tuple(dict.fromkeys(value))


# -- the development identity provider (UNSAFE: demo and tests only) ---------------

_DEV_WARNING = (
    "WARNING: psngw token is an UNSAFE development identity provider for the demo and tests only; "
    "its tokens are marked unsafe_dev_idp"
)


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise ConfigError("refusing to overwrite an existing key (pass overwrite)", file=path) from exc
    except OSError as exc:
        raise ConfigError(f"cannot write key: {exc.strerror or exc}", file=path) from exc
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _public_jwk(key: PublicKey, alg: str, kid: str) -> dict[str, Any]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        jwk: dict[str, Any] = dict(OKPAlgorithm.to_jwk(key, as_dict=True))
    elif isinstance(key, ec.EllipticCurvePublicKey):
        jwk = dict(ECAlgorithm.to_jwk(key, as_dict=True))
    else:
        raise ConfigError("dev IdP keys are Ed25519 or ECDSA P-256")
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url)."""
    members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("crv", "kty", "x")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class DevIdp:
    """An UNSAFE development identity provider: one signing key and its JWKS.

    For the demo and tests only. Every token it issues is marked
    ``unsafe_dev_idp`` in its header and claims.
    """

    directory: Path
    algorithm: str
    kid: str
    private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)

    @property
    def jwks_path(self) -> Path:
        """The public JWKS file a gateway's ``[tokens] jwks_file`` points at."""
        return self.directory / "jwks.json"

    @property
    def jwks(self) -> bytes:
        """The public JWKS document."""
        jwk = _public_jwk(self.private_key.public_key(), self.algorithm, self.kid)
        return json.dumps({"keys": [jwk]}, indent=2).encode() + b"\n"

    @classmethod
    def load(cls, directory: Path | str) -> DevIdp:
        """Load a dev IdP written by `init_dev_idp`; `ConfigError` naming the file if unusable."""
        directory = Path(directory)
        key_path = directory / "idp.key"
        try:
            mode = key_path.stat().st_mode
            pem = key_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read dev IdP key: {exc.strerror or exc}", file=key_path) from exc
        if mode & 0o077:
            raise ConfigError(f"dev IdP key is readable by others (mode {mode & 0o777:o}); chmod 600", file=key_path)
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"not a PEM private key: {exc}", file=key_path) from exc
        if isinstance(key, ed25519.Ed25519PrivateKey):
            alg = "EdDSA"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            alg = "ES256"
        else:
            raise ConfigError("dev IdP key must be Ed25519 or ECDSA P-256", file=key_path)
        kid = _thumbprint(_public_jwk(key.public_key(), alg, "-"))
        return cls(directory, alg, kid, key)

    def issue(
        self,
        *,
        issuer: str,
        audience: str,
        force: str,
        officer: str,
        units: Sequence[str],
        roles: Sequence[str],
        clearance: str,
        ttl: float = 3600.0,
        now: float | None = None,
        claims: ClaimMapping | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign a token for an officer (UNSAFE dev IdP). `extra_*` let tests forge odd tokens."""
        if not 0 < ttl <= 7 * 86400:
            raise ConfigError(f"ttl must be between 1 second and 7 days, got {ttl}", field="ttl")
        mapping = claims or ClaimMapping()
        issued = time.time() if now is None else now
        payload: dict[str, Any] = {
            "iss": issuer,
            "aud": audience,
            "sub": officer,
            "iat": int(issued),
            "nbf": int(issued),
            "exp": int(issued + ttl),
            "jti": uuid.uuid4().hex,
            mapping.officer_id: officer,
            mapping.force: force,
            mapping.units: list(units),
            mapping.roles: list(roles),
            mapping.clearance: clearance,
            UNSAFE_DEV_IDP: True,
        }
        payload.update(extra_claims or {})
        headers: dict[str, Any] = {"kid": self.kid, "typ": "JWT", UNSAFE_DEV_IDP: True}
        headers.update(extra_headers or {})
        return jwt.encode(payload, self.private_key, algorithm=self.algorithm, headers=headers)


def init_dev_idp(out_dir: Path | str, alg: str = "ES256", *, overwrite: bool = False) -> DevIdp:
    """Create an UNSAFE dev IdP in `out_dir`: ``idp.key`` (0600) and ``jwks.json``."""
    out = Path(out_dir)
    private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ConfigError(f"dev IdP algorithm must be ES256 or EdDSA, not {alg!r}", field="alg")
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create directory: {exc.strerror or exc}", file=out) from exc
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(out / "idp.key", pem, overwrite=overwrite)
    idp = DevIdp(out, alg, _thumbprint(_public_jwk(private.public_key(), alg, "-")), private)
    idp.jwks_path.write_bytes(idp.jwks)
    (out / "UNSAFE-DEV-IDP.txt").write_text(
        "This directory is an UNSAFE development identity provider made by `psngw token init-idp`.\n"
        "It is for the psn-gateway demo and tests only. Never trust its jwks.json in production.\n"
    )
    _log.warning("created an UNSAFE development identity provider in %s", out)
    return idp


# -- CLI -------------------------------------------------------------------------------


def register_cli(subparsers: Any) -> None:
    """Add ``psngw token ...`` (an UNSAFE development IdP, and a token checker)."""
    parser = subparsers.add_parser(
        "token",
        help="officer tokens: an UNSAFE development identity provider (demo/tests only), and a checker",
        description="Officer tokens. init-idp and issue are an UNSAFE development identity provider for the "
        "demo and tests ONLY: every token they issue is marked unsafe_dev_idp.",
    )
    sub = parser.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)

    init = sub.add_parser(
        "init-idp",
        help="UNSAFE, demo/tests only: create a dev IdP key (0600) and its jwks.json",
        description="UNSAFE, demo/tests only: create a development identity provider.",
    )
    init.add_argument("--out", required=True, type=Path, help="directory to write idp.key and jwks.json to")
    init.add_argument("--alg", choices=("ES256", "EdDSA"), default="ES256")
    init.add_argument("--overwrite", action="store_true", help="replace an existing idp.key")
    init.set_defaults(func=_cmd_init_idp)

    issue = sub.add_parser(
        "issue",
        help="UNSAFE, demo/tests only: print a signed officer token from a dev IdP",
        description="UNSAFE, demo/tests only: print an officer JWT signed by a development identity provider.",
    )
    issue.add_argument("--idp", required=True, type=Path, help="the dev IdP directory (from init-idp)")
    issue.add_argument("--issuer", required=True)
    issue.add_argument("--audience", required=True)
    issue.add_argument("--force", required=True)
    issue.add_argument("--officer", required=True)
    issue.add_argument("--unit", action="append", default=[], dest="units")
    issue.add_argument("--role", action="append", default=[], dest="roles")
    issue.add_argument("--clearance", required=True)
    issue.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (default 3600)")
    issue.set_defaults(func=_cmd_issue)

    check = sub.add_parser(
        "verify",
        help="verify a token against a gateway's [tokens] configuration and print the officer",
        description="Verify an officer token as the gateway would, and print the principal or the reason.",
    )
    check.add_argument("--config", required=True, type=Path, help="the gateway configuration file")
    check.add_argument(
        "presented", metavar="TOKEN", nargs="?", default="-", help="the token, or - to read it from stdin"
    )
    check.set_defaults(func=_cmd_verify)


def _cmd_init_idp(args: argparse.Namespace) -> int:
    print(_DEV_WARNING, file=sys.stderr)
    idp = init_dev_idp(args.out, args.alg, overwrite=args.overwrite)
    print(f"wrote {idp.directory / 'idp.key'} (0600) and {idp.jwks_path} (kid {idp.kid})")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    print(_DEV_WARNING, file=sys.stderr)
    idp = DevIdp.load(args.idp)
    token = idp.issue(
        issuer=args.issuer,
        audience=args.audience,
        force=args.force,
        officer=args.officer,
        units=args.units,
        roles=args.roles,
        clearance=args.clearance,
        ttl=args.ttl,
    )
    print(token)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from gateway.config import load_config  # noqa: PLC0415  # only this command needs the whole config

    config = load_config(args.config)
    tokens = config.tokens
    presented = sys.stdin.read().strip() if args.presented == "-" else str(args.presented)
    clock = SystemClock()
    verifier = TokenVerifier(tokens, force=config.force, keys=build_key_source(tokens, clock), clock=clock)
    try:
        verified = asyncio.run(verifier.verify_token(presented))
    except GatewayError as exc:
        print(f"refused ({type(exc).__name__}): {exc.reason}")
        return 1
    p = verified.principal
    print(f"officer {p.officer_id} of {p.force}; units {', '.join(p.units) or '-'}; roles {', '.join(p.roles) or '-'}")
    print(f"clearance {p.clearance}; kid {verified.kid} ({verified.algorithm}); expires {_iso(verified.expires_at)}")
    if verified.unsafe_dev_idp:
        print("WARNING: issued by an UNSAFE development identity provider")
    return 0
