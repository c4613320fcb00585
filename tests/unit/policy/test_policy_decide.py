"""The fast path: names first, then vetting, then the rules with deny overriding allow across subjects."""

from __future__ import annotations

import random
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.directory import NetworkDirectory
from gateway.policy import Policy, load_policy, run_golden
from gateway.policy.decide import MAX_SUBJECTS

from .conftest import BULK, FIND, GET, PURGE, SMALL_G2, STREAM, request, small_directory

SEARCH = "/psn.demo.intel.v1.IntelligenceSearch/Search"
STREAM_MATCHES = "/psn.demo.intel.v1.IntelligenceSearch/StreamMatches"
BULK_LOOKUP = "/psn.demo.custody.v1.CustodyRecords/BulkLookup"
GET_RECORD = "/psn.demo.custody.v1.CustodyRecords/GetRecord"


def test_the_real_golden_cases_pass(policy: Policy) -> None:
    results = run_golden(policy)
    assert len(results) >= 30
    assert [r.case.name for r in results if not r.passed] == []


def test_version_is_a_digest_of_the_files(policy: Policy, policy_copy: Path, directory: NetworkDirectory) -> None:
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", policy.version)
    assert load_policy(policy_copy, directory).version == policy.version
    # Golden cases do not decide anything: editing them keeps the version.
    golden = policy_copy / "tests" / "refusals.toml"
    golden.write_text(golden.read_text() + "\n# reviewed\n")
    assert load_policy(policy_copy, directory).version == policy.version
    rules = policy_copy / "rules" / "case-files.csv"
    rules.write_text(rules.read_text() + "\n# reviewed\n")
    assert load_policy(policy_copy, directory).version != policy.version


def test_decisions_carry_version_and_unique_ids(policy: Policy) -> None:
    decisions = [policy.decide(request("hampshire", SEARCH, units=("serocu",))) for _ in range(1000)]
    assert len({d.decision_id for d in decisions}) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", d.decision_id) for d in decisions)
    assert {d.policy_version for d in decisions} == {policy.version}


def test_allow_names_the_rule_with_file_and_line(policy: Policy) -> None:
    decision = policy.decide(request("hampshire", SEARCH, units=("serocu",)))
    assert decision.allowed
    assert decision.rule == "rules/intel-search.csv:7: p, unit:serocu, hampshire, app:intel-search, allow"
    assert decision.reason == f"allowed by rule {decision.rule} (unit serocu from force hampshire)"


def test_default_deny_says_who_from_where_to_what(policy: Policy) -> None:
    decision = policy.decide(request("hampshire", STREAM_MATCHES, units=("jou",), roles=("analyst",)))
    assert not decision.allowed
    assert decision.rule is None
    assert decision.reason == (
        f"no rule allows unit jou, role analyst from force hampshire to call {STREAM_MATCHES} (default deny)"
    )


@pytest.mark.parametrize(
    ("units", "roles"),
    [
        (("serocu",), ("custody-officer",)),  # unit allowed, role denied
        (("serocu", "hants-custody"), ()),  # one unit allowed, another denied
        (("hants-custody", "serocu"), ("analyst",)),  # order does not matter
    ],
)
def test_deny_overrides_allow_across_subjects(policy: Policy, units: tuple[str, ...], roles: tuple[str, ...]) -> None:
    alone = policy.decide(request("hampshire", SEARCH, units=("serocu",)))
    assert alone.allowed
    decision = policy.decide(request("hampshire", SEARCH, units=units, roles=roles))
    assert not decision.allowed
    assert decision.rule is not None and decision.rule.endswith(", deny")
    assert "deny overrides allow" in decision.reason


def test_the_first_deny_in_load_order_is_named(policy: Policy) -> None:
    # Both the role and the unit are denied; the role's row comes first in the file.
    decision = policy.decide(request("surrey", SEARCH, units=("surrey-custody",), roles=("custody-officer",)))
    assert decision.rule == "rules/intel-search.csv:28: p, role:custody-officer, *, app:intel-search, deny"


@pytest.mark.parametrize(
    ("clearance", "allowed"), [("NPPV1", False), ("NPPV2", False), ("NPPV3", False), ("SC", True), ("DV", True)]
)
def test_vetting_below_the_application_minimum_is_refused(policy: Policy, clearance: str, allowed: bool) -> None:
    decision = policy.decide(request("hampshire", SEARCH, units=("serocu",), clearance=clearance))
    assert decision.allowed is allowed
    if not allowed:
        assert decision.rule is None
        assert decision.reason == (f"clearance {clearance} below application minimum SC (intel-search requires SC)")


def test_vetting_is_per_application(policy: Policy) -> None:
    # NPPV2 is enough for custody records, not for intelligence search.
    assert policy.decide(request("hampshire", GET_RECORD, units=("serocu",), clearance="NPPV2")).allowed
    assert not policy.decide(request("hampshire", SEARCH, units=("serocu",), clearance="NPPV2")).allowed


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (request("kent", SEARCH, units=("serocu",)), "origin force 'kent' is not in the network directory"),
        (request("hampshire", "/x.Y/Z", units=("serocu",)), "method '/x.Y/Z' is not served by any application"),
        (request("hampshire", SEARCH, units=("nobody",)), "unit 'nobody' is not in the network directory"),
        (request("hampshire", SEARCH, units=("serocu",), roles=("chief",)), "role 'chief' is not in the network"),
        (request("hampshire", SEARCH, units=("serocu",), clearance="TS"), "clearance 'TS' is not one of"),
        (request("hampshire", SEARCH), "principal has no units or roles"),
        (
            request("surrey", SEARCH, units=("serocu", "tvp-intel")),
            "unit tvp-intel belongs to force thames-valley, not to the origin force surrey",
        ),
    ],
)
def test_names_are_checked_before_anything_else(policy: Policy, req: object, reason: str) -> None:
    decision = policy.decide(req)  # type: ignore[arg-type]
    assert not decision.allowed
    assert decision.rule is None
    assert reason in decision.reason


