"""gateway.client: a real grpc.aio server on 127.0.0.1 with mutual TLS stands in for the local listener.

The server echoes the metadata it received, so each test sees exactly what the
gateway would: the token, the purpose, nothing duplicated.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from gateway import client, pki
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway.errors import ConfigError
from gateway.principal import Purpose
from gateway.purpose import decode_text

NETWORK = "se.psn"
FORCE = "hampshire"
SERVER_NAME = f"gateway.{FORCE}.{NETWORK}"
PURPOSE = Purpose("investigation", "OP-ORCHID-17", "Témoin: blue van")
OTHER = Purpose("safeguarding", "INC-2291", "Welfare check")
ECHOED = ("authorization", "psn-purpose-code", "psn-purpose-case", "psn-purpose-text")


def token_with_exp(exp: float, n: int = 0) -> str:
    def seg(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'ES256'})}.{seg({'exp': exp, 'n': n})}.c2ln"


class Echo(intel_pb2_grpc.IntelligenceSearchServicer):  # type: ignore[misc]
    """Answers with one Match per echoed metadata entry: report_id = key, summary = value."""

    @staticmethod
    def _matches(context: grpc.aio.ServicerContext) -> list[intel_pb2.Match]:
        md = context.invocation_metadata() or ()
        return [intel_pb2.Match(report_id=k, summary=v) for k, v in md if k in ECHOED]

    async def Search(self, request: intel_pb2.SearchRequest, context: Any) -> intel_pb2.SearchResponse:
        peer = context.auth_context().get("x509_common_name", [b""])[0].decode()
        return intel_pb2.SearchResponse(
            matches=[*self._matches(context), intel_pb2.Match(report_id="peer", summary=peer)]
        )

    async def StreamMatches(self, request: intel_pb2.SearchRequest, context: Any) -> AsyncIterator[intel_pb2.Match]:
        for match in self._matches(context):
            yield match


def _echo_bytes(context: Any) -> bytes:
    md = context.invocation_metadata() or ()
    return json.dumps(sorted([k, v] for k, v in md if k in ECHOED)).encode()


def _streaming_handlers() -> grpc.GenericRpcHandler:
    """Client-streaming and bidi methods (raw bytes) that answer with the echoed metadata as JSON."""

    async def collect(requests: Any, context: Any) -> bytes:
        async for _ in requests:
            pass
        return _echo_bytes(context)

    async def bidi(requests: Any, context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield _echo_bytes(context)

    return grpc.method_handlers_generic_handler(
        "psn.test.Echo",
        {
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


EXPECTED_STREAM_ECHO = [["authorization", "Bearer c.s.t"], ["psn-purpose-case", "OP-ORCHID-17"]]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("client-pki")
    pki.init_ca(base / FORCE, force=FORCE, network=NETWORK)
    server = pki.issue(base / FORCE, pki.CertKind.GATEWAY_TLS, out_stem=base / "gateway-tls")
    app = pki.issue(base / FORCE, pki.CertKind.APP_CLIENT, out_stem=base / "app", app="analyst-desk")
    pki.init_ca(base / "other", force="surrey", network=NETWORK)
    return {
        "ca": base / FORCE / "ca.pem",
        "server_cert": server.cert_path,
        "server_key": server.key_path,
        "cert": app.cert_path,
        "key": app.key_path,
        "other_ca": base / "other" / "ca.pem",
    }


async def _serve(certs: dict[str, Path]) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    intel_pb2_grpc.add_IntelligenceSearchServicer_to_server(Echo(), server)
    server.add_generic_rpc_handlers((_streaming_handlers(),))
    credentials = grpc.ssl_server_credentials(
        [(certs["server_key"].read_bytes(), certs["server_cert"].read_bytes())],
        root_certificates=certs["ca"].read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


def with_server(certs: dict[str, Path], body: Callable[[str], Any]) -> Any:
    """Start the echo server, run `body(target)` (a coroutine function), stop the server."""

    async def main() -> Any:
        server, target = await _serve(certs)
        try:
            return await body(target)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def echoed(matches: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in matches:
        out.setdefault(m.report_id, []).append(m.summary)
    return out


def sync_channel(certs: dict[str, Path], target: str, token: Callable[[], str], **kw: Any) -> grpc.Channel:
    return client.secure_channel(
        target, ca=certs["ca"], cert=certs["cert"], key=certs["key"], server_name=SERVER_NAME, token=token, **kw
    )


# -- sync grpc ----------------------------------------------------------------------------------


def test_sync_channel_sends_token_and_purpose_over_mtls(certs: dict[str, Path]) -> None:
    def call(target: str) -> dict[str, list[str]]:
        with sync_channel(certs, target, lambda: "tok.en.one", purpose=PURPOSE) as channel:
            reply = intel_pb2_grpc.IntelligenceSearchStub(channel).Search(intel_pb2.SearchRequest(subject="van"))
        return echoed(reply.matches)

    seen = with_server(certs, lambda target: asyncio.to_thread(call, target))
    assert seen["authorization"] == ["Bearer tok.en.one"]
    assert seen["psn-purpose-code"] == ["investigation"] and seen["psn-purpose-case"] == ["OP-ORCHID-17"]
    assert decode_text(seen["psn-purpose-text"][0], max_len=100) == PURPOSE.text
    assert seen["peer"] == ["analyst-desk client"]  # the server saw the application's certificate


def test_a_per_call_purpose_replaces_the_default_without_duplicates(certs: dict[str, Path]) -> None:
    def call(target: str) -> dict[str, list[str]]:
        with sync_channel(certs, target, lambda: "t.t.t", purpose=PURPOSE) as channel:
            stub = intel_pb2_grpc.IntelligenceSearchStub(channel)
            reply = stub.Search(intel_pb2.SearchRequest(), metadata=client.purpose_metadata(OTHER))
        return echoed(reply.matches)

    seen = with_server(certs, lambda target: asyncio.to_thread(call, target))
    assert seen["psn-purpose-code"] == ["safeguarding"] and seen["psn-purpose-case"] == ["INC-2291"]
    assert seen["authorization"] == ["Bearer t.t.t"]


def test_without_a_purpose_none_is_sent(certs: dict[str, Path]) -> None:
    def call(target: str) -> dict[str, list[str]]:
        with sync_channel(certs, target, lambda: "t.t.t") as channel:
            reply = intel_pb2_grpc.IntelligenceSearchStub(channel).Search(intel_pb2.SearchRequest())
        return echoed(reply.matches)

    seen = with_server(certs, lambda target: asyncio.to_thread(call, target))
    assert "psn-purpose-code" not in seen  # the gateway refuses the call: the client does not invent one


def test_server_streaming_carries_the_metadata_too(certs: dict[str, Path]) -> None:
    def call(target: str) -> dict[str, list[str]]:
        with sync_channel(certs, target, lambda: "s.s.s", purpose=PURPOSE) as channel:
            return echoed(intel_pb2_grpc.IntelligenceSearchStub(channel).StreamMatches(intel_pb2.SearchRequest()))

    seen = with_server(certs, lambda target: asyncio.to_thread(call, target))
    assert seen["authorization"] == ["Bearer s.s.s"] and seen["psn-purpose-code"] == ["investigation"]


def test_the_gateway_certificate_must_match_the_server_name(certs: dict[str, Path]) -> None:
    def call(target: str) -> grpc.StatusCode:
        channel = client.secure_channel(
            target,
            ca=certs["ca"],
            cert=certs["cert"],
            key=certs["key"],
            server_name=f"gateway.surrey.{NETWORK}",
            token=lambda: "t.t.t",
        )
        with channel:
            try:
                intel_pb2_grpc.IntelligenceSearchStub(channel).Search(intel_pb2.SearchRequest(), timeout=5)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    assert with_server(certs, lambda target: asyncio.to_thread(call, target)) is grpc.StatusCode.UNAVAILABLE


def test_the_gateway_must_chain_to_the_given_ca(certs: dict[str, Path]) -> None:
    def call(target: str) -> grpc.StatusCode:
        channel = client.secure_channel(
            target,
            ca=certs["other_ca"],
            cert=certs["cert"],
            key=certs["key"],
            server_name=SERVER_NAME,
            token=lambda: "t.t.t",
        )
        with channel:
            try:
                intel_pb2_grpc.IntelligenceSearchStub(channel).Search(intel_pb2.SearchRequest(), timeout=5)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    assert with_server(certs, lambda target: asyncio.to_thread(call, target)) is grpc.StatusCode.UNAVAILABLE


def test_client_and_bidi_streams_carry_the_metadata(certs: dict[str, Path]) -> None:
    def call(target: str) -> tuple[Any, Any]:
        with sync_channel(certs, target, lambda: "c.s.t", purpose=PURPOSE) as channel:
            collect = channel.stream_unary("/psn.test.Echo/Collect")(iter([b"a", b"b"]))
            bidi = list(channel.stream_stream("/psn.test.Echo/Bidi")(iter([b"a"])))
        return json.loads(collect), json.loads(bidi[0])

    for echoed_md in with_server(certs, lambda target: asyncio.to_thread(call, target)):
        assert echoed_md[:2] == EXPECTED_STREAM_ECHO


def test_aio_client_and_bidi_streams_carry_the_metadata(certs: dict[str, Path]) -> None:
    async def body(target: str) -> tuple[Any, Any]:
        async with client.aio_secure_channel(
            target,
            ca=certs["ca"],
            cert=certs["cert"],
            key=certs["key"],
            server_name=SERVER_NAME,
            token=lambda: "c.s.t",
            purpose=PURPOSE,
        ) as channel:
            collect = await channel.stream_unary("/psn.test.Echo/Collect")(iter([b"a", b"b"]))
            bidi = [m async for m in channel.stream_stream("/psn.test.Echo/Bidi")(iter([b"a"]))]
        return json.loads(collect), json.loads(bidi[0])

    for echoed_md in with_server(certs, body):
        assert echoed_md[:2] == EXPECTED_STREAM_ECHO


# -- grpc.aio -----------------------------------------------------------------------------------


def test_aio_channel_with_an_async_token_callback(certs: dict[str, Path]) -> None:
    async def token() -> str:
        return "a.b.c"

    async def body(target: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        channel = client.aio_secure_channel(
            target,
            ca=certs["ca"].read_bytes(),
            cert=certs["cert"].read_bytes(),
            key=certs["key"].read_bytes(),
            server_name=SERVER_NAME,
            token=token,
            purpose=PURPOSE,
        )
        async with channel:
            stub = intel_pb2_grpc.IntelligenceSearchStub(channel)
            unary = await stub.Search(intel_pb2.SearchRequest(), metadata=client.purpose_metadata(OTHER))
            streamed = [m async for m in stub.StreamMatches(intel_pb2.SearchRequest())]
        return echoed(unary.matches), echoed(streamed)

    unary, streamed = with_server(certs, body)
    assert unary["authorization"] == ["Bearer a.b.c"] and unary["psn-purpose-code"] == ["safeguarding"]
    assert streamed["authorization"] == ["Bearer a.b.c"] and streamed["psn-purpose-code"] == ["investigation"]


def test_aio_channel_with_a_plain_token_callback(certs: dict[str, Path]) -> None:
    async def body(target: str) -> dict[str, list[str]]:
        async with client.aio_secure_channel(
            target,
            ca=certs["ca"],
            cert=certs["cert"],
            key=certs["key"],
            server_name=SERVER_NAME,
            token=lambda: "p.l.n",
            purpose=PURPOSE,
        ) as channel:
            return echoed(
                (await intel_pb2_grpc.IntelligenceSearchStub(channel).Search(intel_pb2.SearchRequest())).matches
            )

    assert with_server(certs, body)["authorization"] == ["Bearer p.l.n"]


# -- the token cache --------------------------------------------------------------------------------


def test_the_token_callback_is_called_again_only_near_expiry() -> None:
    now = [1000.0]
    calls: list[int] = []

    def fetch() -> str:
        calls.append(1)
        return token_with_exp(1100, len(calls))

    cache = client.TokenCache(fetch, refresh_margin=60, clock=lambda: now[0])
    first = cache.get()
    assert cache.get() == first and len(calls) == 1
    now[0] = 1039.0
    assert cache.get() == first and len(calls) == 1
    now[0] = 1041.0  # within 60 s of exp
    assert cache.get() != first and len(calls) == 2


def test_a_token_without_a_readable_exp_is_fetched_per_call() -> None:
    calls: list[int] = []

    def fetch() -> str:
        calls.append(1)
        return "opaque-token"

    cache = client.TokenCache(fetch)
    cache.get()
    cache.get()
    assert len(calls) == 2


def test_the_channel_refreshes_the_token_across_calls(certs: dict[str, Path]) -> None:
    issued: list[str] = []

    def fetch() -> str:
        issued.append(token_with_exp(time.time() + 30, len(issued)))  # inside the 60 s margin: always refreshed
        return issued[-1]

    def call(target: str) -> list[str]:
        with sync_channel(certs, target, fetch, purpose=PURPOSE) as channel:
            stub = intel_pb2_grpc.IntelligenceSearchStub(channel)
            return [echoed(stub.Search(intel_pb2.SearchRequest()).matches)["authorization"][0] for _ in range(2)]

    seen = with_server(certs, lambda target: asyncio.to_thread(call, target))
    assert seen == [f"Bearer {t}" for t in issued] and len(set(seen)) == 2


# -- the demo manifest ------------------------------------------------------------------------------


def _manifest(tmp_path: Path, certs: dict[str, Path], **override: Any) -> Path:
    force = {
        "local_address": "127.0.0.1:7402",
        "peer_address": "127.0.0.1:7442",
        "ca": str(certs["ca"]),
        "server_name": SERVER_NAME,
        "app": {"name": "analyst-desk", "cert": "pki/app.pem", "key": "pki/app.key"},
        "idp": "idp/hampshire",
        "issuer": "https://idp.hampshire.se.psn",
        "audience": "psn-gateway/hampshire",
    }
    force.update(override)
    doc = {
        "network": NETWORK,
        "forces": {FORCE: force},
        "applications": {"intel-search": {"force": FORCE, "services": ["psn.demo.intel.v1.IntelligenceSearch"]}},
    }
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(doc))
    return path


def test_from_manifest_resolves_paths_beside_the_manifest(tmp_path: Path, certs: dict[str, Path]) -> None:
    endpoint = client.from_manifest(_manifest(tmp_path, certs), FORCE)
    assert endpoint.local_address == "127.0.0.1:7402" and endpoint.server_name == SERVER_NAME
    assert endpoint.app.cert == tmp_path / "pki" / "app.pem" and endpoint.ca == certs["ca"]
    assert endpoint.idp == tmp_path / "idp" / "hampshire"
    manifest = client.load_manifest(tmp_path / "demo.json")
    assert manifest.applications["intel-search"] == (FORCE, ("psn.demo.intel.v1.IntelligenceSearch",))


@pytest.mark.parametrize(
    "override,message",
    [
        ({"local_address": ""}, "forces.hampshire.local_address"),
        ({"extra": 1}, "unknown key 'extra'"),
        ({"app": {"name": "x", "cert": "c"}}, "missing key 'key'"),
    ],
)
def test_a_bad_manifest_names_the_key(tmp_path: Path, certs: dict[str, Path], override: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        client.from_manifest(_manifest(tmp_path, certs, **override), FORCE)


def test_an_unknown_force_is_named(tmp_path: Path, certs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="'surrey' is not in the manifest"):
        client.from_manifest(_manifest(tmp_path, certs), "surrey")


def test_the_manifest_endpoint_makes_a_working_channel_with_dev_tokens(tmp_path: Path, certs: dict[str, Path]) -> None:
    from gateway.token import init_dev_idp

    init_dev_idp(tmp_path / "idp" / FORCE)
    path = _manifest(
        tmp_path, certs, app={"name": "analyst-desk", "cert": str(certs["cert"]), "key": str(certs["key"])}
    )

    def call(target: str) -> dict[str, list[str]]:
        endpoint = client.from_manifest(path, FORCE)
        endpoint = type(endpoint)(**{**endpoint.__dict__, "local_address": target})
        mint = endpoint.unsafe_dev_token(officer="hc-1", units=["serocu"], roles=["analyst"], clearance="SC")
        with endpoint.secure_channel(token=mint, purpose=PURPOSE) as channel:
            return echoed(intel_pb2_grpc.IntelligenceSearchStub(channel).Search(intel_pb2.SearchRequest()).matches)

    seen = with_server(certs, lambda target: asyncio.to_thread(call, target))
    token = seen["authorization"][0].removeprefix("Bearer ")
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["unsafe_dev_idp"] is True and claims["force"] == FORCE and claims["sub"] == "hc-1"


def test_pem_sources_that_do_not_exist_are_named(tmp_path: Path, certs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        client.secure_channel(
            "127.0.0.1:1",
            ca=tmp_path / "missing.pem",
            cert=certs["cert"],
            key=certs["key"],
            server_name=SERVER_NAME,
            token=lambda: "t",
        )


def test_the_example_calls_through_a_manifest(tmp_path: Path, certs: dict[str, Path]) -> None:
    import subprocess
    import sys

    from gateway.token import init_dev_idp

    init_dev_idp(tmp_path / "idp" / FORCE)
    example = Path(__file__).resolve().parents[2] / "examples" / "call_intel_search.py"

    def call(target: str) -> subprocess.CompletedProcess[str]:
        app = {"name": "analyst-desk", "cert": str(certs["cert"]), "key": str(certs["key"])}
        path = _manifest(tmp_path, certs, app=app, local_address=target)
        argv = [sys.executable, str(example), str(path), "BLUE TRANSIT", "--force", FORCE, "--text", "Témoin"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    result = with_server(certs, lambda target: asyncio.to_thread(call, target))
    assert result.returncode == 0, result.stderr
    assert "psn-purpose-code  []  : investigation" in result.stdout
    assert "psn-purpose-text  []  : T%C3%A9moin" in result.stdout


def test_the_example_names_a_bad_manifest_or_force_without_a_traceback(tmp_path: Path, certs: dict[str, Path]) -> None:
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[2] / "examples" / "call_intel_search.py"
    app = {"name": "analyst-desk", "cert": str(certs["cert"]), "key": str(certs["key"])}
    path = _manifest(tmp_path, certs, app=app)
    for args, said in (
        ([str(tmp_path / "missing.json"), "ALPHA"], "missing.json: cannot read manifest"),
        ([str(path), "ALPHA", "--force", "kent"], "force 'kent' is not in the manifest"),
    ):
        argv = [sys.executable, str(example), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result.stderr
        assert said in result.stderr and "Traceback" not in result.stderr, result.stderr
