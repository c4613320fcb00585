"""gateway.purpose: the purpose metadata contract (DPA 2018 s62), its encoding and its limits."""

from __future__ import annotations

import asyncio
import contextlib
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ConfigError, InvalidArgument
from gateway.pipeline import Call, Listener, PurposeStage
from gateway.principal import Purpose
from gateway.purpose import (
    PURPOSE_CASE_KEY,
    PURPOSE_CODE_KEY,
    PURPOSE_TEXT_KEY,
    PurposeConfig,
    decode_text,
    encode_text,
    parse_purpose,
    purpose_metadata,
)
from gateway.tomlconf import TomlFile

CONFIG = PurposeConfig(
    codes=("investigation", "safeguarding"), case_pattern=r"[A-Z0-9][A-Z0-9/_.-]*", max_case_len=20, max_text_len=50
)


def fields(**overrides: str | None) -> dict[str, str]:
    base = {PURPOSE_CODE_KEY: "investigation", PURPOSE_CASE_KEY: "OP-ORCHID-17", PURPOSE_TEXT_KEY: "Van sighting"}
    for key, value in overrides.items():
        name = {"code": PURPOSE_CODE_KEY, "case": PURPOSE_CASE_KEY, "text": PURPOSE_TEXT_KEY}.get(key, key)
        if value is None:
            del base[name]
        else:
            base[name] = value
    return base


def test_a_complete_purpose_parses() -> None:
    assert parse_purpose(fields(), CONFIG) == Purpose("investigation", "OP-ORCHID-17", "Van sighting")


def test_non_ascii_text_travels_percent_encoded() -> None:
    text = "Témoin à Guildford, 50% sûr"
    encoded = encode_text(text)
    assert encoded == "T%C3%A9moin %C3%A0 Guildford, 50%25 s%C3%BBr"
    assert parse_purpose(fields(text=encoded), CONFIG).text == text


def test_text_is_normalised_to_nfc_and_trimmed() -> None:
    decomposed = "Cafe\u0301 visit "  # e + combining acute
    assert parse_purpose(fields(text=encode_text(decomposed)), CONFIG).text == "Caf\u00e9 visit"


CASES = [
    ("missing code", fields(code=None), "psn-purpose-code missing"),
    ("missing case", fields(case=None), "psn-purpose-case missing"),
    ("missing text", fields(text=None), "psn-purpose-text missing"),
    ("no purpose at all", {}, "no purpose"),
    ("unknown code", fields(code="curiosity"), "'curiosity' is not one of this force's codes"),
    ("code in the wrong case", fields(code="Investigation"), "is not one of this force's codes"),
    ("unknown purpose key (typo)", {**fields(), "psn-purpose-txt": "x"}, "unknown purpose metadata key"),
    ("oversized case", fields(case="A" * 21), "over 20"),
    ("case with a space", fields(case="OP ORCHID"), "without spaces"),
    ("case off the pattern", fields(case="op-orchid"), "does not match the force's pattern"),
    ("oversized text", fields(text="x" * 51), "51 characters, over 50"),
    ("oversized multibyte text", fields(text=encode_text("é" * 51)), "over 50"),
    ("encoded text far too long", fields(text="x" * 601), "far over 50"),
    ("empty text", fields(text="   "), "under 1"),
    ("raw non-ASCII text", fields(text="café"), "printable ASCII"),
    ("newline in text", fields(text=encode_text("a\nforged log line")), "U+000A (category Cc)"),
    ("tab in text", fields(text="a\tb"), "printable ASCII"),
    ("bidi override", fields(text=encode_text("abc\u202edcba")), "RIGHT-TO-LEFT OVERRIDE"),
    ("zero-width space", fields(text=encode_text("a\u200bb")), "ZERO WIDTH SPACE"),
    ("line separator", fields(text=encode_text("a\u2028b")), "LINE SEPARATOR"),
    ("private use", fields(text=encode_text("a\ue000b")), "category Co"),
    ("bad percent escape", fields(text="100% sure"), "not followed by two hex digits"),
    ("truncated escape", fields(text="abc%C"), "not followed by two hex digits"),
    ("escape is not UTF-8", fields(text="caf%E9"), "not percent-encoded UTF-8"),
    ("overlong UTF-8", fields(text="%C0%AF"), "not percent-encoded UTF-8"),
    ("encoded NUL", fields(text="a%00b"), "U+0000"),
]


