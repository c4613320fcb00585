"""The admin listener: scraping over loopback, and a hostile client at every step of the request head."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from gateway import admin as admin_module
from gateway.admin import AdminServer
from gateway.errors import ConfigError
from gateway.metrics import GatewayMetrics, Registry

Health = Callable[[], dict[str, Any]]


@pytest.fixture(autouse=True)
def no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Hostile clients are routine: nothing here may log an error (asyncio's own logger included)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


def serving() -> dict[str, Any]:
    return {"serving": True, "audit": "ok", "policy_version": "sha256:abc"}


def not_serving() -> dict[str, Any]:
    return {"serving": False, "audit": "unwritable"}


def run_with_server(
    test: Callable[[int, AdminServer], Awaitable[None]],
    *,
    registry: Registry | None = None,
    health: Health = serving,
    **options: Any,
) -> None:
    async def main() -> None:
        server = AdminServer("127.0.0.1:0", registry=registry or Registry(), health=health, **options)
        port = await server.start()
        try:
            await test(port, server)
        finally:
            await server.stop()

    asyncio.run(main())


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    """Send `data`, then read until the server closes (10 s safety net: a hang fails the test)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def status_of(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 "), response[:200]
    return int(line.split(b" ")[1])


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


# -- scraping ------------------------------------------------------------------------------------


def test_metrics_are_scraped_in_the_0_0_4_text_format() -> None:
    registry = Registry()
    metrics = GatewayMetrics(registry)
    metrics.calls.inc(listener="peer", origin_force="surrey", application="intel-search", decision="allow", status="OK")

    async def test(port: int, _: AdminServer) -> None:
        status, headers, body = await in_thread(get, port, "/metrics")
        assert status == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert headers["connection"] == "close"
        assert headers["content-length"] == str(len(body))
        assert body == registry.expose()
        assert (
            b'psngw_calls_total{listener="peer",origin_force="surrey",application="intel-search",'
            b'decision="allow",status="OK"} 1\n' in body
        )
        status, _, again = await in_thread(get, port, "/metrics?ignored=query")
        assert status == 200 and again == body

    run_with_server(test, registry=registry)


def test_healthz_is_the_health_json_and_200_when_serving() -> None:
    async def test(port: int, _: AdminServer) -> None:
        status, headers, body = await in_thread(get, port, "/healthz")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == serving()
        status, _, body = await in_thread(get, port, "/readyz")
        assert (status, body) == (200, b"ready\n")

    run_with_server(test)


@pytest.mark.parametrize(
    "health",
    [
        not_serving,
        lambda: {"audit": "ok"},  # no "serving" key
        lambda: {"serving": "true"},  # only True itself is serving
        lambda: {"serving": 1},
    ],
    ids=["false", "missing", "string", "one"],
)
def test_healthz_and_readyz_are_503_unless_serving_is_true(health: Health) -> None:
    async def test(port: int, _: AdminServer) -> None:
        status, _, body = await in_thread(get, port, "/healthz")
        assert status == 503
        assert json.loads(body) == health()
        status, _, body = await in_thread(get, port, "/readyz")
        assert (status, body) == (503, b"not ready\n")

    run_with_server(test, health=health)


def test_a_failing_health_check_is_503_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("secret internal detail /var/lib/psngw/audit.db")

    async def test(port: int, _: AdminServer) -> None:
        status, _, body = await in_thread(get, port, "/healthz")
        assert status == 503
        assert json.loads(body) == {"serving": False, "error": "health check failed"}
        assert b"secret" not in body and b"Traceback" not in body

    with caplog.at_level(logging.ERROR, logger="psngw.admin"):
        run_with_server(test, health=broken)
    assert "health check failed" in caplog.text
    caplog.clear()  # the one error this test expects


def test_a_failing_exposition_is_a_bare_500(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Registry):
        def expose(self) -> bytes:
            raise RuntimeError("secret internal detail")

    async def test(port: int, _: AdminServer) -> None:
        status, _, body = await in_thread(get, port, "/metrics")
        assert (status, body) == (500, b"internal server error\n")

    with caplog.at_level(logging.ERROR, logger="psngw.admin"):
        run_with_server(test, registry=Broken())
    assert "exposition failed" in caplog.text
    caplog.clear()  # the one error this test expects


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/metrics/", "/METRICS", "/healthz/../metrics", "/debug/pprof"])
def test_unknown_paths_are_404(path: str) -> None:
    async def test(port: int, _: AdminServer) -> None:
        status, _, body = await in_thread(get, port, path)
        assert (status, body) == (404, b"not found\n")

    run_with_server(test)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD", "OPTIONS", "TRACE"])
def test_methods_other_than_get_are_405(method: str) -> None:
    async def test(port: int, _: AdminServer) -> None:
        response = await in_thread(raw, port, f"{method} /metrics HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status_of(response) == 405
        assert b"\r\nAllow: GET\r\n" in response

    run_with_server(test)


BAD_REQUESTS = {
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello
    "no-version": b"GET /metrics\r\n\r\n",
    "http-2": b"GET /metrics HTTP/2.0\r\n\r\n",
    "extra-space": b"GET  /metrics HTTP/1.1\r\n\r\n",
    "absolute-form": b"GET http://127.0.0.1/metrics HTTP/1.1\r\n\r\n",
    "control-in-target": b"GET /met\x01rics HTTP/1.1\r\n\r\n",
    "non-ascii-target": "GET /métrics HTTP/1.1\r\n\r\n".encode(),
    "header-no-colon": b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n",
    "space-before-colon": b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",
    "obs-fold": b"GET /metrics HTTP/1.1\r\nX-A: b\r\n  continued\r\n\r\n",
    "nul-in-value": b"GET /metrics HTTP/1.1\r\nX-A: b\x00c\r\n\r\n",
    "body": b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-lengths": b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    "bad-length": b"GET /metrics HTTP/1.1\r\nContent-Length: -0\r\n\r\n",
    "two-hosts": b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "eof-mid-head": b"GET /metrics HTTP/1.1\r\nHost: a\r\n",
}


@pytest.mark.parametrize("request_bytes", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_malformed_requests_are_400_and_the_server_keeps_serving(request_bytes: bytes) -> None:
    def send_and_half_close(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_bytes)
            sock.shutdown(socket.SHUT_WR)  # so "eof-mid-head" is an end of input, not a slow client
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out

    async def test(port: int, _: AdminServer) -> None:
        response = await in_thread(send_and_half_close, port)
        assert status_of(response) == 400
        assert b"Traceback" not in response
        assert (await in_thread(get, port, "/metrics"))[0] == 200

    run_with_server(test)


def test_well_formed_variants_are_accepted() -> None:
    async def test(port: int, _: AdminServer) -> None:
        for request in (
            b"GET /metrics HTTP/1.0\r\n\r\n",
            b"\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",  # an empty line before the request line
            b"GET /metrics HTTP/1.1\nHost: x\n\n",  # bare LF line ends
            b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\nX-Tab:\tvalue\t\r\n\r\n",
        ):
            response = await in_thread(raw, port, request)
            assert status_of(response) == 200, request
            assert b"\r\nConnection: close\r\n" in response

    run_with_server(test)


def test_an_oversized_header_is_refused_and_the_server_keeps_serving() -> None:
    async def test(port: int, _: AdminServer) -> None:
        big = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 16_384 + b"\r\n\r\n"
        assert status_of(await in_thread(raw, port, big)) == 431
        long_line = b"GET /" + b"m" * 9000 + b" HTTP/1.1\r\n\r\n"
        assert status_of(await in_thread(raw, port, long_line)) == 431
        many = b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n"
        assert status_of(await in_thread(raw, port, many)) == 431
        # each line under the bound, the head over it in sum
        total = b"GET /metrics HTTP/1.1\r\n" + (b"X-Part: " + b"b" * 1000 + b"\r\n") * 9 + b"\r\n"
        assert status_of(await in_thread(raw, port, total)) == 431
        assert (await in_thread(get, port, "/metrics"))[0] == 200

    run_with_server(test)


def test_a_slow_client_is_timed_out_while_still_sending() -> None:
    async def test(port: int, _: AdminServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        finished = False

        async def trickle() -> None:
            nonlocal finished
            writer.write(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            for _ in range(400):  # one byte every 50 ms: 20 s if nobody stops it
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.05)
            finished = True

        sender = asyncio.create_task(trickle())
        try:
            response = await asyncio.wait_for(reader.read(), timeout=10)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
        assert status_of(response) == 408
        assert not finished  # cut off while still sending, not after it gave up
        assert (await in_thread(get, port, "/metrics"))[0] == 200

    run_with_server(test, read_timeout=0.3)


def test_a_silent_client_is_timed_out() -> None:
    def connect_and_wait(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out

    async def test(port: int, _: AdminServer) -> None:
        assert status_of(await in_thread(connect_and_wait, port)) == 408

    run_with_server(test, read_timeout=0.2)


def test_connections_beyond_the_bound_are_503_and_the_bound_frees_up() -> None:
    async def test(port: int, server: AdminServer) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        while len(server._tasks) < 3:  # wait for the server to accept them all
            await asyncio.sleep(0.01)
        try:
            response = await in_thread(raw, port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert status_of(response) == 503
        finally:
            for _, writer in idle:
                writer.close()
                await asyncio.gather(writer.wait_closed(), return_exceptions=True)
        while server._tasks:
            await asyncio.sleep(0.01)
        assert (await in_thread(get, port, "/metrics"))[0] == 200

    run_with_server(test, max_connections=3)


def test_stop_drops_idle_connections() -> None:
    async def main() -> None:
        server = AdminServer("127.0.0.1:0", registry=Registry(), health=serving)
        port = await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metr")
        await writer.drain()
        while not server._tasks:
            await asyncio.sleep(0.01)
        await server.stop()
        try:
            assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        except ConnectionResetError:
            pass  # dropped with a reset: also dropped
        finally:
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
        await server.stop()  # idempotent

    asyncio.run(main())


# -- binding -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["0.0.0.0:9401", "[::]:9401", "192.0.2.10:9401", "admin.example.org:9401", "[::ffff:0.0.0.0]:9401"],
)
def test_a_non_loopback_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address") as info:
        AdminServer(address, registry=Registry(), health=serving)
    assert info.value.field == "listeners.admin"
    assert "traffic patterns" in str(info.value)
    assert "allow_remote" not in str(info.value)  # not a config key: operators cannot set it


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1:9401", True), ("localhost:9401", True), ("[::1]:9401", True), ("0.0.0.0:9401", False)],
)
def test_is_loopback_address_agrees_with_the_server(address: str, loopback: bool) -> None:
    assert admin_module.is_loopback_address(address) is loopback


@pytest.mark.parametrize("address", ["9401", "127.0.0.1", "127.0.0.1:99999", ":9401", "[::1:9401"])
def test_a_malformed_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError):
        AdminServer(address, registry=Registry(), health=serving)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:0",
        "localhost:0",
        "127.8.9.10:0",
        pytest.param("[::1]:0", marks=pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")),
    ],
)
def test_loopback_addresses_bind(address: str) -> None:
    async def main() -> None:
        server = AdminServer(address, registry=Registry(), health=serving)
        port = await server.start()
        try:
            assert port > 0 and server.port == port
        finally:
            await server.stop()

    asyncio.run(main())


def test_allow_remote_binds_and_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Pretend 127.0.0.1 is remote: the gate is exercised without listening on a real interface.
    monkeypatch.setattr(admin_module, "_is_loopback", lambda host: False)
    with pytest.raises(ConfigError, match="not a loopback address"):
        AdminServer("127.0.0.1:0", registry=Registry(), health=serving)

    async def test(port: int, _: AdminServer) -> None:
        assert (await in_thread(get, port, "/metrics"))[0] == 200

    with caplog.at_level(logging.WARNING, logger="psngw.admin"):
        run_with_server(test, allow_remote=True)
    assert "non-loopback" in caplog.text


def test_a_port_in_use_is_a_config_error() -> None:
    async def main() -> None:
        first = AdminServer("127.0.0.1:0", registry=Registry(), health=serving)
        port = await first.start()
        try:
            second = AdminServer(f"127.0.0.1:{port}", registry=Registry(), health=serving)
            with pytest.raises(ConfigError, match="cannot listen"):
                await second.start()
        finally:
            await first.stop()

    asyncio.run(main())
