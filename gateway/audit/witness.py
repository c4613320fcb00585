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

`add_checkpoint` blocks (a lock per origin, an fsync in the SQLite state): call it from a worker
thread, not from an event loop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
from gateway.clock import Clock
from gateway.errors import (
    InfrastructureError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestRefused,
    Unauthenticated,
)

__all__ = [
    "MAX_PROOF_LINES",
    "AddCheckpointRequest",
    "InMemoryWitnessState",
    "SqliteWitnessState",
    "Witness",
    "WitnessConflict",
    "WitnessEquivocation",
    "WitnessState",
    "WitnessStateUnavailable",
]

#: tlog-witness: a client MUST NOT send more than 63 consistency proof lines.
MAX_PROOF_LINES = 63

# SQLite integers are signed 64-bit; no real log comes near this.
_MAX_STORED_SIZE = (1 << 63) - 1
_DECIMAL = re.compile(rb"(?:0|[1-9][0-9]{0,19})")


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

    default_public = "checkpoint conflicts with one already cosigned"

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
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise WitnessStateUnavailable(f"cannot write witness state {self._path}: {exc}") from exc
            try:
                held = self._select(origin)
                _guard(origin, held, size=size, root_hash=root_hash, note=note, expected_size=expected_size)
                self._conn.execute(
                    "INSERT INTO witness_checkpoint (origin, size, root_hash, note) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (origin) DO UPDATE"
                    " SET size = excluded.size, root_hash = excluded.root_hash, note = excluded.note",
                    (origin, size, root_hash, note),
                )
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise WitnessStateUnavailable(f"cannot write witness state {self._path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

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

    def _rollback(self) -> None:
        # If even the rollback fails the connection is broken; the failed write was not committed anyway.
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")


# -- the witness ----------------------------------------------------------------------------------


class Witness:
    """Cosigns peer logs' checkpoints that are consistent with the last one it cosigned for each.

    `logs` maps each known log origin to the verifier of that log's checkpoint key. Unknown origins
    are refused; there is no trust on first use of a key, only of a log's first checkpoint.
    """

    def __init__(
        self, cosigner: CosignatureSigner, logs: Mapping[str, NoteVerifier], state: WitnessState, clock: Clock
    ) -> None:
        if not isinstance(cosigner, CosignatureSigner):
            raise TypeError("a witness cosigns with a CosignatureSigner")
        for origin, verifier in logs.items():
            if not isinstance(origin, str) or not origin or not isinstance(verifier, NoteVerifier):
                raise TypeError("logs maps non-empty origin strings to NoteVerifier objects")
        self._cosigner = cosigner
        self._logs = dict(logs)
        self._state = state
        self._clock = clock
        self._locks = {origin: threading.Lock() for origin in self._logs}

    @property
    def name(self) -> str:
        """The witness's cosigner name."""
        return self._cosigner.name

    def vkey(self) -> str:
        """The verifier key logs configure to check this witness's cosignatures."""
        return self._cosigner.vkey()

    def add_checkpoint(
        self, old_size: int, proof: Sequence[bytes], note_text: bytes, *, submitter_origin: str | None = None
    ) -> NoteSignature:
        """Check a submitted checkpoint against the one held for its log, store it, and cosign it.

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
            self._check_against_held(old_size, proof, checkpoint, held, note_text)
            if held is None or checkpoint.size != held[0]:
                held_size = held[0] if held is not None else 0
                self._state.store(origin, checkpoint.size, checkpoint.root_hash, note_text, expected_size=held_size)
            return self._cosigner.cosign(note.body, self._timestamp())

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
        if old_size > checkpoint.size:
            if old_size == held_size:
                raise InvalidArgument(
                    f"rollback: log {origin!r} presents size {checkpoint.size}, behind the size {held_size}"
                    f" witness {self.name} already cosigned"
                )
            raise InvalidArgument(f"old size {old_size} is above the checkpoint size {checkpoint.size}")
        if old_size != held_size:
            raise WitnessConflict(
                f"log {origin!r} submitted old size {old_size}, but witness {self.name} holds size {held_size}",
                known_size=held_size,
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
                    " well formed, the log may be presenting a different history"
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
