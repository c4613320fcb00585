"""The durable store: group commit, sequencing across processes, fail-closed with recovery, checkpoints, startup."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import bench, store
from gateway.audit.merkle import MerkleTree, leaf_hash
from gateway.audit.note import Checkpoint, parse_note, verify_note
from gateway.audit.record import AuditRecord, RecordError
from gateway.audit.store import (
    AuditConfig,
    AuditLog,
    LogCorrupted,
    LogReader,
    embedded_index,
    is_live,
    live_path,
    lock_path,
)
from gateway.audit.tools import TrustAnchors, verify_log
from gateway.clock import FakeClock
from gateway.errors import AuditUnavailable, ConfigError
from gateway.tomlconf import TomlFile

from ._helpers import (
    T0,
    execute,
    fill,
    fill_async,
    log_verifier,
    make_record,
    new_log,
    origin,
    rows,
    signer,
    wait_for,
)

ANCHORS = TrustAnchors(log_verifiers=(log_verifier("thames-valley"),), at=T0)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


def _verify(db: Path) -> None:
    """The stored log is sound: no finding but that it is not witnessed (these logs have no witnesses)."""
    with LogReader.open(db) as reader:
        report = verify_log(reader, ANCHORS)
    assert [f.kind for f in report.findings] in ([], ["witness"]), report.findings


def _hold_writer(log: AuditLog) -> threading.Event:
    """Park the writer thread inside a job until the returned event is set (to batch deterministically)."""
    release = threading.Event()
    entered = threading.Event()

    def park(_conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(30)

    log._submit_job(park)
    entered.wait(10)
    return release


# -- appending ------------------------------------------------------------------------------------


def test_records_get_consecutive_indexes_and_are_stored_as_hashed(db: Path) -> None:
    log = new_log(db)
    report = log.open()
    assert report.created and report.records == 0
    results = [log.append_blocking(make_record(i)) for i in range(5)]
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert [r.size for r in results] == [1, 2, 3, 4, 5]
    log.close_blocking()
    assert db.stat().st_mode & 0o777 == 0o600  # it holds personal data
    stored = rows(db, "SELECT idx, leaf_hash, data FROM records ORDER BY idx")
    for (idx, h, data), result in zip(stored, results, strict=True):
        assert idx == result.index and bytes(h) == result.leaf_hash == leaf_hash(data)
        assert AuditRecord.decode(data) == make_record(idx).with_index(idx)
        assert embedded_index(data) == idx


def test_append_resolves_only_after_commit_and_survives_reopen(db: Path) -> None:
    async def run() -> list[int]:
        log = new_log(db)
        log.open()
        indexes = await fill_async(log, 50)
        # Acknowledged means committed: another connection sees every acknowledged record now.
        assert rows(db, "SELECT count(*) FROM records")[0][0] == 50
        await log.close()
        return indexes

    assert sorted(asyncio.run(run())) == list(range(50))
    log = new_log(db)
    assert log.open().records == 50
    log.close_blocking()
    _verify(db)


def test_many_appenders_share_one_commit(db: Path) -> None:
    async def run() -> dict[str, Any]:
        log = new_log(db, max_batch=1000)
        log.open()
        release = await asyncio.to_thread(_hold_writer, log)
        tasks = [asyncio.create_task(log.append(make_record(i))) for i in range(200)]
        await asyncio.sleep(0)  # every append is queued behind the parked writer
        assert log.status()["queue_depth"] == 200
        release.set()
        await asyncio.gather(*tasks)
        status = log.status()
        await log.close()
        return status

    status = asyncio.run(run())
    assert status["records_committed"] == 200
    assert status["commits"] == 1  # one transaction, one fsync, for all 200


def test_max_batch_bounds_a_group_commit(db: Path) -> None:
    async def run() -> int:
        log = new_log(db, max_batch=10)
        log.open()
        release = await asyncio.to_thread(_hold_writer, log)
        tasks = [asyncio.create_task(log.append(make_record(i))) for i in range(35)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        commits = int(log.status()["commits"])
        await log.close()
        return commits

    assert asyncio.run(run()) == 4


def _committing_threads(log: AuditLog) -> list[str]:
    """Record the name of the thread that runs each commit of `log`."""
    names: list[str] = []
    commit = log._commit

    def spy(batch: Any) -> None:
        names.append(threading.current_thread().name)
        commit(batch)

    log._commit = spy  # type: ignore[method-assign]
    return names


def test_a_lone_callers_record_is_committed_on_its_own_thread_durable_before_it_returns(db: Path) -> None:
    async def run() -> tuple[list[int], list[str]]:
        log = new_log(db, checkpoint_every=1000)
        log.open()
        threads = _committing_threads(log)
        indexes = []
        for i in range(10):
            result = await log.append(make_record(i), alone=True)
            # Committed: another connection sees it the moment append returns.
            assert rows(db, "SELECT count(*) FROM records")[0][0] == i + 1
            indexes.append(result.index)
        await log.close()
        return indexes, threads

    indexes, threads = asyncio.run(run())
    assert indexes == list(range(10))
    assert threads == ["MainThread"] * 10  # no hand-off to the writer thread
    _verify(db)


def test_lone_commits_wake_the_writer_for_the_checkpoints_they_make_due(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_IDLE_WAIT", 3600.0)  # no idle wake-up: only being told makes it look

    async def run() -> int:
        log = new_log(db, checkpoint_every=4)
        log.open()
        for i in range(10):
            await log.append(make_record(i), alone=True)
        wait_for(lambda: log.status()["last_checkpoint_size"] >= 8, what="checkpoint at 8")
        size = log.status()["last_checkpoint_size"]
        await log.close()
        return size

    assert asyncio.run(run()) >= 8
    _verify(db)


def test_a_lone_caller_queues_behind_a_busy_writer_and_company_is_group_committed(db: Path) -> None:
    async def run() -> tuple[list[int], list[str]]:
        log = new_log(db, max_batch=1000)
        log.open()
        threads = _committing_threads(log)
        release = _hold_writer(log)  # the writer is busy: a lone caller must not take the connection
        waiting = [asyncio.ensure_future(log.append(make_record(i), alone=i == 0)) for i in range(5)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiting)
        release.set()
        done = [r.index for r in await asyncio.gather(*waiting)]
        await log.close()
        return done, threads

    done, threads = asyncio.run(run())
    assert sorted(done) == list(range(5))
    assert threads == ["audit-writer"]  # all five in the writer's one group commit


def test_a_lone_callers_commit_that_fails_closes_the_gate_and_the_writer_recovers(db: Path) -> None:
    async def run() -> int:
        log = new_log(db, checkpoint_every=1000)
        log.open()
        await log.append(make_record(0), alone=True)
        log._faults = _once("commit", "disk I/O error")
        with pytest.raises(AuditUnavailable, match="I/O"):
            await log.append(make_record(1), alone=True)
        assert not log.healthy
        with pytest.raises(AuditUnavailable):  # closed until the writer has proved the log writable again
            await log.append(make_record(2), alone=True)
        wait_for(lambda: log.healthy, what="recovery by the writer")
        index = (await log.append(make_record(3), alone=True)).index
        await log.close()
        return index

    assert asyncio.run(run()) == 1  # the failed record took no index
    _verify(db)


def test_a_lone_callers_commit_that_fails_unexpectedly_still_closes_the_gate_and_recovers(db: Path) -> None:
    def bug(point: str) -> None:
        if point == "commit":
            raise RuntimeError("a bug")

    async def run() -> int:
        log = new_log(db, checkpoint_every=1000)
        log.open()
        await log.append(make_record(0), alone=True)
        log._faults = bug
        with pytest.raises(AuditUnavailable, match="a bug"):  # never the bug itself, never a success
            await log.append(make_record(1), alone=True)
        log._faults = None
        assert not log.healthy
        wait_for(lambda: log.healthy, what="recovery by the writer")
        index = (await log.append(make_record(2), alone=True)).index
        await log.close()
        return index

    assert asyncio.run(run()) == 1
    _verify(db)


def test_a_full_queue_fails_fast_and_drops_nothing_it_accepted(db: Path) -> None:
    async def run() -> None:
        log = new_log(db, max_queue=5)
        log.open()
        release = await asyncio.to_thread(_hold_writer, log)
        accepted = [asyncio.create_task(log.append(make_record(i))) for i in range(5)]
        await asyncio.sleep(0)
        with pytest.raises(AuditUnavailable, match="queue is full"):
            await log.append(make_record(99))
        release.set()
        results = await asyncio.gather(*accepted)
        assert sorted(r.index for r in results) == [0, 1, 2, 3, 4]
        await log.close()

    asyncio.run(run())
    assert [r[0] for r in rows(db, "SELECT idx FROM records")] == [0, 1, 2, 3, 4]


def test_a_cancelled_caller_does_not_stop_the_record(db: Path) -> None:
    async def run() -> None:
        log = new_log(db)
        log.open()
        release = await asyncio.to_thread(_hold_writer, log)
        task = asyncio.create_task(log.append(make_record(1)))
        await asyncio.sleep(0)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await log.close()

    asyncio.run(run())
    assert rows(db, "SELECT count(*) FROM records")[0][0] == 1


def test_a_record_with_an_index_is_refused(db: Path) -> None:
    log = new_log(db)
    log.open()
    with pytest.raises(RecordError, match="no index"):
        log.append_blocking(make_record(1).with_index(7))
    log.close_blocking()


def test_append_before_open_and_after_close_is_unavailable(db: Path) -> None:
    log = new_log(db)
    with pytest.raises(AuditUnavailable, match="not open"):
        log.append_blocking(make_record(1))
    log.open()
    log.close_blocking()
    log.close_blocking()  # idempotent
    assert not log.healthy
    with pytest.raises(AuditUnavailable, match="closed"):
        log.append_blocking(make_record(1))


def test_database_settings_are_wal_and_synchronous_full(db: Path) -> None:
    log = new_log(db)
    log.open()
    mode, sync = log._writer_call(
        lambda conn: (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
        )
    )
    log.close_blocking()
    assert (mode, sync) == ("wal", 2)


# -- several writers on one log -------------------------------------------------------------------


def test_two_logs_in_one_process_share_the_sequence(db: Path) -> None:
    main = new_log(db, checkpoint_every=1000)
    main.open()
    worker = new_log(db, checkpointer=False)
    report = worker.open()
    assert not report.created
    seen = []
    for i in range(20):
        who = main if i % 3 else worker
        seen.append(who.append_blocking(make_record(i)).index)
    assert seen == list(range(20))
    main.checkpoint_now()
    note = main.wait_checkpoint(20)
    assert Checkpoint.parse(note.body).size == 20
    worker.close_blocking()
    main.close_blocking()
    _verify(db)


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from tests.unit.audit._helpers import new_log, make_record
    log = new_log(Path(sys.argv[1]), checkpointer=False)
    log.open()
    for i in range(int(sys.argv[2])):
        log.append_blocking(make_record(1000 + i))
    log.close_blocking()
    """
)


