"""The casbin check in a child process, so a reload never stalls the gateway.

Checking a large policy against casbin means hundreds of thousands of
matcher evaluations and tens of thousands of short-lived objects. In the
gateway's own process that work competes for the GIL with the event loop and
sets off full cycle collections of the whole heap (tens of milliseconds each).
A reload therefore parses and builds the fast path in-process (cheap, paced)
and runs the casbin check here, in a fresh interpreter: the child receives the
very bytes the parent parsed and the directory, builds the same table, checks
it against casbin, and answers with its findings and a digest of the table it
checked. The parent accepts the policy only if that digest equals its own.

Run as ``python -m gateway.policy._isolated`` (pickle on stdin, JSON on
stdout); `check_in_child` is the parent's side.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.directory import NetworkDirectory
from gateway.policy.decide import build_policy
from gateway.policy.files import PolicySource, parse_policy
from gateway.policy.values import Finding, PolicyError, Severity
from gateway.policy.verify import verify_against_casbin

__all__ = ["CHILD_NICE", "CHILD_TIMEOUT", "check_in_child"]

#: The longest a casbin check may take before the reload is rejected.
CHILD_TIMEOUT = 600.0
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _directory_state(directory: NetworkDirectory) -> tuple[Any, ...]:
    # MappingProxyType does not pickle; the values (frozen dataclasses) do.
    return (
        directory.network,
        dict(directory.forces),
        dict(directory.units),
        directory.roles,
        directory.clearance_levels,
        dict(directory.applications),
        directory.path,
    )


def _directory_from_state(state: tuple[Any, ...]) -> NetworkDirectory:
    network, forces, units, roles, levels, applications, path = state
    return NetworkDirectory(
        network=network,
        forces=MappingProxyType(forces),
        units=MappingProxyType(units),
        roles=roles,
        clearance_levels=levels,
        applications=MappingProxyType(applications),
        path=path,
    )


def _finding_from_json(item: dict[str, Any]) -> Finding:
    return Finding(item["file"], item["line"], item["message"], Severity(item["severity"]), item["field"])


def check_in_child(source: PolicySource, directory: NetworkDirectory, digest: str) -> list[Finding]:
    """Check `source` against casbin in a child process; its findings, plus one if its table differs."""
    payload = pickle.dumps((source, _directory_state(directory)))
    argv = [sys.executable, "-m", "gateway.policy._isolated"]
    # The child must import this very package, wherever it was imported from.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    try:
        result = subprocess.run(  # noqa: S603  # fixed argv: this interpreter and this module
            argv, input=payload, capture_output=True, timeout=CHILD_TIMEOUT, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PolicyError(Finding(source.root, None, f"the casbin check process failed: {exc}")) from exc
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise PolicyError(
            Finding(source.root, None, f"the casbin check process exited with {result.returncode}: {tail[0]}")
        )
    try:
        answer = json.loads(result.stdout)
        findings = [_finding_from_json(item) for item in answer["findings"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise PolicyError(Finding(source.root, None, f"the casbin check process gave no answer: {exc}")) from exc
    if answer["digest"] != digest:
        findings.append(
            Finding(source.root, None, "the casbin check process built a different table; the policy is not used")
        )
    return findings


#: The child's nice level. Higher starves it on a busy host (SCHED_IDLE was tried:
#: under load a reload then took minutes, and a deny must not wait that long);
#: at 10 it takes about a tenth of a CPU that the gateway's threads also want.
CHILD_NICE = 10


def _lower_priority() -> None:
    """Background work: the gateway's own threads come first for the CPU."""
    os.nice(CHILD_NICE)


def _main() -> int:
    _lower_priority()
    source, state = pickle.loads(sys.stdin.buffer.read())  # noqa: S301  # from our own parent process
    directory = _directory_from_state(state)
    parsed, findings = parse_policy(source, directory)
    digest = ""
    if parsed is None:
        problems = [f for f in findings if f.is_error]
    else:
        policy = build_policy(parsed, directory)
        digest = policy.table_digest()
        try:
            problems = verify_against_casbin(policy)
        except PolicyError as exc:
            problems = list(exc.findings)
    out = {
        "digest": digest,
        "findings": [
            {"file": f.file, "line": f.line, "message": f.message, "severity": f.severity.value, "field": f.field}
            for f in problems
        ],
    }
    sys.stdout.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
