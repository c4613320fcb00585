"""`psngw bench`: what the gateway costs, measured against the bare transport in the same run.

The command starts its own three-force network on loopback: the three gateways
as ``psngw serve`` processes, every hosted application (the raw echo backends
included) as ``python -m gateway.demo.appserve`` processes, and a load generator
(grpc.aio, closed loop: a fixed number of calls in flight) in a process of its
own. Every process shares the machine's cores, as a real deployment on one host
would. It then measures, one after the other and for the same workload:

- ``direct``: mutual TLS straight to the echo backend (the backend only answers
  its force's gateway, so the load generator presents that gateway's TLS
  certificate);
- ``gateway-1``: through one gateway (the caller's own force hosts the echo);
- ``gateway-2``: through two gateways (another force hosts it: origin gateway,
  signed relay, host gateway);
- ``pyproxy-1`` and ``pyproxy-2``: one and two transparent grpc.aio proxies in
  series (mTLS, raw bytes, no checks: ``python -m gateway.bench proxy``), the
  floor any Python hop starts from; issue 7's throughput target is "faster than
  two of these";
- ``nginx-1`` and ``nginx-2``: one and two nginx mTLS gRPC proxies in series, as
  a reference, when ``nginx`` is on PATH (skipped with a note otherwise).

For each: calls/s, latency percentiles, CPU seconds per call of each hop's
process group (``/proc/<pid>/stat`` utime+stime over the measured window),
peak and current RSS of each hop (``VmHWM``, ``VmRSS``), and the ratio to
direct. Calls through a gateway carry what an application's calls carry: an
officer token minted by the network's development identity provider
(`gateway.token.DevIdp`) and the purpose metadata (`gateway.purpose`); the
direct calls carry the same metadata, so the client side does the same work.

``--memory`` runs 100,000 calls through two gateways and samples RSS as they go;
``--profile`` samples the two gateways with py-spy (when installed) during a
separate two-gateway run (unary calls, or the workload ``--profile-workload``
names) and splits each gateway's CPU per call by stage.
``--components`` adds the component benchmarks of the audit log and the policy.

Everything listens on 127.0.0.1 only. Every process the command starts is in a
process group of its own and is stopped on exit, on Ctrl-C, on SIGTERM and on
errors; children also get SIGTERM if this process dies (``PR_SET_PDEATHSIG``).

The module is also the entry of the bench's own children: ``python -m gateway.bench
loadgen`` (the load generator: JSON commands on stdin, JSON events on stdout, one
per line) and ``python -m gateway.bench proxy`` (the transparent reference proxy).

Owns: the benchmark (orchestration, load generator, report). Does not own: the
network layout (`gateway.demo.network`), the applications (`gateway.demo.apps`),
the gateway (`gateway.server`). docs/performance.md explains the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import http.client
import importlib.metadata
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from gateway.errors import ConfigError, InfrastructureError

if TYPE_CHECKING:
    import grpc.aio

    from gateway.demo.network import NetworkLayout
    from gateway.pki import Issued

__all__ = [
    "HOP_FIELDS",
    "ROW_FIELDS",
    "TARGETS",
    "WORKLOADS",
    "BenchError",
    "BenchOptions",
    "Workload",
    "classify_stack",
    "configured_stages",
    "evaluate_targets",
    "nginx_config",
    "options_from_args",
    "parse_counters",
    "parse_stage_durations",
    "percentiles",
    "register_cli",
    "render_report",
    "run_bench",
]

SCHEMA = "psngw-bench/1"
_KIB = 1024
_MIB = 1024 * 1024
_CHUNK = 64 * _KIB


class BenchError(InfrastructureError):
    """The benchmark could not run: a process did not start, or the load generator failed."""


# -- what is measured ------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One kind of call the load generator makes against the echo backend."""

    name: str
    method: str  #: the echo method (psn.bench.v1.EchoN/<method>)
    description: str
    payload_bytes: int  #: the bytes a call moves in its main direction (for MiB/s)


#: The workloads, by their ``--workload`` name.
WORKLOADS: dict[str, Workload] = {
    "unary": Workload("unary", "Unary", "unary, 1 KiB request, 1 KiB response", _KIB),
    "server-stream": Workload("server-stream", "ServerStream", "server stream, 1 MiB in 64 KiB messages", _MIB),
    "client-stream": Workload(
        "client-stream", "ClientStream", "client stream, 16 x 64 KiB in, 64 KiB out", 16 * _CHUNK
    ),
}

#: The routes, by their ``--targets`` name: (label, kind).
TARGETS: dict[str, str] = {
    "direct": "direct mTLS to the backend",
    "gateway-1": "one gateway (own force's app)",
    "gateway-2": "two gateways (other force's app)",
    "gateway-2-grpc": "two gateways, relay channels over gRPC (Relay/Mux)",
    "pyproxy-1": "one transparent Python aio proxy",
    "pyproxy-2": "two transparent Python aio proxies",
    "nginx-1": "one nginx mTLS proxy",
    "nginx-2": "two nginx mTLS proxies",
}

#: Fields of every row of a workload in the JSON report.
ROW_FIELDS = (
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
)

#: Fields of every hop (a gateway or a proxy) of a row.
HOP_FIELDS = (
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
)

#: Above this share of the cores used by other processes, the report warns that figures are skewed.
_OTHER_LOAD_WARNING = 0.05
#: How far the direct baseline may move between the start and the end of a workload before the report warns.
_DRIFT_WARNING = 0.10

#: The stages a gateway must have on for the issue-7 targets to count ("everything on").
_LOCAL_STAGES = ("mtls", "token", "purpose", "policy", "audit")
_RELAY_STAGES = ("signed-envelopes",)


# -- the pure core: statistics, stages, report ---------------------------------------------


def percentiles(samples: Sequence[float], qs: Sequence[float] = (0.5, 0.9, 0.99)) -> list[float]:
    """Nearest-rank percentiles of `samples` (any order); NaN for each when there are none."""
    if not samples:
        return [math.nan for _ in qs]
    ordered = sorted(samples)
    n = len(ordered)
    return [ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] for q in qs]


def configured_stages(config_text: str) -> list[str]:
    """The security stages a gateway config enables, from its TOML text (in pipeline order).

    ``mtls`` is always on. The others are on when their table is present:
    ``[tokens]``, ``[purpose]``, ``[policy]``, ``[audit]``, ``[rate_limits]``,
    and ``[signing]`` (signed envelopes on the relay between gateways).
    """
    try:
        doc = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"gateway config is not TOML: {exc}") from exc
    stages = ["mtls"]
    for table, stage in (
        ("tokens", "token"),
        ("purpose", "purpose"),
        ("rate_limits", "rate-limits"),
        ("policy", "policy"),
        ("signing", "signed-envelopes"),
        ("audit", "audit"),
    ):
        if isinstance(doc.get(table), dict):
            stages.append(stage)
    return stages


_STAGE_LABEL = re.compile(r'stage="([^"\\]*)"')


def parse_stage_durations(metrics_text: str) -> dict[str, tuple[float, float]]:
    """Stage -> (seconds, count) from the gateway's ``psngw_stage_duration_seconds`` histogram (Prometheus text)."""
    out: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        for suffix, index in (("_sum{", 0), ("_count{", 1)):
            if line.startswith("psngw_stage_duration_seconds" + suffix):
                match = _STAGE_LABEL.search(line)
                if match is None:
                    continue
                with contextlib.suppress(ValueError, IndexError):
                    out.setdefault(match.group(1), [0.0, 0.0])[index] += float(line.rsplit(None, 1)[1])
    return {stage: (v[0], v[1]) for stage, v in out.items()}


#: The unlabelled series the bench reads: audit records and commits, relay requests and messages.
_COUNTERS = (
    "psngw_audit_records_total",
    "psngw_audit_commit_seconds_count",
    "psngw_relay_requests_total",
    "psngw_relay_messages_total",
)


def parse_counters(metrics_text: str) -> dict[str, float]:
    """The values of `_COUNTERS` so far in the gateway's /metrics (Prometheus text); absent ones are 0."""
    out = dict.fromkeys(_COUNTERS, 0.0)
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name in out:
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


@dataclass(frozen=True)
class _Scrape:
    """What the bench reads from a gateway's /metrics at each end of a window."""

    stages: dict[str, tuple[float, float]]
    counters: dict[str, float]


def _stage_ms(before: _Scrape, after: _Scrape) -> dict[str, float]:
    """Mean wall-clock milliseconds per pass through each stage between two scrapes."""
    out = {}
    for stage, (total, count) in after.stages.items():
        total0, count0 = before.stages.get(stage, (0.0, 0.0))
        if count > count0:
            out[stage] = round((total - total0) / (count - count0) * 1e3, 4)
    return out


def _per(before: _Scrape | None, after: _Scrape | None, counted: str, per: str) -> float | None:
    """How many `counted` per `per` between two scrapes (records per commit...); None if there was no `per`."""
    if before is None or after is None:
        return None
    denominator = after.counters[per] - before.counters[per]
    return round((after.counters[counted] - before.counters[counted]) / denominator, 2) if denominator > 0 else None


def _all_on(hop_stages: Sequence[Sequence[str]]) -> bool:
    """Whether the gateways of a route have every security stage on between them (the issue's "everything on")."""
    if not hop_stages:
        return False
    needed = set(_LOCAL_STAGES) | (set(_RELAY_STAGES) if len(hop_stages) > 1 else set())
    return needed <= {s for stages in hop_stages for s in stages}


#: Where a sampled stack's time goes: the first of these found in the innermost
#: frame of a gateway module names its stage.
_STAGE_OF_MODULE: tuple[tuple[str, str], ...] = (
    ("/gateway/token.py", "token"),
    ("/gateway/purpose.py", "purpose"),
    ("/gateway/metadata.py", "metadata"),
    ("/gateway/policy/", "policy"),
    ("/gateway/envelope.py", "envelope sign/verify"),
    ("/gateway/replay.py", "envelope sign/verify"),
    ("/gateway/audit/", "audit"),
    ("/gateway/identity.py", "peer identity"),
    ("/gateway/pipeline.py", "pipeline (route, deadline)"),
    ("/gateway/logs.py", "operator log"),
    ("/gateway/relay.py", "relay"),
    ("/gateway/relaylink.py", "relay"),
    ("/gateway/mux.py", "relay"),
    ("/gateway/forward.py", "forward"),
    ("/gateway/tls.py", "channels"),
    ("/gateway/server.py", "edge"),
)
#: Stages that only move bytes to or from gRPC: a stack ending inside grpc under them is transport.
_EDGE_STAGES = frozenset({"edge", "relay", "forward", "channels"})


