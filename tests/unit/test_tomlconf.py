"""TOML reading: every error names the file, the line and the field."""

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.tomlconf import TomlFile, parse_address


def parse(text: str) -> TomlFile:
    return TomlFile.parse(text.encode(), Path("x.toml"))


def test_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse('a = 1\nb = "unterminated\n')
    assert err.value.line == 2
    assert str(err.value).startswith("x.toml:2: TOML syntax error")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xef\xbb\xbfa = 1\n", "byte order mark"),
        (b'a = "\xff"\n', "not valid UTF-8"),
    ],
)
def test_bad_bytes(raw: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TomlFile.parse(raw, Path("x.toml"))


def test_unknown_key_is_an_error_with_its_line() -> None:
    file = parse("[limits]\nmax = 1\nmax_mesage_bytes = 2\n")
    sec = file.root().table("limits")
    sec.integer("max")
    with pytest.raises(ConfigError) as err:
        sec.finish()
    assert (err.value.line, err.value.field) == (3, "limits.max_mesage_bytes")


def test_line_of_nested_and_array_tables() -> None:
    text = "\n".join(
        [
            "top = 1",
            "[a.b]",
            "c = 2",
            "[[items]]",
            "n = 1",
            "[[items]]",
            "n = 2",
            '[apps."x.y"]',
            'z = "q"',
        ]
    )
    file = parse(text)
    assert file.line_of(("a", "b", "c")) == 3
    assert file.line_of(("items", 1, "n")) == 7
    assert file.line_of(("apps", "x.y", "z")) == 9
    assert file.line_of(("apps", "x.y", "missing")) == 8


@pytest.mark.parametrize(
    ("text", "call", "message"),
    [
        ("n = 'x'", lambda s: s.integer("n"), "expected an integer"),
        ("n = true", lambda s: s.integer("n"), "got a boolean"),
        ("n = 0", lambda s: s.integer("n", minimum=1), "at least 1"),
        ("n = 9", lambda s: s.number("n", maximum=5), "at most 5"),
        ("s = 'A'", lambda s: s.text("s", pattern="[a-z]+"), "does not match"),
        ("l = ['a', 'a']", lambda s: s.text_list("l"), "listed twice"),
        ("l = [1]", lambda s: s.text_list("l"), "strings only"),
        ("c = 'maybe'", lambda s: s.choice("c", ("yes", "no")), "not one of"),
        ("a = 'nohost'", lambda s: s.address("a"), "host:port"),
        ("", lambda s: s.text("s"), "required key is missing"),
    ],
)
def test_typed_reads_refuse_bad_values(text: str, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        call(parse(text).root())


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:7443", ("::1", 7443)), ("gw.example:0", ("gw.example", 0))],
)
def test_parse_address(value: str, expected: tuple[str, int]) -> None:
    assert parse_address(value) == expected


@pytest.mark.parametrize("value", ["127.0.0.1", ":80", "[::1]80", "h:99999", "[zz]:1", "h:x"])
def test_parse_address_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_address(value)
