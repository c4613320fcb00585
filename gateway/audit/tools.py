"""The auditors' tools: query, verify, prove, export, verify a bundle, and statistics.

Each tool reads a log and never changes a record. An offline copy is opened read-only (SQLite
``mode=ro``). A gateway's live log (`gateway.audit.store.is_live`: a process holds its lock file)
may only be read by a named auditor for one of the four purposes DPA 2018 s62(4) allows, and the
tool first appends an ``audit-access`` record saying so (`open_for_audit`), durably, before it
shows anything: reading the log is itself on the record. The log is live under whatever name the
auditor reaches it by (a symbolic link, ``..``): the lock is looked for beside the file itself
(`gateway.audit.store.live_path`). A stopped gateway's log is an offline copy, read without a record.

Which keys a verification trusts (`TrustAnchors`) is the auditor's choice, never the log's: a log
carries its own keys and certificates, but someone able to rewrite the log could rewrite those too.
So `verify` and `verify-bundle` need one of:

- ``--directory FILE``: the network directory; the log and witness certificates stored with the
  log (or bundle) are checked against the forces' CA certificates (and CRLs, where the directory
  names them) at ``--at`` (default: now), and their keys are trusted if the certificates are;
- ``--log-cert PEM``: a log certificate the auditor holds; its key is trusted as that force's log
  key and as that force's witness key (a force's witness cosigns with its log key);
- ``--vkey VKEY``: a note verifier key (``name+id+key``), of a log (type 0x01) or a witness (0x04);
- ``--unsafe-stored-keys``: trust whatever keys the log itself carries (checks internal
  consistency only; named for what it is).

A log can never witness itself. A witness key counts only for the logs of other forces: not when
its name (``<force>.<network>/witness``, which its certificate or the auditor's key binds) is of
the log's own force, nor when it is one of the log's own keys; a cosignature by such a key is a
finding. A checkpoint is witnessed when it is validly signed by the log and cosigned, with trusted
keys, by the witnesses of at least ``quorum`` other forces (`TrustAnchors.quorum`, ``--quorum``,
default `DEFAULT_QUORUM`). What a witnessed checkpoint of size n proves: the log's records 0..n-1
are as they were when the witnesses cosigned it (each witness first checked that it extends the
last checkpoint it had cosigned for this log, and keeps it); an earlier checkpoint, witnessed or
not, that the recomputed tree matches is a prefix of it, so it is vouched for too. It says nothing
of records after n, nor whether the witnesses have since cosigned a larger checkpoint that this
copy no longer holds (ask them: their witness databases keep the latest).

So a log with records and no witnessed checkpoint is a finding: its force alone could have written
the history it shows. Records after the last witnessed checkpoint, whether under later checkpoints
(a gateway signs one as it stops, which no witness sees until it starts again) or under none, are
a note (`_check_log_witnessed`): a finding there would be undone by deleting those checkpoints. A
bundle's records are proven in its one checkpoint, which must be witnessed (`_check_bundle_witnessed`),
so `export_bundle` proves them in the latest checkpoint another force's witness cosigned.

Findings are listed in this order: records (by index), keys, checkpoints (by size), cosignatures,
witnessing; the first one names the first bad record or checkpoint. Consistency between consecutive
checkpoints is checked with proofs from the recomputed tree (a cross-check: two checkpoints that
both match the recomputed tree are consistent by construction).

Owns: what each tool computes and returns (values and reports). Does not own: argument parsing
and printing (`gateway.audit.cli`), the database layout (`gateway.audit.store`).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit.merkle import MerkleTree, ProofError, leaf_hash, verify_consistency, verify_inclusion
from gateway.audit.note import (
    Checkpoint,
    CosignatureVerifier,
    Note,
    NoteError,
    NoteSignature,
    NoteVerifier,
    parse_note,
    parse_signature_lines,
    verify_note,
)
from gateway.audit.record import ACCESS_PURPOSES, STATUS_NAMES, AuditRecord, RecordError, format_time
from gateway.audit.store import (
    AppendResult,
    AuditConfig,
    AuditLog,
    LogReader,
    RecordFinding,
    StoredCheckpoint,
    StoredCosignature,
    embedded_index,
    first_divergence,
    live_path,
    scan_records,
)
from gateway.clock import Clock
from gateway.directory import load_directory
from gateway.errors import ConfigError, GatewayError, Unauthenticated
from gateway.identity import TrustStore, Usage, load_certificate, load_trust_store, parse_spiffe_id

__all__ = [
    "BUNDLE_FORMAT",
    "COMMAND_LINE",
    "DEFAULT_QUORUM",
    "AccessRequest",
    "Finding",
    "QueryFilter",
    "TrustAnchors",
    "VerifyReport",
    "export_bundle",
    "load_anchors",
    "open_for_audit",
    "parse_when",
    "prove",
    "query",
    "read_bundle",
    "record_access",
    "stats",
    "verify_bundle",
    "verify_log",
    "write_bundle",
]

#: Where a `ConfigError` about an option says the mistake is.
COMMAND_LINE = "command line"

#: How many other forces' witnesses must cosign a checkpoint, unless the auditor says (``--quorum``).
#: One: any other force's cosignature shows that the log's own force did not write its history alone.
#: The gateways' own ``[audit] witness_quorum`` may ask for more; an auditor who knows it can too.
DEFAULT_QUORUM = 1

#: The largest quorum, as for the gateways' ``[audit] witness_quorum``.
_MAX_QUORUM = 64

#: The ``format`` field of every exported bundle. A bundle of this format states the run of
#: records it holds (``start_index``, ``end_index``), holds every one of them, and carries the
#: records just outside the run (``before``, ``after``) to show that the run is the whole range.
BUNDLE_FORMAT = "psn-gateway-audit-bundle/2"

#: The earlier format: records chosen by time alone, the run not stated. Still verified: its
#: records must be contiguous, and the report says what cannot be checked (`verify_bundle`).
_BUNDLE_FORMAT_1 = "psn-gateway-audit-bundle/1"

_TIME_KEY = b'"time":"'
_TIME_LEN = len("2026-01-01T00:00:00.000000Z")


def parse_when(text: str, what: str = "time") -> float:
    """Parse a time given on the command line: ``YYYY-MM-DD`` (UTC midnight) or ISO 8601 with a zone."""
    try:
        if len(text) == 10:
            return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError as exc:
        raise ConfigError(
            f"{text!r} is not a date (YYYY-MM-DD) or an ISO 8601 time", file=COMMAND_LINE, field=f"--{what}"
        ) from exc
    if parsed.tzinfo is None:
        raise ConfigError(f"{text!r} has no time zone: add Z for UTC", file=COMMAND_LINE, field=f"--{what}")
    return parsed.timestamp()


def _record_time(data: bytes) -> str:
    """The ``time`` field of canonical record bytes, found without decoding (see `embedded_index`)."""
    at = data.find(_TIME_KEY)
    if at < 0:
        return ""
    start = at + len(_TIME_KEY)
    return data[start : start + _TIME_LEN].decode("ascii", "replace")


def _in_range(stamp: str, since: str | None, until: str | None) -> bool:
    # Record times are fixed-width UTC, so string order is time order.
    return (since is None or stamp >= since) and (until is None or stamp < until)


def _is_before(stamp: str, since: str | None) -> bool:
    """Whether a record time is before a range that starts at `since` (never, if it has no start)."""
    return since is not None and stamp < since


def _is_after(stamp: str, until: str | None) -> bool:
    """Whether a record time is at or after the end `until` of a range (never, if it has no end)."""
    return until is not None and stamp >= until


def _decode(reader: LogReader, index: int, data: bytes) -> AuditRecord:
    """Decode record `index` read from `reader`; a `ConfigError` naming the log file if it is not a record."""
    try:
        return AuditRecord.decode(data)
    except RecordError as exc:
        raise ConfigError(
            f"record {index} is not a valid record ({exc.message}): run `psngw audit verify`", file=reader.path
        ) from exc


# -- access to a live log -------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessRequest:
    """Who reads a live log, for which s62(4) purpose (a key of ACCESS_PURPOSES), with which command."""

    accessor: str
    purpose: str
    command: str

    def __post_init__(self) -> None:
        if not self.accessor.strip():
            raise ConfigError("name the auditor (--auditor ID)", file=COMMAND_LINE, field="--auditor")
        if self.purpose not in ACCESS_PURPOSES:
            raise ConfigError(
                f"{self.purpose!r} is not one of {', '.join(ACCESS_PURPOSES)}", file=COMMAND_LINE, field="--purpose"
            )


def record_access(db: Path, origin: str, access: AccessRequest, clock: Clock) -> AppendResult:
    """Append an audit-access record to the live log at `db` and wait until it is durable."""
    domain = origin.removesuffix("/audit")
    record = AuditRecord(
        event="audit-access",
        time=format_time(clock.now()),
        gateway=f"spiffe://{domain}/gateway",
        force=domain.split(".", 1)[0],
        request_id=os.urandom(16).hex(),
        accessor=access.accessor,
        access_purpose=access.purpose,
        access_command=access.command,
    )
    log = AuditLog(AuditConfig(db=db), origin=origin, signer=None, clock=clock, checkpointer=False)
    log.open()
    try:
        return log.append_blocking(record)
    finally:
        log.close_blocking()


def open_for_audit(
    db: Path | str, access: AccessRequest | None, *, clock: Clock
) -> tuple[LogReader, AppendResult | None]:
    """Open a log for reading; if it is a gateway's live log, first record the access durably.

    Returns the reader and the access record's result (None for an offline copy). A live log read
    without `access` is refused with a `ConfigError`.
    """
    db = Path(db)
    reader = LogReader.open(db)
    try:
        # Under whichever name the log is reached (a symbolic link, ``..``), the lock is the gateway's.
        live = live_path(db)
        if live is None:
            return reader, None
        if access is None:
            raise ConfigError(
                "this is a gateway's live log: reading it is recorded, so say who you are and why"
                f" (--auditor ID --purpose {{{','.join(ACCESS_PURPOSES)}}}), or work on a copy",
                file=db,
            )
        result = record_access(live, reader.origin, access, clock)
    except BaseException:
        reader.close()
        raise
    return reader, result


# -- query ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryFilter:
    """Which records to show; every filter given must match. `since` is inclusive, `until` exclusive."""

    officer: str | None = None
    unit: str | None = None
    origin_force: str | None = None
    application: str | None = None
    method: str | None = None
    #: "allow", "deny" or "none" (no decision reached)
    decision: str | None = None
    status: str | None = None
    since: float | None = None
    until: float | None = None
    request_id: str | None = None
    event: str | None = None

    def __post_init__(self) -> None:
        if self.decision is not None and self.decision not in ("allow", "deny", "none"):
            raise ConfigError(f"{self.decision!r} is not allow, deny or none", file=COMMAND_LINE, field="--decision")
        if self.status is not None and self.status.upper() not in STATUS_NAMES:
            raise ConfigError(f"{self.status!r} is not a gRPC status name", file=COMMAND_LINE, field="--status")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ConfigError("--until must be after --since", file=COMMAND_LINE, field="--until")

    def _needles(self) -> list[bytes]:
        """Byte strings every matching record's canonical bytes must contain (a cheap pre-filter)."""
        pairs = {
            "officer_id": self.officer,
            "origin_force": self.origin_force,
            "application": self.application,
            "method": self.method,
            "request_id": self.request_id,
            "event": self.event,
            "status": self.status.upper() if self.status else None,
        }
        out = [_field_bytes(k, v) for k, v in pairs.items() if v is not None]
        if self.unit is not None:
            out.append(json.dumps(self.unit, ensure_ascii=True).encode("ascii"))
        return out

    def matches(self, r: AuditRecord) -> bool:
        """Whether record `r` passes every filter."""
        checks: list[tuple[str | None, Any]] = [
            (self.officer, r.officer_id),
            (self.origin_force, r.origin_force),
            (self.application, r.application),
            (self.method, r.method),
            (self.request_id, r.request_id),
            (self.event, r.event),
            (self.status.upper() if self.status else None, r.status),
        ]
        if any(want is not None and want != got for want, got in checks):
            return False
        if self.unit is not None and self.unit not in r.units:
            return False
        if self.decision is not None:
            got = {True: "allow", False: "deny", None: "none"}[r.decision_allowed]
            if got != self.decision:
                return False
        return _in_range(r.time, _stamp(self.since), _stamp(self.until))


