"""Letting other threads run while a policy is built.

A policy build (parse, expand, check against casbin) runs in a worker thread
beside the event loop. CPython hands the GIL over only every
`sys.getswitchinterval()` (5 ms by default) unless the running thread blocks,
so a busy build can hold a decide loop back for a full interval at a time.
`Pacer` makes the build step aside briefly every `interval` seconds instead.
"""

from __future__ import annotations

import time

__all__ = ["Pacer", "no_pacing"]


class Pacer:
    """Call it often from a long loop; every `interval` seconds it sleeps `pause` seconds."""

    __slots__ = ("_interval", "_last", "_pause")

    def __init__(self, interval: float = 0.002, pause: float = 0.0002) -> None:
        self._interval = interval
        self._pause = pause
        self._last = time.perf_counter()

    def __call__(self) -> None:
        # A clock read costs about 50 ns, small beside any step worth pacing.
        now = time.perf_counter()
        if now - self._last >= self._interval:
            time.sleep(self._pause)
            self._last = time.perf_counter()


def no_pacing() -> None:
    """A pacer that never pauses (single-threaded tools)."""
