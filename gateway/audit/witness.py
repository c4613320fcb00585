"""The witness of c2sp.org/tlog-witness: cosign a peer force's checkpoint only if it extends what we saw.

Each force's gateway witnesses its peers' audit logs. A log submits its new checkpoint note with the
size of the last checkpoint this witness cosigned for it and a consistency proof between the two;
the witness checks the log's signature and the proof against the checkpoint it holds, stores the
new one durably, and only then returns its cosignature. Once a quorum of peers has cosigned, a force
cannot show two different histories of its log without one of them refusing.

This module owns that decision (`Witness.add_checkpoint`), the seam where the witness remembers what
it cosigned (`WitnessState`, with an in-memory twin and the SQLite edge), and the tlog-witness
request encoding. It does not own transport: the peer listener authenticates the submitting force
(mutual TLS) and passes its log origin in as `submitter_origin`, and maps the errors raised here to
its status codes (tlog-witness's HTTP codes are noted beside each). It does not own key loading.

A refusal is sometimes evidence: a checkpoint validly signed by the log's key that is smaller than
the one this witness cosigned (a rollback), of the same size with another root (a fork), or whose
consistency proof from the cosigned checkpoint does not verify. The witness still answers as
tlog-witness says, but first keeps that evidence in its state (`ConflictEvidence`, at most
`MAX_EVIDENCE_PER_KIND` distinct notes per log and kind), logs it at ERROR and counts it. The refusal
it raises then carries the kind's public text (`CONFLICT_PUBLIC`), which is how the log, on the other
side of the wire, tells "my witness says my log forked" from "my witness is unreachable"
(`conflict_kind`).

`add_checkpoint` blocks (a lock per origin, an fsync in the SQLite state): call it from a worker
thread, not from an event loop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

from gateway.audit.merkle import EMPTY_ROOT, HASH_SIZE, ProofError, verify_consistency
from gateway.audit.note import (
    MAX_NOTE_BYTES,
    Checkpoint,
    CosignatureSigner,
    Note,
    NoteError,
    NoteSignature,
    NoteVerifier,
    parse_note,
    verify_note,
)
from gateway.audit.record import format_time
from gateway.clock import Clock
from gateway.errors import (
    ConfigError,
    GatewayError,
    InfrastructureError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestRefused,
    Unauthenticated,
)

__all__ = [
    "CONFLICT_PUBLIC",
    "MAX_EVIDENCE_PER_KIND",
    "MAX_PROOF_LINES",
    "AddCheckpointRequest",
    "ConflictEvidence",
    "ConflictKind",
    "InMemoryWitnessState",
    "Kept",
    "SqliteWitnessState",
    "Witness",
    "WitnessConflict",
    "WitnessEquivocation",
    "WitnessState",
    "WitnessStateUnavailable",
    "conflict_kind",
    "read_conflicts",
]

_log = logging.getLogger("gateway.audit.witness")

#: tlog-witness: a client MUST NOT send more than 63 consistency proof lines.
MAX_PROOF_LINES = 63

#: Distinct signed notes kept as evidence per log origin and `ConflictKind`; later ones are counted, not kept.
MAX_EVIDENCE_PER_KIND = 32

# SQLite integers are signed 64-bit; no real log comes near this.
_MAX_STORED_SIZE = (1 << 63) - 1
_DECIMAL = re.compile(rb"(?:0|[1-9][0-9]{0,19})")


class ConflictKind(enum.StrEnum):
    """What a validly signed submission showed about its log, beyond a size the log can catch up on."""

    #: a checkpoint smaller than the one this witness cosigned: the log went backwards
    ROLLBACK = "rollback"
    #: a checkpoint of the size cosigned with another root: two histories
    FORK = "fork"
    #: a larger checkpoint whose consistency proof from the cosigned one does not verify
    BAD_PROOF = "bad-proof"


#: The public text of a refusal that is evidence (the gRPC status details the log reads back).
CONFLICT_PUBLIC: Mapping[ConflictKind, str] = {
    ConflictKind.ROLLBACK: "checkpoint is smaller than one this witness cosigned (rollback)",
    ConflictKind.FORK: "checkpoint conflicts with one already cosigned",
    ConflictKind.BAD_PROOF: "consistency proof from the checkpoint this witness cosigned does not verify",
}
_KIND_OF_PUBLIC = {text: kind for kind, text in CONFLICT_PUBLIC.items()}


class WitnessConflict(RequestRefused):
    """The submitted old size is not the size this witness holds for the log (tlog-witness: 409).

    `known_size` is the size of the latest checkpoint the witness cosigned for that log (0 if none);
    the log retries with it as its old size.
    """

    default_public = "checkpoint conflict"

    def __init__(self, reason: str, *, known_size: int, public: str | None = None) -> None:
        super().__init__(reason, public=public)
        self.known_size = known_size


class WitnessEquivocation(WitnessConflict):
    """The log presented a tree of the size already cosigned, with a different root: it forked.

    This is evidence of misbehaviour, not a retryable conflict. Both signed checkpoints are kept on
    the error (`held_note`, `presented_note`) so the edge can log and keep them.
    """

    default_public = CONFLICT_PUBLIC[ConflictKind.FORK]

    def __init__(
        self,
        *,
        origin: str,
        size: int,
        held_root: bytes,
        presented_root: bytes,
        held_note: bytes = b"",
        presented_note: bytes = b"",
    ) -> None:
        reason = (
            f"EQUIVOCATION by log {origin!r}: it presented a tree of size {size} with root "
            f"{presented_root.hex()}, but this witness already cosigned size {size} with root "
            f"{held_root.hex()}; the log is showing two different histories. Keep both signed "
            "checkpoints as evidence and alert the operators of every force."
        )
        super().__init__(reason, known_size=size)
        self.origin = origin
        self.size = size
        self.held_root = held_root
        self.presented_root = presented_root
        self.held_note = held_note
        self.presented_note = presented_note


class WitnessStateUnavailable(InfrastructureError):
    """The witness cannot read or durably write what it cosigned: it refuses to cosign."""


# -- evidence of a rollback or a fork -------------------------------------------------------------


def conflict_kind(error: GatewayError) -> ConflictKind | None:
    """The kind of rollback or fork a witness's refusal reports, or None for any other refusal or failure.

    Works on the errors `Witness.add_checkpoint` raises and on their gRPC form (`public` is the
    status details), so the log side classifies both alike.
    """
    return _KIND_OF_PUBLIC.get(error.public)


@dataclass(frozen=True)
class ConflictEvidence:
    """One submission that showed a rollback or a fork: both signed checkpoints, and who, when, why.

    `presented_note` is the note as submitted, validly signed by the log's key (nothing else is ever
    kept); `held_note` the checkpoint this witness had cosigned. `seen` counts the submissions of the
    same note against the same cosigned size; `last_at` is the latest of them.
    """

    origin: str
    kind: ConflictKind
    #: who submitted it: the peer gateway's identity, its log origin, or "local"
    submitter: str
    #: witness clock, POSIX seconds, when first seen
    at: float
    old_size: int
    proof: tuple[bytes, ...]
    presented_note: bytes
    presented_size: int
    presented_root: bytes
    held_note: bytes
    held_size: int
    held_root: bytes
    reason: str
    seen: int = 1
    last_at: float | None = None

    @property
    def presented_hash(self) -> bytes:
        """SHA-256 of the presented note: one piece of evidence is kept once."""
        return hashlib.sha256(self.presented_note).digest()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: notes as text, hashes in hex, proof lines in base64 (as tlog-witness sends them)."""
        last = self.at if self.last_at is None else self.last_at
        return {
            "origin": self.origin,
            "kind": self.kind.value,
            "submitter": self.submitter,
            "first_seen": format_time(self.at),
            "last_seen": format_time(last),
            "seen": self.seen,
            "old_size": self.old_size,
            "proof": [base64.b64encode(h).decode("ascii") for h in self.proof],
            "presented": {
                "size": self.presented_size,
                "root": self.presented_root.hex(),
                "note": self.presented_note.decode("utf-8", "replace"),
            },
            "cosigned": {
                "size": self.held_size,
                "root": self.held_root.hex(),
                "note": self.held_note.decode("utf-8", "replace"),
            },
            "reason": self.reason,
        }


