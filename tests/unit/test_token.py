"""gateway.token: officer JWT verification, key sources, the cache, the dev IdP and its CLI.

Attack cases follow pyjwt's tests/test_advisory.py (alg none, HMAC with the
public key as secret, algorithm/key confusion) and RFC 8725. Each case asserts
the precise reason, so removing the check it names turns it red.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import os
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway import cli, pki
from gateway.clock import FakeClock
from gateway.errors import ConfigError, Unauthenticated, Unavailable
from gateway.principal import Principal
from gateway.token import (
    DevIdp,
    HttpsJwksSource,
    JwksFileSource,
    JwtKey,
    StaticKeySource,
    TokenConfig,
    TokenVerifier,
    build_key_source,
    init_dev_idp,
    parse_jwks,
)
from gateway.tomlconf import TomlFile

FORCE = "thames-valley"
ISS = "https://idp.thames-valley.se.psn"
AUD = "psn-gateway/thames-valley"
NOW = 1_800_000_000.0


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_of(key: Any, kid: str, alg: str) -> dict[str, Any]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        out = OKPAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        out = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        out = RSAAlgorithm.to_jwk(key, as_dict=True)
    return {**out, "kid": kid, "alg": alg, "use": "sig"}


class Keys:
    """The signing keys of the tests: an ES256 IdP key, an EdDSA one, an RSA one, an attacker's."""

    def __init__(self) -> None:
        self.es = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.evil = ec.generate_private_key(ec.SECP256R1())

    def jwks(self, *which: str) -> bytes:
        table = {
            "es": (self.es.public_key(), "es-1", "ES256"),
            "ed": (self.ed.public_key(), "ed-1", "EdDSA"),
            "rsa": (self.rsa.public_key(), "rsa-1", "RS256"),
        }
        return json.dumps({"keys": [jwk_of(*table[w]) for w in which]}).encode()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "tvp-4711",
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "exp": int(NOW) + 600,
        "force": FORCE,
        "units": ["serocu", "tvp-cid"],
        "roles": ["analyst"],
        "clearance": "SC",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def mint(keys: Keys, payload: dict[str, Any] | None = None, *, alg: str = "ES256", kid: str = "es-1", **h: Any) -> str:
    key = {"ES256": keys.es, "EdDSA": keys.ed, "RS256": keys.rsa}[alg]
    return jwt.encode(payload or claims(), key, algorithm=alg, headers={"kid": kid, **h})


def forge(header: bytes, payload: bytes, sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64(header)}.{b64(payload)}".encode()
    return f"{signing_input.decode()}.{b64(sign(signing_input))}"


