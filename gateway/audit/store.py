"""The durable audit log: group commit to SQLite, the Merkle tree, checkpoints and their witnesses.

Durable before disclosure
    `AuditLog.append` resolves only once the record's transaction has committed on a connection
    with ``synchronous=FULL`` in WAL mode: the WAL is fsynced before COMMIT returns, so the record
    survives a crash or power loss. One writer thread per process takes everything queued (up to
    ``max_batch`` records) and commits it in one transaction, so concurrent calls share one fsync
    (group commit). Callers await asyncio futures, settled from the writer with one
    ``call_soon_threadsafe`` per batch. A caller whose call is the only one in flight in its
    process (``append(alone=True)``) finds nobody to share a commit with: if the writer is idle,
    it runs the same commit on its own thread, holding the connection lock the writer takes for
    each turn, and saves the two thread hand-offs. The queue is bounded: when it is full, or while the log
    cannot be written, `append` fails at once with `AuditUnavailable`; a record is never dropped
    silently and never acknowledged before it is on disk.

Sequencing, and several processes on one log
    SQLite is the sequencer. Each batch takes the write lock (``BEGIN IMMEDIATE``), loads any rows
    other processes appended since this one last looked into its in-memory tree, and numbers its
    records from there; the record's index is written into its canonical bytes, so a record says
    where it belongs. The tree is RFC 6962 over ``leaf_hash(record bytes)`` in index order.

Fail closed, recover by itself
    Any SQLite error while writing (disk full, read-only file, the lock held beyond
    ``lock_timeout``, an I/O error) fails the batch and everything queued with `AuditUnavailable`,
    turns `healthy` False with the reason in `status()`, and puts the writer into recovery: it
    reconnects and probes with a small write transaction, backing off from ``retry_initial`` to
    ``retry_max`` seconds, until writing works again.

Checkpoints (in the one process made with ``checkpointer=True``)
    Every ``checkpoint_interval`` seconds or ``checkpoint_every`` records, whichever comes first,
    the writer signs a C2SP checkpoint for the committed size only, and stores it durably before
    anyone can see it. Witness collection then runs on the event loop `open` was called from: the
    checkpoint goes to each witness (`gateway.audit.collector`); each cosignature is verified and
    stored beside its checkpoint, and the time the checkpoint reached ``witness_quorum``
    cosignatures is recorded.

Startup (`AuditLog.open`) and what "torn" means here
    The tree is recomputed from the stored bytes and checked against the last stored checkpoint
    (its signature, size and root). SQLite commits are atomic: after a crash a transaction is
    either wholly there or wholly absent, so a crash alone never leaves half a record. A row whose
    bytes do not hash to its stored leaf hash, a gap in the indexes, or a record that claims another
    index therefore means the file was damaged or edited outside the gateway. After the last
    checkpoint no one outside this force has committed to those rows: they are the "torn tail",
    moved to a ``quarantine`` table (kept as evidence, never deleted) and reported, and the log
    continues from the last good record. Inside the checkpointed range the same damage, or a
    root that does not match, stops the start with `LogCorrupted` naming the first bad record.
    Repair needs the log to itself (see the lock file below); otherwise the start is refused.

The lock file
    While a process has the log open it holds a shared ``flock`` on ``<db>.lock``, beside the file
    its configured name resolves to (through symbolic links). `is_live` tries
    an exclusive lock without waiting: the auditors' tools use it to tell a gateway's live log
    (access must be recorded) from an offline copy (opened read-only, never changed). It looks
    beside every name the reader's path leads through (symbolic links, ``..``) and beside the
    file itself, so that another name for the live log is still the live log (`live_path`).

Owns: the database schema, group commit, sequencing, checkpoint signing and storage, startup
checks and repair, and read access for the tools (`LogReader`). Does not own: the Merkle
arithmetic (`merkle`), the note formats (`note`), the witness protocol (`collector`) or record
fields (`record`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from gateway.audit.collector import Collector, CosignResult, WitnessClient
from gateway.audit.merkle import MerkleTree, leaf_hash
from gateway.audit.note import (
    Checkpoint,
    CosignatureVerifier,
    Note,
    NoteError,
    NoteSignature,
    NoteSigner,
    NoteVerifier,
    parse_note,
    parse_signature_lines,
    sign_note,
    verify_note,
)
from gateway.audit.record import AuditRecord, RecordError
from gateway.clock import Clock
from gateway.errors import AuditUnavailable, ConfigError
from gateway.tomlconf import Section

__all__ = [
    "LOG_FORMAT",
    "AppendResult",
    "AuditConfig",
    "AuditLog",
    "LogCorrupted",
    "LogReader",
    "RecordFinding",
    "StartupReport",
    "StoredCheckpoint",
    "StoredCosignature",
    "embedded_index",
    "first_divergence",
    "is_live",
    "live_path",
    "lock_path",
    "scan_records",
]

_log = logging.getLogger("gateway.audit.store")
_T = TypeVar("_T")

#: The value of the ``format`` row in the ``meta`` table of every audit log database.
LOG_FORMAT = "psn-gateway-audit-log/1"

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT",
    "CREATE TABLE records (idx INTEGER PRIMARY KEY CHECK (idx >= 0),"
    " leaf_hash BLOB NOT NULL CHECK (length(leaf_hash) = 32), data BLOB NOT NULL) STRICT",
    "CREATE TABLE checkpoints (size INTEGER PRIMARY KEY CHECK (size >= 0), root BLOB NOT NULL,"
    " note BLOB NOT NULL, signed_at REAL NOT NULL, quorum_at REAL) STRICT",
    "CREATE TABLE cosignatures (size INTEGER NOT NULL, witness TEXT NOT NULL, line BLOB NOT NULL,"
    " timestamp INTEGER NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (size, witness)) STRICT",
    "CREATE TABLE log_keys (vkey TEXT PRIMARY KEY, certificate BLOB, added_at REAL NOT NULL) STRICT",
    "CREATE TABLE witness_keys (vkey TEXT PRIMARY KEY, name TEXT NOT NULL, certificate BLOB,"
    " added_at REAL NOT NULL) STRICT",
    "CREATE TABLE quarantine (idx INTEGER NOT NULL, leaf_hash BLOB, data BLOB, reason TEXT NOT NULL,"
    " removed_at REAL NOT NULL) STRICT",
    "CREATE TABLE probe (x BLOB) STRICT",
)

#: The tables of the schema, every one of which a log of this format has.
_TABLES = tuple(statement.split()[2] for statement in _SCHEMA)

_INDEX_KEY = b'"index":'
_IDLE_WAIT = 0.2  # real seconds between the checkpointer's looks at its clock when idle
_PROBE_BYTES = 8192
#: Tree levels kept in memory only for the block being filled: 2**8 leaves a block.
_DENSE_LEVELS = 8


class LogCorrupted(ConfigError):
    """The stored log does not match its own checkpoints, or is damaged where it cannot be repaired."""


def lock_path(db: Path) -> Path:
    """The lock file beside a log database: ``<db>.lock``."""
    return db.with_name(db.name + ".lock")


def is_live(db: Path) -> bool:
    """Whether some process (a gateway) has the log at `db` open right now (see `live_path`)."""
    return live_path(db) is not None


#: Symbolic links followed, at most, from the name a reader gives to the log file (Linux's own limit).
_MAX_LINKS = 40


def live_path(db: Path) -> Path | None:
    """The name under which a process (a gateway) has the log at `db` open right now, or None.

    A gateway holds ``<its db path>.lock``, and the name it was given may differ from the one a
    reader gives: a symbolic link, ``..``, a relative path. So the lock is looked for beside `db`
    as given, beside each link it leads through, and beside the file it resolves to; for each, an
    exclusive lock is tried without waiting and released at once. Never creates a lock file: a copy
    without a held one is offline. The name returned is the one whose lock is held, for a reader
    that must share the gateway's lock (`gateway.audit.tools.record_access`).

    A file with another name (a hard link) whose lock is not held is refused with `ConfigError`: a
    gateway may have it open under that other name, which no path leads to, so it can be neither
    an offline copy nor read as a live log (its WAL is named after the other name).
    """
    given = Path(db)
    real = Path(os.path.realpath(given))
    for name in (*_links(given), real):
        if _lock_held(lock_path(name)):
            return name
    try:
        links = real.stat().st_nlink
    except OSError:
        return None  # no such file: the reader says so
    if links > 1:
        raise ConfigError(
            f"the log file has {links} names (hard links), and no gateway holds a lock beside any name this path"
            " leads to: a gateway may have it open under another name, so it is not read as an offline copy; read"
            ' a copy made with sqlite3 FILE ".backup COPY", or the live log by the name its gateway uses',
            file=given,
        )
    return None


def _links(path: Path) -> list[Path]:
    """`path` and each name its chain of symbolic links leads through (not resolving the directories)."""
    names = [path]
    with contextlib.suppress(OSError):  # a name that cannot be read as a link ends the chain
        while len(names) <= _MAX_LINKS and names[-1].is_symlink():
            names.append(names[-1].parent / os.readlink(names[-1]))
    return names


def _lock_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot open the lock file: {exc.strerror or exc}", file=path) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- configuration and results --------------------------------------------------------------------


@dataclass(frozen=True)
class AuditConfig:
    """The ``[audit]`` table of a gateway's configuration.

    ``db`` is the SQLite file. Checkpoints are signed every ``checkpoint_interval`` seconds or
    ``checkpoint_every`` records, whichever comes first. ``max_batch`` bounds one group commit,
    ``max_queue`` the records waiting for one. While at least ``commit_siblings`` calls that will
    soon bring a record are in flight in the process (`AuditLog.busy`: the gateway counts its unary
    calls), the writer holds a group commit open for up to ``commit_delay`` seconds so that more
    records share its fsync (PostgreSQL's commit_delay and commit_siblings). ``lock_timeout`` is
    how long a writer waits for SQLite's write lock before the log counts as unwritable.
    ``witness_quorum`` cosignatures make a checkpoint witnessed; ``witness_timeout`` bounds one
    witness's answer. ``retry_initial`` and ``retry_max`` bound the back-off while recovering.
    """

    db: Path
    checkpoint_interval: float = 10.0
    checkpoint_every: int = 1000
    max_batch: int = 1000
    max_queue: int = 20_000
    commit_delay: float = 0.005
    commit_siblings: int = 8
    lock_timeout: float = 2.0
    witness_quorum: int = 1
    witness_timeout: float = 5.0
    retry_initial: float = 0.05
    retry_max: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "db", Path(self.db))
        bounds: dict[str, tuple[float, float]] = {
            "checkpoint_interval": (0.01, 86400.0),
            "checkpoint_every": (1, 10_000_000),
            "max_batch": (1, 100_000),
            "max_queue": (1, 10_000_000),
            "commit_delay": (0.0, 1.0),
            "commit_siblings": (2, 100_000),
            "lock_timeout": (0.0, 600.0),
            "witness_quorum": (0, 64),
            "witness_timeout": (0.01, 600.0),
            "retry_initial": (0.001, 60.0),
            "retry_max": (0.001, 3600.0),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise ConfigError(f"must be a number in {low:g}..{high:g}, got {value!r}", field=f"audit.{name}")
        if self.retry_max < self.retry_initial:
            raise ConfigError("must not be less than retry_initial_seconds", field="audit.retry_max_seconds")

    @classmethod
    def from_section(cls, section: Section) -> AuditConfig:
        """Parse the ``[audit]`` table (unknown keys are an error)."""
        d = cls.__dataclass_fields__
        config = cls(
            db=section.file_path("db"),
            checkpoint_interval=section.number(
                "checkpoint_interval_seconds", d["checkpoint_interval"].default, minimum=0.01, maximum=86400
            ),
            checkpoint_every=section.integer(
                "checkpoint_every", d["checkpoint_every"].default, minimum=1, maximum=10_000_000
            ),
            max_batch=section.integer("max_batch", d["max_batch"].default, minimum=1, maximum=100_000),
            max_queue=section.integer("max_queue", d["max_queue"].default, minimum=1, maximum=10_000_000),
            commit_delay=section.number("commit_delay_seconds", d["commit_delay"].default, minimum=0, maximum=1),
            commit_siblings=section.integer(
                "commit_siblings", d["commit_siblings"].default, minimum=2, maximum=100_000
            ),
            lock_timeout=section.number("lock_timeout_seconds", d["lock_timeout"].default, minimum=0, maximum=600),
            witness_quorum=section.integer("witness_quorum", d["witness_quorum"].default, minimum=0, maximum=64),
            witness_timeout=section.number(
                "witness_timeout_seconds", d["witness_timeout"].default, minimum=0.01, maximum=600
            ),
            retry_initial=section.number(
                "retry_initial_seconds", d["retry_initial"].default, minimum=0.001, maximum=60
            ),
            retry_max=section.number("retry_max_seconds", d["retry_max"].default, minimum=0.001, maximum=3600),
        )
        section.finish()
        return config


@dataclass(frozen=True)
class AppendResult:
    """A durable record: its index, its leaf hash, and the tree size right after its commit."""

    index: int
    leaf_hash: bytes
    size: int


@dataclass(frozen=True)
class StartupReport:
    """What `AuditLog.open` found and did."""

    records: int
    checkpoint_size: int
    created: bool = False
    #: the indexes moved to quarantine (the torn tail), empty if none
    truncated: tuple[int, ...] = ()
    messages: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the operator's log."""
        head = "created a new audit log" if self.created else f"audit log verified: {self.records} records"
        tail = f"; checkpoint at size {self.checkpoint_size}"
        if self.truncated:
            tail += f"; TORN TAIL: {len(self.truncated)} record(s) from index {self.truncated[0]} quarantined"
        return head + tail + "".join(f"; {m}" for m in self.messages)


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint as stored: size, root, the log-signed note text, when it was signed and witnessed."""

    size: int
    root: bytes
    note: bytes
    signed_at: float
    quorum_at: float | None


@dataclass(frozen=True)
class StoredCosignature:
    """A witness's cosignature line over the checkpoint of `size`, as stored."""

    size: int
    witness: str
    line: bytes
    timestamp: int
    received_at: float


@dataclass(frozen=True)
class RecordFinding:
    """Something wrong with the stored records at log position `index`."""

    index: int
    message: str


# -- reading a log (the tools use this too) -------------------------------------------------------


def embedded_index(data: bytes) -> int | None:
    """The index a stored record's bytes claim, found without decoding the record.

    In canonical record JSON the key ``"index":`` can only appear as a key (a quote inside a string
    is escaped), so a byte search is exact for canonical bytes. None if absent or null.
    """
    at = data.find(_INDEX_KEY)
    if at < 0:
        return None
    start = at + len(_INDEX_KEY)
    end = start
    while end < len(data) and 48 <= data[end] <= 57:
        end += 1
    return int(data[start:end]) if end > start else None


def scan_records(
    rows: Iterable[tuple[int, bytes, bytes]], *, start: int = 0, limit: int = 100
) -> tuple[list[bytes], list[RecordFinding], int]:
    """Recompute the leaf hashes of stored rows (idx, leaf_hash, data) in index order, and check them.

    The rows should start at log position `start`. Returns the leaf hashes computed from the bytes
    (what the tree is built from), up to `limit` findings, and the position of the first finding
    (or the position after the last row if none). A finding is
    a gap in the indexes (records missing: one finding per gap, naming the missing range), bytes
    that do not hash to the stored leaf hash (a record changed), or bytes that claim another index
    (records moved, inserted or deleted and renumbered). After a gap the rows that follow are
    checked at their own indexes, so one deleted record is one finding, not one per later record.
    """
    hashes: list[bytes] = []
    findings: list[RecordFinding] = []
    first_bad: int | None = None
    append = hashes.append
    position = start
    for idx, stored, data in rows:
        computed = leaf_hash(data)
        append(computed)
        if idx != position or computed != stored or embedded_index(data) != idx:
            problems = _row_problems(position, idx, stored, computed, data)
            if first_bad is None:
                first_bad = position
            for finding in problems:
                if len(findings) < limit:
                    findings.append(finding)
        # Rows come in index order: after a gap, the next row is expected right after this one.
        position = idx + 1
    return hashes, findings, position if first_bad is None else first_bad


def _row_problems(position: int, idx: int, stored: bytes, computed: bytes, data: bytes) -> list[RecordFinding]:
    out = []
    if idx != position:
        missing = (
            f"record {position} is missing" if idx == position + 1 else f"records {position}..{idx - 1} are missing"
        )
        out.append(RecordFinding(position, f"{missing} (the next stored record is {idx}): records were deleted"))
    if computed != stored:
        out.append(
            RecordFinding(idx, f"record {idx}: its bytes do not match its stored leaf hash: the record was changed")
        )
    claimed = embedded_index(data)
    if claimed != idx:
        out.append(
            RecordFinding(
                idx,
                f"record {idx}: its bytes say it is record {claimed}: records were moved, inserted or deleted",
            )
        )
    return out


def first_divergence(tree: MerkleTree, checkpoints: Sequence[tuple[int, bytes]]) -> tuple[int, int] | None:
    """The range of records [start, end) where the tree first departs from the signed checkpoints.

    `checkpoints` are (size, root) pairs whose signatures were checked. Returns None if the tree
    matches all of them that it reaches.
    """
    start = 0
    for size, root in sorted(checkpoints):
        if size > tree.size:
            return (min(start, tree.size), size)
        if tree.root(size) != root:
            return (start, size)
        start = size
    return None


class LogReader:
    """Read access to a log database: records, checkpoints, cosignatures and keys.

    `LogReader.open` opens a file read-only (SQLite ``mode=ro``), for the auditors' tools; the
    store reads through the same methods on its own connection.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path | str) -> LogReader:
        """Open an audit log read-only; `ConfigError` if there is no such file or it is not a log."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("no such audit log (not a file)", file=path)
        uri = "file:" + _uri_path(path) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            reader = cls(conn, path)
            reader.check_format()
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot read as an audit log: {exc}", file=path) from exc
        return reader

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[LogReader]:
        """Read everything inside one read transaction: a consistent view while a gateway appends.

        Nested use joins the transaction already open.
        """
        if self.conn.in_transaction:
            yield self
            return
        self.conn.execute("BEGIN")
        try:
            yield self
        finally:
            self.conn.execute("COMMIT")

    def check_format(self) -> None:
        """Raise `ConfigError` unless this database is an audit log of the format this code writes.

        The message says what is wrong: no ``meta`` table or no format in it (not an audit log),
        another format, or (the right format) tables of the schema that are missing.
        """
        try:
            tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            fmt = self.meta("format") if "meta" in tables else None
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"not an audit log: {exc}", file=self.path) from exc
        if "meta" not in tables:
            raise ConfigError("not an audit log: it has no meta table to name its format", file=self.path)
        if fmt is None:
            raise ConfigError("not an audit log: its meta table names no format", file=self.path)
        if fmt != LOG_FORMAT:
            raise ConfigError(
                f"not an audit log of this version: its format is {fmt!r}, not {LOG_FORMAT!r}", file=self.path
            )
        missing = [name for name in _TABLES if name not in tables]
        if missing:
            names = ", ".join(missing)
            verb = "is" if len(missing) == 1 else "are"
            raise ConfigError(
                f"a damaged audit log: it has the format {fmt!r} but its {names} table{'s' * (len(missing) > 1)}"
                f" {verb} missing (dropped, or the file is damaged)",
                file=self.path,
            )

    def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def origin(self) -> str:
        """The log's origin line (``<force>.<network>/audit``)."""
        origin = self.meta("origin")
        if not origin:
            raise ConfigError("the log names no origin", file=self.path)
        return origin

    def count(self) -> int:
        """The number of stored records."""
        return int(self.conn.execute("SELECT count(*) FROM records").fetchone()[0])

    def end(self) -> int:
        """The index after the last stored record (0 if none): the log's length, counting any gap in it."""
        row = self.conn.execute("SELECT max(idx) FROM records").fetchone()
        return 0 if row is None or row[0] is None else int(row[0]) + 1

    def rows(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes, bytes]]:
        """Stored rows (idx, leaf_hash, data) with start <= idx < end, in index order, streamed."""
        if end is None:
            cur = self.conn.execute("SELECT idx, leaf_hash, data FROM records WHERE idx >= ? ORDER BY idx", (start,))
        else:
            cur = self.conn.execute(
                "SELECT idx, leaf_hash, data FROM records WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
            )
        cur.arraysize = 4096
        while batch := cur.fetchmany():
            yield from batch

    def record(self, index: int) -> bytes | None:
        """The stored bytes of record `index`."""
        row = self.conn.execute("SELECT data FROM records WHERE idx = ?", (index,)).fetchone()
        return None if row is None else bytes(row[0])

    def find_bytes(self, needle: bytes) -> list[tuple[int, bytes]]:
        """Records whose stored bytes contain `needle`, as (index, bytes)."""
        cur = self.conn.execute("SELECT idx, data FROM records WHERE instr(data, ?) > 0 ORDER BY idx", (needle,))
        return [(int(i), bytes(d)) for i, d in cur]

    def checkpoints(self) -> list[StoredCheckpoint]:
        """Every stored checkpoint, by size."""
        cur = self.conn.execute("SELECT size, root, note, signed_at, quorum_at FROM checkpoints ORDER BY size")
        return [StoredCheckpoint(int(s), bytes(r), bytes(n), float(t), q) for s, r, n, t, q in cur]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """The stored checkpoint of the largest size."""
        row = self.conn.execute(
            "SELECT size, root, note, signed_at, quorum_at FROM checkpoints ORDER BY size DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        s, r, n, t, q = row
        return StoredCheckpoint(int(s), bytes(r), bytes(n), float(t), q)

    def cosignatures(self, size: int | None = None) -> list[StoredCosignature]:
        """The stored cosignatures (of one checkpoint size, or all), by size and witness."""
        sql = "SELECT size, witness, line, timestamp, received_at FROM cosignatures"
        args: tuple[int, ...] = ()
        if size is not None:
            sql += " WHERE size = ?"
            args = (size,)
        cur = self.conn.execute(sql + " ORDER BY size, witness", args)
        return [StoredCosignature(int(s), str(w), bytes(ln), int(ts), float(r)) for s, w, ln, ts, r in cur]

    def log_keys(self) -> list[tuple[str, bytes | None]]:
        """The log's verifier keys (vkey, certificate PEM or None), oldest first."""
        cur = self.conn.execute("SELECT vkey, certificate FROM log_keys ORDER BY added_at, vkey")
        return [(str(v), None if c is None else bytes(c)) for v, c in cur]

    def witness_keys(self) -> list[tuple[str, str, bytes | None]]:
        """The witnesses' cosignature verifier keys (name, vkey, certificate PEM or None)."""
        cur = self.conn.execute("SELECT name, vkey, certificate FROM witness_keys ORDER BY name, added_at")
        return [(str(n), str(v), None if c is None else bytes(c)) for n, v, c in cur]

    def quarantined(self) -> int:
        """How many rows startup moved out of the log as a torn tail (kept as evidence)."""
        return int(self.conn.execute("SELECT count(*) FROM quarantine").fetchone()[0])

    def witnessed_sizes(self) -> dict[str, int]:
        """For each witness, the largest checkpoint size it cosigned."""
        cur = self.conn.execute("SELECT witness, max(size) FROM cosignatures GROUP BY witness")
        return {str(w): int(s) for w, s in cur}

    def stored_note(self, checkpoint: StoredCheckpoint) -> Note:
        """The checkpoint's note with its stored cosignatures added (parsing only, nothing verified)."""
        note = parse_note(checkpoint.note)
        extra: list[NoteSignature] = []
        for cosig in self.cosignatures(checkpoint.size):
            extra.extend(parse_signature_lines(cosig.line))
        return note.with_signatures(extra)


def _uri_path(path: Path) -> str:
    return quote(str(path.resolve()), safe="/")


# -- the log --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    record: AuditRecord
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[AppendResult] | concurrent.futures.Future[AppendResult]


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: concurrent.futures.Future[Any]


@dataclass
class _Stats:
    commits: int = 0
    records: int = 0
    last_batch: int = 0
    last_commit_ms: float = 0.0
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0
    recoveries: int = 0
    quorum_size: int = 0
    quorum_at: float | None = None


class AuditLog:
    """The durable, tamper-evident audit log of one gateway (see the module docstring).

    ``origin`` is the checkpoint origin and note key name, ``<force>.<network>/audit``. ``signer``
    signs checkpoints; only the checkpointer needs it (the auditors' tools append without it).
    ``certificate`` is the PEM log certificate of the signer's key, stored with the log so that
    auditors can check the key against the force's CA.
    """

    def __init__(
        self,
        config: AuditConfig,
        *,
        origin: str,
        signer: NoteSigner | None,
        clock: Clock,
        checkpointer: bool = True,
        certificate: bytes | None = None,
    ) -> None:
        if checkpointer and signer is None:
            raise ConfigError("the checkpointing process needs the log's signing key", field="audit")
        if signer is not None and signer.name != origin:
            raise ConfigError(f"the log key is named {signer.name!r}, not the log origin {origin!r}", field="audit")
        Checkpoint(origin, 0, b"\0" * 32)  # the origin must make a valid checkpoint line
        self.config = config
        self.origin = origin
        self._signer = signer
        self._certificate = certificate
        self._clock = clock
        self._checkpointer = checkpointer
        self._cond = threading.Condition()
        #: held by whoever uses the connection: the writer thread, or a lone caller committing its own record
        self._conn_lock = threading.Lock()
        self._queue: deque[_Pending] = deque()
        self._jobs: deque[_Job] = deque()
        self._inflight: list[_Pending] = []
        self._state = "new"  # new -> open -> closing -> closed
        self._healthy = False
        self._tree = self._new_tree()
        self._tree_lock = threading.Lock()
        self._leaf_conn: sqlite3.Connection | None = None
        self._leaf_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._stats = _Stats()
        self._cp_size = 0
        self._cp_note: Note | None = None
        self._cp_time: float | None = None
        self._next_check = 0.0
        self._force_checkpoint = False
        self._backoff = config.retry_initial
        self._collector = Collector(proof=self._consistency_proof, timeout=config.witness_timeout)
        self._witness_sizes: dict[str, int] = {}
        self._witness_certs: dict[str, bytes | None] = {}
        self._cp_cosigned: Note | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._collect_event: asyncio.Event | None = None
        self._collect_task: asyncio.Task[None] | None = None
        self._collect_stop = False
        #: told (seconds, records) after each group commit, from the writer thread (metrics)
        self.on_commit: Callable[[float, int], None] | None = None
        #: how many calls in flight in this process will soon bring a record (the gateway's count of
        #: its unary calls), read by the writer thread to decide whether to hold a group commit open
        #: for more records (`_gather`)
        self.busy: Callable[[], int] | None = None
        self._gathering = 0  # while the writer gathers: the queue length that ends the wait early
        #: test seams: run on every new connection, and at named points of a write ("commit", "probe",
        #: "gather": the writer is about to wait for more records)
        self._on_connect: Callable[[sqlite3.Connection], None] | None = None
        self._faults: Callable[[str], None] | None = None

    # -- opening ---------------------------------------------------------------------------------

    def open(self) -> StartupReport:
        """Verify (and if need be repair) the stored log, then start the writer.

        Raises `LogCorrupted` for a log that does not match its checkpoints or is damaged inside
        them, `ConfigError` for a file that is not this log, `AuditUnavailable` if it cannot be
        written. Call it from the event loop that will append, if there is one: witness collection
        runs there.
        """
        if self._state != "new":
            raise ConfigError("an AuditLog is opened once", file=self.config.db)
        db = self.config.db
        if not db.parent.is_dir():
            raise ConfigError("the directory for the audit log does not exist", file=db)
        exclusive = self._take_lock()
        try:
            _create_private(db)
            conn = self._connect()
            report = self._startup(conn, exclusive)
        except BaseException:
            self._release_lock()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise
        if exclusive:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # type: ignore[arg-type]  # set by _take_lock
        self._state = "open"
        self._healthy = True
        self._next_check = self._clock.monotonic() + self.config.checkpoint_interval
        self._force_checkpoint = self._checkpointer and self._tree.size > self._cp_size
        with contextlib.suppress(RuntimeError):
            self._attach_loop(asyncio.get_running_loop())
        self._thread = threading.Thread(target=self._writer_main, name="audit-writer", daemon=True)
        self._thread.start()
        _log.info("%s", report.describe())
        return report

    def _take_lock(self) -> bool:
        # Beside the file the configured name resolves to, so that a reader who gives that file's own
        # name (not the symbolic link a gateway may be configured with) finds the log live (`live_path`).
        path = lock_path(Path(os.path.realpath(self.config.db)))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditUnavailable(f"cannot open the audit lock file {path}: {exc.strerror or exc}") from exc
        self._lock_fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while another process repairs the log
            return False

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        db = self.config.db
        try:
            conn = sqlite3.connect(
                str(db), timeout=self.config.lock_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"cannot open the audit log {db}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
            sync = conn.execute("PRAGMA synchronous").fetchone()[0]
            if str(mode).lower() != "wal" or sync != 2:
                raise AuditUnavailable(f"audit log {db}: cannot get WAL with synchronous=FULL (got {mode}, {sync})")
            if self._on_connect is not None:
                self._on_connect(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise AuditUnavailable(f"cannot prepare the audit log {db}: {exc}") from exc
            raise ConfigError(f"not an audit log: {exc}", file=db) from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _startup(self, conn: sqlite3.Connection, exclusive: bool) -> StartupReport:
        created = self._prepare_schema(conn)
        reader = LogReader(conn, self.config.db)
        try:
            # Exclusive: the write lock, to repair a torn tail. Shared: a read snapshot.
            conn.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")
            try:
                report = self._check_stored(reader, exclusive, created)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise
            if self._signer is not None:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._store_log_key(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback(conn)
                    raise
            self._witness_sizes = reader.witnessed_sizes()
            if self._cp_note is not None:
                latest = reader.latest_checkpoint()
                with contextlib.suppress(NoteError):
                    self._cp_cosigned = reader.stored_note(latest) if latest is not None else None
        except sqlite3.OperationalError as exc:
            raise AuditUnavailable(f"cannot read or repair the audit log {self.config.db}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise LogCorrupted(f"the database is damaged: {exc}", file=self.config.db) from exc
        for name, size in self._witness_sizes.items():
            self._collector.set_known_size(name, size)
        return report

    def _prepare_schema(self, conn: sqlite3.Connection) -> bool:
        db = self.config.db
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            created = not tables
            if created:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("format", LOG_FORMAT), ("origin", self.origin), ("created_at", repr(self._clock.now()))],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        reader = LogReader(conn, db)
        reader.check_format()
        if reader.origin != self.origin:
            raise ConfigError(f"this is the log of {reader.origin!r}, not of {self.origin!r}", file=db)
        return created

    def _store_log_key(self, conn: sqlite3.Connection) -> None:
        if self._signer is None:
            return
        conn.execute(
            "INSERT INTO log_keys (vkey, certificate, added_at) VALUES (?, ?, ?)"
            " ON CONFLICT (vkey) DO UPDATE SET certificate = coalesce(log_keys.certificate, excluded.certificate)",
            (self._signer.vkey(), self._certificate, self._clock.now()),
        )

    def _log_verifiers(self, reader: LogReader) -> list[NoteVerifier]:
        verifiers = []
        for vkey, _ in reader.log_keys():
            with contextlib.suppress(NoteError):
                verifiers.append(NoteVerifier.from_vkey(vkey))
        if self._signer is not None:
            verifiers.append(self._signer.verifier())
        return verifiers

    def _check_stored(self, reader: LogReader, exclusive: bool, created: bool) -> StartupReport:
        """Recompute the tree and check it against the last checkpoint; repair a torn tail."""
        db = self.config.db
        hashes, findings, good = scan_records(reader.rows(), limit=1)
        stored = len(hashes)
        latest = reader.latest_checkpoint()
        cp_size = 0
        note: Note | None = None
        if latest is not None:
            note = self._check_checkpoint(reader, latest)
            cp_size = latest.size
        if findings and good < cp_size:
            raise LogCorrupted(
                f"{findings[0].message}; this is inside the range covered by the signed checkpoint of size"
                f" {cp_size}: the log was altered, refusing to start (keep the file as evidence)",
                file=db,
            )
        if stored < cp_size:
            raise LogCorrupted(
                f"the log holds {stored} records but its last signed checkpoint covers {cp_size}: records"
                f" {stored}..{cp_size - 1} are missing, refusing to start",
                file=db,
            )
        # While starting, the pruned tree reads finished blocks from the hashes in hand; then from the file.
        tree = self._new_tree(hashes[:good], leaves=lambda s, e: b"".join(hashes[s:e]))
        if latest is not None and tree.root(cp_size) != latest.root:
            sizes = self._verified_checkpoints(reader)
            where = first_divergence(tree, sizes)
            span = f"records {where[0]}..{where[1] - 1}" if where else "the records"
            raise LogCorrupted(
                f"divergent log: the records do not hash to the root of the signed checkpoint of size {cp_size};"
                f" the first altered record is among {span}; refusing to start",
                file=db,
            )
        truncated: tuple[int, ...] = ()
        messages: list[str] = []
        if good < stored:
            if not exclusive:
                raise LogCorrupted(
                    f"{findings[0].message}; the tail after the last checkpoint needs repair, but other"
                    " processes have the log open: stop them and start again",
                    file=db,
                )
            truncated = self._quarantine(reader.conn, good, findings[0].message)
            messages.append(findings[0].message)
            _log.error(
                "audit log %s: torn tail: %s; %d record(s) from index %d moved to quarantine",
                db,
                findings[0].message,
                len(truncated),
                good,
            )
        tree.use_leaves(self._read_leaves)
        self._tree = tree
        self._cp_size = cp_size
        self._cp_note = note
        self._cp_time = latest.signed_at if latest is not None else None
        return StartupReport(tree.size, cp_size, created=created, truncated=truncated, messages=tuple(messages))

    def _new_tree(self, hashes: Sequence[bytes] = (), leaves: Callable[[int, int], bytes] | None = None) -> MerkleTree:
        """The in-memory tree: levels below 8 only for the block being filled (a flat memory footprint)."""
        return MerkleTree(hashes, dense_levels=_DENSE_LEVELS, leaves=leaves or self._read_leaves)

    def _read_leaves(self, start: int, end: int) -> bytes:
        """The stored leaf hashes of records [start, end), for the tree's finished blocks."""
        with self._leaf_lock:
            if self._leaf_conn is None:
                self._leaf_conn = sqlite3.connect(
                    "file:" + _uri_path(self.config.db) + "?mode=ro", uri=True, check_same_thread=False
                )
            rows = self._leaf_conn.execute(
                "SELECT leaf_hash FROM records WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
            ).fetchall()
        return b"".join(bytes(r[0]) for r in rows)

    def _check_checkpoint(self, reader: LogReader, latest: StoredCheckpoint) -> Note:
        db = self.config.db
        try:
            note = parse_note(latest.note)
            checkpoint = Checkpoint.parse(note.body)
        except NoteError as exc:
            raise LogCorrupted(f"checkpoint of size {latest.size} is malformed: {exc.reason}", file=db) from exc
        if (checkpoint.origin, checkpoint.size, checkpoint.root_hash) != (self.origin, latest.size, latest.root):
            raise LogCorrupted(
                f"checkpoint of size {latest.size}: its signed text does not match its stored size and root", file=db
            )
        if not any(_verifies(note, v) for v in self._log_verifiers(reader)):
            raise LogCorrupted(f"checkpoint of size {latest.size}: no valid signature by a key of this log", file=db)
        return note

    def _verified_checkpoints(self, reader: LogReader) -> list[tuple[int, bytes]]:
        out = []
        verifiers = self._log_verifiers(reader)
        for cp in reader.checkpoints():
            with contextlib.suppress(NoteError):
                note = parse_note(cp.note)
                checkpoint = Checkpoint.parse(note.body)
                if any(_verifies(note, v) for v in verifiers):
                    out.append((checkpoint.size, checkpoint.root_hash))
        return out

    def _quarantine(self, conn: sqlite3.Connection, start: int, reason: str) -> tuple[int, ...]:
        now = self._clock.now()
        indexes = tuple(
            int(r[0]) for r in conn.execute("SELECT idx FROM records WHERE idx >= ? ORDER BY idx", (start,))
        )
        conn.execute(
            "INSERT INTO quarantine (idx, leaf_hash, data, reason, removed_at)"
            " SELECT idx, leaf_hash, data, ?, ? FROM records WHERE idx >= ?",
            (f"torn tail at startup: {reason}", now, start),
        )
        conn.execute("DELETE FROM records WHERE idx >= ?", (start,))
        return indexes

    # -- appending -------------------------------------------------------------------------------

    async def append(self, record: AuditRecord, *, alone: bool = False) -> AppendResult:
        """Append a record; resolves once it is committed to disk. `AuditUnavailable` if it cannot be.

        `alone`: the caller's call is the only one in flight in this process, so nothing else would
        share this record's commit. If the writer is idle too, the record is committed right here, on
        the caller's thread, in the same transaction code, which saves the two thread hand-offs
        (about 0.1 ms when the gateway is quiet); the loop waits for that one fsync, as the caller
        would. Otherwise it is queued for the writer's next group commit.
        """
        if alone:
            done = self._append_here(record)
            if done is not None:
                return done.result()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AppendResult] = loop.create_future()
        self._enqueue(_Pending(record, loop, future))
        return await future

    def append_blocking(self, record: AuditRecord) -> AppendResult:
        """Append a record from a thread with no event loop (the CLI); blocks until it is durable."""
        future: concurrent.futures.Future[AppendResult] = concurrent.futures.Future()
        self._enqueue(_Pending(record, None, future))
        return future.result()

    def _append_here(self, record: AuditRecord) -> concurrent.futures.Future[AppendResult] | None:
        """Commit `record` on this thread if the writer is idle (its settled future); None if it is busy."""
        if not self._conn_lock.acquire(blocking=False):
            return None
        try:
            with self._cond:
                if self._queue or self._jobs or self._state != "open" or not self._healthy:
                    return None  # `_enqueue` queues it behind the others, or says why the log is closed
            future: concurrent.futures.Future[AppendResult] = concurrent.futures.Future()
            item = _Pending(record, None, future)
            _check_new(item)
            try:
                self._commit([item])
            except Exception as exc:  # noqa: BLE001 - as when the writer dies: the gate closes, the caller hears
                if self._conn is not None:
                    self._rollback(self._conn)
                self._inflight = []
                self._fail(f"a commit failed unexpectedly: {exc!r}", [item])
            wake = not self._healthy or self._checkpoint_due()
        finally:
            self._conn_lock.release()
        if wake:  # the writer recovers the log, or signs the checkpoint now due
            with self._cond:
                self._cond.notify()
        return future

    def _enqueue(self, item: _Pending) -> None:
        _check_new(item)
        with self._cond:
            if self._state != "open":
                raise AuditUnavailable(f"the audit log is {self._state}, not open")
            if not self._healthy:
                raise AuditUnavailable(f"the audit log cannot be written: {self._stats.last_error}")
            queued = len(self._queue)
            if queued >= self.config.max_queue:
                raise AuditUnavailable(f"the audit queue is full ({queued} records waiting)")
            self._queue.append(item)
            # Only the writer waits on this condition: while the queue is empty, or while it gathers
            # records for a commit. A record joining a non-empty queue otherwise finds it already
            # woken (or busy, and bound to look again).
            if not queued or (self._gathering and queued + 1 >= self._gathering):
                self._cond.notify()

    # -- state -----------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Whether the log is open and writable (appends are accepted)."""
        return self._state == "open" and self._healthy

    @property
    def size(self) -> int:
        """The number of durable records this process knows of."""
        return self._tree.size

    def status(self) -> dict[str, Any]:
        """Health and figures for the health endpoint and metrics."""
        s = self._stats
        with self._cond:
            depth = len(self._queue)
        witnesses = {
            name: {"size": w.size, "last_error": w.last_error, "last_timestamp": w.last_timestamp,
                   "equivocation": w.equivocation}
            for name, w in self._collector.witnesses.items()
        }  # fmt: skip
        return {
            "healthy": self.healthy,
            "state": self._state,
            "queue_depth": depth,
            "last_batch_size": s.last_batch,
            "last_commit_latency_ms": s.last_commit_ms,
            "commits": s.commits,
            "records_committed": s.records,
            "last_error": s.last_error,
            "last_error_at": s.last_error_at,
            "failures": s.failures,
            "recoveries": s.recoveries,
            "tree_size": self._tree.size,
            "checkpointer": self._checkpointer,
            "last_checkpoint_size": self._cp_size,
            "last_checkpoint_time": self._cp_time,
            "witnesses": witnesses,
            "quorum": {
                "required": self.config.witness_quorum,
                "size": s.quorum_size,
                "at": s.quorum_at,
                "reached": s.quorum_size >= self._cp_size,
            },
        }

    def latest_checkpoint(self) -> Note | None:
        """The latest signed checkpoint (durably stored), with the cosignatures stored for it."""
        return self._cp_cosigned or self._cp_note

    # -- the writer thread -----------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._jobs or self._queue or self._state != "open" or self._checkpoint_due())

    def _checkpoint_due(self) -> bool:
        if not self._checkpointer or not self._healthy:
            return False
        if self._force_checkpoint or self._tree.size - self._cp_size >= self.config.checkpoint_every:
            return True
        return self._clock.monotonic() >= self._next_check

    def _writer_main(self) -> None:
        try:
            self._writer_loop()
        except BaseException as exc:  # noqa: BLE001 - a dead writer must close the gate, never leave callers waiting
            _log.critical("the audit writer of %s stopped: %r", self.config.db, exc)
            if self._conn is not None:
                self._rollback(self._conn)
            self._fail(f"the audit writer stopped: {exc!r}", self._inflight)
            with self._cond:
                jobs = list(self._jobs)
                self._jobs.clear()
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(AuditUnavailable("the audit writer stopped"))

    def _writer_loop(self) -> None:
        while True:
            with self._cond:
                if self._healthy and not self._has_work():
                    self._cond.wait(_IDLE_WAIT if self._checkpointer else None)
                self._gather()
                healthy = self._healthy
                take = min(len(self._queue), self.config.max_batch) if healthy else 0
                batch = [self._queue.popleft() for _ in range(take)]
                jobs = list(self._jobs)
                self._jobs.clear()
                stopping = self._state != "open"
            with self._conn_lock:
                if not self._writer_turn(batch, jobs, healthy=healthy, stopping=stopping):
                    break

    def _gather(self) -> None:
        """Hold a group commit open while more records are on their way (the writer, holding `_cond`).

        With at least ``commit_siblings`` such calls in flight (`busy`), the records queued now
        are the first of many: waiting up to ``commit_delay`` lets one fsync serve them all, and a
        busy gateway spends its CPU on fewer commits. The wait ends early once every call in flight
        has its record queued (or ``max_batch`` of them), and at once for anything else the writer
        must do. A quiet gateway never waits: its calls are fewer than ``commit_siblings``.
        """
        busy, delay = self.busy, self.config.commit_delay
        if busy is None or delay <= 0 or not self._queue:
            return
        deadline = time.monotonic() + delay
        try:
            while self._healthy and self._state == "open" and not self._jobs:
                flying = busy()
                target = min(flying, self.config.max_batch)
                remaining = deadline - time.monotonic()
                if flying < self.config.commit_siblings or len(self._queue) >= target or remaining <= 0:
                    return
                self._gathering = target
                if self._faults is not None:
                    self._faults("gather")
                self._cond.wait(remaining)
        finally:
            self._gathering = 0

    def _writer_turn(self, batch: list[_Pending], jobs: list[_Job], *, healthy: bool, stopping: bool) -> bool:
        """One turn of the writer, holding the connection; False once it should stop."""
        for job in jobs:
            self._run_job(job)
        if not healthy:
            if stopping:
                return False
            self._recover()
            return True
        if batch:
            self._commit(batch)
        if self._healthy and self._checkpoint_due():
            self._checkpoint()
        if stopping:
            with self._cond:
                if self._queue:
                    return True
            if self._healthy and self._checkpointer and self._tree.size > self._cp_size:
                self._checkpoint()
            return False
        return True

    def _commit(self, batch: list[_Pending]) -> None:
        conn = self._conn
        if conn is None:  # pragma: no cover - the writer always has a connection while healthy
            self._fail("no connection", batch)
            return
        started = time.perf_counter()
        self._inflight = batch
        results: list[tuple[int, bytes] | BaseException] = []
        rows: list[tuple[int, bytes, bytes]] = []
        hashes: list[bytes] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            caught = self._catch_up(conn)
            index = self._tree.size + len(caught)
            for item in batch:
                try:
                    data = item.record.with_index(index).encode()
                except RecordError as exc:
                    results.append(exc)
                    continue
                h = leaf_hash(data)
                rows.append((index, h, data))
                hashes.append(h)
                results.append((index, h))
                index += 1
            conn.executemany("INSERT INTO records (idx, leaf_hash, data) VALUES (?, ?, ?)", rows)
            if self._faults is not None:
                self._faults("commit")
            conn.execute("COMMIT")
        except (sqlite3.Error, LogCorrupted) as exc:
            self._rollback(conn)
            self._inflight = []
            self._fail(_describe(exc), batch)
            return
        with self._tree_lock:
            self._tree.extend(caught + hashes if caught else hashes)
        size = self._tree.size
        done = [r if isinstance(r, BaseException) else AppendResult(r[0], r[1], size) for r in results]
        s = self._stats
        s.commits += 1
        s.records += len(rows)
        s.last_batch = len(rows)
        s.last_commit_ms = (time.perf_counter() - started) * 1000
        self._inflight = []
        if self.on_commit is not None:
            self.on_commit(s.last_commit_ms / 1000, len(rows))
        self._settle(batch, done)

    def _catch_up(self, conn: sqlite3.Connection) -> list[bytes]:
        """Leaf hashes of rows other processes committed since this one last looked (checked)."""
        start = self._tree.size
        rows = LogReader(conn, self.config.db).rows(start)
        hashes, findings, _ = scan_records(rows, start=start, limit=1)
        if findings:
            raise LogCorrupted(
                f"rows appended by another process are damaged: {findings[0].message}", file=self.config.db
            )
        return hashes

    def _checkpoint(self) -> None:
        conn, signer = self._conn, self._signer
        self._force_checkpoint = False
        if conn is None or signer is None:  # pragma: no cover - a checkpointer has both
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            caught = self._catch_up(conn)
            if caught:
                with self._tree_lock:
                    self._tree.extend(caught)
            size = self._tree.size
            if size == self._cp_size:
                conn.execute("COMMIT")
                self._next_check = self._clock.monotonic() + self.config.checkpoint_interval
                return
            root = self._tree.root(size)
            now = self._clock.now()
            held = conn.execute("SELECT root, note FROM checkpoints WHERE size = ?", (size,)).fetchone()
            if held is None:
                note = sign_note(Checkpoint(self.origin, size, root).body(), [signer])
                conn.execute(
                    "INSERT INTO checkpoints (size, root, note, signed_at, quorum_at) VALUES (?, ?, ?, ?, ?)",
                    (size, root, note.text(), now, now if self.config.witness_quorum == 0 else None),
                )
            elif bytes(held[0]) == root:  # another process signed this size already: what is stored is the note
                note = parse_note(bytes(held[1]))
            else:
                raise LogCorrupted(
                    f"a checkpoint of size {size} with another root is already stored: two checkpointers on one log?",
                    file=self.config.db,
                )
            if self._faults is not None:
                self._faults("commit")
            conn.execute("COMMIT")
        except (sqlite3.Error, LogCorrupted, NoteError) as exc:
            self._rollback(conn)
            self._fail(_describe(exc), [])
            return
        self._cp_size, self._cp_note, self._cp_time, self._cp_cosigned = size, note, now, None
        self._next_check = self._clock.monotonic() + self.config.checkpoint_interval
        if self.config.witness_quorum == 0:
            self._stats.quorum_size, self._stats.quorum_at = size, now
        self._kick_collector()

    def _fail(self, reason: str, batch: list[_Pending]) -> None:
        with self._cond:
            first = self._healthy
            self._healthy = False
            pending = batch + list(self._queue)
            self._queue.clear()
        s = self._stats
        s.last_error, s.last_error_at = reason, self._clock.now()
        s.failures += 1
        self._backoff = self.config.retry_initial
        if first:
            _log.error("audit log %s cannot be written, refusing traffic: %s", self.config.db, reason)
        error = AuditUnavailable(f"the audit log cannot be written: {reason}")
        self._settle(pending, [error] * len(pending))

    def _recover(self) -> None:
        with self._cond:
            if self._state == "open":
                self._cond.wait(self._backoff)
            if self._state != "open":
                return
        try:
            self._probe()
        except (sqlite3.Error, AuditUnavailable, ConfigError) as exc:
            self._stats.last_error = _describe(exc)
            self._backoff = min(self._backoff * 2, self.config.retry_max)
            return
        with self._cond:
            self._healthy = True
        self._stats.recoveries += 1
        _log.warning("audit log %s is writable again after: %s", self.config.db, self._stats.last_error)

    def _probe(self) -> None:
        """Reconnect and prove that a write transaction commits, and that the log is still ours."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._catch_up(conn)  # rows other processes added must still be sound
            size = self._tree.size
            if size:
                row = conn.execute("SELECT leaf_hash FROM records WHERE idx = ?", (size - 1,)).fetchone()
                if row is None or bytes(row[0]) != self._tree.leaf(size - 1):
                    raise LogCorrupted(
                        f"record {size - 1} changed or vanished while the log was unwritable", file=self.config.db
                    )
            conn.execute("INSERT INTO probe (x) VALUES (zeroblob(?))", (_PROBE_BYTES,))
            conn.execute("DELETE FROM probe")
            if self._faults is not None:
                self._faults("probe")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    def _run_job(self, job: _Job) -> None:
        conn = self._conn
        # A job its caller cancelled (the collector, at shutdown) is skipped; once running it cannot be.
        if not job.future.set_running_or_notify_cancel():
            return
        if conn is None:
            job.future.set_exception(AuditUnavailable("the audit log has no connection"))
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            value = job.fn(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            job.future.set_exception(AuditUnavailable(f"the audit log cannot be written: {_describe(exc)}"))
            self._fail(_describe(exc), [])
            return
        except Exception as exc:  # noqa: BLE001 - the job's own error belongs to its caller, on the future
            self._rollback(conn)
            job.future.set_exception(exc)
            return
        job.future.set_result(value)

    def _submit_job(self, fn: Callable[[sqlite3.Connection], _T]) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._cond:
            if self._state != "open":
                raise AuditUnavailable(f"the audit log is {self._state}, not open")
            self._jobs.append(_Job(fn, future))
            self._cond.notify()
        return future

    def _writer_call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `fn(connection)` in the writer thread, inside a write transaction; for tests and tools."""
        return self._submit_job(fn).result()

    def checkpoint_now(self) -> None:
        """Ask the writer to sign a checkpoint for the committed size now; returns at once."""
        with self._cond:
            self._force_checkpoint = True
            self._cond.notify()

    def wait_checkpoint(self, size: int, timeout: float = 30.0) -> Note:
        """Block until a checkpoint of at least `size` is stored (tests and tools); `AuditUnavailable` on timeout."""
        deadline = time.monotonic() + timeout
        while self._cp_size < size or self._cp_note is None:
            if time.monotonic() > deadline:
                raise AuditUnavailable(f"no checkpoint of size {size} within {timeout:g} s")
            self.checkpoint_now()
            time.sleep(0.01)
        note = self._cp_note
        if note is None:  # pragma: no cover - the loop above ends only with a note
            raise AuditUnavailable("no checkpoint")
        return note

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        # After SQLITE_FULL or an I/O error SQLite may already have rolled back; a failing
        # rollback leaves nothing committed either.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    @staticmethod
    def _settle(items: Sequence[_Pending], outcomes: Sequence[AppendResult | BaseException]) -> None:
        """Resolve the callers' futures: one call_soon_threadsafe per event loop, not per record."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, AppendResult | BaseException]]] = {}
        for item, outcome in zip(items, outcomes, strict=True):
            if item.loop is None:
                cf = item.future
                if not cf.done():
                    if isinstance(outcome, BaseException):
                        cf.set_exception(outcome)
                    else:
                        cf.set_result(outcome)
            else:
                by_loop.setdefault(item.loop, []).append((item.future, outcome))
        for loop, pairs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle_async, pairs)

    def _shutdown_connection(self) -> None:
        """Close the connection; the last process out folds the WAL into the database file.

        A log closed that way is one self-contained file, ready to be copied for the auditors.
        While other processes still have the log open, a passive checkpoint never waits for them.
        """
        conn = self._conn
        if conn is None:
            return
        last = False
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                pass
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)" if last else "PRAGMA wal_checkpoint(PASSIVE)")
        with contextlib.suppress(sqlite3.Error):
            conn.close()
        self._conn = None

    # -- witnesses -------------------------------------------------------------------------------

    def add_witness(
        self, name: str, client: WitnessClient, verifier: CosignatureVerifier, *, certificate: bytes | None = None
    ) -> None:
        """Register a peer's witness: checkpoints go to it, and its verified cosignatures are stored.

        `certificate` is the witness's PEM log certificate, stored with its key so that auditors can
        check the key against that force's CA.
        """
        self._collector.add(name, client, verifier, known_size=self._witness_sizes.get(name, 0))
        self._witness_certs[name] = certificate
        if self._collect_event is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._collect_event.set)

    def _attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._checkpointer or self._loop is not None:
            return
        self._loop = loop
        self._collect_event = asyncio.Event()
        self._collect_task = loop.create_task(self._collect_loop(), name="audit-witness-collector")

    def _kick_collector(self) -> None:
        loop, event = self._loop, self._collect_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    async def _collect_loop(self) -> None:
        event = self._collect_event
        if event is None:  # pragma: no cover - set before the task is made
            return
        while not self._collect_stop and self._state in ("new", "open"):
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.checkpoint_interval):
                    await event.wait()
            event.clear()
            if self._collect_stop or self._state != "open" or self._cp_note is None:
                continue
            if not self._collector.lagging(self._cp_size):
                continue
            try:
                await self.collect_once()
            except Exception as exc:  # noqa: BLE001 - collection must outlive any one failure; it is logged
                _log.warning("witness collection failed: %s", _describe(exc))

    def _consistency_proof(self, old: int, new: int) -> list[bytes]:
        with self._tree_lock:
            return self._tree.consistency_proof(old, new)

    async def collect_once(self) -> list[CosignResult]:
        """Submit the latest checkpoint to the witnesses that lack it, and store what they cosign.

        Each cosignature is verified (by the collector) before it is stored; the checkpoint's quorum
        time is recorded when enough distinct witnesses have cosigned it.
        """
        note, size = self._cp_note, self._cp_size
        if note is None:
            return []
        results = await self._collector.submit(note)
        good = [r for r in results if r.ok]
        if good:
            future = self._submit_job(lambda conn: self._store_cosignatures(conn, size, good))
            count, reached = await asyncio.wrap_future(future)
            if reached is not None and size > self._stats.quorum_size:
                self._stats.quorum_size, self._stats.quorum_at = size, reached
            if size == self._cp_size and self._cp_note is not None:
                base = self._cp_cosigned or self._cp_note
                self._cp_cosigned = base.with_signatures(r.signature for r in good if r.signature is not None)
            _log.info("checkpoint %d has %d cosignature(s)", size, count)
        return results

    def _store_cosignatures(
        self, conn: sqlite3.Connection, size: int, results: list[CosignResult]
    ) -> tuple[int, float | None]:
        now = self._clock.now()
        for r in results:
            if r.signature is None or r.timestamp is None:  # pragma: no cover - only ok results come here
                continue
            verifier = self._collector.witnesses[r.witness].verifier
            conn.execute(
                "INSERT INTO witness_keys (vkey, name, certificate, added_at) VALUES (?, ?, ?, ?) ON CONFLICT (vkey)"
                " DO UPDATE SET certificate = coalesce(witness_keys.certificate, excluded.certificate)",
                (verifier.vkey(), r.witness, self._witness_certs.get(r.witness), now),
            )
            conn.execute(
                "INSERT OR REPLACE INTO cosignatures (size, witness, line, timestamp, received_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (size, r.witness, r.signature.line(), r.timestamp, now),
            )
        count = int(conn.execute("SELECT count(*) FROM cosignatures WHERE size = ?", (size,)).fetchone()[0])
        quorum_at: float | None = None
        if count >= self.config.witness_quorum:
            conn.execute("UPDATE checkpoints SET quorum_at = ? WHERE size = ? AND quorum_at IS NULL", (now, size))
            row = conn.execute("SELECT quorum_at FROM checkpoints WHERE size = ?", (size,)).fetchone()
            quorum_at = None if row is None or row[0] is None else float(row[0])
        return count, quorum_at

    # -- closing ---------------------------------------------------------------------------------

    def close_blocking(self) -> None:
        """Stop accepting records, commit what is queued, sign a last checkpoint, and close."""
        with self._cond:
            if self._state in ("closing", "closed"):
                return
            was_open = self._state == "open"
            self._state = "closing"
            self._cond.notify_all()
        if was_open and self._thread is not None:
            self._thread.join()
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
            self._state = "closed"
        self._settle(leftover, [AuditUnavailable("the audit log closed")] * len(leftover))
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(AuditUnavailable("the audit log closed"))
        with self._conn_lock:  # a lone caller may still be committing the record it began before the close
            self._shutdown_connection()
        with self._leaf_lock:
            if self._leaf_conn is not None:
                self._leaf_conn.close()
                self._leaf_conn = None
        self._release_lock()

    async def close(self) -> None:
        """Close the log from the event loop: stop witness collection, drain the queue, close."""
        task = self._collect_task
        if task is not None:
            self._collect_stop = True  # the loop ends even if a cancellation gets lost
            if self._collect_event is not None:
                self._collect_event.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.close_blocking)


def _check_new(item: _Pending) -> None:
    if not isinstance(item.record, AuditRecord):
        raise TypeError("append takes an AuditRecord")
    if item.record.index is not None:
        raise RecordError("a record handed to the log has no index yet: the log assigns it", field="index")


def _create_private(db: Path) -> None:
    """Create a new log file that only its owner may read: it holds personal data.

    SQLite gives its WAL and shared-memory files the same mode. An existing file is left as it is.
    """
    try:
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise AuditUnavailable(f"cannot create the audit log {db}: {exc.strerror or exc}") from exc
    os.close(fd)


def _settle_async(pairs: list[tuple[asyncio.Future[AppendResult], AppendResult | BaseException]]) -> None:
    for future, outcome in pairs:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _verifies(note: Note, verifier: NoteVerifier) -> bool:
    try:
        verify_note(note, verifier)
    except NoteError:
        return False
    return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", None)
        return f"{exc} ({name})" if name else str(exc)
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)
