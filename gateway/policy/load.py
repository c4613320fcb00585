"""Loading a policy: read, validate, build, check against casbin, run the golden cases.

A policy is used only after every step passed:

1. read the files once (`files.read_policy_source`); the version is a digest of
   those bytes, so the version always names exactly what was parsed;
2. parse and validate every row against the directory (`files.parse_policy`)
   and the model against the pinned model (`engine.check_model`);
3. build the fast path (`decide.build_policy`);
4. check the fast path against casbin (`verify.verify_against_casbin`), in
   this process or, with ``isolate=True``, in a child process that builds the
   same table from the same bytes (`_isolated`); any disagreement rejects;
5. run the golden cases on the fast path: each must get its expected decision.

Owns: `load_policy`, `check_policy`, `run_golden`, `CaseResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.directory import NetworkDirectory
from gateway.policy._isolated import check_in_child
from gateway.policy._pace import Pacer, no_pacing
from gateway.policy.decide import Policy, build_policy
from gateway.policy.engine import check_model
from gateway.policy.files import MODEL_FILE, decode_policy_text, parse_policy, read_policy_source
from gateway.policy.values import Finding, GoldenCase, PolicyError
from gateway.policy.verify import verify_against_casbin

__all__ = ["CaseResult", "check_policy", "load_policy", "run_golden"]


@dataclass(frozen=True)
class CaseResult:
    """One golden case run on the fast path."""

    case: GoldenCase
    allowed: bool
    reason: str
    rule: str | None

    @property
    def passed(self) -> bool:
        """Whether the decision is the expected one (and its reason says what the case asks)."""
        if self.allowed != self.case.expect_allowed:
            return False
        return self.case.reason_contains is None or self.case.reason_contains in self.reason

    @property
    def problem(self) -> str:
        """What went wrong, for a failing case."""
        want = "allow" if self.case.expect_allowed else "deny"
        got = "allow" if self.allowed else "deny"
        if want != got:
            return f"expected {want}, got {got}: {self.reason}"
        return f"reason does not contain {self.case.reason_contains!r}: {self.reason}"


def run_golden(policy: Policy) -> list[CaseResult]:
    """Every golden case of `policy`, decided on the fast path."""
    results = []
    for case in policy.parsed.cases:
        decision = policy.decide(case.request)
        results.append(CaseResult(case, decision.allowed, decision.reason, decision.rule))
    return results


def _analyse(
    policy_dir: Path | str,
    directory: NetworkDirectory,
    *,
    check_golden: bool,
    isolate: bool,
    pace: Callable[[], None],
    previous: Policy | None = None,
) -> tuple[Policy | None, list[Finding]]:
    source = read_policy_source(policy_dir)
    parsed, findings = parse_policy(source, directory, pace=pace)
    if source.model is not None:
        text, _, _ = decode_policy_text(source.model.data)
        if text is not None:
            findings.extend(check_model(text, source.display(MODEL_FILE)))
    if parsed is None or any(f.is_error for f in findings):
        return None, findings
    warnings = tuple(f for f in findings if not f.is_error)
    policy = build_policy(parsed, directory, warnings, pace=pace, previous=previous)
    try:
        if isolate:
            findings.extend(check_in_child(source, directory, policy.table_digest(pace)))
        else:
            findings.extend(verify_against_casbin(policy, pace=pace))
    except PolicyError as exc:
        findings.extend(exc.findings)
    if check_golden:
        for result in run_golden(policy):
            if not result.passed:
                findings.append(
                    Finding(
                        source.display(result.case.file),
                        result.case.line,
                        f"golden case {result.case.name!r} fails: {result.problem}",
                    )
                )
    if any(f.is_error for f in findings):
        return None, findings
    policy.warm(pace)
    return policy, findings


def load_policy(
    policy_dir: Path | str,
    directory: NetworkDirectory,
    *,
    check_golden: bool = True,
    isolate: bool = False,
    pace: Callable[[], None] | None = None,
    previous: Policy | None = None,
) -> Policy:
    """Load, validate and check the policy in `policy_dir`; `PolicyError` on the first error.

    Warnings do not stop a load; they are on `Policy.warnings`. With
    `isolate`, the casbin check runs in a child process (use it for reloads
    beside live traffic). `pace` is called often during the in-process work;
    by default a `Pacer` lets other threads run at least every 2 ms.
    `previous`, the policy this one will replace, shares what it can (the
    directory index) so the first calls on the new policy stay fast.
    """
    policy, findings = _analyse(
        policy_dir,
        directory,
        check_golden=check_golden,
        isolate=isolate,
        pace=pace if pace is not None else Pacer(),
        previous=previous,
    )
    if policy is None:
        errors = tuple(f for f in findings if f.is_error)
        first = errors[0] if errors else Finding(str(policy_dir), None, "policy rejected")
        raise PolicyError(first, tuple(findings))
    return policy


def check_policy(policy_dir: Path | str, directory: NetworkDirectory) -> list[Finding]:
    """Every finding for the policy in `policy_dir`: errors (it would be rejected) and warnings."""
    _, findings = _analyse(policy_dir, directory, check_golden=True, isolate=False, pace=no_pacing)
    return findings
