"""`psngw audit ...`: the auditors' commands, a thin edge over `gateway.audit.tools`.

Commands: ``query``, ``verify``, ``prove``, ``export``, ``verify-bundle``, ``stats``. Each takes a
log database; against a gateway's live log it needs ``--auditor ID --purpose PURPOSE`` and records
the access before it shows anything. ``witness-conflicts`` reads a witness database instead (the
evidence of peer logs' rollbacks and forks; it holds no record, so no access is recorded). Exit
codes: 0 all well, 1 `verify` or `verify-bundle` found something, 2 bad input (no such file, not a
log, a bad filter), printed as one line by `psngw`.

Everything printed from a record is escaped: records hold text that callers chose (a purpose, a
reason), and a terminal or a spreadsheet must not take it for control sequences or formulas.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.audit import tools
from gateway.audit.record import ACCESS_PURPOSES, EVENTS, AuditRecord
from gateway.audit.store import LogReader
from gateway.audit.tools import COMMAND_LINE
from gateway.audit.witness import ConflictKind, read_conflicts
from gateway.clock import SystemClock
from gateway.errors import ConfigError

__all__ = ["register_cli"]

_TABLE_COLUMNS = (
    ("index", "#"),
    ("time", "time (UTC)"),
    ("event", "event"),
    ("officer_id", "officer"),
    ("units", "units"),
    ("origin_force", "origin"),
    ("application", "application"),
    ("method", "method"),
    ("decision_allowed", "decision"),
    ("status", "status"),
    ("request_id", "request id"),
)


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``psngw audit`` and its commands."""
    audit = subparsers.add_parser(
        "audit",
        help="query, verify, prove and export audit logs (the auditors' tools)",
        description="The auditors' tools. They never change a record. Against a gateway's live log, say who"
        " you are and why (--auditor, --purpose): the access is recorded first.",
    )
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    _add_query(sub)
    _add_verify_and_prove(sub)
    _add_export(sub)
    _add_stats(sub)
    _add_witness_conflicts(sub)


def _add_query(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("query", help="list the records that match filters")
    q.add_argument("db", type=Path, help="the audit log database")
    q.add_argument("--officer", help="officer id")
    q.add_argument("--unit", help="one of the officer's units")
    q.add_argument("--origin-force", help="the force the call came from")
    q.add_argument("--application", help="application name")
    q.add_argument("--method", help="gRPC method path, /package.Service/Method")
    q.add_argument("--decision", choices=("allow", "deny", "none"), help="the policy decision (none: refused earlier)")
    q.add_argument("--status", help="gRPC status name, e.g. PERMISSION_DENIED")
    q.add_argument("--event", choices=EVENTS, help="record kind")
    q.add_argument("--request-id", help="request id")
    q.add_argument("--since", help="from this time (inclusive): YYYY-MM-DD or ISO 8601 with a zone")
    q.add_argument("--until", help="up to this time (exclusive)")
    q.add_argument("--limit", type=int, help="show at most this many records")
    fmt = q.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="a JSON array of records")
    fmt.add_argument("--csv", action="store_true", help="CSV, one record per row, every field")
    _access_options(q)
    q.set_defaults(func=_cmd_query)


