"""Casbin: the meaning of a policy, consulted at load time only.

This is the only module that imports casbin. Casbin defines what the rows
mean; the gateway serves decisions from the structure in `decide`, built at
load time and checked here against casbin's own `enforce_ex` before the policy
is used. Casbin never sees a live request: its role managers grow with every
unknown name they are asked about, its enforce scans every row, and on
Python 3.11 concurrent calls can raise SystemError (CPython gh-106905), so all
use of casbin is serialised by one lock and happens while a policy is loaded.

Owns: the pinned model (`MODEL_TEXT`, `check_model`) and `CasbinOracle`,
an Enforcer over one parsed policy that answers per subject: allow, deny or
no rule. Does not own: which requests to check (`load`), the fast path
(`decide`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import casbin
from casbin.persist.adapter import Adapter, load_policy_line

from gateway.policy.files import ParsedPolicy
from gateway.policy.values import Finding, PolicyError

__all__ = ["MODEL_TEXT", "CasbinOracle", "casbin_oracle", "check_model"]

#: The model the fast path implements; policies/model.conf must mean exactly this.
MODEL_TEXT = """\
[request_definition]
r = sub, dom, obj

[policy_definition]
p = sub, dom, obj, eft

[role_definition]
g = _, _, _
g2 = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = g(r.sub, p.sub, r.dom) && (p.dom == r.dom || p.dom == "*") && (keyMatch(r.obj, p.obj) || g2(r.obj, p.obj))
"""

_SECTION_NAMES = {"r": "request_definition", "p": "policy_definition", "g": "role_definition"}
_SECTION_NAMES |= {"e": "policy_effect", "m": "matchers"}

#: Casbin is used by one thread at a time in the whole process (gh-106905).
_CASBIN_LOCK = threading.Lock()


def _assertions(text: str) -> dict[tuple[str, str], str]:
    """The model's assertions as casbin reads them, whitespace collapsed."""
    model = casbin.Enforcer.new_model(text=text)
    out: dict[tuple[str, str], str] = {}
    for sec, assertions in model.model.items():
        for key, ast in assertions.items():
            value = " ".join(ast.tokens) if sec in ("r", "p") else ast.value
            out[(sec, key)] = " ".join(str(value).split())
    return out


_EXPECTED = _assertions(MODEL_TEXT)


def check_model(text: str, file: str) -> list[Finding]:
    """Findings if `text` (the model file, shown as `file`) does not mean `MODEL_TEXT`."""
    try:
        with _CASBIN_LOCK:
            actual = _assertions(text)
    except Exception as exc:  # noqa: BLE001 -- casbin raises bare RuntimeError/KeyError/IndexError on bad models
        return [Finding(file, None, f"casbin cannot read the model: {exc!r}")]
    findings: list[Finding] = []
    for sec, key in sorted(set(_EXPECTED) | set(actual)):
        want, got = _EXPECTED.get((sec, key)), actual.get((sec, key))
        if want == got:
            continue
        line = _line_of(text, key)
        section = _SECTION_NAMES.get(sec, sec)
        if want is None:
            findings.append(
                Finding(file, line, f"unexpected {key} in [{section}]: the gateway serves one model", field=key)
            )
        elif got is None:
            findings.append(Finding(file, None, f"[{section}] {key} is missing; expected: {want}", field=key))
        else:
            findings.append(
                Finding(
                    file,
                    line,
                    f"[{section}] {key} differs from the model the gateway serves; expected: {want}",
                    field=key,
                )
            )
    return findings


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


class _RowsAdapter(Adapter):  # type: ignore[misc]  # casbin ships no type information
    """Feeds the accepted rows, as written, through casbin's own line parser."""

    def __init__(self, lines: list[str]) -> None:
        self._lines = lines

    def load_policy(self, model: Any) -> None:
        for line in self._lines:
            load_policy_line(line, model)