@pytest.mark.parametrize("name,given_fields,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_purposes_are_refused(name: str, given_fields: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_purpose(given_fields, CONFIG)
    assert reason in info.value.reason


def test_min_text_len_is_enforced() -> None:
    config = PurposeConfig(codes=("investigation",), min_text_len=10)
    with pytest.raises(InvalidArgument, match="under 10"):
        parse_purpose(fields(text="too short"), config)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))))
def test_encode_decode_round_trip(text: str) -> None:
    encoded = encode_text(text)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert decode_text(encoded, max_len=len(text) + 1) == unicodedata.normalize("NFC", text).strip(" ")


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_decode_never_raises_anything_but_invalid_argument(value: str) -> None:
    with contextlib.suppress(InvalidArgument):
        decode_text(value, max_len=100)


def test_purpose_metadata_is_what_parse_purpose_reads() -> None:
    purpose = Purpose("safeguarding", "INC/2291", "Welfare check — urgent")
    assert parse_purpose(dict(purpose_metadata(purpose)), CONFIG) == purpose


# -- configuration -------------------------------------------------------------------------


def _section(tmp_path: Path, body: str) -> object:
    path = tmp_path / "gateway.toml"
    path.write_text(body)
    return TomlFile.load(path).root().table("purpose")


def test_from_section(tmp_path: Path) -> None:
    sec = _section(tmp_path, '[purpose]\ncodes = ["investigation"]\nmax_text_len = 200\n')
    config = PurposeConfig.from_section(sec)  # type: ignore[arg-type]
    assert config.codes == ("investigation",) and config.max_text_len == 200


@pytest.mark.parametrize(
    "body,message",
    [
        ("max_text_len = 10", "required key is missing"),
        ("codes = []", "list is empty"),
        ('codes = ["Bad Code"]', "does not match"),
        ('codes = ["a"]\ncase_pattern = "[A-Z"', "not a regular expression"),
        ('codes = ["a"]\ncase_pattern = "[A-Z]*"', "matches an empty reference"),
        ('codes = ["a"]\nmin_text_len = 20\nmax_text_len = 10', "min_text_len <= max_text_len"),
        ('codes = ["a"]\ncodez = ["b"]', "unknown key"),
    ],
)
def test_from_section_refuses_bad_settings(tmp_path: Path, body: str, message: str) -> None:
    sec = _section(tmp_path, f"[purpose]\n{body}\n")
    with pytest.raises(ConfigError, match=message) as info:
        PurposeConfig.from_section(sec)  # type: ignore[arg-type]
    assert "gateway.toml" in str(info.value)


# -- the purpose stage's cache of parsed purposes ---------------------------------------------------


def _stage_call(fields: dict[str, str]) -> Any:
    call = Call(
        listener=Listener.LOCAL, method="/m", metadata=(), peer_certificate=None, started_at=0.0, started_mono=0.0
    )
    call.purpose_fields = fields
    return call


def test_the_purpose_stage_reuses_a_parsed_purpose_and_never_a_refusal() -> None:
    stage = PurposeStage(PurposeConfig(codes=("investigation",)))
    good = {"psn-purpose-code": "investigation", "psn-purpose-case": "OP-1", "psn-purpose-text": "a%20reason"}
    first, second = _stage_call(good), _stage_call(dict(good))
    asyncio.run(stage(first))
    asyncio.run(stage(second))
    assert first.purpose == second.purpose == Purpose("investigation", "OP-1", "a reason")
    assert first.purpose is second.purpose  # parsed once
    bad = {**good, "psn-purpose-code": "curiosity"}
    for _ in range(2):  # refused each time, with its reason: refusals are never cached
        with pytest.raises(InvalidArgument, match="not one of"):
            asyncio.run(stage(_stage_call(bad)))
    with pytest.raises(InvalidArgument, match="unknown purpose metadata key"):
        asyncio.run(stage(_stage_call({**good, "psn-purpose-extra": "x"})))


@given(st.text(max_size=200))
def test_encode_text_takes_its_shortcut_only_where_the_full_encoding_is_the_same(text: str) -> None:
    full = "".join(chr(b) if 0x20 <= b < 0x7F and b != ord("%") else f"%{b:02X}" for b in text.encode("utf-8"))
    assert encode_text(text) == full
