"""Witness collection: three forces' witnesses in-process, conflicts, forks, and misbehaving witnesses."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from gateway.audit.collector import Collector
from gateway.audit.merkle import MerkleTree, leaf_hash
from gateway.audit.note import Checkpoint, parse_note, parse_signature_lines, sign_note, verify_cosignature
from gateway.audit.store import AuditLog, LogReader
from gateway.audit.tools import TrustAnchors, verify_log
from gateway.audit.witness import CONFLICT_PUBLIC, ConflictKind, Witness, WitnessConflict, conflict_kind
from gateway.audit.witness_grpc import GrpcWitnessClient
from gateway.clock import FakeClock
from gateway.errors import GatewayError, RequestRefused, Unavailable
from gateway.metrics import GatewayMetrics, Registry

from ._helpers import (
    T0,
    FakeWitnessClient,
    cosig_verifier,
    fill_async,
    log_verifier,
    make_record,
    make_witness,
    new_log,
    rows,
    signer,
    wait_for_async,
)

TV = "thames-valley"
PEERS = ("hampshire", "surrey")


def _witnesses(clock: FakeClock) -> dict[str, Witness]:
    return {force: make_witness(force, clock) for force in PEERS}


def _register(log: AuditLog, witnesses: dict[str, Witness]) -> dict[str, FakeWitnessClient]:
    clients = {}
    for force, witness in witnesses.items():
        clients[force] = FakeWitnessClient(witness)
        log.add_witness(witness.name, clients[force], cosig_verifier(force))
    return clients


async def _checkpoint(log: AuditLog, size: int) -> None:
    await asyncio.to_thread(log.wait_checkpoint, size)


def _anchors() -> TrustAnchors:
    return TrustAnchors(
        log_verifiers=(log_verifier(TV),), witness_verifiers=tuple(cosig_verifier(f) for f in PEERS), at=T0
    )


def test_two_peers_cosign_and_the_quorum_is_recorded(tmp_path: Path) -> None:
    db = tmp_path / "tv.db"
    clock = FakeClock(T0)
    witnesses = _witnesses(clock)

    log = new_log(db, clock=clock, checkpoint_every=1000, witness_quorum=2)
    log.open()

    async def run() -> None:
        clients = _register(log, witnesses)
        await fill_async(log, 20)
        log.checkpoint_now()
        await _checkpoint(log, 20)
        results = await log.collect_once()
        assert sorted(r.witness for r in results if r.ok) == sorted(w.name for w in witnesses.values())
        assert all(c.calls == [(0, 0)] for c in clients.values())  # first checkpoint: old size 0, no proof
        status = log.status()
        assert status["quorum"] == {"required": 2, "size": 20, "at": clock.now(), "reached": True}
        assert {n: w["size"] for n, w in status["witnesses"].items()} == {w.name: 20 for w in witnesses.values()}
        note = log.latest_checkpoint()
        assert note is not None
        for force in PEERS:
            assert verify_cosignature(note, cos := cosig_verifier(force)) == int(clock.now()), cos.name

        # The next checkpoint goes with a consistency proof from the size each witness holds.
        clock.advance(5)
        await fill_async(log, 13, start=20)
        log.checkpoint_now()
        await _checkpoint(log, 33)
        results = await log.collect_once()
        assert all(r.ok for r in results) and len(results) == 2
        assert all(c.calls[-1][0] == 20 and c.calls[-1][1] > 0 for c in clients.values())
        # Nothing to do when every witness holds the latest checkpoint.
        assert await log.collect_once() == []
        await log.close()

    asyncio.run(run())
    stored = rows(db, "SELECT size, witness, timestamp FROM cosignatures ORDER BY size, witness")
    assert [(s, w) for s, w, _ in stored] == [
        (20, "hampshire.se.psn/witness"),
        (20, "surrey.se.psn/witness"),
        (33, "hampshire.se.psn/witness"),
        (33, "surrey.se.psn/witness"),
    ]
    assert rows(db, "SELECT quorum_at FROM checkpoints WHERE size = 33")[0][0] == T0 + 5
    with LogReader.open(db) as reader:
        report = verify_log(reader, _anchors())
    assert report.ok, report.findings
    assert report.cosignatures == 4 and report.witnesses == ("hampshire.se.psn/witness", "surrey.se.psn/witness")


def test_quorum_not_reached_with_one_of_two(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    witnesses = _witnesses(clock)

    log = new_log(tmp_path / "tv.db", clock=clock, witness_quorum=2)
    log.open()

    async def run() -> None:
        clients = _register(log, witnesses)
        clients["surrey"].fail = Unavailable("surrey's gateway is down")
        await fill_async(log, 10)
        await _checkpoint(log, 10)
        results = {r.witness: r for r in await log.collect_once()}
        assert results["hampshire.se.psn/witness"].ok
        assert "surrey's gateway is down" in (results["surrey.se.psn/witness"].error or "")
        status = log.status()
        assert status["quorum"]["reached"] is False and status["quorum"]["size"] == 0
        assert "down" in status["witnesses"]["surrey.se.psn/witness"]["last_error"]
        # Surrey comes back: the next collection gets its cosignature and the quorum.
        clients["surrey"].fail = None
        results = await log.collect_once()
        assert [r.witness for r in results] == ["surrey.se.psn/witness"] and results[0].ok
        assert log.status()["quorum"]["reached"] is True
        await log.close()

    asyncio.run(run())
    assert rows(tmp_path / "tv.db", "SELECT quorum_at FROM checkpoints WHERE size = 10")[0][0] is not None


def test_a_witness_size_conflict_is_retried_once_from_the_size_it_holds(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    witnesses = _witnesses(clock)

    log = new_log(tmp_path / "tv.db", clock=clock, witness_quorum=2)
    log.open()

    async def run() -> None:
        await fill_async(log, 10)
        note = await asyncio.to_thread(log.wait_checkpoint, 10)
        # The witness stored this checkpoint, but the log crashed before it stored the cosignature.
        witnesses["hampshire"].add_checkpoint(0, [], note.text())
        clients = _register(log, witnesses)
        await fill_async(log, 10, start=10)
        await _checkpoint(log, 20)
        results = {r.witness: r for r in await log.collect_once()}
        assert all(r.ok for r in results.values())
        assert clients["hampshire"].calls[0] == (0, 0)  # refused: it holds 10
        assert clients["hampshire"].calls[1][0] == 10  # retried from 10, with a proof
        assert len(clients["hampshire"].calls) == 2
        await log.close()

    asyncio.run(run())


def test_a_forked_log_cannot_get_its_other_history_cosigned(tmp_path: Path) -> None:
    """The force keeps its real log, and tries to show a rewritten one to the same witnesses."""
    clock = FakeClock(T0)
    witnesses = _witnesses(clock)

    real = new_log(tmp_path / "real.db", clock=clock, witness_quorum=2)
    real.open()

    async def run() -> None:
        _register(real, witnesses)
        await fill_async(real, 10)
        await _checkpoint(real, 10)
        assert all(r.ok for r in await real.collect_once())

        # Same key, same origin, a different history: record 3 is not the one the witnesses saw.
        fork = new_log(tmp_path / "fork.db", clock=clock, witness_quorum=2)
        await asyncio.to_thread(fork.open)  # no running loop there: collection only when asked
        fork_clients = _register(fork, witnesses)
        for i in range(12):
            record = make_record(i, officer_id="SOMEONE-ELSE") if i == 3 else make_record(i)
            await fork.append(record)
        await _checkpoint(fork, 12)
        results = await fork.collect_once()
        assert len(results) == 2 and not any(r.ok for r in results)
        for r in results:
            # It claimed old size 0; the witness holds 10, so it retried with a proof from 10 that fails.
            assert "different history" in (r.error or ""), r.error
            assert r.conflict is ConflictKind.BAD_PROOF and r.equivocation
        assert all(c.calls[0] == (0, 0) and c.calls[1][0] == 10 for c in fork_clients.values())
        assert fork.status()["quorum"]["reached"] is False
        assert all(w["equivocation"] for w in fork.status()["witnesses"].values())
        for witness in witnesses.values():  # and each witness kept the forked checkpoint, once
            [evidence] = witness.conflicts()
            assert evidence.kind is ConflictKind.BAD_PROOF and evidence.presented_size == 12
        await fork.close()
        await real.close()

    asyncio.run(run())
    assert rows(tmp_path / "fork.db", "SELECT count(*) FROM cosignatures")[0][0] == 0


def test_the_same_size_with_another_root_is_equivocation(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    witnesses = _witnesses(clock)

    real = new_log(tmp_path / "real.db", clock=clock)
    real.open()

    async def run() -> None:
        _register(real, witnesses)
        await fill_async(real, 10)
        await _checkpoint(real, 10)
        await real.collect_once()
        fork = new_log(tmp_path / "fork.db", clock=clock)
        await asyncio.to_thread(fork.open)  # no running loop there: collection only when asked
        _register(fork, witnesses)
        for i in range(10):
            await fork.append(make_record(i, purpose_text="rewritten") if i == 9 else make_record(i))
        await _checkpoint(fork, 10)
        # Old size 0 conflicts (they hold 10); from 10 to 10 the roots differ: a fork, not a lag.
        results = await fork.collect_once()
        assert len(results) == 2
        assert all(r.equivocation and "EQUIVOCATION" in (r.error or "") for r in results), results
        assert all(r.conflict is ConflictKind.FORK for r in results)
        assert fork.status()["witnesses"]["hampshire.se.psn/witness"]["equivocation"] is True
        for witness in witnesses.values():  # seen twice (old size 0, then 10), kept once
            [evidence] = witness.conflicts()
            assert (evidence.kind, evidence.seen) == (ConflictKind.FORK, 2)
        await fork.close()
        await real.close()

    asyncio.run(run())


def _resign(line: bytes, force: str) -> bytes:
    # A cosignature line by another witness's key, for the right checkpoint name: it must not count.
    (sig,) = parse_signature_lines(line)
    other = make_witness(force, FakeClock(T0))
    return line.replace(sig.name.encode(), other.name.encode())


def _flip(line: bytes) -> bytes:
    name, b64 = line.rstrip(b"\n").rsplit(b" ", 1)
    raw = bytearray(base64.b64decode(b64))
    raw[-1] ^= 1
    return name + b" " + base64.b64encode(bytes(raw)) + b"\n"


@pytest.mark.parametrize(
    ("name", "answer", "expect"),
    [
        ("garbage", lambda line: b"not a signature line\n", "malformed cosignature"),
        ("another key", lambda line: _resign(line, "surrey"), "no cosignature by the witness's key"),
        ("flipped bit", _flip, "does not verify"),
    ],
)
def test_a_bad_cosignature_is_refused_and_not_stored(tmp_path: Path, name: str, answer: object, expect: str) -> None:
    clock = FakeClock(T0)
    witnesses = _witnesses(clock)

    log = new_log(tmp_path / "tv.db", clock=clock)
    log.open()

    async def run() -> None:
        clients = _register(log, witnesses)
        clients["hampshire"].answer = answer  # type: ignore[assignment]  # the parametrised callables
        await fill_async(log, 5)
        await _checkpoint(log, 5)
        results = {r.witness: r for r in await log.collect_once()}
        bad = results["hampshire.se.psn/witness"]
        assert not bad.ok and expect in (bad.error or ""), bad.error
        assert results["surrey.se.psn/witness"].ok
        await log.close()

    asyncio.run(run())
    assert [w for (w,) in rows(tmp_path / "tv.db", "SELECT witness FROM cosignatures")] == ["surrey.se.psn/witness"]


def test_a_slow_witness_times_out_without_holding_the_others(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    log = new_log(tmp_path / "tv.db", clock=clock, witness_timeout=0.05)
    log.open()

    async def run() -> None:
        clients = _register(log, _witnesses(clock))
        clients["surrey"].delay = 10
        await fill_async(log, 3)
        await _checkpoint(log, 3)
        results = {r.witness: r for r in await log.collect_once()}
        assert results["hampshire.se.psn/witness"].ok
        assert "no answer within" in (results["surrey.se.psn/witness"].error or "")
        await log.close()

    asyncio.run(run())


def test_a_witness_claiming_a_larger_size_reveals_a_rollback() -> None:
    async def run() -> None:
        class Ahead:
            async def add_checkpoint(self, old_size: int, proof: list[bytes], note: bytes) -> bytes:
                raise WitnessConflict("holds more", known_size=50)

        collector = Collector(proof=lambda old, new: [], timeout=1.0)
        collector.add("hampshire.se.psn/witness", Ahead(), cosig_verifier("hampshire"))
        tree = MerkleTree(leaf_hash(bytes([i])) for i in range(5))
        note = sign_note(Checkpoint("thames-valley.se.psn/audit", 5, tree.root()).body(), [signer(TV)])
        (result,) = await collector.submit(note)
        assert result.equivocation and "rolled back or forked" in (result.error or "")
        assert result.conflict is ConflictKind.ROLLBACK

    asyncio.run(run())


def test_a_truncated_log_is_reported_by_its_witnesses_and_knows_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Thames Valley had 12 records cosigned, then cut its log back to 4 and went on from there."""
    clock = FakeClock(T0)
    witnesses = _witnesses(clock)
    real = new_log(tmp_path / "real.db", clock=clock, witness_quorum=2)
    real.open()

    async def run() -> None:
        _register(real, witnesses)
        await fill_async(real, 12)
        await _checkpoint(real, 12)
        assert all(r.ok for r in await real.collect_once())
        await real.close()

        truncated = new_log(tmp_path / "truncated.db", clock=clock, witness_quorum=2)
        await asyncio.to_thread(truncated.open)  # collection only when asked
        _register(truncated, witnesses)
        await fill_async(truncated, 4)
        await truncated.append(make_record(99))
        await _checkpoint(truncated, 5)
        results = await truncated.collect_once()
        assert len(results) == 2 and all(r.conflict is ConflictKind.ROLLBACK for r in results), results
        status = truncated.status()["witnesses"]
        assert all(w["equivocation"] and "rolled back" in w["last_error"] for w in status.values()), status
        assert truncated.status()["quorum"]["reached"] is False
        await truncated.close()

    asyncio.run(run())
    for witness in witnesses.values():
        [evidence] = witness.conflicts()
        assert (evidence.kind, evidence.presented_size, evidence.held_size) == (ConflictKind.ROLLBACK, 5, 12)
    reported = [r for r in caplog.records if r.name == "gateway.audit.collector" and "ROLLBACK" in r.getMessage()]
    assert len(reported) == 2 and all(r.levelname == "ERROR" for r in reported)


