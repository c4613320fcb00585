"""The tlog-witness logic: a table of named submissions (good and hostile), durable state, races."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.merkle import EMPTY_ROOT, MerkleTree, ProofError, leaf_hash
from gateway.audit.note import (
    Checkpoint,
    CosignatureSigner,
    CosignatureVerifier,
    NoteError,
    NoteSigner,
    NoteVerifier,
    parse_note,
    sign_note,
    verify_cosignature,
    verify_note,
)
from gateway.audit.witness import (
    CONFLICT_PUBLIC,
    MAX_PROOF_LINES,
    AddCheckpointRequest,
    ConflictEvidence,
    ConflictKind,
    InMemoryWitnessState,
    Kept,
    SqliteWitnessState,
    Witness,
    WitnessConflict,
    WitnessEquivocation,
    WitnessState,
    WitnessStateUnavailable,
    conflict_kind,
    read_conflicts,
)
from gateway.cli import main
from gateway.clock import FakeClock
from gateway.errors import GatewayError, InvalidArgument, NotFound, PermissionDenied, Unauthenticated

NOW = 1_800_000_000.75
WMP = "wmp.police.example/audit"
GMP = "gmp.police.example/audit"


def _key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


@dataclass
class Log:
    """A force's audit log as a witness sees it: a tree and a checkpoint key."""

    origin: str
    signer: NoteSigner
    history: str = "honest"
    tree: MerkleTree = field(default_factory=MerkleTree)

    @classmethod
    def make(cls, origin: str, *, key: str | None = None, history: str = "honest") -> Log:
        return cls(origin, NoteSigner(origin, _key(key or origin)), history)

    def grow(self, n: int, *, history: str | None = None) -> Log:
        """Append leaves; leaves of different histories differ."""
        label = history or self.history
        for _ in range(n):
            self.tree.append(leaf_hash(f"{self.origin}/{label}/{self.tree.size}".encode()))
        return self

    def checkpoint(self, size: int | None = None, *, signer: NoteSigner | None = None) -> bytes:
        size = self.tree.size if size is None else size
        body = Checkpoint(self.origin, size, self.tree.root(size)).body()
        return sign_note(body, [signer or self.signer]).text()

    def proof(self, old: int, new: int | None = None) -> list[bytes]:
        return self.tree.consistency_proof(old, new)

    def fork(self, at: int, history: str) -> Log:
        """The same log key with a history that agrees on the first `at` leaves only."""
        forked = Log(self.origin, self.signer, history, MerkleTree(self.tree.leaf(i) for i in range(at)))
        return forked


def _make_witness(state: WitnessState, *logs: Log, clock: FakeClock | None = None) -> Witness:
    cosigner = CosignatureSigner("met.police.example/witness", _key("met witness"))
    return Witness(cosigner, {log.origin: log.signer.verifier() for log in logs}, state, clock or FakeClock(NOW))


def _submit(witness: Witness, log: Log, old: int, new: int | None = None, **kwargs: object) -> int:
    """Submit log's checkpoint with an honest proof; return the verified cosignature's timestamp."""
    note_text = log.checkpoint(new)
    sig = witness.add_checkpoint(old, log.proof(old, new) if old else [], note_text, **kwargs)  # type: ignore[arg-type]  # kwargs is submitter_origin only
    note = parse_note(note_text).with_signatures([sig])
    verify_note(note, log.signer.verifier())
    return verify_cosignature(note, CosignatureVerifier.from_vkey(witness.vkey()))


# -- the table of named cases ---------------------------------------------------------------------


@dataclass
class Case:
    """A witness that has cosigned `log` up to `held` leaves, then one submission."""

    held: int
    submit: Callable[[Witness, Log], object]
    refused_with: type[GatewayError] | None = None
    match: str = ""
    #: the evidence the witness must keep (and the refusal name): only a validly signed rollback or fork
    shows: ConflictKind | None = None


def _sub(
    old: int, new: int | None = None, *, proof: Callable[[Log], list[bytes]] | None = None
) -> Callable[..., object]:
    def go(witness: Witness, log: Log) -> object:
        return witness.add_checkpoint(old, proof(log) if proof else log.proof(old, new), log.checkpoint(new))

    return go


def _flip_first_bit(proof: list[bytes]) -> list[bytes]:
    return [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]


def _fork_same_size(witness: Witness, log: Log) -> object:
    """The witness holds size 9; the same log key signs another tree of size 9."""
    fork = log.fork(3, "forked").grow(6)
    return witness.add_checkpoint(9, [], fork.checkpoint())


def _fork_same_size_stale(witness: Witness, log: Log) -> object:
    """As above, but the log says the witness holds size 4: a size conflict, and evidence all the same."""
    fork = log.fork(3, "forked").grow(6)
    return witness.add_checkpoint(4, fork.proof(4), fork.checkpoint())


def _fork_bigger(witness: Witness, log: Log) -> object:
    """A history that agrees on 3 leaves, then differs; an honest-looking proof from its own size 9."""
    fork = log.fork(3, "forked").grow(12)
    return witness.add_checkpoint(9, fork.proof(9), fork.checkpoint())


