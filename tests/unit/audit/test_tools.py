"""The auditors' tools: verify names the first bad item of every tampering; query, prove, export, stats; live access."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import pki as x509_pki
from gateway.audit.merkle import MerkleTree, leaf_hash
from gateway.audit.note import Checkpoint, CosignatureSigner, parse_note, sign_note, verify_note
from gateway.audit.record import AuditRecord, format_time
from gateway.audit.store import LogReader, embedded_index
from gateway.audit.tools import TrustAnchors, load_anchors, verify_log
from gateway.cli import main
from gateway.clock import FakeClock
from gateway.errors import ConfigError

from ._helpers import (
    FORCES,
    T0,
    FakeWitnessClient,
    Pki,
    cosig_verifier,
    cosigner,
    domain,
    execute,
    fill,
    key,
    log_verifier,
    make_pki,
    make_record,
    make_witness,
    new_log,
    origin,
    rows,
    signer,
)

TV = "thames-valley"
N = 40
EVERY = 10
HOURS = 6 * 3600  # records are six hours apart: 40 records over ten days
AT = format_time(T0)


# -- the log under test ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pki]:
    """A Thames Valley log of 40 records, checkpoints every 10, each cosigned by Hampshire and Surrey."""
    root = tmp_path_factory.mktemp("audit-template")
    pki = make_pki(root)
    db = root / "tv.db"
    clock = FakeClock(T0)
    log = new_log(db, clock=clock, checkpoint_every=1000, certificate=pki.log_certs[TV])
    log.open()
    for force in FORCES[1:]:
        witness = make_witness(force, clock)
        log.add_witness(
            witness.name, FakeWitnessClient(witness), cosig_verifier(force), certificate=pki.log_certs[force]
        )

    async def build() -> None:
        for start in range(0, N, EVERY):
            for i in range(start, start + EVERY):
                await log.append(make_record(i, when=T0 + i * HOURS))
            log.checkpoint_now()
            await asyncio.to_thread(log.wait_checkpoint, start + EVERY)
            results = await log.collect_once()
            assert all(r.ok for r in results) and len(results) == 2
        await log.close()

    asyncio.run(build())
    return db, pki


@pytest.fixture
def db(material: tuple[Path, Pki], tmp_path: Path) -> Path:
    """A fresh copy of the template log, to read or to tamper with."""
    copy = tmp_path / "tv.db"
    shutil.copyfile(material[0], copy)
    return copy


@pytest.fixture
def pki(material: tuple[Path, Pki]) -> Pki:
    return material[1]


#: The keys an auditor pins on the command line: Thames Valley's log key and the two peers' witness keys.
PINNED = (
    "--vkey", log_verifier(TV).vkey(), "--vkey", cosig_verifier("hampshire").vkey(),
    "--vkey", cosig_verifier("surrey").vkey(),
)  # fmt: skip


def _cosign(db: Path, peers: tuple[str, ...] = FORCES[1:]) -> None:
    """Cosign every checkpoint of `db` as the peers' witnesses would, and store their keys (no certificate)."""
    for size, text in rows(db, "SELECT size, note FROM checkpoints"):
        body = parse_note(bytes(text)).body
        for peer in peers:
            w = cosigner(peer)
            line = w.cosign(body, int(T0)).line()
            execute(
                db,
                ("INSERT OR IGNORE INTO witness_keys VALUES (?, ?, NULL, ?)", (w.vkey(), w.name, T0)),
                ("INSERT INTO cosignatures VALUES (?, ?, ?, ?, ?)", (size, w.name, line, int(T0), T0)),
            )


def _anchors(**kw: Any) -> TrustAnchors:
    base: dict[str, Any] = {
        "log_verifiers": (log_verifier(TV),),
        "witness_verifiers": tuple(cosig_verifier(f) for f in FORCES[1:]),
        "at": T0,
    }
    base.update(kw)
    return TrustAnchors(**base)


def _verify(db: Path, anchors: TrustAnchors | None = None) -> Any:
    with LogReader.open(db) as reader:
        return verify_log(reader, anchors or _anchors())


