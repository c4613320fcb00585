"""The replay store: request ids seen inside the envelope time window.

A host gateway accepts an envelope only if its issue time is within the window
of now and its request id was never seen. An id needs remembering only while
an envelope carrying it could still pass the time check, i.e. until
``issued_at + window``; after that the time check refuses a replay by itself.
So the store is bounded in time, and bounded in size by `max_entries`.

When it is full of ids that have not expired, `InMemoryReplayStore` refuses new
ones (`ResourceExhausted`) rather than forgetting old ones early: forgetting
would let a replay through. Size it above the peak call rate times twice the
window.

`ReplayStore` is the seam (STYLE.md 2): a shared store (several gateway
processes of one force) would implement the same protocol.

Owns: remembering ids until they expire. Does not own: the time window or the
envelope checks (`gateway.envelope`).
"""

from __future__ import annotations

import heapq
import threading
from typing import Protocol

from gateway.errors import ResourceExhausted

__all__ = ["InMemoryReplayStore", "ReplayStore"]


class ReplayStore(Protocol):
    """Remembers request ids until they expire."""

    def remember(self, request_id: str, expires_at: float, now: float) -> bool:
        """Record `request_id` until `expires_at`; False if it is already remembered (a replay).

        May raise `ResourceExhausted` if it cannot remember any more ids.
        """
        ...


class InMemoryReplayStore:
    """A bounded in-process replay store.

    Ids live in a dict (membership, O(1)) and a min-heap ordered by expiry time
    (eviction). Expiry times are not in arrival order (issue times vary within
    the window), so a heap rather than a FIFO: eviction costs O(log n) per id,
    each id is pushed and popped once. An id is remembered while
    ``now <= expires_at``, matching the envelope check, which accepts while
    ``now <= issued_at + window``.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._seen: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def remember(self, request_id: str, expires_at: float, now: float) -> bool:
        """Record `request_id` until `expires_at`; False if it was seen and has not expired."""
        with self._lock:
            self._evict(now)
            if request_id in self._seen:
                return False
            if expires_at < now:
                return True  # already outside the window: nothing could replay it
            if len(self._seen) >= self._max:
                raise ResourceExhausted(
                    f"replay store full: {self._max} request ids inside the window; refusing rather than forgetting"
                )
            self._seen[request_id] = expires_at
            heapq.heappush(self._heap, (expires_at, request_id))
            return True

    def _evict(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            expires_at, request_id = heapq.heappop(heap)
            if self._seen.get(request_id) == expires_at:
                del self._seen[request_id]