def _signed_by_another_key(witness: Witness, log: Log) -> object:
    imposter = NoteSigner(log.origin, _key("imposter"))  # same name, different key: unknown key id
    return witness.add_checkpoint(9, log.proof(9, 12), log.checkpoint(12, signer=imposter))


def _corrupted_signature(witness: Witness, log: Log) -> object:
    text = log.checkpoint(12)
    sig_start = text.rindex(b" ") + 1
    corrupted = text[:sig_start] + base64.b64encode(bytes(68)) + b"\n"
    return witness.add_checkpoint(9, log.proof(9, 12), corrupted)


def _other_log_speaks_for_this_one(witness: Witness, log: Log) -> object:
    """GMP's key signs a checkpoint that claims WMP's origin: WMP's key is the only one that counts."""
    gmp = Log.make(GMP)
    body = Checkpoint(log.origin, 12, log.tree.root(12)).body()
    return witness.add_checkpoint(9, log.proof(9, 12), sign_note(body, [gmp.signer]).text())


def _rollback_by_another_key(witness: Witness, log: Log) -> object:
    imposter = NoteSigner(log.origin, _key("imposter"))
    return witness.add_checkpoint(9, [], log.checkpoint(5, signer=imposter))


def _rollback_by_another_submitter(witness: Witness, log: Log) -> object:
    return witness.add_checkpoint(9, [], log.checkpoint(5), submitter_origin=GMP)


def _rollback_corrupted(witness: Witness, log: Log) -> object:
    text = log.checkpoint(5)
    sig_start = text.rindex(b" ") + 1
    return witness.add_checkpoint(9, [], text[:sig_start] + base64.b64encode(bytes(68)) + b"\n")


def _unknown_origin(witness: Witness, log: Log) -> object:
    stranger = Log.make("stranger.example/log").grow(4)
    return witness.add_checkpoint(0, [], stranger.checkpoint())


def _wrong_submitter(witness: Witness, log: Log) -> object:
    return witness.add_checkpoint(9, log.proof(9, 12), log.checkpoint(12), submitter_origin=GMP)


def _empty_tree_with_a_root(witness: Witness, log: Log) -> object:
    body = Checkpoint(log.origin, 0, hashlib.sha256(b"not empty").digest()).body()
    return witness.add_checkpoint(0, [], sign_note(body, [log.signer]).text())


def _empty_tree(witness: Witness, log: Log) -> object:
    body = Checkpoint(log.origin, 0, EMPTY_ROOT).body()
    return witness.add_checkpoint(0, [], sign_note(body, [log.signer]).text())


ROLLBACK, FORK, BAD_PROOF = ConflictKind.ROLLBACK, ConflictKind.FORK, ConflictKind.BAD_PROOF

