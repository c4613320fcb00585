"""Officer tokens for the hostile tests: good ones, and the attack table of the tokens issue, forged.

Each forgery uses a force's real (development) identity provider where the
attack needs it (a valid signature over the wrong thing, the right ``kid`` on
an attacker's key), so the only thing wrong with it is the thing named.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.demo.network import idp_audience, idp_issuer
from tests.netharness import NetworkThread

__all__ = ["TOKEN_ATTACKS", "good_token"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def good_token(
    net: NetworkThread,
    force: str,
    officer: str,
    *,
    units: tuple[str, ...] = ("serocu",),
    roles: tuple[str, ...] = ("investigator",),
    clearance: str = "SC",
    now: float | None = None,
    ttl: float = 600,
    **extra: Any,
) -> str:
    """A token of `force`'s identity provider for `officer` (claims and headers overridable through `extra`)."""
    return net.layout.idps[force].issue(
        issuer=extra.pop("issuer", idp_issuer(force)),
        audience=extra.pop("audience", idp_audience(force)),
        force=extra.pop("force_claim", force),
        officer=officer,
        units=units,
        roles=roles,
        clearance=clearance,
        now=now,
        ttl=ttl,
        extra_claims=extra.pop("claims", None),
        extra_headers=extra.pop("headers", None),
    )


def _claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]


def _alg_none(net: NetworkThread, force: str, officer: str) -> str:
    claims = _claims_of(good_token(net, force, officer))
    header = {"alg": "none", "kid": net.layout.idps[force].kid, "typ": "JWT"}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(b'x')}"


def _hs256_public_key(net: NetworkThread, force: str, officer: str) -> str:
    # pyjwt advisories CVE-2017-11424 / CVE-2022-29217: HMAC keyed with the verifier's public key (PEM).
    idp = net.layout.idps[force]
    pem = idp.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(json.dumps({"alg": "HS256", "kid": idp.kid, "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims_of(good_token(net, force, officer))).encode())
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def _tampered(net: NetworkThread, force: str, officer: str) -> str:
    head, _, sig = good_token(net, force, officer, clearance="NPPV1").split(".")
    claims = _claims_of(good_token(net, force, officer, clearance="NPPV1"))
    claims["clearance"] = "DV"  # promote the officer's vetting
    return f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"


def _attacker_key(net: NetworkThread, force: str, officer: str) -> str:
    claims = _claims_of(good_token(net, force, officer))
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": net.layout.idps[force].kid})


def _other_force(other: str) -> Callable[[NetworkThread, str, str], str]:
    def make(net: NetworkThread, force: str, officer: str) -> str:
        return good_token(net, other, officer)  # a real token of the other force's identity provider

    return make


#: name -> (forge(net, force, officer), the reason the gateway logs)
TOKEN_ATTACKS: dict[str, tuple[Callable[[NetworkThread, str, str], str | None], str]] = {
    "no token": (lambda n, f, o: None, "no officer token"),
    "alg none": (_alg_none, "algorithm 'none' is not allowed"),
    "HS256 signed with the public key": (_hs256_public_key, "algorithm 'HS256' is not allowed"),
    "expired": (lambda n, f, o: good_token(n, f, o, now=time.time() - 3600, ttl=600), "expired at"),
    "not yet valid": (
        lambda n, f, o: good_token(n, f, o, claims={"nbf": int(time.time()) + 3600}),
        "not yet valid",
    ),
    # Keys are looked up by kid first: another force's key is unknown here, whatever the token says.
    "another force's token": (_other_force("hampshire"), "is unknown to this force's identity provider"),
    "another force's issuer": (
        lambda n, f, o: good_token(n, f, o, issuer=idp_issuer("hampshire")),
        "is not this force's issuer",
    ),
    "this issuer, another force's officer": (
        lambda n, f, o: good_token(n, f, o, force_claim="hampshire"),
        "is for force 'hampshire'",
    ),
    "wrong audience": (lambda n, f, o: good_token(n, f, o, audience="psn-gateway/hampshire"), "does not include"),
    "tampered payload": (_tampered, "signature does not verify"),
    "unknown kid": (lambda n, f, o: good_token(n, f, o, headers={"kid": "rotated-away"}), "is unknown"),
    "signed by an attacker's key": (_attacker_key, "signature does not verify"),
    "garbage": (lambda n, f, o: "abc.def", "not a compact JWS"),
    "oversized": (lambda n, f, o: good_token(n, f, o, claims={"pad": "x" * 9000}), "over the limit"),
}
