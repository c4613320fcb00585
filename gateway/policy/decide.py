"""The fast path: a loaded policy that decides in microseconds, without casbin.

At load time every row is expanded into a table keyed by (origin force,
method), holding for each unit and each role the rule that decides for it
(the first deny that matches, else the first allow), with groups (g rows),
application groups (g2 rows), ``/package.Service/*`` prefixes and ``*``
forces already resolved. `Policy.decide` then does a few dictionary look-ups.
The table is read-only once built: a request naming an unknown unit, role,
force, clearance or method is refused before the table is consulted and never
adds anything to it, so garbage input cannot grow memory.

How a principal is decided (`verify` combines casbin's answers the same way):

1. names: the origin force, the method, every unit and role, and the clearance
   must be in the network directory; a force's own unit is accepted only from
   that force. Otherwise: refused, and the reason says which name.
2. vetting: a clearance below the application's `min_clearance` is refused,
   whatever the rules say.
3. rules: each of the principal's units and roles is a subject. The principal
   is allowed if some subject is allowed by a rule and no subject is denied by
   one: a deny on any of them overrides every allow (deny overrides allow
   across all the principal's subjects). No rule: default deny.

Owns: `Policy` (immutable, cheap to share between threads) and
`build_policy`. Does not own: reading files (`files`), casbin (`engine`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.directory import NetworkDirectory
from gateway.ids import new_id
from gateway.policy._pace import no_pacing
from gateway.policy.files import ParsedPolicy
from gateway.policy.values import AppLink, Decision, DecisionRequest, Finding, GroupLink, Rule

__all__ = ["MAX_SUBJECTS", "MethodInfo", "Policy", "build_policy", "new_decision_id"]

#: A principal with more units and roles than this is refused (bounded work per call).
MAX_SUBJECTS = 64
#: Names quoted in reasons are cut to this length (reasons go to the audit log).
_QUOTE_MAX = 64


def new_decision_id() -> str:
    """A fresh decision id (see `gateway.ids`)."""
    return new_id()


def _q(value: str) -> str:
    """A name from a request, quoted safely for a log line."""
    if len(value) > _QUOTE_MAX:
        return repr(value[:_QUOTE_MAX]) + "..."
    return repr(value)


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """What the fast path needs about a method: its application and vetting floor."""

    application: str
    min_clearance: str
    min_rank: int


_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class _DirectoryIndex:
    """What the fast path needs from the directory, built once per directory.

    A reload against the same directory reuses it (see `build_policy`), so the
    first calls on a new policy find these structures, and the table's
    (force, method) keys, already in the CPU caches.
    """

    forces: frozenset[str]
    unit_force: dict[str, str | None]
    roles: frozenset[str]
    ranks: dict[str, int]
    methods: dict[str, MethodInfo]
    keys: dict[tuple[str, str], tuple[str, str]]

    @classmethod
    def of(cls, directory: NetworkDirectory) -> _DirectoryIndex:
        ranks = {level: rank for rank, level in enumerate(directory.clearance_levels)}
        methods = {
            route.method.path: MethodInfo(
                route.application.name, route.application.min_clearance, ranks[route.application.min_clearance]
            )
            for route in directory.all_methods()
        }
        return cls(
            forces=frozenset(directory.forces),
            unit_force={name: unit.force for name, unit in directory.units.items()},
            roles=frozenset(directory.roles),
            ranks=ranks,
            methods=methods,
            keys={(force, method): (force, method) for force in directory.forces for method in methods},
        )


@dataclass(frozen=True, slots=True)
class _Tables:
    """What `build_policy` computes for a `Policy`.

    `units_by` and `roles_by`: (force, method) -> {name: index of the deciding
    rule}. `members`: (force, group) -> members. `objects`: a rule's object ->
    the methods it names. `allows` and `cites`: per rule, in load order,
    whether it allows and how decisions quote it.
    """

    index: _DirectoryIndex
    units_by: dict[tuple[str, str], dict[str, int]]
    roles_by: dict[tuple[str, str], dict[str, int]]
    members: dict[tuple[str, str], tuple[str, ...]]
    objects: dict[str, tuple[str, ...]]
    allows: tuple[bool, ...]
    cites: tuple[str, ...]


class Policy:
    """An immutable, validated, loaded policy. `decide` is the fast path.

    Build it with `gateway.policy.load_policy`, which checks it against casbin
    and the golden cases first. Nothing writes to a policy after
    `build_policy` returns, so one policy is safely shared by every thread.

    The table maps (force, method) to {unit or role name: index of the rule
    that decides}; ints and strings only, so the table is invisible to the
    cycle collector and cheap to free.
    """

    __slots__ = (
        "_allows",
        "_cites",
        "_forces",
        "_index",
        "_members",
        "_methods",
        "_objects",
        "_ranks",
        "_roles",
        "_roles_by",
        "_rows",
        "_unit_force",
        "_units_by",
        "directory",
        "parsed",
        "version",
        "warnings",
    )

    def __init__(
        self, *, parsed: ParsedPolicy, directory: NetworkDirectory, warnings: tuple[Finding, ...], tables: _Tables
    ) -> None:
        self.parsed = parsed
        self.version = parsed.version
        self.directory = directory
        self.warnings = warnings
        self._rows = parsed.rule_rows
        self._units_by = tables.units_by
        self._roles_by = tables.roles_by
        self._members = tables.members
        self._objects = tables.objects
        self._allows = tables.allows
        self._cites = tables.cites
        self._index = tables.index
        self._forces = tables.index.forces
        self._unit_force = tables.index.unit_force
        self._roles = tables.index.roles
        self._ranks = tables.index.ranks
        self._methods = tables.index.methods

    def __repr__(self) -> str:
        return f"<Policy {self.version} from {self.parsed.root}: {len(self._rows)} rules>"

    # -- the fast path ----------------------------------------------------------

    def refusal(self, request: DecisionRequest) -> str | None:  # noqa: PLR0911  # one return per reason, in order
        """Why `request` is refused before the rules are consulted (names, vetting), or None."""
        force = request.origin_force
        if force not in self._forces:
            return f"origin force {_q(force)} is not in the network directory"
        info = self._methods.get(request.method)
        if info is None:
            return f"method {_q(request.method)} is not served by any application in the network directory"
        if len(request.units) + len(request.roles) > MAX_SUBJECTS:
            return f"principal names more than {MAX_SUBJECTS} units and roles"
        for unit in request.units:
            if unit not in self._unit_force:
                return f"unit {_q(unit)} is not in the network directory"
            owner = self._unit_force[unit]
            if owner is not None and owner != force:
                return f"unit {unit} belongs to force {owner}, not to the origin force {force}"
        for role in request.roles:
            if role not in self._roles:
                return f"role {_q(role)} is not in the network directory"
        rank = self._ranks.get(request.clearance)
        if rank is None:
            return f"clearance {_q(request.clearance)} is not one of the directory's clearance levels"
        if not request.units and not request.roles:
            return "principal has no units or roles"
        if rank < info.min_rank:
            return (
                f"clearance {request.clearance} below application minimum {info.min_clearance} "
                f"({info.application} requires {info.min_clearance})"
            )
        return None

    def decide(self, request: DecisionRequest) -> Decision:
        """The decision for `request`: allowed or not, why, by which rule, under which version."""
        refusal = self.refusal(request)
        if refusal is not None:
            return Decision(False, new_decision_id(), self.version, None, refusal)
        key = (request.origin_force, request.method)
        allows = self._allows
        deny = allow = -1
        deny_who = allow_who = ""
        for kind, names, table in (
            ("unit", request.units, self._units_by.get(key, _EMPTY)),
            ("role", request.roles, self._roles_by.get(key, _EMPTY)),
        ):
            for name in names:
                index = table.get(name)
                if index is None:
                    continue
                # The lowest index of each kind decides, so the answer does not depend on order.
                if not allows[index]:
                    if deny < 0 or index < deny:
                        deny, deny_who = index, f"{kind} {name}"
                elif allow < 0 or index < allow:
                    allow, allow_who = index, f"{kind} {name}"
        if deny >= 0:
            cite = self._cites[deny]
            reason = f"denied by rule {cite} ({deny_who}; deny overrides allow)"
            return Decision(False, new_decision_id(), self.version, cite, reason)
        if allow >= 0:
            cite = self._cites[allow]
            reason = f"allowed by rule {cite} ({allow_who} from force {request.origin_force})"
            return Decision(True, new_decision_id(), self.version, cite, reason)
        who = _describe(request.units, request.roles)
        reason = f"no rule allows {who} from force {request.origin_force} to call {request.method} (default deny)"
        return Decision(False, new_decision_id(), self.version, None, reason)

    # -- for explanations, tools and the casbin check ---------------------------

    def rule_for(self, force: str, subject: str, method: str) -> Rule | None:
        """The rule that decides for one subject (``unit:NAME`` or ``role:NAME``), or None if none matches.

        A deny row if any matches (the first), else the first allow row.
        """
        kind, _, name = subject.partition(":")
        table = self._units_by if kind == "unit" else self._roles_by if kind == "role" else {}
        index = table.get((force, method), _EMPTY).get(name)
        return None if index is None else Rule._make(self._rows[index])

    def matches(self, force: str, subject: str, method: str) -> tuple[Rule, ...]:
        """Every rule that matches one subject, force and method, in load order (for explanations)."""
        found = []
        for rule in map(Rule._make, self._rows):
            if rule.force not in (force, "*") or method not in self._objects[rule.obj]:
                continue
            if rule.subject == subject or subject in self._members.get((force, rule.subject), ()):
                found.append(rule)
        return tuple(found)

    def method_info(self, method: str) -> MethodInfo | None:
        """The application and vetting floor of `method`, if the directory has it."""
        return self._methods.get(method)

    def subjects_for(self, force: str) -> tuple[str, ...]:
        """Every subject a principal from `force` may hold: regional and own units, and roles."""
        units = [f"unit:{n}" for n, owner in self._unit_force.items() if owner in (None, force)]
        return (*units, *(f"role:{r}" for r in self.directory.roles))

    def warm(self, pace: Callable[[], None] = no_pacing) -> int:
        """Decide one request per force and method and read the whole table once.

        So the first calls after a swap find the new policy in the CPU caches.
        Returns how many table entries were read. Called by the loader just
        before the policy is handed over.
        """
        cites = self._cites
        seen = 0
        top = self.directory.clearance_levels[-1]
        for force in self._forces:
            units = tuple(name for name, owner in self._unit_force.items() if owner in (None, force))[:1]
            for method in self._methods:
                pace()
                self.decide(DecisionRequest(force, units, self.directory.roles[:1], top, method))
        for table in (self._units_by, self._roles_by):
            for by_name in table.values():
                pace()
                for index in by_name.values():
                    _ = cites[index]
                seen += len(by_name)
        return seen

    def table_digest(self, pace: Callable[[], None] = no_pacing) -> str:
        """A digest of the whole table, in build order (equal tables, equal digests)."""
        digest = hashlib.sha256()
        for tag, table in (("unit", self._units_by), ("role", self._roles_by)):
            for (force, method), by_name in table.items():
                pace()
                entries = "".join(f"{name}={index};" for name, index in by_name.items())
                digest.update(f"{tag}|{force}|{method}|{entries}\n".encode())
        return digest.hexdigest()

    def table_size(self) -> int:
        """How many (force, method, subject) entries the fast path holds."""
        return sum(len(t) for t in self._units_by.values()) + sum(len(t) for t in self._roles_by.values())


def _describe(units: tuple[str, ...], roles: tuple[str, ...]) -> str:
    parts = [f"unit {u}" for u in units] + [f"role {r}" for r in roles]
    return ", ".join(parts)


def _key_match(method: str, pattern: str) -> bool:
    """Casbin's keyMatch: everything before the first '*' is a prefix; without '*', equality."""
    star = pattern.find("*")
    return method == pattern if star < 0 else method.startswith(pattern[:star])


