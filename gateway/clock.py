"""Time as a seam: the system clock and a settable twin for tests."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock"]


class Clock(Protocol):
    """Where the gateway reads the time."""

    def now(self) -> float:
        """Wall-clock time, seconds since the Unix epoch (UTC)."""
        ...

    def monotonic(self) -> float:
        """A clock that never goes backwards, for durations and timeouts."""
        ...


class SystemClock:
    """The real clocks."""

    def now(self) -> float:
        """Return `time.time()`."""
        return time.time()

    def monotonic(self) -> float:
        """Return `time.monotonic()`."""
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self._now = now
        self._mono = 1000.0

    def now(self) -> float:
        """Return the current fake wall-clock time."""
        return self._now

    def monotonic(self) -> float:
        """Return the current fake monotonic time."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        self._now += seconds
        self._mono += seconds

    def set(self, now: float) -> None:
        """Set the wall clock (may go backwards, to test skew)."""
        self._now = now
