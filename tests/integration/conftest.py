"""A three-force network on loopback, shared by the integration tests of a session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netharness import NetworkThread


@pytest.fixture(scope="session")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkThread]:
    network = NetworkThread(tmp_path_factory.mktemp("net")).start()
    yield network
    network.stop()
