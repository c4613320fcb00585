"""The audit stage's record of a call: every field comes from the call, and it is the validated record."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.audit.bench import sample_call
from gateway.audit.record import AuditRecord, RecordError
from gateway.audit.recorder import record_for
from gateway.errors import PermissionDenied
from gateway.pipeline import Call, Listener

GATEWAY = "spiffe://thames-valley.se.psn/gateway"
FORCE = "thames-valley"


def _record(call: Call, event: str = "call") -> AuditRecord:
    return record_for(call, event, gateway=GATEWAY, force=FORCE, now=1_800_000_000.25, now_mono=0.0125)


def test_a_relayed_call_becomes_a_full_record() -> None:
    call = sample_call(7)
    record = _record(call)
    assert record == AuditRecord(**record.__dict__)  # the constructor accepts exactly these values
    assert record.time == "2027-01-15T08:00:00.250000Z"
    assert (record.gateway, record.force, record.index) == (GATEWAY, FORCE, None)
    assert record.peer == record.origin_gateway == "spiffe://hampshire.se.psn/gateway"
    assert record.origin_force == "hampshire"
    assert record.recipients == ("hampshire", "serocu")
    assert record.application == "intel-search" and record.call_type == "unary" and record.host_force == FORCE
    assert record.decision_allowed is True and record.status == "OK" and record.latency_ms == 12.5
    assert record.request_digest == call.request_digest.hex()
    assert record.envelope_signature and AuditRecord.decode(record.with_index(3).encode()) == record.with_index(3)


def test_a_local_call_refused_before_policy() -> None:
    call = Call(Listener.LOCAL, "/x.Y/Z", (), None, 0.0, 0.0)
    call.refusal = PermissionDenied("no token", public="denied")
    call.status = "PERMISSION_DENIED"
    record = _record(call)
    assert (record.origin_force, record.origin_gateway) == (FORCE, GATEWAY)
    assert record.decision_allowed is None and record.refusal_stage == "forward" and record.refusal_reason
    assert record.envelope_signature == "" and record.request_digest == ""
    assert _record(call, "stream-open").status == ""


def test_a_call_with_values_the_record_refuses_is_refused_not_recorded() -> None:
    call = sample_call(1)
    call.status = "not-a-status"
    with pytest.raises(RecordError):
        _record(call)
    call = sample_call(1)
    call.principal = dataclasses.replace(call.principal, officer_id=7)  # type: ignore[arg-type]  # a wrong type
    with pytest.raises(RecordError):
        _record(call)


def test_the_call_path_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    from gateway.audit.bench import bench_call_path

    out = bench_call_path(records=300, appenders=8, directory=tmp_path)
    for name in ("record_for_us", "encode_us", "stage_us", "records_per_s", "mean_batch", "metrics_us"):
        assert out[name] > 0, name
    assert out["metrics_bound_us"] > 0
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself


@pytest.mark.bench
def test_bench_call_path(tmp_path: Path) -> None:
    from gateway.audit.bench import bench_call_path

    for appenders in (64, 8, 1):
        out = bench_call_path(records=20_000 if appenders > 1 else 2_000, appenders=appenders, directory=tmp_path)
        print(f"\naudit stage, {appenders} appenders: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()))
