"""gateway.replay: ids are remembered until they expire, the store is bounded and refuses rather than forgets."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ResourceExhausted
from gateway.replay import InMemoryReplayStore


def test_a_second_sighting_inside_the_window_is_a_replay() -> None:
    store = InMemoryReplayStore()
    assert store.remember("r1", expires_at=160, now=100)
    assert not store.remember("r1", expires_at=160, now=150)
    assert not store.remember("r1", expires_at=999, now=160)  # still remembered at expires_at exactly


def test_an_id_is_forgotten_after_it_expires() -> None:
    store = InMemoryReplayStore()
    store.remember("r1", expires_at=160, now=100)
    assert store.remember("r1", expires_at=221, now=161)
    assert len(store) == 1


def test_eviction_follows_expiry_not_arrival() -> None:
    store = InMemoryReplayStore()
    store.remember("late", expires_at=500, now=100)
    store.remember("early", expires_at=150, now=100)
    store.remember("x", expires_at=600, now=151)  # evicts "early" only
    assert len(store) == 2
    assert not store.remember("late", expires_at=500, now=151)
    assert store.remember("early", expires_at=700, now=151)


def test_a_full_store_refuses_instead_of_forgetting() -> None:
    store = InMemoryReplayStore(max_entries=2, max_force_share=1.0)
    store.remember("a", expires_at=200, now=100)
    store.remember("b", expires_at=200, now=100)
    with pytest.raises(ResourceExhausted, match="refusing rather than forgetting"):
        store.remember("c", expires_at=200, now=100)
    assert not store.remember("a", expires_at=200, now=100)  # "a" was not forgotten to make room
    assert store.remember("c", expires_at=300, now=201)  # room again once a and b expire


def test_one_force_fills_only_its_share_and_the_others_still_find_room() -> None:
    # A peer that floods the host with envelopes must not lock every other force out.
    store = InMemoryReplayStore(max_entries=4)
    assert store.remember("hampshire/1", expires_at=200, now=100, force="hampshire")
    assert store.remember("hampshire/2", expires_at=200, now=100, force="hampshire")
    with pytest.raises(ResourceExhausted, match="force hampshire holds 2 request ids"):
        store.remember("hampshire/3", expires_at=200, now=100, force="hampshire")
    assert store.remember("surrey/1", expires_at=200, now=100, force="surrey")
    assert not store.remember("hampshire/1", expires_at=200, now=100, force="hampshire")  # still a replay
    assert store.remember("hampshire/3", expires_at=300, now=201, force="hampshire")  # its share frees as ids expire


def test_the_shared_store_keeps_the_same_shares(tmp_path: Path) -> None:
    from gateway.replay import SqliteReplayStore

    store = SqliteReplayStore(tmp_path / "replay.db", max_entries=4)
    assert store.remember("hampshire/1", 200.0, 100.0, force="hampshire")
    assert store.remember("hampshire/2", 200.0, 100.0, force="hampshire")
    with pytest.raises(ResourceExhausted, match="force hampshire holds 2 request ids"):
        store.remember("hampshire/3", 200.0, 100.0, force="hampshire")
    assert store.remember("surrey/1", 200.0, 100.0, force="surrey")
    store.close()
    again = SqliteReplayStore(tmp_path / "replay.db", max_entries=4)  # the shares are counted from the file
    with pytest.raises(ResourceExhausted, match="force hampshire holds 2"):
        again.remember("hampshire/3", 200.0, 100.0, force="hampshire")
    again.close()


def test_a_shared_store_file_from_before_the_shares_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    from gateway.replay import SqliteReplayStore

    path = tmp_path / "replay.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE replay (id TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID")
    old.execute("INSERT INTO replay VALUES ('surrey/1', 200.0)")
    old.commit()
    old.close()
    store = SqliteReplayStore(path, max_entries=4)
    assert not store.remember("surrey/1", 200.0, 100.0, force="surrey")  # what the old file held still counts
    assert store.remember("surrey/2", 200.0, 100.0, force="surrey")
    store.close()


def test_max_force_share_must_be_a_fraction() -> None:
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="max_force_share"):
            InMemoryReplayStore(max_entries=10, max_force_share=share)


def test_an_already_expired_id_is_not_stored() -> None:
    store = InMemoryReplayStore(max_entries=1)
    assert store.remember("old", expires_at=50, now=100)
    assert len(store) == 0


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError):
        InMemoryReplayStore(max_entries=0)


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 50), st.integers(0, 5)), max_size=60))
def test_matches_a_simple_model(events: list[tuple[str, int, int]]) -> None:
    # Model: an id is a replay iff it was accepted before with expires_at >= now.
    store = InMemoryReplayStore()
    now = 0
    model: dict[str, int] = {}
    for request_id, lifetime, step in events:
        now += step
        expected = not (request_id in model and model[request_id] >= now)
        assert store.remember(request_id, now + lifetime, now) is expected
        if expected:
            model[request_id] = now + lifetime


def test_sqlite_store_is_shared_between_processes(tmp_path: Path) -> None:
    import multiprocessing

    from gateway.replay import SqliteReplayStore

    path = tmp_path / "replay.db"
    store = SqliteReplayStore(path)
    assert store.remember("a", 200.0, 100.0)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        # Another worker process sees "a" and remembers "b".
        assert pool.apply(_remember_in_child, (str(path), "a")) is False
        assert pool.apply(_remember_in_child, (str(path), "b")) is True
    assert store.remember("b", 200.0, 100.0) is False
    assert store.remember("a", 400.0, 300.0) is True  # expired: no replay possible, so remembered anew
    store.close()


def _remember_in_child(path: str, request_id: str) -> bool:
    from gateway.replay import SqliteReplayStore

    store = SqliteReplayStore(Path(path))
    try:
        return store.remember(request_id, 200.0, 100.0)
    finally:
        store.close()