def test_another_process_appends_to_the_same_log(db: Path) -> None:
    log = new_log(db, checkpoint_every=1000)
    log.open()
    root = str(Path(__file__).resolve().parents[3])
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), "150", root])
    mine = [log.append_blocking(make_record(i)).index for i in range(150)]
    assert child.wait(120) == 0
    log.checkpoint_now()
    log.wait_checkpoint(300)
    log.close_blocking()
    indexes = [r[0] for r in rows(db, "SELECT idx FROM records ORDER BY idx")]
    assert indexes == list(range(300))
    assert len(set(mine)) == 150
    _verify(db)


# -- checkpoints ----------------------------------------------------------------------------------


def test_checkpoints_every_n_records_cover_only_committed_records(db: Path) -> None:
    log = new_log(db, checkpoint_every=10)
    log.open()
    fill(log, 35)
    wait_for(lambda: log.status()["last_checkpoint_size"] >= 30, what="checkpoint at 30")
    log.close_blocking()  # signs a last one for 35
    tree = MerkleTree(leaf_hash(bytes(d)) for (d,) in rows(db, "SELECT data FROM records ORDER BY idx"))
    stored = rows(db, "SELECT size, root, note FROM checkpoints ORDER BY size")
    assert [s for s, _, _ in stored][-1] == 35
    assert [s for s, _, _ in stored][:3] == [10, 20, 30]
    for size, root, text in stored:
        note = parse_note(bytes(text))
        verify_note(note, log_verifier("thames-valley"))
        cp = Checkpoint.parse(note.body)
        assert (cp.origin, cp.size, cp.root_hash) == (origin("thames-valley"), size, bytes(root))
        assert tree.root(size) == cp.root_hash


