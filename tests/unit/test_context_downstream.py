"""`ContextDownstream`: the caller of a streaming call on the local listener."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from gateway.errors import InvalidArgument
from gateway.pipeline import Call, Listener
from gateway.server import ContextDownstream


class _Context:
    def __init__(self, requests: list[bytes]) -> None:
        self.requests = list(requests)
        self.headers: list[Any] = []
        self.written: list[bytes] = []

    async def read(self) -> Any:
        return self.requests.pop(0) if self.requests else grpc.aio.EOF

    async def send_initial_metadata(self, md: Any) -> None:
        self.headers.append(md)

    async def write(self, data: bytes) -> None:
        self.written.append(data)


def _downstream(requests: list[bytes], max_requests: int | None) -> tuple[ContextDownstream, _Context, Call]:
    context = _Context(requests)
    call = Call(Listener.LOCAL, "/x.v1.S/M", (), None, time.time(), 0.0)
    return ContextDownstream(context, call, max_requests=max_requests), context, call  # type: ignore[arg-type]


def test_empty_headers_are_left_to_go_out_with_the_first_message() -> None:
    downstream, context, _ = _downstream([], None)
    asyncio.run(downstream.send_initial_metadata(()))
    assert context.headers == []


def test_headers_are_sent_when_there_are_some() -> None:
    downstream, context, _ = _downstream([], None)
    asyncio.run(downstream.send_initial_metadata((("x-app", "1"),)))
    assert context.headers == [(("x-app", "1"),)]


def test_messages_are_counted_both_ways() -> None:
    downstream, context, call = _downstream([b"a", b"b"], None)

    async def run() -> list[bytes | None]:
        got = [await downstream.read() for _ in range(3)]
        await downstream.write(b"x")
        return got

    assert asyncio.run(run()) == [b"a", b"b", None]
    assert (call.request_messages, call.response_messages, context.written) == (2, 1, [b"x"])


def test_a_second_request_message_on_a_server_stream_is_refused() -> None:
    downstream, _, _ = _downstream([b"a", b"b"], 1)

    async def run() -> None:
        assert await downstream.read() == b"a"
        await downstream.read()

    with pytest.raises(InvalidArgument, match="takes one request message"):
        asyncio.run(run())
