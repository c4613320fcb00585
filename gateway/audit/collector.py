"""Collecting cosignatures: the log side of c2sp.org/tlog-witness.

After the store signs and durably keeps a checkpoint, the collector submits it to each peer
force's witness with the size of the last checkpoint that witness cosigned for this log and a
consistency proof from that size. It verifies every cosignature it gets back with the witness's
key before handing it to the store, and keeps per witness the size it holds and its last error.

A witness that answers with a size conflict (`WitnessConflict`) holds another size than the log
thought (say the log crashed after the witness stored a checkpoint, before the log stored the
cosignature): the collector retries once with the size the witness names. A witness that names a
size beyond the log's own checkpoint (a rollback), answers with `WitnessEquivocation` (a fork), or
refuses with a rollback, fork or bad-proof refusal (`gateway.audit.witness.conflict_kind`) has seen
another history of this log: that is never retried, is logged at ERROR, and stays on the witness's
status (`equivocation`, `conflict`) until the process restarts. Any other failure (the witness
cannot be reached, or refuses for another reason) is logged as a warning and retried next time.

Owns: the submission protocol and checking what witnesses return. Does not own: the transport
(a `WitnessClient`: the gRPC one lives with the peer listener; tests use an in-process twin), the
tree the proofs come from, or where cosignatures are stored (`gateway.audit.store`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.audit.note import Checkpoint, CosignatureVerifier, Note, NoteError, NoteSignature, parse_signature_lines
from gateway.audit.witness import ConflictKind, WitnessConflict, WitnessEquivocation, conflict_kind
from gateway.errors import GatewayError

__all__ = ["Collector", "CosignResult", "WitnessClient", "WitnessStatus"]

_log = logging.getLogger("gateway.audit.collector")

#: A function giving the consistency proof between two sizes of the log's tree.
ProofSource = Callable[[int, int], list[bytes]]


class WitnessClient(Protocol):
    """How the log reaches one peer's witness (tlog-witness add-checkpoint)."""

    async def add_checkpoint(self, old_size: int, proof: list[bytes], note: bytes) -> bytes:
        """Submit `note` (signed-note text) with the old size and consistency proof.

        Returns the witness's cosignature line(s). Raises `WitnessConflict(known_size)` when the
        witness holds another size, `WitnessEquivocation` when it holds another tree of this size,
        and a `GatewayError` for any other refusal or failure.
        """
        ...


@dataclass(frozen=True)
class CosignResult:
    """What one witness did with one checkpoint: a verified cosignature, or why not."""

    witness: str
    #: the size of the checkpoint submitted
    size: int
    signature: NoteSignature | None = None
    #: the cosignature's timestamp (POSIX seconds), when there is one
    timestamp: int | None = None
    error: str | None = None
    #: the witness reported, or revealed, a different history of this log
    equivocation: bool = False
    #: what the witness reported: a rollback, a fork, or a proof that fails from what it cosigned
    conflict: ConflictKind | None = None

    @property
    def ok(self) -> bool:
        """Whether a verified cosignature came back."""
        return self.signature is not None


@dataclass
class WitnessStatus:
    """What the log knows of one witness: the size it cosigned last, and the last failure."""

    name: str
    client: WitnessClient
    verifier: CosignatureVerifier
    size: int = 0
    last_error: str | None = None
    last_timestamp: int | None = None
    equivocation: bool = False
    #: the last kind of rollback or fork this witness reported, and how many times it did
    conflict: ConflictKind | None = None
    conflicts: int = 0


