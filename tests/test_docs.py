"""The guides stay true: their commands parse, every --help runs, their links resolve, their examples parse.

What is checked, in every Markdown guide (README.md, docs/*.md, docker/README.md, certs/README.md,
policies/README.md; not docs/dev/, which is internal):

- every ``psngw ...`` command in a shell code block (fenced ``sh``, ``shell``, ``bash``, ``console`` or
  unlabelled), wherever it stands on the line (after ``$(``, ``exec SERVICE``, a pipe...), parses with
  `gateway.cli.build_parser()`; backslash continuations are joined, heredoc bodies skipped, and a ``[...]``
  group is taken as optional (the line must parse both with and without it);
- every ``make TARGET`` names a target of the Makefile;
- every ``toml`` block parses with tomllib, every ``json`` block with json, every ``python`` block compiles;
- every relative link resolves to a file, and a ``#fragment`` into a Markdown file names one of its headings;
- every command and subcommand's ``--help`` runs and exits 0 (and the installed ``psngw`` script too);
- every key the gateway config and the network directory accept appears in docs/operators.md.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent

#: The guides whose examples must stay true.
DOCS = sorted(
    [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        ROOT / "docker" / "README.md",
        ROOT / "certs" / "README.md",
        ROOT / "policies" / "README.md",
    ]
)

#: Link targets other engineers are still writing: skipped while missing, checked like any other once they exist.
#: Link targets that may not exist yet, with why (none now).
PENDING_TARGETS: dict[Path, str] = {}

_SHELL_LANGUAGES = {"", "sh", "shell", "bash", "console"}
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)[^\n]*$")
_LINK = re.compile(r"(?<!\\)\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class Block:
    """A fenced code block: its file, the line of its first content line, its language and text."""

    doc: Path
    line: int
    language: str
    text: str

    def where(self, offset: int = 0) -> str:
        """``file:line`` of a line in this block."""
        return f"{self.doc.relative_to(ROOT)}:{self.line + offset}"


def _blocks(doc: Path) -> list[Block]:
    out: list[Block] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = opening.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        out.append(Block(doc, i + 2, language.lower(), "\n".join(body) + "\n"))
        i = j + 1
    return out


ALL_BLOCKS = [block for doc in DOCS for block in _blocks(doc)]


def _quotes_closed(line: str) -> bool:
    """Whether every quote on `line` is closed (a shell string may run over several lines)."""
    try:
        shlex.split(line, comments=True)
    except ValueError:
        return False
    return True


def _logical_lines(block: Block) -> Iterator[tuple[int, str]]:
    """The block's shell lines: continuations and multi-line strings joined, heredoc bodies and prompts removed."""
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        start = i
        line = lines[i]
        while i + 1 < len(lines) and (line.endswith("\\") or not _quotes_closed(line)):
            i += 1
            line = line[:-1] + " " + lines[i].strip() if line.endswith("\\") else line + "\n" + lines[i]
        i += 1
        heredoc = _HEREDOC.search(line)
        if heredoc:
            end = heredoc.group(2)
            while i < len(lines) and lines[i].strip() != end:
                i += 1
            i += 1
        stripped = line.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        yield start, stripped


def _commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at pipes, lists, redirections and parentheses."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out: list[list[str]] = [[]]
    for token in lexer:
        if token and all(ch in "();<>|&" for ch in token):
            out.append([])
        else:
            out[-1].append(token)
    return [c for c in out if c]


def _psngw_argv(command: list[str]) -> list[str] | None:
    """The arguments after ``psngw`` in a simple command (``docker compose exec X psngw ...`` too)."""
    for i, word in enumerate(command):
        if word == "psngw" or word.endswith("/bin/psngw"):
            return command[i + 1 :]
    return None


def _variants(line: str) -> list[str]:
    """A line with each ``[...]`` group left out, and with it kept (brackets removed)."""
    if not _OPTIONAL.search(line):
        return [line]
    without = _OPTIONAL.sub(" ", line)
    kept = _OPTIONAL.sub(lambda m: f" {m.group(1)} ", line)
    return [without, kept]


