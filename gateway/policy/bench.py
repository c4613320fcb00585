"""The policy benchmark: decision latency, build time, and reloads under load.

`bench_decisions` writes a synthetic network directory and policy (`rules`
p rows over `units` units, plus groups of units and application groups) to a
temporary directory and measures, in one run:

- the time to load it (read, validate, build the fast path, check against
  casbin), and each step separately;
- the latency of `Policy.decide` over many mixed requests (p50, p99, max),
  and of casbin's own enforce over every row on a few of them, for the ratio;
- the first decision after each of several reloads;
- the longest gap a thread deciding in a tight loop sees while another thread
  reloads the policy again and again, against the same loop without reloads.

Figures are in microseconds (``_us``), milliseconds (``_ms``) or seconds
(``_s``). `psngw bench` and the ``bench``-marked test call it.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.directory import NetworkDirectory, load_directory
from gateway.policy.decide import Policy, build_policy
from gateway.policy.engine import casbin_oracle
from gateway.policy.files import parse_policy, read_policy_source
from gateway.policy.live import PolicyHolder
from gateway.policy.load import load_policy
from gateway.policy.values import DecisionRequest
from gateway.policy.verify import verify_against_casbin

__all__ = ["bench_decisions", "write_synthetic_policy"]

_LEVELS = ("NPPV1", "NPPV2", "NPPV3", "SC", "DV")
_MODEL = Path(__file__).resolve().parents[2] / "policies" / "model.conf"


def write_synthetic_policy(root: Path, *, rules: int, units: int, seed: int = 1) -> NetworkDirectory:
    """Write directory.toml and a policy of `rules` p rows over `units` units under `root`."""
    # Not security: a reproducible synthetic policy.
    rng = random.Random(seed)  # noqa: S311  # a reproducible synthetic policy, not a secret
    forces = ["thames-valley", "hampshire", "surrey"]
    roles = [f"role-{i:02d}" for i in range(20)]
    unit_force = {f"u-{i:04d}": (None if i % 3 == 0 else forces[i % len(forces)]) for i in range(units)}
    apps = {f"app-{i:02d}": f"bench.app{i:02d}.v1.Service{i:02d}" for i in range(40)}
    methods = {app: [f"/{svc}/Method{j}" for j in range(5)] for app, svc in apps.items()}
    lines = ['network = "se.psn"', f"clearance_levels = {list(_LEVELS)!r}".replace("'", '"')]
    lines.append("roles = [" + ", ".join(f'"{r}"' for r in roles) + "]")
    for i, force in enumerate(forces):
        lines += [f"[forces.{force}]", f'ca = "pki/{force}/ca.pem"', f'peer_address = "127.0.0.1:{7441 + i}"']
    for unit, owner in unit_force.items():
        lines.append(f"[units.{unit}]")
        if owner is not None:
            lines.append(f'force = "{owner}"')
    for app, svc in apps.items():
        lines += [f"[applications.{app}]", f'host = "{rng.choice(forces)}"', f'min_clearance = "{rng.choice(_LEVELS)}"']
        lines.append(f'[applications.{app}.services."{svc}"]')
        lines += [f'Method{j} = "unary"' for j in range(5)]
    (root / "directory.toml").write_text("\n".join(lines) + "\n")

    policy = root / "policy"
    (policy / "rules").mkdir(parents=True)
    (policy / "model.conf").write_bytes(_MODEL.read_bytes())
    groups = [f"group:g-{i:02d}" for i in range(50)]
    group_rows = [f"g2, /{svc}/*, app:{app}" for app, svc in apps.items()]
    unit_names = list(unit_force)
    for unit in unit_names:
        owner = unit_force[unit]
        for member_of in [owner] if owner else rng.sample(forces, 2):
            group_rows.append(f"g, unit:{unit}, {rng.choice(groups)}, {member_of}")
    (policy / "groups.csv").write_text("\n".join(group_rows) + "\n")
    rows = []
    for _ in range(rules):
        kind = rng.random()
        if kind < 0.7:
            unit = rng.choice(unit_names)
            subject, where = f"unit:{unit}", unit_force[unit] or rng.choice(forces)
        else:
            subject = f"role:{rng.choice(roles)}" if kind < 0.85 else rng.choice(groups)
            where = rng.choice(forces)
        app = rng.choice(list(apps))
        obj = rng.choice([f"app:{app}", f"app:{app}", f"/{apps[app]}/*", rng.choice(methods[app])])
        effect = "deny" if rng.random() < 0.1 else "allow"
        if effect == "deny" and rng.random() < 0.3:
            where = "*"
        rows.append(f"p, {subject}, {where}, {obj}, {effect}")
    per_file = max(1, len(rows) // 10)
    for i in range(0, len(rows), per_file):
        (policy / "rules" / f"part-{i // per_file:02d}.csv").write_text("\n".join(rows[i : i + per_file]) + "\n")
    return load_directory(root / "directory.toml")


def _requests(directory: NetworkDirectory, count: int, rng: random.Random) -> list[DecisionRequest]:
    forces = sorted(directory.forces)
    methods = [r.method.path for r in directory.all_methods()]
    by_force = {f: [u for u, unit in directory.units.items() if unit.force in (None, f)] for f in forces}
    out = []
    for i in range(count):
        force = rng.choice(forces)
        units = tuple(rng.sample(by_force[force], rng.randint(1, 3)))
        if i % 20 == 0:
            units = (*units[:-1], f"unknown-{i}")
        roles = tuple(rng.sample(directory.roles, rng.randint(0, 2)))
        out.append(DecisionRequest(force, units, roles, rng.choice(_LEVELS), rng.choice(methods)))
    return out


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {
        "p50_us": ordered[n // 2] / 1000,
        "p99_us": ordered[min(n - 1, int(n * 0.99))] / 1000,
        "p999_us": ordered[min(n - 1, int(n * 0.999))] / 1000,
        "max_us": ordered[-1] / 1000,
    }


def _time_decisions(policy: Policy, requests: list[DecisionRequest]) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    decide = policy.decide
    for request in requests:
        start = clock()
        decide(request)
        samples.append(clock() - start)
    return samples


@dataclass
class _LoopStats:
    """What a thread deciding in a tight loop saw (latencies: every 16th decision)."""

    decisions: int = 0
    max_gap_s: float = 0.0
    gaps_over_5ms: int = 0
    first_after_swap_ns: list[int] = field(default_factory=list)
    latencies_ns: list[int] = field(default_factory=list)


@contextmanager
def _gc_pauses(out: list[float]) -> Iterator[None]:
    """Collect the length (ms) of every full (generation 2) collection while inside."""
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            out.append(round((time.perf_counter() - started[0]) * 1000, 2))

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


def _decide_loop_while(holder: PolicyHolder, requests: list[DecisionRequest], work: Callable[[], object]) -> _LoopStats:
    """Run `work()` while another thread decides in a loop on `holder.current`."""
    stop = threading.Event()
    stats = _LoopStats()

    def loop() -> None:
        clock = time.perf_counter_ns
        n = len(requests)
        seen = holder.current
        last = clock()
        count = 0
        while not stop.is_set():
            policy = holder.current
            start = clock()
            policy.decide(requests[count % n])
            end = clock()
            if policy is not seen:
                stats.first_after_swap_ns.append(end - start)
                seen = policy
            if not count & 15:
                stats.latencies_ns.append(end - start)
            gap = end - last
            if gap > 5_000_000:
                stats.gaps_over_5ms += 1
            stats.max_gap_s = max(stats.max_gap_s, gap / 1e9)
            last = end
            count += 1
        stats.decisions = count

    thread = threading.Thread(target=loop, name="decide-loop")
    thread.start()
    try:
        work()
    finally:
        stop.set()
        thread.join()
    return stats


def _bench_build(policy_dir: Path, directory: NetworkDirectory) -> dict[str, Any]:
    """Each step of a load, single-threaded and unpaced."""
    t0 = time.perf_counter()
    source = read_policy_source(policy_dir)
    parsed, findings = parse_policy(source, directory)
    t1 = time.perf_counter()
    if parsed is None:
        raise RuntimeError(f"synthetic policy rejected: {[str(f) for f in findings if f.is_error][:3]}")
    policy = build_policy(parsed, directory)
    t2 = time.perf_counter()
    problems = verify_against_casbin(policy)
    t3 = time.perf_counter()
    if problems:
        raise RuntimeError(f"fast path disagrees with casbin: {problems[0]}")
    return {
        "parse_validate_s": t1 - t0,
        "build_fast_path_s": t2 - t1,
        "casbin_check_s": t3 - t2,
        "g_links": len(parsed.groups),
        "table_entries": policy.table_size(),
    }


def _bench_casbin(policy: Policy, requests: list[DecisionRequest]) -> float:
    """Median time of casbin's own enforce over every row, one subject each, microseconds."""
    samples = []
    with casbin_oracle(policy.parsed, partition=False) as oracle:
        for request in requests[:20]:
            start = time.perf_counter_ns()
            oracle.subject_effect(f"unit:{request.units[0]}", request.origin_force, request.method)
            samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def bench_decisions(
    rules: int = 10_000, units: int = 1_000, *, decisions: int = 200_000, reloads: int = 5, seed: int = 1
) -> dict[str, Any]:
    """Measure the policy fast path at `rules` rows and `units` units; figures as a dict."""
    rng = random.Random(seed)  # noqa: S311  # a reproducible benchmark, not a secret
    with tempfile.TemporaryDirectory(prefix="psngw-policy-bench-") as tmp:
        root = Path(tmp)
        directory = write_synthetic_policy(root, rules=rules, units=units, seed=seed)
        policy_dir = root / "policy"
        out: dict[str, Any] = {
            "rules": rules,
            "units": units,
            "methods": len(directory.all_methods()),
            "cpus": os.cpu_count(),
            # Other work on the machine shows in gaps and tails: say how busy it was.
            "loadavg_1m_at_start": os.getloadavg()[0],
        }
        out |= _bench_build(policy_dir, directory)
        start = time.perf_counter()
        holder = PolicyHolder(load_policy(policy_dir, directory))
        out["load_policy_s"] = time.perf_counter() - start

        requests = _requests(directory, decisions, rng)
        _time_decisions(holder.current, requests[:2000])  # warm up
        out |= {f"decide_{k}": v for k, v in _percentiles(_time_decisions(holder.current, requests)).items()}
        sample = requests[:10_000]
        out["allowed_fraction"] = sum(holder.current.decide(r).allowed for r in sample) / len(sample)
        out["casbin_enforce_p50_us"] = _bench_casbin(holder.current, requests)
        out["casbin_over_fast_p50"] = out["casbin_enforce_p50_us"] / out["decide_p50_us"]

        # A decide loop in one thread, reloads in another (as a gateway reloads beside traffic);
        # then the same loop alone, as long. The loop notes its first decision on each new policy.
        def reload_all() -> None:
            for _ in range(reloads):
                holder.reload(policy_dir, directory)
            time.sleep(0.5)  # let the loop meet the last policy

        start = time.perf_counter()
        pauses: list[float] = []
        with _gc_pauses(pauses):
            busy = _decide_loop_while(holder, requests, reload_all)
        elapsed = time.perf_counter() - start
        quiet = _decide_loop_while(holder, requests, lambda: time.sleep(min(elapsed, 60.0)))
        out |= {f"during_reloads_decide_{k}": v for k, v in _percentiles(busy.latencies_ns).items()}
        out |= {
            "reload_under_load_s": elapsed / reloads,
            "full_gc_pauses_during_reloads_ms": pauses,
            "first_decide_after_swap_max_us": max(busy.first_after_swap_ns) / 1000,
            "first_decide_after_swap_median_us": statistics.median(busy.first_after_swap_ns) / 1000,
            "first_decide_after_swap_us": [round(ns / 1000, 1) for ns in busy.first_after_swap_ns],
            "max_gap_during_reloads_ms": busy.max_gap_s * 1000,
            "max_gap_without_reloads_ms": quiet.max_gap_s * 1000,
            "gaps_over_5ms_during_reloads": busy.gaps_over_5ms,
            "gaps_over_5ms_without_reloads": quiet.gaps_over_5ms,
            "decisions_during_reloads": busy.decisions,
            "loadavg_1m_at_end": os.getloadavg()[0],
        }
        return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench_decisions(), indent=2))
