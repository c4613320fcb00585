"""Policy files as security officers keep them: reading, parsing, validating.

A policy directory holds::

    model.conf        the casbin model (its meaning is pinned: see `engine`)
    *.csv             rows; by convention groups.csv holds the g and g2 rows
    rules/*.csv       rows; by convention one file of p rows per application
    tests/*.toml      golden cases: a request and the decision it must get

Rows use casbin's CSV syntax (``p, unit:serocu, hampshire, app:intel-search,
allow``), but are read here, strictly, rather than by casbin's file adapter:
that adapter accepts many broken edits silently and some of them fail open (a
byte order mark drops the first row, ``DENY`` is ignored, ``P`` rows vanish).
Every problem becomes a `Finding` with file and line; errors reject the
policy, warnings (duplicates, contradictions, rules that can never apply) do
not.

Owns: `read_policy_source` (the only function here that touches the file
system) and `parse_policy` (pure: bytes and a directory in, rows and findings
out). Does not own: what the rows mean (`engine` asks casbin, `decide` builds
the fast path).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.directory import NAME_PATTERN, NetworkDirectory
from gateway.errors import ConfigError
from gateway.policy._pace import no_pacing
from gateway.policy.values import (
    AppLink,
    AppRow,
    DecisionRequest,
    Finding,
    GoldenCase,
    GroupLink,
    GroupRow,
    Rule,
    RuleRow,
    Severity,
)
from gateway.tomlconf import TomlFile

__all__ = [
    "MODEL_FILE",
    "RULES_DIR",
    "TESTS_DIR",
    "ParsedPolicy",
    "PolicySource",
    "SourceFile",
    "decode_policy_text",
    "parse_policy",
    "read_policy_source",
]

MODEL_FILE = "model.conf"
RULES_DIR = "rules"
TESTS_DIR = "tests"

#: A policy file larger than this is refused (a policy is text an officer reads).
MAX_FILE_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_SUBJECT = re.compile(rf"(unit|role|group):({NAME_PATTERN})")
_APP = re.compile(rf"app:({NAME_PATTERN})")
_EFFECTS = ("allow", "deny")
#: Fields per row type, after the type itself, and what they are called.
_FIELDS: dict[str, tuple[str, ...]] = {
    "p": ("subject", "force", "object", "effect"),
    "g": ("member", "group", "force"),
    "g2": ("method", "application"),
}
#: Characters that hide text or reorder it on screen (Trojan Source, CVE-2021-42574).
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_PAIRS = {"[": "]", "(": ")"}
_CLOSERS = {"]": "[", ")": "("}
_QUOTES = "\"'`"


@dataclass(frozen=True)
class SourceFile:
    """One file of a policy directory: its name relative to the directory, and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class PolicySource:
    """The bytes of a policy directory, read once, plus what was wrong with its layout."""

    root: str
    model: SourceFile | None
    rows: tuple[SourceFile, ...]
    tests: tuple[SourceFile, ...]
    findings: tuple[Finding, ...] = ()

    def display(self, name: str) -> str:
        """How findings name the file `name` (the directory as given, joined)."""
        return str(Path(self.root) / name)

    @property
    def version(self) -> str:
        """A digest of the files that decide (model and rows): names and contents."""
        digest = hashlib.sha256(b"psn-gateway policy v1\0")
        for file in (self.model, *self.rows):
            if file is None:
                continue
            name = file.name.encode()
            digest.update(b"%d\0%s\0%d\0" % (len(name), name, len(file.data)))
            digest.update(file.data)
        return "sha256:" + digest.hexdigest()[:16]