CASES = {
    # the good path
    "first checkpoint": Case(0, _sub(0, 5, proof=lambda log: [])),
    "first checkpoint of the empty tree": Case(0, _empty_tree),
    "next checkpoint": Case(9, _sub(9, 12)),
    "same checkpoint again": Case(9, _sub(9, 9, proof=lambda log: [])),
    "submitter is the log itself": Case(
        9, lambda w, log: w.add_checkpoint(9, log.proof(9, 12), log.checkpoint(12), submitter_origin=WMP)
    ),
    # size conflicts
    "first checkpoint, old size not zero": Case(0, _sub(3, 5), WitnessConflict, "holds size 0"),
    "stale old size": Case(9, _sub(5, 12), WitnessConflict, "holds size 9"),
    "old size ahead of the witness": Case(9, _sub(10, 12), WitnessConflict, "holds size 9"),
    "old size above the checkpoint size": Case(9, _sub(12, 10, proof=lambda log: []), InvalidArgument, "above"),
    # going backwards
    "rollback": Case(9, _sub(9, 5, proof=lambda log: []), InvalidArgument, "rollback", ROLLBACK),
    "rollback to the empty tree": Case(9, _sub(9, 0, proof=lambda log: []), InvalidArgument, "rollback", ROLLBACK),
    "rollback, presented as the log's first checkpoint": Case(
        9, _sub(0, 5, proof=lambda log: []), WitnessConflict, "", ROLLBACK
    ),
    "rollback with an old size above both sizes": Case(
        9, _sub(12, 5, proof=lambda log: []), InvalidArgument, "rollback", ROLLBACK
    ),
    # two histories
    "fork: same size, different root": Case(9, _fork_same_size, WitnessEquivocation, "EQUIVOCATION", FORK),
    "fork: same size, different root, stale old size": Case(9, _fork_same_size_stale, WitnessConflict, "", FORK),
    "fork: larger tree of another history": Case(9, _fork_bigger, ProofError, "different history", BAD_PROOF),
    # bad proofs
    "proof with a flipped bit": Case(
        9, _sub(9, 12, proof=lambda log: _flip_first_bit(log.proof(9, 12))), ProofError, "", BAD_PROOF
    ),
    "proof missing its last hash": Case(
        9, _sub(9, 12, proof=lambda log: log.proof(9, 12)[:-1]), ProofError, "", BAD_PROOF
    ),
    "proof with a trailing hash": Case(
        9, _sub(9, 12, proof=lambda log: [*log.proof(9, 12), EMPTY_ROOT]), ProofError, "", BAD_PROOF
    ),
    "proof for other sizes": Case(9, _sub(9, 12, proof=lambda log: log.proof(8, 12)), ProofError, "", BAD_PROOF),
    "empty proof": Case(9, _sub(9, 12, proof=lambda log: []), ProofError, "", BAD_PROOF),
    "proof from size 0": Case(0, _sub(0, 5, proof=lambda log: log.proof(1, 5)), ProofError, "size 0"),
    "proof for the same size": Case(9, _sub(9, 9, proof=lambda log: [EMPTY_ROOT]), ProofError, "must be empty"),
    "proof hash of the wrong length": Case(9, _sub(9, 12, proof=lambda log: [b"\x00" * 31]), ProofError, "", BAD_PROOF),
    "too many proof lines": Case(
        9, _sub(9, 12, proof=lambda log: [EMPTY_ROOT] * (MAX_PROOF_LINES + 1)), InvalidArgument, "more than 63"
    ),
    "empty tree with a non-empty root": Case(0, _empty_tree_with_a_root, ProofError, "empty root"),
    # who signed and who submitted
    "signed by another key under the log's name": Case(9, _signed_by_another_key, Unauthenticated),
    "corrupted log signature": Case(9, _corrupted_signature, Unauthenticated),
    "another known log signs for this origin": Case(9, _other_log_speaks_for_this_one, Unauthenticated),
    "unknown origin": Case(9, _unknown_origin, NotFound),
    "wrong submitter": Case(9, _wrong_submitter, PermissionDenied),
    "rollback signed by another key": Case(9, _rollback_by_another_key, Unauthenticated),
    "rollback submitted by another force": Case(9, _rollback_by_another_submitter, PermissionDenied),
    "rollback with a corrupted signature": Case(9, _rollback_corrupted, Unauthenticated),
    # malformed input
    "not a note": Case(9, lambda w, log: w.add_checkpoint(9, [], b"hello\n"), NoteError),
    "not a checkpoint": Case(
        9, lambda w, log: w.add_checkpoint(9, [], sign_note(b"hello\n", [log.signer]).text()), NoteError
    ),
    "negative old size": Case(9, _sub(9, 12, proof=lambda log: []), None),  # replaced below
}
CASES["negative old size"] = Case(
    9, lambda w, log: w.add_checkpoint(-1, [], log.checkpoint(12)), InvalidArgument, "non-negative"
)