def _add_verify_and_prove(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser("verify", help="recompute the tree; check every checkpoint, signature and cosignature")
    v.add_argument("db", type=Path, help="the audit log database")
    _key_options(v)
    v.add_argument("--json", action="store_true", help="the report as JSON")
    _access_options(v)
    v.set_defaults(func=_cmd_verify)

    p = sub.add_parser("prove", help="inclusion proofs of a request's records in the latest checkpoint")
    p.add_argument("db", type=Path, help="the audit log database")
    p.add_argument("--request-id", required=True, help="request id")
    p.add_argument("--json", action="store_true", help="the proofs as JSON (for any RFC 6962 verifier)")
    _access_options(p)
    p.set_defaults(func=_cmd_prove)


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "export",
        help="a self-contained bundle of records with proofs, checkpoint and keys",
        description="Write a bundle of the run of records from the first to the last in the time range (every"
        " record between them included) and of the records just before and after the run, each with its"
        " inclusion proof in the latest checkpoint, that checkpoint with its cosignatures, and the keys.",
    )
    e.add_argument("db", type=Path, help="the audit log database")
    e.add_argument("--since", help="from this time (inclusive)")
    e.add_argument("--until", help="up to this time (exclusive)")
    e.add_argument("out", type=Path, help="the bundle file to create (never overwritten)")
    _access_options(e)
    e.set_defaults(func=_cmd_export)

    b = sub.add_parser(
        "verify-bundle",
        help="check an exported bundle",
        description="Check a bundle on its own: the checkpoint's signature and cosignatures, each record's bytes"
        " and inclusion proof, that it holds every record of the run it states, each once and in order, and that"
        " the records just before and after the run were made before and after the time range.",
    )
    b.add_argument("bundle", type=Path, help="the bundle file")
    _key_options(b)
    b.add_argument("--json", action="store_true", help="the report as JSON")
    b.set_defaults(func=_cmd_verify_bundle)


