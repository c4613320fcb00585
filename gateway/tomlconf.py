"""Reading TOML files into validated values, with file:line in every error.

`tomllib` parses but forgets where each key was written; officers and
operators need to be told "directory.toml:14: forces.surrey.peer_address: ...".
`TomlFile` keeps the text and finds the line of a key path by scanning it, and
`Section` reads typed values out of one table, rejecting unknown keys (a typo
in a security setting must never be silently ignored).

A setting that names a file (a certificate, a key, a policy folder) is read
here, but the file is loaded later by the subsystem that uses it, whose errors
name only that file. Each `TomlFile` remembers which of its keys named which
path, and `Provenance` ties an error about a loaded file back to the setting
that named it: "gateway.toml:12: tls.cert: pki/x.pem: cannot read: ...".

Owns: turning a TOML file into checked Python values or a `ConfigError`, and
saying which setting named a file. Does not own: what any particular file
means (see directory, config).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from gateway.errors import ConfigError

__all__ = ["MISSING", "Origin", "Provenance", "Section", "TomlFile", "parse_address"]

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Marker for "no default: the key is required".
MISSING: Any = _Missing()

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEYLINE = re.compile(
    r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*="""
)
_KEYPART = re.compile(r""""([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+)""")


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(a or b or c for a, b, c in _KEYPART.findall(text))


def _field(keys: tuple[str | int, ...]) -> str:
    return ".".join(str(k) for k in keys)


def _absolute(path: Path | str) -> Path:
    """`path` made absolute without touching the file system (no symlinks resolved)."""
    return Path(os.path.abspath(path))


@dataclass(frozen=True)
class Origin:
    """Where a setting is written: the file, its line (if found) and the key path (``tls.cert``)."""

    file: Path
    line: int | None
    field: str


