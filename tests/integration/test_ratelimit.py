"""Rate limits per origin force and per unit: a flood is refused (logged, audited); the others are not starved.

Thames Valley's gateway (host of intelligence search) is configured low: Surrey as an
origin force may make 3 calls a second (burst 5); every (force, unit) pair 3 a second
(burst 6). The other gateways' limits are high, so what is measured is the host's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.integration._hostile_common import append_config, records_since, search
from tests.netharness import NetworkThread

pytestmark = pytest.mark.integration

TV, HANTS, SURREY = "thames-valley", "hampshire", "surrey"

_HOST_LIMITS = """
[rate_limits]
force_rate = 1000.0
force_burst = 1000
unit_rate = 3.0
unit_burst = 6

[rate_limits.forces.surrey]
force_rate = 3.0
force_burst = 5
"""
_HIGH = """
[rate_limits]
force_rate = 10000.0
force_burst = 10000
unit_rate = 10000.0
unit_burst = 10000
"""
FLOOD_SECONDS = 2.5


@pytest.fixture(scope="module")
def rnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkThread]:
    net = NetworkThread(tmp_path_factory.mktemp("ratelimit-net"))
    append_config(net, {TV: _HOST_LIMITS, HANTS: _HIGH, SURREY: _HIGH})
    net.start()
    net.manifest()  # written on first use: write it before threads race to (NetworkThread.manifest is not thread-safe)
    yield net
    net.stop()


def _flood(net: NetworkThread, force: str, units: tuple[str, ...], officer: str, stop: threading.Event) -> Counter[str]:
    seen: Counter[str] = Counter()
    with net.officer_channel(force, units=units, officer=officer) as ch:
        while not stop.is_set():
            seen[search(ch)[0]] += 1
    return seen


def _steady(
    net: NetworkThread, force: str, units: tuple[str, ...], officer: str, stop: threading.Event, every: float
) -> list[tuple[str, float]]:
    seen = []
    with net.officer_channel(force, units=units, officer=officer) as ch:
        while not stop.is_set():
            started = time.monotonic()
            status, _ = search(ch)
            seen.append((status, time.monotonic() - started))
            time.sleep(every)
    return seen


def _run(
    net: NetworkThread, flood: tuple[str, tuple[str, ...], str], steady: tuple[str, tuple[str, ...], str]
) -> tuple[Counter[str], list[tuple[str, float]]]:
    stop = threading.Event()
    floods: list[Counter[str]] = []
    steadies: list[list[tuple[str, float]]] = []
    threads = [threading.Thread(target=lambda: floods.append(_flood(net, *flood, stop))) for _ in range(4)] + [
        threading.Thread(target=lambda: steadies.append(_steady(net, *steady, stop, every=0.5)))
    ]
    for t in threads:
        t.start()
    time.sleep(FLOOD_SECONDS)
    stop.set()
    for t in threads:
        t.join(30)
    return sum(floods, Counter()), steadies[0]


def test_a_flood_from_one_force_is_refused_and_the_others_are_not_starved(
    rnet: NetworkThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="psngw.server")
    since = time.time()
    flood, steady = _run(rnet, (SURREY, ("serocu",), "DC-FLOOD"), (HANTS, ("serocu",), "DC-STEADY"))
    # Surrey's flood: at most its burst plus its rate over the flood got through; the rest was refused.
    allowed = 5 + 3.0 * (FLOOD_SECONDS + 1)
    assert set(flood) <= {"OK", "RESOURCE_EXHAUSTED"}, flood
    assert flood["RESOURCE_EXHAUSTED"] > 20 and flood["OK"] <= allowed, flood
    # Hampshire, calling the same application at the same host meanwhile: every call served, promptly.
    assert steady and all(status == "OK" for status, _ in steady), steady
    assert max(took for _, took in steady) < 1.0, steady
    # Audited at the host with the stage and the reason, and logged.
    refused = records_since(rnet, TV, since, officer="DC-FLOOD", status="RESOURCE_EXHAUSTED")
    assert len(refused) == flood["RESOURCE_EXHAUSTED"]
    assert all(
        r.refusal_stage == "rate-limit"
        and r.origin_force == SURREY
        and "rate limit of force surrey" in r.refusal_reason
        for r in refused
    )
    assert records_since(rnet, TV, since, officer="DC-STEADY", status="RESOURCE_EXHAUSTED") == []
    # The origin gateway records the host's (sealed) refusal too.
    assert len(records_since(rnet, SURREY, since, officer="DC-FLOOD", status="RESOURCE_EXHAUSTED")) == len(refused)
    assert any("at rate-limit: rate limit of force surrey exceeded" in r.getMessage() for r in caplog.records)
    text = rnet.network.gateways[TV].registry.expose().decode()
    assert 'psngw_rate_limited_total{origin_force="surrey",unit="serocu"}' in text


def test_a_flood_from_one_unit_is_refused_and_the_forces_other_units_are_not_starved(rnet: NetworkThread) -> None:
    time.sleep(2.5)  # let the buckets refill after the previous flood
    since = time.time()
    flood, steady = _run(rnet, (HANTS, ("jou",), "DC-JOU"), (HANTS, ("serocu",), "DC-SEROCU"))
    assert flood["RESOURCE_EXHAUSTED"] > 20 and flood["OK"] <= 6 + 3.0 * (FLOOD_SECONDS + 1), flood
    assert steady and all(status == "OK" for status, _ in steady), steady
    refused = records_since(rnet, TV, since, officer="DC-JOU", status="RESOURCE_EXHAUSTED")
    assert refused and all("rate limit of unit jou of force hampshire" in r.refusal_reason for r in refused)