@dataclass(frozen=True)
class Example:
    """One command found in a guide."""

    where: str
    line: str
    argv: tuple[str, ...]


def _examples(program: str) -> list[Example]:
    found: list[Example] = []
    for block in ALL_BLOCKS:
        if block.language not in _SHELL_LANGUAGES:
            continue
        for offset, line in _logical_lines(block):
            if not re.search(rf"(^|[\s(/]){program}(\s|$)", line):
                continue
            for variant in _variants(line):
                for command in _commands(variant):
                    if program == "psngw":
                        argv = _psngw_argv(command)
                    else:
                        argv = command[1:] if command[0] == program else None
                    if argv is not None:
                        found.append(Example(block.where(offset), line, tuple(argv)))
    return found


PSNGW_EXAMPLES = _examples("psngw")
MAKE_EXAMPLES = _examples("make")


def test_the_guides_have_examples() -> None:
    # A broken extractor would make every other test here pass vacuously.
    assert len(DOCS) >= 10
    assert len(PSNGW_EXAMPLES) >= 60
    assert {e.argv[0] for e in PSNGW_EXAMPLES} >= {"demo", "pki", "token", "policy", "audit", "serve", "bench"}
    assert MAKE_EXAMPLES


def _parse(argv: tuple[str, ...]) -> str | None:
    """None if `argv` parses as a psngw command line, else argparse's complaint."""
    parser = build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(list(argv))
        except SystemExit as exc:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    if not callable(getattr(args, "func", None)):
        return "names a command group, not a command"
    return None


@pytest.mark.parametrize("example", PSNGW_EXAMPLES, ids=lambda e: f"{e.where} psngw {' '.join(e.argv)[:60]}")
def test_psngw_example_parses(example: Example) -> None:
    if "--help" in example.argv or "-h" in example.argv:
        pytest.skip("--help is checked by test_every_help_runs")
    problem = _parse(example.argv)
    assert problem is None, f"{example.where}: `{example.line}` does not parse: {problem}"


def test_parse_check_catches_a_wrong_command() -> None:
    # The check above must be able to fail: a misspelt option, a missing required one, an unknown command.
    assert _parse(("pki", "list", "--ca-dri", "x")) is not None
    assert _parse(("audit", "prove", "db.sqlite")) is not None
    assert _parse(("policy", "frobnicate", "policies")) is not None
    assert _parse(("audit",)) is not None
    assert _parse(("pki", "list", "--ca-dir", "x")) is None


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE))


@pytest.mark.parametrize("example", MAKE_EXAMPLES, ids=lambda e: f"{e.where} make {' '.join(e.argv)}")
def test_make_example_names_a_target(example: Example) -> None:
    targets = [a for a in example.argv if not a.startswith("-") and "=" not in a]
    assert targets, f"{example.where}: `{example.line}` names no target"
    unknown = [t for t in targets if t not in _make_targets()]
    assert not unknown, f"{example.where}: `{example.line}`: no Makefile target {unknown}"


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "toml"], ids=lambda b: b.where())
def test_toml_example_parses(block: Block) -> None:
    try:
        tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{block.where()}: TOML example does not parse: {exc}")


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "json"], ids=lambda b: b.where())
def test_json_example_parses(block: Block) -> None:
    try:
        json.loads(block.text)
    except ValueError as exc:
        pytest.fail(f"{block.where()}: JSON example does not parse: {exc}")


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language in ("python", "py")], ids=lambda b: b.where())
def test_python_example_compiles(block: Block) -> None:
    try:
        compile(block.text, block.where(), "exec")
    except SyntaxError as exc:
        pytest.fail(f"{block.where()}: Python example does not compile: {exc}")


# -- --help ---------------------------------------------------------------------------------------


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*prefix, name))


COMMAND_PATHS = list(_command_paths(build_parser()))


def test_every_command_group_is_there() -> None:
    groups = {path[0] for path in COMMAND_PATHS if path}
    assert groups >= {"serve", "pki", "token", "policy", "audit", "demo", "bench"}
    assert len(COMMAND_PATHS) >= 25


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(("psngw", *p)))
def test_every_help_runs(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(('psngw', *path))}")
    assert "options:" in out


