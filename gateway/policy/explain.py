"""Explanations: why a request is allowed or denied, rule by rule.

`explain` decides the request on the fast path (so the explanation can never
differ from what the gateway does) and lists, for each of the principal's
units and roles, every rule that matched it, with file:line and the row.

Owns: `Explanation`, `SubjectExplanation`, `explain`. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.policy.decide import Policy
from gateway.policy.values import Decision, DecisionRequest, Rule

__all__ = ["Explanation", "SubjectExplanation", "explain"]


@dataclass(frozen=True)
class SubjectExplanation:
    """What the rules say for one of the principal's subjects."""

    subject: str
    outcome: str
    matches: tuple[Rule, ...]


@dataclass(frozen=True)
class Explanation:
    """A decision with everything that led to it."""

    request: DecisionRequest
    decision: Decision
    refusal: str | None
    application: str | None
    min_clearance: str | None
    subjects: tuple[SubjectExplanation, ...]

    def render(self) -> str:
        """The explanation as text for an officer."""
        req = self.request
        lines = [
            f"policy:    {self.decision.policy_version}",
            f"request:   from force {req.origin_force}, units {', '.join(req.units) or '(none)'}, "
            f"roles {', '.join(req.roles) or '(none)'}, clearance {req.clearance}",
            f"method:    {req.method}",
        ]
        if self.application is not None:
            lines.append(f"app:       {self.application} (minimum clearance {self.min_clearance})")
        if self.refusal is not None:
            lines.append(f"refused before the rules: {self.refusal}")
        for sub in self.subjects:
            lines.append(f"  {sub.subject}: {sub.outcome}")
            for rule in sub.matches:
                via = f"  (as a member of {rule.subject} in {req.origin_force})" if rule.subject != sub.subject else ""
                lines.append(f"      {rule.effect:5}  {rule.cite}{via}")
        verdict = "ALLOWED" if self.decision.allowed else "DENIED"
        lines.append(f"decision:  {verdict}")
        lines.append(f"rule:      {self.decision.rule or '(none)'}")
        lines.append(f"reason:    {self.decision.reason}")
        return "\n".join(lines)


def explain(policy: Policy, request: DecisionRequest) -> Explanation:
    """Decide `request` on `policy` and say why, naming every rule that matched."""
    decision = policy.decide(request)
    refusal = policy.refusal(request)
    info = policy.method_info(request.method)
    subjects: list[SubjectExplanation] = []
    if refusal is None:
        names = [f"unit:{u}" for u in request.units] + [f"role:{r}" for r in request.roles]
        for subject in names:
            rule = policy.rule_for(request.origin_force, subject, request.method)
            matches = policy.matches(request.origin_force, subject, request.method)
            if rule is None:
                subjects.append(SubjectExplanation(subject, "no rule matches", matches))
            else:
                outcome = "allowed" if rule.allows else "denied (a deny row matches)"
                subjects.append(SubjectExplanation(subject, outcome, matches))
    return Explanation(
        request=request,
        decision=decision,
        refusal=refusal,
        application=info.application if info else None,
        min_clearance=info.min_clearance if info else None,
        subjects=tuple(subjects),
    )
