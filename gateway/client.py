"""For application developers: a secure channel to your force's gateway.

An application calls lead-force-hosted applications with its ordinary generated
stubs, pointed at its own force's gateway (the local listener). This module
makes the channel: mutual TLS with the application's certificate and key,
verifying the gateway against the force CA and its server name
``gateway.<force>.<network>``, and on every call the officer's token
(``authorization: Bearer <jwt>``) and the purpose (``psn-purpose-*``, see
`gateway.purpose` and `gateway.metadata` for the metadata contract)::

    from gateway import client
    from gateway.principal import Purpose
    from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc

    channel = client.secure_channel(
        "127.0.0.1:7402",
        ca="pki/hampshire/ca.pem",
        cert="pki/hampshire/app-analyst-desk-client.pem",
        key="pki/hampshire/app-analyst-desk-client.key",
        server_name="gateway.hampshire.se.psn",
        token=my_idp_session.access_token,          # a callable returning the officer's JWT
        purpose=Purpose("investigation", "OP-ORCHID-17", "Vehicle sighting follow-up"),
    )
    stub = intel_pb2_grpc.IntelligenceSearchStub(channel)
    reply = stub.Search(intel_pb2.SearchRequest(subject="ALPHA"))
    # another purpose for one call:
    other = Purpose("safeguarding", "INC-2291", "Welfare check")
    stub.Search(request, metadata=client.purpose_metadata(other))

`aio_secure_channel` is the same for ``grpc.aio``. The token callback is called
when there is no cached token or the cached one expires within
``token_refresh_margin`` seconds (its ``exp`` is read, not verified: the
gateway verifies). A purpose passed in a call's metadata replaces the
channel's default purpose for that call.

The demo manifest. ``psngw demo`` writes ``demo.json``; `load_manifest` and
`from_manifest` read it. Paths are relative to the manifest's folder::

    {
      "network": "se.psn",
      "forces": {
        "hampshire": {
          "local_address": "127.0.0.1:7402",      # the gateway's local listener (apps call this)
          "peer_address": "127.0.0.1:7442",       # its peer listener (gateways call this)
          "ca": "pki/hampshire/ca.pem",           # the force CA (verifies the gateway)
          "server_name": "gateway.hampshire.se.psn",
          "app": {"name": "analyst-desk",         # a client application of this force
                  "cert": "pki/hampshire/app-analyst-desk-client.pem",
                  "key": "pki/hampshire/app-analyst-desk-client.key"},
          "idp": "idp/hampshire",                 # UNSAFE dev IdP folder (psngw token init-idp)
          "issuer": "https://idp.hampshire.se.psn",
          "audience": "psn-gateway/hampshire"
        }
      },
      "applications": {
        "intel-search": {"force": "thames-valley",  # the hosting force
                         "services": ["psn.demo.intel.v1.IntelligenceSearch"]}
      }
    }

Every key shown is required; unknown keys are refused (a `ConfigError` naming
the file and key).

Owns: the client side of the local listener's contract. Does not own: the
metadata contract itself (`gateway.metadata`), verifying tokens (the gateway).
"""

from __future__ import annotations

import base64
import collections
import inspect
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import grpc.aio

from gateway.errors import ConfigError
from gateway.principal import Purpose
from gateway.purpose import PURPOSE_PREFIX, purpose_metadata

__all__ = [
    "ApplicationCredentials",
    "ForceEndpoint",
    "Manifest",
    "TokenCache",
    "aio_secure_channel",
    "from_manifest",
    "load_manifest",
    "purpose_metadata",
    "secure_channel",
]

PemSource = bytes | str | Path
TokenCallback = Callable[[], str]
AsyncTokenCallback = Callable[[], str | Awaitable[str]]


def _pem(source: PemSource, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror or exc}", file=path) from exc


def _credentials(ca: PemSource, cert: PemSource, key: PemSource) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca, "CA certificate"),
        private_key=_pem(key, "application key"),
        certificate_chain=_pem(cert, "application certificate"),
    )