def _frame_file(frame: str) -> str:
    start, end = frame.rfind("("), frame.rfind(")")
    return frame[start + 1 : end] if 0 <= start < end else ""


def classify_stack(frames: Sequence[str], thread: str = "") -> str:
    """The stage a sampled stack (outermost frame first, py-spy ``func (file:line)`` form) belongs to.

    The innermost frame in a gateway module names the stage (a security stage keeps the time spent in the
    libraries it calls: pyjwt, cryptography, sqlite). Time in grpc under the server, relay or forwarding code
    is transport. A stack with no gateway frame is grpc's poller thread, or the event loop running grpc's
    compiled callbacks on the loop thread.
    """
    if "_poll_wrapper" in thread:
        return "transport (grpc poller thread)"
    files = [_frame_file(f) for f in frames]
    leaf = files[-1] if files else ""
    if "/logging/" in leaf:
        return "operator log"
    stage = next((st for path in reversed(files) for fragment, st in _STAGE_OF_MODULE if fragment in path), None)
    if stage is not None:
        edge_in_grpc = stage in _EDGE_STAGES and ("/grpc/" in leaf or "/asyncio/" in leaf)
        return "transport (grpc or asyncio streams, Python side)" if edge_in_grpc else stage
    if any("/grpc/" in path for path in files):
        return "transport (grpc or asyncio streams, Python side)"
    if any("/asyncio/" in path or "uvloop" in path for path in files):
        return "event loop + compiled callbacks (grpc, uvloop TLS; loop thread)"
    return "other"


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _row_line(row: Mapping[str, Any]) -> str:
    hops = row["hops"]
    cpu = " ".join(_f(None if h["cpu_s_per_call"] is None else h["cpu_s_per_call"] * 1e3) for h in hops) or "-"
    rss = " ".join(f"{_f(h['peak_rss_mb'], 0)}" for h in hops) or "-"
    return (
        f"{row['target']:<10} {_f(row['calls_per_s'], 1):>9} {_f(row['ratio_to_direct']):>6} "
        f"{_f(row['cpu_ratio_to_direct']):>5} "
        f"{_f(row['p50_ms']):>7} {_f(row['p90_ms']):>7} {_f(row['p99_ms']):>7} "
        f"{_f(row['added_p50_ms']):>7} {_f(row['added_p99_ms']):>7} {cpu:>13} {rss:>9} "
        f"{_f((row['machine_cpu_busy'] or 0) * 100, 0):>4} {_f((row['other_cpu_busy'] or 0) * 100, 0):>5}  "
        f"{'+'.join(dict.fromkeys(s for h in hops for s in h['stages'])) or 'mtls'}"
    )


def render_report(report: Mapping[str, Any]) -> str:
    """The terminal table of a report (the same numbers as the JSON)."""
    opts = report["options"]
    machine = report["machine"]
    window = f"{opts['calls']} calls" if opts["calls"] else f"{opts['duration']:g} s"
    lines = [
        f"psngw bench  {report['date']}  {machine['cores']} cores  Python {machine['python']}  "
        f"grpcio {machine['grpcio']}  loop {machine['loop']}",
        f"{opts['concurrency']} calls in flight, {window} after {opts['warmup']:g} s warm-up"
        + (f", {opts['think_ms']:g} ms think time after each call; " if opts.get("think_ms") else "; ")
        + f"caller {report['network']['caller_force']}, host {report['network']['host_force']}",
    ]
    header = (
        f"{'target':<10} {'calls/s':>9} {'ratio':>6} {'cpu-r':>5} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'+p50':>7} {'+p99':>7} {'CPU ms/call':>13} {'peak MB':>9} {'busy':>4} {'other':>5}  stages"
    )
    for name, block in report["workloads"].items():
        lines += ["", f"{name}: {block['description']}", header]
        for row in block["rows"]:
            if row["status"] == "ok":
                lines.append(_row_line(row))
                for hop in row["hops"]:
                    if hop["stage_ms"]:
                        parts = ", ".join(f"{k} {v:.3f}" for k, v in hop["stage_ms"].items())
                        if hop["records_per_commit"] is not None:
                            parts += f"; audit records per commit {hop['records_per_commit']:.2f}"
                        if hop["calls_per_relay_message"] is not None:
                            parts += f"; calls per relay message {hop['calls_per_relay_message']:.2f}"
                        lines.append(f"{'':<10} {hop['name']} stage wall ms: {parts}")
                if row["errors"]:
                    lines.append(f"{'':<10} errors: {row['errors']}")
            else:
                lines.append(f"{row['target']:<10} {row['status']}: {row['note']}")
        lines += _drift_lines(block)
        other = max((r["other_cpu_busy"] or 0.0 for r in block["rows"] if r["status"] == "ok"), default=0.0)
        if other > _OTHER_LOAD_WARNING:
            lines.append(
                f"warning: other processes used up to {other * 100:.0f} % of the cores during this workload: "
                "its ratios are less reliable (run on a quiet machine)"
            )
        if opts["concurrency"] == 1:
            two = next((r for r in block["rows"] if r["target"] == "gateway-2" and r["status"] == "ok"), None)
            if two is not None:
                lines.append(
                    f"unloaded: two gateways add {_f(two['added_p50_ms'])} ms at p50 and "
                    f"{_f(two['added_p99_ms'])} ms at p99 over direct (targets: 3 ms, 10 ms)"
                )
    lines += [
        "",
        "ratio: calls/s over direct's in this run; +p50/+p99: added latency over direct;",
        "cpu-r: direct's CPU per call (all the bench's processes) over the row's: the ratio when CPU-bound alone;",
        "CPU ms/call and peak MB: each hop's process group, in route order (peak = VmHWM since start);",
        "busy: % of all cores in use during the window (near 100: CPU-bound; well below: waiting somewhere);",
        "other: % of all cores used by processes the bench did not start (above 5: other work skews the figures)",
    ]
    lines += _memory_lines(report.get("memory")) + _profile_lines(report.get("profile"))
    lines += _target_lines(report["targets"])
    return "\n".join(lines)


def _memory_lines(memory: Mapping[str, Any] | None) -> list[str]:
    if not memory:
        return []
    if memory["status"] != "ok":
        return ["", f"memory: {memory['status']}: {memory['note']}"]
    lines = ["", f"memory: {memory['calls']} calls along {memory['route']}, {memory['concurrency']} in flight"]
    if memory["note"]:
        lines.append(f"  note: {memory['note']}")
    for hop, m in memory["gateways"].items():
        lines.append(
            f"  {hop}: RSS {_f(m['rss_after_warmup_mb'], 1)} MB after warm-up -> {_f(m['rss_end_mb'], 1)} MB "
            f"at the end ({_f(m['growth_mb'], 1)} MB), slope {_f(m['slope_mb_per_10k_calls'], 2)} MB per "
            f"10k calls, largest {_f(m['rss_max_mb'], 1)} MB (VmHWM since start {_f(m['peak_rss_mb'], 1)} MB)"
        )
    return lines


def _drift_lines(block: Mapping[str, Any]) -> list[str]:
    again, drift = block.get("direct_again"), block.get("direct_drift")
    if again is None:
        return []
    lines = [
        f"{'direct':<10} again after the others: {_f(again['calls_per_s'], 1)} calls/s, p50 {_f(again['p50_ms'])} ms, "
        f"p99 {_f(again['p99_ms'])} ms" + ("" if drift is None else f" ({drift * 100:+.1f} % calls/s on the first)")
    ]
    moved = _moved(block)
    if moved:
        lines.append(f"warning: {moved}: its ratios are uncertain by about as much (run on a quiet machine, or again)")
    return lines


def _profile_lines(profile: Mapping[str, Any] | None) -> list[str]:
    if not profile:
        return []
    if profile["status"] != "ok":
        return ["", f"profile: {profile['status']}: {profile['note']}"]
    lines = [
        "",
        f"profile ({profile['method']}): CPU ms per call by stage, {profile['route']}, {profile['workload']}",
    ]
    for hop, p in profile["gateways"].items():
        lines.append(f"  {hop}: {_f(p['cpu_s_per_call'] * 1e3)} ms/call")
        for stage, s in p["stages"].items():
            lines.append(f"    {stage:<40} {_f(s['cpu_ms_per_call'], 3):>7} ms  {s['share'] * 100:5.1f} %")
    if profile.get("note"):
        lines.append(f"  note: {profile['note']}")
    return lines


def _target_lines(targets: Mapping[str, Any]) -> list[str]:
    lines = ["", "issue 7 targets (ratios in this run):"]
    for name, t in targets.items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        note = f"  ({t['note']})" if t.get("note") else ""
        lines.append(f"  {name:<37} {t['target']:<19} measured {t['measured']!s:<8} {verdict}{note}")
    return lines


def _row(report: Mapping[str, Any], workload: str, target: str) -> Mapping[str, Any] | None:
    block = report["workloads"].get(workload)
    if not block:
        return None
    return next((r for r in block["rows"] if r["target"] == target and r["status"] == "ok"), None)


def _moved(block: Mapping[str, Any]) -> str:
    """What to say when a workload's direct baseline moved by more than `_DRIFT_WARNING` during it ("" if not)."""
    drift = block.get("direct_drift")
    if drift is None or abs(drift) <= _DRIFT_WARNING:
        return ""
    return f"the direct baseline moved {drift * 100:+.0f} % during the workload"


def _drift_note(report: Mapping[str, Any], workload: str) -> str:
    return _moved(report["workloads"].get(workload) or {})


