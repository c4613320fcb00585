"""Rate limits per origin force and per unit: token buckets, refused with RESOURCE_EXHAUSTED.

Each origin force has a bucket, and so does each (origin force, unit) pair. A
call takes one token from its force's bucket and one from each of its
principal's units' buckets, only if all of them have one (a refused call takes
nothing, so a flood does not drain the buckets further). A force that floods
the gateway empties its own bucket and is refused cheaply; the other forces'
buckets are untouched, so they are not starved.

The keys are bounded: forces and units come from the directory, and anything
else shares one bucket per kind (``_unknown``), so garbage input cannot grow
memory.

Example (gateway config)::

    [rate_limits]
    force_rate = 200.0      # calls per second, per origin force
    force_burst = 400
    unit_rate = 50.0        # calls per second, per (origin force, unit)
    unit_burst = 100
    [rate_limits.forces.surrey]   # an override for one origin force
    force_rate = 50.0
    force_burst = 100
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gateway.clock import Clock
from gateway.errors import ResourceExhausted
from gateway.pipeline import Call
from gateway.tomlconf import Section

__all__ = ["Limit", "PlaceShares", "RateLimitConfig", "RateLimitStage", "RateLimiter"]

UNKNOWN = "_unknown"


@dataclass(frozen=True)
class Limit:
    """A token bucket: `rate` tokens per second, at most `burst` saved up."""

    rate: float
    burst: float


@dataclass(frozen=True)
class RateLimitConfig:
    """Per-force and per-unit limits, with per-force overrides."""

    force: Limit = Limit(500.0, 1000.0)
    unit: Limit = Limit(200.0, 400.0)
    overrides: Mapping[str, Limit] = field(default_factory=dict)

    def per_worker(self, workers: int) -> RateLimitConfig:
        """The share of each limit one of `workers` processes enforces (connections spread evenly)."""
        if workers <= 1:
            return self

        def share(limit: Limit) -> Limit:
            return Limit(limit.rate / workers, max(1.0, limit.burst / workers))

        return RateLimitConfig(
            share(self.force), share(self.unit), MappingProxyType({k: share(v) for k, v in self.overrides.items()})
        )

    @classmethod
    def from_section(cls, sec: Section) -> RateLimitConfig:
        """Parse the `[rate_limits]` table (all keys optional)."""
        d = cls()
        force = Limit(
            sec.number("force_rate", d.force.rate, minimum=0.01, maximum=1e6),
            sec.number("force_burst", d.force.burst, minimum=1, maximum=1e7),
        )
        unit = Limit(
            sec.number("unit_rate", d.unit.rate, minimum=0.01, maximum=1e6),
            sec.number("unit_burst", d.unit.burst, minimum=1, maximum=1e7),
        )
        overrides = {}
        for name, fsec in sec.table("forces").tables():
            overrides[name] = Limit(
                fsec.number("force_rate", force.rate, minimum=0.01, maximum=1e6),
                fsec.number("force_burst", force.burst, minimum=1, maximum=1e7),
            )
            fsec.finish()
        sec.finish()
        return cls(force, unit, MappingProxyType(overrides))


class _Bucket:
    __slots__ = ("limit", "stamp", "tokens")

    def __init__(self, limit: Limit, now: float) -> None:
        self.limit = limit
        self.tokens = limit.burst
        self.stamp = now

    def refill(self, now: float) -> float:
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.limit.burst, self.tokens + elapsed * self.limit.rate)
        self.stamp = now
        return self.tokens


class RateLimiter:
    """The buckets of one gateway (thread-safe; bounded by the directory's forces and units)."""

    def __init__(
        self, config: RateLimitConfig, *, forces: Collection[str], units: Collection[str], clock: Clock
    ) -> None:
        self.config = config
        self._forces = frozenset(forces)
        self._units = frozenset(units)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, key: tuple[str, str], limit: Limit, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(limit, now)
        return bucket

    def take(self, origin_force: str, units: Collection[str]) -> None:
        """Take one token for the force and each unit, or refuse with `ResourceExhausted` (taking none)."""
        force = origin_force if origin_force in self._forces else UNKNOWN
        now = self._clock.monotonic()
        with self._lock:
            limit = self.config.overrides.get(force, self.config.force)
            wanted = [(f"force {force}", self._bucket(("force", force), limit, now))]
            for unit in sorted({u if u in self._units else UNKNOWN for u in units} or {UNKNOWN}):
                wanted.append((f"unit {unit} of force {force}", self._bucket((force, unit), self.config.unit, now)))
            for what, bucket in wanted:
                if bucket.refill(now) < 1.0:
                    raise ResourceExhausted(f"rate limit of {what} exceeded ({bucket.limit.rate:g}/s)")
            for _, bucket in wanted:
                bucket.tokens -= 1.0

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimitStage:
    """Pipeline stage: the call's origin force and its officer's units each within their rate."""

    name = "rate-limit"

    def __init__(self, limiter: RateLimiter, *, own_force: str) -> None:
        self._limiter = limiter
        self._own = own_force

    async def __call__(self, call: Call) -> None:
        """Refuse with `ResourceExhausted` past the limit."""
        origin = call.origin_force or (call.peer.force if call.peer is not None else self._own)
        units = call.principal.units if call.principal is not None else ()
        self._limiter.take(origin, units)


class PlaceShares:
    """Long-lived places (relay links, relay channels, relay streams) held at once, at most `limit` per force.

    The rate limits count calls; a peer can also hold places open without calling (links and
    channels kept idle, streams that never finish), and the listener's own caps are shared by
    every force. With a share each, one force that takes all it may still leaves room for the
    others. `hold` raises `ResourceExhausted` for a force that holds its share already.
    """

    def __init__(self, limit: int, what: str) -> None:
        if limit < 1:
            raise ValueError("a share needs at least one place")
        self.limit = limit
        self._what = what
        self._held: collections.Counter[str] = collections.Counter()

    def held(self, force: str) -> int:
        """How many places `force` holds now."""
        return self._held[force]

    @contextlib.contextmanager
    def hold(self, force: str) -> Iterator[None]:
        """Hold one place for `force` while the block runs."""
        if self._held[force] >= self.limit:
            raise ResourceExhausted(f"force {force} holds {self.limit} {self._what} already, its share")
        self._held[force] += 1
        try:
            yield
        finally:
            self._held[force] -= 1
            if not self._held[force]:
                del self._held[force]
