"""Access policy: which units and roles, from which force, may call which methods.

Casbin (wrapped by `gateway.policy.engine`, the only module that imports it)
is the meaning of a policy; security officers keep it as plain files (see
policies/README.md). A policy is validated completely, checked against casbin
and its golden cases, and only then used; decisions come from the fast path in
`gateway.policy.decide`, never from casbin.

Typical use::

    policy = load_policy(Path("policies"), directory)   # PolicyError on any error
    holder = PolicyHolder(policy)
    decision = holder.current.decide(DecisionRequest(...))
    holder.reload(Path("policies"), directory)           # from a worker thread

The submodules: `values` (requests, decisions, rows, findings), `files`
(reading and validation), `engine` (casbin), `decide` (the fast path),
`verify` (the fast path checked against casbin), `load` (the whole load),
`live` (hot reload, shadow mode), `explain`, `tools` (grants, diff, matrix),
`cli` (``psngw policy``), `bench` (``bench_decisions``).
"""

from gateway.policy.decide import Policy
from gateway.policy.explain import Explanation, explain
from gateway.policy.live import Disagreement, PolicyConfig, PolicyHolder, ShadowPolicy
from gateway.policy.load import CaseResult, check_policy, load_policy, run_golden
from gateway.policy.values import (
    Decision,
    DecisionRequest,
    Finding,
    PolicyError,
    Rule,
    Severity,
    ShadowResult,
)

__all__ = [
    "CaseResult",
    "Decision",
    "DecisionRequest",
    "Disagreement",
    "Explanation",
    "Finding",
    "Policy",
    "PolicyConfig",
    "PolicyError",
    "PolicyHolder",
    "Rule",
    "Severity",
    "ShadowPolicy",
    "ShadowResult",
    "check_policy",
    "explain",
    "load_policy",
    "run_golden",
]
