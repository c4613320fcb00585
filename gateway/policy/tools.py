"""What a policy grants, as data: grants, diffs between versions, access matrices.

A grant is (force, subject, application, method): a principal from that force
holding only that unit or role is allowed by the rules to call that method.
Vetting is not part of a grant (it comes from the directory, per officer), and
units of one force are never granted from another (the gateway refuses them).

Owns: `grants`, `diff_grants`, `matrix`, `render_matrix_text`,
`render_matrix_html`. Pure: policies in, values and text out.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from gateway.policy.decide import Policy

__all__ = [
    "Grant",
    "GrantDiff",
    "MatrixRow",
    "MatrixTable",
    "diff_grants",
    "grants",
    "matrix",
    "render_diff",
    "render_matrix_html",
    "render_matrix_text",
]


@dataclass(frozen=True, order=True)
class Grant:
    """A subject from a force may call a method of an application."""

    force: str
    subject: str
    application: str
    method: str


@dataclass(frozen=True)
class GrantDiff:
    """What access changes from one policy version to another."""

    old_version: str
    new_version: str
    gained: tuple[Grant, ...]
    lost: tuple[Grant, ...]

    @property
    def changed(self) -> bool:
        """Whether any access changes."""
        return bool(self.gained or self.lost)


@dataclass(frozen=True)
class MatrixRow:
    """One subject from one force: the outcome for each method of an application."""

    force: str
    subject: str
    cells: tuple[str, ...]


@dataclass(frozen=True)
class MatrixTable:
    """Who may reach one application: a row per (force, subject) with any rule."""

    application: str
    host: str
    min_clearance: str
    methods: tuple[str, ...]
    rows: tuple[MatrixRow, ...]


def grants(policy: Policy) -> frozenset[Grant]:
    """Every grant `policy` makes."""
    out: set[Grant] = set()
    directory = policy.directory
    for force in sorted(directory.forces):
        for subject in policy.subjects_for(force):
            for route in directory.all_methods():
                rule = policy.rule_for(force, subject, route.method.path)
                if rule is not None and rule.allows:
                    out.add(Grant(force, subject, route.application.name, route.method.path))
    return frozenset(out)


def diff_grants(old: Policy, new: Policy) -> GrantDiff:
    """Grants gained and lost going from `old` to `new`."""
    before, after = grants(old), grants(new)
    return GrantDiff(old.version, new.version, tuple(sorted(after - before)), tuple(sorted(before - after)))


def render_diff(diff: GrantDiff) -> str:
    """A diff as text: ``+`` rows gained, ``-`` rows lost."""
    lines = [f"--- {diff.old_version}", f"+++ {diff.new_version}"]
    rows = [("+", g) for g in diff.gained] + [("-", g) for g in diff.lost]
    rows.sort(key=lambda item: (item[1], item[0]))
    if not rows:
        lines.append("no change in access")
    width = [max((len(getattr(g, f)) for _, g in rows), default=0) for f in ("force", "subject", "application")]
    for sign, g in rows:
        lines.append(f"{sign} {g.force:<{width[0]}}  {g.subject:<{width[1]}}  {g.application:<{width[2]}}  {g.method}")
    lines.append(f"{len(diff.gained)} gained, {len(diff.lost)} lost")
    return "\n".join(lines)


def matrix(policy: Policy) -> tuple[MatrixTable, ...]:
    """For each application, who may call which of its methods (explicit denies shown)."""
    tables = []
    directory = policy.directory
    for name, app in directory.applications.items():
        paths = tuple(m.path for m in app.methods)
        rows = []
        for force in sorted(directory.forces):
            for subject in policy.subjects_for(force):
                cells = []
                for path in paths:
                    rule = policy.rule_for(force, subject, path)
                    cells.append("-" if rule is None else rule.effect)
                if any(c != "-" for c in cells):
                    rows.append(MatrixRow(force, subject, tuple(cells)))
        tables.append(MatrixTable(name, app.host, app.min_clearance, paths, tuple(rows)))
    return tuple(tables)


def render_matrix_text(policy: Policy) -> str:
    """The matrix as plain text tables."""
    out = [f"policy {policy.version}: allow, deny (explicit), - (no rule: default deny)"]
    for table in matrix(policy):
        short = [m.rsplit("/", 1)[-1] for m in table.methods]
        out.append("")
        out.append(f"{table.application} (hosted by {table.host}, minimum clearance {table.min_clearance})")
        fw = max([len("force"), *(len(r.force) for r in table.rows)])
        sw = max([len("subject"), *(len(r.subject) for r in table.rows)])
        cw = [max(len(s), 5) for s in short]
        out.append(
            f"  {'force':<{fw}}  {'subject':<{sw}}  " + "  ".join(f"{s:<{w}}" for s, w in zip(short, cw, strict=True))
        )
        for row in table.rows:
            cells = "  ".join(f"{c:<{w}}" for c, w in zip(row.cells, cw, strict=True))
            out.append(f"  {row.force:<{fw}}  {row.subject:<{sw}}  {cells}".rstrip())
        if not table.rows:
            out.append("  (no rule names this application: nobody may call it)")
    return "\n".join(out)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: left; }
th { background: #eee; }
td.allow { background: #d9f2d9; }
td.deny { background: #f7d4d4; font-weight: bold; }
td.none { color: #999; }
"""


def render_matrix_html(policy: Policy) -> str:
    """The matrix as a standalone HTML page."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Policy access matrix {e(policy.version)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Who may reach what</h1>",
        f"<p>Policy version <code>{e(policy.version)}</code> from <code>{e(policy.parsed.root)}</code>. "
        "<b>allow</b>: a rule allows; <b>deny</b>: a rule denies (and overrides any allow the officer's other "
        "units or roles have); <b>-</b>: no rule (default deny). Officers must also hold the application's "
        "minimum clearance.</p>",
    ]
    for table in matrix(policy):
        parts.append(
            f"<h2>{e(table.application)}</h2><p>Hosted by {e(table.host)}; minimum clearance "
            f"{e(table.min_clearance)}.</p>"
        )
        if not table.rows:
            parts.append("<p>No rule names this application: nobody may call it.</p>")
            continue
        parts.append("<table><tr><th>force</th><th>unit or role</th>")
        parts.extend(f"<th><code>{e(m)}</code></th>" for m in table.methods)
        parts.append("</tr>")
        for row in table.rows:
            parts.append(f"<tr><td>{e(row.force)}</td><td>{e(row.subject)}</td>")
            parts.extend(f'<td class="{"none" if c == "-" else c}">{e(c)}</td>' for c in row.cells)
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
