"""Casbin is the meaning of the policy: the fast path must agree with it; our validation catches what it misses."""

from __future__ import annotations

import ast
import tempfile
from collections.abc import Iterator
from pathlib import Path

import casbin
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.directory import NetworkDirectory
from gateway.errors import NotFound
from gateway.policy import DecisionRequest, Policy, PolicyError, check_policy, load_policy
from gateway.policy import load as load_module
from gateway.policy._isolated import check_in_child
from gateway.policy.bench import write_synthetic_policy
from gateway.policy.decide import build_policy
from gateway.policy.engine import MODEL_TEXT, CasbinOracle, casbin_oracle, check_model
from gateway.policy.files import ParsedPolicy, read_policy_source
from gateway.policy.values import Rule
from gateway.policy.verify import verify_against_casbin

from .conftest import POLICIES, SMALL_METHODS, small_directory, write_policy

MODEL = POLICIES / "model.conf"
FORCES = ("north", "south")
UNITS = ("rocu", "north-cid", "south-cid")
ROLES = ("analyst", "supervisor")
GROUPS = ("group:g1", "group:g2")
SUBJECTS = tuple(f"unit:{u}" for u in UNITS) + tuple(f"role:{r}" for r in ROLES)
OBJECTS = (
    *SMALL_METHODS,
    "/t.search.v1.Search/*",
    "/t.records.v1.Records/*",
    "/t.records.v1.Admin/*",
    "app:search",
    "app:records",
    "*",
)
LEVELS = ("NPPV1", "NPPV2", "SC")


def _casbin_from_files(policy_dir: Path, tmp: Path) -> casbin.Enforcer:
    """Casbin on its own: its file adapter reading every row file, as an officer's files are."""
    rows = tmp / "all-rows.csv"
    files = sorted(policy_dir.glob("*.csv")) + sorted((policy_dir / "rules").glob("*.csv"))
    rows.write_bytes(b"\n".join(f.read_bytes() for f in files))
    enforcer = casbin.Enforcer(str(MODEL), str(rows))
    enforcer.add_named_matching_func("g2", casbin.util.key_match_func)
    return enforcer


def _casbin_allows(enforcer: casbin.Enforcer, directory: NetworkDirectory, req: DecisionRequest) -> bool:
    """The principal's decision as the README defines it, with casbin deciding each subject."""
    units = directory.units
    if req.origin_force not in directory.forces or not (req.units or req.roles):
        return False
    if any(u not in units or units[u].force not in (None, req.origin_force) for u in req.units):
        return False
    if any(r not in directory.roles for r in req.roles) or req.clearance not in directory.clearance_levels:
        return False
    try:
        route = directory.route(req.method)
    except NotFound:
        return False
    if directory.clearance_rank(req.clearance) < directory.clearance_rank(route.application.min_clearance):
        return False
    effects = set()
    for subject in [f"unit:{u}" for u in req.units] + [f"role:{r}" for r in req.roles]:
        allowed, explain = enforcer.enforce_ex(subject, req.origin_force, req.method)
        effects.add("allow" if allowed else "deny" if explain else None)
    return "allow" in effects and "deny" not in effects


# -- casbin alone accepts broken edits, and some fail open --------------------------


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        ("\ufeffp, unit:rocu, north, app:search, deny\np, unit:rocu, north, app:search, allow\n", "BOM"),
        ("p, unit:rocu, north, app:search, allow\np, unit:rocu, north, app:search, DENY\n", "effect typo"),
        ("p, unit:rocu, north, app:search, allow\nP, unit:rocu, north, app:search, deny\n", "row type"),
    ],
)
def test_casbin_alone_fails_open_where_we_refuse(rows: str, why: str, tmp_path: Path) -> None:
    policy_dir = write_policy(
        tmp_path / "p", {"groups.csv": "g2, /t.search.v1.Search/*, app:search\n", "rules/r.csv": rows}
    )
    enforcer = _casbin_from_files(policy_dir, tmp_path)
    assert enforcer.enforce("unit:rocu", "north", "/t.search.v1.Search/Find"), why  # the deny is lost
    errors = [f for f in check_policy(policy_dir, small_directory()) if f.is_error]
    assert errors and errors[0].line in (1, 2), why