def _options(server_name: str, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    # Connect to an address, verify the gateway's certificate for its name.
    return [("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name), *options]


def _unverified_exp(token: str) -> float | None:
    """The token's ``exp`` claim, read without verification (only to time a refresh)."""
    try:
        segment = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
    except (IndexError, ValueError):
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


class TokenCache:
    """Calls a token callback when there is no token or the cached one nears expiry (thread-safe)."""

    def __init__(
        self, fetch: TokenCallback, *, refresh_margin: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._fetch = fetch
        self._margin = refresh_margin
        self._clock = clock
        self._token: str | None = None
        self._exp: float | None = None
        self._lock = threading.Lock()

    def _fresh(self) -> str | None:
        if self._token is not None and self._exp is not None and self._clock() < self._exp - self._margin:
            return self._token
        return None

    def _store(self, token: str) -> str:
        self._token, self._exp = token, _unverified_exp(token)
        return token

    def get(self) -> str:
        """A token: the cached one if it is not near expiry, else a new one from the callback."""
        with self._lock:
            return self._fresh() or self._store(self._fetch())


class _AsyncTokenCache(TokenCache):
    """`TokenCache` whose callback may be a coroutine function."""

    def __init__(self, fetch: AsyncTokenCallback, *, refresh_margin: float = 60.0) -> None:
        super().__init__(lambda: "", refresh_margin=refresh_margin)
        self._afetch = fetch

    async def aget(self) -> str:
        token = self._fresh()
        if token is not None:
            return token
        result = self._afetch()
        if inspect.isawaitable(result):
            result = await result
        return self._store(result)


def _call_metadata(
    existing: Iterable[tuple[str, str | bytes]] | None, token: str, purpose: tuple[tuple[str, str], ...]
) -> list[tuple[str, str | bytes]]:
    items = list(existing or ())
    has_purpose = any(k.startswith(PURPOSE_PREFIX) for k, _ in items)
    out: list[tuple[str, str | bytes]] = [(k, v) for k, v in items if k != "authorization"]
    out.append(("authorization", f"Bearer {token}"))
    if not has_purpose:
        out.extend(purpose)
    return out


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """grpc.ClientCallDetails with new metadata."""


class _Interceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token and the default purpose to every call (sync grpc)."""

    def __init__(self, tokens: TokenCache, purpose: Purpose | None) -> None:
        self._tokens = tokens
        self._purpose = purpose_metadata(purpose) if purpose else ()

    def _details(self, d: Any) -> _CallDetails:
        metadata = _call_metadata(d.metadata, self._tokens.get(), self._purpose)
        return _CallDetails(
            d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None), d.compression
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Add token and purpose."""
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Add token and purpose."""
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        """Add token and purpose."""
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        """Add token and purpose."""
        return continuation(self._details(client_call_details), request_iterator)


class _AioBase:
    def __init__(self, tokens: _AsyncTokenCache, purpose: Purpose | None) -> None:
        self._tokens = tokens
        self._purpose = purpose_metadata(purpose) if purpose else ()

    async def _details(self, d: Any) -> Any:
        metadata = _call_metadata(d.metadata, await self._tokens.aget(), self._purpose)
        return grpc.aio.ClientCallDetails(
            d.method, d.timeout, grpc.aio.Metadata(*metadata), d.credentials, d.wait_for_ready
        )


class _AioUnaryUnary(_AioBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self._details(client_call_details), request)


class _AioUnaryStream(_AioBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self._details(client_call_details), request)


class _AioStreamUnary(_AioBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(await self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(await self._details(client_call_details), request_iterator)


def secure_channel(
    target: str,
    *,
    ca: PemSource,
    cert: PemSource,
    key: PemSource,
    server_name: str,
    token: TokenCallback,
    purpose: Purpose | None = None,
    options: Sequence[tuple[str, Any]] = (),
    token_refresh_margin: float = 60.0,
) -> grpc.Channel:
    """A grpc channel to the local gateway at `target` with mTLS, token and default purpose on every call.

    `ca`, `cert` and `key` are PEM bytes or file paths. `token` returns the
    officer's JWT. `purpose` is the default purpose; a call whose metadata has
    ``psn-purpose-*`` entries (`purpose_metadata`) uses those instead.
    """
    channel = grpc.secure_channel(target, _credentials(ca, cert, key), options=_options(server_name, options))
    tokens = TokenCache(token, refresh_margin=token_refresh_margin)
    return grpc.intercept_channel(channel, _Interceptor(tokens, purpose))


def aio_secure_channel(
    target: str,
    *,
    ca: PemSource,
    cert: PemSource,
    key: PemSource,
    server_name: str,
    token: AsyncTokenCallback,
    purpose: Purpose | None = None,
    options: Sequence[tuple[str, Any]] = (),
    token_refresh_margin: float = 60.0,
) -> grpc.aio.Channel:
    """`secure_channel` for grpc.aio; `token` may be a plain or a coroutine function."""
    tokens = _AsyncTokenCache(token, refresh_margin=token_refresh_margin)
    interceptors = [
        cls(tokens, purpose) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    ]
    return grpc.aio.secure_channel(
        target, _credentials(ca, cert, key), options=_options(server_name, options), interceptors=interceptors
    )


# -- the demo manifest --------------------------------------------------------------


@dataclass(frozen=True)
class ApplicationCredentials:
    """A client application's name, certificate and key files."""

    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class ForceEndpoint:
    """One force as the demo manifest describes it: where its gateway is and how to call it."""

    network: str
    force: str
    local_address: str
    peer_address: str
    ca: Path
    server_name: str
    app: ApplicationCredentials
    idp: Path
    issuer: str
    audience: str

    def secure_channel(self, *, token: TokenCallback, purpose: Purpose | None = None, **kw: Any) -> grpc.Channel:
        """`secure_channel` to this force's local listener with the manifest's application certificate."""
        return secure_channel(
            self.local_address,
            ca=self.ca,
            cert=self.app.cert,
            key=self.app.key,
            server_name=self.server_name,
            token=token,
            purpose=purpose,
            **kw,
        )

    def aio_secure_channel(
        self, *, token: AsyncTokenCallback, purpose: Purpose | None = None, **kw: Any
    ) -> grpc.aio.Channel:
        """`aio_secure_channel` to this force's local listener."""
        return aio_secure_channel(
            self.local_address,
            ca=self.ca,
            cert=self.app.cert,
            key=self.app.key,
            server_name=self.server_name,
            token=token,
            purpose=purpose,
            **kw,
        )

    def unsafe_dev_token(
        self, *, officer: str, units: Sequence[str], roles: Sequence[str], clearance: str, ttl: float = 900.0
    ) -> TokenCallback:
        """UNSAFE, demo only: a token callback that mints tokens from the demo's development IdP."""
        from gateway.token import DevIdp  # noqa: PLC0415  # the dev IdP is for the demo only

        idp = DevIdp.load(self.idp)

        def mint() -> str:
            return idp.issue(
                issuer=self.issuer,
                audience=self.audience,
                force=self.force,
                officer=officer,
                units=units,
                roles=roles,
                clearance=clearance,
                ttl=ttl,
            )

        return mint


@dataclass(frozen=True)
class Manifest:
    """The demo manifest: the network, each force's endpoint, and which force hosts which application."""

    path: Path
    network: str
    forces: Mapping[str, ForceEndpoint]
    #: application -> (hosting force, its gRPC services)
    applications: Mapping[str, tuple[str, tuple[str, ...]]]


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.path, field=where or None)

    def obj(self, value: Any, where: str, keys: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "expected an object")
        missing = [k for k in keys if k not in value]
        if missing:
            raise self.fail(where, f"missing key {missing[0]!r}")
        unknown = [k for k in value if k not in keys]
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r}")
        return value

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict) or not value:
            raise self.fail(where, "expected a non-empty object")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, "expected a non-empty string")
        return value

    def file(self, value: Any, where: str) -> Path:
        path = Path(self.text(value, where))
        return path if path.is_absolute() else self.path.parent / path