@dataclass(frozen=True)
class ParsedPolicy:
    """The rows of a policy, checked against the directory, in load order.

    Rows are kept as plain tuples (see `values.RuleRow`); `rules`, `groups`
    and `app_links` give named views of them, made afresh on each access.
    """

    root: str
    version: str
    files: tuple[str, ...]
    model_text: str
    rule_rows: tuple[RuleRow, ...]
    group_rows: tuple[GroupRow, ...]
    app_rows: tuple[AppRow, ...]
    cases: tuple[GoldenCase, ...]

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The p rows, as `Rule` views."""
        return tuple(map(Rule._make, self.rule_rows))

    @property
    def groups(self) -> tuple[GroupLink, ...]:
        """The g rows, as `GroupLink` views."""
        return tuple(map(GroupLink._make, self.group_rows))

    @property
    def app_links(self) -> tuple[AppLink, ...]:
        """The g2 rows, as `AppLink` views."""
        return tuple(map(AppLink._make, self.app_rows))


# -- reading (the edge) -------------------------------------------------------


def _ignored(name: str) -> bool:
    """Editor droppings: hidden files, backups, autosaves."""
    return name.startswith((".", "#")) or name.endswith(("~", ".swp", ".bak", ".orig"))


class _Reader:
    """Reads files under a policy directory, turning I/O problems into findings."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def read(self, path: Path, name: str) -> SourceFile | None:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                self.findings.append(Finding(str(path), None, f"file is larger than {MAX_FILE_BYTES} bytes"))
                return None
            return SourceFile(name, path.read_bytes())
        except OSError as exc:
            self.findings.append(Finding(str(path), None, f"cannot read: {exc.strerror or exc}"))
            return None

    def top_level_rows(self, root: Path) -> list[SourceFile]:
        rows = []
        for path in sorted(root.iterdir()):
            if _ignored(path.name) or not path.is_file() or path.suffix.lower() != ".csv":
                continue
            if path.suffix != ".csv":
                self.findings.append(
                    Finding(str(path), None, "policy files end in lower-case '.csv'; this one would not be read")
                )
            elif (file := self.read(path, path.name)) is not None:
                rows.append(file)
        return rows

    def rule_files(self, rules_dir: Path) -> list[SourceFile]:
        rows = []
        for path in sorted(rules_dir.iterdir()) if rules_dir.is_dir() else ():
            if _ignored(path.name):
                continue
            if path.is_dir():
                self.findings.append(
                    Finding(str(path), None, "a directory inside rules/: its files are not read", Severity.WARNING)
                )
            elif path.suffix != ".csv":
                self.findings.append(
                    Finding(str(path), None, "every file in rules/ must end in '.csv' (this one would not be read)")
                )
            elif (file := self.read(path, f"{RULES_DIR}/{path.name}")) is not None:
                rows.append(file)
        return rows

    def test_files(self, tests_dir: Path) -> list[SourceFile]:
        tests = []
        for path in sorted(tests_dir.iterdir()) if tests_dir.is_dir() else ():
            if _ignored(path.name) or path.is_dir():
                continue
            if path.suffix != ".toml":
                self.findings.append(
                    Finding(str(path), None, "not a golden test file (tests/*.toml): ignored", Severity.WARNING)
                )
            elif (file := self.read(path, f"{TESTS_DIR}/{path.name}")) is not None:
                tests.append(file)
        return tests


def read_policy_source(policy_dir: Path | str) -> PolicySource:
    """Read every policy file under `policy_dir` once; layout problems become findings."""
    root = Path(policy_dir)
    shown = str(policy_dir)
    reader = _Reader()
    if not root.is_dir():
        reader.findings.append(Finding(shown, None, "not a directory (expected a policy directory with model.conf)"))
        return PolicySource(shown, None, (), (), tuple(reader.findings))
    model = None
    if (root / MODEL_FILE).is_file():
        model = reader.read(root / MODEL_FILE, MODEL_FILE)
    else:
        reader.findings.append(Finding(str(root / MODEL_FILE), None, "missing: the casbin model file"))
    rows = reader.top_level_rows(root) + reader.rule_files(root / RULES_DIR)
    if not rows and model is not None:
        reader.findings.append(Finding(shown, None, "no policy rows: expected *.csv files or rules/*.csv"))
    tests = reader.test_files(root / TESTS_DIR)
    return PolicySource(shown, model, tuple(rows), tuple(tests), tuple(reader.findings))


# -- parsing (pure) -----------------------------------------------------------


class _Collector:
    """Findings in the order found."""

    def __init__(self, source: PolicySource) -> None:
        self.source = source
        self.findings: list[Finding] = list(source.findings)

    def error(self, name: str, line: int | None, message: str, field: str | None = None) -> None:
        self.findings.append(Finding(self.source.display(name), line, message, Severity.ERROR, field))

    def warn(self, name: str, line: int | None, message: str, field: str | None = None) -> None:
        self.findings.append(Finding(self.source.display(name), line, message, Severity.WARNING, field))