def test_checkpoint_interval_uses_the_clock(db: Path) -> None:
    clock = FakeClock(T0)
    log = new_log(db, clock=clock, checkpoint_every=1000, checkpoint_interval=60.0)
    log.open()
    fill(log, 3)
    assert log.status()["last_checkpoint_size"] == 0
    clock.advance(61)
    wait_for(lambda: log.status()["last_checkpoint_size"] == 3, what="interval checkpoint")
    assert log.status()["last_checkpoint_time"] == clock.now()
    log.close_blocking()


def test_latest_checkpoint_is_stored_before_it_is_returned(db: Path) -> None:
    log = new_log(db, checkpoint_every=5)
    log.open()
    assert log.latest_checkpoint() is None
    for i in range(12):
        log.append_blocking(make_record(i))
        note = log.latest_checkpoint()
        if note is not None:
            size = Checkpoint.parse(note.body).size
            assert rows(db, "SELECT count(*) FROM checkpoints WHERE size = ?", (size,))[0][0] == 1
    log.close_blocking()


def test_a_checkpoint_is_never_signed_for_records_that_failed_to_commit(db: Path) -> None:
    log = new_log(db, checkpoint_every=1)
    log.open()
    fill(log, 2)
    wait_for(lambda: log.status()["last_checkpoint_size"] == 2)

    def fault(point: str) -> None:
        if point == "commit":
            raise sqlite3.OperationalError("disk I/O error")

    log._faults = fault
    with pytest.raises(AuditUnavailable):
        log.append_blocking(make_record(2))
    log._faults = None
    wait_for(lambda: log.healthy, what="recovery")
    assert log.status()["last_checkpoint_size"] == 2
    assert rows(db, "SELECT max(size) FROM checkpoints")[0][0] == 2
    assert log.append_blocking(make_record(3)).index == 2  # the failed record never took an index
    log.close_blocking()
    _verify(db)


