"""Writes the rejected-edit cases in this directory from the policy in policies/.

Each case is one file: a copy of a real policy file with one bad edit, as an
officer might make it. `test_policy_rejected_edits.py` puts each in place of
its target in a copy of policies/ and expects `check` and a reload to refuse
it. Run from the repository root: python tests/unit/policy/data/build_cases.py
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = HERE.parents[3] / "policies"
INTEL = (POLICIES / "rules" / "intel-search.csv").read_text()
GROUPS = (POLICIES / "groups.csv").read_text()
MODEL = (POLICIES / "model.conf").read_text()
GOLDEN = (POLICIES / "tests" / "intel-search.toml").read_text()

SEROCU_HANTS = "p, unit:serocu, hampshire, app:intel-search, allow"
CUSTODY_DENY = "p, role:custody-officer, *, app:intel-search, deny"


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


CASES: dict[str, str | bytes] = {
    # The BOM glues itself to the first row's type ("\ufeffp"): casbin drops that deny.
    "bom.csv": "\ufeff" + CUSTODY_DENY + "\n" + edit(INTEL, CUSTODY_DENY + "\n", ""),
    "invalid-utf8.csv": INTEL.replace("# Intelligence search", "# Intelligence search (\u00e9quipe)").encode("latin-1"),
    "empty.csv": b"",
    "comments-only.csv": "".join(line + "\n" for line in INTEL.splitlines() if not line.startswith("p,")),
    "truncated.csv": INTEL[: INTEL.index(SEROCU_HANTS) + len("p, unit:serocu, hamp")],
    "row-type-upper.csv": edit(INTEL, CUSTODY_DENY, "P" + CUSTODY_DENY[1:]),
    "row-type-unknown.csv": edit(INTEL, SEROCU_HANTS, "q" + SEROCU_HANTS[1:]),
    "too-few-fields.csv": edit(INTEL, SEROCU_HANTS, "p, unit:serocu, hampshire, app:intel-search"),
    "too-many-fields.csv": edit(INTEL, SEROCU_HANTS, SEROCU_HANTS + ", always"),
    "effect-upper.csv": edit(INTEL, CUSTODY_DENY, CUSTODY_DENY.replace("deny", "DENY")),
    "effect-typo.csv": edit(INTEL, SEROCU_HANTS, SEROCU_HANTS.replace("allow", "alow")),
    "allow-any-force.csv": edit(INTEL, SEROCU_HANTS, "p, unit:serocu, *, app:intel-search, allow"),
    "allow-any-object.csv": edit(INTEL, SEROCU_HANTS, "p, unit:serocu, hampshire, *, allow"),
    "unknown-unit.csv": edit(INTEL, SEROCU_HANTS, SEROCU_HANTS.replace("unit:serocu", "unit:serocu-east")),
    "unknown-force.csv": edit(INTEL, SEROCU_HANTS, SEROCU_HANTS.replace("hampshire", "kent")),
    "unknown-role.csv": edit(INTEL, CUSTODY_DENY, CUSTODY_DENY.replace("role:custody-officer", "role:custody")),
    "unknown-application.csv": edit(INTEL, SEROCU_HANTS, SEROCU_HANTS.replace("app:intel-search", "app:intel")),
    "unknown-method.csv": edit(
        INTEL, SEROCU_HANTS, SEROCU_HANTS.replace("app:intel-search", "/psn.demo.intel.v1.IntelligenceSearch/Delete")
    ),
    "unknown-service.csv": edit(
        INTEL, SEROCU_HANTS, SEROCU_HANTS.replace("app:intel-search", "/psn.demo.intel.v2.IntelligenceSearch/*")
    ),
    "partial-prefix.csv": edit(INTEL, SEROCU_HANTS, SEROCU_HANTS.replace("app:intel-search", "/psn.demo.intel.*")),
    "unbalanced-bracket.csv": edit(INTEL, SEROCU_HANTS, "p, unit:serocu, [hampshire, app:intel-search, allow"),
    "unbalanced-quote.csv": edit(INTEL, SEROCU_HANTS, 'p, "unit:serocu, hampshire, app:intel-search, allow'),
    "inline-comment.csv": edit(INTEL, SEROCU_HANTS, SEROCU_HANTS + "  # SEROCU analysts"),
    "bare-subject.csv": edit(INTEL, SEROCU_HANTS, SEROCU_HANTS.replace("unit:serocu", "serocu")),
    "empty-field.csv": edit(INTEL, SEROCU_HANTS, "p, unit:serocu, , app:intel-search, allow"),
    "zero-width-space.csv": edit(INTEL, SEROCU_HANTS, SEROCU_HANTS.replace("serocu", "ser\u200bocu")),
    "undefined-group.csv": edit(INTEL, "p, group:force-intel, hampshire", "p, group:force-intelligence, hampshire"),
    "g2-wrong-application.csv": edit(
        GROUPS,
        "g2, /psn.demo.custody.v1.CustodyRecords/*, app:custody-records",
        "g2, /psn.demo.custody.v1.CustodyRecords/*, app:intel-search",
    ),
    "g2-missing.csv": edit(GROUPS, "g2, /psn.demo.intel.v1.IntelligenceSearch/*, app:intel-search\n", ""),
    "group-of-groups.csv": edit(
        GROUPS,
        "g, unit:tvp-cid, group:force-cid, thames-valley",
        "g, group:force-intel, group:force-cid, thames-valley",
    ),
    "group-any-force.csv": edit(
        GROUPS, "g, unit:tvp-cid, group:force-cid, thames-valley", "g, unit:tvp-cid, group:force-cid, *"
    ),
    "model-allow-override.conf": edit(
        MODEL,
        "e = some(where (p.eft == allow)) && !some(where (p.eft == deny))",
        "e = some(where (p.eft == allow))",
    ),
    "model-bom.conf": "\ufeff" + MODEL,
    "golden-fails.toml": edit(
        GOLDEN,
        'method = "/psn.demo.intel.v1.IntelligenceSearch/StreamMatches"\nexpect = "deny"',
        'method = "/psn.demo.intel.v1.IntelligenceSearch/StreamMatches"\nexpect = "allow"',
    ),
    "golden-typo.toml": edit(GOLDEN, 'expect = "allow"', 'expected = "allow"'),
    "not-csv.txt": "p, unit:tvp-response, thames-valley, app:intel-search, deny\n",
}


def main() -> None:
    for name, content in CASES.items():
        data = content.encode() if isinstance(content, str) else content
        (HERE / name).write_bytes(data)
    print(f"wrote {len(CASES)} cases to {HERE}")


if __name__ == "__main__":
    main()
