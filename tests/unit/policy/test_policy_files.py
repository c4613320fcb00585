"""Reading and validating policy files: what is accepted, what is a warning, how problems are reported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.directory import NetworkDirectory
from gateway.policy import Finding, PolicyError, Severity, check_policy, load_policy

from .conftest import SMALL_G2, small_directory

GOOD = "p, unit:rocu, north, app:search, allow\n"


def _findings(path: Path) -> list[str]:
    return [str(f).replace(f"{path}/", "") for f in check_policy(path, small_directory())]


def test_crlf_tabs_and_unicode_comments_are_fine(small: Callable[..., Path], tmp_path: Path) -> None:
    rules = "# Surrey\u2019s rules \u2014 reviewed\r\np,\tunit:rocu ,north,  app:search,allow\r\n"
    path = small(tmp_path, rules)
    assert _findings(path) == ["tests: warning: no golden cases: add tests/*.toml (see the README)"]
    policy = load_policy(path, small_directory(), check_golden=False)
    assert policy.parsed.rules[0].text == "p,\tunit:rocu ,north,  app:search,allow"
    assert policy.parsed.rules[0].subject == "unit:rocu"


def test_direction_changing_characters_are_refused_even_in_comments(small: Callable[..., Path], tmp_path: Path) -> None:
    path = small(tmp_path, "# deny \u202eyrtne\n" + GOOD)
    assert "rules/rules.csv:1: error: invisible or direction-changing character U+202E: retype the line" in _findings(
        path
    )


@pytest.mark.parametrize(
    ("rows", "warning"),
    [
        (GOOD + GOOD, "rules/rules.csv:2: warning: duplicate of rules/rules.csv:1"),
        (GOOD + "p,unit:rocu,north,app:search,allow\n", "rules/rules.csv:2: warning: duplicate of rules/rules.csv:1"),
        (
            GOOD + "p, unit:rocu, north, app:search, deny\n",
            "rules/rules.csv:2: warning: contradicts rules/rules.csv:1 (deny wins)",
        ),
        (
            GOOD + "p, unit:south-cid, north, app:search, allow\n",
            "rules/rules.csv:2: warning: unit:south-cid belongs to force south: this rule can never apply from north",
        ),
        (GOOD, "tests: warning: no golden cases: add tests/*.toml (see the README)"),
    ],
)
def test_warnings_do_not_reject(small: Callable[..., Path], tmp_path: Path, rows: str, warning: str) -> None:
    path = small(tmp_path, rows)
    found = _findings(path)
    assert warning in found
    policy = load_policy(path, small_directory(), check_golden=False)
    assert all(w.severity is Severity.WARNING for w in policy.warnings)
    assert policy.warnings


def test_group_and_application_warnings(small: Callable[..., Path], tmp_path: Path) -> None:
    groups = (
        "g2, /t.records.v1.Records/*, app:records\ng, unit:rocu, group:idle, north\ng, unit:rocu, group:used, north\n"
    )
    rules = "p, group:used, north, app:records, allow\np, group:used, south, app:records, allow\n"
    found = _findings(small(tmp_path, rules, groups))
    assert "groups.csv:2: warning: group:idle is not used by any rule" in found
    assert "rules/rules.csv:2: warning: subject: group:used has no members in force south" in found
    uncovered = "app:records does not cover /t.records.v1.Admin/Purge: rules on app:records do not reach them"
    assert f"groups.csv:1: warning: {uncovered}" in found


def test_layout_problems(small: Callable[..., Path], tmp_path: Path) -> None:
    path = small(tmp_path, GOOD)
    (path / "rules" / "rules.csv~").write_text("p, unit:rocu, *, *, deny\n")  # editor backups are ignored
    (path / "rules" / ".rules.csv.swp").write_bytes(b"\x00")
    (path / ".groups.csv").write_bytes(b"\x00")
    (path / "Extra.CSV").write_text(GOOD)
    (path / "rules" / "old").mkdir()
    found = _findings(path)
    assert "Extra.CSV: error: policy files end in lower-case '.csv'; this one would not be read" in found
    assert "rules/old: warning: a directory inside rules/: its files are not read" in found
    assert not any("rules.csv~" in f or ".swp" in f or ".groups.csv" in f for f in found)
    (path / "Extra.CSV").unlink()
    version = load_policy(path, small_directory(), check_golden=False).version
    (path / "rules" / "rules.csv~").write_text("changed")
    assert load_policy(path, small_directory(), check_golden=False).version == version


def test_missing_pieces(tmp_path: Path) -> None:
    assert [str(f) for f in check_policy(tmp_path / "nope", small_directory())] == [
        f"{tmp_path / 'nope'}: error: not a directory (expected a policy directory with model.conf)"
    ]
    (tmp_path / "empty").mkdir()
    found = [str(f) for f in check_policy(tmp_path / "empty", small_directory())]
    assert f"{tmp_path / 'empty' / 'model.conf'}: error: missing: the casbin model file" in found


def test_policy_error_is_one_line_with_the_first_error(small: Callable[..., Path], tmp_path: Path) -> None:
    path = small(tmp_path, "p, unit:nobody, north, app:search, allow\np, unit:rocu, north, app:search, DENY\n")
    with pytest.raises(PolicyError) as raised:
        load_policy(path, small_directory())
    message = str(raised.value)
    assert message == (
        f"{path}/rules/rules.csv:1: subject: unknown unit 'nobody' (not in the network directory) (and 1 more errors)"
    )
    assert "\n" not in message
    assert [f.line for f in raised.value.findings if f.is_error] == [1, 2]


def test_finding_format() -> None:
    assert str(Finding("a.csv", 3, "bad", Severity.ERROR, "effect")) == "a.csv:3: error: effect: bad"
    assert str(Finding("a.csv", None, "meh", Severity.WARNING)) == "a.csv: warning: meh"


def test_renaming_a_file_changes_the_version(small: Callable[..., Path], tmp_path: Path) -> None:
    path = small(tmp_path, GOOD)
    before = load_policy(path, small_directory(), check_golden=False).version
    (path / "rules" / "rules.csv").rename(path / "rules" / "search.csv")
    assert load_policy(path, small_directory(), check_golden=False).version != before


def test_golden_cases_are_checked_strictly(small: Callable[..., Path], tmp_path: Path) -> None:
    tests = (
        '[[case]]\nname = "rocu finds"\nforce = "north"\nunits = ["rocu"]\nclearance = "SC"\n'
        'method = "/t.search.v1.Search/Find"\nexpect = "allow"\nreason_contains = "rules/rules.csv:1"\n'
    )
    path = small(tmp_path, GOOD, SMALL_G2, tests)
    assert [f for f in _findings(path) if "error" in f] == []
    bad = small(tmp_path, GOOD, SMALL_G2, tests.replace('expect = "allow"', 'expect = "Allow"'))
    assert any("case.0.expect: 'Allow' is not one of: allow, deny" in f for f in _findings(bad))
    wrong_reason = small(tmp_path, GOOD, SMALL_G2, tests.replace("rules/rules.csv:1", "rules/rules.csv:9"))
    assert any("reason does not contain 'rules/rules.csv:9'" in f for f in _findings(wrong_reason))


def test_the_real_policy_has_no_findings(directory: NetworkDirectory) -> None:
    from .conftest import POLICIES

    assert check_policy(POLICIES, directory) == []


@pytest.mark.parametrize("char", ["\u2011", "\u00a0", "\u2019"])  # pasted from a word processor
def test_non_ascii_in_a_row_is_refused(small: Callable[..., Path], tmp_path: Path, char: str) -> None:
    path = small(tmp_path, GOOD + f"p, unit:rocu, south, app:search{char}, allow\n")
    assert f"rules/rules.csv:2: error: non-ASCII character U+{ord(char):04X} in a row" in " ".join(_findings(path))
