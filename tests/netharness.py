"""A running three-force network for integration tests, on its own event loop thread.

The gateways and demo applications run in a background thread (their own
asyncio loop, as if in another process); tests call them with ordinary
synchronous gRPC stubs, as application developers do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc

from gateway import client
from gateway.demo.network import DemoNetwork, NetworkLayout, write_network
from gateway.principal import Purpose

PURPOSE = Purpose("investigation", "OP-TEST-0001", "integration test")

T = TypeVar("T")


class NetworkThread:
    """A `DemoNetwork` served by an event loop in a background thread."""

    def __init__(self, root: Path, *, echo: bool = False) -> None:
        self.layout: NetworkLayout = write_network(root, echo=echo)
        self.network = DemoNetwork(self.layout)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="network", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run `coro` on the network's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def start(self) -> NetworkThread:
        """Start every application and gateway."""
        self.run(self.network.start())
        return self

    def stop(self) -> None:
        """Stop everything and the loop."""
        try:
            self.run(self.network.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def manifest(self) -> Path:
        """The network's demo.json (written on first use)."""
        path = self.layout.root / "demo.json"
        if not path.exists():
            self.network.write_manifest()
        return path

    def officer_channel(
        self,
        force: str,
        *,
        units: tuple[str, ...] = ("serocu",),
        roles: tuple[str, ...] = ("investigator",),
        clearance: str = "SC",
        officer: str = "DC-2001",
        purpose: Purpose | None = PURPOSE,
        options: list[tuple[str, Any]] | None = None,
    ) -> grpc.Channel:
        """A channel to `force`'s local listener as its client app, with an officer token and purpose."""
        endpoint = client.from_manifest(self.manifest(), force)
        token = endpoint.unsafe_dev_token(officer=officer, units=units, roles=roles, clearance=clearance)
        return endpoint.secure_channel(token=token, purpose=purpose, options=options or ())

    def channel(
        self,
        force: str,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        address: str | None = None,
        server_name: str | None = None,
        ca: Path | None = None,
    ) -> grpc.Channel:
        """A sync mTLS channel to `force`'s local listener, as its client application (or as `cert`)."""
        material = self.layout.material[force]
        client = material.app_clients["analyst-desk"]
        directory = self.layout.directory()
        creds = grpc.ssl_channel_credentials(
            (ca or material.ca).read_bytes(),
            (key or client.key_path).read_bytes(),
            (cert or client.cert_path).read_bytes(),
        )
        return grpc.secure_channel(
            address or self.layout.local_address(force),
            creds,
            options=[("grpc.ssl_target_name_override", server_name or directory.forces[force].gateway_server_name)],
        )
