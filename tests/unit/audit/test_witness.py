"""The tlog-witness logic: a table of named submissions (good and hostile), durable state, races."""

from __future__ import annotations

import base64
import contextlib
import hashlib
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
    MAX_PROOF_LINES,
    AddCheckpointRequest,
    InMemoryWitnessState,
    SqliteWitnessState,
    Witness,
    WitnessConflict,
    WitnessEquivocation,
    WitnessState,
    WitnessStateUnavailable,
)
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
    "rollback": Case(9, _sub(9, 5, proof=lambda log: []), InvalidArgument, "rollback"),
    "rollback to the empty tree": Case(9, _sub(9, 0, proof=lambda log: []), InvalidArgument, "rollback"),
    # two histories
    "fork: same size, different root": Case(9, _fork_same_size, WitnessEquivocation, "EQUIVOCATION"),
    "fork: larger tree of another history": Case(9, _fork_bigger, ProofError, "different history"),
    # bad proofs
    "proof with a flipped bit": Case(9, _sub(9, 12, proof=lambda log: _flip_first_bit(log.proof(9, 12))), ProofError),
    "proof missing its last hash": Case(9, _sub(9, 12, proof=lambda log: log.proof(9, 12)[:-1]), ProofError),
    "proof with a trailing hash": Case(9, _sub(9, 12, proof=lambda log: [*log.proof(9, 12), EMPTY_ROOT]), ProofError),
    "proof for other sizes": Case(9, _sub(9, 12, proof=lambda log: log.proof(8, 12)), ProofError),
    "empty proof": Case(9, _sub(9, 12, proof=lambda log: []), ProofError),
    "proof from size 0": Case(0, _sub(0, 5, proof=lambda log: log.proof(1, 5)), ProofError, "size 0"),
    "proof for the same size": Case(9, _sub(9, 9, proof=lambda log: [EMPTY_ROOT]), ProofError, "must be empty"),
    "proof hash of the wrong length": Case(9, _sub(9, 12, proof=lambda log: [b"\x00" * 31]), ProofError),
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
