"""A raw HTTP/2 gRPC client for the bad-input corpus: sends what grpcio's own client refuses to.

grpcio checks metadata before it sends it (no upper-case keys, no non-ASCII or
control characters in values), so an application using it cannot send the
headers a hostile one can. This client writes the frames itself: TLS with ALPN
``h2`` and a client certificate, the connection preface, one HEADERS block
(HPACK literals, never indexed, no Huffman; split into CONTINUATION frames when
large), one DATA frame holding a gRPC message, then reads frames until the
stream ends, is reset, or the connection is closed.

The HPACK decoder handles what a gRPC server sends back (static and dynamic
table, literal forms); Huffman-coded strings are returned as ``b"<huffman>"``
(gRPC's encoder does not Huffman-code the status and message this client needs).

Test code only: no flow control beyond the defaults, one stream per connection.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["H2Result", "grpc_call"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST, _SETTINGS, _PING, _GOAWAY, _CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x9
_END_STREAM, _END_HEADERS, _ACK, _PADDED, _PRIORITY = 0x1, 0x4, 0x1, 0x8, 0x20
_MAX_FRAME = 16384

_STATIC = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    *(
        (name.encode(), b"")
        for name in [
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "accept",
            "access-control-allow-origin",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "content-disposition",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-range",
            "content-type",
            "cookie",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "link",
            "location",
            "max-forwards",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "refresh",
            "retry-after",
            "server",
            "set-cookie",
            "strict-transport-security",
            "transfer-encoding",
            "user-agent",
            "vary",
            "via",
            "www-authenticate",
        ]
    ),
]
_STATIC[15] = (b"accept-encoding", b"gzip, deflate")


@dataclass
class H2Result:
    """How the server answered one raw call."""

    #: response headers and trailers, in order (names and values as bytes)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: the gRPC messages of the response (prefix removed)
    messages: list[bytes] = field(default_factory=list)
    #: RST_STREAM error code for our stream, if it was reset
    reset: int | None = None
    #: GOAWAY error code, if the server closed the connection
    goaway: int | None = None
    #: whether the stream ended (END_STREAM seen)
    ended: bool = False

    def header(self, name: str) -> str | None:
        """The last value of header `name`, as text."""
        found = [v for k, v in self.headers if k == name.encode()]
        return found[-1].decode("latin-1") if found else None

    @property
    def grpc_status(self) -> int | None:
        """The grpc-status the server sent, None if none."""
        value = self.header("grpc-status")
        return int(value) if value is not None and value.isdigit() else None


def _int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    # Literal header field never indexed, new name (RFC 7541 6.2.3), no Huffman.
    return b"\x10" + _int(len(name), 7) + name + _int(len(value), 7) + value


def _encode(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(_literal(k, v) for k, v in headers)


class _Decoder:
    def __init__(self) -> None:
        self.table: list[tuple[bytes, bytes]] = []

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 1 <= index <= len(_STATIC):
            return _STATIC[index - 1]
        return self.table[index - len(_STATIC) - 1]

    @staticmethod
    def _read_int(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def _read_str(self, data: bytes, pos: int) -> tuple[bytes, int]:
        huffman = bool(data[pos] & 0x80)
        length, pos = self._read_int(data, pos, 7)
        raw = data[pos : pos + length]
        return (b"<huffman>" if huffman else raw), pos + length

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        pos = 0
        while pos < len(block):
            byte = block[pos]
            if byte & 0x80:
                index, pos = self._read_int(block, pos, 7)
                out.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:
                _, pos = self._read_int(block, pos, 5)  # dynamic table size update
                continue
            incremental = bool(byte & 0x40)
            index, pos = self._read_int(block, pos, 6 if incremental else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._read_str(block, pos)
            value, pos = self._read_str(block, pos)
            out.append((name, value))
            if incremental:
                self.table.insert(0, (name, value))
        return out


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("connection closed")
        out += chunk
    return bytes(out)


def grpc_call(
    address: str,
    *,
    server_name: str,
    ca: Path | bytes,
    cert: Path,
    key: Path,
    path: str,
    metadata: list[tuple[bytes, bytes]],
    message: bytes = b"",
    timeout: float = 10.0,
    grpc_timeout: bytes | None = b"10S",
    body: bytes | None = None,
) -> H2Result:
    """One gRPC call over a fresh connection, with exactly the `metadata` given (raw bytes).

    `body`, if given, is sent as the request's DATA as it is (no gRPC message prefix added).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = True
    if isinstance(ca, Path):
        context.load_verify_locations(cafile=str(ca))
    else:
        context.load_verify_locations(cadata=ca.decode("ascii"))
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    host, _, port = address.rpartition(":")
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", path.encode()),
        (b":authority", server_name.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    if grpc_timeout is not None:
        headers.append((b"grpc-timeout", grpc_timeout))
    block = _encode(headers + metadata)
    result = H2Result()
    decoder = _Decoder()
    deadline = time.monotonic() + timeout
    with (
        socket.create_connection((host, int(port)), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as sock,
    ):
        out = bytearray(_PREFACE + _frame(_SETTINGS, 0, 0, b""))
        chunks = [block[i : i + _MAX_FRAME] for i in range(0, len(block), _MAX_FRAME)] or [b""]
        for i, chunk in enumerate(chunks):
            flags = _END_HEADERS if i == len(chunks) - 1 else 0
            out += _frame(_HEADERS if i == 0 else _CONTINUATION, flags, 1, chunk)
        if body is None:
            body = b"\x00" + struct.pack(">I", len(message)) + message
        for i in range(0, max(len(body), 1), _MAX_FRAME):
            last = i + _MAX_FRAME >= len(body)
            out += _frame(_DATA, _END_STREAM if last else 0, 1, body[i : i + _MAX_FRAME])
        try:
            sock.sendall(out)
        except OSError:
            result.goaway = -1
            return result
        pending = bytearray()
        data = bytearray()
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                head = _recv_exact(sock, 9)
            except (ConnectionError, OSError, TimeoutError):
                break
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = _recv_exact(sock, length)
            if kind == _SETTINGS and not flags & _ACK:
                sock.sendall(_frame(_SETTINGS, _ACK, 0, b""))
            elif kind == _PING and not flags & _ACK:
                sock.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind == _GOAWAY:
                result.goaway = int.from_bytes(payload[4:8], "big")
                break
            elif stream == 1 and kind == _RST:
                result.reset = int.from_bytes(payload[:4], "big")
                break
            elif stream == 1 and kind in (_HEADERS, _CONTINUATION):
                if kind == _HEADERS:
                    start, pad = 0, 0
                    if flags & _PADDED:
                        pad = payload[0]
                        start = 1
                    if flags & _PRIORITY:
                        start += 5
                    payload = payload[start : len(payload) - pad]
                    result.ended = bool(flags & _END_STREAM) or result.ended
                pending += payload
                if flags & _END_HEADERS:
                    result.headers += decoder.decode(bytes(pending))
                    pending.clear()
                    if result.ended:
                        break
            elif stream == 1 and kind == _DATA:
                data += payload
                if flags & _END_STREAM:
                    result.ended = True
                    break
    while len(data) >= 5:
        size = int.from_bytes(data[1:5], "big")
        result.messages.append(bytes(data[5 : 5 + size]))
        del data[: 5 + size]
    return result
