"""`psngw bench` runs end to end for about a second and its JSON report has every field.

A smoke test only: no figure is asserted (timings are not tests). It starts a
real network (three gateways, the backends and the load generator as
processes), so it is an integration test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main

pytestmark = pytest.mark.integration

TOP_FIELDS = {
    "schema",
    "date",
    "machine",
    "options",
    "network",
    "workloads",
    "memory",
    "profile",
    "components",
    "targets",
}
MACHINE_FIELDS = {
    "cores",
    "usable_cores",
    "cpu_model",
    "memory_mb",
    "python",
    "implementation",
    "grpcio",
    "uvloop",
    "loop",
    "platform",
    "commit",
}
ROW_FIELDS = {
    "target",
    "label",
    "route",
    "status",
    "note",
    "stages",
    "all_stages_on",
    "calls",
    "errors",
    "seconds",
    "calls_per_s",
    "mib_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "max_ms",
    "ratio_to_direct",
    "total_cpu_s_per_call",
    "cpu_ratio_to_direct",
    "added_p50_ms",
    "added_p99_ms",
    "hops",
    "backend_cpu_s_per_call",
    "loadgen_cpu_s_per_call",
    "machine_cpu_busy",
    "other_cpu_busy",
}
HOP_FIELDS = {
    "name",
    "kind",
    "stages",
    "stages_source",
    "cpu_s_per_call",
    "peak_rss_mb",
    "rss_mb",
    "stage_ms",
    "records_per_commit",
    "calls_per_relay_message",
}
MEMORY_FIELDS = {"status", "route", "note", "calls", "concurrency", "errors", "calls_per_s", "samples", "gateways"}
MEMORY_GATEWAY_FIELDS = {
    "rss_max_mb",
    "rss_after_warmup_mb",
    "rss_end_mb",
    "growth_mb",
    "slope_mb_per_10k_calls",
    "peak_rss_mb",
    "flat",
}
TARGET_NAMES = {
    "two_gateways_throughput_ratio",
    "unloaded_added_p50_ms",
    "unloaded_added_p99_ms",
    "server_stream_ratio",
    "two_gateways_over_two_python_proxies",
    "gateway_rss_mb",
}


def _our_children(root: Path) -> list[str]:
    """Command lines of processes still running with the bench's network folder in their arguments.

    Every process `psngw bench` starts (gateways, backends, load generator) names that folder.
    """
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmd and "pytest" not in cmd:
            out.append(cmd)
    return out


def test_bench_json_has_every_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    root = tmp_path / "net"
    code = main(
        [
            "bench",
            "--workload",
            "all",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--concurrency",
            "4",
            "--memory",
            "--memory-calls",
            "1000",
            "--profile",
            "--profile-workload",
            "server-stream",
            "--json",
            str(out),
            "--root",
            str(root),
        ]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert out.exists(), f"psngw bench exited {code} without its JSON:\n{printed[-3000:]}\n{captured.err[-3000:]}"
    report = json.loads(out.read_text())

    assert report.keys() >= TOP_FIELDS
    assert report["schema"] == "psngw-bench/1"
    assert report["machine"].keys() >= MACHINE_FIELDS
    assert report["machine"]["cores"] >= 1
    assert set(report["workloads"]) == {"unary", "server-stream", "client-stream"}
    for name, block in report["workloads"].items():
        targets = [r["target"] for r in block["rows"]]
        assert targets == [
            "direct",
            "gateway-1",
            "gateway-2",
            "gateway-2-grpc",
            "pyproxy-1",
            "pyproxy-2",
            "nginx-1",
            "nginx-2",
        ], name
        for row in block["rows"]:
            assert row.keys() >= ROW_FIELDS, (name, row["target"])
            assert row["status"] in {"ok", "failed", "skipped"}
            for hop in row["hops"]:
                assert hop.keys() >= HOP_FIELDS
        direct = block["rows"][0]
        assert direct["status"] == "ok", direct["note"]
        assert direct["calls"] > 0
        assert direct["ratio_to_direct"] == 1.0
        assert direct["p50_ms"] <= direct["p90_ms"] <= direct["p99_ms"]
        # The baseline is measured again after the other targets, and how far it moved is reported.
        again = block["direct_again"]
        if any(r["status"] == "ok" for r in block["rows"][1:]):
            assert again is not None and again["calls_per_s"] > 0, name
            assert block["direct_drift"] == round(again["calls_per_s"] / direct["calls_per_s"] - 1, 4)
        else:
            assert again is None  # nothing to compare with the baseline: it is not measured twice
        one = block["rows"][1]
        if one["status"] == "ok":
            assert [h["name"] for h in one["hops"]] == ["gateway thames-valley"]
            assert one["hops"][0]["cpu_s_per_call"] is not None
            assert one["hops"][0]["records_per_commit"] >= 1.0  # from the gateway's /metrics: every call recorded
            assert one["ratio_to_direct"] is not None
        else:
            assert one["note"]  # a refused probe says why
    assert report["memory"].keys() >= MEMORY_FIELDS
    for gateway in report["memory"]["gateways"].values():
        assert gateway.keys() >= MEMORY_GATEWAY_FIELDS
    # The profile samples the workload asked for (with py-spy when installed, else the threads' CPU alone).
    profile = report["profile"]
    assert profile["status"] == "ok", profile["note"]
    assert profile["workload"] == "server-stream" and profile["route"] in {"gateway-2", "gateway-1"}
    assert report["options"]["profile_workload"] == "server-stream"
    for gateway in profile["gateways"].values():
        assert gateway["cpu_s_per_call"] > 0 and gateway["threads"]
    assert "server-stream" in printed.split("profile (")[1].splitlines()[0]
    assert set(report["targets"]) == TARGET_NAMES
    for target in report["targets"].values():
        assert {"target", "measured", "met", "note"} <= target.keys()
    # The terminal table shows the same rows.
    assert "direct" in printed and "gateway-2" in printed
    assert printed.count("again after the others") == sum(
        b["direct_again"] is not None for b in report["workloads"].values()
    )
    assert code in (0, 1)  # 1: a route refused calls (the table says why); never a crash
    # No process it started outlives it.
    assert _our_children(root) == []
