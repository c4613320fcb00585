"""Stand-in servers for the fault tests: a backend that is slow, and a host gateway that lies.

Each runs on the network's event loop with the real certificate of what it
replaces (so TLS and pinning pass and only its behaviour is wrong), on the port
of what it replaces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

__all__ = ["start_stand_in"]

#: (method, request bytes or an async iterator of them, context) -> response bytes or frames (a
#: `grpc.StatusCode` among the frames ends the call with that status there)
Behaviour = Callable[[str, Any, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[Any]]


class _Any(grpc.GenericRpcHandler):
    def __init__(self, unary: Behaviour, stream: Behaviour) -> None:
        self._unary = unary
        self._stream = stream

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        method = details.method

        async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return await self._unary(method, request, context)  # type: ignore[no-any-return]

        async def stream(requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> Any:
            out = await self._stream(method, requests, context)
            for item in out or ():
                if isinstance(item, grpc.StatusCode):  # end the call with this status after what went before
                    await context.abort(item, "refused, after the messages")
                yield item

        if method.endswith(("/Unary", "/Search", "/GetRecord")):
            return grpc.unary_unary_rpc_method_handler(unary)
        return grpc.stream_stream_rpc_method_handler(stream)


async def start_stand_in(
    address: str, *, cert: Path, key: Path, client_ca: bytes, unary: Behaviour, stream: Behaviour
) -> grpc.aio.Server:
    """Serve `unary`/`stream` on `address` with mTLS (clients from `client_ca`); returns the started server."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Any(unary, stream),))
    creds = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=client_ca, require_client_auth=True
    )
    server.add_secure_port(address, creds)
    await server.start()
    return server


async def sleep_forever(method: str, request: Any, context: Any) -> Any:
    """A backend that never answers (until the caller's deadline)."""
    await asyncio.sleep(3600)