def es_signer(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    return lambda data: ECAlgorithm(ECAlgorithm.SHA256).sign(data, key)


def config(**kw: Any) -> TokenConfig:
    base: dict[str, Any] = {
        "issuer": ISS,
        "audience": AUD,
        "algorithms": ("ES256", "EdDSA", "RS256"),
        "leeway": 30.0,
        "jwks_file": Path("/unused"),
        "cache_size": 100,
        "max_token_bytes": 4096,
    }
    base.update(kw)
    return TokenConfig(**base)


def verifier(keys: Keys, *, clock: FakeClock | None = None, **kw: Any) -> tuple[TokenVerifier, StaticKeySource]:
    cfg = config(**kw)
    source = StaticKeySource.from_jwks(keys.jwks("es", "ed", "rsa"), cfg.algorithms)
    return TokenVerifier(cfg, force=FORCE, keys=source, clock=clock or FakeClock(NOW)), source


def refused(v: TokenVerifier, token: str | None) -> str:
    with pytest.raises(Unauthenticated) as info:
        run(v.verify(token))
    return info.value.reason


# -- the good path ----------------------------------------------------------------------


@pytest.mark.parametrize("alg,kid", [("ES256", "es-1"), ("EdDSA", "ed-1"), ("RS256", "rsa-1")])
def test_a_valid_token_gives_the_principal(keys: Keys, alg: str, kid: str) -> None:
    v, _ = verifier(keys)
    principal = run(v.verify(mint(keys, alg=alg, kid=kid)))
    assert principal == Principal("tvp-4711", FORCE, ("serocu", "tvp-cid"), ("analyst",), "SC")


def test_claim_names_are_configurable(keys: Keys) -> None:
    from gateway.token import ClaimMapping

    mapping = ClaimMapping(officer_id="warrant", force="org", units="groups", roles="jobs", clearance="vetting")
    v, _ = verifier(keys, claims=mapping)
    payload = claims(warrant="W123", org=FORCE, groups=["serocu"], jobs=[], vetting="NPPV3")
    for k in ("force", "units", "roles", "clearance"):
        del payload[k]
    assert run(v.verify(mint(keys, payload))) == Principal("W123", FORCE, ("serocu",), (), "NPPV3")


def test_an_audience_list_containing_ours_is_accepted(keys: Keys) -> None:
    v, _ = verifier(keys)
    assert run(v.verify(mint(keys, claims(aud=["other", AUD])))).officer_id == "tvp-4711"


def test_leeway_accepts_a_token_expired_seconds_ago(keys: Keys) -> None:
    v, _ = verifier(keys)
    assert run(v.verify(mint(keys, claims(exp=int(NOW) - 10)))).force == FORCE


# -- attacks and bad tokens: a table of named cases ---------------------------------------


def _alg_none(keys: Keys) -> str:
    header = json.dumps({"alg": "none", "kid": "es-1", "typ": "JWT"}).encode()
    return f"{b64(header)}.{b64(json.dumps(claims()).encode())}.{b64(b'x')}"


def _hs256_with_public_key(keys: Keys) -> str:
    # pyjwt advisory CVE-2017-11424 / CVE-2022-29217: HMAC keyed with the public key's PEM.
    pem = keys.es.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = json.dumps({"alg": "HS256", "kid": "es-1"}).encode()
    return forge(header, json.dumps(claims()).encode(), lambda d: hmac.new(pem, d, hashlib.sha256).digest())


def _rs256_header_on_ec_key(keys: Keys) -> str:
    # The header names an allowed algorithm, but not the algorithm of the key it names.
    return mint(keys, alg="RS256", kid="es-1")


def _es256_header_on_rsa_key(keys: Keys) -> str:
    return mint(keys, alg="ES256", kid="rsa-1")


def _tampered_payload(keys: Keys) -> str:
    header, _, signature = mint(keys).split(".")
    return ".".join((header, b64(json.dumps(claims(clearance="DV")).encode()), signature))


def _signed_by_attacker(keys: Keys) -> str:
    return jwt.encode(claims(), keys.evil, algorithm="ES256", headers={"kid": "es-1"})


def _duplicate_claim(keys: Keys) -> str:
    # Two "force" members: a parser that keeps the last sees another force than one that keeps the first.
    body = json.dumps(claims())[:-1] + ', "force": "hampshire"}'
    return forge(json.dumps({"alg": "ES256", "kid": "es-1"}).encode(), body.encode(), es_signer(keys.es))


def _nan_expiry(keys: Keys) -> str:
    body = json.dumps(claims(exp=DROP))[:-1] + ', "exp": NaN}'
    return forge(json.dumps({"alg": "ES256", "kid": "es-1"}).encode(), body.encode(), es_signer(keys.es))


CASES: list[tuple[str, Callable[[Keys], str | None], str]] = [
    ("no token", lambda k: None, "no officer token"),
    ("empty token", lambda k: "", "no officer token"),
    ("not a compact JWS", lambda k: "abc.def", "not a compact JWS"),
    ("non-ASCII token", lambda k: "é" + mint(k), "non-ASCII"),
    ("oversized token", lambda k: mint(k, claims(pad="x" * 5000)), "over the limit of 4096"),
    ("expired", lambda k: mint(k, claims(exp=int(NOW) - 31)), "expired at"),
    ("not yet valid", lambda k: mint(k, claims(nbf=int(NOW) + 31)), "not yet valid"),
    ("issued in the future", lambda k: mint(k, claims(iat=int(NOW) + 31, nbf=DROP)), "issued in the future"),
    ("wrong audience", lambda k: mint(k, claims(aud="psn-gateway/hampshire")), "does not include"),
    ("audience not a string", lambda k: mint(k, claims(aud={"x": 1})), "'aud' is not a string"),
    ("wrong issuer", lambda k: mint(k, claims(iss="https://idp.example")), "is not this force's issuer"),
    (
        "another force's issuer",
        lambda k: mint(k, claims(iss="https://idp.hampshire.se.psn", force="hampshire")),
        "is not this force's issuer",
    ),
    ("another force's officer", lambda k: mint(k, claims(force="hampshire")), "is for force 'hampshire'"),
    ("no force claim", lambda k: mint(k, claims(force=DROP)), "no force claim"),
    ("alg none", _alg_none, "algorithm 'none' is not allowed"),
    ("HS256 signed with the public key", _hs256_with_public_key, "algorithm 'HS256' is not allowed"),
    ("RS256 header on an EC key", _rs256_header_on_ec_key, "does not match key 'es-1'"),
    ("ES256 header on an RSA key", _es256_header_on_rsa_key, "does not match key 'rsa-1'"),
    ("unknown kid", lambda k: mint(k, kid="rotated-away"), "key id 'rotated-away' is unknown"),
    ("no kid", lambda k: jwt.encode(claims(), k.es, algorithm="ES256"), "no valid 'kid'"),
    ("crit header", lambda k: mint(k, crit=["exp"]), "'crit'"),
    ("tampered payload", _tampered_payload, "signature does not verify"),
    ("signed by another key", _signed_by_attacker, "signature does not verify"),
    ("duplicate claim", _duplicate_claim, "duplicate member 'force'"),
    ("NaN expiry", _nan_expiry, "contains NaN"),
    ("missing exp", lambda k: mint(k, claims(exp=DROP)), "no 'exp' claim"),
    ("missing iat", lambda k: mint(k, claims(iat=DROP)), "no 'iat' claim"),
    ("missing iss", lambda k: mint(k, claims(iss=DROP)), "no 'iss' claim"),
    ("missing aud", lambda k: mint(k, claims(aud=DROP)), "no 'aud' claim"),
    ("missing sub", lambda k: mint(k, claims(sub=DROP)), "no 'sub' claim"),
    ("exp not a number", lambda k: mint(k, claims(exp="soon")), "'exp' is not a number"),
    ("exp a boolean", lambda k: mint(k, claims(exp=True)), "'exp' is not a number"),
    ("sub not a string", lambda k: mint(k, claims(sub=12)), "'sub' is not a string"),
    ("officer id with spaces", lambda k: mint(k, claims(sub="a b")), "officer id claim 'sub' is malformed"),
    ("units not a list", lambda k: mint(k, claims(units="serocu")), "units claim 'units' is not a list"),
    ("too many units", lambda k: mint(k, claims(units=[f"u{i}" for i in range(33)])), "is not a list of at most"),
    ("unit with a newline", lambda k: mint(k, claims(units=["serocu\nDV"])), "malformed entry"),
    ("roles missing", lambda k: mint(k, claims(roles=DROP)), "no roles claim"),
    ("clearance not a string", lambda k: mint(k, claims(clearance=["SC"])), "clearance claim 'clearance' is malformed"),
    ("jti not a string", lambda k: mint(k, claims(jti=5)), "'jti' is not a short string"),
]


@pytest.mark.parametrize("name,make,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_tokens_are_refused_with_a_precise_reason(
    keys: Keys, name: str, make: Callable[[Keys], str | None], reason: str
) -> None:
    v, _ = verifier(keys)
    assert reason in refused(v, make(keys))
    assert v.stats.refused == 1 and v.stats.verified == 0


def test_an_algorithm_the_config_does_not_allow_is_refused_even_with_its_key(keys: Keys) -> None:
    cfg = config(algorithms=("ES256",))
    source = StaticKeySource.from_jwks(keys.jwks("es"), ("ES256", "EdDSA"))  # an over-broad source
    source.replace({**parse_jwks(keys.jwks("es", "ed"), ("ES256", "EdDSA"))})
    v = TokenVerifier(cfg, force=FORCE, keys=source, clock=FakeClock(NOW))
    assert "algorithm 'EdDSA' is not allowed" in refused(v, mint(keys, alg="EdDSA", kid="ed-1"))


# -- the cache ---------------------------------------------------------------------------


def test_a_repeated_token_costs_no_second_signature_check(keys: Keys) -> None:
    v, _ = verifier(keys)
    token = mint(keys)
    first, second = run(v.verify(token)), run(v.verify(token))
    assert first == second
    assert v.stats.signature_checks == 1
    assert v.stats.cache_hits == 1


def test_a_cached_token_expired_is_refused_from_the_cache(keys: Keys) -> None:
    clock = FakeClock(NOW)
    v, _ = verifier(keys, clock=clock)
    token = mint(keys, claims(exp=int(NOW) + 60))
    run(v.verify(token))
    clock.advance(90)
    assert "(cached)" in refused(v, token)
    assert v.stats.signature_checks == 1


def test_a_cached_token_dies_with_its_key(keys: Keys) -> None:
    v, source = verifier(keys)
    token = mint(keys)
    run(v.verify(token))
    source.replace({})  # the IdP withdrew the key
    assert "unknown" in refused(v, token)


def test_a_cached_token_is_reverified_when_its_kid_gets_another_key(keys: Keys) -> None:
    v, source = verifier(keys)
    token = mint(keys)
    run(v.verify(token))
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    source.replace({"es-1": JwtKey("es-1", "ES256", other, "other-fingerprint")})
    assert "signature does not verify" in refused(v, token)


def test_the_cache_is_a_bounded_lru(keys: Keys) -> None:
    v, _ = verifier(keys, cache_size=2)
    a, b, c = (mint(keys, claims(sub=f"o{i}")) for i in range(3))
    for t in (a, b, c):
        run(v.verify(t))
    assert v.stats.signature_checks == 3
    run(v.verify(c))
    assert v.stats.signature_checks == 3  # c is cached
    run(v.verify(a))
    assert v.stats.signature_checks == 4  # a was evicted


def test_cache_size_zero_disables_the_cache(keys: Keys) -> None:
    v, _ = verifier(keys, cache_size=0)
    token = mint(keys)
    run(v.verify(token))
    run(v.verify(token))
    assert v.stats.signature_checks == 2


def test_refused_tokens_are_not_cached(keys: Keys) -> None:
    v, _ = verifier(keys)
    token = mint(keys, claims(force="hampshire"))
    refused(v, token)
    refused(v, token)
    assert v.stats.signature_checks == 2 and v.stats.cache_hits == 0


def test_verify_token_reports_what_the_audit_log_records(keys: Keys) -> None:
    v, _ = verifier(keys)
    token = mint(keys, claims(jti="j-1"))
    out = run(v.verify_token(token))
    assert out.digest == hashlib.sha256(token.encode()).hexdigest()
    assert (out.kid, out.algorithm, out.jti, out.unsafe_dev_idp) == ("es-1", "ES256", "j-1", False)
    assert out.expires_at == int(NOW) + 600


# -- JWKS parsing --------------------------------------------------------------------------


def _jwks(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


def test_parse_jwks_binds_each_key_to_one_algorithm(keys: Keys) -> None:
    parsed = parse_jwks(keys.jwks("es", "ed", "rsa"), ("ES256", "EdDSA", "RS256"))
    assert {k: v.algorithm for k, v in parsed.items()} == {"es-1": "ES256", "ed-1": "EdDSA", "rsa-1": "RS256"}


def test_parse_jwks_skips_keys_for_algorithms_not_configured(keys: Keys) -> None:
    assert set(parse_jwks(keys.jwks("es", "rsa"), ("ES256",))) == {"es-1"}


def test_parse_jwks_skips_a_key_whose_alg_member_disagrees(keys: Keys) -> None:
    es = jwk_of(keys.es.public_key(), "a", "ES256")
    ps = {**jwk_of(keys.rsa.public_key(), "b", "PS256")}
    enc = {**jwk_of(keys.ed.public_key(), "c", "EdDSA"), "use": "enc"}
    assert set(parse_jwks(_jwks(es, ps, enc), ("ES256", "RS256", "EdDSA"))) == {"a"}


@pytest.mark.parametrize(
    "name,doc,reason",
    [
        ("not JSON", b"{", "not valid JSON"),
        ("no keys list", b'{"keys": {}}', "'keys' list"),
        ("no usable key", _jwks(), "no usable key"),
        ("a symmetric key", _jwks({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}), "symmetric key material"),
        ("too many keys", _jwks(*({"kty": "EC", "kid": str(i)} for i in range(65))), "more than 64"),
        ("a key without kid", _jwks({"kty": "EC", "crv": "P-256"}), "no valid 'kid'"),
        ("duplicate member", b'{"keys": [], "keys": []}', "duplicate member"),
    ],
)
def test_parse_jwks_refuses_a_bad_set(name: str, doc: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_jwks(doc, ("ES256",))


def test_parse_jwks_refuses_published_private_keys(keys: Keys) -> None:
    private = ECAlgorithm.to_jwk(keys.es, as_dict=True)
    with pytest.raises(ValueError, match="private or symmetric"):
        parse_jwks(_jwks({**private, "kid": "p"}), ("ES256",))


def test_parse_jwks_refuses_two_usable_keys_with_one_kid(keys: Keys) -> None:
    a = jwk_of(keys.es.public_key(), "same", "ES256")
    b = jwk_of(keys.evil.public_key(), "same", "ES256")
    with pytest.raises(ValueError, match="two usable keys"):
        parse_jwks(_jwks(a, b), ("ES256",))


def test_parse_jwks_skips_short_rsa_keys() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(ValueError, match="no usable key"):
        parse_jwks(_jwks(jwk_of(weak, "weak", "RS256")), ("RS256",))


# -- JWKS file source: refetch on unknown kid, rate-limited -----------------------------------


def test_file_source_rereads_on_unknown_kid_at_most_once_per_interval(tmp_path: Path, keys: Keys) -> None:
    clock = FakeClock(NOW)
    path = tmp_path / "jwks.json"
    path.write_bytes(keys.jwks("es"))
    source = JwksFileSource(path, algorithms=("ES256", "EdDSA"), clock=clock, refetch_min_interval=30)
    cfg = config(algorithms=("ES256", "EdDSA"))
    v = TokenVerifier(cfg, force=FORCE, keys=source, clock=clock)

    assert "unknown" in refused(v, mint(keys, alg="EdDSA", kid="ed-1"))
    assert source.reloads == 0  # just loaded at construction: inside the interval
    clock.advance(31)
    assert "unknown" in refused(v, mint(keys, alg="EdDSA", kid="ed-1"))
    assert source.reloads == 1
    assert "unknown" in refused(v, mint(keys, alg="EdDSA", kid="nope"))
    assert source.reloads == 1  # a second unknown kid inside the interval: no re-read

    path.write_bytes(keys.jwks("es", "ed"))  # the IdP rotated in a new key
    clock.advance(31)
    assert run(v.verify(mint(keys, alg="EdDSA", kid="ed-1"))).officer_id == "tvp-4711"
    assert source.reloads == 2


def test_file_source_keeps_the_last_good_keys_if_the_file_breaks(tmp_path: Path, keys: Keys) -> None:
    clock = FakeClock(NOW)
    path = tmp_path / "jwks.json"
    path.write_bytes(keys.jwks("es"))
    source = JwksFileSource(path, algorithms=("ES256",), clock=clock, refresh_interval=10)
    path.write_bytes(b"{ half-written")
    clock.advance(40)
    assert run(source.get("es-1")) is not None
    assert source.reloads == 1


def test_file_source_reports_a_bad_file_at_start(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(b"[]")
    with pytest.raises(ConfigError, match=r"jwks.json.*'keys' list"):
        JwksFileSource(path, algorithms=("ES256",), clock=FakeClock())


# -- HTTPS JWKS source: a loopback server with a test CA ---------------------------------------


class _JwksServer:
    """A loopback HTTPS server serving a JWKS; can fail (outage) or redirect."""

    def __init__(self, cert: Path, key: Path, body: bytes) -> None:
        self.body = body
        self.mode = "ok"
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if outer.mode == "down":
                    self.send_response(503)
                    self.end_headers()
                    return
                if outer.mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://127.0.0.1:1/jwks.json")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def idp_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(CA, server cert, server key, another CA) for the loopback JWKS endpoint."""
    base = tmp_path_factory.mktemp("idp-pki")
    pki.init_ca(base / "ca", force="idp", network="test.psn")
    issued = pki.issue(
        base / "ca", pki.CertKind.APP_SERVER, out_stem=base / "jwks-server", app="jwks", ip_addresses=["127.0.0.1"]
    )
    pki.init_ca(base / "other", force="other", network="test.psn")
    return base / "ca" / "ca.pem", issued.cert_path, issued.key_path, base / "other" / "ca.pem"


@pytest.fixture
def jwks_server(idp_tls: tuple[Path, Path, Path, Path], keys: Keys) -> Iterator[_JwksServer]:
    server = _JwksServer(idp_tls[1], idp_tls[2], keys.jwks("es"))
    yield server
    server.close()


def _https(url: str, ca: Path, clock: FakeClock) -> HttpsJwksSource:
    return HttpsJwksSource(
        url,
        algorithms=("ES256", "EdDSA"),
        clock=clock,
        ca_file=ca,
        refetch_min_interval=30,
        refresh_interval=300,
        max_key_staleness=3600,
        timeout=5,
    )


def test_https_source_fetches_verifies_and_refetches_on_unknown_kid(
    jwks_server: _JwksServer, idp_tls: tuple[Path, Path, Path, Path], keys: Keys
) -> None:
    clock = FakeClock(NOW)
    source = _https(jwks_server.url, idp_tls[0], clock)
    v = TokenVerifier(config(algorithms=("ES256", "EdDSA")), force=FORCE, keys=source, clock=clock)
    assert run(v.verify(mint(keys))).officer_id == "tvp-4711"
    assert jwks_server.requests == 1

    # Unknown kid: one refetch, then none inside refetch_min_interval however many unknown kids come.
    clock.advance(31)
    for kid in ("x1", "x2", "x3"):
        assert "unknown" in refused(v, mint(keys, kid=kid))
    assert jwks_server.requests == 2

    jwks_server.body = keys.jwks("es", "ed")
    clock.advance(31)
    assert run(v.verify(mint(keys, alg="EdDSA", kid="ed-1"))).force == FORCE
    assert jwks_server.requests == 3


def test_https_source_survives_an_outage_until_max_staleness_then_fails_closed(
    jwks_server: _JwksServer, idp_tls: tuple[Path, Path, Path, Path], keys: Keys
) -> None:
    clock = FakeClock(NOW)
    source = _https(jwks_server.url, idp_tls[0], clock)
    assert run(source.get("es-1")) is not None

    jwks_server.mode = "down"
    clock.advance(301)  # keys due for refresh: the refresh fails, the last good keys serve on
    assert run(source.get("es-1")) is not None
    assert jwks_server.requests == 2
    clock.advance(3300)  # 3601 s since the last good fetch
    with pytest.raises(Unavailable, match=r"stale.*503"):
        run(source.get("es-1"))

    jwks_server.mode = "ok"
    clock.advance(31)
    assert run(source.get("es-1")) is not None  # recovered


def test_https_source_with_no_keys_ever_is_unavailable(idp_tls: tuple[Path, Path, Path, Path], keys: Keys) -> None:
    clock = FakeClock(NOW)
    source = _https("https://127.0.0.1:1/jwks.json", idp_tls[0], clock)
    with pytest.raises(Unavailable, match="no officer-token keys"):
        run(source.get("es-1"))
    with pytest.raises(Unavailable):
        run(source.get("es-1"))
    assert source.fetches == 1  # the retry waits for refetch_min_interval


def test_https_source_refuses_an_endpoint_not_signed_by_its_ca(
    jwks_server: _JwksServer, idp_tls: tuple[Path, Path, Path, Path]
) -> None:
    source = _https(jwks_server.url, idp_tls[3], FakeClock(NOW))
    with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
        run(source.get("es-1"))


def test_https_source_refuses_redirects(jwks_server: _JwksServer, idp_tls: tuple[Path, Path, Path, Path]) -> None:
    jwks_server.mode = "redirect"
    source = _https(jwks_server.url, idp_tls[0], FakeClock(NOW))
    with pytest.raises(Unavailable, match="redirect"):
        run(source.get("es-1"))


def test_https_source_refuses_an_oversized_document(
    jwks_server: _JwksServer, idp_tls: tuple[Path, Path, Path, Path]
) -> None:
    jwks_server.body = b" " * 300_000
    source = _https(jwks_server.url, idp_tls[0], FakeClock(NOW))
    with pytest.raises(Unavailable, match="larger than"):
        run(source.get("es-1"))


def test_https_source_refuses_plain_http() -> None:
    with pytest.raises(ConfigError, match="not https"):
        HttpsJwksSource("http://idp/jwks.json", algorithms=("ES256",), clock=FakeClock())


# -- configuration --------------------------------------------------------------------------


def _section(tmp_path: Path, body: str) -> Any:
    path = tmp_path / "gateway.toml"
    path.write_text(body)
    return TomlFile.load(path).root().table("tokens")


def test_from_section_reads_a_full_table(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text("{}")
    sec = _section(
        tmp_path,
        f'[tokens]\nissuer = "{ISS}"\naudience = "{AUD}"\nalgorithms = ["ES256", "EdDSA"]\n'
        'jwks_file = "jwks.json"\nleeway_seconds = 10\ncache_size = 5\n[tokens.claims]\nofficer_id = "warrant"\n',
    )
    cfg = TokenConfig.from_section(sec)
    assert cfg.algorithms == ("ES256", "EdDSA") and cfg.leeway == 10 and cfg.cache_size == 5
    assert cfg.jwks_file == tmp_path / "jwks.json" and cfg.claims.officer_id == "warrant"


@pytest.mark.parametrize(
    "extra,message",
    [
        ('algorithms = ["none"]\njwks_file = "j"', "'none' is never allowed"),
        ('algorithms = ["HS256"]\njwks_file = "j"', "'HS256' is never allowed"),
        ('algorithms = ["ES384"]\njwks_file = "j"', "not supported"),
        ('algorithms = ["ES256"]', "exactly one of jwks_file and jwks_url"),
        ('algorithms = ["ES256"]\njwks_file = "j"\njwks_url = "https://x/j"', "exactly one"),
        ('algorithms = ["ES256"]\njwks_url = "http://x/j"', "must be an https:// URL"),
        ('algorithms = ["ES256"]\njwks_file = "j"\nleeway_seconds = 301', "at most 300"),
        ('algorithms = ["ES256"]\njwks_file = "j"\nmax_key_staleness_seconds = 60', "at least refresh_interval"),
        ('algorithms = ["ES256"]\njwks_file = "j"\nalgorithm = "ES256"', "unknown key"),
    ],
)
def test_from_section_refuses_unsafe_or_wrong_settings(tmp_path: Path, extra: str, message: str) -> None:
    sec = _section(tmp_path, f'[tokens]\nissuer = "{ISS}"\naudience = "{AUD}"\n{extra}\n')
    with pytest.raises(ConfigError, match=message) as info:
        TokenConfig.from_section(sec)
    assert "gateway.toml" in str(info.value)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="never allowed"):
        replace(config(), algorithms=("none",))


def test_build_key_source_picks_the_configured_source(tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "jwks.json").write_bytes(keys.jwks("es"))
    assert isinstance(build_key_source(config(jwks_file=tmp_path / "jwks.json"), FakeClock()), JwksFileSource)
    https = config(jwks_file=None, jwks_url="https://idp.example/jwks.json")
    assert isinstance(build_key_source(https, FakeClock()), HttpsJwksSource)


# -- the UNSAFE development IdP -----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_dev_idp_tokens_verify_and_are_marked(tmp_path: Path, alg: str) -> None:
    idp = init_dev_idp(tmp_path / "idp", alg)
    assert stat.S_IMODE((tmp_path / "idp" / "idp.key").stat().st_mode) == 0o600
    loaded = DevIdp.load(tmp_path / "idp")
    assert loaded.kid == idp.kid
    token = loaded.issue(
        issuer=ISS, audience=AUD, force=FORCE, officer="tvp-1", units=["serocu"], roles=[], clearance="SC", now=NOW
    )
    assert jwt.get_unverified_header(token)["unsafe_dev_idp"] is True
    source = JwksFileSource(idp.jwks_path, algorithms=(alg,), clock=FakeClock(NOW))
    v = TokenVerifier(config(algorithms=(alg,)), force=FORCE, keys=source, clock=FakeClock(NOW))
    out = run(v.verify_token(token))
    assert out.unsafe_dev_idp and out.principal.units == ("serocu",)


def test_dev_idp_refuses_to_overwrite_and_to_load_a_readable_key(tmp_path: Path) -> None:
    init_dev_idp(tmp_path / "idp")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        init_dev_idp(tmp_path / "idp")
    os.chmod(tmp_path / "idp" / "idp.key", 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        DevIdp.load(tmp_path / "idp")


def test_cli_init_and_issue_warn_and_print_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token", "init-idp", "--out", str(tmp_path / "idp"), "--alg", "EdDSA"]) == 0
    assert "UNSAFE" in capsys.readouterr().err
    argv = ["token", "issue", "--idp", str(tmp_path / "idp"), "--issuer", ISS, "--audience", AUD]
    argv += ["--force", FORCE, "--officer", "tvp-9", "--unit", "serocu", "--role", "analyst", "--clearance", "SC"]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "UNSAFE" in out.err
    payload = jwt.decode(out.out.strip(), options={"verify_signature": False})
    assert payload["unsafe_dev_idp"] is True and payload["units"] == ["serocu"] and payload["force"] == FORCE


def test_cli_help_marks_the_dev_idp_unsafe(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["token", "--help"])
    assert "UNSAFE" in capsys.readouterr().out


def test_cli_verify_prints_the_principal_or_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.config

    idp = init_dev_idp(tmp_path / "idp")
    good = idp.issue(issuer=ISS, audience=AUD, force=FORCE, officer="tvp-1", units=[], roles=[], clearance="SC")
    cfg = config(jwks_file=idp.jwks_path, algorithms=("ES256",))

    class _Config:
        force = FORCE
        tokens = cfg

    monkeypatch.setattr(gateway.config, "load_config", lambda path: _Config())
    assert cli.main(["token", "verify", "--config", "x.toml", good]) == 0
    assert "officer tvp-1 of thames-valley" in capsys.readouterr().out
    assert cli.main(["token", "verify", "--config", "x.toml", good[:-4] + "AAAA"]) == 1
    assert "signature does not verify" in capsys.readouterr().out


def test_signatures_are_checked_with_the_key_bound_algorithm_only(keys: Keys) -> None:
    # An EdDSA token presented with kid of the ES256 key: refused before any signature work.
    v, _ = verifier(keys)
    assert "does not match key 'es-1'" in refused(v, mint(keys, alg="EdDSA", kid="es-1"))
    assert v.stats.signature_checks == 0


# -- benchmark (not a test: pytest -m bench) -------------------------------------------------------


@pytest.mark.bench
def test_bench_token_verify_with_and_without_cache(keys: Keys) -> None:
    import time

    n = 2000
    line = []
    for alg, kid in (("ES256", "es-1"), ("EdDSA", "ed-1"), ("RS256", "rsa-1")):
        token = mint(keys, alg=alg, kid=kid)
        rates = {}
        for label, size in (("uncached", 0), ("cached", 100)):
            v, _ = verifier(keys, cache_size=size)

            async def loop(v: TokenVerifier = v, token: str = token) -> None:
                for _ in range(n):
                    await v.verify(token)

            t0 = time.perf_counter()
            run(loop())
            rates[label] = n / (time.perf_counter() - t0)
        line.append(
            f"{alg} {rates['uncached']:.0f}/s -> {rates['cached']:.0f}/s (x{rates['cached'] / rates['uncached']:.1f})"
        )
    print("\ntoken verify uncached -> cached: " + " | ".join(line))