def test_the_checkpointer_needs_a_key_named_after_the_log(db: Path) -> None:
    with pytest.raises(ConfigError, match="signing key"):
        AuditLog(AuditConfig(db=db), origin=origin("surrey"), signer=None, clock=FakeClock())
    with pytest.raises(ConfigError, match="not the log origin"):
        AuditLog(AuditConfig(db=db), origin=origin("surrey"), signer=signer("hampshire"), clock=FakeClock())


# -- fail closed, recover by itself ---------------------------------------------------------------


def _fail_and_recover(db: Path, log: AuditLog, break_it: Any, mend_it: Any, expect: str) -> None:
    fill(log, 3)
    break_it()
    with pytest.raises(AuditUnavailable, match=expect):
        log.append_blocking(make_record(3))
    assert not log.healthy
    status = log.status()
    assert status["healthy"] is False and expect.lower() in str(status["last_error"]).lower()
    # While broken, appends fail at once: nothing waits, nothing is dropped silently.
    with pytest.raises(AuditUnavailable):
        log.append_blocking(make_record(4))
    mend_it()
    wait_for(lambda: log.healthy, what="recovery")
    assert log.status()["recoveries"] >= 1
    assert log.append_blocking(make_record(5)).index == 3
    log.close_blocking()
    assert [r[0] for r in rows(db, "SELECT idx FROM records ORDER BY idx")] == [0, 1, 2, 3]
    _verify(db)


