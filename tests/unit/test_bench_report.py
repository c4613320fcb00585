"""`psngw bench`'s report and load generator, without a network.

The report: the second measurement of the direct baseline, and what the report says about it (pure functions on
report dicts). The load generator: its closed loop with think time, over a fake channel.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import bench
from gateway.bench import _drift_lines, evaluate_targets, render_report


def _row(target: str, calls_per_s: float, *, p50: float = 1.0, ratio: float | None = None) -> dict[str, Any]:
    return {
        "target": target,
        "status": "ok",
        "calls_per_s": calls_per_s,
        "ratio_to_direct": ratio,
        "p50_ms": p50,
        "p90_ms": p50,
        "p99_ms": p50,
        "added_p50_ms": None,
        "added_p99_ms": None,
        "cpu_ratio_to_direct": None,
        "total_cpu_s_per_call": None,
        "errors": {},
        "hops": [],
        "stages": ["mtls"],
        "all_stages_on": True,
        "machine_cpu_busy": 0.9,
        "other_cpu_busy": 0.0,
        "note": "",
        "label": target,
        "route": target,
    }


def _report(drift: float | None) -> dict[str, Any]:
    again = None if drift is None else {"calls_per_s": 1000.0 * (1 + drift), "p50_ms": 1.0, "p99_ms": 2.0, "errors": {}}
    block = {
        "description": "unary",
        "payload_bytes": 1024,
        "rows": [_row("direct", 1000.0, ratio=1.0), _row("gateway-2", 130.0, ratio=0.13)],
        "direct_again": again,
        "direct_drift": drift,
    }
    return {
        "date": "2026-11-26T00:00:00+00:00",
        "machine": {"cores": 2, "python": "3.11", "grpcio": "1", "loop": "uvloop"},
        "options": {"calls": None, "duration": 1.0, "warmup": 0.0, "concurrency": 64},
        "network": {"caller_force": "thames-valley", "host_force": "hampshire"},
        "workloads": {"unary": block},
        "memory": None,
        "profile": None,
        "targets": {},
    }


def test_a_steady_baseline_is_reported_without_a_warning() -> None:
    report = _report(0.04)
    lines = _drift_lines(report["workloads"]["unary"])
    assert len(lines) == 1 and "again after the others" in lines[0] and "+4.0 % calls/s" in lines[0]
    assert evaluate_targets(report)["two_gateways_throughput_ratio"]["note"] == ""


def test_a_baseline_that_moved_warns_and_the_targets_say_so() -> None:
    for drift in (0.15, -0.12):
        report = _report(drift)
        lines = _drift_lines(report["workloads"]["unary"])
        assert len(lines) == 2 and lines[1].startswith("warning: the direct baseline moved"), lines
        note = evaluate_targets(report)["two_gateways_throughput_ratio"]["note"]
        assert note == f"the direct baseline moved {drift * 100:+.0f} % during the workload"
        report["targets"] = evaluate_targets(report)
        assert "warning: the direct baseline moved" in render_report(report)


def test_a_baseline_measured_once_adds_nothing() -> None:
    report = _report(None)
    assert _drift_lines(report["workloads"]["unary"]) == []
    assert evaluate_targets(report)["two_gateways_throughput_ratio"]["note"] == ""


# -- the load generator's think time ------------------------------------------------------------


class _Channel:
    async def channel_ready(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _load(monkeypatch: pytest.MonkeyPatch, think: float, calls: int) -> dict[str, Any]:
    """`_run_load` for `calls` calls over a fake channel whose calls end at once."""
    monkeypatch.setattr(bench, "_open_channels", lambda _target, count: [_Channel() for _ in range(count)])

    async def instant() -> None:
        await asyncio.sleep(0)

    monkeypatch.setattr(bench, "_make_caller", lambda *_args: instant)
    cmd = {
        "target": {"method": "/psn.bench.v1.Echo1/Unary", "metadata": []},
        "workload": "unary",
        "concurrency": 2,
        "warmup": 0.0,
        "duration": None,
        "calls": calls,
        "timeout": 5.0,
        "think": think,
    }
    return asyncio.run(bench._run_load(cmd))


def test_think_time_spaces_each_callers_calls(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two callers, 20 calls, 50 ms of think time after each: each caller makes its tenth call after nine pauses.
    slow = _load(monkeypatch, 0.05, 20)
    assert slow["calls"] == 20 and slow["seconds"] >= 9 * 0.05
    fast = _load(monkeypatch, 0.0, 20)
    assert fast["calls"] == 20 and fast["seconds"] < 9 * 0.05
    assert '"event": "measuring"' in capsys.readouterr().out
