"""An origin packs unary calls on a busy relay channel (gateway.mux: `BatchHold`, `[limits] relay_batch_*`).

While fewer than `siblings` calls wait for answers on a channel, each request goes out as it comes. From
`siblings` on, more are on their way: the channel's writer holds new requests for up to `delay`, and sends
them as one message once `siblings` are queued. Stream frames and cancellations never wait behind a hold:
they end it. Driven without a network: an in-memory pipe, and a host whose handler answers only when told.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.config import LimitsConfig
from gateway.errors import ConfigError, DeadlineExceeded, Unavailable
from gateway.mux import BatchHold, MuxHost, _ClientStream
from gateway.muxstream import HostStream
from gateway.server import _batch_hold
from gateway.tomlconf import TomlFile
from tests.unit.test_mux_limits import LARGE, _frame, _refuse, _request
from tests.unit.test_muxstream import Pipe


class RequestsPipe(Pipe):
    """A `Pipe` that keeps how many requests, and which cancellations, each origin message carried."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[int, tuple[int, ...]]] = []

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        if batch.requests or batch.cancels:
            self.messages.append((len(batch.requests), tuple(batch.cancels)))
        await super().write(batch)


class Host:
    """The host's end: it records when each request arrived and answers once `release` is set."""

    def __init__(self, pipe: Pipe) -> None:
        self.release = asyncio.Event()
        self.arrived: dict[int, float] = {}
        self.frames: list[float] = []
        self.mux = MuxHost(
            pipe.host_read,
            pipe.host_write,
            handle=self._handle,
            handle_stream=self._handle_stream,
            refuse=_refuse,
            max_in_flight=100,
            max_frame=LARGE,
            draining=asyncio.Event(),
        )

    async def _handle(self, request: relay_pb2.MuxRequest) -> relay_pb2.MuxResponse:
        self.arrived[request.id] = time.monotonic()
        await self.release.wait()
        return relay_pb2.MuxResponse(id=request.id, response=relay_pb2.UnaryRelayResponse(message=b"a"))

    async def _handle_stream(self, stream: HostStream, _problem: object) -> None:
        while await stream.read() is not grpc.aio.EOF:
            self.frames.append(time.monotonic())


async def _client(pipe: Pipe, hold: BatchHold | None, sent: list[int] | None = None) -> _ClientStream:
    client = _ClientStream(
        pipe,  # type: ignore[arg-type]
        "thames-valley",
        lambda _s: None,
        max_frame=LARGE,
        hold=hold,
        on_sent=None if sent is None else sent.append,
    )
    assert await asyncio.wait_for(client._peer_limit(), 5) == LARGE  # the host has spoken
    return client


async def _one_at_a_time(client: _ClientStream, count: int) -> list[asyncio.Future[Any]]:
    """Start `count` calls a loop turn and 10 ms apart, as calls reach a gateway."""
    calls = []
    for _ in range(count):
        calls.append(asyncio.ensure_future(client.call(_request(10), timeout=5)))
        await asyncio.sleep(0.01)
    return calls


def _run_packing(hold: BatchHold | None, sent: list[int]) -> tuple[list[tuple[int, tuple[int, ...]]], float, int]:
    async def run() -> tuple[list[tuple[int, tuple[int, ...]]], float, int]:
        pipe = RequestsPipe()
        host = Host(pipe)
        serving = asyncio.ensure_future(host.mux.serve())
        client = await _client(pipe, hold, sent)
        started = time.monotonic()
        calls = await _one_at_a_time(client, 7)
        while len(host.arrived) < 7:
            await asyncio.sleep(0.005)
        took = max(host.arrived.values()) - started
        host.release.set()
        answered = sum(1 for r in await asyncio.gather(*calls) if r.HasField("response"))
        await client.close()
        await asyncio.wait_for(serving, 5)
        return pipe.messages, took, answered

    return asyncio.run(run())


def test_a_busy_channel_holds_requests_for_company_and_sends_them_as_one_message() -> None:
    sent: list[int] = []
    messages, took, answered = _run_packing(BatchHold(delay=1.0, siblings=4), sent)
    # Three calls waiting is not busy: each goes as it comes. The fourth waits for company, and the
    # batch goes once four requests are queued.
    assert messages == [(1, ()), (1, ()), (1, ()), (4, ())]
    assert sent == [1, 1, 1, 4]  # what the gateway counts (psngw_relay_requests_total, _messages_total)
    assert answered == 7
    assert took < 0.5  # the full batch ended the one-second hold (a bound, not a timing figure)


def test_without_a_hold_every_request_goes_as_it_comes() -> None:
    sent: list[int] = []
    messages, _, answered = _run_packing(None, sent)
    assert messages == [(1, ())] * 7 and answered == 7
    assert sent == [1] * 7


