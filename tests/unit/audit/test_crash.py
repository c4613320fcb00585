"""Crash safety: SIGKILL a log under load at random moments; every acknowledged record survives.

After each kill the log is reopened (which verifies the tree against the last signed checkpoint),
every record the child acknowledged must be there with the right content, the whole log must verify,
and every checkpoint seen before must still be there, consistent with the new ones.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from gateway.audit.merkle import MerkleTree, leaf_hash, verify_consistency
from gateway.audit.record import AuditRecord
from gateway.audit.store import LogReader
from gateway.audit.tools import TrustAnchors, verify_log
from gateway.clock import SystemClock

from ._helpers import T0, log_verifier, new_log, rows

ROOT = Path(__file__).resolve().parents[3]
ROUNDS = 6


def _acks(lines: list[str]) -> dict[int, int]:
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ack":
            out[int(parts[1])] = int(parts[2])
    return out


def test_sigkill_under_load_loses_no_acknowledged_record(tmp_path: Path) -> None:
    seed = int(os.environ.get("PSN_CRASH_SEED", int.from_bytes(os.urandom(4), "big")))
    rng = random.Random(seed)
    db = tmp_path / "crash.db"
    acked: dict[int, int] = {}
    seen_checkpoints: dict[int, bytes] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_ in range(ROUNDS):
        where = f"(seed {seed}, round {round_})"
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.audit._crash_child", str(db), str(round_ * 1_000_000)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert child.stdout is not None
        opened = child.stdout.readline()
        assert opened.startswith("open "), f"{where}: child did not start: {opened!r}"
        assert opened.split()[3] == "0", f"{where}: a restart after SIGKILL found a torn tail"
        lines = [child.stdout.readline() for _ in range(rng.randint(1, 600))]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        lines += child.stdout.readlines()  # acknowledgements still in the pipe count too
        child.stdout.close()
        new = _acks(lines)
        assert new, f"{where}: no acknowledgement read"
        acked.update(new)

        log = new_log(db, clock=SystemClock(), checkpoint_every=10_000)
        report = log.open()  # verifies the stored tree against the last signed checkpoint
        assert report.truncated == (), f"{where}: {report.describe()}"
        log.close_blocking()  # signs a checkpoint over everything committed

        stored = {int(i): bytes(d) for i, d in rows(db, "SELECT idx, data FROM records")}
        missing = sorted(set(acked) - set(stored))
        assert not missing, f"{where}: acknowledged records lost: {missing[:10]}"
        for index, number in acked.items():
            record = AuditRecord.decode(stored[index])
            assert (record.index, record.request_id) == (index, f"{number:032x}"), where
        assert sorted(stored) == list(range(len(stored))), where

        with LogReader.open(db) as reader:
            verified = verify_log(reader, TrustAnchors(log_verifiers=(log_verifier("thames-valley"),), at=T0))
        # Nothing of the crash shows: the one finding is that no other force witnessed this lone log.
        assert [f.kind for f in verified.findings] == ["witness"], (where, verified.findings[:3])

        tree = MerkleTree(leaf_hash(stored[i]) for i in range(len(stored)))
        checkpoints = {int(s): bytes(r) for s, r in rows(db, "SELECT size, root FROM checkpoints")}
        for size, root in seen_checkpoints.items():
            assert checkpoints.get(size) == root, f"{where}: checkpoint {size} changed or vanished"
        if seen_checkpoints:
            old = max(seen_checkpoints)
            new_size = max(checkpoints)
            if old not in (0, new_size):
                proof = tree.consistency_proof(old, new_size)
                verify_consistency(old, new_size, proof, seen_checkpoints[old], checkpoints[new_size])
        seen_checkpoints = checkpoints
    assert len(acked) >= ROUNDS