# -- the fast path agrees with casbin --------------------------------------------------

_rules = st.tuples(
    st.sampled_from(SUBJECTS + GROUPS),
    st.sampled_from((*FORCES, "*")),
    st.sampled_from(OBJECTS),
    st.sampled_from(("allow", "deny")),
).filter(lambda r: r[3] == "deny" or (r[1] != "*" and r[2] != "*"))
_links = st.tuples(st.sampled_from(SUBJECTS), st.sampled_from(GROUPS), st.sampled_from(FORCES))
_app_rows = st.sampled_from(
    [
        ("g2, /t.search.v1.Search/*, app:search",),
        ("g2, /t.search.v1.Search/Find, app:search", "g2, /t.search.v1.Search/Stream, app:search"),
        ("g2, /t.search.v1.Search/Find, app:search",),
    ]
)
_record_rows = st.sampled_from(
    [
        ("g2, /t.records.v1.Records/*, app:records", "g2, /t.records.v1.Admin/*, app:records"),
        ("g2, /t.records.v1.Records/Get, app:records", "g2, /t.records.v1.Admin/Purge, app:records"),
        ("g2, /t.records.v1.Records/*, app:records",),
    ]
)
_requests = st.builds(
    DecisionRequest,
    origin_force=st.sampled_from((*FORCES, "east")),
    units=st.lists(st.sampled_from((*UNITS, "ghost")), max_size=3, unique=True).map(tuple),
    roles=st.lists(st.sampled_from((*ROLES, "chief")), max_size=2, unique=True).map(tuple),
    clearance=st.sampled_from((*LEVELS, "TS")),
    method=st.sampled_from((*SMALL_METHODS, "/t.x.v1.X/Y")),
)


@st.composite
def _policies(draw: st.DrawFn) -> dict[str, str]:
    rules = draw(st.lists(_rules, min_size=1, max_size=25))
    links = draw(st.lists(_links, max_size=8))
    # Every group has a member somewhere, so rules on it are valid.
    links += [("unit:rocu", "group:g1", "north"), ("role:analyst", "group:g2", "south")]
    groups = [*draw(_app_rows), *draw(_record_rows)] + [f"g, {m}, {g}, {f}" for m, g, f in links]
    return {"groups.csv": "\n".join(groups) + "\n", "rules/r.csv": "".join(f"p, {', '.join(r)}\n" for r in rules)}


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


_counter = iter(range(1_000_000))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=_policies(), requests=st.lists(_requests, min_size=20, max_size=40))
def test_fast_path_agrees_with_casbin_on_random_policies(
    files: dict[str, str], requests: list[DecisionRequest], scratch: Path
) -> None:
    root = scratch / f"case-{next(_counter)}"
    policy_dir = write_policy(root / "policy", files)
    directory = small_directory()
    policy = load_policy(policy_dir, directory, check_golden=False)
    enforcer = _casbin_from_files(policy_dir, root)
    for req in requests:
        assert policy.decide(req).allowed == _casbin_allows(enforcer, directory, req), req


@settings(max_examples=60, deadline=None)
@given(files=_policies())
def test_narrowing_rows_per_subject_does_not_change_casbin_answers(files: dict[str, str], scratch: Path) -> None:
    policy_dir = write_policy(scratch / f"narrow-{next(_counter)}", files)
    policy = load_policy(policy_dir, small_directory(), check_golden=False)
    with casbin_oracle(policy.parsed, partition=False) as full:
        everything = {(s, f, m): full.subject_effect(s, f, m) for s in SUBJECTS for f in FORCES for m in SMALL_METHODS}
    with casbin_oracle(policy.parsed) as narrowed:
        assert {(s, f, m): narrowed.subject_effect(s, f, m) for s, f, m in everything} == everything