def test_a_cancellation_ends_a_hold_and_the_held_request_goes_with_it() -> None:
    async def run() -> tuple[Any, list[tuple[int, tuple[int, ...]]], float]:
        pipe = RequestsPipe()
        host = Host(pipe)
        serving = asyncio.ensure_future(host.mux.serve())
        client = await _client(pipe, BatchHold(delay=1.0, siblings=2))
        first = asyncio.ensure_future(client.call(_request(10), timeout=0.2))  # its deadline ends the hold
        await asyncio.sleep(0.01)
        started = time.monotonic()
        held = asyncio.ensure_future(client.call(_request(10), timeout=5))  # two waiting: held for company
        while 2 not in host.arrived:
            await asyncio.sleep(0.005)
        took = host.arrived[2] - started
        host.release.set()
        outcome: Any
        try:
            outcome = await first
        except DeadlineExceeded as exc:
            outcome = exc
        assert (await held).HasField("response")
        await client.close()
        await asyncio.wait_for(serving, 5)
        return outcome, pipe.messages, took

    outcome, messages, took = asyncio.run(run())
    assert isinstance(outcome, DeadlineExceeded)
    assert messages == [(1, ()), (1, (1,))]  # the held request left with the cancellation of the first
    assert took < 0.5  # the cancellation ended the one-second hold


def test_a_stream_frame_ends_a_hold_and_the_held_request_goes_with_it() -> None:
    async def run() -> tuple[float, float]:
        pipe = RequestsPipe()
        host = Host(pipe)
        serving = asyncio.ensure_future(host.mux.serve())
        client = await _client(pipe, BatchHold(delay=1.0, siblings=2))
        first = asyncio.ensure_future(client.call(_request(10), timeout=5))
        await asyncio.sleep(0.01)
        held = asyncio.ensure_future(client.call(_request(10), timeout=5))  # two waiting: held for company
        await asyncio.sleep(0.01)
        stream = client.open_stream(timeout=5)
        started = time.monotonic()
        await stream.write(_frame(100))  # never waits behind the hold, and takes the held request along
        while not host.frames or 2 not in host.arrived:
            await asyncio.sleep(0.005)
        frame_took, request_took = host.frames[0] - started, host.arrived[2] - started
        host.release.set()
        await stream.done_writing()
        assert (await first).HasField("response") and (await held).HasField("response")
        await client.close()
        await asyncio.wait_for(serving, 5)
        return frame_took, request_took

    frame_took, request_took = asyncio.run(run())
    assert frame_took < 0.5 and request_took < 0.5  # not the one-second hold


def test_the_gateway_takes_its_hold_from_the_limits_table(tmp_path: Path) -> None:
    def limits(text: str) -> LimitsConfig:
        file = TomlFile.parse(b"[limits]\n" + text.encode(), tmp_path / "gw.toml")
        return LimitsConfig.from_section(file.root().table("limits"))

    assert _batch_hold(limits("")) == BatchHold(delay=0.003, siblings=8)
    assert _batch_hold(limits("relay_batch_delay_seconds = 0.01\nrelay_batch_siblings = 16\n")) == BatchHold(0.01, 16)
    assert _batch_hold(limits("relay_batch_delay_seconds = 0\n")) is None  # every request goes as it comes
    with pytest.raises(ConfigError, match=r"gw.toml:2: limits.relay_batch_siblings: must be at least 2"):
        limits("relay_batch_siblings = 1\n")
    with pytest.raises(ConfigError, match=r"gw.toml:2: limits.relay_batch_delay_seconds: must be at most 1"):
        limits("relay_batch_delay_seconds = 3\n")


class StuckPipe(Pipe):
    """A relay channel whose host has stopped reading: a message with requests is never taken."""

    async def write(self, batch: relay_pb2.MuxBatch) -> None:
        if batch.requests:
            await asyncio.Event().wait()  # the transport's buffer is full, for ever
        await super().write(batch)


def test_an_origin_whose_host_takes_nothing_ends_the_channel_and_forgets_what_it_never_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A host that stopped reading (or a path that went silent) must not hold the channel, and every call
    # queued on it, for ever: the writer gives up after the stall time and the channel ends UNAVAILABLE.
    # A call that gives up first is dropped from what waits to be sent, with no cancellation to send.
    monkeypatch.setattr("gateway.mux._WRITE_STALL_SECONDS", 0.3)

    async def run() -> tuple[list[int], list[int], float]:
        pipe = StuckPipe()
        host = Host(pipe)
        serving = asyncio.ensure_future(host.mux.serve())
        client = await _client(pipe, None)
        started = time.monotonic()
        first = asyncio.ensure_future(client.call(_request(10), timeout=5))  # its message is stuck in the pipe
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded):
            await client.call(_request(10), timeout=0.05)  # queued behind it, never sent
        queued, cancels = [r.id for r in client._outbox], list(client._cancels)
        with pytest.raises(Unavailable, match=r"the host took no message for 0\.3 s"):
            await asyncio.wait_for(first, 5)
        took = time.monotonic() - started
        serving.cancel()
        return queued, cancels, took

    queued, cancels, took = asyncio.run(run())
    assert (queued, cancels) == ([], [])
    assert took < 3