class TomlFile:
    """A parsed TOML file that remembers its text, to name lines in errors."""

    def __init__(self, path: Path, text: str, data: dict[str, Any]) -> None:
        self.path = path
        self.text = text
        self.data = data
        self._index: dict[tuple[str | int, ...], int] | None = None
        #: every path a setting of this file named (`Section.file_path`), made absolute, with that setting
        self.named: dict[Path, Origin] = {}

    @classmethod
    def load(cls, path: Path | str) -> TomlFile:
        """Read and parse `path`; any failure is a `ConfigError` naming it."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror or exc}", file=path) from exc
        return cls.parse(raw, path)

    @classmethod
    def parse(cls, raw: bytes, path: Path | str = "<input>") -> TomlFile:
        """Parse TOML bytes (UTF-8, no BOM)."""
        path = Path(path)
        if raw.startswith(b"\xef\xbb\xbf"):
            raise ConfigError("file starts with a UTF-8 byte order mark; save it without one", file=path, line=1)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError("not valid UTF-8", file=path, line=line) from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = str(exc)
            match = re.search(r"\(at line (\d+), column \d+\)", msg)
            where = int(match.group(1)) if match else None
            msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg) if match else msg
            raise ConfigError(f"TOML syntax error: {msg}", file=path, line=where) from exc
        return cls(path, text, data)

    def root(self) -> Section:
        """The top-level table."""
        return Section(self, (), self.data)

    def line_of(self, keys: tuple[str | int, ...]) -> int | None:
        """Best-effort line number where the key path `keys` is written."""
        index = self._build_index()
        for n in range(len(keys), 0, -1):
            if keys[:n] in index:
                return index[keys[:n]]
        return None

    def _build_index(self) -> dict[tuple[str | int, ...], int]:
        if self._index is not None:
            return self._index
        index: dict[tuple[str | int, ...], int] = {}
        counts: dict[tuple[str, ...], int] = {}
        current: tuple[str | int, ...] = ()
        for number, line in enumerate(self.text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            header = _HEADER.match(line)
            if header and stripped.startswith("["):
                names = _split_key(header.group(2))
                if header.group(1) == "[[":
                    i = counts.get(names, 0)
                    counts[names] = i + 1
                    current = (*self._resolve(names[:-1], counts), names[-1], i)
                else:
                    # A header inside an array of tables refers to its last element.
                    current = self._resolve(names, counts)
                index.setdefault(current, number)
                continue
            keyline = _KEYLINE.match(line)
            if keyline:
                full = (*current, *_split_key(keyline.group(1)))
                for n in range(len(current) + 1, len(full) + 1):
                    index.setdefault(full[:n], number)
        self._index = index
        return index

    @staticmethod
    def _resolve(names: tuple[str, ...], counts: dict[tuple[str, ...], int]) -> tuple[str | int, ...]:
        out: list[str | int] = []
        for n, name in enumerate(names, start=1):
            out.append(name)
            if names[:n] in counts:
                out.append(counts[names[:n]] - 1)
        return tuple(out)

    def error(self, keys: tuple[str | int, ...], message: str) -> ConfigError:
        """A `ConfigError` for the key path `keys`, with its line if found."""
        return ConfigError(message, file=self.path, line=self.line_of(keys), field=_field(keys) if keys else None)

    def origin(self, keys: tuple[str | int, ...]) -> Origin:
        """Where the key path `keys` is written in this file."""
        return Origin(self.path, self.line_of(keys), _field(keys))


class Provenance:
    """Which setting named each file a gateway loads, so that an error about the file can say so.

    `locate` rewrites a `ConfigError` to point at a setting, and leaves any other alone:

    - one about a named file or folder (or a file inside a named folder) as a whole, without a line
      of its own, is put at the setting that named it, keeping the file in the message:
      ``gateway.toml:12: tls.cert: pki/x.pem: cannot read: No such file or directory``;
    - one that names a field of the settings file but no line (``listeners.admin``) gets the
      settings file and the line of that key.

    An error with a line in its own file (a TOML syntax error, a policy row) already says where it is.
    """

    def __init__(self, settings: TomlFile | None = None, *named: Mapping[Path, Origin]) -> None:
        self._settings = settings
        self._named = named

    def origin_of(self, path: Path | str) -> Origin | None:
        """The setting that named `path`, or the named folder holding it (the nearest); None if none did."""
        wanted = _absolute(path)
        tables = (*self._named, self._settings.named if self._settings is not None else {})
        for candidate in (wanted, *wanted.parents):
            for table in reversed(tables):  # the settings file's own names first
                if candidate in table:
                    return table[candidate]
        return None

    def locate(self, exc: ConfigError) -> ConfigError:
        """`exc` placed at the setting it is about (see the class), or `exc` itself."""
        if exc.line is not None:
            return exc
        settings = self._settings
        own = exc.file is None or (settings is not None and _absolute(exc.file) == _absolute(settings.path))
        if exc.field is not None and settings is not None and own:
            keys = tuple(int(k) if k.isdigit() else k for k in exc.field.split("."))
            line = settings.line_of(keys)
            if line is not None:
                return ConfigError(exc.message, file=settings.path, line=line, field=exc.field)
        if exc.file is None:
            return exc
        origin = self.origin_of(exc.file)
        if origin is None:
            return exc
        return ConfigError(str(exc), file=origin.file, line=origin.line, field=origin.field)

    @contextlib.contextmanager
    def locating(self) -> Iterator[None]:
        """Re-raise a `ConfigError` from the block placed at its setting (`locate`)."""
        try:
            yield
        except ConfigError as exc:
            located = self.locate(exc)
            if located is exc:
                raise
            raise located from exc


class Section:
    """Typed, checked reads from one TOML table; unknown keys are an error."""

    def __init__(self, file: TomlFile, keys: tuple[str | int, ...], data: dict[str, Any]) -> None:
        self.file = file
        self.keys = keys
        self.data = data
        self._seen: set[str] = set()

    # -- plumbing -------------------------------------------------------------

    def fail(self, key: str | None, message: str) -> NoReturn:
        """Raise a `ConfigError` for `key` in this table."""
        raise self.file.error((*self.keys, key) if key is not None else self.keys, message)

    def has(self, key: str) -> bool:
        """Whether `key` is present (marks it as known)."""
        self._seen.add(key)
        return key in self.data

    def _get(self, key: str, default: Any, kind: type[T] | tuple[type, ...], what: str) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is MISSING:
                self.fail(key, "required key is missing")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool:
            self.fail(key, f"expected {what}, got a boolean")
        if not isinstance(value, kind):
            self.fail(key, f"expected {what}, got {_tomltype(value)}")
        return value

    def finish(self) -> None:
        """Reject keys this table has that nobody read (typos)."""
        for key in self.data:
            if key not in self._seen:
                self.fail(key, "unknown key")

    @property
    def path(self) -> Path:
        """The file this section comes from."""
        return self.file.path

    # -- scalar reads -------------------------------------------------------------

    def text(self, key: str, default: Any = MISSING, *, pattern: str | None = None, max_len: int = 4096) -> Any:
        """A string, optionally matching `pattern` (full match)."""
        value = self._get(key, default, str, "a string")
        if isinstance(value, str):
            if len(value) > max_len:
                self.fail(key, f"longer than {max_len} characters")
            if pattern is not None and not re.fullmatch(pattern, value):
                self.fail(key, f"{value!r} does not match {pattern}")
        return value

    def integer(
        self, key: str, default: Any = MISSING, *, minimum: int | None = None, maximum: int | None = None
    ) -> Any:
        """An integer within [min, max]."""
        value = self._get(key, default, int, "an integer")
        if isinstance(value, int):
            if minimum is not None and value < minimum:
                self.fail(key, f"must be at least {minimum}, got {value}")
            if maximum is not None and value > maximum:
                self.fail(key, f"must be at most {maximum}, got {value}")
        return value

    def number(
        self, key: str, default: Any = MISSING, *, minimum: float | None = None, maximum: float | None = None
    ) -> Any:
        """A number (integer or float) within [min, max]."""
        value = self._get(key, default, (int, float), "a number")
        if isinstance(value, int | float) and value is not default:
            value = float(value)
            if minimum is not None and value < minimum:
                self.fail(key, f"must be at least {minimum:g}, got {value:g}")
            if maximum is not None and value > maximum:
                self.fail(key, f"must be at most {maximum:g}, got {value:g}")
        return value

    def flag(self, key: str, default: Any = MISSING) -> Any:
        """A boolean."""
        return self._get(key, default, bool, "true or false")

    def choice(self, key: str, choices: tuple[str, ...], default: Any = MISSING) -> Any:
        """A string from a fixed set."""
        value = self._get(key, default, str, "a string")
        if value is not default and value not in choices:
            self.fail(key, f"{value!r} is not one of: {', '.join(choices)}")
        return value

    def file_path(self, key: str, default: Any = MISSING, *, must_exist: bool = False) -> Any:
        """A path, relative to the directory of this file."""
        value = self._get(key, default, str, "a path (string)")
        if not isinstance(value, str):
            return value
        if not value:
            self.fail(key, "path is empty")
        path = Path(value)
        if not path.is_absolute():
            path = self.file.path.parent / path
        self.file.named[_absolute(path)] = self.file.origin((*self.keys, key))
        if must_exist and not path.exists():
            self.fail(key, f"file does not exist: {path}")
        return path

    def address(self, key: str, default: Any = MISSING) -> Any:
        """A `host:port` listen or connect address (IPv6 in brackets)."""
        value = self.text(key, default)
        if value is default:
            return value
        try:
            parse_address(value)
        except ValueError as exc:
            self.fail(key, str(exc))
        return value

    def text_list(
        self, key: str, default: Any = MISSING, *, pattern: str | None = None, non_empty: bool = False
    ) -> Any:
        """A list of strings, each optionally matching `pattern`; no duplicates."""
        value = self._get(key, default, list, "a list of strings")
        if value is default:
            return value
        if non_empty and not value:
            self.fail(key, "list is empty")
        seen: set[str] = set()
        for item in value:
            if not isinstance(item, str):
                self.fail(key, f"expected strings only, got {_tomltype(item)}")
            if pattern is not None and not re.fullmatch(pattern, item):
                self.fail(key, f"{item!r} does not match {pattern}")
            if item in seen:
                self.fail(key, f"{item!r} is listed twice")
            seen.add(item)
        return tuple(value)

    # -- nested tables ----------------------------------------------------------

    def table(self, key: str, *, required: bool = False) -> Section:
        """A sub-table (empty if absent and not required)."""
        value = self._get(key, MISSING if required else {}, dict, "a table")
        return Section(self.file, (*self.keys, key), value)

    def tables(self) -> Iterator[tuple[str, Section]]:
        """Each key of this table whose value is a table, as (name, section)."""
        for key, value in self.data.items():
            self._seen.add(key)
            if not isinstance(value, dict):
                self.fail(key, f"expected a table, got {_tomltype(value)}")
            yield key, Section(self.file, (*self.keys, key), value)

    def array(self, key: str, *, required: bool = False) -> list[Section]:
        """An array of tables (`[[key]]`), each as a section."""
        value = self._get(key, MISSING if required else [], list, "an array of tables")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                self.fail(key, f"item {i} is {_tomltype(item)}, expected a table")
            out.append(Section(self.file, (*self.keys, key, i), item))
        return out


def parse_address(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); raise ValueError if malformed."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not [ipv6]:port")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{value!r} is not host:port")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} has no valid port (0-65535)")
    return host, int(port)


def _tomltype(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