def _add_stats(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("stats", help="calls by force, unit, application and decision over time")
    s.add_argument("db", type=Path, help="the audit log database")
    s.add_argument("--by", choices=("hour", "day", "month"), default="day", help="period (default: day)")
    s.add_argument("--since", help="from this time (inclusive)")
    s.add_argument("--until", help="up to this time (exclusive)")
    s.add_argument("--json", action="store_true", help="as JSON")
    _access_options(s)
    s.set_defaults(func=_cmd_stats)


def _add_witness_conflicts(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser(
        "witness-conflicts",
        help="the evidence a gateway's witness kept of peer logs rolled back or forked, as JSON",
        description="Print, as a JSON array, each rollback or fork a witness saw: the checkpoint the log"
        " presented (signed by its key), the one the witness had cosigned, who submitted it, when and how often."
        " Reads the witness database without writing to it.",
    )
    w.add_argument("db", type=Path, help="the witness database ([witness] db of the gateway)")
    w.add_argument("--origin", help="only this log, e.g. thames-valley.se.psn/audit")
    w.add_argument("--kind", choices=tuple(k.value for k in ConflictKind), help="only this kind")
    w.set_defaults(func=_cmd_witness_conflicts)


def _access_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("access to a live log (recorded before anything is shown)")
    group.add_argument("--auditor", help="who is reading (your officer or staff id)")
    group.add_argument("--purpose", choices=tuple(ACCESS_PURPOSES), help="why, one of the DPA 2018 s62(4) purposes")


def _key_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("which keys to trust (at least one)")
    group.add_argument("--directory", type=Path, help="network directory: check stored certificates against its CAs")
    group.add_argument("--log-cert", type=Path, action="append", default=[], help="a trusted log certificate (PEM)")
    group.add_argument("--vkey", action="append", default=[], help="a trusted note or cosignature verifier key")
    group.add_argument(
        "--unsafe-stored-keys", action="store_true", help="trust the keys the log carries (consistency check only)"
    )
    group.add_argument("--at", help="check certificates as of this time (default: now)")
    parser.add_argument(
        "--quorum",
        type=int,
        default=tools.DEFAULT_QUORUM,
        metavar="N",
        help="a checkpoint is witnessed when the witnesses of at least N forces other than the log's own cosigned it;"
        f" the latest must be (default: {tools.DEFAULT_QUORUM})",
    )


# -- commands -------------------------------------------------------------------------------------


def _open(args: argparse.Namespace, command: str, options: Sequence[str]) -> LogReader:
    clock = SystemClock()
    access = None
    if args.auditor is not None or args.purpose is not None:
        access = tools.AccessRequest(args.auditor or "", args.purpose or "", _describe(command, args, options))
    reader, result = tools.open_for_audit(args.db, access, clock=clock)
    if result is not None:
        print(f"psngw: access recorded in the live log as record {result.index}", file=sys.stderr)
    elif access is not None:
        print("psngw: offline copy: opened read-only, the access is not recorded in it", file=sys.stderr)
    return reader


def _describe(command: str, args: argparse.Namespace, options: Sequence[str]) -> str:
    """The command line worth recording: the command, the log and the options that shape what is shown."""
    parts = [command, str(args.db)]
    for name in options:
        value = getattr(args, name, None)
        if value not in (None, False, [], ""):
            parts.append(f"--{name.replace('_', '-')}" + ("" if value is True else f"={value}"))
    return " ".join(parts)


def _when(text: str | None, what: str) -> float | None:
    return None if text is None else tools.parse_when(text, what)


def _cmd_query(args: argparse.Namespace) -> int:
    flt = tools.QueryFilter(
        officer=args.officer,
        unit=args.unit,
        origin_force=args.origin_force,
        application=args.application,
        method=args.method,
        decision=args.decision,
        status=args.status,
        since=_when(args.since, "since"),
        until=_when(args.until, "until"),
        request_id=args.request_id,
        event=args.event,
    )
    if args.limit is not None and args.limit < 1:
        raise ConfigError("must be at least 1", file=COMMAND_LINE, field="--limit")
    options = (
        "officer", "unit", "origin_force", "application", "method", "decision", "status", "event", "request_id",
        "since", "until", "limit", "json", "csv",
    )  # fmt: skip
    with _open(args, "query", options) as reader, reader.snapshot():
        records = tools.query(reader, flt, limit=args.limit)
    if args.json:
        _print_json([r.to_dict() for r in records])
    elif args.csv:
        _print_csv(records)
    else:
        _print_table(records)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    anchors = _anchors(args)
    options = ("directory", "log_cert", "vkey", "unsafe_stored_keys", "at", "quorum")
    with _open(args, "verify", options) as reader:
        report = tools.verify_log(reader, anchors)
    _print_report(report, args.json, anchors)
    return 0 if report.ok else 1


def _cmd_prove(args: argparse.Namespace) -> int:
    with _open(args, "prove", ("request_id",)) as reader:
        proof = tools.prove(reader, args.request_id)
    if args.json:
        _print_json(proof)
        return 0
    print(f"log {_clean(proof['origin'])}, checkpoint of size {proof['tree_size']}, root {proof['root']}")
    for entry in proof["proofs"]:
        print(f"record {entry['index']}: leaf hash {entry['leaf_hash']}")
        print(f"  inclusion proof ({len(entry['inclusion_proof'])} hashes):")
        for h in entry["inclusion_proof"]:
            print(f"    {h}")
    if proof["pending"]:
        print(f"not yet covered by a checkpoint: records {', '.join(map(str, proof['pending']))}")
    print("checkpoint note:")
    print(_clean(proof["checkpoint"], keep_newlines=True), end="")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    since, until = _when(args.since, "since"), _when(args.until, "until")
    if args.out.exists():
        raise ConfigError("already exists: choose another name (a bundle is never overwritten)", file=args.out)
    with _open(args, "export", ("since", "until", "out")) as reader:
        bundle, notes = tools.export_bundle(reader, since, until, now=SystemClock().now())
    tools.write_bundle(args.out, bundle)
    for note in notes:
        print(f"psngw: {note}", file=sys.stderr)
    cp, start, end = bundle["checkpoint"], bundle["start_index"], bundle["end_index"]
    run = f" ({start}..{end - 1})" if end > start else ""
    print(
        f"wrote {args.out}: {len(bundle['records'])} records{run}, proven against the checkpoint of size {cp['size']}"
    )
    return 0


def _cmd_verify_bundle(args: argparse.Namespace) -> int:
    anchors = _anchors(args)
    bundle = tools.read_bundle(args.bundle)
    report = tools.verify_bundle(bundle, anchors)
    _print_report(report, args.json, anchors)
    return 0 if report.ok else 1


def _cmd_stats(args: argparse.Namespace) -> int:
    since, until = _when(args.since, "since"), _when(args.until, "until")
    with _open(args, "stats", ("by", "since", "until")) as reader:
        result = tools.stats(reader, bucket=args.by, since=since, until=until)
    if args.json:
        _print_json(result)
        return 0
    for b in result["buckets"]:
        print(f"{b['period']}: {b['calls']} calls, {b['audit_access']} reads of the log")
        for key, title in (("by_decision", "decision"), ("by_force", "force"), ("by_unit", "unit"),
                           ("by_application", "application")):  # fmt: skip
            counts = ", ".join(f"{_clean(k)} {v}" for k, v in b[key].items())
            print(f"  {title}: {counts or '-'}")
    return 0


def _cmd_witness_conflicts(args: argparse.Namespace) -> int:
    evidence = [
        e.to_dict()
        for e in read_conflicts(args.db)
        if (args.origin is None or e.origin == args.origin) and (args.kind is None or e.kind == args.kind)
    ]
    _print_json(evidence)
    return 0


def _anchors(args: argparse.Namespace) -> tools.TrustAnchors:
    at = _when(args.at, "at")
    return tools.load_anchors(
        directory=args.directory,
        log_certs=args.log_cert,
        vkeys=args.vkey,
        unsafe_stored_keys=args.unsafe_stored_keys,
        quorum=args.quorum,
        at=at if at is not None else SystemClock().now(),
    )


# -- printing -------------------------------------------------------------------------------------


def _clean(text: str, *, keep_newlines: bool = False) -> str:
    """Escape anything a terminal could act on (control characters, escape sequences)."""
    out = []
    for c in text:
        if c.isprintable() or (keep_newlines and c == "\n"):
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _cell(record: AuditRecord, name: str) -> str:
    value = getattr(record, name)
    if name == "decision_allowed":
        return {True: "allow", False: "deny", None: "-"}[value]
    if isinstance(value, tuple):
        return ",".join(value)
    return "" if value is None else str(value)


def _print_table(records: Sequence[AuditRecord]) -> None:
    rows = [[_clean(_cell(r, name)) for name, _ in _TABLE_COLUMNS] for r in records]
    headers = [title for _, title in _TABLE_COLUMNS]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"({len(records)} record{'s' if len(records) != 1 else ''})")


def _csv_safe(value: str) -> str:
    # A cell starting with one of these is a formula to a spreadsheet (CSV injection).
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _print_csv(records: Sequence[AuditRecord]) -> None:
    names = list(AuditRecord.__dataclass_fields__)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(names)
    for r in records:
        row = []
        for name in names:
            value = getattr(r, name)
            if isinstance(value, tuple):
                value = ";".join(value)
            elif value is None:
                value = ""
            elif isinstance(value, bool):
                value = "true" if value else "false"
            row.append(_csv_safe(str(value)))
        writer.writerow(row)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=True))