def decode_policy_text(data: bytes) -> tuple[str | None, int | None, str]:
    """Decode a policy file: (text, None, "") or (None, line, what is wrong)."""
    if data.startswith(_BOM):
        return (
            None,
            1,
            "file starts with a UTF-8 byte order mark (BOM); save it as UTF-8 without BOM "
            "(casbin misreads the first line: a first row is silently dropped)",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return None, line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
    if not text.strip():
        return None, None, "file is empty"
    return text, None, ""


@dataclass(frozen=True)
class _Names:
    """What the directory allows rows to name, precomputed once."""

    forces: frozenset[str]
    units: dict[str, str | None]
    roles: frozenset[str]
    applications: dict[str, frozenset[str]]
    methods: dict[str, str]
    services: dict[str, str]

    @classmethod
    def of(cls, directory: NetworkDirectory) -> _Names:
        methods = {r.method.path: r.application.name for r in directory.all_methods()}
        services = {r.method.service: r.application.name for r in directory.all_methods()}
        apps = {name: frozenset(m.path for m in app.methods) for name, app in directory.applications.items()}
        return cls(
            forces=frozenset(directory.forces),
            units={name: unit.force for name, unit in directory.units.items()},
            roles=frozenset(directory.roles),
            applications=apps,
            methods=methods,
            services=services,
        )

    def methods_matching(self, pattern: str) -> list[str]:
        """Directory methods a ``/package.Service/*`` prefix or an exact path names (keyMatch)."""
        if pattern.endswith("*"):
            prefix = pattern[:-1]
            return [m for m in self.methods if m.startswith(prefix)]
        return [pattern] if pattern in self.methods else []


def _line_problem(text: str) -> str | None:
    """What makes a data line unreadable, before splitting it into fields."""
    if not text.isascii():
        ch = next(c for c in text if not c.isascii())
        return f"non-ASCII character U+{ord(ch):04X} in a row (names are plain ASCII: retype it)"
    if "#" in text:
        return "comment after a row: put comments on their own line, starting with '#'"
    return _quote_problem(text) or _bracket_problem(text)


def _quote_problem(text: str) -> str | None:
    """Casbin's reader does not understand quotes; no field ever needs them."""
    for quote in _QUOTES:
        count = text.count(quote)
        if count % 2:
            return f"unbalanced quote {quote}: rows never need quotes"
        if count:
            return f"quotes ({quote}) are not allowed in rows: write names bare"
    return None


def _bracket_problem(text: str) -> str | None:
    """Casbin's reader nests on brackets (swallowing commas, or crashing); no field needs them."""
    stack: list[str] = []
    for ch in text:
        if ch in _PAIRS:
            stack.append(ch)
        elif ch in _CLOSERS:
            if not stack or stack[-1] != _CLOSERS[ch]:
                return f"unbalanced bracket {ch!r}"
            stack.pop()
    if stack:
        return f"unbalanced bracket {stack[-1]!r}"
    if any(ch in text for ch in "[]()"):
        return "brackets are not allowed in rows"
    return None


@dataclass(frozen=True)
class _At:
    """Where a row is: file (relative), line, and the row as written."""

    file: str
    line: int
    text: str


#: A problem with one field of a row: (field, message).
_Problem = tuple[str, str]


class _RowParser:
    """Turns lines into rows, checking every name against the directory."""

    def __init__(self, names: _Names, out: _Collector, pace: Callable[[], None]) -> None:
        self.names = names
        self.out = out
        self.pace = pace
        self.rules: list[RuleRow] = []
        self.groups: list[GroupRow] = []
        self.app_links: list[AppRow] = []

    def parse_file(self, file: SourceFile) -> None:
        text, line, problem = decode_policy_text(file.data)
        if text is None:
            self.out.error(file.name, line, problem)
            return
        rows_before = len(self.rules) + len(self.groups) + len(self.app_links)
        errors_before = len(self.out.findings)
        for number, raw in enumerate(text.split("\n"), start=1):
            self.pace()
            self.parse_line(file.name, number, raw.removesuffix("\r"))
        rows_after = len(self.rules) + len(self.groups) + len(self.app_links)
        if rows_after == rows_before and len(self.out.findings) == errors_before:
            self.out.error(file.name, None, "file has no rows, only comments (half-written?)")

    def parse_line(self, name: str, number: int, raw: str) -> None:
        bad = _INVISIBLE.search(raw) or _CONTROL.search(raw.replace("\t", " "))
        if bad:
            what = "invisible or direction-changing" if _INVISIBLE.match(bad.group()) else "control"
            self.out.error(name, number, f"{what} character U+{ord(bad.group()):04X}: retype the line")
            return
        text = raw.strip()
        if not text or text.startswith("#"):
            return
        problem = _line_problem(text)
        if problem:
            self.out.error(name, number, problem)
            return
        fields = [f.strip() for f in text.split(",")]
        kind, values = fields[0], fields[1:]
        if kind not in _FIELDS:
            hint = " (row types are lower case)" if kind.lower() in _FIELDS else ""
            self.out.error(name, number, f"unknown row type {kind!r}: expected p, g or g2{hint}", "type")
            return
        labels = _FIELDS[kind]
        if len(values) != len(labels):
            self.out.error(
                name, number, f"{kind} rows have {len(labels)} fields ({', '.join(labels)}); this one has {len(values)}"
            )
            return
        empty = next((label for label, value in zip(labels, values, strict=True) if not value), None)
        if empty is not None:
            self.out.error(name, number, "empty field", empty)
            return
        at = _At(name, number, text)
        check = {"p": self._rule, "g": self._group, "g2": self._app_link}[kind]
        found = check(at, values)
        if found is not None:
            self.out.error(name, number, found[1], found[0])

    # -- p rows ---------------------------------------------------------------

    def _rule(self, at: _At, values: list[str]) -> _Problem | None:
        subject, force, obj, effect = values
        if effect not in _EFFECTS:
            hint = " (lower case)" if effect.lower() in _EFFECTS else ""
            return "effect", f"effect must be 'allow' or 'deny'{hint}, got {effect!r}"
        problem = self._subject_problem(subject, allow_group=True)
        if problem:
            return "subject", problem
        if force == "*" and effect == "allow":
            return "force", "allow rows may not use '*' as the force: write one row per force"
        if force != "*" and force not in self.names.forces:
            return "force", f"unknown force {force!r} (not in the network directory)"
        problem = self._object_problem(obj, effect)
        if problem:
            return "object", problem
        self.rules.append((len(self.rules), subject, force, obj, effect, at.file, at.line, at.text))
        return None

    def _subject_problem(self, subject: str, *, allow_group: bool) -> str | None:
        match = _SUBJECT.fullmatch(subject)
        if match is None:
            kinds = "unit:NAME, role:NAME or group:NAME" if allow_group else "unit:NAME or role:NAME"
            return f"{subject!r} is not a subject: write {kinds}"
        kind, bare = match.groups()
        if kind == "unit" and bare not in self.names.units:
            return f"unknown unit {bare!r} (not in the network directory)"
        if kind == "role" and bare not in self.names.roles:
            return f"unknown role {bare!r} (not in the network directory)"
        if kind == "group" and not allow_group:
            return "groups cannot contain groups: name units and roles"
        return None

    def _object_problem(self, obj: str, effect: str) -> str | None:
        app = _APP.fullmatch(obj)
        problem = None
        if obj == "*":
            if effect != "deny":
                problem = "allow rows may not use '*' as the object: name an application"
        elif app is not None:
            if app.group(1) not in self.names.applications:
                problem = f"unknown application {app.group(1)!r} (not in the network directory)"
        elif "*" in obj:
            if not (obj.startswith("/") and obj.endswith("/*") and obj.count("*") == 1):
                problem = f"{obj!r}: a prefix must be a whole service, '/package.Service/*'"
            elif obj[1:-2] not in self.names.services:
                problem = f"unknown service {obj[1:-2]!r} (not in the network directory)"
        elif not obj.startswith("/"):
            problem = f"{obj!r} is not an object: write app:NAME, /package.Service/Method or /package.Service/*"
        elif obj not in self.names.methods:
            problem = f"unknown method {obj!r} (not in the network directory)"
        return problem

    # -- g and g2 rows --------------------------------------------------------

    def _group(self, at: _At, values: list[str]) -> _Problem | None:
        member, group, force = values
        problem = self._subject_problem(member, allow_group=False)
        if problem:
            return "member", problem
        match = _SUBJECT.fullmatch(group)
        if match is None or match.group(1) != "group":
            return "group", f"{group!r} is not a group: write group:NAME"
        if force == "*":
            return "force", "group membership is per force: '*' is not allowed here"
        if force not in self.names.forces:
            return "force", f"unknown force {force!r} (not in the network directory)"
        self.groups.append((member, group, force, at.file, at.line, at.text))
        return None

    def _app_link(self, at: _At, values: list[str]) -> _Problem | None:
        pattern, application = values
        app = _APP.fullmatch(application)
        if app is None:
            return "application", f"{application!r} is not an application: write app:NAME"
        if app.group(1) not in self.names.applications:
            return "application", f"unknown application {app.group(1)!r} (not in the network directory)"
        if pattern == "*" or pattern.startswith("app:"):
            return "method", "name a method or a '/package.Service/*' prefix"
        problem = self._object_problem(pattern, "deny")
        if problem:
            return "method", problem
        for method in self.names.methods_matching(pattern):
            owner = self.names.methods[method]
            if owner != app.group(1):
                return "method", f"{method} belongs to application {owner!r}, not {app.group(1)!r}"
        self.app_links.append((pattern, app.group(1), at.file, at.line, at.text))
        return None


def _check_groups(parser: _RowParser, names: _Names, out: _Collector) -> None:
    """Groups: members from the right force, every group used has members, every group is used."""
    members: dict[str, set[str]] = {}
    first_link: dict[str, GroupLink] = {}
    for link in map(GroupLink._make, parser.groups):
        parser.pace()
        members.setdefault(link.group, set()).add(link.force)
        first_link.setdefault(link.group, link)
        owner = names.units.get(link.member.removeprefix("unit:")) if link.member.startswith("unit:") else None
        if owner is not None and owner != link.force:
            out.warn(
                link.file,
                link.line,
                f"{link.member} belongs to force {owner}: this link can never apply in {link.force}",
            )
    used: set[str] = set()
    for rule in map(Rule._make, parser.rules):
        parser.pace()
        if not rule.subject.startswith("group:"):
            continue
        used.add(rule.subject)
        forces = members.get(rule.subject)
        if forces is None:
            out.error(rule.file, rule.line, f"{rule.subject} has no members: no g row names it", "subject")
        elif rule.force != "*" and rule.force not in forces:
            out.warn(rule.file, rule.line, f"{rule.subject} has no members in force {rule.force}", "subject")
    for group in sorted(set(members) - used):
        out.warn(first_link[group].file, first_link[group].line, f"{group} is not used by any rule")


def _check_applications(parser: _RowParser, names: _Names, out: _Collector) -> None:
    """Applications: every app:NAME a rule names has methods, and g2 rows cover all of them."""
    links: dict[str, list[AppLink]] = {}
    for link in map(AppLink._make, parser.app_links):
        links.setdefault(link.application, []).append(link)
    for rule in map(Rule._make, parser.rules):
        parser.pace()
        if rule.obj.startswith("app:") and rule.obj.removeprefix("app:") not in links:
            out.error(
                rule.file,
                rule.line,
                f"{rule.obj} has no methods: no g2 row maps a method to it (the rule would match nothing)",
                "object",
            )
    for app, app_links in sorted(links.items()):
        parser.pace()
        covered = {m for link in app_links for m in names.methods_matching(link.pattern)}
        missing = sorted(names.applications[app] - covered)
        if missing:
            out.warn(
                app_links[0].file,
                app_links[0].line,
                f"app:{app} does not cover {', '.join(missing)}: rules on app:{app} do not reach them",
            )


def _cross_checks(parser: _RowParser, names: _Names, out: _Collector) -> None:
    """Checks that need every row: groups and applications used, duplicates, contradictions."""
    _check_groups(parser, names, out)
    _check_applications(parser, names, out)
    for rule in map(Rule._make, parser.rules):
        parser.pace()
        owner = names.units.get(rule.subject.removeprefix("unit:")) if rule.subject.startswith("unit:") else None
        if owner is not None and rule.force not in ("*", owner):
            out.warn(
                rule.file,
                rule.line,
                f"{rule.subject} belongs to force {owner}: this rule can never apply from {rule.force}",
            )
    _duplicates(parser, out)
    if out.source.rows and not any(row[4] == "allow" for row in parser.rules):
        out.warn(out.source.root, None, "no allow rows: this policy refuses every call")


def _canonical(row: Rule | GroupLink | AppLink) -> str:
    if isinstance(row, Rule):
        return f"p, {row.subject}, {row.force}, {row.obj}, {row.effect}"
    if isinstance(row, GroupLink):
        return f"g, {row.member}, {row.group}, {row.force}"
    return f"g2, {row.pattern}, app:{row.application}"


def _duplicates(parser: _RowParser, out: _Collector) -> None:
    seen: dict[str, tuple[str, int]] = {}
    rows: Iterable[Rule | GroupLink | AppLink] = itertools.chain(
        map(Rule._make, parser.rules), map(GroupLink._make, parser.groups), map(AppLink._make, parser.app_links)
    )
    for row in rows:
        parser.pace()
        key = _canonical(row)
        if key in seen:
            file, line = seen[key]
            out.warn(row.file, row.line, f"duplicate of {file}:{line}")
        else:
            seen[key] = (row.file, row.line)
    # Plain tuples of strings, not views: they must not outlive the loop as tracked objects.
    effects: dict[tuple[str, str, str], tuple[str, str]] = {}
    for rule in map(Rule._make, parser.rules):
        parser.pace()
        effect, where = effects.setdefault((rule.subject, rule.force, rule.obj), (rule.effect, rule.location))
        if effect != rule.effect:
            out.warn(rule.file, rule.line, f"contradicts {where} (deny wins)")


def _parse_cases(source: PolicySource, out: _Collector) -> list[GoldenCase]:
    cases: list[GoldenCase] = []
    for file in source.tests:
        shown = source.display(file.name)
        try:
            toml = TomlFile.parse(file.data, shown)
            root = toml.root()
            names: set[str] = set()
            for sec in root.array("case", required=True):
                name = sec.text("name", max_len=200)
                request = DecisionRequest(
                    origin_force=sec.text("force", max_len=200),
                    units=sec.text_list("units", ()),
                    roles=sec.text_list("roles", ()),
                    clearance=sec.text("clearance", max_len=200),
                    method=sec.text("method", max_len=1000),
                )
                expect = sec.choice("expect", _EFFECTS)
                reason = sec.text("reason_contains", None)
                sec.finish()
                line = toml.line_of(sec.keys)
                if name in names:
                    out.warn(file.name, line, f"another case is also named {name!r}")
                names.add(name)
                cases.append(GoldenCase(name, file.name, line, request, expect == "allow", reason))
            root.finish()
        except ConfigError as exc:
            out.findings.append(Finding(exc.file or shown, exc.line, exc.message, Severity.ERROR, exc.field))
    if not cases and source.rows:
        out.warn(out.source.display(TESTS_DIR), None, "no golden cases: add tests/*.toml (see the README)")
    return cases


def parse_policy(
    source: PolicySource, directory: NetworkDirectory, *, pace: Callable[[], None] = no_pacing
) -> tuple[ParsedPolicy | None, list[Finding]]:
    """Parse and validate `source` against `directory`.

    Returns the parsed policy (None if any error was found) and every finding,
    errors and warnings, in the order found.
    """
    out = _Collector(source)
    model_text = ""
    if source.model is not None:
        text, line, problem = decode_policy_text(source.model.data)
        if text is None:
            out.error(source.model.name, line, problem)
        else:
            model_text = text
    names = _Names.of(directory)
    parser = _RowParser(names, out, pace)
    for file in source.rows:
        parser.parse_file(file)
    _cross_checks(parser, names, out)
    cases = _parse_cases(source, out)
    if any(f.is_error for f in out.findings) or source.model is None:
        return None, out.findings
    files = tuple(f.name for f in (source.model, *source.rows))
    return (
        ParsedPolicy(
            root=source.root,
            version=source.version,
            files=files,
            model_text=model_text,
            rule_rows=tuple(parser.rules),
            group_rows=tuple(parser.groups),
            app_rows=tuple(parser.app_links),
            cases=tuple(cases),
        ),
        out.findings,
    )
