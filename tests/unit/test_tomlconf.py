"""TOML reading: every error names the file, the line and the field."""

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.tomlconf import Origin, Provenance, TomlFile, parse_address


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


# -- provenance: which setting named a file ---------------------------------------------------------

SETTINGS = """\
force = "x"

[tls]
cert = "pki/tls.pem"
key = "pki/tls.key"

[policy]
dir = "policies"

[listeners]
admin = "0.0.0.0:9401"
"""


def _settings(root: Path) -> TomlFile:
    file = TomlFile.parse(SETTINGS.encode(), root / "gateway.toml")
    tls = file.root().table("tls")
    tls.file_path("cert")
    tls.file_path("key")
    file.root().table("policy").file_path("dir")
    return file


def test_a_setting_that_names_a_file_is_remembered_with_its_line(tmp_path: Path) -> None:
    file = _settings(tmp_path)
    origin = Provenance(file).origin_of(tmp_path / "pki" / "tls.key")
    assert origin == Origin(tmp_path / "gateway.toml", 5, "tls.key")


@pytest.mark.parametrize(
    ("named", "line", "field"),
    [
        ("pki/tls.pem", 4, "tls.cert"),
        ("pki/tls.key", 5, "tls.key"),
        ("policies", 8, "policy.dir"),
        ("policies/model.conf", 8, "policy.dir"),  # inside a named folder: that folder's setting
    ],
)
def test_an_error_about_a_named_file_is_put_at_its_setting(tmp_path: Path, named: str, line: int, field: str) -> None:
    original = ConfigError("cannot read: No such file or directory", file=tmp_path / named)
    located = Provenance(_settings(tmp_path)).locate(original)
    assert (located.file, located.line, located.field) == (str(tmp_path / "gateway.toml"), line, field)
    assert str(located) == f"{tmp_path}/gateway.toml:{line}: {field}: {tmp_path}/{named}: {original.message}"


def test_names_from_another_file_say_that_file(tmp_path: Path) -> None:
    directory = TomlFile.parse(b'[forces.a]\nca = "pki/a/ca.pem"\n', tmp_path / "directory.toml")
    directory.root().table("forces").table("a").file_path("ca")
    located = Provenance(_settings(tmp_path), directory.named).locate(
        ConfigError("cannot read CA certificate of force a", file=tmp_path / "pki" / "a" / "ca.pem")
    )
    assert str(located).startswith(f"{tmp_path}/directory.toml:2: forces.a.ca: {tmp_path}/pki/a/ca.pem: cannot read")


def test_an_error_naming_only_a_field_gets_the_settings_file_and_line(tmp_path: Path) -> None:
    located = Provenance(_settings(tmp_path)).locate(ConfigError("cannot listen", field="listeners.admin"))
    assert str(located) == f"{tmp_path}/gateway.toml:11: listeners.admin: cannot listen"


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("bad row", file="policies/rules.csv", line=3),  # it has a line of its own
        ConfigError("cannot read", file="/elsewhere/unnamed.pem"),  # no setting named it
        ConfigError("no such key", field="nowhere.at_all"),  # not a key of the settings file
        ConfigError("no file, no field"),
    ],
    ids=["own-line", "unnamed-file", "unknown-field", "bare"],
)
def test_other_errors_are_left_as_they_are(tmp_path: Path, error: ConfigError) -> None:
    assert Provenance(_settings(tmp_path)).locate(error) is error


def test_locating_re_raises_at_the_setting_from_the_original(tmp_path: Path) -> None:
    provenance = Provenance(_settings(tmp_path))
    original = ConfigError("cannot read", file=tmp_path / "pki" / "tls.pem")
    with pytest.raises(ConfigError) as err, provenance.locating():
        raise original
    assert err.value.field == "tls.cert" and err.value.__cause__ is original