def _notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def evaluate_targets(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The targets of issue 7, each with what this run measured and whether it is met (None: not measured)."""
    out: dict[str, dict[str, Any]] = {}
    concurrency = report["options"]["concurrency"]

    def put(name: str, target: str, measured: float | None, met: bool | None, note: str = "") -> None:
        out[name] = {
            "target": target,
            "measured": None if measured is None else round(measured, 3),
            "met": met,
            "note": note,
        }

    two = _row(report, "unary", "gateway-2")
    stages_note = "" if two is None or two["all_stages_on"] else "not every security stage was on"
    if two is not None and concurrency > 1 and two["ratio_to_direct"] is not None:
        ratio = two["ratio_to_direct"]
        put(
            "two_gateways_throughput_ratio",
            ">= 0.30 (goal 0.5)",
            ratio,
            ratio >= 0.30 and not two["errors"],
            _notes(stages_note, _drift_note(report, "unary")),
        )
    else:
        put("two_gateways_throughput_ratio", ">= 0.30 (goal 0.5)", None, None, "needs unary with concurrency > 1")
    if two is not None and concurrency == 1:
        p50, p99 = two["added_p50_ms"], two["added_p99_ms"]
        note = _notes(stages_note, _drift_note(report, "unary"))
        put("unloaded_added_p50_ms", "<= 3 ms", p50, p50 is not None and p50 <= 3.0, note)
        put("unloaded_added_p99_ms", "<= 10 ms", p99, p99 is not None and p99 <= 10.0, note)
    else:
        put("unloaded_added_p50_ms", "<= 3 ms", None, None, "needs --concurrency 1")
        put("unloaded_added_p99_ms", "<= 10 ms", None, None, "needs --concurrency 1")
    proxies = _row(report, "unary", "pyproxy-2")
    if two is not None and proxies is not None and proxies["calls_per_s"] and concurrency > 1:
        ratio = two["calls_per_s"] / proxies["calls_per_s"]
        put("two_gateways_over_two_python_proxies", ">= 1.0", ratio, ratio >= 1.0 and not two["errors"], stages_note)
    else:
        put("two_gateways_over_two_python_proxies", ">= 1.0", None, None, "needs gateway-2 and pyproxy-2, unary")
    stream = _row(report, "server-stream", "gateway-2")
    if stream is not None and stream["ratio_to_direct"] is not None:
        ratio = stream["ratio_to_direct"]
        put(
            "server_stream_ratio",
            ">= 0.5",
            ratio,
            ratio >= 0.5 and not stream["errors"],
            _drift_note(report, "server-stream"),
        )
    else:
        put("server_stream_ratio", ">= 0.5", None, None, "needs --workload server-stream")
    memory = report.get("memory")
    if memory and memory["gateways"]:
        # The largest RSS sampled during the memory run (VmHWM would include earlier workloads' streams).
        peak = max(m["rss_max_mb"] or math.inf for m in memory["gateways"].values())
        flat = all(m["flat"] for m in memory["gateways"].values())
        put("gateway_rss_mb", "< 200 MB and flat", peak, peak < 200 and flat, "" if flat else "RSS grew")
    else:
        put("gateway_rss_mb", "< 200 MB and flat", None, None, "needs --memory")
    return out


def _finish_rows(rows: list[dict[str, Any]]) -> None:
    """Fill in each row's ratio and added latency against the direct row of the same run."""
    direct = next((r for r in rows if r["target"] == "direct" and r["status"] == "ok"), None)
    for row in rows:
        if direct is None or row["status"] != "ok" or not direct["calls_per_s"]:
            continue
        row["ratio_to_direct"] = round(row["calls_per_s"] / direct["calls_per_s"], 4)
        if row["total_cpu_s_per_call"] and direct["total_cpu_s_per_call"]:
            row["cpu_ratio_to_direct"] = round(direct["total_cpu_s_per_call"] / row["total_cpu_s_per_call"], 4)
        for q in ("p50", "p99"):
            mine, base = row[f"{q}_ms"], direct[f"{q}_ms"]
            if mine is not None and base is not None:
                row[f"added_{q}_ms"] = round(mine - base, 3)


def _empty_row(target: str, route: str, status: str, note: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(
        target=target,
        label=TARGETS[target],
        route=route,
        status=status,
        note=note,
        stages=[],
        all_stages_on=False,
        calls=0,
        errors={},
        hops=[],
    )
    return row


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 when it cannot be fitted)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in points) / den


def _memory_summary(samples: Sequence[Mapping[str, Any]], name: str, peak_mb: float) -> dict[str, Any]:
    """RSS growth of one gateway over a memory run: warm-up is the first fifth of the calls."""
    points = [(float(s["calls"]), float(s["rss_mb"][name])) for s in samples if name in s["rss_mb"]]
    if not points:
        return {
            "rss_max_mb": None,
            "rss_after_warmup_mb": None,
            "rss_end_mb": None,
            "growth_mb": None,
            "slope_mb_per_10k_calls": None,
            "peak_rss_mb": peak_mb,
            "flat": False,
        }
    total = points[-1][0]
    after = [p for p in points if p[0] >= total / 5] or points
    start, end = after[0][1], points[-1][1]
    growth = end - start
    slope = _slope(after) * 10_000
    # Flat: no more than 5 % (or 4 MB) between the end of warm-up and the end.
    flat = growth <= max(4.0, 0.05 * start)
    return {
        "rss_max_mb": round(max(y for _, y in points), 2),
        "rss_after_warmup_mb": round(start, 2),
        "rss_end_mb": round(end, 2),
        "growth_mb": round(growth, 2),
        "slope_mb_per_10k_calls": round(slope, 3),
        "peak_rss_mb": round(peak_mb, 2),
        "flat": flat,
    }


def nginx_config(
    *,
    prefix: Path,
    listen_port: int,
    server_cert: Path,
    server_key: Path,
    client_ca: Path,
    upstream_port: int,
    upstream_name: str,
    upstream_ca: Path,
    client_cert: Path,
    client_key: Path,
    http2_directive: bool,
    keepalive: int,
    run_as: str | None,
) -> str:
    """An nginx config: one mTLS gRPC listener on 127.0.0.1 relaying to one mTLS gRPC upstream."""
    listen = f"listen 127.0.0.1:{listen_port} ssl;" + ("\n    http2 on;" if http2_directive else "")
    if not http2_directive:
        listen = f"listen 127.0.0.1:{listen_port} ssl http2;"
    user = f"user {run_as};\n" if run_as else ""
    temp = "\n".join(
        f"  {kind}_temp_path {prefix / ('tmp-' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# written by psngw bench: a reference mTLS gRPC proxy (loopback only)
{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  upstream next {{
    server 127.0.0.1:{upstream_port};
    keepalive {keepalive};
    keepalive_requests 1000000;
    keepalive_timeout 120s;
  }}
  server {{
    {listen}
    ssl_certificate {server_cert};
    ssl_certificate_key {server_key};
    ssl_client_certificate {client_ca};
    ssl_verify_client on;
    ssl_verify_depth 2;
    keepalive_requests 1000000;
    client_max_body_size 0;
    location / {{
      grpc_pass grpcs://next;
      grpc_ssl_certificate {client_cert};
      grpc_ssl_certificate_key {client_key};
      grpc_ssl_trusted_certificate {upstream_ca};
      grpc_ssl_verify on;
      grpc_ssl_name {upstream_name};
      grpc_ssl_server_name on;
      grpc_read_timeout 120s;
      grpc_send_timeout 120s;
      grpc_buffer_size 256k;
    }}
  }}
}}
"""


# -- /proc: CPU and memory of process groups ------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(text: str) -> list[str]:
    """The fields of a /proc/<pid>/stat line after the command name (field 3 first)."""
    return text[text.rfind(")") + 2 :].split()


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = _stat_fields(f.read())
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def _pid_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = _stat_fields(f.read())
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


@dataclass(frozen=True)
class _GroupSample:
    cpu_s: float
    hwm_mb: float
    rss_mb: float


def _group_sample(pgid: int) -> _GroupSample:
    """CPU seconds, peak RSS and RSS of every process in group `pgid` (summed)."""
    cpu = hwm = rss = 0.0
    for pid in _group_pids(pgid):
        cpu += _pid_cpu(pid)
        kb = _status_kb(pid)
        hwm += kb.get("VmHWM", 0) / 1024
        rss += kb.get("VmRSS", 0) / 1024
    return _GroupSample(cpu, hwm, rss)


def _thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Tid -> (thread name, CPU seconds) for every thread of `pid`."""
    out = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{entry.name}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            name = text[text.find("(") + 1 : text.rfind(")")]
            fields = _stat_fields(text)
            out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return out


