"""The admin listener: Prometheus metrics and health over plaintext HTTP/1.1, on loopback.

Owns: a deliberately small HTTP server (asyncio streams, no framework) with
three routes:

- ``GET /metrics``: `Registry.expose` (run in a worker thread, one at a time),
  ``text/plain; version=0.0.4``;
- ``GET /healthz``: the JSON of ``health()``; 200 if ``health()["serving"]`` is
  ``True``, else 503 (as is a health callable that raises);
- ``GET /readyz``: the same decision with a one-word body, for load balancers
  and container health checks.

Anything else is 404, a method other than GET is 405, a malformed request is
400. Does not own: what the metrics or the health dict contain (the server
does), TLS (there is none: see below), or its configuration (``[listeners]
admin`` in the gateway config).

Why loopback only by default: the listener has no TLS and no authentication,
and the metrics reveal traffic patterns: which forces call which applications,
how often, when, how many are refused and why. On a shared network that is
intelligence in itself. Binding anything but a loopback address is a
`ConfigError` unless the caller passes ``allow_remote=True`` (logged as a
warning); the gateway never does, and its config refuses a ``[listeners]
admin`` beyond loopback (`is_loopback_address`). The way to scrape from
elsewhere is a local agent or an authenticated proxy.

It is a hostile-input edge even on loopback (any local process can connect):
one request per connection (``Connection: close``), a bounded request head
(8 KiB by default, at most 100 header lines), one deadline for reading the whole
head (a slow client gets 408 and is dropped), no request body, a bound on
concurrent connections (beyond it 503; beyond twice it the connection is reset
unread), a bounded lingering close so error responses are not lost to a TCP
reset, and never a traceback to the client: unexpected errors are logged here
and the client gets a bare 500.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.errors import ConfigError
from gateway.metrics import CONTENT_TYPE, Registry
from gateway.tomlconf import parse_address

__all__ = ["NOT_LOOPBACK", "AdminServer", "is_loopback_address"]

_log = logging.getLogger("psngw.admin")

_MAX_HEADER_LINES: Final = 100
_LINGER_BYTES: Final = 64 * 1024
_LINGER_SECONDS: Final = 1.0
_OVERLOADED_LINGER_SECONDS: Final = 0.25
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_VERSIONS: Final = frozenset({b"HTTP/1.0", b"HTTP/1.1"})
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_FIELD: Final = "listeners.admin"

#: Why an admin address must be loopback (after the address, in the error).
NOT_LOOPBACK: Final = (
    "is not a loopback address; the admin listener has no TLS or authentication and its metrics reveal"
    " traffic patterns between forces"
)


@dataclass(frozen=True)
class _Request:
    """A parsed request head: method, path (without query) and lower-cased header names."""

    method: str
    path: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        head = [
            f"HTTP/1.1 {self.status} {_REASONS[self.status]}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            *(f"{name}: {value}" for name, value in self.extra_headers),
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + self.body


def _text(status: int, text: str | None = None) -> _Response:
    return _Response(status, ((text if text is not None else _REASONS[status].lower()) + "\n").encode())


class _BadRequest(Exception):
    """The request head is malformed or too large: answered with `status`, then closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class AdminServer:
    """The admin HTTP listener for `/metrics`, `/healthz` and `/readyz`.

    `address` is ``host:port`` (``[v6]:port`` for IPv6; port 0 picks a free
    port, `start` returns it). `health` returns a JSON-able dict whose
    ``"serving"`` key must be ``True`` for 200. Raises `ConfigError` when
    `address` is malformed, or is not loopback and `allow_remote` is false.
    """

    def __init__(
        self,
        address: str,
        *,
        registry: Registry,
        health: Callable[[], dict[str, Any]],
        allow_remote: bool = False,
        read_timeout: float = 5.0,
        write_timeout: float = 10.0,
        max_head_bytes: int = 8 * 1024,
        max_connections: int = 32,
    ) -> None:
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            raise ConfigError(str(exc), field=_FIELD) from exc
        host = _bind_host(host)
        self._loopback = _is_loopback(host)
        if not self._loopback and not allow_remote:
            raise ConfigError(f"{address!r} {NOT_LOOPBACK}", field=_FIELD)
        if read_timeout <= 0 or write_timeout <= 0 or max_head_bytes < 256 or max_connections < 1:
            raise ValueError("admin server bounds must be positive (max_head_bytes at least 256)")
        self._host = host
        self._port = port
        self._address = address
        self._registry = registry
        self._health = health
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._max_head = max_head_bytes
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._expose_lock = asyncio.Lock()

    @property
    def port(self) -> int:
        """The bound port (after `start`), or the configured one."""
        return self._port

    async def start(self) -> int:
        """Listen; return the bound port. Raises `ConfigError` if the address cannot be bound."""
        if self._server is not None:
            raise RuntimeError("admin server already started")
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=self._max_head, reuse_address=True
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self._address}: {exc.strerror or exc}", field=_FIELD) from exc
        self._port = int(self._server.sockets[0].getsockname()[1])
        if not self._loopback:
            _log.warning(
                "admin listener on non-loopback address %s:%d: metrics and health are readable without"
                " authentication by anyone who can reach it",
                self._host,
                self._port,
                extra={"address": self._address},
            )
        return self._port

    async def stop(self) -> None:
        """Stop listening and drop connections in progress."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # -- one connection ----------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        active = len(self._tasks)
        if active >= 2 * self._max_connections:  # a flood: shed without a word (the client sees a reset)
            writer.transport.abort()
            return
        if task is not None:  # always, inside a connection callback
            self._tasks.add(task)
        try:
            if active >= self._max_connections:
                await self._send(writer, _text(503, "too many admin connections"))
                await self._linger(reader, writer, seconds=_OVERLOADED_LINGER_SECONDS)
                return
            response = await self._respond(reader)
            await self._send(writer, response)
            await self._linger(reader, writer)
        except OSError:
            pass  # the client went away (reset, not connected, broken pipe); nothing to tell it
        except asyncio.CancelledError:
            # `stop` ends this connection. Not re-raised: this task is the top of its own stack, and
            # asyncio 3.11's stream callback calls task.exception(), which raises on a cancelled task.
            writer.transport.abort()
        except Exception:  # noqa: BLE001 - the edge: log here, never a traceback to the client
            _log.exception("admin listener: unexpected error")
            writer.transport.abort()
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> _Response:
        try:
            async with asyncio.timeout(self._read_timeout):
                request = await self._read_request(reader)
        except TimeoutError:
            return _text(408)
        except _BadRequest as exc:
            _log.debug("admin listener: bad request: %s", exc)
            return _text(exc.status)
        return await self._route(request)

    async def _send(self, writer: asyncio.StreamWriter, response: _Response) -> None:
        writer.write(response.encode())
        try:
            async with asyncio.timeout(self._write_timeout):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()  # a client that does not read must not hold the buffer
            raise ConnectionAbortedError("admin client did not read its response") from None

    async def _linger(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, seconds: float = _LINGER_SECONDS
    ) -> None:
        """Half-close, then read and discard what the client still sends (bounded), then close.

        Closing with unread bytes makes the kernel send RST, which can destroy the
        response before the client reads it (an oversized request would lose its 431,
        a client turned away would see a reset instead of its 503: RFC 9112 9.6).
        """
        if writer.can_write_eof():
            writer.write_eof()
        left = _LINGER_BYTES
        try:
            async with asyncio.timeout(seconds):
                while left > 0:
                    data = await reader.read(min(left, 16 * 1024))
                    if not data:
                        return
                    left -= len(data)
        except TimeoutError:
            return

    # -- parsing -----------------------------------------------------------------

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request:
        total = 0
        lines: list[bytes] = []
        while True:
            try:
                raw = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise _BadRequest(431, "request line or header too long") from None
            except asyncio.IncompleteReadError:
                raise _BadRequest(400, "connection closed before the end of the request head") from None
            total += len(raw)
            if total > self._max_head:
                raise _BadRequest(431, "request head too large")
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if not line:
                if lines:
                    break
                continue  # RFC 9112 2.2: ignore empty lines before the request line
            lines.append(line)
            if len(lines) > _MAX_HEADER_LINES + 1:
                raise _BadRequest(431, "too many header lines")
        return _parse_head(lines)

    async def _route(self, request: _Request) -> _Response:
        if request.method != "GET":
            return _Response(405, b"method not allowed\n", extra_headers=(("Allow", "GET"),))
        if "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0":
            return _text(400, "a request body is not accepted")
        if request.path == "/metrics":
            return await self._metrics()
        if request.path == "/healthz":
            serving, body = self._check_health()
            return _Response(200 if serving else 503, body, "application/json")
        if request.path == "/readyz":
            serving, _ = self._check_health()
            return _text(200, "ready") if serving else _text(503, "not ready")
        return _text(404)

    async def _metrics(self) -> _Response:
        # Rendering a large registry takes milliseconds: off the event loop, one at a time, so
        # scrapes (hostile or not) neither stall the gateway's calls nor multiply threads.
        try:
            async with self._expose_lock:
                body = await asyncio.to_thread(self._registry.expose)
        except Exception:  # noqa: BLE001 - the edge: log here, never a traceback to the client
            _log.exception("admin listener: metrics exposition failed")
            return _text(500)
        return _Response(200, body, CONTENT_TYPE)

    def _check_health(self) -> tuple[bool, bytes]:
        """Whether the gateway is serving, and the JSON body; a failing health callable is "not serving"."""
        try:
            status = self._health()
            if not isinstance(status, dict):
                raise TypeError(f"health() returned {type(status).__name__}, not dict")
            body = json.dumps(status, default=str, sort_keys=True, separators=(",", ":"))
        except Exception:  # noqa: BLE001 - the edge: log here, never a traceback to the client
            _log.exception("admin listener: health check failed")
            return False, b'{"error":"health check failed","serving":false}\n'
        return status.get("serving") is True, body.encode() + b"\n"


def _parse_head(lines: list[bytes]) -> _Request:
    """The request line and header fields (RFC 9112), strictly; anything odd is 400."""
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _BadRequest(400, "request line is not 'METHOD target HTTP/1.x'")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target) or version not in _VERSIONS:
        raise _BadRequest(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):  # also refuses obs-fold and space before the colon
            raise _BadRequest(400, "malformed header field")
        value = value.strip(b" \t")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise _BadRequest(400, "control character in a header value")
        key = name.decode("ascii").lower()
        if key in headers and key in {"content-length", "transfer-encoding", "host"}:
            raise _BadRequest(400, f"repeated {key} header")
        headers[key] = value.decode("latin-1")
    path = target.split(b"?", 1)[0].decode("ascii")
    return _Request(method.decode("ascii"), path, headers)


def is_loopback_address(address: str) -> bool:
    """Whether the admin listener would bind `address` (``host:port``, ``localhost`` included) on loopback only."""
    try:
        host, _ = parse_address(address)
    except ValueError:
        return False
    return _is_loopback(_bind_host(host))


def _bind_host(host: str) -> str:
    # One socket, one port: "localhost" can resolve to two addresses.
    return "127.0.0.1" if host == "localhost" else host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: we cannot know what it resolves to, so it is not loopback
