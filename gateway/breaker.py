"""A circuit breaker per peer force: fail fast while a peer gateway is away, probe before trusting it again.

Closed: calls go through; `failures` consecutive transport failures open it.
Open: calls are refused at once with `Unavailable` for `cooldown` seconds.
Half-open: one call goes through as a probe; its success closes the breaker,
its failure opens it again for another cooldown. Other calls are refused
while the probe is out.

Only our own transport failures count (cannot connect, relay broke): a peer
that answers, even with an error status, is there.
"""

from __future__ import annotations

import enum
import threading

from gateway.clock import Clock
from gateway.errors import Unavailable

__all__ = ["Breaker", "BreakerState"]


class BreakerState(enum.StrEnum):
    """The three states of a breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    """One peer's circuit breaker (thread-safe)."""

    def __init__(self, name: str, *, clock: Clock, failures: int = 5, cooldown: float = 5.0) -> None:
        self.name = name
        self._clock = clock
        self._threshold = failures
        self._cooldown = cooldown
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at = 0.0
        self._state = BreakerState.CLOSED
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker past its cooldown reads as half-open)."""
        with self._lock:
            if self._state is BreakerState.OPEN and self._clock.monotonic() - self._opened_at >= self._cooldown:
                return BreakerState.HALF_OPEN
            return self._state

    def allow(self) -> None:
        """Let a call through, or refuse it with `Unavailable` (fail fast)."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return
            if self._state is BreakerState.OPEN:
                if self._clock.monotonic() - self._opened_at < self._cooldown:
                    raise Unavailable(f"circuit to {self.name} is open after repeated failures")
                self._state = BreakerState.HALF_OPEN
            if self._probing:
                raise Unavailable(f"circuit to {self.name} is half-open: a probe is in flight")
            self._probing = True

    def success(self) -> None:
        """The call reached the peer: close the breaker."""
        with self._lock:
            self._failures = 0
            self._probing = False
            self._state = BreakerState.CLOSED

    def failure(self) -> None:
        """The call could not reach the peer."""
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
                self._state = BreakerState.OPEN
                self._opened_at = self._clock.monotonic()
            self._probing = False

    def release(self) -> None:
        """A call that neither proved nor disproved the peer (e.g. cancelled) gives back its probe."""
        with self._lock:
            self._probing = False