def test_disk_full_fails_closed_and_recovers(db: Path) -> None:
    log = new_log(db, checkpoint_every=1000)
    log.open()

    def full(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA max_page_count = 1")  # clamps to the current size: no page may be added

    def break_it() -> None:
        log._on_connect = full  # a reconnecting writer meets the same full disk
        log._writer_call(full)

    def mend_it() -> None:
        log._on_connect = None

    _fail_and_recover(db, log, break_it, mend_it, "full")


def test_read_only_database_fails_closed_and_recovers(db: Path) -> None:
    log = new_log(db, checkpoint_every=1000)
    log.open()

    def read_only(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA query_only = ON")  # SQLite answers every write with SQLITE_READONLY

    def break_it() -> None:
        log._on_connect = read_only  # a reconnecting writer meets the same read-only file
        log._writer_call(read_only)

    def mend_it() -> None:
        log._on_connect = None

    _fail_and_recover(db, log, break_it, mend_it, "readonly")


# -- a busy process holds a group commit open ---------------------------------------------------


def _gathers(log: AuditLog) -> threading.Event:
    """Set when the writer starts to wait for more records before a commit (the "gather" seam)."""
    started = threading.Event()

    def seam(point: str) -> None:
        if point == "gather":
            started.set()

    log._faults = seam
    return started


def test_a_busy_process_holds_a_commit_open_until_every_call_in_flight_has_its_record_queued(db: Path) -> None:
    async def run() -> tuple[dict[str, Any], float]:
        log = new_log(db, commit_delay=1.0, commit_siblings=2, checkpoint_every=1000)
        log.busy = lambda: 10  # ten calls in flight: ten records on their way
        log.open()
        gathering = _gathers(log)
        first = asyncio.ensure_future(log.append(make_record(0)))
        assert await asyncio.to_thread(gathering.wait, 10)  # the writer holds the commit open ...
        assert not first.done()  # ... and the first record is not acknowledged before its commit
        rest = [asyncio.ensure_future(log.append(make_record(i))) for i in range(1, 10)]
        started = time.monotonic()
        await asyncio.gather(first, *rest)
        waited = time.monotonic() - started
        status = log.status()
        await log.close()
        return status, waited

    status, waited = asyncio.run(run())
    assert (status["records_committed"], status["commits"], status["last_batch_size"]) == (10, 1, 10)
    # The tenth record ended the wait, not the one-second delay (a bound, not a timing figure).
    assert waited < 0.5
    _verify(db)


def test_a_quiet_process_never_holds_a_commit_open(db: Path) -> None:
    async def run() -> list[int]:
        log = new_log(db, commit_delay=1.0, commit_siblings=8, checkpoint_every=1000)
        log.busy = lambda: 7  # fewer calls in flight than commit_siblings
        log.open()
        gathering = _gathers(log)
        batches = []
        for i in range(3):
            await log.append(make_record(i))
            batches.append(log.status()["last_batch_size"])
        await log.close()
        assert not gathering.is_set()
        return batches

    assert asyncio.run(run()) == [1, 1, 1]


def test_closing_ends_a_held_commit_and_commits_what_was_queued(db: Path) -> None:
    async def run() -> tuple[int, float]:
        log = new_log(db, commit_delay=1.0, commit_siblings=2, checkpoint_every=1000)
        log.busy = lambda: 64
        log.open()
        gathering = _gathers(log)
        pending = asyncio.ensure_future(log.append(make_record(0)))
        assert await asyncio.to_thread(gathering.wait, 10)
        started = time.monotonic()
        await log.close()
        took = time.monotonic() - started
        return (await pending).index, took

    index, took = asyncio.run(run())
    assert index == 0 and took < 0.5  # closing did not sit out the delay
    assert rows(db, "SELECT count(*) FROM records")[0][0] == 1
    _verify(db)


def _once(point: str, message: str) -> Any:
    fired = []

    def fault(where: str) -> None:
        if where == point and not fired:
            fired.append(where)
            raise sqlite3.OperationalError(message)

    return fault


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway; covered by query_only above")
def test_chmod_read_only_fails_closed_and_recovers(db: Path) -> None:
    log = new_log(db, checkpoint_every=1000)
    log.open()
    fill(log, 3)
    files = [f for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")) if f.exists()]
    for f in files:
        f.chmod(0o444)
    # The writer's open descriptor could still write: fail one commit so that it reconnects.
    log._faults = _once("commit", "attempt to write a readonly database")
    with pytest.raises(AuditUnavailable, match="readonly"):
        log.append_blocking(make_record(3))
    with pytest.raises(AuditUnavailable):  # the reconnected writer meets a read-only file: still closed
        log.append_blocking(make_record(4))
    for f in files:
        f.chmod(0o644)
    wait_for(lambda: log.healthy, what="recovery")
    assert log.append_blocking(make_record(5)).index == 3
    log.close_blocking()
    _verify(db)


def test_a_lock_held_beyond_the_timeout_fails_closed_and_recovers(db: Path) -> None:
    log = new_log(db, checkpoint_every=1000, lock_timeout=0.05)
    log.open()
    other = sqlite3.connect(db, isolation_level=None)

    def break_it() -> None:
        other.execute("BEGIN EXCLUSIVE")

    def mend_it() -> None:
        other.execute("COMMIT")

    _fail_and_recover(db, log, break_it, mend_it, "locked")
    other.close()


def test_an_io_error_fails_closed_and_recovers(db: Path) -> None:
    log = new_log(db, checkpoint_every=1000)
    log.open()
    broken = {"on": False}

    def fault(point: str) -> None:
        if broken["on"]:
            raise sqlite3.OperationalError("disk I/O error")

    log._faults = fault
    _fail_and_recover(db, log, lambda: broken.update(on=True), lambda: broken.update(on=False), "I/O")


def test_queued_records_fail_with_the_batch_not_silently(db: Path) -> None:
    async def run() -> list[Any]:
        log = new_log(db, max_batch=2)
        log.open()
        release = await asyncio.to_thread(_hold_writer, log)
        log._faults = lambda point: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error"))
        tasks = [asyncio.create_task(log.append(make_record(i))) for i in range(6)]
        await asyncio.sleep(0)
        release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        log._faults = None
        await log.close()
        return outcomes

    outcomes = asyncio.run(run())
    assert all(isinstance(o, AuditUnavailable) for o in outcomes)
    assert rows(db, "SELECT count(*) FROM records")[0][0] == 0


def test_a_writer_that_dies_closes_the_gate(db: Path) -> None:
    log = new_log(db)
    log.open()
    fill(log, 2)

    def bug(point: str) -> None:
        raise RuntimeError("a bug in the writer")

    log._faults = bug
    with pytest.raises(AuditUnavailable, match="writer stopped"):
        log.append_blocking(make_record(2))
    assert not log.healthy and "a bug in the writer" in str(log.status()["last_error"])
    with pytest.raises(AuditUnavailable):
        log.append_blocking(make_record(3))
    log.close_blocking()
    assert rows(db, "SELECT count(*) FROM records")[0][0] == 2


# -- startup: verify, repair a torn tail, refuse a divergent log ----------------------------------


def _closed_log(db: Path, n: int = 30, every: int = 10) -> None:
    log = new_log(db, checkpoint_every=every)
    log.open()
    fill(log, n)
    log.checkpoint_now()
    log.wait_checkpoint(n)
    log.close_blocking()


def _tail(db: Path, n: int) -> None:
    """Append `n` records after the last checkpoint, then close without checkpointing (as after a crash)."""
    log = new_log(db, checkpointer=False)
    log.open()
    start = log.size
    fill(log, n, start=start)
    log.close_blocking()


def test_reopen_checks_the_tree_against_the_last_checkpoint(db: Path) -> None:
    _closed_log(db)
    log = new_log(db)
    report = log.open()
    assert (report.records, report.checkpoint_size, report.truncated) == (30, 30, ())
    assert "verified" in report.describe()
    log.close_blocking()


def test_a_changed_record_inside_the_checkpoints_stops_the_start(db: Path) -> None:
    _closed_log(db)
    data = bytes(rows(db, "SELECT data FROM records WHERE idx = 12")[0][0]).replace(b"OFF2", b"OFF9")
    execute(db, ("UPDATE records SET data = ? WHERE idx = 12", (data,)))
    with pytest.raises(LogCorrupted, match=r"record 12: .*changed.*inside the range covered"):
        new_log(db).open()


def test_a_rehashed_record_inside_the_checkpoints_is_a_divergent_log(db: Path) -> None:
    _closed_log(db)
    data = bytes(rows(db, "SELECT data FROM records WHERE idx = 12")[0][0]).replace(b"OFF2", b"OFF9")
    execute(db, ("UPDATE records SET data = ?, leaf_hash = ? WHERE idx = 12", (data, leaf_hash(data))))
    with pytest.raises(LogCorrupted, match=r"divergent log.*records 10\.\.19"):
        new_log(db).open()


def test_records_missing_under_the_checkpoint_stop_the_start(db: Path) -> None:
    _closed_log(db)
    execute(db, ("DELETE FROM records WHERE idx >= 25", ()))
    with pytest.raises(LogCorrupted, match=r"records 25\.\.29 are missing"):
        new_log(db).open()


def test_a_forged_checkpoint_stops_the_start(db: Path) -> None:
    _closed_log(db)
    imposter = signer("thames-valley", "imposter")
    ((size, root),) = rows(db, "SELECT size, root FROM checkpoints ORDER BY size DESC LIMIT 1")
    from gateway.audit.note import sign_note

    note = sign_note(Checkpoint(origin("thames-valley"), size, bytes(root)).body(), [imposter])
    execute(db, ("UPDATE checkpoints SET note = ? WHERE size = ?", (note.text(), size)))
    with pytest.raises(LogCorrupted, match="no valid signature"):
        new_log(db).open()


def test_a_torn_tail_is_quarantined_and_reported(db: Path) -> None:
    _closed_log(db)
    _tail(db, 5)
    data = bytes(rows(db, "SELECT data FROM records WHERE idx = 32")[0][0])
    execute(db, ("UPDATE records SET data = ? WHERE idx = 32", (data[:-7],)))
    log = new_log(db)
    report = log.open()
    assert report.truncated == (32, 33, 34)
    assert "TORN TAIL" in report.describe() and "record 32" in report.messages[0]
    assert log.append_blocking(make_record(77)).index == 32
    log.close_blocking()
    kept = rows(db, "SELECT idx, data, reason FROM quarantine ORDER BY idx")
    assert [k[0] for k in kept] == [32, 33, 34] and bytes(kept[0][1]) == data[:-7]
    assert "torn tail" in kept[0][2]
    _verify(db)
    with LogReader.open(db) as reader:
        assert "3 row(s) were quarantined" in verify_log(reader, ANCHORS).notes[-1]


def test_a_gap_after_the_checkpoint_is_a_torn_tail(db: Path) -> None:
    _closed_log(db)
    _tail(db, 4)
    execute(db, ("DELETE FROM records WHERE idx = 31", ()))
    log = new_log(db)
    assert log.open().truncated == (32, 33)
    log.close_blocking()
    _verify(db)


def test_repair_needs_the_log_to_itself(db: Path) -> None:
    import fcntl

    _closed_log(db)
    _tail(db, 3)
    execute(db, ("UPDATE records SET leaf_hash = ? WHERE idx = 31", (b"\0" * 32,)))
    fd = os.open(lock_path(db), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # another process has the log open
    try:
        with pytest.raises(LogCorrupted, match="other processes have the log open"):
            new_log(db).open()
    finally:
        os.close(fd)
    assert rows(db, "SELECT count(*) FROM records")[0][0] == 33  # nothing was removed


def test_scan_records_reports_each_gap_once_and_checks_the_rows_after_it_at_their_own_index() -> None:
    stored = []
    for i in range(12):
        if i == 3 or 6 <= i <= 8:  # deleted
            continue
        data = make_record(i).with_index(i).encode()
        stored.append((i, leaf_hash(data) if i != 10 else b"\0" * 32, data))
    hashes, findings, first = store.scan_records(stored)
    assert [(f.index, f.message) for f in findings] == [
        (3, "record 3 is missing (the next stored record is 4): records were deleted"),
        (6, "records 6..8 are missing (the next stored record is 9): records were deleted"),
        (10, "record 10: its bytes do not match its stored leaf hash: the record was changed"),
    ]
    assert first == 3 and len(hashes) == 8
    assert store.scan_records(stored[5:], start=9)[1:] == ([findings[2]], 10)


def test_a_file_that_is_not_a_log_or_another_forces_log_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match="not an audit log"):
        new_log(junk).open()
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ConfigError, match="not an audit log"):
        new_log(other).open()
    _closed_log(tmp_path / "tv.db")
    with pytest.raises(ConfigError, match="not of 'surrey"):
        new_log(tmp_path / "tv.db", force="surrey").open()
    with pytest.raises(ConfigError, match="does not exist"):
        new_log(tmp_path / "nowhere" / "a.db").open()


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        ("DROP TABLE checkpoints", r"a damaged audit log: it has the format 'psn-gateway-audit-log/1' but its"
                                   r" checkpoints table is missing \(dropped, or the file is damaged\)$"),
        ("DROP TABLE quarantine", r"its quarantine table is missing"),
        ("UPDATE meta SET value = 'psn-gateway-audit-log/0' WHERE key = 'format'",
         r"not an audit log of this version: its format is 'psn-gateway-audit-log/0', not 'psn-gateway-audit-log/1'$"),
        ("DELETE FROM meta WHERE key = 'format'", r"not an audit log: its meta table names no format$"),
        ("DROP TABLE meta", r"not an audit log: it has no meta table to name its format$"),
    ],
    ids=["no checkpoints table", "no quarantine table", "another format", "no format", "no meta table"],
)  # fmt: skip
def test_a_damaged_log_is_refused_saying_what_is_wrong(db: Path, damage: str, error: str) -> None:
    _closed_log(db)
    execute(db, (damage, ()))
    with pytest.raises(ConfigError, match=error) as raised:
        new_log(db).open()
    assert raised.value.file == str(db) and "want" not in str(raised.value)