def test_the_real_policy_agrees_with_casbin_on_every_request(policy: Policy, tmp_path: Path) -> None:
    directory = policy.directory
    enforcer = _casbin_from_files(POLICIES, tmp_path)
    for force in directory.forces:
        units = [u for u, unit in directory.units.items() if unit.force in (None, force)]
        for route in directory.all_methods():
            for unit in units:
                for roles in ((), ("custody-officer",), ("analyst", "supervisor")):
                    for clearance in ("NPPV2", "SC"):
                        req = DecisionRequest(force, (unit,), roles, clearance, route.method.path)
                        assert policy.decide(req).allowed == _casbin_allows(enforcer, directory, req), req


# -- the check itself ------------------------------------------------------------------


def _tamper(policy: Policy) -> None:
    """Flip one entry of the fast path's table to a rule that does not decide there."""
    table = policy._units_by
    key = next(iter(table))
    name, index = next(iter(table[key].items()))
    other = next(r for r in policy.parsed.rules if r.allows != policy.parsed.rules[index].allows)
    table[key][name] = other.position


def test_a_wrong_table_is_caught_by_the_casbin_check(directory: NetworkDirectory) -> None:
    policy = load_policy(POLICIES, directory)
    assert verify_against_casbin(policy) == []
    _tamper(policy)
    problems = verify_against_casbin(policy)
    assert problems
    assert "fast path and casbin disagree" in problems[0].message


def test_load_refuses_a_policy_whose_table_disagrees(
    directory: NetworkDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_build(*args: object, **kwargs: object) -> Policy:
        policy = build_policy(*args, **kwargs)  # type: ignore[arg-type]
        _tamper(policy)
        return policy

    monkeypatch.setattr(load_module, "build_policy", broken_build)
    with pytest.raises(PolicyError, match="fast path and casbin disagree"):
        load_policy(POLICIES, directory)


def test_the_child_process_check_compares_table_digests(policy: Policy, directory: NetworkDirectory) -> None:
    source = read_policy_source(POLICIES)
    assert check_in_child(source, directory, policy.table_digest()) == []
    problems = check_in_child(source, directory, "0" * 64)
    assert [p.message for p in problems] == ["the casbin check process built a different table; the policy is not used"]


def test_an_isolated_load_gives_the_same_policy(policy: Policy, directory: NetworkDirectory) -> None:
    isolated = load_policy(POLICIES, directory, isolate=True)
    assert isolated.version == policy.version
    assert isolated.table_digest() == policy.table_digest()


def test_casbin_reads_every_row_as_we_do(policy: Policy) -> None:
    rule = policy.parsed.rules[0]
    lying = tuple(rule._replace(effect="deny"))  # the text still says allow
    parsed = ParsedPolicy(**{**policy.parsed.__dict__, "rule_rows": (lying, *policy.parsed.rule_rows[1:])})
    with pytest.raises(PolicyError, match="casbin reads this row as"):
        CasbinOracle(parsed)


def test_many_role_links_load_without_the_domain_matching_function(tmp_path: Path) -> None:
    directory = write_synthetic_policy(tmp_path, rules=300, units=1200)
    policy = load_policy(tmp_path / "policy", directory, check_golden=False)
    assert len(policy.parsed.groups) > 1000
    with casbin_oracle(policy.parsed) as oracle:
        assert oracle.domain_matching_cleared


def test_the_model_is_pinned() -> None:
    assert check_model(MODEL.read_text(), "model.conf") == []
    assert check_model(MODEL_TEXT, "model.conf") == []
    changed = MODEL_TEXT.replace('|| p.dom == "*"', "")
    assert "[matchers] m differs" in check_model(changed, "model.conf")[0].message
    extra = MODEL_TEXT.replace("r = sub, dom, obj", "r = sub, dom, obj\nr2 = sub, obj")
    assert "unexpected r2" in check_model(extra, "model.conf")[0].message
    missing = MODEL_TEXT.replace("g2 = _, _\n", "")
    assert "g2 is missing" in check_model(missing, "model.conf")[0].message


def test_only_the_engine_imports_casbin() -> None:
    package = Path(load_module.__file__).parent
    importers = []
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "casbin" or n.startswith("casbin.") for n in names):
                importers.append(path.name)
    assert sorted(set(importers)) == ["engine.py"]


def test_rows_are_fed_to_casbin_as_written(policy: Policy) -> None:
    assert all(isinstance(r, Rule) and r.text.startswith("p,") for r in policy.parsed.rules)