class Collector:
    """Submits checkpoints to witnesses, concurrently, and verifies their cosignatures.

    `proof` gives consistency proofs from the log's tree; it is called from the event loop and
    must be safe to call while the log appends (the store takes its tree lock).
    """

    def __init__(self, *, proof: ProofSource, timeout: float) -> None:
        self._proof = proof
        self._timeout = timeout
        self._witnesses: dict[str, WitnessStatus] = {}

    def add(self, name: str, client: WitnessClient, verifier: CosignatureVerifier, *, known_size: int = 0) -> None:
        """Register a witness; `known_size` is the size it last cosigned for this log (0: none)."""
        if verifier.name != name:
            raise NoteError(f"witness {name!r}: its verifier key is named {verifier.name!r}")
        self._witnesses[name] = WitnessStatus(name, client, verifier, size=known_size)

    def set_known_size(self, name: str, size: int) -> None:
        """Record that witness `name` holds a checkpoint of `size` (never moves backwards)."""
        status = self._witnesses.get(name)
        if status is not None and size > status.size:
            status.size = size

    @property
    def witnesses(self) -> dict[str, WitnessStatus]:
        """The registered witnesses, by name."""
        return dict(self._witnesses)

    def lagging(self, size: int) -> list[str]:
        """The witnesses that have not cosigned a checkpoint of at least `size`."""
        return [w.name for w in self._witnesses.values() if w.size < size]

    async def submit(self, note: Note) -> list[CosignResult]:
        """Submit a checkpoint note to every witness that does not hold its size yet; return the outcomes."""
        checkpoint = Checkpoint.parse(note.body)
        todo = [w for w in self._witnesses.values() if w.size != checkpoint.size]
        results = await asyncio.gather(*(self._submit_one(w, note, checkpoint) for w in todo))
        return list(results)

    async def _submit_one(self, witness: WitnessStatus, note: Note, checkpoint: Checkpoint) -> CosignResult:
        result = await self._exchange(witness, note, checkpoint)
        if result.ok:
            witness.size = checkpoint.size
            witness.last_error = None
            witness.last_timestamp = result.timestamp
        elif result.conflict is not None:
            witness.last_error = result.error
            witness.equivocation = True
            witness.conflict = result.conflict
            witness.conflicts += 1
            _log.error(
                "witness %s reports a %s of this log at checkpoint %d: %s",
                witness.name,
                result.conflict.value.upper(),
                checkpoint.size,
                result.error,
                extra={"witness": witness.name, "conflict": result.conflict.value},
            )
        else:
            witness.last_error = result.error
            witness.equivocation = witness.equivocation or result.equivocation
            log = _log.error if result.equivocation else _log.warning
            log("witness %s refused checkpoint %d: %s", witness.name, checkpoint.size, result.error)
        return result

    async def _exchange(self, witness: WitnessStatus, note: Note, checkpoint: Checkpoint) -> CosignResult:
        size = checkpoint.size
        old = witness.size
        text = note.text()
        for attempt in range(2):
            if old > size:
                return _rolled_back(witness.name, old, size)
            outcome = await self._attempt(witness, old, size, text)
            if isinstance(outcome, bytes):
                return self._check(witness, note, size, outcome)
            if isinstance(outcome, CosignResult):
                return outcome
            if attempt == 0:
                old = outcome  # the size the witness holds: retry once from there
        return CosignResult(witness.name, size, error=f"size conflict persisted: the witness holds size {old}")

    async def _attempt(self, witness: WitnessStatus, old: int, size: int, text: bytes) -> bytes | CosignResult | int:
        """One add-checkpoint call: the answer, a failed result, or the size a conflicting witness holds."""
        proof = self._proof(old, size) if 0 < old < size else []
        try:
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(self._timeout):
                return await witness.client.add_checkpoint(old, proof, text)
        except WitnessEquivocation as exc:
            return CosignResult(witness.name, size, error=exc.reason, equivocation=True, conflict=ConflictKind.FORK)
        except WitnessConflict as exc:
            if exc.known_size == old:
                return CosignResult(witness.name, size, error=f"size conflict: {exc.reason}")
            return exc.known_size
        except TimeoutError:
            return CosignResult(witness.name, size, error=f"no answer within {self._timeout:g} s")
        except Exception as exc:  # noqa: BLE001 - one witness's failure, whatever it is, must not stop the others; it is reported
            return _failed(witness.name, size, exc)

    @staticmethod
    def _check(witness: WitnessStatus, note: Note, size: int, line: bytes) -> CosignResult:
        """Find the witness's cosignature among the returned lines and verify it over the checkpoint."""
        try:
            signatures = parse_signature_lines(line)
        except NoteError as exc:
            return CosignResult(witness.name, size, error=f"malformed cosignature: {exc.reason}")
        for sig in signatures:
            if witness.verifier.matches(sig):
                try:
                    timestamp = witness.verifier.verify(note.body, sig)
                except NoteError as exc:
                    return CosignResult(witness.name, size, error=f"cosignature does not verify: {exc.reason}")
                return CosignResult(witness.name, size, signature=sig, timestamp=timestamp)
        return CosignResult(witness.name, size, error="no cosignature by the witness's key in its answer")


def _failed(name: str, size: int, exc: Exception) -> CosignResult:
    """A failed submission: a witness reporting a rollback or a fork, or any other failure."""
    kind = conflict_kind(exc) if isinstance(exc, GatewayError) else None
    if kind is None:
        return CosignResult(name, size, error=f"{type(exc).__name__}: {exc}")
    return CosignResult(name, size, error=str(exc), equivocation=True, conflict=kind)


def _rolled_back(name: str, held: int, size: int) -> CosignResult:
    return CosignResult(
        name,
        size,
        error=f"the witness holds a checkpoint of size {held}, beyond this log's checkpoint of size {size}:"
        " this log was rolled back or forked",
        equivocation=True,
        conflict=ConflictKind.ROLLBACK,
    )