def _field_bytes(key: str, value: str) -> bytes:
    return f'"{key}":'.encode("ascii") + json.dumps(value, ensure_ascii=True).encode("ascii")


def _stamp(when: float | None) -> str | None:
    return None if when is None else format_time(when)


def query(reader: LogReader, flt: QueryFilter, *, limit: int | None = None) -> list[AuditRecord]:
    """The records that match `flt`, in log order (each with its index), at most `limit`."""
    needles = flt._needles()
    since, until = _stamp(flt.since), _stamp(flt.until)
    out: list[AuditRecord] = []
    for index, _, data in reader.rows():
        if not all(n in data for n in needles):
            continue
        if (since or until) and not _in_range(_record_time(data), since, until):
            continue
        record = _decode(reader, index, data)
        if flt.matches(record):
            out.append(record)
            if limit is not None and len(out) >= limit:
                break
    return out


# -- keys the auditor trusts ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrustAnchors:
    """The keys a verification trusts, and how they were chosen (see the module docstring)."""

    log_verifiers: tuple[NoteVerifier, ...] = ()
    witness_verifiers: tuple[CosignatureVerifier, ...] = ()
    trust_store: TrustStore | None = None
    #: the time at which certificates are checked
    at: float = 0.0
    #: trust the keys the log or bundle carries (unsafe: internal consistency only)
    stored_keys: bool = False
    #: cosignatures by the witnesses of this many other forces make a checkpoint witnessed
    quorum: int = DEFAULT_QUORUM

    def __post_init__(self) -> None:
        if isinstance(self.quorum, bool) or not isinstance(self.quorum, int) or not 1 <= self.quorum <= _MAX_QUORUM:
            raise ConfigError(
                f"must be a number of other forces in 1..{_MAX_QUORUM}, got {self.quorum!r}: a log cannot witness"
                " itself, so at least one other force must",
                file=COMMAND_LINE,
                field="--quorum",
            )

    def describe(self) -> str:
        """One line: where trust comes from."""
        parts = []
        if self.trust_store is not None:
            parts.append(f"certificates checked against the directory's CAs at {format_time(self.at)}")
        if self.log_verifiers or self.witness_verifiers:
            parts.append(f"{len(self.log_verifiers) + len(self.witness_verifiers)} key(s) given")
        if self.stored_keys:
            parts.append("UNSAFE: the keys stored with the log are trusted as they are")
        return "; ".join(parts)


def load_anchors(
    *,
    directory: Path | None = None,
    log_certs: Sequence[Path] = (),
    vkeys: Sequence[str] = (),
    unsafe_stored_keys: bool = False,
    quorum: int = DEFAULT_QUORUM,
    at: float,
) -> TrustAnchors:
    """Build the trust anchors from the command line options; `ConfigError` on bad input or none.

    With a directory, a `quorum` larger than the number of other forces it names is refused: no
    checkpoint could ever be witnessed.
    """
    if directory is None and not log_certs and not vkeys and not unsafe_stored_keys:
        raise ConfigError(
            "say which keys to trust: --directory FILE, --log-cert PEM or --vkey VKEY"
            " (or --unsafe-stored-keys to check only the log's internal consistency)",
            file=COMMAND_LINE,
        )
    logs: list[NoteVerifier] = []
    witnesses: list[CosignatureVerifier] = []
    for path in log_certs:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror or exc}", file=path) from exc
        try:
            domain, key = _log_certificate_key(pem)
        except GatewayError as exc:
            raise ConfigError(f"not a log certificate: {exc.reason}", file=path) from exc
        logs.append(NoteVerifier(f"{domain}/audit", key))
        witnesses.append(CosignatureVerifier(f"{domain}/witness", key))
    for vkey in vkeys:
        try:
            logs.append(NoteVerifier.from_vkey(vkey))
        except NoteError:
            try:
                witnesses.append(CosignatureVerifier.from_vkey(vkey))
            except NoteError as exc:
                raise ConfigError(
                    f"{vkey!r} is not a note or cosignature verifier key", file=COMMAND_LINE, field="--vkey"
                ) from exc
    store = None
    if directory is not None:
        store = load_trust_store(load_directory(directory), require_crl=False)
        others = len(store.forces) - 1
        if quorum > others:
            raise ConfigError(
                f"the network has {others} force(s) besides any log's own: a quorum of {quorum} can never be met",
                file=COMMAND_LINE,
                field="--quorum",
            )
    return TrustAnchors(tuple(logs), tuple(witnesses), store, at, unsafe_stored_keys, quorum)


