"""The replay store: request ids seen inside the envelope time window.

A host gateway accepts an envelope only if its issue time is within the window
of now and its request id was never seen. An id needs remembering only while
an envelope carrying it could still pass the time check, i.e. until
``issued_at + window``; after that the time check refuses a replay by itself.
So the store is bounded in time, and bounded in size by `max_entries`.

When it is full of ids that have not expired, `InMemoryReplayStore` refuses new
ones (`ResourceExhausted`) rather than forgetting old ones early: forgetting
would let a replay through. Size it above the peak call rate times twice the
window. No one origin force may hold more than `max_force_share` of it (half,
by default): a peer that floods the host with envelopes fills its own share and
is refused, while the other forces' calls still find room.

`ReplayStore` is the seam (STYLE.md 2). `SqliteReplayStore` is the shared
one: several worker processes of one gateway (``psngw serve --workers N``)
must all see every id, whichever worker a connection landed on.

Owns: remembering ids until they expire. Does not own: the time window or the
envelope checks (`gateway.envelope`).
"""

from __future__ import annotations

import heapq
import sqlite3
import threading
from pathlib import Path
from typing import Protocol

from gateway.errors import AuditUnavailable, ResourceExhausted

__all__ = ["InMemoryReplayStore", "ReplayStore", "SqliteReplayStore"]


class ReplayStore(Protocol):
    """Remembers request ids until they expire."""

    def remember(self, request_id: str, expires_at: float, now: float, *, force: str = "") -> bool:
        """Record `request_id` (sent by origin `force`) until `expires_at`; False if already remembered (a replay).

        May raise `ResourceExhausted` if it cannot remember any more ids, or any more of `force`'s.
        """
        ...


def _force_quota(max_entries: int, share: float) -> int:
    if not 0 < share <= 1:
        raise ValueError("max_force_share must be above 0 and at most 1")
    return max(1, int(max_entries * share))


class InMemoryReplayStore:
    """A bounded in-process replay store.

    Ids live in a dict (membership, O(1)) and a min-heap ordered by expiry time
    (eviction). Expiry times are not in arrival order (issue times vary within
    the window), so a heap rather than a FIFO: eviction costs O(log n) per id,
    each id is pushed and popped once. An id is remembered while
    ``now <= expires_at``, matching the envelope check, which accepts while
    ``now <= issued_at + window``.
    """

    def __init__(self, max_entries: int = 100_000, *, max_force_share: float = 0.5) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._per_force = _force_quota(max_entries, max_force_share)
        self._seen: dict[str, tuple[float, str]] = {}
        self._held: dict[str, int] = {}  # ids held, by origin force
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def remember(self, request_id: str, expires_at: float, now: float, *, force: str = "") -> bool:
        """Record `request_id` of `force` until `expires_at`; False if it was seen and has not expired."""
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
            held = self._held.get(force, 0)
            if held >= self._per_force:
                raise ResourceExhausted(
                    f"replay store: force {force or '-'} holds {held} request ids inside the window, its share"
                    f" of {self._max}; refusing rather than forgetting"
                )
            self._seen[request_id] = (expires_at, force)
            self._held[force] = held + 1
            heapq.heappush(self._heap, (expires_at, request_id))
            return True

    def _evict(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            expires_at, request_id = heapq.heappop(heap)
            entry = self._seen.get(request_id)
            if entry is not None and entry[0] == expires_at:
                del self._seen[request_id]
                force = entry[1]
                self._held[force] -= 1
                if not self._held[force]:
                    del self._held[force]


class SqliteReplayStore:
    """A replay store shared by the worker processes of one gateway (one SQLite file, WAL).

    ``INSERT OR IGNORE`` on the request id is the atomic check-and-remember
    across processes. Expired ids are deleted now and then. The file is local
    state, not evidence: synchronous=NORMAL (a crash may forget the last few
    ids; they expire within the window anyway, and the issue-time check still
    applies). If the file cannot be used, `remember` fails closed.
    """

    def __init__(
        self, path: Path, *, max_entries: int = 1_000_000, max_force_share: float = 0.5, busy_timeout: float = 2.0
    ) -> None:
        self._path = path
        self._max = max_entries
        self._per_force = _force_quota(max_entries, max_force_share)
        self._lock = threading.Lock()
        self._inserts = 0
        try:
            self._conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS replay (id TEXT PRIMARY KEY, expires REAL NOT NULL,"
                " force TEXT NOT NULL DEFAULT '') WITHOUT ROWID"
            )
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(replay)")}
            if "force" not in columns:  # a file from before the per-force shares
                self._conn.execute("ALTER TABLE replay ADD COLUMN force TEXT NOT NULL DEFAULT ''")
            self._conn.execute("CREATE INDEX IF NOT EXISTS replay_expires ON replay (expires)")
            self._recount()
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"replay store {path} unusable: {exc}") from exc

    def _recount(self) -> None:
        """The ids held, in all and by force, as the file has them (every worker's)."""
        rows = self._conn.execute("SELECT force, count(*) FROM replay GROUP BY force").fetchall()
        self._held = {str(force): int(n) for force, n in rows}
        self._count = sum(self._held.values())

    def remember(self, request_id: str, expires_at: float, now: float, *, force: str = "") -> bool:
        """Record `request_id` of `force` until `expires_at`; False if any worker has seen it inside the window."""
        with self._lock:
            try:
                if self._inserts % 1000 == 0:
                    self._conn.execute("DELETE FROM replay WHERE expires < ?", (now,))
                    self._recount()
                self._inserts += 1
                row = self._conn.execute("SELECT expires FROM replay WHERE id = ?", (request_id,)).fetchone()
                if row is not None and row[0] >= now:
                    return False
                if expires_at < now:
                    return True
                if self._count >= self._max:
                    raise ResourceExhausted(f"replay store full: {self._max} request ids inside the window")
                held = self._held.get(force, 0)
                if held >= self._per_force:
                    raise ResourceExhausted(
                        f"replay store: force {force or '-'} holds {held} request ids inside the window, its share"
                        f" of {self._max}"
                    )
                cur = self._conn.execute(
                    "INSERT INTO replay (id, expires, force) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET expires = excluded.expires, force = excluded.force"
                    " WHERE replay.expires < ?",
                    (request_id, expires_at, force, now),
                )
                if cur.rowcount != 1:
                    return False  # another worker remembered it between our read and our write
                self._count += 1
                self._held[force] = held + 1
                return True
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"replay store {self._path} unusable: {exc}") from exc

    def close(self) -> None:
        """Close the database."""
        self._conn.close()
