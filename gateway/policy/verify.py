"""The check of the fast path against casbin, the meaning of the policy.

Casbin is asked about every (force, subject, method) when there are at most
`EXHAUSTIVE_LIMIT` of them; beyond that, about one request aimed at each rule
(chosen from the directory's side, not from the fast path's expansion) plus
`RANDOM_SAMPLE` uniformly random ones; and about every golden case, with the
principal's subjects combined as the fast path combines them. The seed of the
random sample is the policy version, so a check is reproducible. Any
disagreement rejects the policy.

Owns: `verify_against_casbin`. Runs in the gateway's process (tools, tests)
or in a child process (`_isolated`, for reloads).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from gateway.policy._pace import no_pacing
from gateway.policy.decide import Policy
from gateway.policy.engine import CasbinOracle, casbin_oracle
from gateway.policy.values import DecisionRequest, Finding

__all__ = ["EXHAUSTIVE_LIMIT", "RANDOM_SAMPLE", "verify_against_casbin"]

#: Up to this many (force, subject, method) triples, casbin is asked about every one.
EXHAUSTIVE_LIMIT = 20_000
#: Beyond it: one request aimed at each rule, plus this many uniformly random ones.
RANDOM_SAMPLE = 5_000
#: At most this many disagreements are reported (one is enough to reject).
_MAX_REPORTED = 10


def _casbin_allows(policy: Policy, oracle: CasbinOracle, request: DecisionRequest) -> bool:
    """The principal's decision with casbin deciding each subject (names and vetting as the fast path)."""
    if policy.refusal(request) is not None:
        return False
    subjects = [f"unit:{u}" for u in request.units] + [f"role:{r}" for r in request.roles]
    effects = {oracle.subject_effect(s, request.origin_force, request.method) for s in subjects}
    return "allow" in effects and "deny" not in effects


def _sample(policy: Policy, rng: random.Random) -> list[tuple[str, str, str]]:
    """(subject, force, method) triples to ask casbin about, grouped by (subject, force)."""
    directory = policy.directory
    forces = sorted(directory.forces)
    methods = [route.method.path for route in directory.all_methods()]
    subjects = [f"unit:{u}" for u in directory.units] + [f"role:{r}" for r in directory.roles]
    if len(forces) * len(subjects) * len(methods) <= EXHAUSTIVE_LIMIT:
        return [(s, f, m) for s in subjects for f in forces for m in methods]
    members: dict[tuple[str, str], list[str]] = {}
    for link in policy.parsed.groups:
        members.setdefault((link.force, link.group), []).append(link.member)
    by_app = {name: [m.path for m in app.methods] for name, app in directory.applications.items()}
    picked: set[tuple[str, str, str]] = set()
    for rule in policy.parsed.rules:
        # Aim at the rule from the directory's side (not the fast path's expansion).
        force = rule.force if rule.force != "*" else rng.choice(forces)
        subject = rule.subject
        if subject.startswith("group:"):
            subject = rng.choice(members.get((force, subject)) or subjects)
        if rule.obj.startswith("app:"):
            candidates = by_app[rule.obj.removeprefix("app:")]
        elif rule.obj.endswith("*"):
            candidates = [m for m in methods if m.startswith(rule.obj[:-1])] or methods
        else:
            candidates = [rule.obj]
        picked.add((subject, force, rng.choice(candidates)))
    for _ in range(RANDOM_SAMPLE):
        picked.add((rng.choice(subjects), rng.choice(forces), rng.choice(methods)))
    return sorted(picked)


def verify_against_casbin(
    policy: Policy, *, partition: bool = True, pace: Callable[[], None] = no_pacing
) -> list[Finding]:
    """Errors for every disagreement between the fast path and casbin's enforce (none: agreed)."""
    root = policy.parsed.root
    findings: list[Finding] = []
    disagreements = 0
    rng = random.Random(policy.version)  # noqa: S311  # a reproducible sample, not a secret
    with casbin_oracle(policy.parsed, partition=partition) as oracle:
        for subject, force, method in _sample(policy, rng):
            pace()
            rule = policy.rule_for(force, subject, method)
            fast = None if rule is None else rule.effect
            truth = oracle.subject_effect(subject, force, method)
            if fast != truth:
                disagreements += 1
                if disagreements <= _MAX_REPORTED:
                    why = f" ({rule.cite})" if rule is not None else ""
                    findings.append(
                        Finding(
                            root,
                            None,
                            f"fast path and casbin disagree for {subject} from {force} calling {method}: "
                            f"fast path {fast or 'no rule'}{why}, casbin {truth or 'no rule'}",
                        )
                    )
        for case in policy.parsed.cases:
            pace()
            fast_allowed = policy.decide(case.request).allowed
            if _casbin_allows(policy, oracle, case.request) != fast_allowed:
                disagreements += 1
                findings.append(
                    Finding(
                        f"{root}/{case.file}",
                        case.line,
                        f"golden case {case.name!r}: fast path and casbin disagree (fast path "
                        f"{'allow' if fast_allowed else 'deny'})",
                    )
                )
    if disagreements > _MAX_REPORTED:
        findings.append(Finding(root, None, f"{disagreements} disagreements in all"))
    return findings