def _log_certificate_key(pem: bytes) -> tuple[str, Ed25519PublicKey]:
    """The trust domain and Ed25519 key of a log certificate (``spiffe://<domain>/log``), unverified.

    `Unauthenticated` if it is not a log certificate; the caller says which file or key it came from.
    """
    cert = load_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise Unauthenticated("the certificate has no SPIFFE ID") from exc
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise Unauthenticated("the certificate must carry exactly one SPIFFE ID")
    spiffe = parse_spiffe_id(uris[0])
    if spiffe.path != "/log":
        raise Unauthenticated(f"{spiffe} is not a log identity (spiffe://<force>.<network>/log)")
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise Unauthenticated("a log key is Ed25519")
    return spiffe.trust_domain, key


@dataclass(frozen=True)
class Finding:
    """One thing wrong: what (``record``, ``key``, ``checkpoint``, ``cosignature``, ``bundle``), where, and why."""

    kind: str
    position: int
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class _Keys:
    """The keys a verification uses: trusted ones, and the witness keys that do not count.

    `witnesses` are the trusted keys of other forces' witnesses; `own_witnesses` the witness keys
    (given or carried) of the log's own force, or that are its log keys, which never count (a log
    cannot witness itself); `untrusted_witnesses` the other carried witness keys.
    """

    logs: list[NoteVerifier] = field(default_factory=list)
    witnesses: list[CosignatureVerifier] = field(default_factory=list)
    untrusted_witnesses: list[CosignatureVerifier] = field(default_factory=list)
    own_witnesses: list[CosignatureVerifier] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def _domain(name: str) -> str:
    """The trust domain (the force) of a log origin or a witness: ``<force>.<network>/audit`` or ``/witness``."""
    return name.rsplit("/", 1)[0]


def _is_own_witness(origin: str, witness: CosignatureVerifier, own_keys: Sequence[Ed25519PublicKey]) -> bool:
    """Whether `witness` is the log's own force (by its name) or one of the log's own keys."""
    return _domain(witness.name) == _domain(origin) or any(witness.public_key == k for k in own_keys)


def _resolve_keys(
    origin: str,
    log_keys: Iterable[tuple[str, bytes | None]],
    witness_keys: Iterable[tuple[str, str, bytes | None]],
    anchors: TrustAnchors,
) -> _Keys:
    """Decide which carried keys are trusted under `anchors`; a carried key that fails its check is a finding.

    No witness key of the log's own force, or that is one of its log keys (given, or carried
    whether trusted or not), is a witness of this log (`_Keys.own_witnesses`): its certificate, if
    it has one, is not even checked.
    """
    keys = _Keys(list(anchors.log_verifiers))
    own_keys = [v.public_key for v in anchors.log_verifiers if v.name == origin]
    for vkey, cert in log_keys:
        try:
            verifier = NoteVerifier.from_vkey(vkey)
        except NoteError as exc:
            keys.findings.append(Finding("key", 0, f"log key {vkey!r} is malformed: {exc.reason}"))
            continue
        if verifier.name != origin:
            keys.findings.append(Finding("key", 0, f"log key {vkey!r} is not named after the log ({origin})"))
            continue
        own_keys.append(verifier.public_key)
        if _trusted(verifier.public_key, verifier.name, cert, anchors, keys, role="log"):
            keys.logs.append(verifier)
    for given in anchors.witness_verifiers:
        (keys.own_witnesses if _is_own_witness(origin, given, own_keys) else keys.witnesses).append(given)
    for name, vkey, cert in witness_keys:
        try:
            witness = CosignatureVerifier.from_vkey(vkey)
        except NoteError as exc:
            keys.findings.append(Finding("key", 0, f"witness key {vkey!r} is malformed: {exc.reason}"))
            continue
        if witness.name != name:
            keys.findings.append(Finding("key", 0, f"witness key {vkey!r} is stored under another name, {name!r}"))
            continue
        if _is_own_witness(origin, witness, own_keys):
            keys.own_witnesses.append(witness)
        elif _trusted(witness.public_key, name, cert, anchors, keys, role="witness"):
            keys.witnesses.append(witness)
        else:
            keys.untrusted_witnesses.append(witness)
    return keys


def _trusted(
    key: Ed25519PublicKey, name: str, cert: bytes | None, anchors: TrustAnchors, keys: _Keys, *, role: str
) -> bool:
    """Whether a carried key is trusted: stored keys are (unsafe mode), or its certificate checks out.

    The certificate must be for ``spiffe://<the name's domain>/log``, and the directory pins each
    trust domain to its force's CA: so a witness key named after another force than the log's
    (`_resolve_keys` sees to that) is trusted only with a certificate of that other force.
    """
    if anchors.stored_keys:
        return True
    if anchors.trust_store is None or cert is None:
        return False
    domain = name.rsplit("/", 1)[0]
    try:
        identity = anchors.trust_store.verify(cert, Usage.LOG, anchors.at)
        if identity.spiffe_id != f"spiffe://{domain}/log":
            raise Unauthenticated(f"the certificate is for {identity.spiffe_id}, not spiffe://{domain}/log")
        if load_certificate(cert).public_key() != key:
            raise Unauthenticated("the certificate is for another key")
    except GatewayError as exc:
        keys.findings.append(Finding("key", 0, f"{role} key {name}: its certificate is not trusted: {exc.reason}"))
        return False
    return True


# -- verify ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify_log` or `verify_bundle`: figures, findings (empty if all is well) and notes."""

    origin: str
    records: int
    checkpoints: int
    last_checkpoint: int
    #: cosignatures verified with a trusted witness key
    cosignatures: int
    #: cosignatures that verify with a key the log carries but the auditor did not trust
    untrusted_cosignatures: int
    #: the other forces' witnesses whose cosignatures with trusted keys count on the last checkpoint
    witnesses: tuple[str, ...]
    findings: tuple[Finding, ...]
    notes: tuple[str, ...]
    seconds: float
    #: the other forces whose witnesses must cosign a checkpoint for it to count as witnessed
    quorum: int = DEFAULT_QUORUM
    #: the size of the last witnessed checkpoint (None: none is)
    witnessed: int | None = None

    @property
    def ok(self) -> bool:
        """True when there is no finding."""
        return not self.findings

    @property
    def first(self) -> Finding | None:
        """The first bad record or checkpoint."""
        return self.findings[0] if self.findings else None

    @property
    def records_per_second(self) -> float:
        """Verification speed."""
        return self.records / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return {
            "ok": self.ok,
            "origin": self.origin,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "last_checkpoint": self.last_checkpoint,
            "cosignatures": self.cosignatures,
            "untrusted_cosignatures": self.untrusted_cosignatures,
            "witnesses": list(self.witnesses),
            "quorum": self.quorum,
            "witnessed": self.witnessed,
            "first": self.first.message if self.first else None,
            "findings": [{"kind": f.kind, "position": f.position, "message": f.message} for f in self.findings],
            "notes": list(self.notes),
            "seconds": self.seconds,
        }


