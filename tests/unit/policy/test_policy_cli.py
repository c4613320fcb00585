"""`psngw policy check|test|explain|diff|matrix`, through the real command line entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.policy.tools import Grant, diff_grants, grants

from .conftest import DATA, POLICIES

SEARCH = "/psn.demo.intel.v1.IntelligenceSearch/Search"
JOU_SURREY = "p, unit:jou, surrey, /psn.demo.intel.v1.IntelligenceSearch/Search, allow\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", str(POLICIES))
    assert code == 0
    assert out.strip().endswith("ok: 0 errors, 0 warnings")


def test_check_refused_edit_exits_1_with_file_and_line(capsys: pytest.CaptureFixture[str], policy_copy: Path) -> None:
    (policy_copy / "rules" / "intel-search.csv").write_bytes((DATA / "effect-upper.csv").read_bytes())
    code, out, _ = run(capsys, "check", str(policy_copy), "--directory", str(POLICIES / "directory.example.toml"))
    assert code == 1
    assert f"{policy_copy}/rules/intel-search.csv:28: error: effect: effect must be 'allow' or 'deny'" in out
    assert "rejected: 1 errors" in out


def test_check_warnings_do_not_fail(capsys: pytest.CaptureFixture[str], policy_copy: Path) -> None:
    rules = policy_copy / "rules" / "intel-search.csv"
    rules.write_text(rules.read_text() + "p, unit:serocu, surrey, app:intel-search, allow\n")
    code, out, _ = run(capsys, "check", str(policy_copy), "--directory", str(POLICIES / "directory.example.toml"))
    assert code == 0
    assert "warning: duplicate of rules/intel-search.csv:8" in out


def test_test_lists_pass_per_case(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "test", str(POLICIES))
    assert code == 0
    lines = out.splitlines()
    assert "tests/intel-search.toml:5: SEROCU officer in Hampshire searches intelligence: PASS" in lines
    assert lines[-1].startswith("PASS: ")
    passed, total = lines[-1].removeprefix("PASS: ").split("/")
    assert passed == total


def test_test_reports_a_failing_case(capsys: pytest.CaptureFixture[str], policy_copy: Path) -> None:
    (policy_copy / "tests" / "intel-search.toml").write_bytes((DATA / "golden-fails.toml").read_bytes())
    code, out, _ = run(capsys, "test", str(policy_copy), "--directory", str(POLICIES / "directory.example.toml"))
    assert code == 1
    assert "tests/intel-search.toml:37: JOU officer may not stream bulk matches: FAIL" in out
    assert "    expected allow, got deny: no rule allows unit jou" in out
    assert "FAIL: 1/" in out


def test_explain_names_every_matching_rule(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "explain",
        str(POLICIES),
        "--force",
        "thames-valley",
        "--unit",
        "serocu",
        "--unit",
        "tvp-custody",
        "--method",
        "/psn.demo.custody.v1.CustodyRecords/BulkLookup",
        "--clearance",
        "SC",
    )
    assert code == 1  # denied
    assert "unit:serocu: denied (a deny row matches)" in out
    assert (
        "deny   rules/custody-records.csv:24: p, group:regional-crime, *, "
        "/psn.demo.custody.v1.CustodyRecords/BulkLookup, deny  (as a member of group:regional-crime in thames-valley)"
    ) in out
    assert "unit:tvp-custody: allowed" in out
    assert "rules/custody-records.csv:5: p, group:force-custody, thames-valley, app:custody-records, allow" in out
    assert "decision:  DENIED" in out


def test_explain_allowed_and_vetting(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", str(POLICIES), "--force", "hampshire", "--unit", "serocu", "--method", SEARCH)
    assert code == 0
    assert "no --clearance: assuming the highest level, DV" in out
    assert "decision:  ALLOWED" in out
    code, out, _ = run(
        capsys,
        "explain",
        str(POLICIES),
        "--force",
        "hampshire",
        "--unit",
        "serocu",
        "--method",
        SEARCH,
        "--clearance",
        "NPPV3",
    )
    assert code == 1
    assert "refused before the rules: clearance NPPV3 below application minimum SC" in out


def test_diff_lists_grants_gained_and_lost(capsys: pytest.CaptureFixture[str], policy_copy: Path) -> None:
    rules = policy_copy / "rules" / "intel-search.csv"
    rules.write_text(
        rules.read_text().replace(JOU_SURREY, "")
        + "p, unit:jou, surrey, /psn.demo.intel.v1.IntelligenceSearch/StreamMatches, allow\n"
    )
    code, out, _ = run(
        capsys, "diff", str(POLICIES), str(policy_copy), "--directory", str(POLICIES / "directory.example.toml")
    )
    assert code == 1
    lines = out.splitlines()
    assert "+ surrey  unit:jou  intel-search  /psn.demo.intel.v1.IntelligenceSearch/StreamMatches" in lines
    assert "- surrey  unit:jou  intel-search  /psn.demo.intel.v1.IntelligenceSearch/Search" in lines
    assert lines[-1] == "1 gained, 1 lost"


def test_diff_of_a_policy_with_itself_is_empty(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "diff", str(POLICIES), str(POLICIES))
    assert code == 0
    assert "no change in access" in out


def test_diff_counts_a_new_deny_as_lost_grants(policy_copy: Path, policy: object, directory: object) -> None:
    from gateway.policy import load_policy

    rules = policy_copy / "rules" / "case-files.csv"
    rules.write_text(rules.read_text() + "p, unit:jou, *, app:case-files, deny\n")
    new = load_policy(policy_copy, directory, check_golden=False)  # type: ignore[arg-type]
    diff = diff_grants(policy, new)  # type: ignore[arg-type]
    assert diff.gained == ()
    assert {(g.force, g.subject, g.application) for g in diff.lost} == {
        (f, "unit:jou", "case-files") for f in ("hampshire", "surrey", "thames-valley")
    }


def test_grants_never_give_a_force_unit_to_another_force(policy: object) -> None:
    for grant in grants(policy):  # type: ignore[arg-type]
        assert isinstance(grant, Grant)
        if grant.subject.startswith("unit:tvp-"):
            assert grant.force == "thames-valley"


def test_matrix_text_and_html(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    page = tmp_path / "matrix.html"
    code, out, _ = run(capsys, "matrix", str(POLICIES), "--html", str(page))
    assert code == 0
    assert "intel-search (hosted by thames-valley, minimum clearance SC)" in out
    row = next(line for line in out.splitlines() if "hampshire" in line and "unit:jou" in line and "allow" in line)
    assert row.split()[-2:] == ["allow", "-"]  # Search yes, StreamMatches no
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert '<td class="deny">deny</td>' in html
    assert "<code>/psn.demo.intel.v1.IntelligenceSearch/Search</code>" in html


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "check", str(tmp_path))
    assert code == 2
    assert "no network directory: pass --directory FILE" in err
    code, _, err = run(capsys, "test", str(tmp_path), "--directory", str(POLICIES / "directory.example.toml"))
    assert code == 2
    assert "not a directory" in err or "model.conf" in err
    code, _, err = run(capsys, "matrix", str(POLICIES), "--html", str(tmp_path / "missing" / "x.html"))
    assert code == 2
    assert "cannot write" in err