def test_the_lock_file_tells_a_live_log(db: Path) -> None:
    assert not is_live(db)
    log = new_log(db)
    log.open()
    assert is_live(db)
    assert lock_path(db).stat().st_mode & 0o777 == 0o600
    log.close_blocking()
    assert not is_live(db)


def _symlink(db: Path) -> Path:
    view = db.parent / "elsewhere" / "view.db"
    view.parent.mkdir()
    view.symlink_to(db)
    return view


def _symlink_chain(db: Path) -> Path:
    first = db.parent / "a.db"
    first.symlink_to("b.db")  # relative, through a second link
    (db.parent / "b.db").symlink_to(db.name)
    return first


def _dot_dot(db: Path) -> Path:
    (db.parent / "sub").mkdir()
    return db.parent / "sub" / ".." / db.name


def _symlinked_directory(db: Path) -> Path:
    (db.parent / "linked").symlink_to(db.parent)
    return db.parent / "linked" / db.name


OTHER_NAMES = [
    ("a symbolic link", _symlink),
    ("a chain of relative links", _symlink_chain),
    ("a path through ..", _dot_dot),
    ("a linked directory", _symlinked_directory),
]


@pytest.mark.parametrize(("name", "other_name"), OTHER_NAMES, ids=[n[0] for n in OTHER_NAMES])
def test_a_live_log_is_live_under_any_name_that_leads_to_it(
    db: Path, name: str, other_name: Callable[[Path], Path]
) -> None:
    view = other_name(db)
    log = new_log(db)
    log.open()
    try:
        assert is_live(view)
        live = live_path(view)
        assert live is not None and lock_path(live).samefile(lock_path(db))
    finally:
        log.close_blocking()
    assert not is_live(view) and live_path(view) is None
    assert not list(view.parent.glob("*.lock")) or view.parent.samefile(db.parent)  # no lock file made