class CasbinOracle:
    """A casbin Enforcer over one parsed policy: what casbin says, per subject.

    Build it with `casbin_oracle` (which holds the process-wide casbin lock).
    `partition=True` (the default) hands `enforce_ex` only the rows that can
    match a (subject, force) pair: rows whose force is that force or ``*``,
    and whose subject is the subject or one of the groups casbin's own role
    manager puts it in. The pinned matcher requires both, so the answer is the
    same as over every row, at a fraction of the cost on large policies.
    """

    def __init__(self, parsed: ParsedPolicy, *, partition: bool = True) -> None:
        self._partition = partition
        self._selected: tuple[str, str] | None = None
        try:
            self._enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=parsed.model_text))
            # The domain role manager's default matching function is an equality
            # lambda that makes every new domain's role manager O(links^2) to build
            # (seconds at 1,000 links); without one, casbin compares names exactly.
            self._enforcer.get_named_role_manager("g").add_matching_func(None)
            # g2 rows may name a '/package.Service/*' prefix: match them as keyMatch does.
            self._enforcer.add_named_matching_func("g2", casbin.util.key_match_func)
            lines = [r.text for r in parsed.rules] + [g.text for g in parsed.groups]
            lines += [a.text for a in parsed.app_links]
            self._enforcer.set_adapter(_RowsAdapter(lines))
            self._enforcer.load_policy()
            self._all_rows: list[list[str]] = list(self._enforcer.model["p"]["p"].policy)
        except Exception as exc:
            raise PolicyError(Finding(parsed.root, None, f"casbin could not load the policy: {exc!r}")) from exc
        self._check_rows(parsed)
        self._by_subject: dict[str, list[int]] = {}
        for i, row in enumerate(self._all_rows):
            self._by_subject.setdefault(row[0], []).append(i)

    def _check_rows(self, parsed: ParsedPolicy) -> None:
        """Casbin must read every accepted row exactly as the gateway did."""
        model = self._enforcer.model
        expected = {
            "p": [([r.subject, r.force, r.obj, r.effect], r.file, r.line) for r in parsed.rules],
            "g": [([g.member, g.group, g.force], g.file, g.line) for g in parsed.groups],
            "g2": [([a.pattern, "app:" + a.application], a.file, a.line) for a in parsed.app_links],
        }
        for ptype, rows in expected.items():
            sec = "p" if ptype == "p" else "g"
            got = list(model[sec][ptype].policy)
            for i, (fields, file, line) in enumerate(rows):
                if i >= len(got) or list(got[i]) != fields:
                    seen = got[i] if i < len(got) else "nothing"
                    raise PolicyError(Finding(f"{parsed.root}/{file}", line, f"casbin reads this row as {seen}"))
            if len(got) != len(rows):
                raise PolicyError(
                    Finding(parsed.root, None, f"casbin read {len(got)} {ptype} rows, expected {len(rows)}")
                )

    @property
    def domain_matching_cleared(self) -> bool:
        """Whether the domain role manager compares names without a matching function."""
        return self._enforcer.get_named_role_manager("g").matching_func is None

    def _select(self, subject: str, force: str) -> None:
        """Narrow the enforcer's rows to those that can match (subject, force)."""
        rm = self._enforcer.get_named_role_manager("g")
        reach = {subject}
        queue = [subject]
        while queue:
            for role in rm.get_roles(queue.pop(), force):
                if role not in reach:
                    reach.add(role)
                    queue.append(role)
        picked = sorted(i for name in reach for i in self._by_subject.get(name, ()))
        rows = [self._all_rows[i] for i in picked if self._all_rows[i][1] in (force, "*")]
        self._enforcer.model["p"]["p"].policy = rows
        self._selected = (subject, force)

    def subject_effect(self, subject: str, force: str, method: str) -> str | None:
        """What casbin decides for one subject: "allow", "deny" (a deny row matched) or None (no row)."""
        try:
            if self._partition and self._selected != (subject, force):
                self._select(subject, force)
            allowed, explain = self._enforcer.enforce_ex(subject, force, method)
        except Exception as exc:
            raise PolicyError(Finding("<casbin>", None, f"casbin enforce failed: {exc!r}")) from exc
        if allowed:
            return "allow"
        if not explain:
            return None
        if explain[-1] != "deny":
            raise PolicyError(Finding("<casbin>", None, f"casbin refused with a non-deny row: {explain}"))
        return "deny"


@contextmanager
def casbin_oracle(parsed: ParsedPolicy, *, partition: bool = True) -> Iterator[CasbinOracle]:
    """A `CasbinOracle` for `parsed`, holding the process-wide casbin lock while in use."""
    with _CASBIN_LOCK:
        yield CasbinOracle(parsed, partition=partition)
