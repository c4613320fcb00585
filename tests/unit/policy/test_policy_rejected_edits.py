"""Every rejected edit, one file each in data/: refused by check and by a reload, the old policy still answering.

Casbin's own file adapter accepts most of these silently, and some fail open
(see test_policy_casbin.py); the validation is ours.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.directory import NetworkDirectory
from gateway.policy import PolicyError, PolicyHolder, check_policy, load_policy

from .conftest import DATA, request

INTEL = "rules/intel-search.csv"
GROUPS = "groups.csv"

# case file -> (where it goes, file and line of the error, what the message says)
CASES: dict[str, tuple[str, str, int | None, str]] = {
    "bom.csv": (INTEL, INTEL, 1, "byte order mark"),
    "invalid-utf8.csv": (INTEL, INTEL, 1, "not valid UTF-8"),
    "empty.csv": (INTEL, INTEL, None, "file is empty"),
    "comments-only.csv": (INTEL, INTEL, None, "file has no rows"),
    "truncated.csv": (INTEL, INTEL, 7, "p rows have 4 fields"),
    "row-type-upper.csv": (INTEL, INTEL, 28, "unknown row type 'P'"),
    "row-type-unknown.csv": (INTEL, INTEL, 7, "unknown row type 'q'"),
    "too-few-fields.csv": (INTEL, INTEL, 7, "this one has 3"),
    "too-many-fields.csv": (INTEL, INTEL, 7, "this one has 5"),
    "effect-upper.csv": (INTEL, INTEL, 28, "effect must be 'allow' or 'deny' (lower case), got 'DENY'"),
    "effect-typo.csv": (INTEL, INTEL, 7, "got 'alow'"),
    "allow-any-force.csv": (INTEL, INTEL, 7, "allow rows may not use '*' as the force"),
    "allow-any-object.csv": (INTEL, INTEL, 7, "allow rows may not use '*' as the object"),
    "unknown-unit.csv": (INTEL, INTEL, 7, "unknown unit 'serocu-east'"),
    "unknown-force.csv": (INTEL, INTEL, 7, "unknown force 'kent'"),
    "unknown-role.csv": (INTEL, INTEL, 28, "unknown role 'custody'"),
    "unknown-application.csv": (INTEL, INTEL, 7, "unknown application 'intel'"),
    "unknown-method.csv": (INTEL, INTEL, 7, "unknown method '/psn.demo.intel.v1.IntelligenceSearch/Delete'"),
    "unknown-service.csv": (INTEL, INTEL, 7, "unknown service 'psn.demo.intel.v2.IntelligenceSearch'"),
    "partial-prefix.csv": (INTEL, INTEL, 7, "a prefix must be a whole service"),
    "unbalanced-bracket.csv": (INTEL, INTEL, 7, "unbalanced bracket '['"),
    "unbalanced-quote.csv": (INTEL, INTEL, 7, "unbalanced quote"),
    "inline-comment.csv": (INTEL, INTEL, 7, "comment after a row"),
    "bare-subject.csv": (INTEL, INTEL, 7, "'serocu' is not a subject"),
    "empty-field.csv": (INTEL, INTEL, 7, "empty field"),
    "zero-width-space.csv": (INTEL, INTEL, 7, "U+200B"),
    "undefined-group.csv": (INTEL, INTEL, 20, "group:force-intelligence has no members"),
    "g2-wrong-application.csv": (GROUPS, GROUPS, 6, "belongs to application 'custody-records', not 'intel-search'"),
    "g2-missing.csv": (GROUPS, INTEL, 6, "app:intel-search has no methods"),
    "group-of-groups.csv": (GROUPS, GROUPS, 13, "groups cannot contain groups"),
    "group-any-force.csv": (GROUPS, GROUPS, 13, "group membership is per force"),
    "model-allow-override.conf": ("model.conf", "model.conf", 36, "[policy_effect] e differs"),
    "model-bom.conf": ("model.conf", "model.conf", 1, "byte order mark"),
    "golden-fails.toml": (
        "tests/intel-search.toml",
        "tests/intel-search.toml",
        37,
        "golden case 'JOU officer may not stream bulk matches' fails: expected allow, got deny",
    ),
    "golden-typo.toml": ("tests/intel-search.toml", "tests/intel-search.toml", 5, "required key is missing"),
    "not-csv.txt": ("rules/notes.txt", "rules/notes.txt", None, "every file in rules/ must end in '.csv'"),
}

PROBE = request("hampshire", "/psn.demo.intel.v1.IntelligenceSearch/Search", units=("serocu",))


def test_every_data_file_is_a_case() -> None:
    on_disk = {p.name for p in DATA.iterdir() if p.suffix != ".py"}
    assert on_disk == set(CASES)


def _apply(policy_dir: Path, case: str) -> None:
    target = CASES[case][0]
    (policy_dir / target).write_bytes((DATA / case).read_bytes())


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_refuses_with_file_and_line(case: str, policy_copy: Path, directory: NetworkDirectory) -> None:
    _apply(policy_copy, case)
    _, file, line, message = CASES[case]
    errors = [f for f in check_policy(policy_copy, directory) if f.is_error]
    assert errors, "the edit was accepted"
    first = errors[0]
    assert first.file == str(policy_copy / file)
    assert first.line == line
    assert message in first.message
    assert str(first).startswith(f"{policy_copy / file}{'' if line is None else f':{line}'}: error: ")


@pytest.mark.parametrize("case", sorted(CASES))
def test_reload_refuses_and_keeps_the_old_policy(case: str, policy_copy: Path, directory: NetworkDirectory) -> None:
    holder = PolicyHolder(load_policy(policy_copy, directory), isolate=False)
    before = holder.current
    expected = before.decide(PROBE)
    _apply(policy_copy, case)
    with pytest.raises(PolicyError) as raised:
        holder.reload(policy_copy, directory)
    _, file, line, message = CASES[case]
    assert any(
        f.file == str(policy_copy / file) and f.line == line and message in f.message for f in raised.value.findings
    )
    assert holder.current is before
    assert holder.reload_failures == 1
    assert holder.last_error is not None
    assert message in holder.last_error
    after = holder.current.decide(PROBE)
    assert (after.allowed, after.rule, after.policy_version) == (
        expected.allowed,
        expected.rule,
        expected.policy_version,
    )


def test_a_good_reload_after_a_bad_one_clears_the_error(policy_copy: Path, directory: NetworkDirectory) -> None:
    holder = PolicyHolder(load_policy(policy_copy, directory), isolate=False)
    good = (policy_copy / INTEL).read_bytes()
    _apply(policy_copy, "effect-upper.csv")
    with pytest.raises(PolicyError):
        holder.reload(policy_copy, directory)
    assert holder.last_error is not None
    assert "effect must be 'allow' or 'deny'" in holder.last_error
    (policy_copy / INTEL).write_bytes(good)
    holder.reload(policy_copy, directory)
    assert holder.last_error is None
    assert holder.reload_failures == 1
    assert holder.reloads == 1