def test_a_gateway_that_opened_its_log_through_a_link_is_found_through_the_link_and_the_file(db: Path) -> None:
    # Its lock is beside the file the link leads to, so readers find it live by either name.
    link = db.parent / "configured.db"
    link.symlink_to(db)
    log = new_log(link)
    log.open()
    try:
        assert lock_path(db).exists() and not lock_path(link).exists()
        assert live_path(link) == db and live_path(db) == db
    finally:
        log.close_blocking()


def test_a_link_beside_a_live_log_to_a_copy_is_a_copy(db: Path, tmp_path: Path) -> None:
    log = new_log(db)
    log.open()
    try:
        fill(log, 3)
        copy = tmp_path / "copies" / "copy.db"
        copy.parent.mkdir()
        source = sqlite3.connect(db)
        target = sqlite3.connect(copy)
        source.backup(target)
        source.close()
        target.close()
        beside = db.parent / "copy-link.db"
        beside.symlink_to(copy)
        assert is_live(db) and not is_live(beside) and not is_live(copy)
    finally:
        log.close_blocking()


def test_a_log_file_with_another_name_is_refused_unless_live_by_this_one(db: Path) -> None:
    # A hard link: the gateway may hold the lock beside a name no path leads to, and its WAL is named after it.
    log = new_log(db)
    log.open()
    fill(log, 2)
    log.close_blocking()
    other = db.parent / "hard.db"
    os.link(db, other)
    with pytest.raises(ConfigError, match=r"has 2 names \(hard links\)") as raised:
        is_live(other)
    assert raised.value.file == str(other)
    log = new_log(db)
    log.open()
    try:
        assert is_live(db)  # by the name the gateway holds the lock beside, it is live
        with pytest.raises(ConfigError, match="hard links"):
            is_live(other)
    finally:
        log.close_blocking()


