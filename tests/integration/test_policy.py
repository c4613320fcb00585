"""Policy in the running network: decisions in the audit log, hot reload, rejected edits, shadow mode."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway.audit.store import LogReader
from gateway.audit.tools import QueryFilter, query
from tests.netharness import NetworkThread, wait_for

pytestmark = pytest.mark.integration

RULES = "rules/intel-search.csv"
JOU_STREAM = "/psn.demo.intel.v1.IntelligenceSearch/StreamMatches"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkThread]:
    network = NetworkThread(tmp_path_factory.mktemp("policy-net")).start()
    yield network
    network.stop()


def stream_matches(net: NetworkThread, force: str, units: tuple[str, ...], officer: str) -> grpc.RpcError | None:
    with net.officer_channel(force, units=units, officer=officer) as ch:
        try:
            list(
                intel_pb2_grpc.IntelligenceSearchStub(ch).StreamMatches(
                    intel_pb2.SearchRequest(subject="a"), timeout=10
                )
            )
        except grpc.RpcError as exc:
            return exc
    return None


def version(net: NetworkThread, force: str) -> str:
    return net.network.gateways[force].policy.current.version  # type: ignore[no-any-return]


def test_a_denial_names_decision_and_version_and_the_log_names_the_rule(net: NetworkThread) -> None:
    officer = f"DC-{uuid.uuid4().hex[:8]}"
    err = stream_matches(net, "surrey", ("jou",), officer)  # JOU: single searches only
    assert err is not None and err.code() is grpc.StatusCode.PERMISSION_DENIED
    match = re.fullmatch(r"permission denied \(decision ([0-9a-f]{32}), policy (sha256:[0-9a-f]+)\)", err.details())
    assert match, err.details()
    assert "rules/" not in err.details()  # the caller never sees the rules
    with LogReader.open(net.layout.config("surrey").audit.db) as reader:
        [record] = query(reader, QueryFilter(officer=officer))
    assert record.decision_allowed is False and record.decision_id == match.group(1)
    assert record.policy_version == match.group(2) == version(net, "surrey")
    assert record.refusal_stage == "policy" and "default deny" in record.refusal_reason


def _edit(net: NetworkThread, text: str) -> Path:
    path = net.layout.root / "policies" / RULES
    path.write_text(text)
    return path


GOLDEN = "tests/intel-search.toml"


def test_a_good_edit_is_rolled_out_by_hot_reload_and_a_bad_one_is_refused(net: NetworkThread) -> None:
    path = net.layout.root / "policies" / RULES
    original = path.read_text()
    golden_path = net.layout.root / "policies" / GOLDEN
    golden = golden_path.read_text()
    before = {f: version(net, f) for f in net.network.gateways}
    assert stream_matches(net, "surrey", ("jou",), "DC-1") is not None
    grant = "".join(
        f"p, unit:jou, {force}, {JOU_STREAM}, allow\n" for force in ("thames-valley", "hampshire", "surrey")
    )
    try:
        # The golden cases guard the old behaviour: an officer who changes a grant changes its case too.
        _edit(net, original + grant)
        time.sleep(3)
        assert all(version(net, f) == before[f] for f in before), "a failing golden case must block the edit"
        golden_path.write_text(
            golden.replace('expect = "deny"\nreason_contains = "default deny"', 'expect = "allow"', 1)
        )
        wait_for(lambda: all(version(net, f) != before[f] for f in before), "every gateway to load the edit")
        assert stream_matches(net, "surrey", ("jou",), "DC-2") is None  # now allowed at both gateways
        good = version(net, "surrey")

        # A typo that casbin would silently accept (and that would fail open): refused, last good stays.
        _edit(net, original + grant + "p, role:custody-officer, *, app:intel-search, DENY\n")
        gateway = net.network.gateways["surrey"]
        wait_for(lambda: gateway.policy.last_error is not None, "the bad edit to be rejected")
        assert "DENY" in gateway.policy.last_error and RULES in gateway.policy.last_error
        assert version(net, "surrey") == good
        assert gateway.health()["policy"]["last_error"]
        assert stream_matches(net, "surrey", ("jou",), "DC-3") is None  # still the last good policy
    finally:
        _edit(net, original)
        golden_path.write_text(golden)
    wait_for(lambda: all(version(net, f) == before[f] for f in before), "the original policy to be back")
    err = stream_matches(net, "surrey", ("jou",), "DC-4")
    assert err is not None and err.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_half_written_file_never_reaches_a_call(net: NetworkThread) -> None:
    # Written in pieces, as an editor might: the reload sees an invalid file (or the whole one), never half a policy.
    path = net.layout.root / "policies" / RULES
    original = path.read_text()
    old = version(net, "hampshire")
    try:
        with path.open("w") as f:
            f.write("p, unit:serocu, hamp")
            f.flush()
            time.sleep(3)  # longer than the reload interval
            assert version(net, "hampshire") == old
            err = stream_matches(net, "hampshire", ("serocu",), "DC-5")
            assert err is None  # SEROCU keeps its grant under the old policy
    finally:
        path.write_text(original)
    wait_for(lambda: net.network.gateways["hampshire"].policy.last_error is None, "a clean reload")
    assert version(net, "hampshire") == old
