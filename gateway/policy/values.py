"""The values of the policy subsystem: requests, decisions, rows, findings.

Frozen values only; no logic beyond formatting. Every other module of
`gateway.policy` imports its vocabulary from here, so the casbin wrapper
(`engine`), the file reader (`files`) and the fast path (`decide`) do not
import each other in circles.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from gateway.errors import ConfigError

__all__ = [
    "AppLink",
    "AppRow",
    "Decision",
    "DecisionRequest",
    "Finding",
    "GoldenCase",
    "GroupLink",
    "GroupRow",
    "PolicyError",
    "Rule",
    "RuleRow",
    "Severity",
    "ShadowResult",
]


@dataclass(frozen=True, slots=True)
class DecisionRequest:
    """What the policy is asked: whether this principal, from this force, may call this method.

    `origin_force` comes from the mTLS identity of the calling gateway (or the
    local application), never from token claims. `units`, `roles` and
    `clearance` come from the verified principal.
    """

    origin_force: str
    units: tuple[str, ...]
    roles: tuple[str, ...]
    clearance: str
    method: str


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """What a candidate policy, evaluated beside the live one, would have said."""

    policy_version: str
    allowed: bool
    rule: str | None
    reason: str
    agrees: bool


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer, with what the audit record needs.

    `rule` is ``"file:line: row"`` of the rule that decided (file relative to
    the policy directory), or None when no rule did (default deny, or a
    refusal before the rules: unknown names, vetting). `reason` is the full
    explanation for the audit log; callers get only `decision_id` and
    `policy_version`.
    """

    allowed: bool
    decision_id: str
    policy_version: str
    rule: str | None
    reason: str
    shadow: ShadowResult | None = None


class Severity(enum.StrEnum):
    """How bad a finding is: errors reject the policy, warnings do not."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in the policy files, with where it is."""

    file: str
    line: int | None
    message: str
    severity: Severity = Severity.ERROR
    field: str | None = None

    @property
    def is_error(self) -> bool:
        """Whether this finding rejects the policy."""
        return self.severity is Severity.ERROR

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: {self.severity.value}: {what}"


class PolicyError(ConfigError):
    """A policy cannot be used: the first error, with every finding attached.

    `str()` is ``file:line: field: message`` like every `ConfigError`;
    `findings` holds all errors and warnings found up to the failure.
    """

    def __init__(self, finding: Finding, findings: tuple[Finding, ...] = ()) -> None:
        errors = sum(1 for f in findings if f.is_error)
        more = f" (and {errors - 1} more errors)" if errors > 1 else ""
        super().__init__(finding.message + more, file=finding.file, line=finding.line, field=finding.field)
        self.finding = finding
        self.findings = findings or (finding,)


#: How a policy stores its rows: plain tuples of strings and ints, in the field
#: order of `Rule`, `GroupLink` and `AppLink`. CPython's cycle collector stops
#: tracking such tuples at its first look, so loading 10,000 rows does not set
#: off full collections of the gateway's heap (pauses of tens of milliseconds);
#: the named tuples below are views made from them when needed.
RuleRow = tuple[int, str, str, str, str, str, int, str]
GroupRow = tuple[str, str, str, str, int, str]
AppRow = tuple[str, str, str, int, str]


class Rule(NamedTuple):
    """One ``p`` row: `subject` in force `force` may (or may not) call `obj`.

    `subject` is ``unit:NAME``, ``role:NAME`` or ``group:NAME``; `force` is a
    force or ``*`` (deny rows only); `obj` is a method path, a
    ``/package.Service/*`` prefix, an ``app:NAME`` group, or ``*`` (deny rows
    only). `position` is the row's place among all ``p`` rows in load order.
    """

    position: int
    subject: str
    force: str
    obj: str
    effect: str
    file: str
    line: int
    text: str

    @property
    def allows(self) -> bool:
        """Whether this is an allow row (else a deny row)."""
        return self.effect == "allow"

    @property
    def location(self) -> str:
        """``file:line``, the file relative to the policy directory."""
        return f"{self.file}:{self.line}"

    @property
    def cite(self) -> str:
        """``file:line: row``, as decisions and explanations quote it."""
        return f"{self.file}:{self.line}: {self.text}"


class GroupLink(NamedTuple):
    """One ``g`` row: `member` (a unit or role) belongs to `group` in force `force`."""

    member: str
    group: str
    force: str
    file: str
    line: int
    text: str


class AppLink(NamedTuple):
    """One ``g2`` row: the method or ``/package.Service/*`` `pattern` is part of ``app:`` `application`."""

    pattern: str
    application: str
    file: str
    line: int
    text: str


@dataclass(frozen=True, slots=True)
class GoldenCase:
    """One golden test case: a request and the decision it must get."""

    name: str
    file: str
    line: int | None
    request: DecisionRequest
    expect_allowed: bool
    reason_contains: str | None = None