@dataclass
class _CheckpointCheck:
    """What `_check_checkpoint_note` learnt: the parsed checkpoint, if signed by a trusted key."""

    checkpoint: Checkpoint | None
    note: Note | None
    finding: Finding | None


def _check_checkpoint_note(origin: str, size: int, root: bytes, text: bytes, keys: _Keys) -> _CheckpointCheck:
    try:
        note = parse_note(text)
        checkpoint = Checkpoint.parse(note.body)
    except NoteError as exc:
        return _CheckpointCheck(None, None, Finding("checkpoint", size, f"checkpoint {size}: malformed: {exc.reason}"))
    if (checkpoint.origin, checkpoint.size, checkpoint.root_hash) != (origin, size, root):
        return _CheckpointCheck(
            None,
            note,
            Finding(
                "checkpoint",
                size,
                f"checkpoint {size}: its signed text (origin {checkpoint.origin}, size {checkpoint.size}) does not"
                " match where it is stored: the checkpoint was replaced",
            ),
        )
    for verifier in keys.logs:
        try:
            verify_note(note, verifier)
        except NoteError:
            continue
        return _CheckpointCheck(checkpoint, note, None)
    return _CheckpointCheck(
        None,
        note,
        Finding("checkpoint", size, f"checkpoint {size}: not validly signed by a trusted key of log {origin}"),
    )


def _check_cosignature(
    body: bytes, sig: NoteSignature, keys: _Keys, size: int, witness: str | None = None
) -> tuple[str, Finding | None]:
    """Verify one cosignature: ("trusted" | "untrusted" | "own" | "bad", finding).

    A valid cosignature by a key of the log's own force is "own", and a finding: honest gateways
    never cosign their own log, so it can only be an attempt to pass the log off as witnessed.
    """
    if witness is not None and sig.name != witness:
        return "bad", Finding(
            "cosignature", size, f"checkpoint {size}: a cosignature stored for {witness} is signed as {sig.name}"
        )
    pools = ((keys.witnesses, "trusted"), (keys.own_witnesses, "own"), (keys.untrusted_witnesses, "untrusted"))
    for pool, verdict in pools:
        for verifier in pool:
            if verifier.matches(sig):
                try:
                    verifier.verify(body, sig)
                except NoteError:
                    return "bad", Finding(
                        "cosignature",
                        size,
                        f"checkpoint {size}: the cosignature by {sig.name} does not verify: forged or altered",
                    )
                if verdict == "own":
                    return verdict, Finding(
                        "cosignature",
                        size,
                        f"checkpoint {size}: the cosignature by {sig.name} is by the log's own force (its name, or"
                        " one of the log's keys): a log cannot witness itself, so it does not count",
                    )
                return verdict, None
    return "bad", Finding(
        "cosignature", size, f"checkpoint {size}: cosignature by {sig.name}: no key for it is known or stored"
    )