@pytest.fixture(params=["memory", "sqlite"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WitnessState]:
    if request.param == "memory":
        yield InMemoryWitnessState()
    else:
        with SqliteWitnessState(tmp_path / "witness.sqlite") as sqlite_state:
            yield sqlite_state


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_submission(case: Case, state: WitnessState) -> None:
    log = Log.make(WMP).grow(20)
    gmp = Log.make(GMP)
    witness = _make_witness(state, log, gmp)
    if case.held:
        witness.add_checkpoint(0, [], log.checkpoint(case.held))
    before = state.latest(WMP)
    if case.refused_with is None:
        sig = case.submit(witness, log)
        assert CosignatureVerifier.from_vkey(witness.vkey()).matches(sig)  # type: ignore[arg-type]  # it is a NoteSignature
        return
    with pytest.raises(case.refused_with, match=case.match or None) as excinfo:
        case.submit(witness, log)
    assert type(excinfo.value) is case.refused_with, excinfo.value
    assert state.latest(WMP) == before, "a refused submission must not change what the witness holds"
    # Only a validly signed rollback or fork is evidence; it is kept, and the refusal names it.
    assert conflict_kind(excinfo.value) is case.shows
    assert [e.kind for e in state.conflicts()] == ([case.shows] if case.shows else [])


def test_good_chain_cosigns_each_checkpoint_and_stores_it(state: WitnessState) -> None:
    clock = FakeClock(NOW)
    log = Log.make(WMP)
    witness = _make_witness(state, log, clock=clock)
    old = 0
    for step in (1, 4, 7, 7, 16, 1, 64):
        log.grow(step)
        assert _submit(witness, log, old) == int(clock.now())  # whole seconds
        held = state.latest(WMP)
        assert held is not None
        assert held[:2] == (log.tree.size, log.tree.root())
        assert held[2] == log.checkpoint()
        old = log.tree.size
        clock.advance(60)
    assert _submit(witness, log, old) == int(clock.now())  # the same checkpoint again is cosigned again


def test_a_log_cannot_show_the_witness_two_histories(state: WitnessState) -> None:
    """History A is cosigned; history B, of the same size or larger, is refused; A goes on."""
    history_a = Log.make(WMP, history="A").grow(10)
    history_b = Log.make(WMP, history="B").grow(10)  # same key, different leaves from the start
    witness = _make_witness(state, history_a)
    _submit(witness, history_a, 0)

    with pytest.raises(WitnessEquivocation) as excinfo:
        witness.add_checkpoint(10, [], history_b.checkpoint())
    error = excinfo.value
    assert error.held_root == history_a.tree.root() and error.presented_root == history_b.tree.root()
    assert error.held_note == history_a.checkpoint() and error.presented_note == history_b.checkpoint()
    assert error.known_size == 10
    assert "EQUIVOCATION" in error.reason and WMP in error.reason

    history_b.grow(5)
    with pytest.raises(ProofError, match="different history"):
        witness.add_checkpoint(10, history_b.proof(10), history_b.checkpoint())
    with pytest.raises(WitnessConflict):  # starting B afresh does not work either
        witness.add_checkpoint(0, [], history_b.checkpoint())

    assert state.latest(WMP) == (10, history_a.tree.root(), history_a.checkpoint())
    history_a.grow(5)
    _submit(witness, history_a, 10)


def test_split_view_is_caught_once_the_witnesses_compare(tmp_path: Path) -> None:
    """A log shows A to one witness and B to another; each alone cosigns, then each refuses the other's."""
    history_a = Log.make(WMP, history="A").grow(6)
    history_b = Log.make(WMP, history="B").grow(6)
    first, second = _make_witness(InMemoryWitnessState(), history_a), _make_witness(InMemoryWitnessState(), history_a)
    _submit(first, history_a, 0)
    _submit(second, history_b, 0)
    with pytest.raises(WitnessEquivocation):
        first.add_checkpoint(6, [], history_b.checkpoint())
    with pytest.raises(WitnessEquivocation):
        second.add_checkpoint(6, [], history_a.checkpoint())


# -- evidence of rollbacks and forks --------------------------------------------------------------


def _caught(
    witness: Witness, old: int, proof: list[bytes], note: bytes, **kwargs: object
) -> tuple[GatewayError, list[ConflictEvidence]]:
    """Submit one refused checkpoint; the refusal and what `on_conflict` was told."""
    told: list[ConflictEvidence] = []
    with pytest.raises(GatewayError) as excinfo:
        witness.add_checkpoint(old, proof, note, on_conflict=told.append, **kwargs)  # type: ignore[arg-type]  # kwargs are the submitter ones
    return excinfo.value, told


def test_a_rollback_is_kept_logged_and_answered_as_the_protocol_says(
    state: WitnessState, caplog: pytest.LogCaptureFixture
) -> None:
    """The log had 12 cosigned, truncated itself to 5 and presents its new checkpoint as its first."""
    clock = FakeClock(NOW)
    log = Log.make(WMP).grow(12)
    witness = _make_witness(state, log, clock=clock)
    _submit(witness, log, 0)
    cosigned = log.checkpoint()
    truncated = Log(log.origin, log.signer, "honest", MerkleTree(log.tree.leaf(i) for i in range(5)))
    clock.advance(60)

    error, told = _caught(
        witness, 0, [], truncated.checkpoint(), submitter_origin=WMP, submitter="spiffe://wmp.police.example/gateway"
    )
    assert type(error) is WitnessConflict and error.known_size == 12  # tlog-witness: 409 with the size held
    assert conflict_kind(error) is ConflictKind.ROLLBACK
    [evidence] = state.conflicts()
    assert told == [evidence]
    assert evidence.kind is ConflictKind.ROLLBACK and evidence.origin == WMP
    assert evidence.presented_note == truncated.checkpoint() and evidence.presented_size == 5
    assert evidence.held_note == cosigned and (evidence.held_size, evidence.held_root) == (12, log.tree.root())
    assert evidence.submitter == "spiffe://wmp.police.example/gateway" and evidence.at == clock.now()
    verify_note(parse_note(evidence.presented_note), log.signer.verifier())  # evidence anyone can check
    [line] = [r for r in caplog.records if r.name == "gateway.audit.witness"]
    assert line.levelname == "ERROR" and WMP in line.getMessage() and "ROLLBACK" in line.getMessage()
    assert line.origin == WMP  # type: ignore[attr-defined]  # the structured field, from `extra`
    assert witness.conflict_summary()[WMP]["rollback"]["submissions"] == 1
    assert state.latest(WMP) == (12, log.tree.root(), cosigned)


def test_a_fork_of_the_cosigned_size_is_kept(state: WitnessState) -> None:
    log = Log.make(WMP).grow(9)
    witness = _make_witness(state, log)
    _submit(witness, log, 0)
    fork = log.fork(3, "forked").grow(6)

    error, told = _caught(witness, 9, [], fork.checkpoint())
    assert type(error) is WitnessEquivocation and error.public == CONFLICT_PUBLIC[ConflictKind.FORK]
    [evidence] = state.conflicts()
    assert told == [evidence] and evidence.kind is ConflictKind.FORK
    assert (evidence.presented_size, evidence.presented_root) == (9, fork.tree.root())
    assert (evidence.held_size, evidence.held_root, evidence.held_note) == (9, log.tree.root(), log.checkpoint())


def test_a_consistency_proof_that_fails_from_the_cosigned_checkpoint_is_kept(state: WitnessState) -> None:
    log = Log.make(WMP).grow(9)
    witness = _make_witness(state, log)
    _submit(witness, log, 0)
    fork = log.fork(3, "forked").grow(12)  # 15 leaves that disagree with the cosigned 9 from leaf 3

    error, told = _caught(witness, 9, fork.proof(9), fork.checkpoint())
    assert type(error) is ProofError and conflict_kind(error) is ConflictKind.BAD_PROOF
    [evidence] = state.conflicts()
    assert told == [evidence] and evidence.kind is ConflictKind.BAD_PROOF
    assert evidence.proof == tuple(fork.proof(9)) and evidence.old_size == 9
    assert evidence.presented_note == fork.checkpoint() and evidence.held_note == log.checkpoint()


def test_evidence_is_kept_once_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "witness.sqlite"
    log = Log.make(WMP).grow(12)
    rolled_back = log.checkpoint(4)
    clock = FakeClock(NOW)
    with SqliteWitnessState(path) as state:
        witness = _make_witness(state, log, clock=clock)
        _submit(witness, log, 0)
        for _ in range(3):  # the rolled-back log retries at every checkpoint interval
            clock.advance(30)
            _caught(witness, 0, [], rolled_back)
        assert witness.conflict_summary()[WMP]["rollback"]["submissions"] == 3
    with SqliteWitnessState(path) as state:
        [evidence] = state.conflicts()
        assert evidence.presented_note == rolled_back and evidence.held_note == log.checkpoint()
        assert (evidence.seen, evidence.at, evidence.last_at) == (3, NOW + 30, NOW + 90)
        reopened = _make_witness(state, log, clock=clock)
        summary = reopened.conflict_summary()[WMP]["rollback"]
        assert (summary["submissions"], summary["kept"], summary["last_at"]) == (3, 1, NOW + 90)
        assert reopened.conflicts() == [evidence]
    assert read_conflicts(path) == [evidence]


def test_evidence_is_bounded_per_origin_and_kind(state: WitnessState) -> None:
    log = Log.make(WMP).grow(12)
    witness = Witness(
        CosignatureSigner("met.police.example/witness", _key("met witness")),
        {WMP: log.signer.verifier()},
        state,
        FakeClock(NOW),
        max_evidence=2,
    )
    _submit(witness, log, 0)
    for size in (1, 2, 3, 4, 5):
        _caught(witness, 0, [], log.checkpoint(size))
    assert [e.presented_size for e in state.conflicts()] == [1, 2]
    fork = log.fork(3, "forked").grow(9)
    _caught(witness, 12, [], fork.checkpoint())  # another kind has its own room
    assert [e.kind for e in state.conflicts()] == [ConflictKind.ROLLBACK] * 2 + [ConflictKind.FORK]
    summary = witness.conflict_summary()[WMP]
    assert summary["rollback"]["submissions"] == 5 and summary["rollback"]["not_kept"] == 3
    assert summary["fork"]["kept"] == 1


def test_unsigned_garbage_keeps_nothing(state: WitnessState) -> None:
    """Rollback-shaped input without the log's valid signature, or from another force, is only refused."""
    log = Log.make(WMP).grow(12)
    gmp = Log.make(GMP).grow(3)
    witness = _make_witness(state, log, gmp)
    _submit(witness, log, 0)
    body = Checkpoint(WMP, 4, log.tree.root(4)).body()
    submissions = [
        body,  # no signature at all
        sign_note(body, [NoteSigner(WMP, _key("imposter"))]).text(),
        sign_note(body, [gmp.signer]).text(),
        log.checkpoint(4)[:-20] + b"A" * 19 + b"\n",
        b"\xff" * 64,
    ]
    for note in submissions:
        with pytest.raises((GatewayError, NoteError)):
            witness.add_checkpoint(12, [], note)
    _caught(witness, 0, [], log.checkpoint(4), submitter_origin=GMP)
    assert state.conflicts() == []
    assert witness.conflict_summary() == {}


def test_an_honest_log_that_is_behind_is_not_reported(state: WitnessState) -> None:
    """A log behind in what it knows of the witness (a lost cosignature, a restart) presents no less than
    it had: size conflicts, then cosignatures, and no evidence."""
    log = Log.make(WMP).grow(9)
    witness = _make_witness(state, log)
    _submit(witness, log, 0)
    # The log crashed before it stored the cosignature of 9: it still believes the witness holds 0...
    with pytest.raises(WitnessConflict) as excinfo:
        witness.add_checkpoint(0, [], log.checkpoint())
    assert excinfo.value.known_size == 9 and conflict_kind(excinfo.value) is None
    log.grow(3)
    for old in (0, 5):  # ...or some older size, with its newer checkpoint
        with pytest.raises(WitnessConflict):
            witness.add_checkpoint(old, log.proof(old) if old else [], log.checkpoint())
    _submit(witness, log, 9)  # it catches up from the size the witness named
    _submit(witness, log, 12)  # and the same checkpoint again is simply cosigned again
    assert state.conflicts() == []
    assert witness.conflict_summary() == {}


def test_the_witness_conflicts_command_prints_the_evidence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "witness.sqlite"
    log = Log.make(WMP).grow(12)
    fork = log.fork(3, "forked").grow(9)
    with SqliteWitnessState(path) as state:
        witness = _make_witness(state, log)
        _submit(witness, log, 0)
        _caught(witness, 0, [], log.checkpoint(4), submitter_origin=WMP)
        _caught(witness, 12, [], fork.checkpoint())
        assert main(["audit", "witness-conflicts", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(e["origin"], e["kind"]) for e in shown] == [(WMP, "rollback"), (WMP, "fork")]
    assert shown[0]["presented"]["note"].encode() == log.checkpoint(4)
    assert shown[0]["cosigned"] == {"size": 12, "root": log.tree.root().hex(), "note": log.checkpoint().decode()}
    assert shown[0]["submitter"] == WMP and shown[1]["submitter"] == "local"
    assert main(["audit", "witness-conflicts", str(path), "--kind", "fork"]) == 0
    assert [e["kind"] for e in json.loads(capsys.readouterr().out)] == ["fork"]
    assert main(["audit", "witness-conflicts", str(path), "--origin", GMP]) == 0
    assert json.loads(capsys.readouterr().out) == []
    not_a_witness = tmp_path / "other.sqlite"
    sqlite3.connect(not_a_witness).close()
    assert main(["audit", "witness-conflicts", str(not_a_witness)]) == 2
    assert "not a witness database" in capsys.readouterr().err


# -- durable state --------------------------------------------------------------------------------


def test_sqlite_state_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "witness.sqlite"
    log = Log.make(WMP).grow(8)
    with SqliteWitnessState(path) as state:
        _submit(_make_witness(state, log), log, 0)
    with SqliteWitnessState(path) as state:
        assert state.latest(WMP) == (8, log.tree.root(), log.checkpoint())
        assert state.latest(GMP) is None
        witness = _make_witness(state, log)
        with pytest.raises(WitnessConflict) as excinfo:
            witness.add_checkpoint(0, [], log.grow(2).checkpoint())
        assert excinfo.value.known_size == 8
        _submit(witness, log, 8)
    with SqliteWitnessState(path) as state:
        assert state.latest(WMP) == (10, log.tree.root(), log.checkpoint())


def test_sqlite_state_is_wal_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "witness.sqlite"
    with SqliteWitnessState(path) as state:
        assert state.path == path
        assert state._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_sqlite_state_refuses_an_unusable_file(tmp_path: Path) -> None:
    with pytest.raises(WitnessStateUnavailable):
        SqliteWitnessState(tmp_path / "no such directory" / "witness.sqlite")
    not_a_db = tmp_path / "garbage.sqlite"
    not_a_db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(WitnessStateUnavailable):
        SqliteWitnessState(not_a_db)


def test_sqlite_state_write_failure_is_infrastructure(tmp_path: Path) -> None:
    state = SqliteWitnessState(tmp_path / "witness.sqlite")
    state.close()
    with pytest.raises(WitnessStateUnavailable):
        state.store(WMP, 1, EMPTY_ROOT, b"n")
    with pytest.raises(WitnessStateUnavailable):
        state.latest(WMP)


ROOT_A, ROOT_B = hashlib.sha256(b"A").digest(), hashlib.sha256(b"B").digest()


def test_states_guard_against_going_backwards(state: WitnessState) -> None:
    state.store(WMP, 5, ROOT_A, b"a5")
    with pytest.raises(InvalidArgument, match="rollback"):
        state.store(WMP, 4, ROOT_A, b"a4")
    with pytest.raises(WitnessEquivocation):
        state.store(WMP, 5, ROOT_B, b"b5")
    with pytest.raises(WitnessConflict) as excinfo:
        state.store(WMP, 7, ROOT_B, b"b7", expected_size=3)
    assert excinfo.value.known_size == 5
    state.store(WMP, 7, ROOT_B, b"b7", expected_size=5)
    assert state.latest(WMP) == (7, ROOT_B, b"b7")
    with pytest.raises(WitnessConflict):
        state.store(GMP, 1, ROOT_A, b"g1", expected_size=1)  # nothing held counts as size 0
    for bad in ((WMP, -1, ROOT_A, b""), (WMP, 1 << 63, ROOT_A, b""), (WMP, 9, ROOT_A[:31], b""), ("", 9, ROOT_A, b"")):
        with pytest.raises(InvalidArgument):
            state.store(*bad)
    assert state.latest(WMP) == (7, ROOT_B, b"b7")


def test_compare_and_swap_across_connections(tmp_path: Path) -> None:
    """Two processes' views of one file: both read size 0, only the first write wins."""
    path = tmp_path / "witness.sqlite"
    with SqliteWitnessState(path) as one, SqliteWitnessState(path) as two:
        assert one.latest(WMP) is None and two.latest(WMP) is None
        one.store(WMP, 5, ROOT_A, b"a5", expected_size=0)
        with pytest.raises(WitnessConflict) as excinfo:
            two.store(WMP, 7, ROOT_B, b"b7", expected_size=0)
        assert excinfo.value.known_size == 5
        assert two.latest(WMP) == (5, ROOT_A, b"a5")


class _BothReadFirst:
    """A state whose reads wait until both submitters have read: forces the race the CAS must win."""

    def __init__(self, inner: WitnessState, barrier: threading.Barrier) -> None:
        self._inner = inner
        self._barrier = barrier

    def latest(self, origin: str) -> tuple[int, bytes, bytes] | None:
        held = self._inner.latest(origin)
        self._barrier.wait()
        return held

    def store(self, origin: str, size: int, root_hash: bytes, note: bytes, *, expected_size: int | None = None) -> None:
        self._inner.store(origin, size, root_hash, note, expected_size=expected_size)

    def keep_conflict(self, evidence: ConflictEvidence, *, limit: int) -> Kept:
        return self._inner.keep_conflict(evidence, limit=limit)

    def conflicts(self) -> list[ConflictEvidence]:
        return self._inner.conflicts()


def test_concurrent_submissions_of_two_histories_cannot_both_win(tmp_path: Path) -> None:
    """tlog-witness's race: two gateways' witnesses share one state file (two processes, so no shared
    lock); both check against size 5, one submits 5 -> 8 of history A, the other 5 -> 9 of history B.
    Each proof is valid against size 5, but A and B disagree: at most one may be cosigned."""
    path = tmp_path / "witness.sqlite"
    base = Log.make(WMP).grow(5)
    history_a = base.fork(5, "A").grow(3)
    history_b = base.fork(5, "B").grow(4)
    with SqliteWitnessState(path) as setup:
        _submit(_make_witness(setup, base), base, 0)

    results: dict[str, object] = {}
    barrier = threading.Barrier(2, timeout=10)

    def run(label: str, log: Log) -> None:
        with SqliteWitnessState(path) as own:
            witness = _make_witness(_BothReadFirst(own, barrier), base)
            try:
                results[label] = witness.add_checkpoint(5, log.proof(5), log.checkpoint())
            except GatewayError as exc:
                results[label] = exc

    threads = [threading.Thread(target=run, args=args) for args in (("A", history_a), ("B", history_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    outcomes = sorted(type(r).__name__ for r in results.values())
    assert outcomes == ["NoteSignature", "WitnessConflict"], results
    with SqliteWitnessState(path) as check:
        held = check.latest(WMP)
    assert held is not None
    winner = history_a if results["A"].__class__.__name__ == "NoteSignature" else history_b
    assert held[:2] == (winner.tree.size, winner.tree.root())


def test_one_witness_serialises_submissions_per_origin(state: WitnessState) -> None:
    """Many threads race one witness with forks of the same size: exactly one is cosigned."""
    base = Log.make(WMP).grow(4)
    witness = _make_witness(state, base)
    _submit(witness, base, 0)
    forks = [base.fork(4, f"fork{i}").grow(3) for i in range(8)]
    barrier = threading.Barrier(len(forks))
    wins: list[int] = []
    refusals: list[GatewayError] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            witness.add_checkpoint(4, forks[i].proof(4), forks[i].checkpoint())
            wins.append(i)
        except GatewayError as exc:
            refusals.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(forks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(wins) == 1
    assert len(refusals) == len(forks) - 1
    assert all(isinstance(e, WitnessConflict) for e in refusals)


class _ConcurrencyProbe:
    """A state that counts how many submissions are between reading and deciding at once."""

    def __init__(self, inner: WitnessState) -> None:
        self._inner = inner
        self._count_lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0

    def latest(self, origin: str) -> tuple[int, bytes, bytes] | None:
        with self._count_lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.02)  # widen the window in which an unserialised second submission would overlap
        with self._count_lock:
            self.inside -= 1
        return self._inner.latest(origin)

    def store(self, origin: str, size: int, root_hash: bytes, note: bytes, *, expected_size: int | None = None) -> None:
        self._inner.store(origin, size, root_hash, note, expected_size=expected_size)

    def keep_conflict(self, evidence: ConflictEvidence, *, limit: int) -> Kept:
        return self._inner.keep_conflict(evidence, limit=limit)

    def conflicts(self) -> list[ConflictEvidence]:
        return self._inner.conflicts()


def test_the_witness_lock_serialises_reads_per_origin() -> None:
    """The compare-and-swap in the state is the last line; the witness's own lock comes first."""
    base = Log.make(WMP).grow(4)
    probe = _ConcurrencyProbe(InMemoryWitnessState())
    witness = _make_witness(probe, base)
    _submit(witness, base, 0)
    forks = [base.fork(4, f"fork{i}").grow(3) for i in range(4)]
    barrier = threading.Barrier(len(forks))

    def run(i: int) -> None:
        barrier.wait()
        with contextlib.suppress(GatewayError):
            witness.add_checkpoint(4, forks[i].proof(4), forks[i].checkpoint())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(forks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert probe.most_inside == 1


def test_witness_configuration_is_checked() -> None:
    cosigner = CosignatureSigner("w", _key("w"))
    log = Log.make(WMP)
    with pytest.raises(TypeError):
        Witness(NoteSigner("w", _key("w")), {}, InMemoryWitnessState(), FakeClock())  # type: ignore[arg-type]  # wrong type on purpose
    with pytest.raises(TypeError):
        Witness(cosigner, {"": log.signer.verifier()}, InMemoryWitnessState(), FakeClock())
    with pytest.raises(TypeError):
        Witness(cosigner, {WMP: "not a verifier"}, InMemoryWitnessState(), FakeClock())  # type: ignore[dict-item]  # as above
    witness = Witness(cosigner, {WMP: NoteVerifier.from_vkey(log.signer.vkey())}, InMemoryWitnessState(), FakeClock())
    assert witness.name == "w"
    assert witness.vkey() == cosigner.vkey()


def test_clock_before_1970_is_refused() -> None:
    log = Log.make(WMP).grow(2)
    witness = _make_witness(InMemoryWitnessState(), log, clock=FakeClock(-5.0))
    with pytest.raises(WitnessStateUnavailable):
        witness.add_checkpoint(0, [], log.checkpoint())


# -- the tlog-witness add-checkpoint request body -------------------------------------------------

SPEC_REQUEST = (
    "old 20852014\n"
    "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"
    "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=\n"
    "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=\n"
    "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=\n"
    "\n"
    "example.com/behind-the-sofa\n"
    "20852163\n"
    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n"
    "— example.com/behind-the-sofa "
    "Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
    "— example.com/behind-the-sofa "
    "opLqBQsREYCgu6xQkYQwJr9fo45a62DN9EdmHXnZdXNqlcVGlCum2Wks+49/V6267UEjw6QUXTS5Rovnzv++qbSzm9Q=\n"
).encode()


def test_tlog_witness_request_example() -> None:
    request = AddCheckpointRequest.decode(SPEC_REQUEST)
    assert request.old_size == 20852014
    assert len(request.proof) == 4 and all(len(h) == 32 for h in request.proof)
    note = parse_note(request.note)
    assert Checkpoint.parse(note.body).size == 20852163
    assert len(note.signatures) == 2
    assert request.encode() == SPEC_REQUEST


def test_request_round_trip_through_a_witness() -> None:
    log = Log.make(WMP).grow(9)
    witness = _make_witness(InMemoryWitnessState(), log)
    first = AddCheckpointRequest.decode(AddCheckpointRequest(0, (), log.checkpoint(5)).encode())
    witness.add_checkpoint(first.old_size, first.proof, first.note)
    second = AddCheckpointRequest.decode(AddCheckpointRequest(5, tuple(log.proof(5)), log.checkpoint()).encode())
    assert second.proof == tuple(log.proof(5))
    witness.add_checkpoint(second.old_size, second.proof, second.note)


HASH_LINE = b"PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"old 5\n", id="no-blank-line"),
        pytest.param(b"old 5\n\n", id="no-checkpoint"),
        pytest.param(b"old 05\n\nnote\n", id="leading-zero"),
        pytest.param(b"old -1\n\nnote\n", id="negative"),
        pytest.param(b"Old 5\n\nnote\n", id="capital-O"),
        pytest.param(b"old  5\n\nnote\n", id="two-spaces"),
        pytest.param(b"old 5\r\n\nnote\n", id="crlf"),
        pytest.param(b"old 5\n" + HASH_LINE[:-2] + b"\n\nnote\n", id="unpadded-hash"),
        pytest.param(b"old 5\nAAAA\n\nnote\n", id="short-hash"),
        pytest.param(b"old 5\n" + HASH_LINE * (MAX_PROOF_LINES + 1) + b"\nnote\n", id="64-proof-lines"),
        pytest.param(b"old 5\n" + HASH_LINE * 3, id="proof-lines-but-no-blank-line"),
    ],
)
def test_malformed_requests_are_refused(body: bytes) -> None:
    with pytest.raises(InvalidArgument):
        AddCheckpointRequest.decode(body)


def test_request_limits() -> None:
    assert (
        AddCheckpointRequest.decode(b"old 5\n" + HASH_LINE * MAX_PROOF_LINES + b"\nnote\n").proof[0][:2]
        == (base64.b64decode(HASH_LINE)[:2])
    )
    with pytest.raises(InvalidArgument):
        AddCheckpointRequest(0, (EMPTY_ROOT,) * (MAX_PROOF_LINES + 1), b"n")
    with pytest.raises(InvalidArgument):
        AddCheckpointRequest(0, (b"short",), b"n")
    with pytest.raises(InvalidArgument):
        AddCheckpointRequest(-1, (), b"n")