#: What `WitnessState.keep_conflict` did: stored a new piece, counted a repeat, or had no room left.
Kept = Literal["new", "repeat", "full"]


# -- state ----------------------------------------------------------------------------------------


class WitnessState(Protocol):
    """Where a witness remembers the latest checkpoint it cosigned for each log origin."""

    def latest(self, origin: str) -> tuple[int, bytes, bytes] | None:
        """Return (size, root hash, note text) of the last checkpoint cosigned for `origin`, or None."""
        ...

    def store(self, origin: str, size: int, root_hash: bytes, note: bytes, *, expected_size: int | None = None) -> None:
        """Record a newly cosigned checkpoint; it must be durable before this returns.

        Atomically with the write, a state MUST refuse to go backwards: a size below the one held
        (InvalidArgument), or the held size with another root (`WitnessEquivocation`). If
        `expected_size` is given, it MUST also refuse (`WitnessConflict`) when the size it holds
        (0 if none) is not `expected_size`: the compare-and-swap that keeps two concurrent
        submissions from both winning, even across processes.
        """
        ...

    def keep_conflict(self, evidence: ConflictEvidence, *, limit: int) -> Kept:
        """Keep evidence of a rollback or fork durably, once; it must be durable before this returns.

        One piece is kept per origin, kind, presented note and cosigned size: a repeat only raises its
        `seen` and `last_at` ("repeat"). A new piece when `limit` are already kept for its origin and
        kind is not kept ("full"): a log that misbehaves at length cannot fill the witness's disk.
        """
        ...

    def conflicts(self) -> list[ConflictEvidence]:
        """Every piece of evidence kept, oldest first."""
        ...