def test_an_unknown_unit_is_refused_even_beside_an_allowed_one(policy: Policy) -> None:
    decision = policy.decide(request("hampshire", SEARCH, units=("serocu", "ghost")))
    assert not decision.allowed
    assert "unit 'ghost' is not in the network directory" in decision.reason


def test_too_many_subjects_are_refused(policy: Policy) -> None:
    units = ("serocu",) * (MAX_SUBJECTS + 1)
    decision = policy.decide(request("hampshire", SEARCH, units=units))
    assert not decision.allowed
    assert f"more than {MAX_SUBJECTS}" in decision.reason


def test_hostile_names_are_quoted_and_cut_in_reasons(policy: Policy) -> None:
    decision = policy.decide(request("hampshire", SEARCH, units=("x\n" * 100,)))
    assert "\n" not in decision.reason
    assert len(decision.reason) < 200


def test_unknown_input_grows_no_memory(policy: Policy) -> None:
    rng = random.Random(7)
    size = policy.table_size()
    requests = [
        request(
            rng.choice(["hampshire", f"force-{i}"]),
            rng.choice([SEARCH, f"/x.Y/M{i}"]),
            units=(f"unit-{i}",),
            roles=(f"role-{i}",),
            clearance=f"L{i}",
        )
        for i in range(20_000)
    ]
    for req in requests[:1000]:  # warm up whatever the interpreter caches
        policy.decide(req)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for req in requests:
        assert not policy.decide(req).allowed
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, grown
    assert policy.table_size() == size


# -- the model's features, on a small network --------------------------------------


def _load(small: Callable[..., Path], tmp_path: Path, rules: str, groups: str = SMALL_G2) -> Policy:
    return load_policy(small(tmp_path, rules, groups), small_directory(), check_golden=False)


def test_group_membership_is_per_force(small: Callable[..., Path], tmp_path: Path) -> None:
    groups = SMALL_G2 + "g, unit:rocu, group:crime, north\ng, role:analyst, group:crime, south\n"
    policy = _load(
        small, tmp_path, "p, group:crime, north, app:search, allow\np, group:crime, south, app:search, allow\n", groups
    )
    assert policy.decide(request("north", FIND, units=("rocu",))).allowed
    assert not policy.decide(request("south", FIND, units=("rocu",))).allowed
    assert policy.decide(request("south", FIND, roles=("analyst",))).allowed
    assert not policy.decide(request("north", FIND, roles=("analyst",))).allowed


def test_prefix_and_application_objects(small: Callable[..., Path], tmp_path: Path) -> None:
    rules = (
        "p, unit:rocu, north, /t.records.v1.Records/*, allow\n"
        "p, unit:north-cid, north, app:records, allow\n"
        "p, role:analyst, north, /t.search.v1.Search/Find, allow\n"
    )
    policy = _load(small, tmp_path, rules)
    assert policy.decide(request("north", GET, units=("rocu",))).allowed
    assert policy.decide(request("north", BULK, units=("rocu",))).allowed
    assert not policy.decide(request("north", PURGE, units=("rocu",))).allowed  # another service
    assert policy.decide(request("north", PURGE, units=("north-cid",))).allowed  # the whole application
    assert policy.decide(request("north", FIND, roles=("analyst",))).allowed
    assert not policy.decide(request("north", STREAM, roles=("analyst",))).allowed


def test_deny_on_any_force_and_any_object(small: Callable[..., Path], tmp_path: Path) -> None:
    rules = (
        "p, unit:rocu, north, app:records, allow\n"
        "p, unit:rocu, south, app:records, allow\n"
        "p, unit:rocu, *, /t.records.v1.Records/Bulk, deny\n"
        "p, role:supervisor, north, app:search, allow\n"
        "p, role:supervisor, *, *, deny\n"
    )
    policy = _load(small, tmp_path, rules)
    assert policy.decide(request("south", GET, units=("rocu",))).allowed
    for force in ("north", "south"):
        assert not policy.decide(request(force, BULK, units=("rocu",))).allowed
    assert not policy.decide(request("north", FIND, roles=("supervisor",))).allowed


def test_an_empty_policy_denies_everything(small: Callable[..., Path], tmp_path: Path) -> None:
    policy = _load(small, tmp_path, "p, unit:rocu, *, *, deny\n")
    directory = small_directory()
    for force in directory.forces:
        for route in directory.all_methods():
            assert not policy.decide(request(force, route.method.path, units=("rocu",), roles=("analyst",))).allowed
    assert any("no allow rows" in w.message for w in policy.warnings)


def test_warming_reads_every_entry(policy: Policy) -> None:
    assert policy.warm() == policy.table_size() > 0