class _RpcChannel:
    """A gRPC channel whose every call fails with one status: a witness's answer, or none."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)

    def unary_unary(self, method: str, **kwargs: object) -> Callable[..., Awaitable[object]]:
        async def call(request: object, *, timeout: float) -> object:
            raise self.error

        return call


@pytest.mark.parametrize(
    ("code", "details", "refused", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, CONFLICT_PUBLIC[ConflictKind.FORK], True, ConflictKind.FORK),
        (grpc.StatusCode.INVALID_ARGUMENT, CONFLICT_PUBLIC[ConflictKind.ROLLBACK], True, ConflictKind.ROLLBACK),
        (grpc.StatusCode.INVALID_ARGUMENT, CONFLICT_PUBLIC[ConflictKind.BAD_PROOF], True, ConflictKind.BAD_PROOF),
        (grpc.StatusCode.INVALID_ARGUMENT, "invalid proof", True, None),
        (grpc.StatusCode.UNAUTHENTICATED, "checkpoint signature not valid", True, None),
        (grpc.StatusCode.UNAVAILABLE, "connection refused", False, None),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", False, None),
        (grpc.StatusCode.UNAVAILABLE, CONFLICT_PUBLIC[ConflictKind.FORK], False, None),  # not the witness speaking
    ],
)
def test_the_grpc_client_tells_a_reported_fork_from_an_unreachable_witness(
    code: grpc.StatusCode, details: str, refused: bool, kind: ConflictKind | None, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        client = GrpcWitnessClient(lambda: _RpcChannel(code, details), peer="hampshire", timeout=1.0)  # type: ignore[arg-type, return-value]  # the twin of a channel
        with pytest.raises(GatewayError) as excinfo:
            await client.add_checkpoint(0, [], b"note")
        assert isinstance(excinfo.value, RequestRefused if refused else Unavailable)
        assert conflict_kind(excinfo.value) is kind

        collector = Collector(proof=lambda old, new: [], timeout=1.0)
        collector.add("hampshire.se.psn/witness", client, cosig_verifier("hampshire"))
        tree = MerkleTree(leaf_hash(bytes([i])) for i in range(5))
        note = sign_note(Checkpoint("thames-valley.se.psn/audit", 5, tree.root()).body(), [signer(TV)])
        (result,) = await collector.submit(note)
        assert (result.conflict, result.equivocation) == (kind, kind is not None)
        status = collector.witnesses["hampshire.se.psn/witness"]
        assert (status.conflict, status.equivocation, status.conflicts) == (
            kind,
            kind is not None,
            int(kind is not None),
        )

    asyncio.run(run())
    [line] = [r for r in caplog.records if r.name == "gateway.audit.collector"]
    assert line.levelname == ("ERROR" if kind is not None else "WARNING")


def test_the_log_side_metric_shows_each_witness_that_reports_a_fork() -> None:
    witnesses = {
        "hampshire.se.psn/witness": {"equivocation": True},
        "surrey.se.psn/witness": {"equivocation": False},
    }
    metrics = GatewayMetrics(Registry(), version="test")
    metrics.watch_log_disputes(lambda: {"witnesses": witnesses})
    assert metrics.log_witness_disputes.value(witness="hampshire.se.psn/witness") == 1
    assert metrics.log_witness_disputes.value(witness="surrey.se.psn/witness") == 0
    witnesses["surrey.se.psn/witness"]["equivocation"] = True  # read at each scrape
    assert b'psngw_log_witness_disputes{witness="surrey.se.psn/witness"} 1' in metrics.registry.expose()


def test_a_verifier_must_carry_the_witness_name() -> None:
    collector = Collector(proof=lambda old, new: [], timeout=1.0)
    with pytest.raises(Exception, match="named"):
        collector.add("surrey.se.psn/witness", FakeWitnessClient(make_witness("hampshire", FakeClock())),
                      cosig_verifier("hampshire"))  # fmt: skip


def test_collection_runs_by_itself_on_the_event_loop(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    witnesses = _witnesses(clock)

    async def run() -> None:
        log = new_log(tmp_path / "tv.db", clock=clock, checkpoint_every=5, witness_quorum=2)
        log.open()  # inside the loop: the collector task starts here
        _register(log, witnesses)
        await fill_async(log, 5)
        await wait_for_async(lambda: log.status()["quorum"]["size"] == 5, what="background collection")
        await log.close()

    asyncio.run(run())
    assert rows(tmp_path / "tv.db", "SELECT count(*) FROM cosignatures WHERE size = 5")[0][0] == 2


def test_every_force_witnesses_the_other_two(tmp_path: Path) -> None:
    """The three demo forces: each log is cosigned by the two peers' witnesses, each checks out."""
    clock = FakeClock(T0)
    witnesses = {force: make_witness(force, clock) for force in ("thames-valley", *PEERS)}

    async def run() -> None:
        for force in witnesses:
            log = new_log(tmp_path / f"{force}.db", force=force, clock=clock, witness_quorum=2)
            await asyncio.to_thread(log.open)  # collection only when asked
            for peer, witness in witnesses.items():
                if peer != force:
                    log.add_witness(witness.name, FakeWitnessClient(witness), cosig_verifier(peer))
            await fill_async(log, 7)
            await _checkpoint(log, 7)
            results = await log.collect_once()
            assert len(results) == 2 and all(r.ok for r in results), results
            note = log.latest_checkpoint()
            assert note is not None and len(parse_note(note.text()).signatures) == 3
            await log.close()

    asyncio.run(run())
    for force in witnesses:
        anchors = TrustAnchors(
            log_verifiers=(log_verifier(force),),
            witness_verifiers=tuple(cosig_verifier(f) for f in witnesses if f != force),
            at=T0,
        )
        with LogReader.open(tmp_path / f"{force}.db") as reader:
            report = verify_log(reader, anchors)
        assert report.ok and report.cosignatures == 2, report