def _evidence_key(evidence: ConflictEvidence) -> tuple[str, ConflictKind, bytes, int]:
    return evidence.origin, evidence.kind, evidence.presented_hash, evidence.held_size


def _guard(
    origin: str,
    held: tuple[int, bytes, bytes] | None,
    *,
    size: int,
    root_hash: bytes,
    note: bytes,
    expected_size: int | None,
) -> None:
    """The checks every `WitnessState.store` makes against what it holds, inside its transaction."""
    held_size = held[0] if held is not None else 0
    if expected_size is not None and held_size != expected_size:
        raise WitnessConflict(
            f"log {origin!r}: the witness now holds size {held_size}, not {expected_size}"
            " (a concurrent submission won)",
            known_size=held_size,
        )
    if held is None:
        return
    if size < held[0]:
        raise InvalidArgument(f"rollback: log {origin!r} at size {size} is behind the cosigned size {held[0]}")
    if size == held[0] and root_hash != held[1]:
        raise WitnessEquivocation(
            origin=origin,
            size=size,
            held_root=held[1],
            presented_root=root_hash,
            held_note=held[2],
            presented_note=note,
        )


def _check_stored_values(origin: str, size: int, root_hash: bytes, note: bytes) -> None:
    if not isinstance(origin, str) or not origin:
        raise InvalidArgument("a log origin is a non-empty string")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_STORED_SIZE:
        raise InvalidArgument(f"tree size {size!r} is outside 0..2**63-1")
    if not isinstance(root_hash, bytes) or len(root_hash) != HASH_SIZE:
        raise InvalidArgument(f"a root hash is {HASH_SIZE} bytes")
    if not isinstance(note, bytes):
        raise InvalidArgument("a note is bytes")


