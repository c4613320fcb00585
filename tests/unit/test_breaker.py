"""The per-peer circuit breaker: opens after repeated failures, fails fast, probes, closes."""

import pytest

from gateway.breaker import Breaker, BreakerState
from gateway.clock import FakeClock
from gateway.errors import Unavailable


def test_opens_after_consecutive_failures_and_fails_fast() -> None:
    clock = FakeClock()
    b = Breaker("surrey", clock=clock, failures=3, cooldown=5)
    for _ in range(3):
        b.allow()
        b.failure()
    assert b.state is BreakerState.OPEN
    with pytest.raises(Unavailable, match="circuit to surrey is open"):
        b.allow()


def test_a_success_resets_the_count() -> None:
    clock = FakeClock()
    b = Breaker("x", clock=clock, failures=3)
    for _ in range(10):
        b.allow()
        b.failure()
        b.allow()
        b.success()
    assert b.state is BreakerState.CLOSED


def test_half_open_lets_one_probe_through() -> None:
    clock = FakeClock()
    b = Breaker("x", clock=clock, failures=1, cooldown=5)
    b.allow()
    b.failure()
    clock.advance(5)
    assert b.state is BreakerState.HALF_OPEN
    b.allow()  # the probe
    with pytest.raises(Unavailable, match="probe is in flight"):
        b.allow()
    b.success()
    assert b.state is BreakerState.CLOSED
    b.allow()


def test_a_failed_probe_opens_it_again() -> None:
    clock = FakeClock()
    b = Breaker("x", clock=clock, failures=1, cooldown=5)
    b.allow()
    b.failure()
    clock.advance(6)
    b.allow()
    b.failure()
    assert b.state is BreakerState.OPEN
    with pytest.raises(Unavailable):
        b.allow()
    clock.advance(5)
    b.allow()


def test_a_released_probe_can_be_retried() -> None:
    clock = FakeClock()
    b = Breaker("x", clock=clock, failures=1, cooldown=1)
    b.allow()
    b.failure()
    clock.advance(1)
    b.allow()
    b.release()
    b.allow()