def _data(db: Path, idx: int) -> bytes:
    return bytes(rows(db, "SELECT data FROM records WHERE idx = ?", (idx,))[0][0])


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["audit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- verify: a clean log --------------------------------------------------------------------------


def test_a_clean_log_verifies(db: Path) -> None:
    report = _verify(db)
    assert report.ok, report.findings
    assert (report.records, report.checkpoints, report.last_checkpoint) == (N, N // EVERY, N)
    assert report.cosignatures == 2 * N // EVERY and report.untrusted_cosignatures == 0
    assert report.witnesses == ("hampshire.se.psn/witness", "surrey.se.psn/witness")


# -- verify: tampering, each named, each caught with the first bad item ---------------------------


def _change_one_byte(db: Path) -> None:
    data = _data(db, 7).replace(b'"officer_id":"OFF2"', b'"officer_id":"OFF3"')
    execute(db, ("UPDATE records SET data = ? WHERE idx = 7", (data,)))


def _change_and_rehash(db: Path) -> None:
    data = _data(db, 17).replace(b'"officer_id":"OFF2"', b'"officer_id":"OFF3"')
    execute(db, ("UPDATE records SET data = ?, leaf_hash = ? WHERE idx = 17", (data, leaf_hash(data))))


def _delete_one(db: Path) -> None:
    execute(db, ("DELETE FROM records WHERE idx = 7", ()))


def _delete_and_renumber(db: Path) -> None:
    execute(
        db,
        ("DELETE FROM records WHERE idx = 7", ()),
        ("UPDATE records SET idx = idx + 999999 WHERE idx > 7", ()),
        ("UPDATE records SET idx = idx - 1000000 WHERE idx >= 1000000", ()),
    )


def _insert_one(db: Path) -> None:
    forged = make_record(999, when=T0 + 7 * HOURS, officer_id="NOBODY").with_index(7).encode()
    execute(
        db,
        ("UPDATE records SET idx = idx + 1000001 WHERE idx >= 7", ()),
        ("UPDATE records SET idx = idx - 1000000 WHERE idx >= 1000000", ()),
        ("INSERT INTO records (idx, leaf_hash, data) VALUES (7, ?, ?)", (leaf_hash(forged), forged)),
    )


def _reorder_two(db: Path) -> None:
    a, b = rows(db, "SELECT leaf_hash, data FROM records WHERE idx IN (3, 9) ORDER BY idx")
    execute(
        db,
        ("UPDATE records SET leaf_hash = ?, data = ? WHERE idx = 3", (b[0], b[1])),
        ("UPDATE records SET leaf_hash = ?, data = ? WHERE idx = 9", (a[0], a[1])),
    )


def _truncate_tail(db: Path) -> None:
    execute(db, ("DELETE FROM records WHERE idx >= 35", ()))


def _replace_checkpoint_forged(db: Path) -> None:
    imposter = signer(TV, "imposter")
    (root,) = rows(db, "SELECT root FROM checkpoints WHERE size = 20")[0]
    note = sign_note(Checkpoint(origin(TV), 20, bytes(root)).body(), [imposter])
    execute(db, ("UPDATE checkpoints SET note = ? WHERE size = 20", (note.text(),)))


def _replace_checkpoint_swapped(db: Path) -> None:
    (note,) = rows(db, "SELECT note FROM checkpoints WHERE size = 10")[0]
    execute(db, ("UPDATE checkpoints SET note = ? WHERE size = 20", (note,)))


def _forge_cosignature(db: Path) -> None:
    (line,) = rows(db, "SELECT line FROM cosignatures WHERE size = 30 AND witness = 'surrey.se.psn/witness'")[0]
    name, b64 = bytes(line).rstrip(b"\n").rsplit(b" ", 1)
    raw = bytearray(base64.b64decode(b64))
    raw[-1] ^= 1
    forged = name + b" " + base64.b64encode(bytes(raw)) + b"\n"
    execute(db, ("UPDATE cosignatures SET line = ? WHERE size = 30 AND witness = 'surrey.se.psn/witness'", (forged,)))


def _drop_a_checkpoint(db: Path) -> None:
    execute(db, ("DELETE FROM checkpoints WHERE size = 30", ()))


def _drop_witness_key(db: Path) -> None:
    execute(db, ("DELETE FROM witness_keys WHERE name = 'hampshire.se.psn/witness'", ()))


TAMPERING: list[tuple[str, Callable[[Path], None], str]] = [
    ("change one byte of a record", _change_one_byte, r"^record 7: its bytes do not match its stored leaf hash"),
    ("change a record and its leaf hash", _change_and_rehash, r"^checkpoint 20: .* among records 10\.\.19"),
    ("delete one record", _delete_one, r"^record 7 is missing \(the next stored record is 8\)"),
    ("delete one and renumber the rest", _delete_and_renumber, r"^record 7: its bytes say it is record 8"),
    ("insert one record", _insert_one, r"^record 8: its bytes say it is record 7: records were moved, inserted"),
    ("reorder two records", _reorder_two, r"^record 3: its bytes say it is record 9"),
    ("truncate the tail", _truncate_tail, r"^checkpoint 40 covers records the log does not hold: records 35\.\.39"),
    ("replace a checkpoint (forged key)", _replace_checkpoint_forged, r"^checkpoint 20: not validly signed by"),
    ("replace a checkpoint (another's note)", _replace_checkpoint_swapped, r"^checkpoint 20: .*not match where it is"),
    ("forge a cosignature", _forge_cosignature, r"^checkpoint 30: the cosignature by surrey\.se\.psn/witness does not"),
    ("drop a checkpoint", _drop_a_checkpoint, r"cosignature .* checkpoint of size 30 that does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "tamper", "first"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_verify_names_the_first_bad_item(db: Path, name: str, tamper: Callable[[Path], None], first: str) -> None:
    tamper(db)
    report = _verify(db)
    assert not report.ok
    assert report.first is not None
    assert re.search(first, report.first.message), [f.message for f in report.findings]


@pytest.mark.parametrize(("name", "tamper", "first"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_the_verify_command_exits_1_and_prints_the_first_bad_item(
    db: Path, capsys: pytest.CaptureFixture[str], name: str, tamper: Callable[[Path], None], first: str
) -> None:
    tamper(db)
    code, out, _ = _run(capsys, "verify", str(db), *PINNED)
    assert code == 1
    assert "FAILED" in out and "first bad: " in out


def _delete_several(db: Path) -> None:
    execute(db, ("DELETE FROM records WHERE idx IN (7, 12, 13, 14, 38, 39)", ()))


def _delete_one_after_the_checkpoint(db: Path) -> None:
    log = new_log(db, checkpointer=False)
    log.open()
    fill(log, 3, start=N)
    log.close_blocking()
    execute(db, ("DELETE FROM records WHERE idx = 41", ()))


NOT_HASHED = [f"checkpoint {size}: the stored records do not hash to its root" for size in (10, 20, 30, 40)]
DELETIONS = [
    ("one record", _delete_one, [
        "record 7 is missing (the next stored record is 8): records were deleted", *NOT_HASHED,
    ], []),
    ("several records and the tail", _delete_several, [
        "record 7 is missing (the next stored record is 8): records were deleted",
        "records 12..14 are missing (the next stored record is 15): records were deleted",
        *NOT_HASHED[:3],
        "checkpoint 40 covers records the log does not hold: records 38..39 are missing (the tail was truncated)",
    ], []),
    ("one record after the last checkpoint", _delete_one_after_the_checkpoint, [
        "record 41 is missing (the next stored record is 42): records were deleted",
    ], [
        "records 40..42 are not yet covered by a checkpoint, so not yet witnessed: no other force has vouched for them",
    ]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "tamper", "findings", "notes"), DELETIONS, ids=[d[0] for d in DELETIONS])
def test_each_gap_is_one_finding_naming_exactly_the_records_missing(
    db: Path, name: str, tamper: Callable[[Path], None], findings: list[str], notes: list[str]
) -> None:
    tamper(db)
    report = _verify(db)
    assert [f.message for f in report.findings] == findings
    assert list(report.notes) == notes and not report.ok


def test_the_verify_command_reports_one_deleted_record_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "small.db"
    log = new_log(db, checkpoint_every=11)
    log.open()
    fill(log, 11)
    log.wait_checkpoint(11)
    log.close_blocking()
    _cosign(db)
    execute(db, ("DELETE FROM records WHERE idx = 5", ()))
    code, out, _ = _run(capsys, "verify", str(db), *PINNED)
    assert code == 1
    assert out.splitlines()[-3:] == [
        "FAILED: 2 finding(s); first bad: record 5 is missing (the next stored record is 6): records were deleted",
        "  record 5 is missing (the next stored record is 6): records were deleted",
        "  checkpoint 11: the stored records do not hash to its root",
    ]


def test_a_dropped_witness_key_leaves_its_cosignatures_unverifiable(db: Path) -> None:
    _drop_witness_key(db)
    assert _verify(db).ok  # with every key pinned, the stored copy of a key is not needed
    report = _verify(db, TrustAnchors(log_verifiers=(log_verifier(TV),), at=T0))
    assert report.first is not None
    assert (
        report.first.message
        == "checkpoint 10: cosignature by hampshire.se.psn/witness: no key for it is known or stored"
    )


def test_tampering_with_a_witness_key_is_caught_when_keys_are_pinned(db: Path) -> None:
    # Swap Hampshire's stored witness key for a key the tamperer controls, and re-sign its cosignatures.
    from gateway.audit.note import CosignatureSigner

    from ._helpers import key

    fake = CosignatureSigner("hampshire.se.psn/witness", key("tamperer"))
    execute(db, ("UPDATE witness_keys SET vkey = ?, certificate = NULL WHERE name = 'hampshire.se.psn/witness'",
                 (fake.vkey(),)))  # fmt: skip
    for size, text in rows(db, "SELECT size, note FROM checkpoints"):
        body = parse_note(bytes(text)).body
        line = fake.cosign(body, int(T0)).line()
        execute(db, ("UPDATE cosignatures SET line = ? WHERE size = ? AND witness = 'hampshire.se.psn/witness'",
                     (line, size)))  # fmt: skip
    report = _verify(db)
    # With Hampshire's real key pinned, the substitute's cosignatures count for nothing.
    assert report.cosignatures == N // EVERY and report.untrusted_cosignatures == N // EVERY
    assert report.witnesses == ("surrey.se.psn/witness",)


# -- verify: which keys are trusted ---------------------------------------------------------------


def test_verify_needs_trusted_keys(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "verify", str(db))
    assert code == 2 and "say which keys to trust" in err


def test_verify_with_the_log_key_only_leaves_witnesses_untrusted(db: Path) -> None:
    # The log's own key shows only what the force signed: with no witness trusted, nothing is witnessed.
    report = _verify(db, TrustAnchors(log_verifiers=(log_verifier(TV),), at=T0))
    assert report.cosignatures == 0 and report.untrusted_cosignatures == 2 * N // EVERY
    assert [f.kind for f in report.findings] == ["witness"] and report.witnessed is None
    assert report.findings[0].message.endswith(
        "and has 0 (cosigned by: none; not counted: hampshire.se.psn/witness (a key not trusted),"
        " surrey.se.psn/witness (a key not trusted))"
    )


def test_verify_with_another_key_trusts_nothing(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "verify", str(db), "--vkey", signer(TV, "someone else").vkey())
    assert code == 1 and "first bad: checkpoint 10: not validly signed by a trusted key" in out


def test_verify_with_log_certificates(db: Path, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = []
    for force in FORCES:
        path = tmp_path / f"{force}-log.pem"
        path.write_bytes(pki.log_certs[force])
        args += ["--log-cert", str(path)]
    code, out, _ = _run(capsys, "verify", str(db), *args)
    assert code == 0, out
    assert f"cosignatures: {2 * N // EVERY} verified with trusted keys" in out


def test_verify_with_the_directory_checks_the_stored_certificates(
    db: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "verify", str(db), "--directory", str(pki.directory), "--at", AT)
    assert code == 0, out
    assert "certificates checked against the directory's CAs" in out
    assert f"{2 * N // EVERY} verified with trusted keys" in out
    # The same log years later: the certificates have expired.
    code, out, _ = _run(capsys, "verify", str(db), "--directory", str(pki.directory), "--at", "2035-01-01")
    assert code == 1 and "certificate expired" in out


def test_a_log_certificate_from_another_forces_ca_is_not_believed(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    imposter = make_pki(tmp_path, imposter_for=TV)
    execute(db, ("UPDATE log_keys SET certificate = ?", (imposter.log_certs[TV],)))
    code, out, _ = _run(capsys, "verify", str(db), "--directory", str(imposter.directory), "--at", AT)
    assert code == 1
    assert "log key thames-valley.se.psn/audit: its certificate is not trusted" in out


def test_unsafe_stored_keys_check_only_consistency(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "verify", str(db), "--unsafe-stored-keys", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] and report["cosignatures"] == 2 * N // EVERY


@pytest.mark.parametrize(
    "argv",
    [
        ["--vkey", "not-a-key"],
        ["--log-cert", "/nonexistent.pem"],
        ["--directory", "/nonexistent.toml"],
        ["--vkey", log_verifier(TV).vkey(), "--at", "next tuesday"],
    ],
)
def test_bad_key_options_are_config_errors(db: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = _run(capsys, "verify", str(db), *argv)
    assert code == 2 and err.startswith("psngw: ") and err.count("\n") == 1 and not out


def test_load_anchors_knows_cosignature_keys() -> None:
    anchors = load_anchors(vkeys=[cosig_verifier("surrey").vkey(), log_verifier(TV).vkey()], at=T0)
    assert [v.name for v in anchors.log_verifiers] == [origin(TV)]
    assert [v.name for v in anchors.witness_verifiers] == ["surrey.se.psn/witness"]


# -- verify: witnessed by other forces, never by the log's own ------------------------------------

OWN_WITNESS = f"{domain(TV)}/witness"


def _rewrite_history(db: Path, pki: Pki) -> None:
    """Thames Valley rewrites its own log: record 7 altered, every checkpoint re-signed with its log key, the peers'
    cosignatures dropped."""
    data = _data(db, 7).replace(b'"officer_id":"OFF2"', b'"officer_id":"OFF3"')
    execute(
        db,
        ("UPDATE records SET data = ?, leaf_hash = ? WHERE idx = 7", (data, leaf_hash(data))),
        ("DELETE FROM cosignatures", ()),
        ("DELETE FROM checkpoints", ()),
    )
    tree = MerkleTree([bytes(h) for (h,) in rows(db, "SELECT leaf_hash FROM records ORDER BY idx")])
    for size in range(EVERY, N + 1, EVERY):
        note = sign_note(Checkpoint(origin(TV), size, tree.root(size)).body(), [signer(TV)])
        execute(db, ("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)", (size, tree.root(size), note.text(), T0, T0)))


def _cosign_as(db: Path, witness: CosignatureSigner, certificate: bytes | None) -> None:
    """Store `witness`'s key (with `certificate`) and its cosignature on every checkpoint."""
    execute(db, ("INSERT INTO witness_keys VALUES (?, ?, ?, ?)", (witness.vkey(), witness.name, certificate, T0)))
    for size, text in rows(db, "SELECT size, note FROM checkpoints"):
        line = witness.cosign(parse_note(bytes(text)).body, int(T0)).line()
        execute(db, ("INSERT INTO cosignatures VALUES (?, ?, ?, ?, ?)", (size, witness.name, line, int(T0), T0)))


def _rewritten_and_self_cosigned(db: Path, pki: Pki) -> None:
    # Its own witness name and its own log key, with its own (genuine) log certificate.
    _rewrite_history(db, pki)
    _cosign_as(db, CosignatureSigner(OWN_WITNESS, key(TV)), pki.log_certs[TV])


def _rewritten_and_cosigned_under_a_peers_name(db: Path, pki: Pki) -> None:
    # Its own log key under Surrey's witness name: only the unsafe stored keys would believe the name.
    _rewrite_history(db, pki)
    _cosign_as(db, CosignatureSigner("surrey.se.psn/witness", key(TV)), None)


def _checkpoints_removed(db: Path, pki: Pki) -> None:
    execute(db, ("DELETE FROM cosignatures", ()), ("DELETE FROM checkpoints", ()))


def _directory(pki: Pki, tmp_path: Path) -> list[str]:
    return ["--directory", str(pki.directory), "--at", AT]


def _log_certs(pki: Pki, tmp_path: Path) -> list[str]:
    args = []
    for force in FORCES:
        path = tmp_path / f"{force}-log.pem"
        path.write_bytes(pki.log_certs[force])
        args += ["--log-cert", str(path)]
    return args


def _own_vkeys(pki: Pki, tmp_path: Path) -> list[str]:
    return [*PINNED, "--vkey", CosignatureSigner(OWN_WITNESS, key(TV)).vkey()]


def _unsafe(pki: Pki, tmp_path: Path) -> list[str]:
    return ["--unsafe-stored-keys"]


UNWITNESSED = r"^no checkpoint of the log is witnessed by another force, so its history \(all 40 records\) could have"
SELF_COSIGNED = r"^checkpoint 10: the cosignature by thames-valley\.se\.psn/witness is by the log's own force"
WITNESS_ATTACKS = [
    ("rewritten, re-signed, peers' cosignatures dropped", _rewrite_history, _directory, UNWITNESSED),
    ("the same, cosigned by its own witness (directory)", _rewritten_and_self_cosigned, _directory, SELF_COSIGNED),
    ("the same, cosigned by its own witness (log certificates)", _rewritten_and_self_cosigned, _log_certs,
     SELF_COSIGNED),
    ("the same, cosigned by its own witness (pinned keys)", _rewritten_and_self_cosigned, _own_vkeys, SELF_COSIGNED),
    ("the same, its own key under a peer's witness name", _rewritten_and_cosigned_under_a_peers_name, _unsafe,
     r"^checkpoint 10: the cosignature by surrey\.se\.psn/witness is by the log's own force \(its name, or one of"),
    ("every checkpoint removed", _checkpoints_removed, _directory, UNWITNESSED + r".*; the log has no checkpoint$"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "tamper", "trust", "first"), WITNESS_ATTACKS, ids=[a[0] for a in WITNESS_ATTACKS])
def test_a_log_its_own_force_rewrote_is_not_witnessed(
    db: Path, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
    tamper: Callable[[Path, Pki], None], trust: Callable[[Pki, Path], list[str]], first: str,
) -> None:  # fmt: skip
    tamper(db, pki)
    code, out, _ = _run(capsys, "verify", str(db), *trust(pki, tmp_path), "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["witnessed"] is None and report["witnesses"] == []
    assert re.search(first, report["first"]), report["findings"]
    last = report["findings"][-1]
    assert last["kind"] == "witness" and re.search(UNWITNESSED, last["message"])
    assert "could have been rewritten by the force of thames-valley.se.psn/audit itself" in last["message"]


def test_the_unwitnessed_finding_names_who_did_cosign(db: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    _rewritten_and_self_cosigned(db, pki)
    code, out, _ = _run(capsys, "verify", str(db), "--directory", str(pki.directory), "--at", AT)
    assert code == 1 and "OK" not in out
    assert "witnessed: no checkpoint; the witnesses of at least 1 other force(s) needed (--quorum)" in out
    assert out.rstrip().endswith(
        "  no checkpoint of the log is witnessed by another force, so its history (all 40 records) could have been"
        " rewritten by the force of thames-valley.se.psn/audit itself; its latest, checkpoint 40: it needs valid"
        " cosignatures, with trusted keys, by the witnesses of at least 1 force(s) other than the log's own, and has 0"
        " (cosigned by: none; not counted: thames-valley.se.psn/witness (the log's own force))"
    )


def test_a_bundle_of_a_rewritten_log_is_not_witnessed(
    db: Path, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _rewritten_and_self_cosigned(db, pki)
    out = tmp_path / "bundle.json"
    _export(db, capsys, out, "--since", format_time(T0 + 5 * HOURS), "--until", format_time(T0 + 9 * HOURS))
    code, text, _ = _run(capsys, "verify-bundle", str(out), "--directory", str(pki.directory), "--at", AT, "--json")
    report = json.loads(text)
    assert code == 1 and report["witnessed"] is None
    assert [f["kind"] for f in report["findings"]] == ["cosignature", "witness"]
    assert report["findings"][-1]["message"] == (
        f"checkpoint {N}, the bundle's, is not witnessed: it needs valid cosignatures, with trusted keys, by the"
        " witnesses of at least 1 force(s) other than the log's own, and has 0 (cosigned by: none; not counted:"
        " thames-valley.se.psn/witness (the log's own force)): its records and their proofs could have been made up"
        " by the force of thames-valley.se.psn/audit itself"
    )


def test_an_honest_log_and_its_bundle_are_witnessed_by_the_peers(
    db: Path, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "verify", str(db), "--directory", str(pki.directory), "--at", AT, "--quorum", "2")
    assert code == 0 and "OK: no finding" in out
    assert f"witnessed: the last checkpoint (size {N}); the witnesses of at least 2 other force(s) needed" in out
    bundle = tmp_path / "bundle.json"
    _export(db, capsys, bundle, "--since", format_time(T0 + 5 * HOURS))
    code, text, _ = _run(capsys, "verify-bundle", str(bundle), "--directory", str(pki.directory), "--at", AT, "--json")
    report = json.loads(text)
    assert code == 0 and report["witnessed"] == N and report["quorum"] == 1
    assert report["witnesses"] == ["hampshire.se.psn/witness", "surrey.se.psn/witness"]


def test_the_quorum_counts_other_forces_not_cosignatures(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Hampshire's cosignatures are gone; Surrey cosigned under two names with two keys: still one force.
    execute(db, ("DELETE FROM cosignatures WHERE witness = 'hampshire.se.psn/witness'", ()))
    second = CosignatureSigner("surrey.se.psn/witness-2", key("surrey 2"))
    _cosign_as(db, second, None)
    code, out, _ = _run(capsys, "verify", str(db), *PINNED, "--vkey", second.vkey(), "--json")
    report = json.loads(out)
    assert code == 0 and report["witnessed"] == N, report["findings"]
    code, out, _ = _run(capsys, "verify", str(db), *PINNED, "--vkey", second.vkey(), "--quorum", "2", "--json")
    report = json.loads(out)
    assert code == 1 and report["witnessed"] is None and report["quorum"] == 2
    assert report["first"].endswith("has 1 (cosigned by: surrey.se.psn/witness, surrey.se.psn/witness-2)"), report[
        "first"
    ]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--quorum", "0"], "--quorum: must be a number of other forces in 1..64, got 0: a log cannot witness itself"),
        (["--quorum", "65"], "--quorum: must be a number of other forces in 1..64"),
        (["--directory", "DIRECTORY", "--quorum", "3"],
         "--quorum: the network has 2 force(s) besides any log's own: a quorum of 3 can never be met"),
    ],
    ids=["none", "too many", "more than the network has"],
)  # fmt: skip
def test_an_impossible_quorum_is_refused(
    db: Path, pki: Pki, capsys: pytest.CaptureFixture[str], argv: list[str], error: str
) -> None:
    argv = [str(pki.directory) if a == "DIRECTORY" else a for a in argv]
    code, out, err = _run(capsys, "verify", str(db), *PINNED, *argv)
    assert code == 2 and not out and err.startswith(f"psngw: command line: {error}") and err.count("\n") == 1


def test_trust_anchors_never_go_without_a_witness() -> None:
    with pytest.raises(ConfigError, match="a log cannot witness itself"):
        TrustAnchors(log_verifiers=(log_verifier(TV),), quorum=0)
    assert TrustAnchors().quorum == 1


def _stop_after_more_records(db: Path) -> None:
    """The gateway appends three records and stops: it signs a last checkpoint, which no witness has seen yet."""
    log = new_log(db, checkpoint_every=1000)
    log.open()
    fill(log, 3, start=N)
    log.checkpoint_now()
    log.wait_checkpoint(N + 3)
    log.close_blocking()


def test_records_after_the_last_witnessed_checkpoint_are_a_note(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _stop_after_more_records(db)
    report = _verify(db)
    assert report.ok and report.witnessed == N and report.last_checkpoint == N + 3 and report.witnesses == ()
    assert report.notes == (
        f"checkpoint {N + 3}, the latest, is not witnessed (it needs valid cosignatures, with trusted keys, by the"
        " witnesses of at least 1 force(s) other than the log's own, and has 0 (cosigned by: none)): records"
        f" {N}..{N + 2} are vouched for by the force of thames-valley.se.psn/audit alone; witnessed checkpoint {N}"
        f" vouches for records 0..{N - 1}",
    )
    code, out, _ = _run(capsys, "verify", str(db), *PINNED)
    assert code == 0 and f"witnessed: up to checkpoint {N}, not the last (size {N + 3})" in out
    # A bundle is proven in the latest checkpoint a witness cosigned, so that it verifies as witnessed.
    bundle = tmp_path / "bundle.json"
    code, text, err = _run(capsys, "export", str(db), str(bundle))
    assert code == 0 and f"proven against the checkpoint of size {N}" in text
    assert f"the latest checkpoint (size {N + 3}) is not cosigned by another force's witness yet" in err
    code, report = _verify_bundle(capsys, bundle)
    assert code == 0 and report["witnessed"] == N


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["query", "verify", "stats", "prove", "export"])
def test_no_such_file_or_not_a_log_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    extra = {"verify": ["--unsafe-stored-keys"], "prove": ["--request-id", "x"], "export": [str(tmp_path / "o")]}
    for target in (tmp_path / "missing.db", _junk(tmp_path)):
        code, out, err = _run(capsys, command, str(target), *extra.get(command, []))
        assert code == 2 and not out
        assert err.startswith("psngw: ") and err.count("\n") == 1
        assert "no such audit log" in err or "not an audit log" in err or "cannot read" in err


def _junk(tmp_path: Path) -> Path:
    path = tmp_path / "junk.db"
    if not path.exists():
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE t (x)")
        conn.close()
    return path


def test_a_log_missing_a_table_is_refused_naming_the_table(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    execute(db, ("DROP TABLE checkpoints", ()))
    code, out, err = _run(capsys, "verify", str(db), "--unsafe-stored-keys")
    assert code == 2 and not out
    assert err == (
        f"psngw: {db}: a damaged audit log: it has the format 'psn-gateway-audit-log/1' but its checkpoints table"
        " is missing (dropped, or the file is damaged)\n"
    )


def _invalid_record(db: Path) -> None:
    data = _data(db, 7).replace(b'"event":"call"', b'"event":"nope"')
    execute(db, ("UPDATE records SET data = ? WHERE idx = 7", (data,)))


def _malformed_checkpoint(db: Path) -> None:
    execute(db, ("UPDATE checkpoints SET note = ? WHERE size = ?", (b"junk", N)))


LOG_ERRORS = [
    (_invalid_record, ["query"], "record 7 is not a valid record ('nope' is not one of"),
    (_invalid_record, ["stats"], "record 7 is not a valid record ('nope' is not one of"),
    (_malformed_checkpoint, ["prove", "--request-id", f"{3:032x}"], f"checkpoint {N} is malformed ("),
    (_malformed_checkpoint, ["export", "--since", "2027-01-16"], f"checkpoint {N} is malformed ("),
]


@pytest.mark.parametrize(("damage", "argv", "error"), LOG_ERRORS, ids=[" ".join(e[1][:1]) for e in LOG_ERRORS])
def test_what_is_wrong_with_a_log_is_said_of_its_file(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], None], argv: list[str],
    error: str,
) -> None:  # fmt: skip
    damage(db)
    command, *options = argv
    extra = [str(tmp_path / "bundle.json")] if command == "export" else []
    code, out, err = _run(capsys, command, str(db), *options, *extra)
    assert code == 2 and not out
    assert err.startswith(f"psngw: {db}: {error}") and err.count("\n") == 1, err


def test_certificate_problems_are_said_without_a_placeholder_file(
    db: Path, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    execute(db, ("UPDATE log_keys SET certificate = ?", (pki.log_certs["hampshire"],)))
    code, out, _ = _run(capsys, "verify", str(db), "--directory", str(pki.directory), "--at", AT)
    assert code == 1
    assert (
        "log key thames-valley.se.psn/audit: its certificate is not trusted: the certificate is for"
        " spiffe://hampshire.se.psn/log, not spiffe://thames-valley.se.psn/log\n" in out
    )
    # A force's gateway-signing certificate given as a log certificate.
    now = datetime.fromtimestamp(T0, UTC)
    profile = x509_pki.leaf_profile(x509_pki.CertKind.GATEWAY_SIGNING, trust_domain=domain(TV), display_name=TV)
    cert = x509_pki.build_certificate(
        profile, public_key=key(TV).public_key(), issuer=None, issuer_key=key(TV), not_before=now,
        not_after=now + timedelta(days=1),
    )  # fmt: skip
    pem = tmp_path / "gateway-signing.pem"
    pem.write_bytes(cert.public_bytes(Encoding.PEM))
    code, out, err = _run(capsys, "verify", str(db), "--log-cert", str(pem))
    assert code == 2 and not out
    assert err == (
        f"psngw: {pem}: not a log certificate: spiffe://thames-valley.se.psn/gateway is not a log identity"
        " (spiffe://<force>.<network>/log)\n"
    )


# -- query ----------------------------------------------------------------------------------------


def _query(capsys: pytest.CaptureFixture[str], db: Path, *argv: str) -> list[dict[str, Any]]:
    code, out, _ = _run(capsys, "query", str(db), "--json", *argv)
    assert code == 0
    result: list[dict[str, Any]] = json.loads(out)
    return result


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], list(range(N))),
        (["--officer", "OFF1"], [i for i in range(N) if i % 5 == 1]),
        (["--unit", "ctpse"], [i for i in range(N) if i % 3 == 1]),
        (["--origin-force", "surrey"], [i for i in range(N) if i % 2 == 1]),
        (["--application", "custody"], [i for i in range(N) if i % 2 == 1]),
        (["--method", "/psn.demo.intel.v1.IntelligenceSearch/Search"], [i for i in range(N) if i % 2 == 0]),
        (["--decision", "deny"], [i for i in range(N) if i % 4 == 3]),
        (["--decision", "allow", "--officer", "OFF3"], [i for i in range(N) if i % 4 != 3 and i % 5 == 3]),
        (["--decision", "none"], []),
        (["--status", "permission_denied"], [i for i in range(N) if i % 4 == 3]),
        (["--request-id", f"{12:032x}"], [12]),
        (["--since", format_time(T0 + 10 * HOURS), "--until", format_time(T0 + 14 * HOURS)], [10, 11, 12, 13]),
        (["--since", "2027-01-16"], [i for i in range(N) if T0 + i * HOURS >= T0 + 16 * 3600]),
        (["--event", "audit-access"], []),
        (["--officer", "OFF1", "--limit", "2"], [1, 6]),
    ],
)
def test_query_filters(db: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: list[int]) -> None:
    assert [r["index"] for r in _query(capsys, db, *argv)] == expected


def test_query_json_holds_whole_records(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (first,) = _query(capsys, db, "--request-id", f"{5:032x}")
    assert AuditRecord(**first) == AuditRecord.decode(_data(db, 5))


@pytest.mark.parametrize(
    "argv",
    [["--since", "yesterday"], ["--until", "2027-01-01T00:00:00"], ["--status", "FINE"], ["--limit", "0"],
     ["--since", "2027-02-01", "--until", "2027-01-01"]],
)  # fmt: skip
def test_bad_filters_are_exit_2(db: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = _run(capsys, "query", str(db), *argv)
    assert code == 2 and not out and err.count("\n") == 1


def _db_with_hostile_text(tmp_path: Path) -> Path:
    db = tmp_path / "hostile.db"
    log = new_log(db)
    log.open()
    log.append_blocking(make_record(1, purpose_text='=HYPERLINK("http://x")', refusal_reason="\x1b[2J\x1b[31mred"))
    log.append_blocking(make_record(2, officer_id="\x1b]0;pwned\x07"))
    log.close_blocking()
    return db


def test_csv_output_guards_against_formulas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _db_with_hostile_text(tmp_path)
    code, out, _ = _run(capsys, "query", str(db), "--csv")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert len(table) == 2
    assert table[0]["purpose_text"] == '\'=HYPERLINK("http://x")'
    assert table[0]["units"] == "ctpse;serocu" and table[1]["units"] == "hc-cid"


def test_table_output_escapes_terminal_controls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _db_with_hostile_text(tmp_path)
    code, out, _ = _run(capsys, "query", str(db))
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07" in out and "(2 records)" in out


# -- prove ----------------------------------------------------------------------------------------


def _rfc6962_root_from_path(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes:
    """An independent RFC 9162 section 2.1.3.2 inclusion verifier (not the gateway's code)."""
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise AssertionError("proof too long")
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    assert sn == 0
    return r


def test_prove_gives_what_any_rfc6962_verifier_needs(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "prove", str(db), "--request-id", f"{23:032x}", "--json")
    assert code == 0
    proof = json.loads(out)
    (entry,) = proof["proofs"]
    assert entry["index"] == 23 and proof["tree_size"] == N
    data = entry["leaf_data"].encode("ascii")
    assert data == _data(db, 23)
    assert hashlib.sha256(b"\x00" + data).hexdigest() == entry["leaf_hash"]
    root = _rfc6962_root_from_path(
        bytes.fromhex(entry["leaf_hash"]), 23, proof["tree_size"], [bytes.fromhex(h) for h in entry["inclusion_proof"]]
    )
    assert root.hex() == proof["root"]
    note = parse_note(proof["checkpoint"].encode())
    verify_note(note, log_verifier(TV))
    cp = Checkpoint.parse(note.body)
    assert (cp.size, cp.root_hash.hex()) == (N, proof["root"])
    assert len(note.signatures) == 3  # the log's signature and two cosignatures
    assert entry["record"]["request_id"] == f"{23:032x}"


def test_prove_refuses_what_it_cannot_prove(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "prove", str(db), "--request-id", "nope")
    assert code == 2 and "no record with request id 'nope'" in err
    log = new_log(db, checkpointer=False)
    log.open()
    log.append_blocking(make_record(500))
    log.close_blocking()
    code, _, err = _run(capsys, "prove", str(db), "--request-id", f"{500:032x}")
    assert code == 2 and "not yet covered by a signed checkpoint" in err
    _change_one_byte(db)
    code, _, err = _run(capsys, "prove", str(db), "--request-id", f"{23:032x}")
    assert code == 2 and "run `psngw audit verify`" in err


def test_prove_prints_a_readable_proof(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "prove", str(db), "--request-id", f"{3:032x}")
    assert code == 0 and "record 3: leaf hash" in out and "— thames-valley.se.psn/audit" in out


# -- export and verify-bundle ---------------------------------------------------------------------


def _export(db: Path, capsys: pytest.CaptureFixture[str], out: Path, *argv: str) -> dict[str, Any]:
    code, text, _ = _run(capsys, "export", str(db), *argv, str(out))
    assert code == 0, text
    bundle: dict[str, Any] = json.loads(out.read_bytes())
    return bundle


def test_export_then_verify_bundle(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    out = tmp_path / "bundle.json"
    bundle = _export(db, capsys, out, "--since", format_time(T0 + 5 * HOURS), "--until", format_time(T0 + 9 * HOURS))
    assert [r["index"] for r in bundle["records"]] == [5, 6, 7, 8]
    assert out.stat().st_mode & 0o777 == 0o600
    assert bundle["log_keys"][0]["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    code, text, _ = _run(capsys, "verify-bundle", str(out), "--directory", str(pki.directory), "--at", AT)
    assert code == 0, text
    assert "cosignatures: 2 verified with trusted keys" in text
    code, text, _ = _run(capsys, "verify-bundle", str(out), *PINNED, "--json")
    assert code == 0 and json.loads(text)["cosignatures"] == 2
    # With only the log's key, the witnesses are not trusted: the bundle is not witnessed.
    code, text, _ = _run(capsys, "verify-bundle", str(out), "--vkey", log_verifier(TV).vkey(), "--json")
    report = json.loads(text)
    assert code == 1 and report["untrusted_cosignatures"] == 2 and report["witnessed"] is None
    assert report["first"].startswith(f"checkpoint {N}, the bundle's, is not witnessed: it needs valid cosignatures")


def test_export_never_overwrites(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle.json"
    out.write_text("precious")
    code, _, err = _run(capsys, "export", str(db), str(out))
    assert code == 2 and "never overwritten" in err and out.read_text() == "precious"


def _tamper_bundle_record(b: dict[str, Any]) -> None:
    b["records"][1]["leaf_data"] = b["records"][1]["leaf_data"].replace("OFF1", "OFF4")


def _tamper_bundle_proof(b: dict[str, Any]) -> None:
    b["records"][0]["inclusion_proof"][0] = "00" * 32


def _tamper_bundle_checkpoint(b: dict[str, Any]) -> None:
    root = bytes.fromhex(b["checkpoint"]["root"])
    note = sign_note(Checkpoint(origin(TV), N, root).body(), [signer(TV, "imposter")])
    b["checkpoint"]["note"] = note.text().decode()


def _tamper_bundle_index(b: dict[str, Any]) -> None:
    b["records"][0]["index"] = b["records"][1]["index"]


def _tamper_bundle_range(b: dict[str, Any]) -> None:
    b["until"] = format_time(T0 + 6 * HOURS)


def _take_out_a_record(b: dict[str, Any]) -> None:
    del b["records"][2]


def _take_out_the_first_record(b: dict[str, Any]) -> None:
    del b["records"][0]


def _take_out_the_last_record(b: dict[str, Any]) -> None:
    del b["records"][-1]


def _duplicate_a_record(b: dict[str, Any]) -> None:
    b["records"].insert(2, b["records"][1])


def _reorder_two_records(b: dict[str, Any]) -> None:
    b["records"][1], b["records"][2] = b["records"][2], b["records"][1]


def _state_a_longer_run(b: dict[str, Any]) -> None:
    b["end_index"] = 11


def _state_a_run_beyond_the_checkpoint(b: dict[str, Any]) -> None:
    b["end_index"] = N + 1


def _state_a_shorter_run(b: dict[str, Any]) -> None:
    b["start_index"] = 6


def _take_the_last_record_off_the_run(b: dict[str, Any]) -> None:
    # The attack the records around the run stop: the last record moved out, the run shortened to match.
    b["after"] = b["records"].pop()
    b["end_index"] -= 1


def _take_the_first_record_off_the_run(b: dict[str, Any]) -> None:
    b["before"] = b["records"].pop(0)
    b["start_index"] += 1


def _take_the_last_record_off_keeping_the_one_after(b: dict[str, Any]) -> None:
    del b["records"][-1]
    b["end_index"] -= 1


def _take_the_last_record_off_without_one_after(b: dict[str, Any]) -> None:
    del b["records"][-1]
    b["end_index"] -= 1
    b["after"] = None


def _take_the_last_record_off_and_restamp_it(b: dict[str, Any]) -> None:
    record = b["records"].pop()
    record["leaf_data"] = record["leaf_data"].replace(format_time(T0 + 8 * HOURS), format_time(T0 + 20 * HOURS))
    record["leaf_hash"] = leaf_hash(record["leaf_data"].encode()).hex()
    b["after"] = record
    b["end_index"] -= 1


def _state_an_empty_run(b: dict[str, Any]) -> None:
    # "Nothing in the range", placed between records 8 and 9 (the record after the run stays 9).
    b["before"] = b["records"][-1]
    b["records"] = []
    b["start_index"] = b["end_index"]


def _change_the_record_after(b: dict[str, Any]) -> None:
    b["after"]["leaf_data"] = b["after"]["leaf_data"].replace(format_time(T0 + 9 * HOURS), format_time(T0 + 10 * HOURS))


def _change_the_proof_of_the_record_before(b: dict[str, Any]) -> None:
    b["before"]["inclusion_proof"][0] = "00" * 32


def _leave_out_the_record_before(b: dict[str, Any]) -> None:
    del b["before"]


def _leave_out_the_record_after(b: dict[str, Any]) -> None:
    b["after"] = None


BUNDLE_TAMPERING = [
    ("change a record", _tamper_bundle_record, r"^record 6: its bytes do not match its leaf hash"),
    ("change a proof", _tamper_bundle_proof, r"^record 5: its inclusion proof fails"),
    ("replace the checkpoint", _tamper_bundle_checkpoint, r"^checkpoint 40: not validly signed"),
    ("renumber a record", _tamper_bundle_index, r"^record 6: its bytes say it is record 5"),
    ("narrow the stated range", _tamper_bundle_range,
     r"^record 8: its time \S+ is after the bundle's range, yet the run ends with it$"),
    ("take out a record", _take_out_a_record,
     r"^record 7 is missing from the bundle, which states records 5\.\.8: taken out of it$"),
    ("take out the first record", _take_out_the_first_record, r"^record 5 is missing from the bundle, which states"),
    ("take out the last record", _take_out_the_last_record, r"^record 8 is missing from the bundle, which states"),
    ("duplicate a record", _duplicate_a_record, r"^record 6: appears twice$"),
    ("reorder two records", _reorder_two_records, r"^record 6: comes after record 7: the records were reordered$"),
    ("state a longer run", _state_a_longer_run,
     r"^records 9\.\.10 are missing from the bundle, which states records 5\.\.10"),
    ("state a run beyond the checkpoint", _state_a_run_beyond_the_checkpoint,
     r"^the bundle states the records from 5 up to 41: not a run of the 40 records its checkpoint covers$"),
    ("state a shorter run", _state_a_shorter_run,
     r"^record 5: it is outside the run of records the bundle states \(records 6\.\.8\)$"),
    ("take the last record off the run", _take_the_last_record_off_the_run,
     r"^record 8, just after the run: its time \S+ is in the bundle's range: a record in the range was left out at"
     r" the end of the run$"),
    ("take the first record off the run", _take_the_first_record_off_the_run,
     r"^record 5, just before the run: its time \S+ is in the bundle's range: a record in the range was left out at"
     r" the start of the run$"),
    ("take the last record off, keeping the one after", _take_the_last_record_off_keeping_the_one_after,
     r"^record 8, just after the run: the bundle gives record 9 there instead$"),
    ("take the last record off, without one after", _take_the_last_record_off_without_one_after,
     r"^record 8, just after the run, is not in the bundle: without it, a record in the range left out at the end of"
     r" the run cannot be ruled out$"),
    ("take the last record off and restamp it", _take_the_last_record_off_and_restamp_it,
     r"^record 8, just after the run: its inclusion proof fails"),
    ("state an empty run", _state_an_empty_run,
     r"^record 8, just before the run: its time \S+ is in the bundle's range"),
    ("change the record after the run", _change_the_record_after,
     r"^record 9, just after the run: its bytes do not match its leaf hash: changed$"),
    ("change the proof of the record before the run", _change_the_proof_of_the_record_before,
     r"^record 4, just before the run: its inclusion proof fails"),
    ("leave out the record before the run", _leave_out_the_record_before,
     r"^record 4, just before the run, is not in the bundle"),
    ("leave out the record after the run", _leave_out_the_record_after,
     r"^record 9, just after the run, is not in the bundle"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "tamper", "first"), BUNDLE_TAMPERING, ids=[t[0] for t in BUNDLE_TAMPERING])
def test_verify_bundle_finds_tampering(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, tamper: Any, first: str
) -> None:
    out = tmp_path / "bundle.json"
    bundle = _export(db, capsys, out, "--since", format_time(T0 + 5 * HOURS), "--until", format_time(T0 + 9 * HOURS))
    tamper(bundle)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bundle))
    code, text, _ = _run(capsys, "verify-bundle", str(bad), *PINNED, "--json")
    assert code == 1
    report = json.loads(text)
    assert re.search(first, report["first"]), report["findings"]


def test_a_bundle_states_its_run_and_holds_every_record_of_it(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle.json"
    code, text, _ = _run(capsys, "export", str(db), "--since", format_time(T0 + 5 * HOURS), "--until",
                         format_time(T0 + 9 * HOURS), str(out))  # fmt: skip
    assert code == 0 and text.startswith(f"wrote {out}: 4 records (5..8),")
    bundle = json.loads(out.read_bytes())
    assert bundle["format"] == "psn-gateway-audit-bundle/2"
    assert (bundle["start_index"], bundle["end_index"]) == (5, 9)
    assert (bundle["before"]["index"], bundle["after"]["index"]) == (4, 9)
    del bundle["records"][2]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bundle))
    code, text, _ = _run(capsys, "verify-bundle", str(bad), *PINNED)
    assert code == 1
    assert text.splitlines()[-2:] == [
        "FAILED: 1 finding(s); first bad: record 7 is missing from the bundle, which states records 5..8: taken out"
        " of it",
        "  record 7 is missing from the bundle, which states records 5..8: taken out of it",
    ]


def test_a_bundle_of_the_earlier_format_is_still_verified_for_a_gap(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _export(db, capsys, tmp_path / "bundle.json", "--since", format_time(T0 + 5 * HOURS), "--until",
                     format_time(T0 + 9 * HOURS))  # fmt: skip
    bundle["format"] = "psn-gateway-audit-bundle/1"
    del bundle["start_index"], bundle["end_index"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(bundle))
    code, text, _ = _run(capsys, "verify-bundle", str(old), *PINNED, "--json")
    report = json.loads(text)
    assert code == 0 and report["ok"]
    assert report["notes"] == [
        "the bundle, of the earlier format psn-gateway-audit-bundle/1, does not state which records it holds: a"
        " record missing at either end of records 5..8 cannot be detected (export again for a bundle that does)"
    ]
    del bundle["records"][1]
    old.write_text(json.dumps(bundle))
    code, text, _ = _run(capsys, "verify-bundle", str(old), *PINNED, "--json")
    report = json.loads(text)
    assert code == 1
    assert report["first"].startswith("record 6 is missing from the bundle, between records 5 and 7: taken out, or")


def _log_at(db: Path, hours: tuple[float, ...]) -> Path:
    """A log whose record i was made at T0 + hours[i] * HOURS, every record under one checkpoint."""
    log = new_log(db, checkpoint_every=len(hours))
    log.open()
    for i, h in enumerate(hours):
        log.append_blocking(make_record(i, when=T0 + h * HOURS))
    log.wait_checkpoint(len(hours))
    log.close_blocking()
    _cosign(db)
    return db


def _verify_bundle(capsys: pytest.CaptureFixture[str], path: Path, bundle: dict[str, Any] | None = None) -> Any:
    """verify-bundle's exit status and JSON report, of `bundle` written to `path` (or of the file as it is)."""
    if bundle is not None:
        path.write_text(json.dumps(bundle))
    code, text, _ = _run(capsys, "verify-bundle", str(path), *PINNED, "--json")
    return code, json.loads(text)


def test_export_holds_the_whole_run_where_records_are_committed_out_of_time_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Record 3 was made before record 1 but committed after record 2: a bundle from 1h to 5h holds it too.
    db = _log_at(tmp_path / "jitter.db", (0, 1, 2, 0.5, 4, 5))
    out = tmp_path / "bundle.json"
    code, _, err = _run(capsys, "export", str(db), "--since", format_time(T0 + HOURS), "--until",
                        format_time(T0 + 5 * HOURS), str(out))  # fmt: skip
    assert code == 0 and "1 record(s) whose time is outside the range are included" in err
    bundle = json.loads(out.read_bytes())
    assert (bundle["start_index"], bundle["end_index"]) == (1, 5)
    assert [r["index"] for r in bundle["records"]] == [1, 2, 3, 4]
    assert (bundle["before"]["index"], bundle["after"]["index"]) == (0, 5)
    code, report = _verify_bundle(capsys, out)
    assert code == 0 and report["ok"]
    assert report["notes"] == [
        f"record 3: its time {format_time(T0 + 0.5 * HOURS)} is outside the bundle's range, but it lies inside the"
        " run (committed out of time order): it is there so that the bundle holds every record of its run"
    ]
    # The run cut at record 3, which was made before the range, hides record 4, made in it: record 3 cannot
    # stand as the record after the run.
    bundle["after"] = bundle["records"][2]
    del bundle["records"][2:]
    bundle["end_index"] = 3
    code, report = _verify_bundle(capsys, tmp_path / "cut.json", bundle)
    assert code == 1
    assert report["first"] == (
        f"record 3, just after the run: its time {format_time(T0 + 0.5 * HOURS)} is before the bundle's range, not"
        " after it: records in the range may have been left out at the end of the run"
    )


def test_the_run_takes_in_records_committed_out_of_time_order_at_its_ends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # From 1h to 2h only record 2 is in the range. Record 1, made after the range, was committed before it, and
    # record 3, made before the range, after it: neither can stand as the record around the run, so the run takes
    # them in, and records 0 and 4 stand around it.
    db = _log_at(tmp_path / "jitter.db", (0, 3, 1.5, 0.5, 4))
    out = tmp_path / "bundle.json"
    code, _, err = _run(capsys, "export", str(db), "--since", format_time(T0 + HOURS), "--until",
                        format_time(T0 + 2 * HOURS), str(out))  # fmt: skip
    assert code == 0 and "2 record(s) whose time is outside the range are included" in err
    bundle = json.loads(out.read_bytes())
    assert (bundle["start_index"], bundle["end_index"]) == (1, 4)
    assert (bundle["before"]["index"], bundle["after"]["index"]) == (0, 4)
    code, report = _verify_bundle(capsys, out)
    assert code == 0 and report["ok"] and len(report["notes"]) == 2
    # Cut down to record 2 alone, the records around it are on the wrong sides of the range.
    first, middle, last = bundle["records"]
    bundle.update(before=first, records=[middle], after=last, start_index=2, end_index=3)
    code, report = _verify_bundle(capsys, tmp_path / "cut.json", bundle)
    assert code == 1
    assert [f["message"] for f in report["findings"]] == [
        f"record 1, just before the run: its time {format_time(T0 + 3 * HOURS)} is after the bundle's range, not"
        " before it: records in the range may have been left out at the start of the run",
        f"record 3, just after the run: its time {format_time(T0 + 0.5 * HOURS)} is before the bundle's range, not"
        " after it: records in the range may have been left out at the end of the run",
    ]


EDGES = [
    ("the start of the log", ["--until", format_time(T0 + 3 * HOURS)], (0, 3), (None, 3)),
    ("the checkpoint's end", ["--since", format_time(T0 + 37 * HOURS)], (37, N), (36, None)),
]


@pytest.mark.parametrize(("name", "argv", "run", "around"), EDGES, ids=[e[0] for e in EDGES])
def test_a_bundle_at_an_end_of_the_log_has_no_record_beyond_it(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, argv: list[str], run: tuple[int, int],
    around: tuple[int | None, int | None],
) -> None:  # fmt: skip
    bundle = _export(db, capsys, tmp_path / "bundle.json", *argv)
    assert (bundle["start_index"], bundle["end_index"]) == run
    assert tuple(r and r["index"] for r in (bundle["before"], bundle["after"])) == around
    code, report = _verify_bundle(capsys, tmp_path / "bundle.json")
    assert code == 0 and report["ok"] and report["notes"] == []
    # A record beyond the end of the log (or of the checkpoint) cannot be there.
    side = "before" if around[0] is None else "after"
    bundle[side] = bundle["after" if side == "before" else "before"]
    code, report = _verify_bundle(capsys, tmp_path / "bad.json", bundle)
    bound = "the log starts with the run" if side == "before" else "the run ends at the checkpoint's end"
    assert code == 1 and report["first"] == f"the bundle holds a record {side} its run, but {bound}"


EMPTY = [
    ("between two records", ["--since", format_time(T0 + 5.25 * HOURS), "--until", format_time(T0 + 5.5 * HOURS)],
     6, (5, 6), "record 5, made before the range, is followed by record 6, made after it"),
    ("before the log", ["--until", format_time(T0 - HOURS)],
     0, (None, 0), "record 0, the first of the log, was made after the range"),
    ("after the checkpoint", ["--since", "2030-01-01"],
     N, (N - 1, None), f"record {N - 1}, the last its checkpoint covers, was made before the range"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "argv", "at", "around", "where"), EMPTY, ids=[e[0] for e in EMPTY])
def test_an_empty_bundle_shows_where_the_range_falls(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, argv: list[str], at: int,
    around: tuple[int | None, int | None], where: str,
) -> None:  # fmt: skip
    out = tmp_path / "empty.json"
    code, text, err = _run(capsys, "export", str(db), *argv, str(out))
    assert code == 0 and text.startswith(f"wrote {out}: 0 records, ")
    assert err == (
        "psngw: no record the checkpoint covers is in the range: the bundle holds none, and shows where the range"
        f" falls in the log ({where})\n"
    )
    bundle = json.loads(out.read_bytes())
    assert (bundle["start_index"], bundle["end_index"], bundle["records"]) == (at, at, [])
    assert tuple(r and r["index"] for r in (bundle["before"], bundle["after"])) == around
    code, report = _verify_bundle(capsys, out)
    assert code == 0 and report["ok"]
    assert report["notes"] == [
        f"the bundle holds no record: {where}; a record in the range could be elsewhere in the log only if committed"
        " out of time order with these"
    ]


@pytest.mark.parametrize("content", [b"", b"{}", b"[1]", b'{"format": "psn-gateway-audit-bundle/1"}', b"\xff"])
def test_a_file_that_is_not_a_bundle_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "b.json"
    path.write_bytes(content)
    code, _, err = _run(capsys, "verify-bundle", str(path), "--unsafe-stored-keys")
    assert code == 2 and "bundle" in err


def test_export_leaves_out_records_not_yet_checkpointed(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = new_log(db, checkpointer=False)
    log.open()
    log.append_blocking(make_record(700, when=T0 + 2 * HOURS))
    log.close_blocking()
    out = tmp_path / "bundle.json"
    code, _, err = _run(capsys, "export", str(db), str(out))
    assert code == 0 and "1 record(s) in the range come after the checkpoint the bundle is proven in" in err
    assert len(json.loads(out.read_bytes())["records"]) == N


# -- stats ----------------------------------------------------------------------------------------


def test_stats_count_calls_by_force_unit_application_and_decision(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "stats", str(db), "--json")
    assert code == 0
    result = json.loads(out)
    buckets = result["buckets"]
    # 08:00 on the first day, then every six hours: 3 calls on the first day, 4 a day after.
    assert [b["calls"] for b in buckets] == [3] + [4] * 9 + [1]
    assert buckets[0]["period"] == "2027-01-15"
    total = sum(b["by_decision"].get("deny", 0) for b in buckets)
    assert total == len([i for i in range(N) if i % 4 == 3])
    assert sum(b["by_unit"].get("serocu", 0) for b in buckets) == len([i for i in range(N) if i % 3 != 2])
    assert sum(b["by_force"].get("hampshire", 0) for b in buckets) == N // 2
    code, out, _ = _run(capsys, "stats", str(db), "--by", "month")
    assert code == 0 and out.startswith("2027-01: 40 calls")


# -- the live log: access is recorded first; an offline copy is never changed ----------------------


def test_a_live_log_demands_an_auditor_and_a_purpose(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = new_log(db, checkpoint_every=1000)
    gateway.open()
    try:
        code, out, err = _run(capsys, "query", str(db))
        assert code == 2 and not out and "live log" in err and "--auditor" in err
        code, out, err = _run(
            capsys, "query", str(db), "--officer", "OFF1", "--auditor", "PSD-42", "--purpose", "lawfulness"
        )
        assert code == 0 and "access recorded in the live log as record 40" in err
        code, out, _ = _run(capsys, "verify", str(db), *PINNED, "--auditor", "PSD-42", "--purpose", "integrity")
        assert code == 0, out
        # The gateway keeps appending, and its next checkpoint covers the reads too.
        gateway.append_blocking(make_record(41))
        gateway.checkpoint_now()
        gateway.wait_checkpoint(43)
    finally:
        gateway.close_blocking()
    access = [AuditRecord.decode(bytes(d)) for (d,) in rows(db, "SELECT data FROM records WHERE idx IN (40, 41)")]
    assert [(a.event, a.accessor, a.access_purpose) for a in access] == [
        ("audit-access", "PSD-42", "lawfulness"),
        ("audit-access", "PSD-42", "integrity"),
    ]
    assert access[0].access_command == f"query {db} --officer=OFF1"
    assert access[0].gateway == "spiffe://thames-valley.se.psn/gateway" and access[0].force == TV
    assert _verify(db).ok


def _through_a_link(db: Path) -> Path:
    view = db.parent / "links" / "view.db"
    view.parent.mkdir()
    view.symlink_to(db)
    return view


def _through_dot_dot(db: Path) -> Path:
    (db.parent / "sub").mkdir()
    return db.parent / "sub" / ".." / db.name


@pytest.mark.parametrize("other_name", [_through_a_link, _through_dot_dot], ids=["a symbolic link", "a path with .."])
def test_a_live_log_read_by_another_name_is_still_recorded(
    db: Path, capsys: pytest.CaptureFixture[str], other_name: Callable[[Path], Path]
) -> None:
    view = other_name(db)
    gateway = new_log(db, checkpoint_every=1000)
    gateway.open()
    try:
        code, out, err = _run(capsys, "query", str(view))
        assert code == 2 and not out and "live log" in err and "--auditor" in err
        code, out, err = _run(capsys, "query", str(view), "--auditor", "PSD-42", "--purpose", "lawfulness")
        assert code == 0 and "access recorded in the live log as record 40" in err
    finally:
        gateway.close_blocking()
    (data,) = rows(db, "SELECT data FROM records WHERE idx = 40")[0]
    assert AuditRecord.decode(bytes(data)).accessor == "PSD-42"
    assert not (view.parent / "view.db.lock").exists()


def test_a_gateway_configured_with_a_link_to_its_log_is_live_under_the_file_s_own_name(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = db.parent / "configured.db"
    link.symlink_to(db)
    gateway = new_log(link, checkpoint_every=1000)
    gateway.open()
    try:
        code, _, err = _run(capsys, "query", str(db))
        assert code == 2 and "live log" in err and "--auditor" in err
    finally:
        gateway.close_blocking()


def test_a_live_log_access_must_name_a_lawful_purpose(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = new_log(db)
    gateway.open()
    try:
        with pytest.raises(SystemExit):
            main(["audit", "query", str(db), "--auditor", "PSD-42", "--purpose", "curiosity"])
        code, _, err = _run(capsys, "stats", str(db), "--purpose", "lawfulness")
        assert code == 2 and "name the auditor" in err
    finally:
        gateway.close_blocking()
    assert rows(db, "SELECT count(*) FROM records")[0][0] == N


def test_an_offline_copy_is_read_only_and_never_changed(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    out = tmp_path / "b.json"
    for argv in (
        ["query", str(db)],
        ["query", str(db), "--auditor", "PSD-42", "--purpose", "self-monitoring"],
        ["verify", str(db), "--unsafe-stored-keys"],
        ["prove", str(db), "--request-id", f"{1:032x}"],
        ["stats", str(db)],
        ["export", str(db), str(out)],
    ):
        code, _, err = _run(capsys, *argv)
        assert code == 0, (argv, err)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not os.path.exists(str(db) + ".lock")
    assert "offline copy" in _run(capsys, "query", str(db), "--auditor", "a", "--purpose", "integrity")[2]


def test_reader_refuses_to_write(db: Path) -> None:
    with LogReader.open(db) as reader, pytest.raises(sqlite3.OperationalError):
        reader.conn.execute("DELETE FROM records")
    assert embedded_index(_data(db, 3)) == 3