def _http_get(port: int, path: str, timeout: float = 2.0) -> bytes | None:
    """The body of ``GET path`` on a gateway's admin listener (127.0.0.1), or None if it does not answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    return body if response.status in (200, 503) else None


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


# -- the load generator (its own process: ``python -m gateway.bench``) -----------------------


class _Incomplete(Exception):
    """A reply that is not what the echo backend sends back."""


def _make_caller(
    channel: grpc.aio.Channel, method: str, workload: Workload, metadata: tuple[tuple[str, str], ...], timeout: float
) -> Callable[[], Awaitable[None]]:
    import grpc  # noqa: PLC0415  # only the load generator needs grpc

    if workload.name == "unary":
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        payload = os.urandom(_KIB)

        async def call_unary() -> None:
            reply = await unary(payload, metadata=metadata, timeout=timeout)
            if len(reply) != len(payload):
                raise _Incomplete

        return call_unary
    if workload.name == "server-stream":
        server_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method)
        request = str(_MIB).encode()

        async def call_server_stream() -> None:
            stream = server_stream(request, metadata=metadata, timeout=timeout)
            got = 0
            while True:
                message = await stream.read()
                if message is grpc.aio.EOF:
                    break
                assert isinstance(message, bytes)  # noqa: S101  # no deserializer: raw bytes
                got += len(message)
            if got != _MIB:
                raise _Incomplete

        return call_server_stream
    client_stream: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(method)
    chunks = [os.urandom(_CHUNK)] * 16

    async def call_client_stream() -> None:
        reply = await client_stream(iter(chunks), metadata=metadata, timeout=timeout)
        if len(reply) != _CHUNK:
            raise _Incomplete

    return call_client_stream


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _open_channels(target: Mapping[str, Any], count: int) -> list[grpc.aio.Channel]:
    import grpc  # noqa: PLC0415  # only the load generator needs grpc

    creds = grpc.ssl_channel_credentials(
        Path(target["ca"]).read_bytes(), Path(target["key"]).read_bytes(), Path(target["cert"]).read_bytes()
    )
    options: list[tuple[str, Any]] = [
        ("grpc.ssl_target_name_override", target["server_name"]),
        ("grpc.max_receive_message_length", 16 * _MIB),
        ("grpc.max_send_message_length", 16 * _MIB),
    ]
    # Distinct arguments: grpcio would otherwise share one subchannel (one connection) between them.
    return [
        grpc.aio.secure_channel(target["address"], creds, options=[*options, ("psngw.bench.channel", i)])
        for i in range(count)
    ]


async def _probe(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """One call to the target, to see whether it answers."""
    import grpc  # noqa: PLC0415  # only the load generator needs grpc

    target = cmd["target"]
    channels = _open_channels(target, 1)
    try:
        call = _make_caller(channels[0], target["method"], WORKLOADS[cmd["workload"]], _md(target), 15.0)
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            return {"ok": False, "code": exc.code().name, "details": exc.details() or ""}
        except _Incomplete:
            return {"ok": False, "code": "INCOMPLETE", "details": "the reply is not what the echo backend sends"}
        return {"ok": True, "code": "OK", "details": ""}
    finally:
        for channel in channels:
            await channel.close()


def _md(target: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in target["metadata"])


class _Window:
    """The measured window of a closed-loop run, and what completed inside it."""

    def __init__(self, limit: int | None, progress_every: int) -> None:
        self.limit = limit
        self.progress_every = progress_every
        self.start: float | None = None
        self.end: float | None = None
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.warmup_errors: Counter[str] = Counter()
        self.done = asyncio.Event()

    def open(self) -> None:
        self.start = time.perf_counter()
        _emit("measuring")

    def close(self, at: float) -> None:
        if self.end is None:
            self.end = at
            _emit("stopped")
            self.done.set()

    def finished(self, t0: float, t1: float, code: str) -> None:
        """Count one call that ended at `t1` (calls that end outside the window are not counted)."""
        if self.start is None or t1 < self.start:
            if code != "OK":
                self.warmup_errors[code] += 1
            return
        if self.end is not None and t1 > self.end:
            return
        if code != "OK":
            self.errors[code] += 1
        else:
            self.latencies.append(t1 - t0)
            n = len(self.latencies)
            if self.progress_every and n % self.progress_every == 0:
                _emit("progress", done=n)
        # With --calls, failed calls count towards the end too: a refusing target must not hang the run.
        if self.limit is not None and len(self.latencies) + self.errors.total() >= self.limit:
            self.close(t1)

    def result(self) -> dict[str, Any]:
        seconds = (self.end or time.perf_counter()) - (self.start or 0.0)
        lat = self.latencies
        p50, p90, p99 = percentiles(lat)
        return {
            "calls": len(lat),
            "seconds": seconds,
            "errors": dict(self.errors),
            "warmup_errors": dict(self.warmup_errors),
            "p50_ms": p50 * 1e3,
            "p90_ms": p90 * 1e3,
            "p99_ms": p99 * 1e3,
            "mean_ms": (sum(lat) / len(lat) * 1e3) if lat else math.nan,
            "max_ms": max(lat) * 1e3 if lat else math.nan,
        }


async def _run_load(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """A closed loop: `concurrency` callers, each making its next call when the last one ends (and `think` later)."""
    import grpc  # noqa: PLC0415  # only the load generator needs grpc

    target = cmd["target"]
    workload = WORKLOADS[cmd["workload"]]
    duration: float | None = cmd.get("duration")
    think = float(cmd.get("think") or 0.0)
    window = _Window(cmd.get("calls"), cmd.get("progress_every") or 0)
    channels = _open_channels(target, cmd.get("channels", 1))

    async def worker(call: Callable[[], Awaitable[None]]) -> None:
        while not window.done.is_set():
            t0 = time.perf_counter()
            code = "OK"
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            except _Incomplete:
                code = "INCOMPLETE"
            window.finished(t0, time.perf_counter(), code)
            if think:
                await asyncio.sleep(think)

    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 15)
        workers = [
            asyncio.create_task(
                worker(
                    _make_caller(channels[i % len(channels)], target["method"], workload, _md(target), cmd["timeout"])
                )
            )
            for i in range(cmd["concurrency"])
        ]
        await asyncio.sleep(cmd["warmup"])
        window.open()
        if duration is not None:
            await asyncio.sleep(duration)
            window.close(time.perf_counter())
        await window.done.wait()
        _, pending = await asyncio.wait(workers, timeout=cmd["timeout"] + 5)
        for task in pending:
            task.cancel()
    finally:
        for channel in channels:
            await channel.close()
    return window.result()


async def _loadgen_loop() -> int:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return 0  # the orchestrator is gone
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            return 0
        if cmd["op"] == "probe":
            _emit("result", **await _probe(cmd))
        elif cmd["op"] == "run":
            _emit("result", **await _run_load(cmd))
        else:
            _emit("error", message=f"unknown op {cmd['op']!r}")


def _install_loop(choice: str) -> str:
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: PLC0415  # optional
    except ImportError:
        return "asyncio"
    uvloop.install()
    return "uvloop"


# -- the reference proxy (its own process: ``python -m gateway.bench proxy``) ------------------

#: Metadata a proxy must not copy onto its upstream call (gRPC sets these itself).
_HOP_BY_HOP = frozenset({"user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})


async def _proxy_serve(args: argparse.Namespace) -> int:
    """A transparent mTLS gRPC proxy: raw bytes in, raw bytes out, no checks (the floor for a Python hop)."""
    import grpc  # noqa: PLC0415  # only the proxy process needs grpc

    limit = 16 * _MIB
    channel = grpc.aio.secure_channel(
        args.upstream,
        grpc.ssl_channel_credentials(
            args.upstream_ca.read_bytes(), args.upstream_key.read_bytes(), args.upstream_cert.read_bytes()
        ),
        options=[
            ("grpc.ssl_target_name_override", args.upstream_name),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )

    def forwarded(context: grpc.aio.ServicerContext[bytes, bytes]) -> tuple[tuple[str, str | bytes], ...]:
        md = context.invocation_metadata() or ()
        return tuple((k, v) for k, v in md if k not in _HOP_BY_HOP and not k.startswith((":", "grpc-")))

    class Handler(grpc.GenericRpcHandler):
        def __init__(self) -> None:
            self._cache: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}

        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
            method = details.method
            handler = self._cache.get(method)
            if handler is None:
                handler = self._handler(method)
                if len(self._cache) < 1024:
                    self._cache[method] = handler
            return handler

        def _handler(self, method: str) -> grpc.RpcMethodHandler[bytes, bytes]:
            if method.endswith("/Unary"):
                upstream_unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)

                async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
                    try:
                        return await upstream_unary(
                            request, metadata=forwarded(context), timeout=context.time_remaining()
                        )
                    except grpc.aio.AioRpcError as exc:
                        await context.abort(exc.code(), exc.details() or "")
                        raise  # abort raises; this keeps type checkers content

                return grpc.unary_unary_rpc_method_handler(unary)
            upstream_stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method)

            async def stream(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
            ) -> AsyncIterator[bytes]:
                call = upstream_stream(requests, metadata=forwarded(context), timeout=context.time_remaining())
                try:
                    async for message in call:
                        yield message
                except grpc.aio.AioRpcError as exc:
                    await context.abort(exc.code(), exc.details() or "")

            return grpc.stream_stream_rpc_method_handler(stream)

    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    server.add_generic_rpc_handlers((Handler(),))
    server.add_secure_port(
        args.listen,
        grpc.ssl_server_credentials(
            [(args.key.read_bytes(), args.cert.read_bytes())],
            root_certificates=args.client_ca.read_bytes(),
            require_client_auth=True,
        ),
    )
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(0.5)
    await channel.close()
    return 0


def _child_main(argv: Sequence[str]) -> int:
    """``python -m gateway.bench loadgen|proxy ...``: the bench's own child processes."""
    parser = argparse.ArgumentParser(prog="python -m gateway.bench", description="Child processes of psngw bench.")
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("loadgen", "proxy"):
        p = sub.add_parser(role)
        p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
        p.add_argument("--network", default="", help="the bench run's folder (informational: names the run in ps)")
        if role == "proxy":
            p.add_argument("--listen", required=True)
            p.add_argument("--cert", type=Path, required=True)
            p.add_argument("--key", type=Path, required=True)
            p.add_argument("--client-ca", type=Path, required=True)
            p.add_argument("--upstream", required=True)
            p.add_argument("--upstream-name", required=True)
            p.add_argument("--upstream-ca", type=Path, required=True)
            p.add_argument("--upstream-cert", type=Path, required=True)
            p.add_argument("--upstream-key", type=Path, required=True)
    args = parser.parse_args(argv)
    _install_loop(args.loop)
    if args.role == "proxy":
        return asyncio.run(_proxy_serve(args))
    return asyncio.run(_loadgen_loop())


