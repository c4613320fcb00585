"""`psngw policy ...`: the security officers' tools.

    psngw policy check DIR                 every validation; exit 1 on any error, 0 clean
    psngw policy test DIR [-v]             the golden cases, PASS/FAIL each (like `opa test`)
    psngw policy explain DIR --force F --unit U [--unit U2] [--role R] --method M [--clearance L]
                                           the decision and every rule that matched; exit 0 allowed, 1 denied
    psngw policy diff OLD NEW              grants gained (+) and lost (-); exit 0 no change, 1 changes
    psngw policy matrix DIR [--html FILE]  who may reach what, as tables (and a page)

Every command reads the network directory from ``--directory FILE``, by
default ``DIR/directory.example.toml`` (for diff: NEW's). A directory or
policy that cannot be loaded is a `ConfigError`: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.directory import NetworkDirectory, load_directory
from gateway.errors import ConfigError
from gateway.policy._pace import no_pacing
from gateway.policy.explain import explain
from gateway.policy.load import check_policy, load_policy, run_golden
from gateway.policy.tools import diff_grants, render_diff, render_matrix_html, render_matrix_text
from gateway.policy.values import DecisionRequest

__all__ = ["DEFAULT_DIRECTORY_NAME", "register_cli", "resolve_directory"]

#: The directory file looked for inside the policy directory when --directory is not given.
DEFAULT_DIRECTORY_NAME = "directory.example.toml"


def resolve_directory(policy_dir: Path, given: Path | None) -> NetworkDirectory:
    """The network directory: `given`, else the one kept beside the policy."""
    path = given if given is not None else policy_dir / DEFAULT_DIRECTORY_NAME
    if given is None and not path.is_file():
        raise ConfigError(f"no network directory: pass --directory FILE (looked for {path})", file=path)
    return load_directory(path)


def _write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _check(args: argparse.Namespace) -> int:
    directory = resolve_directory(args.dir, args.directory)
    findings = check_policy(args.dir, directory)
    for finding in findings:
        _write(str(finding))
    errors = sum(1 for f in findings if f.is_error)
    warnings = len(findings) - errors
    verdict = "rejected" if errors else "ok"
    _write(f"{args.dir}: {verdict}: {errors} errors, {warnings} warnings")
    return 1 if errors else 0


def _test(args: argparse.Namespace) -> int:
    directory = resolve_directory(args.dir, args.directory)
    policy = load_policy(args.dir, directory, check_golden=False, pace=no_pacing)
    results = run_golden(policy)
    for result in results:
        where = f"{result.case.file}:{result.case.line or '?'}"
        if result.passed:
            _write(f"{where}: {result.case.name}: PASS")
            if args.verbose:
                _write(f"    {result.reason}")
        else:
            _write(f"{where}: {result.case.name}: FAIL")
            _write(f"    {result.problem}")
    passed = sum(1 for r in results if r.passed)
    _write("-" * 80)
    if not results:
        _write("no golden cases (add tests/*.toml)")
        return 1
    _write(f"PASS: {passed}/{len(results)}")
    if passed != len(results):
        _write(f"FAIL: {len(results) - passed}/{len(results)}")
        return 1
    return 0


def _explain(args: argparse.Namespace) -> int:
    directory = resolve_directory(args.dir, args.directory)
    policy = load_policy(args.dir, directory, check_golden=False, pace=no_pacing)
    clearance = args.clearance
    if clearance is None:
        clearance = directory.clearance_levels[-1]
        _write(f"(no --clearance: assuming the highest level, {clearance})")
    request = DecisionRequest(
        origin_force=args.force,
        units=tuple(args.unit),
        roles=tuple(args.role),
        clearance=clearance,
        method=args.method,
    )
    result = explain(policy, request)
    _write(result.render())
    return 0 if result.decision.allowed else 1


def _diff(args: argparse.Namespace) -> int:
    directory = resolve_directory(args.new, args.directory)
    old = load_policy(args.old, directory, check_golden=False, pace=no_pacing)
    new = load_policy(args.new, directory, check_golden=False, pace=no_pacing)
    diff = diff_grants(old, new)
    _write(render_diff(diff))
    return 1 if diff.changed else 0


def _matrix(args: argparse.Namespace) -> int:
    directory = resolve_directory(args.dir, args.directory)
    policy = load_policy(args.dir, directory, check_golden=False, pace=no_pacing)
    _write(render_matrix_text(policy))
    if args.html is not None:
        try:
            args.html.write_text(render_matrix_html(policy), encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write: {exc.strerror or exc}", file=args.html) from exc
        _write(f"wrote {args.html}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``psngw policy ...`` to the root parser's subcommands."""
    parser = subparsers.add_parser(
        "policy",
        help="check, test, explain, diff and tabulate access policy",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    sub = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)

    def command(name: str, help_text: str, func: Any, *, takes_dir: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        if takes_dir:
            p.add_argument("dir", type=Path, metavar="DIR", help="the policy directory")
        beside = "DIR" if takes_dir else "NEW"
        p.add_argument(
            "--directory",
            type=Path,
            default=None,
            metavar="FILE",
            help=f"the network directory (default: {beside}/{DEFAULT_DIRECTORY_NAME})",
        )
        p.set_defaults(func=func)
        return p

    command("check", "validate every file; exit 1 with file:line messages on any error", _check)
    test = command("test", "run the golden cases (tests/*.toml): PASS/FAIL each, exit 1 on a failure", _test)
    test.add_argument("-v", "--verbose", action="store_true", help="show the reason for passing cases too")
    exp = command("explain", "decide one request and name every rule that matched", _explain)
    exp.add_argument("--force", required=True, help="the caller's origin force")
    exp.add_argument("--unit", action="append", default=[], help="a unit of the officer (repeatable)")
    exp.add_argument("--role", action="append", default=[], help="a role of the officer (repeatable)")
    exp.add_argument("--method", required=True, help="the gRPC method, /package.Service/Method")
    exp.add_argument("--clearance", default=None, help="the officer's vetting (default: the highest level)")
    diff = command("diff", "grants gained and lost between two policy directories", _diff, takes_dir=False)
    diff.add_argument("old", type=Path, metavar="OLD", help="the policy in force")
    diff.add_argument("new", type=Path, metavar="NEW", help="the candidate policy")
    mat = command("matrix", "who may reach what, as a table", _matrix)
    mat.add_argument("--html", type=Path, default=None, metavar="FILE", help="also write a readable HTML page")