def test_status_reports_what_the_health_endpoint_needs(db: Path) -> None:
    log = new_log(db, checkpoint_every=2)
    log.open()
    fill(log, 4)
    wait_for(lambda: log.status()["last_checkpoint_size"] == 4)
    status = log.status()
    for key in (
        "healthy", "queue_depth", "last_commit_latency_ms", "last_error", "tree_size",
        "last_checkpoint_size", "last_checkpoint_time", "quorum", "witnesses",
    ):  # fmt: skip
        assert key in status
    assert status["healthy"] and status["tree_size"] == 4 and status["last_error"] is None
    assert status["quorum"]["required"] == 2
    log.close_blocking()


# -- configuration --------------------------------------------------------------------------------


def test_config_from_section(tmp_path: Path) -> None:
    file = TomlFile.parse(
        b'[audit]\ndb = "logs/audit.db"\ncheckpoint_interval_seconds = 5\ncheckpoint_every = 500\nwitness_quorum = 2\n'
        b"commit_delay_seconds = 0.002\ncommit_siblings = 16\n",
        tmp_path / "gw.toml",
    )
    cfg = AuditConfig.from_section(file.root().table("audit"))
    assert cfg.db == tmp_path / "logs" / "audit.db"
    assert (cfg.checkpoint_interval, cfg.checkpoint_every, cfg.witness_quorum) == (5.0, 500, 2)
    assert (cfg.commit_delay, cfg.commit_siblings) == (0.002, 16)
    assert cfg.max_batch == AuditConfig.__dataclass_fields__["max_batch"].default


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('db = "a.db"\ncheckpoint_every = 0\n', r"gw.toml:3: audit.checkpoint_every: must be at least 1"),
        ('db = "a.db"\ncommit_delay_seconds = 5\n', r"gw.toml:3: audit.commit_delay_seconds: must be at most 1"),
        ('db = "a.db"\ncommit_siblings = 1\n', r"gw.toml:3: audit.commit_siblings: must be at least 2"),
        ('db = "a.db"\nmax_queue = "big"\n', r"audit.max_queue: expected an integer"),
        ('db = "a.db"\ncheckpoint_evry = 10\n', r"audit.checkpoint_evry: unknown key"),
        ("checkpoint_every = 10\n", r"audit.db: required key is missing"),
    ],
)
def test_config_errors_name_file_line_and_field(tmp_path: Path, text: str, error: str) -> None:
    file = TomlFile.parse(b"[audit]\n" + text.encode(), tmp_path / "gw.toml")
    with pytest.raises(ConfigError, match=error):
        AuditConfig.from_section(file.root().table("audit"))


def test_config_bounds_direct_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        AuditConfig(db=tmp_path / "a.db", max_batch=0)
    with pytest.raises(ConfigError, match="retry_max"):
        AuditConfig(db=tmp_path / "a.db", retry_initial=1.0, retry_max=0.5)


# -- benchmark ------------------------------------------------------------------------------------


@pytest.mark.bench
def test_bench_group_commit_and_verify(tmp_path: Path) -> None:
    append = bench.bench_append(records=20_000, appenders=256, directory=tmp_path)
    verify = bench.bench_verify(records=200_000, directory=tmp_path)
    print(append, verify)
    assert append["group_records_per_s"] >= 5_000
    assert verify["verify_records_per_s"] >= 100_000


def test_the_in_memory_tree_stays_small_and_proves_from_the_file(db: Path) -> None:
    # The tree keeps the lower levels only for the block being filled; proofs over finished
    # blocks read their leaf hashes back from the log, and equal a full tree's.
    from gateway.audit.merkle import MerkleTree

    log = new_log(db, checkpoint_every=100_000)
    log.open()
    n = 1300
    fill(log, n)
    stored = sum(len(level) for level in log._tree._levels)
    assert stored < n * 8  # a full tree would hold about 64 bytes a record
    with LogReader.open(db) as reader:
        full = MerkleTree([leaf for _, leaf, _ in reader.rows()])
    for old in (1, 255, 256, 700, 1024):
        assert log._consistency_proof(old, n) == full.consistency_proof(old, n)
    assert log._tree.root() == full.root()
    log.close_blocking()
    # And after a restart, from the file alone.
    again = new_log(db, checkpoint_every=100_000)
    again.open()
    assert again._consistency_proof(300, n) == full.consistency_proof(300, n)
    again.close_blocking()