def _expand_objects(
    parsed: ParsedPolicy, methods: tuple[str, ...], pace: Callable[[], None]
) -> dict[str, tuple[str, ...]]:
    """The directory methods each object of a rule names (keyMatch, or g2 for ``app:``), in directory order."""
    patterns: dict[str, list[str]] = {}
    for link in map(AppLink._make, parsed.app_rows):
        patterns.setdefault(f"app:{link.application}", []).append(link.pattern)
    objects: dict[str, tuple[str, ...]] = {}
    for rule in map(Rule._make, parsed.rule_rows):
        if rule.obj in objects:
            continue
        pace()
        names = patterns.get(rule.obj, ()) if rule.obj.startswith("app:") else (rule.obj,)
        objects[rule.obj] = tuple(m for m in methods if any(_key_match(m, p) for p in names))
    return objects


def build_policy(
    parsed: ParsedPolicy,
    directory: NetworkDirectory,
    warnings: Iterable[Finding] = (),
    *,
    pace: Callable[[], None] = no_pacing,
    previous: Policy | None = None,
) -> Policy:
    """Expand the rows of `parsed` into the fast path's table.

    `previous`, the policy this one replaces, lends its directory index if
    it was built against the same directory object.
    """
    if previous is not None and previous.directory is directory:
        index = previous._index  # same class: sharing read-only structures
    else:
        index = _DirectoryIndex.of(directory)
    keys = index.keys
    methods = tuple(route.method.path for route in directory.all_methods())
    forces = tuple(directory.forces)
    grouped: dict[tuple[str, str], list[str]] = {}
    for link in map(GroupLink._make, parsed.group_rows):
        grouped.setdefault((link.force, link.group), []).append(link.member)
    members = {key: tuple(names) for key, names in grouped.items()}
    objects = _expand_objects(parsed, methods, pace)

    units_by: dict[tuple[str, str], dict[str, int]] = {}
    roles_by: dict[tuple[str, str], dict[str, int]] = {}
    allows: list[bool] = []
    cites: list[str] = []
    for rule in map(Rule._make, parsed.rule_rows):
        pace()
        allows.append(rule.allows)
        cites.append(rule.cite)
        for force in forces if rule.force == "*" else (rule.force,):
            subjects = members.get((force, rule.subject), ()) if rule.subject.startswith("group:") else (rule.subject,)
            for subject in subjects:
                kind, _, name = subject.partition(":")
                table = units_by if kind == "unit" else roles_by
                for method in objects[rule.obj]:
                    by_name = table.setdefault(keys[force, method], {})
                    current = by_name.get(name)
                    # Rules arrive in load order: keep the first allow until a deny
                    # matches, then the first deny (deny overrides allow).
                    if current is None or (allows[current] and not rule.allows):
                        by_name[name] = rule.position
    return Policy(
        parsed=parsed,
        directory=directory,
        warnings=tuple(warnings),
        tables=_Tables(index, units_by, roles_by, members, objects, tuple(allows), tuple(cites)),
    )