@dataclass
class _Cosigned:
    """What the cosignatures of a log or bundle came to: counts, findings, and who cosigned each checkpoint."""

    trusted: int = 0
    untrusted: int = 0
    #: per checkpoint size, the other forces' witnesses whose cosignatures verify with trusted keys
    counted: dict[int, set[str]] = field(default_factory=dict)
    #: per checkpoint size, the cosignatures that verify but do not count, each with why
    uncounted: dict[int, list[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def check(self, body: bytes, sig: NoteSignature, keys: _Keys, size: int, witness: str | None = None) -> None:
        """Check one cosignature on the checkpoint of `size` (`_check_cosignature`) and count it."""
        verdict, finding = _check_cosignature(body, sig, keys, size, witness)
        if finding is not None:
            self.findings.append(finding)
        if verdict == "trusted":
            self.trusted += 1
            self.counted.setdefault(size, set()).add(sig.name)
        elif verdict == "untrusted":
            self.untrusted += 1
            self.uncounted.setdefault(size, []).append(f"{sig.name} (a key not trusted)")
        elif verdict == "own":
            self.uncounted.setdefault(size, []).append(f"{sig.name} (the log's own force)")

    def forces(self, size: int) -> int:
        """How many other forces' witnesses count on the checkpoint of `size`."""
        return len({_domain(name) for name in self.counted.get(size, ())})

    def cosigners(self, size: int) -> str:
        """Who cosigned the checkpoint of `size`, counted or not, for a finding."""
        counted = ", ".join(sorted(self.counted.get(size, ()))) or "none"
        uncounted = self.uncounted.get(size)
        return counted + (f"; not counted: {', '.join(sorted(uncounted))}" if uncounted else "")


def _last_witnessed(cosigned: _Cosigned, signed: Sequence[int], quorum: int) -> int | None:
    """The largest checkpoint validly signed by the log (of `signed`) that `quorum` other forces witnessed."""
    witnessed = [size for size in signed if cosigned.forces(size) >= quorum]
    return max(witnessed) if witnessed else None


def _cosigned_by(size: int, cosigned: _Cosigned, quorum: int) -> str:
    """How far checkpoint `size` is from witnessed, for a finding or note."""
    return (
        f"it needs valid cosignatures, with trusted keys, by the witnesses of at least {quorum} force(s) other than"
        f" the log's own, and has {cosigned.forces(size)} (cosigned by: {cosigned.cosigners(size)})"
    )


def _check_log_witnessed(
    origin: str, latest: int | None, records: int, cosigned: _Cosigned, *, signed: Sequence[int], quorum: int
) -> tuple[int | None, list[Finding], list[str]]:
    """Whether the log's history is witnessed: the last witnessed checkpoint's size, findings and notes.

    A finding when no checkpoint is witnessed (unless the log is empty): then the log's own force
    alone vouches for every record. A note when checkpoints after the last witnessed one are not:
    the records after it are vouched for by the force alone, as are records after the last
    checkpoint, and no more (deleting those checkpoints would leave the same records uncovered).
    A gateway signs a last checkpoint as it stops, which no witness has seen until it starts again.
    """
    last = _last_witnessed(cosigned, signed, quorum)
    if last is None and (records or latest):
        latest_is = f"its latest, checkpoint {latest}: {_cosigned_by(latest, cosigned, quorum)}" if latest else ""
        finding = Finding(
            "witness",
            latest or 0,
            f"no checkpoint of the log is witnessed by another force, so its history (all {records} records) could"
            f" have been rewritten by the force of {origin} itself; {latest_is or 'the log has no checkpoint'}",
        )
        return None, [finding], []
    if last is None or latest is None or latest == last:
        return last, [], []
    note = (
        f"checkpoint {latest}, the latest, is not witnessed ({_cosigned_by(latest, cosigned, quorum)}): records"
        f" {last}..{latest - 1} are vouched for by the force of {origin} alone; witnessed checkpoint {last} vouches"
        f" for records 0..{last - 1}"
    )
    return last, [], [note]


def _check_bundle_witnessed(
    origin: str, size: int, cosigned: _Cosigned, *, signed: bool, quorum: int
) -> tuple[int | None, list[Finding]]:
    """Whether a bundle's checkpoint, the one its records are proven in, is witnessed; a finding if not."""
    if _last_witnessed(cosigned, [size] if signed else [], quorum) == size:
        return size, []
    return None, [
        Finding(
            "witness",
            size,
            f"checkpoint {size}, the bundle's, is not witnessed: {_cosigned_by(size, cosigned, quorum)}: its records"
            f" and their proofs could have been made up by the force of {origin} itself",
        )
    ]


def verify_log(reader: LogReader, anchors: TrustAnchors) -> VerifyReport:
    """Recompute the tree from the stored bytes and check every checkpoint and cosignature against it."""
    started = time.perf_counter()
    with reader.snapshot():
        origin = reader.origin
        hashes, record_findings, _ = scan_records(reader.rows())
        end = reader.end()
        tree = MerkleTree(hashes)
        keys = _resolve_keys(origin, reader.log_keys(), reader.witness_keys(), anchors)
        checkpoints = reader.checkpoints()
        cosignatures = reader.cosignatures()
        quarantined = reader.quarantined()
    findings = [Finding("record", f.index, f.message) for f in record_findings]
    findings += keys.findings
    if not keys.logs:
        findings.append(
            Finding("key", 0, f"no trusted key of log {origin}: nothing can be verified ({anchors.describe()})")
        )
    verified: list[tuple[int, bytes]] = []
    cp_findings: list[Finding] = []
    for cp in checkpoints:
        result = _check_checkpoint_note(origin, cp.size, cp.root, cp.note, keys)
        if result.finding is not None:
            cp_findings.append(result.finding)
            continue
        if result.checkpoint is not None:
            verified.append((cp.size, cp.root))
    cp_findings += _check_against_tree(tree, end, verified, record_findings)
    cosigned = _check_stored_cosignatures(checkpoints, cosignatures, keys)
    latest = checkpoints[-1].size if checkpoints else None
    witnessed, witness_findings, notes = _check_log_witnessed(
        origin, latest, tree.size, cosigned, signed=[size for size, _ in verified], quorum=anchors.quorum
    )
    findings += sorted(cp_findings, key=lambda f: f.position) + cosigned.findings + witness_findings
    last = latest or 0
    if end > last:
        notes.append(
            f"records {last}..{end - 1} are not yet covered by a checkpoint, so not yet witnessed: no other force"
            " has vouched for them"
        )
    if not checkpoints:
        notes.append("the log has no checkpoint")
    if quarantined:
        notes.append(f"{quarantined} row(s) were quarantined at startup as a torn tail (see the quarantine table)")
    return VerifyReport(
        origin=origin,
        records=tree.size,
        checkpoints=len(checkpoints),
        last_checkpoint=last,
        cosignatures=cosigned.trusted,
        untrusted_cosignatures=cosigned.untrusted,
        witnesses=tuple(sorted(cosigned.counted.get(last, ()))),
        findings=tuple(findings),
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
        quorum=anchors.quorum,
        witnessed=witnessed,
    )


def _check_against_tree(
    tree: MerkleTree, end: int, verified: list[tuple[int, bytes]], record_findings: Sequence[RecordFinding]
) -> list[Finding]:
    """Each trusted checkpoint's root against the recomputed tree, and consecutive ones' consistency.

    `tree` is built from the stored rows in index order; `end` is the index after the last stored
    row. They differ when records are missing inside the log (a record finding each): a checkpoint
    beyond `end` then lacks its tail, one up to `end` cannot match its root.
    """
    out: list[Finding] = []
    previous: tuple[int, bytes] | None = None
    explained = bool(record_findings)
    for size, root in verified:
        if size > end:
            out.append(
                Finding(
                    "checkpoint",
                    size,
                    f"checkpoint {size} covers records the log does not hold: records {end}..{size - 1}"
                    " are missing (the tail was truncated)",
                )
            )
            continue
        if size > tree.size or tree.root(size) != root:
            where = first_divergence(tree, [v for v in verified if v[0] <= size])
            span = f"records {where[0]}..{where[1] - 1}" if where else "the records"
            cause = "" if explained else f"; the first altered record is among {span}"
            out.append(
                Finding("checkpoint", size, f"checkpoint {size}: the stored records do not hash to its root{cause}")
            )
            continue
        if previous is not None and previous[0] > 0:
            try:
                proof = tree.consistency_proof(previous[0], size)
                verify_consistency(previous[0], size, proof, previous[1], root)
            except ProofError as exc:
                out.append(
                    Finding(
                        "checkpoint",
                        size,
                        f"checkpoint {size}: not consistent with checkpoint {previous[0]}: {exc.reason}",
                    )
                )
        previous = (size, root)
    return out


def _check_stored_cosignatures(
    checkpoints: Sequence[StoredCheckpoint], cosignatures: Sequence[StoredCosignature], keys: _Keys
) -> _Cosigned:
    """Every stored cosignature, over the checkpoint it is stored for."""
    by_size = {cp.size: cp for cp in checkpoints}
    cosigned = _Cosigned()
    findings = cosigned.findings
    for cosig in cosignatures:
        cp = by_size.get(cosig.size)
        if cp is None:
            findings.append(
                Finding(
                    "cosignature",
                    cosig.size,
                    f"a cosignature by {cosig.witness} is stored for a checkpoint of size {cosig.size} that does not"
                    " exist",
                )
            )
            continue
        try:
            sigs = parse_signature_lines(cosig.line)
            body = parse_note(cp.note).body
        except NoteError as exc:
            findings.append(
                Finding(
                    "cosignature",
                    cp.size,
                    f"checkpoint {cp.size}: cosignature by {cosig.witness} is malformed: {exc.reason}",
                )
            )
            continue
        for sig in sigs:
            cosigned.check(body, sig, keys, cp.size, cosig.witness)
    return cosigned


# -- prove ----------------------------------------------------------------------------------------


def _checked_tree(reader: LogReader, size: int, root: bytes) -> MerkleTree:
    """The tree of the first `size` records, which must be sound and match `root`; else ConfigError."""
    hashes, findings, _ = scan_records(reader.rows(0, size), limit=1)
    if findings:
        raise ConfigError(f"{findings[0].message}: run `psngw audit verify`", file=reader.path)
    tree = MerkleTree(hashes)
    if tree.size != size or tree.root(size) != root:
        raise ConfigError(
            f"the records do not match the checkpoint of size {size}: run `psngw audit verify`", file=reader.path
        )
    return tree


def _anchor_checkpoint(reader: LogReader) -> tuple[StoredCheckpoint, Note]:
    latest = reader.latest_checkpoint()
    if latest is None:
        raise ConfigError("the log has no signed checkpoint yet: nothing can be proven", file=reader.path)
    try:
        return latest, reader.stored_note(latest)
    except NoteError as exc:
        raise ConfigError(
            f"checkpoint {latest.size} is malformed ({exc.reason}): run `psngw audit verify`", file=reader.path
        ) from exc


def _export_checkpoint(reader: LogReader) -> tuple[StoredCheckpoint, Note, str | None]:
    """The checkpoint a bundle is proven in: the latest one another force's witness cosigned, else the latest.

    A gateway signs a last checkpoint as it stops, and no witness sees it until the gateway starts
    again: a bundle proven in it would not verify as witnessed (`verify_bundle`). Whether the
    cosignatures are good is for `verify_bundle` to say, with the keys the auditor trusts; this
    only looks at whose names are stored. Returns the checkpoint, its note, and a note for the
    operator when it is not the latest.
    """
    latest, note = _anchor_checkpoint(reader)
    own = _domain(reader.origin)
    cosigned = [c.size for c in reader.cosignatures() if _domain(c.witness) != own and c.size <= latest.size]
    if not cosigned or max(cosigned) == latest.size:
        return latest, note, None
    chosen = next(cp for cp in reader.checkpoints() if cp.size == max(cosigned))
    try:
        chosen_note = reader.stored_note(chosen)
    except NoteError as exc:
        raise ConfigError(
            f"checkpoint {chosen.size} is malformed ({exc.reason}): run `psngw audit verify`", file=reader.path
        ) from exc
    return (
        chosen,
        chosen_note,
        f"the latest checkpoint (size {latest.size}) is not cosigned by another force's witness yet: the bundle is"
        f" proven in checkpoint {chosen.size}, the latest that is",
    )


def prove(reader: LogReader, request_id: str) -> dict[str, Any]:
    """Inclusion proofs of the records of `request_id` in the latest signed checkpoint.

    Returns JSON-ready values: the origin, tree size, root (hex) and checkpoint note text (with its
    cosignatures), and per record its index, leaf hash, exact bytes (``leaf_data``, ASCII), decoded
    fields and inclusion proof (hex, sibling first). Any RFC 6962 verifier can check each one:
    SHA-256(0x00 || leaf_data) is the leaf hash, and the proof leads from it to the root.
    """
    if not request_id:
        raise ConfigError("give a request id", file=COMMAND_LINE, field="--request-id")
    with reader.snapshot():
        latest, note = _anchor_checkpoint(reader)
        matches = [
            (i, d) for i, d in reader.find_bytes(_field_bytes("request_id", request_id)) if embedded_index(d) == i
        ]
        if not matches:
            raise ConfigError(f"no record with request id {request_id!r}", file=reader.path)
        covered = [(i, d) for i, d in matches if i < latest.size]
        if not covered:
            raise ConfigError(
                f"the records of request {request_id!r} ({', '.join(str(i) for i, _ in matches)}) are not yet"
                f" covered by a signed checkpoint (last at size {latest.size}): try again after the next one",
                file=reader.path,
            )
        tree = _checked_tree(reader, latest.size, latest.root)
    proofs = []
    for index, data in covered:
        record = _decode(reader, index, data)
        if record.request_id != request_id:
            continue
        h = leaf_hash(data)
        path = tree.inclusion_proof(index, latest.size)
        verify_inclusion(h, index, latest.size, path, latest.root)  # self-check before showing it
        proofs.append(
            {
                "index": index,
                "leaf_hash": h.hex(),
                "leaf_data": data.decode("ascii"),
                "record": record.to_dict(),
                "inclusion_proof": [p.hex() for p in path],
            }
        )
    return {
        "request_id": request_id,
        "origin": reader.origin,
        "tree_size": latest.size,
        "root": latest.root.hex(),
        "checkpoint": note.text().decode("utf-8"),
        "proofs": proofs,
        "pending": [i for i, _ in matches if i >= latest.size],
    }


# -- export and verify-bundle ---------------------------------------------------------------------


def export_bundle(
    reader: LogReader, since: float | None, until: float | None, *, now: float
) -> tuple[dict[str, Any], list[str]]:
    """A self-contained bundle of the records in [since, until) with proofs against the latest checkpoint.

    The bundle holds a contiguous run of the log, records ``start_index`` to ``end_index - 1``
    (stated in it): from the first record in the time range to the last one, with every record
    between them, even one whose time is just outside the range (records are numbered in the
    order they are committed, and a call's record can be committed just after a later call's).
    So `verify_bundle` can tell that no record of the run was taken out.

    It also carries the records just outside the run, ``before`` (``start_index - 1``) and
    ``after`` (``end_index``), each with its proof, or null at the start of the log and at the
    checkpoint's end: ``before`` made before the range, ``after`` at or after its end. So
    `verify_bundle` can tell that no record was taken off either end of the run. Where the record
    next to the first or last one in the range is on the wrong side (a record made after the range
    committed before the first one in it, or one made before it committed after the last), the run
    takes it in and goes on to the next. No record in the range: an empty run where the log passes
    from a record made before the range to one made after it (`_run_of`).

    The checkpoint is the latest one that another force's witness cosigned (`_export_checkpoint`),
    so that the bundle can verify as witnessed; if none is, the latest.

    Returns the bundle (JSON-ready) and notes for the operator (records left out because no
    checkpoint covers them yet, records included from just outside the time range, an empty run).
    """
    lo, hi = _stamp(since), _stamp(until)
    notes: list[str] = []
    with reader.snapshot():
        latest, note, older = _export_checkpoint(reader)
        if older is not None:
            notes.append(older)
        tree = _checked_tree(reader, latest.size, latest.root)  # so records 0..size-1 are all there
        stamps = ((index, _record_time(data)) for index, _, data in reader.rows(0, latest.size))
        start, end = _run_of(stamps, lo, hi, latest.size)
        records = []
        outside = 0
        for index, _, data in reader.rows(start, end):
            if not _in_range(_record_time(data), lo, hi):
                outside += 1
            records.append(_bundle_entry(reader, tree, latest.size, index, data))
        before, after = (_bundle_neighbour(reader, tree, latest.size, i) for i in (start - 1, end))
        later = sum(1 for _, _, d in reader.rows(latest.size) if _in_range(_record_time(d), lo, hi))
        bundle = {
            "format": BUNDLE_FORMAT,
            "origin": reader.origin,
            "exported_at": format_time(now),
            "since": lo,
            "until": hi,
            "start_index": start,
            "end_index": end,
            "before": before,
            "after": after,
            "checkpoint": {"size": latest.size, "root": latest.root.hex(), "note": note.text().decode("utf-8")},
            "log_keys": [{"vkey": v, "certificate": _pem(c)} for v, c in reader.log_keys()],
            "witness_keys": [{"name": n, "vkey": v, "certificate": _pem(c)} for n, v, c in reader.witness_keys()],
            "records": records,
        }
    if outside:
        notes.append(
            f"{outside} record(s) whose time is outside the range are included: committed out of time order, they"
            " lie inside the run, and a bundle holds every record of its run"
        )
    if start == end:
        notes.append(
            f"no record the checkpoint covers is in the range: the bundle holds none, and shows where the range"
            f" falls in the log ({_empty_run(start, latest.size)})"
        )
    if later:
        notes.append(
            f"{later} record(s) in the range come after the checkpoint the bundle is proven in (size {latest.size})"
            " and are not in the bundle: export again once a later checkpoint is cosigned"
        )
    return bundle, notes


def _run_of(stamps: Iterable[tuple[int, str]], since: str | None, until: str | None, size: int) -> tuple[int, int]:
    """The run [start, end) of a bundle for [since, until), from each record's (index, time), in index order.

    From the first record in the range to the last; then, at either end, out over any records on the
    wrong side of it, so that record ``start - 1`` (if any) is before the range and record ``end``
    (if any) at or after its end. With no record in the range, the empty run at the first record
    made at or after its end (``size`` if none): every record before it was made before the range.
    """
    last_before = -1  # the last record before the range, so far
    first_in: int | None = None
    next_after: int | None = None  # the first record after the range since the last one in it
    start = 0
    for index, stamp in stamps:
        before, after = _is_before(stamp, since), _is_after(stamp, until)
        if not before and not after:
            if first_in is None:
                first_in, start = index, last_before + 1
            next_after = None
            continue
        if before and first_in is None:
            last_before = index
        if after and next_after is None:
            next_after = index
    end = size if next_after is None else next_after
    return (end, end) if first_in is None else (start, end)


def _empty_run(at: int, size: int) -> str:
    """Where an empty run at `at` shows that a range falls, for a note."""
    if size == 0:
        return "its checkpoint covers no record"
    if at == 0:
        return "record 0, the first of the log, was made after the range"
    if at == size:
        return f"record {at - 1}, the last its checkpoint covers, was made before the range"
    return f"record {at - 1}, made before the range, is followed by record {at}, made after it"


def _bundle_entry(reader: LogReader, tree: MerkleTree, size: int, index: int, data: bytes) -> dict[str, Any]:
    """Record `index` as a bundle holds it: its bytes, leaf hash and inclusion proof in the tree of `size`."""
    _decode(reader, index, data)
    return {
        "index": index,
        "leaf_hash": tree.leaf(index).hex(),
        "leaf_data": data.decode("ascii"),
        "inclusion_proof": [p.hex() for p in tree.inclusion_proof(index, size)],
    }


def _bundle_neighbour(reader: LogReader, tree: MerkleTree, size: int, index: int) -> dict[str, Any] | None:
    """Record `index` as a bundle holds it, or None if the checkpoint of `size` does not cover it."""
    data = reader.record(index) if 0 <= index < size else None
    return None if data is None else _bundle_entry(reader, tree, size, index, data)


def _pem(cert: bytes | None) -> str | None:
    return None if cert is None else cert.decode("ascii")


def write_bundle(path: Path, bundle: Mapping[str, Any]) -> None:
    """Write a bundle to a new file, mode 0600 (it holds personal data); never overwrite."""
    data = json.dumps(bundle, indent=1, sort_keys=True, ensure_ascii=True).encode("ascii") + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError("already exists: choose another name (a bundle is never overwritten)", file=path) from exc
    except OSError as exc:
        raise ConfigError(f"cannot create: {exc.strerror or exc}", file=path) from exc
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def read_bundle(path: Path) -> dict[str, Any]:
    """Read and structurally check a bundle file; `ConfigError` if it is not one."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=path) from exc
    try:
        bundle = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"not a bundle (not JSON): {exc}", file=path) from exc
    if not isinstance(bundle, dict) or bundle.get("format") not in (BUNDLE_FORMAT, _BUNDLE_FORMAT_1):
        raise ConfigError(f"not a bundle of format {BUNDLE_FORMAT} (or {_BUNDLE_FORMAT_1})", file=path)
    try:
        _check_bundle_shape(bundle)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed bundle: {exc!r}", file=path) from exc
    return bundle


def _check_bundle_shape(bundle: dict[str, Any]) -> None:
    def need(obj: Any, key: str, kind: type | tuple[type, ...]) -> Any:
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"{key} has the wrong type")
        return value

    need(bundle, "origin", str)
    cp = need(bundle, "checkpoint", dict)
    need(cp, "size", int)
    need(cp, "root", str)
    need(cp, "note", str)
    for key in need(bundle, "log_keys", list):
        need(key, "vkey", str)
        if key.get("certificate") is not None:
            need(key, "certificate", str)
    for key in need(bundle, "witness_keys", list):
        need(key, "name", str)
        need(key, "vkey", str)
        if key.get("certificate") is not None:
            need(key, "certificate", str)

    def need_record(rec: Any) -> None:
        need(rec, "index", int)
        need(rec, "leaf_hash", str)
        need(rec, "leaf_data", str)
        for element in need(rec, "inclusion_proof", list):
            if not isinstance(element, str):
                raise TypeError("inclusion_proof holds non-strings")

    for rec in need(bundle, "records", list):
        need_record(rec)
    for key in ("since", "until"):
        if bundle.get(key) is not None:
            need(bundle, key, str)
    if bundle["format"] == BUNDLE_FORMAT:
        need(bundle, "start_index", int)
        need(bundle, "end_index", int)
        # A neighbour left out (absent or null) is a finding where one must be, not a malformed bundle.
        for key in ("before", "after"):
            if bundle.get(key) is not None:
                need_record(need(bundle, key, dict))


def _unhex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise ProofError(f"{text[:16]!r}... is not hex") from exc


def verify_bundle(bundle: Mapping[str, Any], anchors: TrustAnchors) -> VerifyReport:
    """Check a bundle (from `read_bundle`): the checkpoint's signature and cosignatures, and its records.

    The checkpoint must be witnessed (`_check_bundle_witnessed`): else the force alone could have made
    the bundle, its records and their proofs. The records must be the run the bundle states, each
    once and in order (`_check_bundle_records`), each with a good inclusion proof, and the records
    just outside the run must be there, with good proofs, made before the range and at or after its
    end (`_check_bundle_edges`). A bundle of the earlier format 1 states no run: its records must be
    contiguous, and a note says that a record missing at either end cannot be detected.
    """
    started = time.perf_counter()
    origin = bundle["origin"]
    cp = bundle["checkpoint"]
    size = cp["size"]
    findings: list[Finding] = []
    keys = _resolve_keys(
        origin,
        [(k["vkey"], _cert_bytes(k.get("certificate"))) for k in bundle["log_keys"]],
        [(k["name"], k["vkey"], _cert_bytes(k.get("certificate"))) for k in bundle["witness_keys"]],
        anchors,
    )
    findings += keys.findings
    if not keys.logs:
        findings.append(
            Finding("key", 0, f"no trusted key of log {origin}: nothing can be verified ({anchors.describe()})")
        )
    try:
        root = _unhex(cp["root"])
    except ProofError as exc:
        root = b""
        findings.append(Finding("bundle", size, f"checkpoint root: {exc.reason}"))
    result = _check_checkpoint_note(origin, size, root, cp["note"].encode("utf-8"), keys)
    if result.finding is not None:
        findings.append(result.finding)
    cosigned = _Cosigned()
    if result.note is not None:
        for sig in result.note.signatures:
            if any(v.matches(sig) for v in keys.logs) or sig.name == origin:
                continue
            cosigned.check(result.note.body, sig, keys, size)
    findings += cosigned.findings
    record_findings, notes = _check_bundle_records(bundle, size, root)
    findings += record_findings
    witnessed, witness_findings = _check_bundle_witnessed(
        origin, size, cosigned, signed=result.checkpoint is not None, quorum=anchors.quorum
    )
    findings += witness_findings
    return VerifyReport(
        origin=origin,
        records=len(bundle["records"]),
        checkpoints=1,
        last_checkpoint=size,
        cosignatures=cosigned.trusted,
        untrusted_cosignatures=cosigned.untrusted,
        witnesses=tuple(sorted(cosigned.counted.get(size, ()))),
        findings=tuple(findings),
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
        quorum=anchors.quorum,
        witnessed=witnessed,
    )


def _cert_bytes(text: str | None) -> bytes | None:
    return None if text is None else text.encode("ascii", "replace")


def _check_bundle_records(bundle: Mapping[str, Any], size: int, root: bytes) -> tuple[list[Finding], list[str]]:
    """Every record of a bundle, and that they are the run it holds; findings (by position) and notes.

    Within one position, what is wrong with a record's bytes comes before where it stands.
    """
    since, until = bundle.get("since"), bundle.get("until")
    start, end, stated = _bundle_run(bundle)
    findings: list[Finding] = []
    notes: list[str] = []
    for rec in bundle["records"]:
        index = rec["index"]
        problems, record = _check_bundle_leaf(rec, index, size, root)
        if record is not None and not _in_range(record.time, since, until):
            edge = _edge_time(record.time, index, start, end, since=since, until=until, stated=stated)
            if edge is not None:
                problems.append(edge)
            else:
                notes.append(
                    f"record {index}: its time {record.time} is outside the bundle's range, but it lies inside the"
                    " run (committed out of time order): it is there so that the bundle holds every record of its run"
                )
        findings += [Finding("record", index, f"record {index}: {p}") for p in problems]
    findings += _check_bundle_run(bundle["records"], start, end, stated, size)
    if stated:
        edges = _check_bundle_edges(bundle, start, end, size, root)
        findings += edges
        if start == end and not edges:
            notes.append(
                f"the bundle holds no record: {_empty_run(start, size)}; a record in the range could be elsewhere"
                " in the log only if committed out of time order with these"
            )
    else:
        notes.append(
            f"the bundle, of the earlier format {_BUNDLE_FORMAT_1}, does not state which records it holds: a record"
            f" missing at either end of {_run(start, end)} cannot be detected (export again for a bundle that does)"
        )
    return sorted(findings, key=lambda f: f.position), notes


def _edge_time(
    stamp: str, index: int, start: int, end: int, *, since: str | None, until: str | None, stated: bool
) -> str | None:
    """What is wrong with a record at an end of the run whose time `stamp` is outside the range, if anything.

    A format 2 export may take in, at the start of its run, records made after the range (committed
    before the first one in it), and at the end records made before it: never a first record made
    before the range or a last one made after it, which would be the neighbour instead. A format 1
    export held only records in the range. Inside the run, a record outside the range is a note.
    """
    if not stated:
        return f"its time {stamp} is outside the bundle's range" if index in (start, end - 1) else None
    if index == start and _is_before(stamp, since):
        return f"its time {stamp} is before the bundle's range, yet the run starts with it"
    if index == end - 1 and _is_after(stamp, until):
        return f"its time {stamp} is after the bundle's range, yet the run ends with it"
    return None


def _check_bundle_leaf(
    rec: Mapping[str, Any], index: int, size: int, root: bytes
) -> tuple[list[str], AuditRecord | None]:
    """A record of a bundle as record `index`: its bytes, leaf hash, embedded index and inclusion proof.

    Returns what is wrong with it and the record decoded (None if its bytes are not a record).
    """
    try:
        data = rec["leaf_data"].encode("ascii")
    except UnicodeEncodeError:
        return ["its bytes are not ASCII: changed"], None
    h = leaf_hash(data)
    problems = []
    record = None
    if h.hex() != rec["leaf_hash"]:
        problems.append("its bytes do not match its leaf hash: changed")
    if embedded_index(data) != index:
        problems.append(f"its bytes say it is record {embedded_index(data)}: moved")
    try:
        record = AuditRecord.decode(data)
    except RecordError as exc:
        problems.append(f"not a valid record: {exc.message}")
    try:
        verify_inclusion(h, index, size, [_unhex(p) for p in rec["inclusion_proof"]], root)
    except ProofError as exc:
        problems.append(f"its inclusion proof fails: {exc.reason}")
    return problems, record


def _check_bundle_edges(bundle: Mapping[str, Any], start: int, end: int, size: int, root: bytes) -> list[Finding]:
    """The records just outside a format 2 bundle's run: there (unless the run reaches an end), and outside the range.

    Record ``start - 1`` (``before``) must be made before the range, record ``end`` (``after``) at
    or after its end, each with its bytes and a good proof at that index. The stated run is not
    signed, but these records are: a record in the range taken off an end of the run, with the run
    shortened to match, leaves a neighbour that is in the range, or none, or one at another index.
    """
    if not 0 <= start <= end <= size:
        return []  # not a run of the checkpoint at all: a finding of its own (`_check_bundle_run`)
    return [
        *_check_neighbour(bundle, "before", start - 1, size, root),
        *_check_neighbour(bundle, "after", end, size, root),
    ]


def _check_neighbour(bundle: Mapping[str, Any], key: str, index: int, size: int, root: bytes) -> list[Finding]:
    """The bundle's `key` record (``before`` or ``after``), which must be record `index` if the checkpoint covers it."""
    since, until = bundle.get("since"), bundle.get("until")
    rec = bundle.get(key)
    edge = "start" if key == "before" else "end"
    where = f"record {index}, just {key} the run"
    if not 0 <= index < size:
        if rec is None:
            return []
        bound = "the log starts with the run" if key == "before" else "the run ends at the checkpoint's end"
        return [Finding("record", max(index, 0), f"the bundle holds a record {key} its run, but {bound}")]
    if rec is None:
        return [
            Finding(
                "record",
                index,
                f"{where}, is not in the bundle: without it, a record in the range left out at the {edge} of the run"
                " cannot be ruled out",
            )
        ]
    if rec["index"] != index:
        return [Finding("record", index, f"{where}: the bundle gives record {rec['index']} there instead")]
    problems, record = _check_bundle_leaf(rec, index, size, root)
    if record is not None:
        beyond = _is_before(record.time, since) if key == "before" else _is_after(record.time, until)
        if _in_range(record.time, since, until):
            problems.append(
                f"its time {record.time} is in the bundle's range: a record in the range was left out at the {edge}"
                " of the run"
            )
        elif not beyond:
            # Outside the range on the wrong side: the run was cut at a record committed out of time order.
            side, other = ("after", "before") if key == "before" else ("before", "after")
            problems.append(
                f"its time {record.time} is {side} the bundle's range, not {other} it: records in the range may have"
                f" been left out at the {edge} of the run"
            )
    return [Finding("record", index, f"{where}: {p}") for p in problems]


def _bundle_run(bundle: Mapping[str, Any]) -> tuple[int, int, bool]:
    """The run of records [start, end) a bundle holds, and whether the bundle states it.

    Format 2 states it; for format 1 it is taken from the first to the last record the bundle holds.
    """
    if bundle["format"] == BUNDLE_FORMAT:
        return bundle["start_index"], bundle["end_index"], True
    indexes = [rec["index"] for rec in bundle["records"]]
    return (min(indexes), max(indexes) + 1, False) if indexes else (0, 0, False)


def _run(start: int, end: int) -> str:
    return f"records {start}..{end - 1}" if end > start else "no records"


def _check_bundle_run(
    records: Sequence[Mapping[str, Any]], start: int, end: int, stated: bool, size: int
) -> list[Finding]:
    """That the records are the run [start, end): within the checkpoint, each once, in order, none missing.

    A record counts as present under its index and under the index its bytes claim: a renumbered
    record is reported as moved (`_check_bundle_record`), not also as missing.
    """
    run = _run(start, end)
    findings: list[Finding] = []
    if stated and not 0 <= start <= end <= size:
        findings.append(
            Finding(
                "bundle",
                max(start, 0),
                f"the bundle states the records from {start} up to {end}: not a run of the {size} records its"
                " checkpoint covers",
            )
        )
    present: set[int] = set()
    previous: int | None = None
    for rec in records:
        index = rec["index"]
        if index in present:
            findings.append(Finding("record", index, f"record {index}: appears twice"))
        elif previous is not None and index < previous:
            findings.append(
                Finding("record", index, f"record {index}: comes after record {previous}: the records were reordered")
            )
        if stated and not start <= index < end:
            findings.append(
                Finding("record", index, f"record {index}: it is outside the run of records the bundle states ({run})")
            )
        present.add(index)
        previous = index
        claimed = embedded_index(rec["leaf_data"].encode("ascii", "replace"))
        if claimed is not None:
            present.add(claimed)
    for a, b in _gaps(present, start, end):
        missing = f"record {a} is missing" if b == a + 1 else f"records {a}..{b - 1} are missing"
        if stated:
            why = f"which states {run}: taken out of it"
        else:
            why = (
                f"between records {a - 1} and {b}: taken out, or left out by an export of format {_BUNDLE_FORMAT_1}"
                " because its time is outside the range (check it in the log)"
            )
        findings.append(Finding("record", a, f"{missing} from the bundle, {why}"))
    return findings


def _gaps(present: Iterable[int], start: int, end: int) -> list[tuple[int, int]]:
    """The runs [a, b) of indexes in [start, end) that are not in `present` (never walks the range itself)."""
    out = []
    expected = start
    for index in sorted({i for i in present if start <= i < end}):
        if index > expected:
            out.append((expected, index))
        expected = index + 1
    if expected < end:
        out.append((expected, end))
    return out


# -- stats ----------------------------------------------------------------------------------------

_BUCKETS = {"hour": 13, "day": 10, "month": 7}


def stats(
    reader: LogReader, *, bucket: str = "day", since: float | None = None, until: float | None = None
) -> dict[str, Any]:
    """Calls by origin force, unit, application and decision, per hour, day or month.

    A call is a record of event ``call`` or ``stream-open`` (a stream counts once); reads of the
    log (``audit-access``) are counted apart.
    """
    if bucket not in _BUCKETS:
        raise ConfigError(f"{bucket!r} is not one of {', '.join(_BUCKETS)}", file=COMMAND_LINE, field="--by")
    width = _BUCKETS[bucket]
    lo, hi = _stamp(since), _stamp(until)
    buckets: dict[str, dict[str, Any]] = {}
    with reader.snapshot():
        for index, _, data in reader.rows():
            if not _in_range(_record_time(data), lo, hi):
                continue
            record = _decode(reader, index, data)
            b = buckets.setdefault(record.time[:width], _empty_bucket())
            if record.event == "audit-access":
                b["audit_access"] += 1
                continue
            if record.event not in ("call", "stream-open"):
                continue
            b["calls"] += 1
            b["by_force"][record.origin_force or record.force] += 1
            b["by_application"][record.application or "-"] += 1
            b["by_decision"][{True: "allow", False: "deny", None: "none"}[record.decision_allowed]] += 1
            for unit in record.units or ("-",):
                b["by_unit"][unit] += 1
    return {
        "bucket": bucket,
        "since": lo,
        "until": hi,
        "buckets": [{"period": k, **_plain(v)} for k, v in sorted(buckets.items())],
    }


def _empty_bucket() -> dict[str, Any]:
    return {
        "calls": 0,
        "audit_access": 0,
        "by_force": Counter(),
        "by_unit": Counter(),
        "by_application": Counter(),
        "by_decision": Counter(),
    }


def _plain(bucket: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(sorted(v.items())) if isinstance(v, Counter) else v for k, v in bucket.items()}