class InMemoryWitnessState:
    """A `WitnessState` in a dict, for tests and for tools that need no durability."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, bytes, bytes]] = {}
        self._conflicts: dict[tuple[str, ConflictKind, bytes, int], ConflictEvidence] = {}
        self._lock = threading.Lock()

    def latest(self, origin: str) -> tuple[int, bytes, bytes] | None:
        """Return the held (size, root hash, note) for `origin`, or None."""
        with self._lock:
            return self._held.get(origin)

    def store(self, origin: str, size: int, root_hash: bytes, note: bytes, *, expected_size: int | None = None) -> None:
        """Record a cosigned checkpoint (see `WitnessState.store`)."""
        _check_stored_values(origin, size, root_hash, note)
        with self._lock:
            held = self._held.get(origin)
            _guard(origin, held, size=size, root_hash=root_hash, note=note, expected_size=expected_size)
            self._held[origin] = (size, root_hash, note)

    def keep_conflict(self, evidence: ConflictEvidence, *, limit: int) -> Kept:
        """Keep evidence once, at most `limit` per origin and kind (see `WitnessState.keep_conflict`)."""
        key = _evidence_key(evidence)
        with self._lock:
            kept = self._conflicts.get(key)
            if kept is not None:
                self._conflicts[key] = replace(kept, seen=kept.seen + 1, last_at=evidence.at)
                return "repeat"
            if sum(1 for k in self._conflicts if k[:2] == key[:2]) >= limit:
                return "full"
            self._conflicts[key] = evidence
            return "new"

    def conflicts(self) -> list[ConflictEvidence]:
        """Every piece of evidence kept, oldest first."""
        with self._lock:
            return list(self._conflicts.values())


class SqliteWitnessState:
    """The durable `WitnessState`: one SQLite file in WAL mode with synchronous=FULL.

    Each store is one ``BEGIN IMMEDIATE`` transaction that reads the held row, applies the
    compare-and-swap and monotonicity checks, and writes; SQLite's write lock makes that atomic
    across connections and processes, and synchronous=FULL makes the commit durable before `store`
    returns. One connection is shared between threads under a lock.
    """

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS witness_checkpoint (
            origin    TEXT    NOT NULL PRIMARY KEY,
            size      INTEGER NOT NULL CHECK (size >= 0),
            root_hash BLOB    NOT NULL CHECK (length(root_hash) = 32),
            note      BLOB    NOT NULL
        ) STRICT
    """
    # Evidence of rollbacks and forks. Sizes a log presents are uint64, beyond SQLite's INTEGER: kept
    # as decimal text. Proof lines as the base64 lines tlog-witness sends, one per line.
    _CONFLICT_SCHEMA = """
        CREATE TABLE IF NOT EXISTS witness_conflict (
            id             INTEGER PRIMARY KEY,
            origin         TEXT    NOT NULL,
            kind           TEXT    NOT NULL CHECK (kind IN ('rollback', 'fork', 'bad-proof')),
            presented_hash BLOB    NOT NULL CHECK (length(presented_hash) = 32),
            held_size      INTEGER NOT NULL CHECK (held_size >= 0),
            first_at       REAL    NOT NULL,
            last_at        REAL    NOT NULL,
            seen           INTEGER NOT NULL CHECK (seen >= 1),
            submitter      TEXT    NOT NULL,
            old_size       TEXT    NOT NULL,
            proof          TEXT    NOT NULL,
            presented_size TEXT    NOT NULL,
            presented_root BLOB    NOT NULL,
            presented_note BLOB    NOT NULL,
            held_root      BLOB    NOT NULL,
            held_note      BLOB    NOT NULL,
            reason         TEXT    NOT NULL,
            UNIQUE (origin, kind, presented_hash, held_size)
        ) STRICT
    """

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        try:
            conn = sqlite3.connect(self._path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise WitnessStateUnavailable(f"cannot open witness state {self._path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise WitnessStateUnavailable(f"witness state {self._path}: cannot enable WAL (journal mode {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(self._SCHEMA)
            conn.execute(self._CONFLICT_SCHEMA)
        except sqlite3.Error as exc:
            conn.close()
            raise WitnessStateUnavailable(f"cannot prepare witness state {self._path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._path

    def latest(self, origin: str) -> tuple[int, bytes, bytes] | None:
        """Return the held (size, root hash, note) for `origin`, or None."""
        with self._lock:
            try:
                return self._select(origin)
            except sqlite3.Error as exc:
                raise WitnessStateUnavailable(f"cannot read witness state {self._path}: {exc}") from exc

    def store(self, origin: str, size: int, root_hash: bytes, note: bytes, *, expected_size: int | None = None) -> None:
        """Record a cosigned checkpoint durably and atomically (see `WitnessState.store`)."""
        _check_stored_values(origin, size, root_hash, note)
        with self._transaction():
            held = self._select(origin)
            _guard(origin, held, size=size, root_hash=root_hash, note=note, expected_size=expected_size)
            self._conn.execute(
                "INSERT INTO witness_checkpoint (origin, size, root_hash, note) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (origin) DO UPDATE"
                " SET size = excluded.size, root_hash = excluded.root_hash, note = excluded.note",
                (origin, size, root_hash, note),
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` write transaction under the lock: committed, or rolled back on any error.

        A SQLite error is `WitnessStateUnavailable`; any other error (a refusal raised inside) is rolled
        back and raised as it is.
        """
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise WitnessStateUnavailable(f"cannot write witness state {self._path}: {exc}") from exc
            try:
                yield
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise WitnessStateUnavailable(f"cannot write witness state {self._path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def keep_conflict(self, evidence: ConflictEvidence, *, limit: int) -> Kept:
        """Keep evidence once, durably, at most `limit` per origin and kind (see `WitnessState.keep_conflict`)."""
        origin, kind, presented_hash, held_size = _evidence_key(evidence)
        kept: Kept
        with self._transaction():
            repeat = self._conn.execute(
                "UPDATE witness_conflict SET seen = seen + 1, last_at = max(last_at, ?)"
                " WHERE origin = ? AND kind = ? AND presented_hash = ? AND held_size = ?",
                (evidence.at, origin, kind.value, presented_hash, held_size),
            )
            if repeat.rowcount:
                kept = "repeat"
            elif self._count_conflicts(origin, kind) >= limit:
                kept = "full"
            else:
                self._insert_conflict(evidence)
                kept = "new"
        return kept

    def conflicts(self) -> list[ConflictEvidence]:
        """Every piece of evidence kept, oldest first."""
        with self._lock:
            try:
                return _select_conflicts(self._conn)
            except sqlite3.Error as exc:
                raise WitnessStateUnavailable(f"cannot read witness state {self._path}: {exc}") from exc

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteWitnessState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _select(self, origin: str) -> tuple[int, bytes, bytes] | None:
        row = self._conn.execute(
            "SELECT size, root_hash, note FROM witness_checkpoint WHERE origin = ?", (origin,)
        ).fetchone()
        if row is None:
            return None
        size, root_hash, note = row
        return int(size), bytes(root_hash), bytes(note)

    def _count_conflicts(self, origin: str, kind: ConflictKind) -> int:
        row = self._conn.execute(
            "SELECT count(*) FROM witness_conflict WHERE origin = ? AND kind = ?", (origin, kind.value)
        ).fetchone()
        return int(row[0])

    def _insert_conflict(self, e: ConflictEvidence) -> None:
        self._conn.execute(
            "INSERT INTO witness_conflict (origin, kind, presented_hash, held_size, first_at, last_at, seen,"
            " submitter, old_size, proof, presented_size, presented_root, presented_note, held_root, held_note,"
            " reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                e.origin,
                e.kind.value,
                e.presented_hash,
                e.held_size,
                e.at,
                e.at if e.last_at is None else e.last_at,
                e.seen,
                e.submitter,
                str(e.old_size),
                "\n".join(base64.b64encode(h).decode("ascii") for h in e.proof),
                str(e.presented_size),
                e.presented_root,
                e.presented_note,
                e.held_root,
                e.held_note,
                e.reason,
            ),
        )

    def _rollback(self) -> None:
        # If even the rollback fails the connection is broken; the failed write was not committed anyway.
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")


def _select_conflicts(conn: sqlite3.Connection) -> list[ConflictEvidence]:
    rows = conn.execute(
        "SELECT origin, kind, submitter, first_at, last_at, seen, old_size, proof, presented_size,"
        " presented_root, presented_note, held_size, held_root, held_note, reason"
        " FROM witness_conflict ORDER BY id"
    ).fetchall()
    return [
        ConflictEvidence(
            origin=str(r[0]),
            kind=ConflictKind(r[1]),
            submitter=str(r[2]),
            at=float(r[3]),
            last_at=float(r[4]),
            seen=int(r[5]),
            old_size=int(r[6]),
            proof=tuple(base64.b64decode(line) for line in str(r[7]).split("\n") if line),
            presented_size=int(r[8]),
            presented_root=bytes(r[9]),
            presented_note=bytes(r[10]),
            held_size=int(r[11]),
            held_root=bytes(r[12]),
            held_note=bytes(r[13]),
            reason=str(r[14]),
        )
        for r in rows
    ]


def read_conflicts(path: Path) -> list[ConflictEvidence]:
    """The evidence a witness kept, read from its state file without writing to it (for auditors).

    `ConfigError` if there is no such file or it is not a witness's state.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("no such witness database (not a file)", file=path)
    try:
        conn = sqlite3.connect("file:" + quote(str(path.resolve()), safe="/") + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open as a witness database: {exc}", file=path) from exc
    try:
        conn.execute("PRAGMA query_only=ON")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "witness_checkpoint" not in tables:
            raise ConfigError("not a witness database (no witness_checkpoint table)", file=path)
        return _select_conflicts(conn) if "witness_conflict" in tables else []
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read as a witness database: {exc}", file=path) from exc
    finally:
        conn.close()


# -- the witness ----------------------------------------------------------------------------------


class Witness:
    """Cosigns peer logs' checkpoints that are consistent with the last one it cosigned for each.

    `logs` maps each known log origin to the verifier of that log's checkpoint key. Unknown origins
    are refused; there is no trust on first use of a key, only of a log's first checkpoint.

    Evidence of a rollback or a fork is kept in `state` (at most `max_evidence` distinct notes per
    log and kind) and tallied in memory for the health endpoint (`conflict_summary`), from what the
    state holds when the witness is made.
    """

    def __init__(
        self,
        cosigner: CosignatureSigner,
        logs: Mapping[str, NoteVerifier],
        state: WitnessState,
        clock: Clock,
        *,
        max_evidence: int = MAX_EVIDENCE_PER_KIND,
    ) -> None:
        if not isinstance(cosigner, CosignatureSigner):
            raise TypeError("a witness cosigns with a CosignatureSigner")
        for origin, verifier in logs.items():
            if not isinstance(origin, str) or not origin or not isinstance(verifier, NoteVerifier):
                raise TypeError("logs maps non-empty origin strings to NoteVerifier objects")
        if not isinstance(max_evidence, int) or isinstance(max_evidence, bool) or max_evidence < 1:
            raise TypeError("max_evidence is a positive integer")
        self._cosigner = cosigner
        self._logs = dict(logs)
        self._state = state
        self._clock = clock
        self._max_evidence = max_evidence
        self._locks = {origin: threading.Lock() for origin in self._logs}
        self._tally_lock = threading.Lock()
        self._tally: dict[tuple[str, ConflictKind], dict[str, Any]] = {}
        for evidence in state.conflicts():
            self._count(evidence, "new", submissions=evidence.seen)

    @property
    def name(self) -> str:
        """The witness's cosigner name."""
        return self._cosigner.name

    def vkey(self) -> str:
        """The verifier key logs configure to check this witness's cosignatures."""
        return self._cosigner.vkey()

    def conflicts(self) -> list[ConflictEvidence]:
        """The evidence of rollbacks and forks this witness kept, oldest first."""
        return self._state.conflicts()

    def conflict_summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per log origin and kind: submissions seen, pieces kept, the last one's time and sizes.

        Read from memory (the health endpoint calls it on the event loop); empty while all is well.
        """
        out: dict[str, dict[str, dict[str, Any]]] = {}
        with self._tally_lock:
            for (origin, kind), tally in sorted(self._tally.items()):
                out.setdefault(origin, {})[kind.value] = dict(tally)
        return out

    def add_checkpoint(
        self,
        old_size: int,
        proof: Sequence[bytes],
        note_text: bytes,
        *,
        submitter_origin: str | None = None,
        submitter: str | None = None,
        on_conflict: Callable[[ConflictEvidence], None] | None = None,
    ) -> NoteSignature:
        """Check a submitted checkpoint against the one held for its log, store it, and cosign it.

        `submitter` names who submitted (the peer gateway's identity), for the evidence; it defaults
        to `submitter_origin`. `on_conflict` is called (in this thread) with each submission that is
        evidence of a rollback or a fork, after the evidence is kept and before the refusal is raised.

        Raises, without storing or cosigning:

        - InvalidArgument / NoteError: malformed note, checkpoint, sizes or proof lines (400);
        - NotFound: the checkpoint's origin is not a log this witness knows (404);
        - Unauthenticated: no valid signature by that log's key (403);
        - PermissionDenied: `submitter_origin` is given and is not the checkpoint's origin (403);
        - InvalidArgument: old size above the checkpoint size, e.g. a rollback (400);
        - WitnessConflict: old size is not the size held (409, with `known_size`);
        - WitnessEquivocation: same size as held, different root (409; evidence of a fork);
        - ProofError: the consistency proof does not verify (422);
        - WitnessStateUnavailable: the state cannot be read or written durably.

        The refusals that are evidence (a validly signed checkpoint below the cosigned size, of that
        size with another root, or with a proof from it that fails) carry `CONFLICT_PUBLIC` texts.
        """
        if not isinstance(old_size, int) or isinstance(old_size, bool) or old_size < 0:
            raise InvalidArgument(f"old size {old_size!r} is not a non-negative integer")
        if len(proof) > MAX_PROOF_LINES:
            raise InvalidArgument(f"consistency proof has {len(proof)} lines, more than {MAX_PROOF_LINES}")
        proof = list(proof)
        note = parse_note(note_text)
        checkpoint = self._authenticate(note, submitter_origin)
        origin = checkpoint.origin
        with self._locks[origin]:
            held = self._state.latest(origin)
            try:
                self._check_against_held(old_size, proof, checkpoint, held, note_text)
            except RequestRefused as exc:
                kind = conflict_kind(exc)
                if kind is not None and held is not None:
                    now = self._clock.now()
                    evidence = ConflictEvidence(
                        origin=origin,
                        kind=kind,
                        submitter=submitter or submitter_origin or "local",
                        at=now,
                        last_at=now,
                        old_size=old_size,
                        proof=tuple(proof),
                        presented_note=note_text,
                        presented_size=checkpoint.size,
                        presented_root=checkpoint.root_hash,
                        held_note=held[2],
                        held_size=held[0],
                        held_root=held[1],
                        reason=exc.reason,
                    )
                    self._keep(evidence)
                    if on_conflict is not None:
                        on_conflict(evidence)
                raise
            if held is None or checkpoint.size != held[0]:
                held_size = held[0] if held is not None else 0
                self._state.store(origin, checkpoint.size, checkpoint.root_hash, note_text, expected_size=held_size)
            return self._cosigner.cosign(note.body, self._timestamp())

    def _keep(self, evidence: ConflictEvidence) -> None:
        """Keep the evidence in the state, tally it, and log it at ERROR (the refusal still goes out)."""
        try:
            kept: Kept | None = self._state.keep_conflict(evidence, limit=self._max_evidence)
        except WitnessStateUnavailable as exc:
            kept = None
            _log.error("witness %s: could not keep evidence against log %r: %s", self.name, evidence.origin, exc.reason)
        tally = self._count(evidence, kept)
        where = {
            "new": "evidence kept",
            "repeat": "the same evidence is already kept",
            "full": f"not kept: {self._max_evidence} pieces of this kind are kept already",
            None: "NOT KEPT",
        }[kept]
        _log.error(
            "%s by log %r (submitted by %s), seen %d time(s); %s. %s",
            evidence.kind.value.upper(),
            evidence.origin,
            evidence.submitter,
            tally["submissions"],
            where,
            evidence.reason,
            extra={"origin": evidence.origin, "conflict": evidence.kind.value, "submitter": evidence.submitter},
        )

    def _count(self, evidence: ConflictEvidence, kept: Kept | None, *, submissions: int = 1) -> dict[str, Any]:
        with self._tally_lock:
            tally = self._tally.setdefault(
                (evidence.origin, evidence.kind), {"submissions": 0, "kept": 0, "not_kept": 0}
            )
            tally["submissions"] += submissions
            if kept == "new":
                tally["kept"] += 1
            elif kept in ("full", None):
                tally["not_kept"] += 1
            last = evidence.at if evidence.last_at is None else evidence.last_at
            if last >= tally.get("last_at", last):
                tally.update(
                    last_at=last,
                    last_presented_size=evidence.presented_size,
                    cosigned_size=evidence.held_size,
                    submitter=evidence.submitter,
                )
            return dict(tally)

    def _authenticate(self, note: Note, submitter_origin: str | None) -> Checkpoint:
        """Parse the checkpoint, find its log, check the log's signature and who submitted it."""
        checkpoint = Checkpoint.parse(note.body)
        origin = checkpoint.origin
        verifier = self._logs.get(origin)
        if verifier is None:
            raise NotFound(f"witness {self.name}: unknown log origin {origin!r}", public="unknown log")
        try:
            verify_note(note, verifier)
        except NoteError as exc:
            raise Unauthenticated(
                f"witness {self.name}: checkpoint for {origin!r} is not validly signed by"
                f" {verifier.name}: {exc.reason}",
                public="checkpoint signature not valid",
            ) from exc
        if submitter_origin is not None and submitter_origin != origin:
            raise PermissionDenied(
                f"witness {self.name}: {submitter_origin!r} submitted a checkpoint of another log, {origin!r}"
            )
        return checkpoint

    def _check_against_held(
        self,
        old_size: int,
        proof: Sequence[bytes],
        checkpoint: Checkpoint,
        held: tuple[int, bytes, bytes] | None,
        note_text: bytes,
    ) -> None:
        """The tlog-witness checks, in its order, of a submission against the checkpoint held."""
        origin = checkpoint.origin
        held_size, held_root = (held[0], held[1]) if held is not None else (0, EMPTY_ROOT)
        # What the witness knows of the log whatever old size it claims: a size below the one cosigned
        # (that log signed the larger checkpoint before), or that size with another root. A log that is
        # merely behind knows an old size below ours, but never presents less than it had.
        shows = None
        if held is not None and checkpoint.size < held_size:
            shows = ConflictKind.ROLLBACK
        elif held is not None and checkpoint.size == held_size and checkpoint.root_hash != held_root:
            shows = ConflictKind.FORK
        public = None if shows is None else CONFLICT_PUBLIC[shows]
        if old_size > checkpoint.size:
            if shows is ConflictKind.ROLLBACK:
                raise InvalidArgument(
                    f"rollback: log {origin!r} presents size {checkpoint.size}, behind the size {held_size}"
                    f" witness {self.name} already cosigned",
                    public=public,
                )
            raise InvalidArgument(f"old size {old_size} is above the checkpoint size {checkpoint.size}", public=public)
        if old_size != held_size:
            raise WitnessConflict(
                f"log {origin!r} submitted old size {old_size}, but witness {self.name} holds size {held_size}"
                + ("" if shows is None else f"; its checkpoint of size {checkpoint.size} shows a {shows.value}"),
                known_size=held_size,
                public=public,
            )
        if checkpoint.size == held_size:
            self._check_same_size(origin, checkpoint, proof, held, note_text)
        elif held_size == 0:
            if proof:
                raise ProofError(f"log {origin!r}: a consistency proof from size 0 must be empty")
        else:
            try:
                verify_consistency(held_size, checkpoint.size, proof, held_root, checkpoint.root_hash)
            except ProofError as exc:
                raise ProofError(
                    f"log {origin!r}: the consistency proof from the cosigned size {held_size}"
                    f" (root {held_root.hex()}) to size {checkpoint.size} (root"
                    f" {checkpoint.root_hash.hex()}) does not verify ({exc.reason}); if the proof is"
                    " well formed, the log may be presenting a different history",
                    public=CONFLICT_PUBLIC[ConflictKind.BAD_PROOF],
                ) from exc

    def _check_same_size(
        self,
        origin: str,
        checkpoint: Checkpoint,
        proof: Sequence[bytes],
        held: tuple[int, bytes, bytes] | None,
        note_text: bytes,
    ) -> None:
        """The checkpoint has the size held: it must be the same tree (then it is simply cosigned again)."""
        if held is None:  # a log's first checkpoint is of the empty tree
            if checkpoint.root_hash != EMPTY_ROOT:
                raise ProofError(f"log {origin!r}: a tree of size 0 has the empty root, not another")
        elif checkpoint.root_hash != held[1]:
            raise WitnessEquivocation(
                origin=origin,
                size=checkpoint.size,
                held_root=held[1],
                presented_root=checkpoint.root_hash,
                held_note=held[2],
                presented_note=note_text,
            )
        if proof:
            raise ProofError(f"log {origin!r}: the checkpoint has the size held, so the proof must be empty")

    def _timestamp(self) -> int:
        now = int(self._clock.now())
        if now < 0:
            raise WitnessStateUnavailable(f"witness {self.name}: the clock reads before 1970 ({now})")
        return now


# -- the tlog-witness add-checkpoint request body -------------------------------------------------


@dataclass(frozen=True)
class AddCheckpointRequest:
    """A tlog-witness add-checkpoint request: ``old <size>``, proof lines, a blank line, the checkpoint note."""

    old_size: int
    proof: tuple[bytes, ...]
    note: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "proof", tuple(self.proof))
        if not isinstance(self.old_size, int) or isinstance(self.old_size, bool) or self.old_size < 0:
            raise InvalidArgument(f"old size {self.old_size!r} is not a non-negative integer")
        if len(self.proof) > MAX_PROOF_LINES:
            raise InvalidArgument(f"more than {MAX_PROOF_LINES} consistency proof lines")
        if any(not isinstance(h, bytes) or len(h) != HASH_SIZE for h in self.proof):
            raise InvalidArgument(f"a consistency proof line is not a {HASH_SIZE}-byte hash")
        if not isinstance(self.note, bytes) or not self.note:
            raise InvalidArgument("the request has no checkpoint")

    def encode(self) -> bytes:
        """Return the request body."""
        lines = [f"old {self.old_size}".encode("ascii"), *(base64.b64encode(h) for h in self.proof)]
        return b"".join(line + b"\n" for line in lines) + b"\n" + self.note

    @classmethod
    def decode(cls, body: bytes) -> AddCheckpointRequest:
        """Parse a request body strictly (the note itself is parsed later, by `Witness.add_checkpoint`)."""
        if not isinstance(body, bytes):
            raise InvalidArgument("a request body is bytes")
        if len(body) > MAX_NOTE_BYTES + 64 * (MAX_PROOF_LINES + 1):
            raise InvalidArgument("add-checkpoint request is too large")
        lines = body.split(b"\n", MAX_PROOF_LINES + 2)
        first = lines[0]
        if not first.startswith(b"old ") or not _DECIMAL.fullmatch(first[4:]):
            raise InvalidArgument("add-checkpoint request does not start with an 'old <size>' line")
        proof: list[bytes] = []
        for i, line in enumerate(lines[1:], start=1):
            if line == b"":
                if i == len(lines) - 1:
                    break  # the body ended before its blank line
                return cls(int(first[4:]), tuple(proof), b"\n".join(lines[i + 1 :]))
            if len(proof) == MAX_PROOF_LINES:
                raise InvalidArgument(f"more than {MAX_PROOF_LINES} consistency proof lines")
            proof.append(_decode_hash_line(line))
        raise InvalidArgument("add-checkpoint request has no blank line before its checkpoint")


def _decode_hash_line(line: bytes) -> bytes:
    try:
        raw = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument("a consistency proof line is not base64") from exc
    if len(raw) != HASH_SIZE or base64.b64encode(raw) != line:
        raise InvalidArgument(f"a consistency proof line is not the canonical base64 of a {HASH_SIZE}-byte hash")
    return raw