def _witnessed(report: tools.VerifyReport) -> str:
    """Which checkpoint the other forces' witnesses vouch for, against the quorum."""
    needed = f"the witnesses of at least {report.quorum} other force(s) needed (--quorum)"
    if report.witnessed is None:
        return f"no checkpoint; {needed}"
    if report.witnessed == report.last_checkpoint:
        return f"the last checkpoint (size {report.witnessed}); {needed}"
    return f"up to checkpoint {report.witnessed}, not the last (size {report.last_checkpoint}); {needed}"


def _print_report(report: tools.VerifyReport, as_json: bool, anchors: tools.TrustAnchors) -> None:
    if as_json:
        _print_json(report.to_dict())
        return
    print(
        f"log {_clean(report.origin)}: {report.records} records, {report.checkpoints} checkpoint(s)"
        f" (last at size {report.last_checkpoint})"
    )
    print(f"trust: {anchors.describe()}")
    witnesses = ", ".join(report.witnesses) or "none"
    print(
        f"cosignatures: {report.cosignatures} verified with trusted keys (on the last checkpoint: {witnesses});"
        f" {report.untrusted_cosignatures} by keys not trusted"
    )
    print(f"witnessed: {_witnessed(report)}")
    print(f"checked {report.records} records in {report.seconds:.2f} s ({report.records_per_second:,.0f} records/s)")
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print("OK: no finding")
        return
    first = report.first
    print(f"FAILED: {len(report.findings)} finding(s); first bad: {_clean(first.message) if first else ''}")
    for finding in report.findings:
        print(f"  {_clean(finding.message)}")
