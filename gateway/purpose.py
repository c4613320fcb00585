"""Purpose: why an officer makes a call (DPA 2018 s62), parsed from metadata.

Every call carries three metadata entries, all required:

==================== ===================================================================
key                  value
==================== ===================================================================
``psn-purpose-code`` a justification code from the force's configured list
                     (``[purpose] codes``), exactly as listed (e.g. ``investigation``)
``psn-purpose-case`` the case or incident reference: printable ASCII without spaces,
                     at most ``max_case_len`` characters, matching ``case_pattern``
``psn-purpose-text`` free text, ``min_text_len`` to ``max_text_len`` characters,
                     **percent-encoded UTF-8** (below)
==================== ===================================================================

gRPC metadata values that are not ``-bin`` must be printable ASCII (0x20-0x7E),
so the free text travels percent-encoded: its UTF-8 bytes are sent as they are
when printable ASCII other than ``%``, and as ``%XX`` (two hex digits) otherwise,
as gRPC itself encodes ``grpc-message``: ``Met at the café, 50% sure`` is sent
as ``Met at the caf%C3%A9, 50%25 sure``. `encode_text` does it for clients (`gateway.client`
uses it). The gateway decodes strictly: a ``%`` not followed by two hex digits,
bytes that are not UTF-8, or characters that could hide or forge text in the
audit log (control characters including newlines and tabs, bidirectional
overrides and other format characters, line and paragraph separators,
surrogates, private-use or unassigned code points) are refused. Text is
normalised to NFC; leading and trailing spaces are removed.

Any other key starting ``psn-purpose-`` is refused (a typo must not drop the
purpose silently). Every refusal is `InvalidArgument` with the precise reason.

Owns: the purpose metadata contract and its validation. Does not own: finding
these keys among the call's metadata (`gateway.metadata`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import ConfigError, InvalidArgument
from gateway.principal import Purpose
from gateway.tomlconf import Section

__all__ = [
    "PURPOSE_CASE_KEY",
    "PURPOSE_CODE_KEY",
    "PURPOSE_KEYS",
    "PURPOSE_PREFIX",
    "PURPOSE_TEXT_KEY",
    "PurposeConfig",
    "check_carried",
    "decode_text",
    "encode_text",
    "parse_purpose",
    "purpose_metadata",
]

PURPOSE_PREFIX = "psn-purpose-"
PURPOSE_CODE_KEY = "psn-purpose-code"
PURPOSE_CASE_KEY = "psn-purpose-case"
PURPOSE_TEXT_KEY = "psn-purpose-text"
PURPOSE_KEYS = (PURPOSE_CODE_KEY, PURPOSE_CASE_KEY, PURPOSE_TEXT_KEY)

_CODE_PATTERN = r"[a-z][a-z0-9-]{0,31}"
#: the bounds of the configurable limits (`PurposeConfig`): no force's gateway sends more
_MAX_CASE_LEN = 256
_MAX_TEXT_LEN = 4000
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_CASE_CHARS = re.compile(r"[\x21-\x7e]+")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: Unicode categories refused in free text: controls, format (bidi overrides,
#: zero-width), surrogates, private use, unassigned, line/paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SAFE_BYTES = frozenset(range(0x20, 0x7F)) - {ord("%")}
#: text made only of `_SAFE_BYTES` (it encodes to itself)
_UNRESERVED = re.compile(r"[\x20-\x24\x26-\x7e]*")


@dataclass(frozen=True)
class PurposeConfig:
    """The force's purpose rules (the ``[purpose]`` table).

    Example::

        [purpose]
        codes = ["investigation", "intelligence", "safeguarding", "prosecution"]
        case_pattern = "[A-Z0-9][A-Z0-9/._:-]*"
        max_case_len = 64
        min_text_len = 10
        max_text_len = 500
    """

    codes: tuple[str, ...]
    case_pattern: str = r"[A-Za-z0-9][A-Za-z0-9/._:-]*"
    max_case_len: int = 64
    max_text_len: int = 500
    min_text_len: int = 1

    def __post_init__(self) -> None:
        if not self.codes:
            raise ConfigError("no justification codes configured: every call would be refused", field="purpose.codes")
        for code in self.codes:
            if not re.fullmatch(_CODE_PATTERN, code):
                raise ConfigError(f"code {code!r} does not match {_CODE_PATTERN}", field="purpose.codes")
        try:
            empty_ok = re.fullmatch(self.case_pattern, "") is not None
        except re.error as exc:
            raise ConfigError(f"case_pattern is not a regular expression: {exc}", field="purpose.case_pattern") from exc
        if empty_ok:
            raise ConfigError("case_pattern matches an empty reference", field="purpose.case_pattern")
        if not 1 <= self.max_case_len <= _MAX_CASE_LEN:
            raise ConfigError(f"max_case_len must be 1 to {_MAX_CASE_LEN}", field="purpose.max_case_len")
        if not 1 <= self.min_text_len <= self.max_text_len <= _MAX_TEXT_LEN:
            raise ConfigError(
                f"need 1 <= min_text_len <= max_text_len <= {_MAX_TEXT_LEN}", field="purpose.max_text_len"
            )

    @classmethod
    def from_section(cls, sec: Section) -> PurposeConfig:
        """Parse the ``[purpose]`` table (``codes`` is required: no default list of reasons)."""
        d = cls(codes=("x",))
        values = {
            "codes": sec.text_list("codes", pattern=_CODE_PATTERN, non_empty=True),
            "case_pattern": sec.text("case_pattern", d.case_pattern, max_len=512),
            "max_case_len": sec.integer("max_case_len", d.max_case_len, minimum=1, maximum=_MAX_CASE_LEN),
            "max_text_len": sec.integer("max_text_len", d.max_text_len, minimum=1, maximum=_MAX_TEXT_LEN),
            "min_text_len": sec.integer("min_text_len", d.min_text_len, minimum=1, maximum=_MAX_TEXT_LEN),
        }
        try:
            out = cls(**values)
        except ConfigError as exc:
            sec.fail((exc.field or "").removeprefix("purpose.") or None, exc.message)
        sec.finish()
        return out

    def case_matches(self, reference: str) -> bool:
        """Whether `reference` matches the configured case pattern."""
        return re.fullmatch(self.case_pattern, reference) is not None  # re caches the compiled pattern


def encode_text(text: str) -> str:
    """Percent-encode free text for a gRPC ASCII metadata value (UTF-8, ``%XX``)."""
    if _UNRESERVED.fullmatch(text):  # the common case: nothing to encode
        return text
    return "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in text.encode("utf-8"))


def decode_text(value: str, *, max_len: int) -> str:
    """Decode percent-encoded UTF-8 free text and check its characters; `InvalidArgument` if bad."""
    if len(value) > 12 * max_len:  # a character is at most 4 UTF-8 bytes, each at most 3 characters
        raise InvalidArgument(f"{PURPOSE_TEXT_KEY} is {len(value)} characters encoded, far over {max_len}")
    if not _PRINTABLE.fullmatch(value):
        raise InvalidArgument(f"{PURPOSE_TEXT_KEY} must be printable ASCII (percent-encode other UTF-8)")
    if _BAD_PERCENT.search(value):
        raise InvalidArgument(f"{PURPOSE_TEXT_KEY} has a '%' not followed by two hex digits")
    raw = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value).encode("latin-1")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{PURPOSE_TEXT_KEY} is not percent-encoded UTF-8 ({exc.reason})") from exc
    _check_characters(text, PURPOSE_TEXT_KEY)
    return unicodedata.normalize("NFC", text).strip(" ")


def _check_characters(text: str, what: str) -> None:
    for ch in text:
        category = unicodedata.category(ch)
        if category in _REFUSED_CATEGORIES:
            name = unicodedata.name(ch, f"U+{ord(ch):04X}")
            raise InvalidArgument(f"{what} contains a refused character {name} (category {category})")


def check_carried(purpose: Purpose) -> None:
    """Check a purpose carried in a request envelope by the rules every force's gateway keeps; `InvalidArgument`.

    The origin checked it against its own force's codes and case pattern (`parse_purpose`); the
    host cannot know those, but refuses what no gateway would have sent: a code outside the codes'
    syntax, a case reference that is not printable ASCII without spaces or is over 256
    characters, and free text of 1 to 4,000 characters with a refused character, not in NFC or
    with spaces around it. They go into the host's audit record and the backend's headers.
    """
    if not re.fullmatch(_CODE_PATTERN, purpose.justification):
        raise InvalidArgument(f"justification code {purpose.justification[:40]!r} is not a code ({_CODE_PATTERN})")
    case = purpose.case_reference
    if len(case) > _MAX_CASE_LEN or not _CASE_CHARS.fullmatch(case):
        raise InvalidArgument(f"case reference must be 1 to {_MAX_CASE_LEN} characters of printable ASCII, no spaces")
    text = purpose.text
    if not 1 <= len(text) <= _MAX_TEXT_LEN:
        raise InvalidArgument(f"purpose text is {len(text)} characters, not 1 to {_MAX_TEXT_LEN}")
    _check_characters(text, "purpose text")
    if unicodedata.normalize("NFC", text).strip(" ") != text:
        raise InvalidArgument("purpose text is not in NFC, or has spaces around it")


def parse_purpose(fields: Mapping[str, str], config: PurposeConfig) -> Purpose:
    """The purpose from the call's ``psn-purpose-*`` entries; `InvalidArgument` with the precise reason."""
    unknown = sorted(k for k in fields if k not in PURPOSE_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown purpose metadata key {unknown[0]!r} (known: {', '.join(PURPOSE_KEYS)})")
    missing = [k for k in PURPOSE_KEYS if k not in fields]
    if missing:
        raise InvalidArgument(f"no purpose: metadata {', '.join(missing)} missing (DPA 2018 s62 needs all three)")
    for key in PURPOSE_KEYS:
        if not isinstance(fields[key], str):
            raise InvalidArgument(f"{key} must be a text value")

    code = fields[PURPOSE_CODE_KEY]
    if code not in config.codes:
        shown = code if len(code) <= 40 and _PRINTABLE.fullmatch(code) else code[:40].encode("unicode_escape").decode()
        raise InvalidArgument(f"justification code {shown!r} is not one of this force's codes")

    case = fields[PURPOSE_CASE_KEY]
    if len(case) > config.max_case_len:
        raise InvalidArgument(f"{PURPOSE_CASE_KEY} is {len(case)} characters, over {config.max_case_len}")
    if not _CASE_CHARS.fullmatch(case):
        raise InvalidArgument(f"{PURPOSE_CASE_KEY} must be printable ASCII without spaces")
    if not config.case_matches(case):
        raise InvalidArgument(f"case reference {case!r} does not match the force's pattern {config.case_pattern}")

    text = decode_text(fields[PURPOSE_TEXT_KEY], max_len=config.max_text_len)
    if len(text) > config.max_text_len:
        raise InvalidArgument(f"{PURPOSE_TEXT_KEY} is {len(text)} characters, over {config.max_text_len}")
    if len(text) < config.min_text_len:
        raise InvalidArgument(f"{PURPOSE_TEXT_KEY} is {len(text)} characters, under {config.min_text_len}")
    return Purpose(justification=code, case_reference=case, text=text)


def purpose_metadata(purpose: Purpose) -> tuple[tuple[str, str], ...]:
    """The three metadata entries that carry `purpose` (text percent-encoded)."""
    return (
        (PURPOSE_CODE_KEY, purpose.justification),
        (PURPOSE_CASE_KEY, purpose.case_reference),
        (PURPOSE_TEXT_KEY, encode_text(purpose.text)),
    )