# -- the orchestrator: processes ---------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function that asks Linux to SIGTERM the child when this process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    buffer: bytearray = field(default_factory=bytearray)

    @property
    def pgid(self) -> int:
        return self.popen.pid  # each child leads a session (and process group) of its own

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def failure(self, what: str) -> BenchError:
        tail = self.tail()
        return BenchError(f"{self.name}: {what}" + (f"; its log ({self.log}) ends:\n{tail}" if tail else ""))

    def readline(self, timeout: float) -> str:
        """The next line of the child's stdout; BenchError on timeout or when it exits."""
        assert self.popen.stdout is not None  # noqa: S101  # started with stdout=PIPE
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.failure(f"no answer within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    raise self.failure(f"exited (status {self.popen.wait()})")
                self.buffer += data
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer[:] = rest
        return line.decode()

    def send(self, obj: Mapping[str, Any]) -> None:
        assert self.popen.stdin is not None  # noqa: S101  # started with stdin=PIPE
        try:
            self.popen.stdin.write(json.dumps(obj).encode() + b"\n")
            self.popen.stdin.flush()
        except BrokenPipeError as exc:
            raise self.failure("exited") from exc

    def event(self, expected: str, timeout: float, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Wait for event `expected` from the load generator (progress events go to `on_progress`)."""
        deadline = time.monotonic() + timeout
        while True:
            message: dict[str, Any] = json.loads(self.readline(max(0.1, deadline - time.monotonic())))
            if message["event"] == expected:
                return message
            if message["event"] == "progress" and on_progress is not None:
                on_progress(message["done"])
            elif message["event"] == "error":
                raise self.failure(message["message"])


class _Processes:
    """Every child process of one bench run; stops them all (their whole process groups) on exit."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._children: list[_Child] = []
        self._preexec = _die_with_parent()

    def start(self, name: str, argv: Sequence[str], *, pipes: bool = False, cwd: Path | None = None) -> _Child:
        log_path = self._logs / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(  # noqa: S603  # our own interpreter and fixed arguments
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log,
                start_new_session=True,
                preexec_fn=self._preexec,  # noqa: PLW1509  # only prctl(2); no locks are taken
                cwd=cwd,
            )
        child = _Child(name, popen, log_path)
        self._children.append(child)
        return child

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by every process this run started (all their process groups)."""
        return sum(_group_sample(child.pgid).cpu_s for child in self._children)

    def stop_all(self, grace: float = 15.0) -> None:
        """SIGTERM every group, wait up to `grace` seconds, then SIGKILL what is left."""
        for child in reversed(self._children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(max(0.0, deadline - time.monotonic()))
        for child in self._children:
            # The leader may be gone while others of its group remain: kill the group regardless.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(5)
            for stream in (child.popen.stdin, child.popen.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._children.clear()

    def __enter__(self) -> _Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _wait_port(port: int, child: _Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if child.popen.poll() is not None:
            raise child.failure(f"exited with status {child.popen.returncode} before listening on port {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise child.failure(f"not listening on 127.0.0.1:{port} after {timeout:.0f} s")
        time.sleep(0.05)


# -- the orchestrator: the network and the routes -------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    """What one `psngw bench` run does (bounded: see `register_cli`)."""

    workloads: tuple[str, ...] = ("unary",)
    targets: tuple[str, ...] = tuple(TARGETS)
    concurrency: int = 64
    duration: float = 10.0
    warmup: float = 2.0
    calls: int | None = None
    channels: int = 1
    #: each caller's pause after a call before its next (closed loop with think time)
    think_ms: float = 0.0
    memory: bool = False
    memory_calls: int = 100_000
    profile: bool = False
    #: what `profile` samples: "unary", "server-stream" or "client-stream"
    profile_workload: str = "unary"
    components: bool = False
    root: Path | None = None
    gateway_log_level: str = "warning"
    loop: str = "auto"
    unit: str = "serocu"
    role: str = "analyst"
    clearance: str = "SC"
    call_timeout: float = 30.0
    keep_rate_limits: bool = False
    signing_key: str = "ed25519"
    workers: int = 1

    def as_json(self) -> dict[str, Any]:
        """The options as they go into the report."""
        return {
            "workloads": list(self.workloads),
            "targets": list(self.targets),
            "concurrency": self.concurrency,
            "duration": self.duration,
            "warmup": self.warmup,
            "calls": self.calls,
            "channels": self.channels,
            "think_ms": self.think_ms,
            "memory": self.memory,
            "memory_calls": self.memory_calls,
            "profile": self.profile,
            "profile_workload": self.profile_workload,
            "components": self.components,
            "gateway_log_level": self.gateway_log_level,
            "keep_rate_limits": self.keep_rate_limits,
            "signing_key": self.signing_key,
            "workers": self.workers,
            "loop": self.loop,
            "principal": {"units": [self.unit], "roles": [self.role], "clearance": self.clearance},
        }


#: Limits high enough that the bench's one officer never meets them: the check still runs on every call.
_LIFTED_RATE_LIMITS = """
[rate_limits]  # lifted by psngw bench: one officer's load must measure the gateway, not the limiter
force_rate = 1000000.0
force_burst = 10000000
unit_rate = 1000000.0
unit_burst = 10000000
"""


def _lift_rate_limits(config: Path) -> str:
    """Raise the rate limits of a gateway config the bench wrote (unless it sets its own); how they stand."""
    text = config.read_text()
    if "rate_limits" in tomllib.loads(text):
        return "as configured (the config sets [rate_limits])"
    config.write_text(text.rstrip("\n") + "\n" + _LIFTED_RATE_LIMITS)
    return "lifted by the bench (the rate-limit check still runs on every call)"


@dataclass
class _Hop:
    name: str
    kind: str  # "gateway" or "nginx"
    child: _Child
    stages: list[str]
    stages_source: str = "config"
    admin_port: int | None = None

    def scrape(self) -> _Scrape | None:
        """The gateway's stage durations and audit commits now (from /metrics); None without an admin listener."""
        if self.admin_port is None:
            return None
        body = _http_get(self.admin_port, "/metrics")
        if body is None:
            return None
        text = body.decode(errors="replace")
        return _Scrape(parse_stage_durations(text), parse_counters(text))

    def read_health_stages(self) -> None:
        """Take the stages from the gateway's /healthz when it lists them (else keep the config's)."""
        if self.admin_port is None:
            return
        body = _http_get(self.admin_port, "/healthz")
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            stages = json.loads(body or b"null").get("stages")
            if isinstance(stages, dict):
                stages = [name for name, on in stages.items() if on]
            if isinstance(stages, list) and all(isinstance(x, str) for x in stages):
                self.stages, self.stages_source = list(stages), "healthz"


@dataclass(frozen=True)
class _ProxySpec:
    """One reference proxy: where it listens, whom it accepts, where it relays and as whom."""

    side: str
    port: int
    server: Issued
    client_ca: Path
    upstream: str
    upstream_name: str
    upstream_ca: Path
    client: Issued

    def argv(self) -> list[str]:
        """The arguments of ``python -m gateway.bench proxy`` for this proxy."""
        return [
            "--listen",
            f"127.0.0.1:{self.port}",
            "--cert",
            str(self.server.cert_path),
            "--key",
            str(self.server.key_path),
            "--client-ca",
            str(self.client_ca),
            "--upstream",
            self.upstream,
            "--upstream-name",
            self.upstream_name,
            "--upstream-ca",
            str(self.upstream_ca),
            "--upstream-cert",
            str(self.client.cert_path),
            "--upstream-key",
            str(self.client.key_path),
        ]


@dataclass
class _Route:
    target: str
    description: str
    address: str
    server_name: str
    ca: Path
    cert: Path
    key: Path
    service: str
    hops: list[str]
    backend: str
    metadata: tuple[tuple[str, str], ...]


class _Bench:
    """One run: the network, its processes, and the measurements."""

    def __init__(self, options: BenchOptions, root: Path, procs: _Processes) -> None:
        self.options = options
        self.root = root
        self.procs = procs
        self.hops: dict[str, _Hop] = {}
        self.backends: dict[str, _Child] = {}
        self.routes: dict[str, _Route] = {}
        self.skipped: dict[str, str] = {}
        self.loadgen: _Child | None = None
        self.layout: NetworkLayout | None = None
        self.caller = ""
        self.host = ""
        #: the force whose gateway relays over gRPC `Relay/Mux`, not relay links (the gateway-2-grpc route's origin)
        self.third = ""
        self.rate_limits = "as configured"

    # -- starting --------------------------------------------------------------------

    def start(self) -> None:
        from gateway.demo.network import FORCES, write_network  # noqa: PLC0415  # pulls in the gateway

        layout = write_network(self.root, echo=True, signing_key=self.options.signing_key)
        self.layout = layout
        if not self.options.keep_rate_limits:
            for path in layout.configs.values():
                self.rate_limits = _lift_rate_limits(path)
        forces = list(FORCES)
        self.caller, self.host, self.third = forces[0], forces[1], forces[2]
        for force, path in layout.configs.items():
            limits = []
            if self.options.workers > 1:
                # Several connections to each peer, so that SO_REUSEPORT spreads them over the workers.
                limits.append(f"peer_channels = {4 * self.options.workers}")
            if force == self.third:
                # The third force's gateway relays as before relay links (its directory has no relay
                # addresses): the gateway-2-grpc route.
                grpc_only = layout.directory_path.with_name("directory-grpc.toml")
                text = layout.directory_path.read_text()
                grpc_only.write_text(re.sub(r"(?m)^relay_address = .*\n", "", text))
                config = path.read_text().replace('directory = "directory.toml"', f'directory = "{grpc_only.name}"')
                path.write_text(config)
            if limits:
                path.write_text(path.read_text() + "\n[limits]\n" + "\n".join(limits) + "\n")
        self._start_backends(layout)
        self._start_gateways(layout, list(FORCES))
        self._routes()
        if {"pyproxy-1", "pyproxy-2"} & set(self.options.targets):
            self._start_proxies("pyproxy")
        if {"nginx-1", "nginx-2"} & set(self.options.targets):
            if shutil.which("nginx") is None:
                for target in ("nginx-1", "nginx-2"):
                    self.skipped[target] = "nginx is not on PATH (install it to measure the reference proxies)"
            else:
                self._start_proxies("nginx")
        self.loadgen = self.procs.start(
            "loadgen",
            # --network only names the run in `ps` (every process of a run names its folder).
            [
                sys.executable,
                "-m",
                "gateway.bench",
                "loadgen",
                "--loop",
                self.options.loop,
                "--network",
                str(self.root),
            ],
            pipes=True,
        )

    def _start_backends(self, layout: NetworkLayout) -> None:
        """Every hosted application (echo backends included), each in its own process; wait until they serve."""
        directory = layout.directory()
        for force, apps in layout.hosted.items():
            material = layout.material[force]
            for app in apps:
                issued = material.app_servers[app]
                self.backends[app] = self.procs.start(
                    f"app-{app}",
                    [
                        sys.executable,
                        "-m",
                        "gateway.demo.appserve",
                        "--kind",
                        "echo" if app.startswith("echo-") else app,
                        "--listen",
                        f"127.0.0.1:{layout.ports[force].apps[app]}",
                        "--cert",
                        str(issued.cert_path),
                        "--key",
                        str(issued.key_path),
                        "--ca",
                        str(material.ca),
                        "--allowed-caller",
                        directory.forces[force].gateway_spiffe_id,
                        "--loop",
                        self.options.loop,
                        "--exit-with-parent",
                    ],
                    pipes=True,
                )
        for child in self.backends.values():
            line = child.readline(30)
            if not line.startswith("ready "):
                raise child.failure(f"said {line!r} instead of 'ready <port>'")

    def _start_gateways(self, layout: NetworkLayout, forces: list[str]) -> None:
        """`psngw serve` for every force; wait until both listeners of each accept connections."""
        for force in forces:
            child = self.procs.start(
                f"gateway-{force}",
                [
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    "serve",
                    "--config",
                    str(layout.configs[force]),
                    "--log-level",
                    self.options.gateway_log_level,
                    "--log-format",
                    "json",
                    "--workers",
                    str(self.options.workers),
                ],
            )
            stages = configured_stages(layout.configs[force].read_text())
            self.hops[force] = _Hop(f"gateway {force}", "gateway", child, stages, admin_port=layout.ports[force].admin)
        for force in forces:
            child = self.hops[force].child
            _wait_port(layout.ports[force].local, child, 60)
            _wait_port(layout.ports[force].peer, child, 60)
            self.hops[force].read_health_stages()

    def _call_metadata(self, force: str) -> tuple[tuple[str, str], ...]:
        """The token and purpose an application of `force` sends (minted by the network's dev IdP)."""
        from gateway.principal import Purpose  # noqa: PLC0415
        from gateway.purpose import purpose_metadata  # noqa: PLC0415
        from gateway.token import DevIdp, init_dev_idp  # noqa: PLC0415  # UNSAFE dev IdP: the bench only

        assert self.layout is not None  # noqa: S101  # set by start()
        path = self.layout.configs[force]
        doc = tomllib.loads(path.read_text())
        tokens = doc.get("tokens")
        network = self.layout.directory().network
        if isinstance(tokens, dict) and "jwks_file" in tokens:
            idp = DevIdp.load((path.parent / str(tokens["jwks_file"])).parent)
            issuer, audience = str(tokens["issuer"]), str(tokens["audience"])
        elif isinstance(tokens, dict):
            raise ConfigError(
                "the bench mints tokens with the network's dev IdP, but [tokens] has no jwks_file", file=path
            )
        else:
            # The gateway does not check tokens yet: send one anyway, as applications will.
            folder = self.root / "idp" / force
            idp = DevIdp.load(folder) if (folder / "idp.key").exists() else init_dev_idp(folder)
            issuer, audience = f"https://idp.{force}.{network}", f"psn-gateway/{force}"
        token = idp.issue(
            issuer=issuer,
            audience=audience,
            force=force,
            officer="BENCH-0001",
            units=[self.options.unit],
            roles=[self.options.role],
            clearance=self.options.clearance,
            ttl=4 * 3600,
        )
        purpose_doc = doc.get("purpose")
        codes = purpose_doc.get("codes") if isinstance(purpose_doc, dict) else None
        code = str(codes[0]) if isinstance(codes, list) and codes else "investigation"
        purpose = Purpose(code, "BENCH-0001", "psngw bench: synthetic load on the echo backend")
        return (("authorization", f"Bearer {token}"), *purpose_metadata(purpose))

    def _routes(self) -> None:
        assert self.layout is not None  # noqa: S101  # set by start()
        layout, caller, host = self.layout, self.caller, self.host
        directory = layout.directory()
        config = layout.config(host)
        echo_host, echo_caller = f"echo-{host}", f"echo-{caller}"
        service_host = directory.applications[echo_host].services[0]
        service_caller = directory.applications[echo_caller].services[0]
        client = layout.material[caller].app_clients["analyst-desk"]
        md = self._call_metadata(caller)
        host_tls = layout.material[host].gateway_tls
        backend = config.backends[echo_host]
        self.routes["direct"] = _Route(
            "direct",
            f"load generator (as gateway {host}) -> {echo_host}",
            backend.address,
            backend.server_name,
            layout.material[host].ca,
            host_tls.cert_path,
            host_tls.key_path,
            service_host,
            [],
            echo_host,
            md,
        )
        gw_name = directory.forces[caller].gateway_server_name
        self.routes["gateway-1"] = _Route(
            "gateway-1",
            f"analyst-desk@{caller} -> gateway {caller} -> {echo_caller}",
            layout.local_address(caller),
            gw_name,
            layout.material[caller].ca,
            client.cert_path,
            client.key_path,
            service_caller,
            [caller],
            echo_caller,
            md,
        )
        self.routes["gateway-2"] = _Route(
            "gateway-2",
            f"analyst-desk@{caller} -> gateway {caller} -> gateway {host} -> {echo_host}",
            layout.local_address(caller),
            gw_name,
            layout.material[caller].ca,
            client.cert_path,
            client.key_path,
            service_host,
            [caller, host],
            echo_host,
            md,
        )

        third = self.third
        third_client = layout.material[third].app_clients["analyst-desk"]
        self.routes["gateway-2-grpc"] = _Route(
            "gateway-2-grpc",
            f"analyst-desk@{third} -> gateway {third} -> gateway {host} -> {echo_host}, relay channels over gRPC",
            layout.local_address(third),
            directory.forces[third].gateway_server_name,
            layout.material[third].ca,
            third_client.cert_path,
            third_client.key_path,
            service_host,
            [third, host],
            echo_host,
            self._call_metadata(third),
        )

    def _proxy_layout(self) -> list[_ProxySpec]:
        """Where a pair of reference proxies goes: A (origin side) relays to B (host side), B to the backend.

        Each proxy uses the identity the gateway at its place would: A the caller force's gateway TLS
        certificate, B the host force's (the backend only answers its own force's gateway).
        """
        from gateway.demo.network import free_ports  # noqa: PLC0415

        assert self.layout is not None  # noqa: S101  # set by start()
        layout, caller, host = self.layout, self.caller, self.host
        union_ca = self.root / "union-ca.pem"
        if not union_ca.exists():
            union_ca.write_bytes(b"".join(layout.material[f].ca.read_bytes() for f in layout.material))
        backend = layout.config(host).backends[f"echo-{host}"]
        port_a, port_b = free_ports(2)
        host_tls, caller_tls = layout.material[host].gateway_tls, layout.material[caller].gateway_tls
        host_name = layout.directory().forces[host].gateway_server_name
        return [
            _ProxySpec(
                "b",
                port_b,
                host_tls,
                union_ca,
                backend.address,
                backend.server_name,
                layout.material[host].ca,
                host_tls,
            ),
            _ProxySpec(
                "a",
                port_a,
                caller_tls,
                layout.material[caller].ca,
                f"127.0.0.1:{port_b}",
                host_name,
                layout.material[host].ca,
                caller_tls,
            ),
        ]

    def _start_proxies(self, kind: str) -> None:
        """Start a pair of reference proxies of `kind` (nginx or pyproxy) and add their two routes."""
        assert self.layout is not None  # noqa: S101  # set by start()
        specs = self._proxy_layout()
        for spec in specs:
            name = f"{kind}-{spec.side}"
            if kind == "nginx":
                child = self._start_nginx(name, spec)
                stages = ["mtls"]
            else:
                child = self.procs.start(
                    name,
                    [
                        sys.executable,
                        "-m",
                        "gateway.bench",
                        "proxy",
                        "--loop",
                        self.options.loop,
                        "--network",
                        str(self.root),
                        *spec.argv(),
                    ],
                    pipes=True,
                )
                line = child.readline(30)
                if not line.startswith("ready"):
                    raise child.failure(f"said {line!r} instead of 'ready'")
                stages = ["mtls"]
            _wait_port(spec.port, child, 20)
            self.hops[name] = _Hop(name, kind, child, stages)
        layout, caller, host = self.layout, self.caller, self.host
        directory = layout.directory()
        client = layout.material[caller].app_clients["analyst-desk"]
        service = directory.applications[f"echo-{host}"].services[0]
        md = self.routes["gateway-2"].metadata
        b, a = specs
        self.routes[f"{kind}-1"] = _Route(
            f"{kind}-1",
            f"analyst-desk@{caller} -> {kind}-b -> echo-{host}",
            f"127.0.0.1:{b.port}",
            directory.forces[host].gateway_server_name,
            layout.material[host].ca,
            client.cert_path,
            client.key_path,
            service,
            [f"{kind}-b"],
            f"echo-{host}",
            md,
        )
        self.routes[f"{kind}-2"] = _Route(
            f"{kind}-2",
            f"analyst-desk@{caller} -> {kind}-a -> {kind}-b -> echo-{host}",
            f"127.0.0.1:{a.port}",
            directory.forces[caller].gateway_server_name,
            layout.material[caller].ca,
            client.cert_path,
            client.key_path,
            service,
            [f"{kind}-a", f"{kind}-b"],
            f"echo-{host}",
            md,
        )

    def _start_nginx(self, name: str, spec: _ProxySpec) -> _Child:
        nginx = shutil.which("nginx")
        assert nginx is not None  # noqa: S101  # checked by start()
        version = subprocess.run(  # noqa: S603  # a fixed argument
            [nginx, "-v"], capture_output=True, text=True, check=False
        ).stderr
        numbers = tuple(int(n) for n in version.rsplit("/", 1)[-1].strip().split(".")[:3] if n.isdigit())
        prefix = self.root / name
        prefix.mkdir(mode=0o700, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            nginx_config(
                prefix=prefix,
                listen_port=spec.port,
                server_cert=spec.server.cert_path,
                server_key=spec.server.key_path,
                client_ca=spec.client_ca,
                upstream_port=int(spec.upstream.rsplit(":", 1)[1]),
                upstream_name=spec.upstream_name,
                upstream_ca=spec.upstream_ca,
                client_cert=spec.client.cert_path,
                client_key=spec.client.key_path,
                http2_directive=numbers >= (1, 25, 1),
                keepalive=max(64, self.options.concurrency * self.options.channels),
                run_as="root" if os.geteuid() == 0 else None,
            )
        )
        has_e = numbers >= (1, 19, 5)
        return self.procs.start(
            name, [nginx, "-p", str(prefix), "-c", str(conf)] + (["-e", str(prefix / "error.log")] if has_e else [])
        )

    # -- measuring -------------------------------------------------------------------------

    def _target_json(self, route: _Route, workload: Workload) -> dict[str, Any]:
        return {
            "address": route.address,
            "server_name": route.server_name,
            "ca": str(route.ca),
            "cert": str(route.cert),
            "key": str(route.key),
            "method": f"/{route.service}/{workload.method}",
            "metadata": [list(kv) for kv in route.metadata],
        }

    def _groups(self, route: _Route) -> dict[str, int]:
        assert self.loadgen is not None  # noqa: S101  # set by start()
        groups = {f"hop:{h}": self.hops[h].child.pgid for h in route.hops}
        groups["backend"] = self.backends[route.backend].pgid
        groups["loadgen"] = self.loadgen.pgid
        return groups

    def probe(self, route: _Route, workload: Workload) -> dict[str, Any]:
        """One call along `route`: ok, or the status it was refused with."""
        assert self.loadgen is not None  # noqa: S101  # set by start()
        self.loadgen.send({"op": "probe", "target": self._target_json(route, workload), "workload": workload.name})
        return self.loadgen.event("result", 30)

    def measure(
        self,
        route: _Route,
        workload: Workload,
        *,
        calls: int | None = None,
        progress_every: int = 0,
        on_progress: Callable[[int], None] | None = None,
        on_measuring: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """One closed-loop run along `route`; the row of the report."""
        assert self.loadgen is not None  # noqa: S101  # set by start()
        opts = self.options
        calls = calls if calls is not None else opts.calls
        self.loadgen.send(
            {
                "op": "run",
                "target": self._target_json(route, workload),
                "workload": workload.name,
                "concurrency": opts.concurrency,
                "warmup": opts.warmup,
                "duration": None if calls else opts.duration,
                "calls": calls,
                "progress_every": progress_every,
                "channels": opts.channels,
                "think": opts.think_ms / 1000,
                "timeout": opts.call_timeout,
            }
        )
        groups = self._groups(route)
        self.loadgen.event("measuring", opts.warmup + 60)
        before = {name: _group_sample(pgid) for name, pgid in groups.items()}
        scrapes_before = {h: self.hops[h].scrape() for h in route.hops}
        busy0, total0 = _machine_cpu()
        ours0 = self.procs.cpu_seconds()
        if on_measuring is not None:
            on_measuring()
        window = 7 * 86400.0 if calls else opts.duration + opts.call_timeout + 30
        self.loadgen.event("stopped", window, on_progress)
        after = {name: _group_sample(pgid) for name, pgid in groups.items()}
        scrapes_after = {h: self.hops[h].scrape() for h in route.hops}
        busy1, total1 = _machine_cpu()
        ours1 = self.procs.cpu_seconds()
        result = self.loadgen.event("result", opts.call_timeout + 60)
        n = result["calls"]

        def per_call(name: str) -> float | None:
            return round((after[name].cpu_s - before[name].cpu_s) / n, 7) if n else None

        row = _empty_row(route.target, route.description, "ok", "")
        hops: list[dict[str, Any]] = []
        for h in route.hops:
            hop = self.hops[h]
            b, a = scrapes_before[h], scrapes_after[h]
            stages = hop.stages
            if len(route.hops) == 1:  # no relay on this route: envelopes are not signed
                stages = [st for st in stages if st not in _RELAY_STAGES]
            hops.append(
                {
                    "name": hop.name,
                    "kind": hop.kind,
                    "stages": stages,
                    "stages_source": hop.stages_source,
                    "cpu_s_per_call": per_call(f"hop:{h}"),
                    "peak_rss_mb": round(after[f"hop:{h}"].hwm_mb, 2),
                    "rss_mb": round(after[f"hop:{h}"].rss_mb, 2),
                    "stage_ms": _stage_ms(b, a) if b is not None and a is not None else None,
                    "records_per_commit": _per(b, a, "psngw_audit_records_total", "psngw_audit_commit_seconds_count"),
                    "calls_per_relay_message": _per(b, a, "psngw_relay_requests_total", "psngw_relay_messages_total"),
                }
            )
        seconds = result["seconds"]
        row.update(
            stages=list(dict.fromkeys(s for h in hops for s in h["stages"])) or ["mtls"],
            all_stages_on=_all_on([h["stages"] for h in hops if h["kind"] == "gateway"]),
            calls=n,
            errors=result["errors"],
            seconds=round(seconds, 4),
            calls_per_s=round(n / seconds, 2) if seconds > 0 else None,
            mib_per_s=round(n * workload.payload_bytes / _MIB / seconds, 2) if seconds > 0 else None,
            hops=hops,
            total_cpu_s_per_call=round(sum(after[g].cpu_s - before[g].cpu_s for g in groups) / n, 7) if n else None,
            backend_cpu_s_per_call=per_call("backend"),
            loadgen_cpu_s_per_call=per_call("loadgen"),
            machine_cpu_busy=round((busy1 - busy0) / (total1 - total0), 3) if total1 > total0 else None,
            # CPU of processes this run did not start (other work on the machine): figures are unreliable when high.
            other_cpu_busy=round(
                max(0.0, (busy1 - busy0) / _CLK_TCK - (ours1 - ours0)) / ((total1 - total0) / _CLK_TCK), 3
            )
            if total1 > total0
            else None,
        )
        for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms"):
            value = result[key]
            row[key] = None if value is None or math.isnan(value) else round(value, 3)
        if result["warmup_errors"]:
            row["note"] = f"errors during warm-up: {result['warmup_errors']}"
        if route.target == "direct":
            row["all_stages_on"] = True  # nothing to switch on: the baseline
        return row

    def run_workload(self, workload: Workload) -> dict[str, Any]:
        """Every target for one workload; the block of the report."""
        rows: list[dict[str, Any]] = []
        for target in self.options.targets:
            route = self.routes.get(target)
            if route is None:
                rows.append(_empty_row(target, "", "skipped", self.skipped.get(target, "not available")))
                continue
            probe = self.probe(route, workload)
            if not probe["ok"]:
                rows.append(
                    _empty_row(
                        target, route.description, "failed", f"a probe call got {probe['code']}: {probe['details']}"
                    )
                )
                continue
            rows.append(self.measure(route, workload))
        _finish_rows(rows)
        block: dict[str, Any] = {
            "description": workload.description,
            "payload_bytes": workload.payload_bytes,
            "rows": rows,
            "direct_again": None,
            "direct_drift": None,
        }
        first = next((r for r in rows if r["target"] == "direct" and r["status"] == "ok"), None)
        if first is not None and first["calls_per_s"] and any(r["status"] == "ok" for r in rows if r is not first):
            # The baseline again, after the others: how far it moved says how far to trust the ratios.
            again = self.measure(self.routes["direct"], workload)
            block["direct_again"] = {k: again[k] for k in ("calls_per_s", "p50_ms", "p99_ms", "errors")}
            if again["calls_per_s"]:
                block["direct_drift"] = round(again["calls_per_s"] / first["calls_per_s"] - 1, 4)
        return block

    def _working_route(self, workload: Workload) -> tuple[_Route | None, str]:
        """Two gateways if they answer, else one gateway (with a note saying so), else None and why."""
        notes: list[str] = []
        for target in ("gateway-2", "gateway-1"):
            route = self.routes[target]
            probe = self.probe(route, workload)
            if probe["ok"]:
                return route, "; ".join(notes)
            notes.append(f"{target}: a probe call got {probe['code']}: {probe['details']}")
        return None, "; ".join(notes)

    def run_memory(self) -> dict[str, Any]:
        """`memory_calls` unary calls through two gateways, sampling each gateway's RSS as they go."""
        workload = WORKLOADS["unary"]
        route, note = self._working_route(workload)
        total = self.options.memory_calls
        every = max(500, total // 50)
        samples: list[dict[str, Any]] = []
        pgids = {self.hops[h].name: self.hops[h].child.pgid for h in route.hops} if route else {}

        def sample(done: int) -> None:
            samples.append(
                {
                    "calls": done,
                    "t": round(time.monotonic(), 3),
                    "rss_mb": {name: round(_group_sample(pgid).rss_mb, 2) for name, pgid in pgids.items()},
                }
            )

        out: dict[str, Any] = {
            "status": "ok" if route else "failed",
            "route": route.target if route else None,
            "note": note,
            "calls": 0,
            "concurrency": self.options.concurrency,
            "errors": {},
            "calls_per_s": None,
            "samples": samples,
            "gateways": {},
        }
        if route is None:
            return out
        row = self.measure(
            route, workload, calls=total, progress_every=every, on_progress=sample, on_measuring=lambda: sample(0)
        )
        peaks = {h["name"]: h["peak_rss_mb"] for h in row["hops"]}
        out.update(
            calls=row["calls"],
            errors=row["errors"],
            calls_per_s=row["calls_per_s"],
            gateways={name: _memory_summary(samples, name, peaks[name]) for name in pgids},
        )
        return out

    def run_profile(self) -> dict[str, Any]:
        """A separate two-gateway run of `profile_workload` with py-spy sampling each gateway; CPU per call by stage."""
        workload = WORKLOADS[self.options.profile_workload]
        found, note = self._working_route(workload)
        if found is None:
            return {
                "status": "failed",
                "route": None,
                "workload": workload.name,
                "method": "",
                "calls_per_s": None,
                "gateways": {},
                "note": note,
            }
        route = found
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        have_spy = Path(py_spy).exists()
        spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        threads_before: dict[str, dict[int, tuple[str, float]]] = {}

        def start_spies() -> None:
            for h in route.hops:
                pid = self.hops[h].child.popen.pid
                threads_before[h] = _thread_cpu(pid)
                if not have_spy:
                    continue
                out = self.root / f"profile-{h}.txt"
                spies[h] = (
                    subprocess.Popen(  # noqa: S603  # py-spy with fixed arguments
                        [
                            py_spy,
                            "record",
                            "--pid",
                            str(pid),
                            "--duration",
                            str(max(1, math.ceil(self.options.duration))),
                            "--rate",
                            "200",
                            "--format",
                            "raw",
                            "--output",
                            str(out),
                            "--nonblocking",
                            "--threads",
                            "--full-filenames",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    ),
                    out,
                )

        threads_after: dict[str, dict[int, tuple[str, float]]] = {}
        try:
            row = self.measure(route, workload, calls=None, on_measuring=start_spies)
            for h in route.hops:
                threads_after[h] = _thread_cpu(self.hops[h].child.popen.pid)
            for proc, _ in spies.values():
                proc.wait(self.options.duration + 30)
        finally:
            for proc, _ in spies.values():
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        n = row["calls"] or 1
        out: dict[str, Any] = {
            "status": "ok",
            "route": route.target,
            "workload": workload.name,
            "method": "py-spy record --nonblocking --rate 200 (on-CPU samples) + /proc per-thread CPU"
            if have_spy
            else "/proc per-thread CPU only (py-spy not found)",
            "calls_per_s": row["calls_per_s"],
            "ratio_note": "sampled run: slower than the measured one",
            "gateways": {},
            "note": "; ".join(
                n for n in (note, "" if have_spy else "install py-spy into the venv for the per-stage split") if n
            ),
        }
        for h in route.hops:
            threads: dict[int, dict[str, Any]] = {}
            for tid, (name, cpu) in threads_after[h].items():
                cpu0 = threads_before[h].get(tid, (name, 0.0))[1]
                threads[tid] = {"name": name, "cpu_ms_per_call": (cpu - cpu0) / n * 1e3}
            stacks = _read_raw_profile(spies[h][1]) if h in spies else []
            out["gateways"][self.hops[h].name] = _split_by_stage(threads, stacks, n)
        return out

    def stop_loadgen(self) -> None:
        if self.loadgen is not None and self.loadgen.popen.poll() is None:
            with contextlib.suppress(BenchError):
                self.loadgen.send({"op": "exit"})


def _read_raw_profile(path: Path) -> list[tuple[int, str, list[str], int]]:
    """(tid, thread name, frames outermost first, samples) from py-spy's raw (collapsed) output with --threads."""
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            tid, name = 0, ""
            if frames and frames[0].startswith("thread ("):
                head = frames.pop(0)  # "thread (<tid>): <name>"
                with contextlib.suppress(ValueError):
                    tid = int(head[len("thread (") : head.index(")")])
                name = head.partition("): ")[2]
            out.append((tid, name, frames, int(count)))
    return out


def _split_by_stage(
    threads: Mapping[int, Mapping[str, Any]], stacks: Sequence[tuple[int, str, list[str], int]], calls: int
) -> dict[str, Any]:
    """One gateway's CPU per call by stage: each thread's CPU shared out by its samples' stages."""
    samples_of: Counter[int] = Counter()
    for tid, _, _, count in stacks:
        samples_of[tid] += count
    stages: Counter[str] = Counter()
    for tid, name, frames, count in stacks:
        cpu = threads.get(tid, {}).get("cpu_ms_per_call", 0.0)
        stages[classify_stack(frames, name)] += cpu * count / samples_of[tid]
    for tid, info in threads.items():
        if tid not in samples_of and info["cpu_ms_per_call"] > 0:
            stages[f"native threads ({info['name']})"] += info["cpu_ms_per_call"]
    total = sum(t["cpu_ms_per_call"] for t in threads.values())
    del calls
    return {
        "cpu_s_per_call": round(total / 1e3, 7),
        "threads": {
            str(tid): {"name": t["name"], "cpu_ms_per_call": round(t["cpu_ms_per_call"], 4)}
            for tid, t in sorted(threads.items())
            if t["cpu_ms_per_call"] > 0
        },
        "stages": {
            stage: {"cpu_ms_per_call": round(ms, 4), "share": round(ms / total, 4) if total else 0.0}
            for stage, ms in stages.most_common()
        },
    }


# -- the report -----------------------------------------------------------------------------


def _machine(loop: str) -> dict[str, Any]:
    import grpc  # noqa: PLC0415

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    mem_mb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_mb = next((int(line.split()[1]) // 1024 for line in f if line.startswith("MemTotal")), 0)
    uvloop_version = None
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        uvloop_version = importlib.metadata.version(uvloop.__name__)
    used = "asyncio" if loop == "asyncio" or uvloop_version is None else "uvloop"
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(  # noqa: S603  # read-only git query
            ["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
        commit = done.stdout.strip() or None
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_mb": mem_mb,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "uvloop": uvloop_version,
        "loop": used,
        "platform": platform.platform(),
        "commit": commit,
    }


def _components() -> dict[str, Any]:
    """The component benchmarks other modules provide (audit log, policy), where present."""
    out: dict[str, Any] = {}
    try:
        from gateway.audit import bench as audit_bench  # noqa: PLC0415
    except ImportError as exc:
        out["audit"] = {"error": f"not available: {exc}"}
    else:
        out["audit_append"] = audit_bench.bench_append()
        out["audit_call_path"] = audit_bench.bench_call_path()
        out["audit_verify"] = audit_bench.bench_verify()
    try:
        from gateway.policy import bench as policy_bench  # noqa: PLC0415
    except ImportError as exc:
        out["policy"] = {"error": f"not available: {exc}"}
    else:
        out["policy_decisions"] = policy_bench.bench_decisions()
    return out


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt here, so the processes are stopped as on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_bench(options: BenchOptions, *, progress: IO[str] | None = None) -> dict[str, Any]:
    """Start a network, measure, stop everything; the report (a JSON-able dict)."""

    def say(text: str) -> None:
        if progress is not None:
            progress.write(f"psngw bench: {text}\n")
            progress.flush()

    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_terminate_as_interrupt())
        if options.root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="psngw-bench-")))
        else:
            root = options.root
            root.mkdir(parents=True, exist_ok=True)
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        procs = stack.enter_context(_Processes(logs))
        bench = _Bench(options, root, procs)
        say(f"starting the network in {root}")
        bench.start()
        report: dict[str, Any] = {
            "schema": SCHEMA,
            "date": date,
            "machine": _machine(options.loop),
            "options": options.as_json(),
            "network": {
                "caller_force": bench.caller,
                "host_force": bench.host,
                "routes": {t: r.description for t, r in bench.routes.items()},
                "hops": {name: {"kind": h.kind, "stages": h.stages} for name, h in bench.hops.items()},
                "rate_limits": bench.rate_limits,
                "stages_source": "per hop: healthz (the gateway's /healthz lists its stages) or config (a table "
                "present in the gateway config = the stage configured)",
            },
            "workloads": {},
            "memory": None,
            "profile": None,
            "components": None,
        }
        for name in options.workloads:
            say(f"workload {name}: {', '.join(options.targets)}")
            report["workloads"][name] = bench.run_workload(WORKLOADS[name])
        if options.memory:
            say(f"memory: {options.memory_calls} calls through two gateways")
            report["memory"] = bench.run_memory()
        if options.profile:
            say(f"profile: a sampled two-gateway {options.profile_workload} run")
            report["profile"] = bench.run_profile()
        bench.stop_loadgen()
        say("stopping the network")
    if options.components:
        say("component benchmarks (audit, policy)")
        report["components"] = _components()
    report["targets"] = evaluate_targets(report)
    return report


# -- CLI -------------------------------------------------------------------------------------


def _bounded(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value

    return parse


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"targets are a comma list of {', '.join(TARGETS)}; got {text!r}")
    if "direct" not in names:
        names = ("direct", *names)  # every figure is a ratio to direct in the same run
    return names


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The `BenchOptions` of parsed ``psngw bench`` arguments."""
    workloads = {"all": tuple(WORKLOADS), "none": ()}.get(args.workload, (args.workload,))
    return BenchOptions(
        workloads=workloads,
        targets=args.targets,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        calls=args.calls,
        channels=args.channels,
        think_ms=args.think_ms,
        memory=args.memory,
        memory_calls=args.memory_calls,
        profile=args.profile,
        profile_workload=args.profile_workload,
        components=args.components,
        root=args.root,
        gateway_log_level=args.gateway_log_level,
        loop=args.loop,
        unit=args.unit,
        role=args.role,
        clearance=args.clearance,
        keep_rate_limits=args.keep_rate_limits,
        signing_key=args.signing_key,
        workers=args.workers,
    )


def _json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _cmd_bench(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    try:
        report = run_bench(options, progress=sys.stderr)
    except KeyboardInterrupt:
        print("psngw bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    print(render_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
        print(f"\nJSON written to {args.json}")
    failed = [r for b in report["workloads"].values() for r in b["rows"] if r["status"] == "failed"]
    return 1 if failed else 0


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `psngw bench`."""
    p = sub.add_parser(
        "bench",
        help="measure the gateway against direct mTLS calls, in one run",
        description="Start a three-force network on 127.0.0.1 (gateways, echo backends and load generator as "
        "separate processes), run a closed-loop load against direct mTLS, one gateway and two gateways (and nginx "
        "proxies when nginx is installed), and report throughput, latency, CPU per call and RSS, as ratios to "
        "direct measured in the same run. See docs/performance.md.",
    )
    p.add_argument(
        "--workload",
        choices=(*WORKLOADS, "all", "none"),
        default="unary",
        help="unary 1 KiB (default), server-stream 1 MiB, client-stream 16 x 64 KiB, all, or none",
    )
    p.add_argument(
        "--concurrency",
        type=_bounded(int, 1, 1024),
        default=64,
        help="calls in flight (closed loop), 1 to 1024; 1 measures unloaded latency (default 64)",
    )
    p.add_argument(
        "--duration",
        type=_bounded(float, 0.5, 600),
        default=10.0,
        help="measured seconds per target, 0.5 to 600 (default 10)",
    )
    p.add_argument(
        "--warmup",
        type=_bounded(float, 0, 60),
        default=2.0,
        help="seconds of unmeasured load before each measurement, 0 to 60 (default 2)",
    )
    p.add_argument(
        "--calls",
        type=_bounded(int, 1, 10_000_000),
        default=None,
        help="measure this many calls per target instead of --duration",
    )
    p.add_argument(
        "--targets",
        type=_targets,
        default=tuple(TARGETS),
        help=f"comma list of {', '.join(TARGETS)} (default all; direct is always measured)",
    )
    p.add_argument(
        "--channels",
        type=_bounded(int, 1, 64),
        default=1,
        help="client connections the load generator spreads its calls over (default 1)",
    )
    p.add_argument(
        "--think-ms",
        type=_bounded(float, 0, 10_000),
        default=0.0,
        help="each caller pauses this long after a call before its next, 0 to 10000 ms (default 0); with "
        "--concurrency 1, direct then sits idle between calls as it does behind the slower routes",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="also run --memory-calls calls through two gateways, sampling RSS (flat is the target)",
    )
    p.add_argument(
        "--memory-calls",
        type=_bounded(int, 1000, 2_000_000),
        default=100_000,
        help="calls for --memory (default 100000)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run a two-gateway run under py-spy (if installed) and split CPU per call by stage",
    )
    p.add_argument(
        "--profile-workload",
        choices=tuple(WORKLOADS),
        default="unary",
        help="the workload --profile samples (default unary)",
    )
    p.add_argument(
        "--components", action="store_true", help="also run the audit log's and the policy's component benchmarks"
    )
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON to this file")
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="write the network (configs, PKI, logs) here and keep it (default: a temporary folder)",
    )
    p.add_argument(
        "--gateway-log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="the gateways' operator log level (default warning: no per-call log lines)",
    )
    p.add_argument(
        "--loop",
        default="auto",
        choices=("auto", "asyncio", "uvloop"),
        help="event loop of the load generator and the backends (auto: uvloop when installed)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        choices=range(1, 17),
        metavar="N",
        help="gateway processes per force (psngw serve --workers N; default 1)",
    )
    p.add_argument(
        "--signing-key",
        choices=("ed25519", "p256"),
        default="ed25519",
        help="the gateways' envelope-signing key type (default ed25519, as psngw pki issues it)",
    )
    p.add_argument(
        "--keep-rate-limits",
        action="store_true",
        help="keep the gateways' rate limits (by default the bench lifts them: its one officer would meet them)",
    )
    p.add_argument("--unit", default="serocu", help="the officer's unit in the bench's token (default serocu)")
    p.add_argument("--role", default="analyst", help="the officer's role in the bench's token (default analyst)")
    p.add_argument("--clearance", default="SC", help="the officer's clearance in the bench's token (default SC)")
    p.set_defaults(func=_cmd_bench)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