_FORCE_KEYS = ("local_address", "peer_address", "ca", "server_name", "app", "idp", "issuer", "audience")


def load_manifest(path: Path | str) -> Manifest:
    """Read and check a demo manifest; `ConfigError` naming the file and key if it is wrong."""
    path = Path(path)
    r = _Reader(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read manifest: {exc.strerror or exc}", file=path) from exc
    except ValueError as exc:
        raise ConfigError(f"manifest is not JSON: {exc}", file=path) from exc
    root = r.obj(doc, "", ("network", "forces", "applications"))
    network = r.text(root["network"], "network")
    forces: dict[str, ForceEndpoint] = {}
    for name, raw in r.mapping(root["forces"], "forces").items():
        where = f"forces.{name}"
        f = r.obj(raw, where, _FORCE_KEYS)
        app = r.obj(f["app"], f"{where}.app", ("name", "cert", "key"))
        forces[name] = ForceEndpoint(
            network=network,
            force=name,
            local_address=r.text(f["local_address"], f"{where}.local_address"),
            peer_address=r.text(f["peer_address"], f"{where}.peer_address"),
            ca=r.file(f["ca"], f"{where}.ca"),
            server_name=r.text(f["server_name"], f"{where}.server_name"),
            app=ApplicationCredentials(
                r.text(app["name"], f"{where}.app.name"),
                r.file(app["cert"], f"{where}.app.cert"),
                r.file(app["key"], f"{where}.app.key"),
            ),
            idp=r.file(f["idp"], f"{where}.idp"),
            issuer=r.text(f["issuer"], f"{where}.issuer"),
            audience=r.text(f["audience"], f"{where}.audience"),
        )
    applications: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, raw in r.mapping(root["applications"], "applications").items():
        where = f"applications.{name}"
        a = r.obj(raw, where, ("force", "services"))
        host = r.text(a["force"], f"{where}.force")
        if host not in forces:
            raise r.fail(f"{where}.force", f"force {host!r} is not in the manifest's forces")
        services = a["services"]
        if not isinstance(services, list) or not services:
            raise r.fail(f"{where}.services", "expected a non-empty list of service names")
        applications[name] = (host, tuple(r.text(s, f"{where}.services") for s in services))
    return Manifest(path, network, MappingProxyType(forces), MappingProxyType(applications))


def from_manifest(path: Path | str, force: str) -> ForceEndpoint:
    """The endpoint of `force` in the demo manifest at `path`."""
    manifest = load_manifest(path)
    if force not in manifest.forces:
        raise ConfigError(
            f"force {force!r} is not in the manifest (forces: {', '.join(manifest.forces)})", file=manifest.path
        )
    return manifest.forces[force]
