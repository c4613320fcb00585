"""The policy benchmark (`make bench`): figures printed, the issue's targets checked.

Targets (issue 5): p99 decision time <= 20 us at 10,000 rules and 1,000 units,
including the first decisions after reloads (the p99 of every decision made
while reloads run, and the median first decision on each new policy); a
reload never holds a deciding thread back more than 5 ms. Run it on a quiet
machine: other processes competing for the CPUs show up as gaps and tails,
so the figures carry the load average, and the gaps seen during reloads are
held to 5 ms or to what the same loop sees without reloads, for as long, in
the same run (the machine's own noise), whichever is more.
"""

from __future__ import annotations

import json

import pytest

from gateway.policy.bench import bench_decisions


@pytest.mark.bench
@pytest.mark.timeout(1800)
def test_policy_decisions_at_10000_rules_and_1000_units() -> None:
    figures = bench_decisions(rules=10_000, units=1_000, reloads=5)
    print(json.dumps(figures, indent=2))
    context = f"load average {figures['loadavg_1m_at_start']:.1f} on {figures['cpus']} CPUs"
    assert figures["decide_p99_us"] <= 20, context
    assert figures["during_reloads_decide_p99_us"] <= 20, context
    assert figures["first_decide_after_swap_median_us"] <= 20, context
    noise = figures["max_gap_without_reloads_ms"]
    assert figures["max_gap_during_reloads_ms"] <= max(5.0, noise), f"{context}; without reloads: {noise:.1f} ms"