def test_installed_script_help_runs() -> None:
    script = Path(sys.executable).parent / "psngw"
    assert script.exists(), f"the console script {script} is not installed"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: psngw")


@pytest.mark.parametrize(
    "argv",
    [("-m", "gateway.demo.appserve", "--help"), (str(ROOT / "docker" / "healthcheck.py"), "--help")],
    ids=["appserve", "healthcheck"],
)
def test_other_entry_points_help_runs(argv: tuple[str, ...]) -> None:
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


# -- links -------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    in_fence = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not in_fence:
            slug = _slug(heading.group(1))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(doc: Path) -> Iterator[tuple[int, str]]:
    in_fence = False
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for match in _LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            yield number, match.group(1)


LINKS = [
    (doc, number, target)
    for doc in DOCS
    for number, target in _links(doc)
    if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto: ...
]


def test_the_guides_link_to_each_other() -> None:
    assert len(LINKS) >= 30


@pytest.mark.parametrize("link", LINKS, ids=lambda x: f"{x[0].relative_to(ROOT)}:{x[1]} {x[2]}")
def test_relative_link_resolves(link: tuple[Path, int, str]) -> None:
    doc, number, target = link
    where = f"{doc.relative_to(ROOT)}:{number}"
    path_part, _, fragment = target.partition("#")
    resolved = (doc.parent / path_part).resolve() if path_part else doc
    if not resolved.exists() and resolved in PENDING_TARGETS:
        pytest.skip(f"{where}: {target} is pending: {PENDING_TARGETS[resolved]}")
    assert resolved.exists(), f"{where}: link to {target}: no such file {resolved}"
    if fragment and resolved.suffix == ".md":
        assert fragment in _anchors(resolved), f"{where}: link to {target}: {resolved.name} has no heading #{fragment}"


def test_link_check_catches_a_broken_anchor() -> None:
    assert "the-pki-lifecycle" in _anchors(ROOT / "docs" / "operators.md")
    assert "no-such-heading" not in _anchors(ROOT / "docs" / "operators.md")
    assert _slug("What `psngw` does, **now**") == "what-psngw-does-now"


# -- every configuration key is documented -------------------------------------------------------------

#: Where the gateway config's and the directory's tables are parsed: module -> the functions that read keys.
_CONFIG_READERS = {
    "gateway/config.py": {"from_section", "_witness_db", "load_config"},
    "gateway/token.py": {"from_section"},
    "gateway/purpose.py": {"from_section"},
    "gateway/audit/store.py": {"from_section"},
    "gateway/ratelimit.py": {"from_section"},
    "gateway/policy/live.py": {"from_section"},
    "gateway/directory.py": {"parse_directory", "_parse_forces", "_parse_units", "_parse_applications"},
}
_SECTION_READS = {"text", "integer", "number", "flag", "choice", "file_path", "address", "text_list", "table", "array"}


def _config_keys() -> dict[str, set[str]]:
    """Every key name a config or directory reader reads, by module."""
    out: dict[str, set[str]] = {}
    for module, functions in _CONFIG_READERS.items():
        tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
        keys: set[str] = set()
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef) or func.name not in functions:
                continue
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _SECTION_READS
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    keys.add(node.args[0].value)
        out[module] = keys
    return out


def _documented_names(doc: Path) -> set[str]:
    names: set[str] = set()
    for span in re.findall(r"`([^`\n]+)`", doc.read_text(encoding="utf-8")):
        names.update(part for part in re.split(r"[\s.,=\[\]\"]+", span) if part)
    return names


def test_every_config_key_is_in_the_operators_guide() -> None:
    keys = _config_keys()
    assert len(keys["gateway/config.py"]) >= 20 and len(keys["gateway/token.py"]) >= 15  # the scan works
    documented = _documented_names(ROOT / "docs" / "operators.md")
    missing = sorted(f"{module}: {key}" for module, names in keys.items() for key in names if key not in documented)
    assert not missing, "keys the gateway reads but docs/operators.md does not mention:\n" + "\n".join(missing)
