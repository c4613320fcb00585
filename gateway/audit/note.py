r"""C2SP signed notes, tlog checkpoints and tlog cosignatures, to the byte.

This module owns the text formats a force's log signs and its peers' witnesses cosign:

- c2sp.org/signed-note: a UTF-8 text ending in a newline, a blank line, then signature lines
  ``— <key name> base64(key id || signature)``; Ed25519 keys (type 0x01) with
  key id = SHA-256(name || 0x0A || type || public key)[:4], and verifier keys (vkeys)
  ``name+hex8(key id)+base64(type || public key)``.
- c2sp.org/tlog-checkpoint: the note body ``origin\nsize\nbase64(root)\n`` plus extension lines.
- c2sp.org/tlog-cosignature (Ed25519, type 0x04): the witness signs
  ``cosignature/v1\ntime <t>\n`` + checkpoint body; the signature is timestamp (8 bytes,
  big-endian) || Ed25519 signature.

Parsing is strict and bounded: at most `MAX_NOTE_BYTES` bytes, `MAX_TEXT_LINES` text lines and
`MAX_SIGNATURES` signature lines; base64 must be canonical, so one note has one spelling and a
parsed note re-serialises to the bytes it came from. Every malformed input raises `NoteError` and
nothing else. It does no I/O and holds no keys beyond the objects it is given; where keys live and
how they are loaded is the caller's business.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, Self, TypeGuard, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import InvalidArgument

__all__ = [
    "COSIGNATURE_HEADER",
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "MAX_TEXT_LINES",
    "SIG_TYPE_COSIGNATURE_V1",
    "SIG_TYPE_ED25519",
    "Checkpoint",
    "CosignatureSigner",
    "CosignatureVerifier",
    "Note",
    "NoteError",
    "NoteSignature",
    "NoteSigner",
    "NoteVerifier",
    "cosignature_message",
    "key_id",
    "parse_note",
    "parse_signature_lines",
    "sign_note",
    "verify_cosignature",
    "verify_note",
]

#: signed-note signature type of plain Ed25519 note signatures.
SIG_TYPE_ED25519 = 0x01
#: signed-note signature type of timestamped Ed25519 witness cosignatures (tlog-cosignature).
SIG_TYPE_COSIGNATURE_V1 = 0x04

#: The domain-separation header line of an Ed25519 cosignature's signed message.
COSIGNATURE_HEADER = b"cosignature/v1\n"

#: Largest note accepted, signatures included. Room for the 16 post-quantum signatures of up to
#: about 5 kB that signed-note asks verifiers to accept, and then some.
MAX_NOTE_BYTES = 128 * 1024
#: Most signature lines accepted in one note (signed-note: at least 16; Go's note package: 100).
MAX_SIGNATURES = 100
#: Most lines accepted in a note's text (a checkpoint has three plus any extensions).
MAX_TEXT_LINES = 256

_SIG_PREFIX = "\N{EM DASH} ".encode()
_ED25519_KEY_SIZE = 32
_ED25519_SIG_SIZE = 64
_COSIG_SIZE = 8 + _ED25519_SIG_SIZE
_MAX_TIMESTAMP = (1 << 63) - 1
_MAX_TREE_SIZE = (1 << 64) - 1
_ROOT_HASH_SIZE = 32

_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f]")
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,19})")
_HEX8 = re.compile(r"[0-9a-f]{8}")
# Go's unicode.IsSpace (the White_Space property), which signed-note names forbid; `str.isspace`
# alone misses none of these today, but the list pins the rule to the reference implementation.
_UNICODE_SPACES = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# The Ed25519 points of small order, by their canonical encodings (as libsodium lists them). A
# public key among them "verifies" signatures over many messages; no honest key is one.
_SMALL_ORDER_POINTS = frozenset(
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    )
)
_FIELD_PRIME = (1 << 255) - 19


class NoteError(InvalidArgument):
    """A note, checkpoint, signature or key is malformed, or a signature does not verify."""

    default_public = "invalid signed note"


# -- small checks ---------------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    """Decode standard, padded, canonical base64 (one spelling per byte string), else NoteError."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise NoteError(f"{what} is not valid base64") from exc
    if _b64encode(raw) != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw


def _is_valid_name(name: object) -> TypeGuard[str]:
    return (
        isinstance(name, str)
        and name != ""
        and "+" not in name
        and not any(c in _UNICODE_SPACES or c.isspace() or c < " " for c in name)
    )


def _check_name(name: object) -> str:
    if not _is_valid_name(name):
        raise NoteError(f"key name {name!r} is empty or contains a space, a '+' or a control character")
    return name


def _decode_text(data: bytes, what: str) -> str:
    """UTF-8 with no ASCII control character but newline (signed-note), else NoteError."""
    if not isinstance(data, bytes):
        raise NoteError(f"{what} must be bytes, not {type(data).__name__}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError(f"{what} is not valid UTF-8") from exc
    # In UTF-8 a byte below 0x20 is always that ASCII character, never part of a longer sequence.
    bad = _CONTROL.search(data)
    if bad is not None:
        raise NoteError(f"{what} contains the control character {bad.group()!r}")
    return text


def _check_body(body: bytes) -> None:
    """A note text that can be signed: bounded, UTF-8, no control characters, ends in a newline."""
    if not isinstance(body, bytes):
        raise NoteError(f"a note text must be bytes, not {type(body).__name__}")
    if len(body) > MAX_NOTE_BYTES:
        raise NoteError(f"note text is longer than {MAX_NOTE_BYTES} bytes")
    _decode_text(body, "note text")
    if not body.endswith(b"\n"):
        raise NoteError("note text does not end in a newline")
    if body.count(b"\n") > MAX_TEXT_LINES:
        raise NoteError(f"note text has more than {MAX_TEXT_LINES} lines")


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """Return the signed-note key id: SHA-256(name || 0x0A || type || public key)[:4]."""
    _check_name(name)
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([sig_type]) + public_key).digest()[:4]


def _check_public_key(raw: bytes) -> None:
    """Refuse Ed25519 keys no honest party has: non-canonical encodings and small-order points."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _FIELD_PRIME:
        raise NoteError("Ed25519 public key is not canonically encoded")
    if raw in _SMALL_ORDER_POINTS:
        raise NoteError("Ed25519 public key is a point of small order")


def _raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    if not isinstance(public_key, Ed25519PublicKey):
        raise NoteError(f"expected an Ed25519 public key, got {type(public_key).__name__}")
    raw = public_key.public_bytes_raw()
    _check_public_key(raw)
    return raw


def _vkey(name: str, sig_type: int, raw: bytes, kid: bytes) -> str:
    return f"{name}+{kid.hex()}+{_b64encode(bytes([sig_type]) + raw)}"


def _parse_vkey(vkey: object, sig_type: int) -> tuple[str, Ed25519PublicKey]:
    """Parse ``name+hex8(key id)+base64(type || key)`` for an Ed25519 key of `sig_type`."""
    if not isinstance(vkey, str) or len(vkey) > 1024:
        raise NoteError("a verifier key must be a string of at most 1024 characters")
    name, _, rest = vkey.partition("+")
    hex_id, _, key_b64 = rest.partition("+")
    if not _is_valid_name(name) or not _HEX8.fullmatch(hex_id) or not key_b64:
        raise NoteError(f"malformed verifier key {vkey!r}")
    material = _b64decode(key_b64, "verifier key material")
    if len(material) != 1 + _ED25519_KEY_SIZE or material[0] != sig_type:
        raise NoteError(f"verifier key {name!r} is not an Ed25519 key of signature type {sig_type:#04x}")
    raw = material[1:]
    _check_public_key(raw)
    if key_id(name, sig_type, raw) != bytes.fromhex(hex_id):
        raise NoteError(f"verifier key {name!r}: the key id does not match the key")
    return name, Ed25519PublicKey.from_public_bytes(raw)


# -- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a note: the key's name and id, and the signature bytes after the key id."""

    name: str
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.key_id, bytes) or len(self.key_id) != 4:
            raise NoteError("a key id is 4 bytes")
        if not isinstance(self.signature, bytes) or not self.signature:
            raise NoteError("a signature is at least one byte")

    def line(self) -> bytes:
        """Return the signature line: em dash, space, name, space, base64(key id || signature), newline."""
        return _SIG_PREFIX + f"{self.name} {_b64encode(self.key_id + self.signature)}\n".encode()


def _parse_signature_line(line: bytes) -> NoteSignature:
    if not line.startswith(_SIG_PREFIX):
        raise NoteError("a signature line does not start with an em dash and a space")
    try:
        rest = line[len(_SIG_PREFIX) :].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError("a signature line is not valid UTF-8") from exc
    name, _, sig_b64 = rest.partition(" ")
    if not _is_valid_name(name) or not sig_b64:
        raise NoteError("a signature line has a bad key name or no signature")
    raw = _b64decode(sig_b64, "a signature")
    if len(raw) < 5:
        raise NoteError("a signature is shorter than a key id and one byte")
    return NoteSignature(name, raw[:4], raw[4:])


def parse_signature_lines(data: bytes) -> tuple[NoteSignature, ...]:
    """Parse a block of one or more signature lines (a tlog-witness add-checkpoint response)."""
    _decode_text(data, "signature lines")
    if len(data) > MAX_NOTE_BYTES:
        raise NoteError(f"signature lines are longer than {MAX_NOTE_BYTES} bytes")
    if not data.endswith(b"\n"):
        raise NoteError("signature lines do not end in a newline")
    lines = data[:-1].split(b"\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"more than {MAX_SIGNATURES} signatures")
    return tuple(_parse_signature_line(line) for line in lines)


@dataclass(frozen=True)
class Note:
    """A signed note: its text (the body, ending in a newline) and one or more signatures."""

    body: bytes
    signatures: tuple[NoteSignature, ...]

    def __post_init__(self) -> None:
        _check_body(self.body)
        signatures = tuple(self.signatures)
        object.__setattr__(self, "signatures", signatures)
        if not signatures:
            raise NoteError("a signed note has at least one signature")
        if len(signatures) > MAX_SIGNATURES:
            raise NoteError(f"a note has at most {MAX_SIGNATURES} signatures")
        if not all(isinstance(s, NoteSignature) for s in signatures):
            raise NoteError("note signatures must be NoteSignature values")
        if len(self.text()) > MAX_NOTE_BYTES:
            raise NoteError(f"signed note is longer than {MAX_NOTE_BYTES} bytes")

    def text(self) -> bytes:
        """Return the note as signed-note text: body, a blank line, the signature lines."""
        return self.body + b"\n" + b"".join(s.line() for s in self.signatures)

    def with_signatures(self, signatures: Iterable[NoteSignature]) -> Note:
        """Return this note with `signatures` added after its own, skipping exact duplicates."""
        merged = list(self.signatures)
        for sig in signatures:
            if sig not in merged:
                merged.append(sig)
        return Note(self.body, tuple(merged))


def parse_note(text: bytes) -> Note:
    """Parse signed-note text strictly; raise NoteError on anything malformed.

    Parsing does not verify: use `verify_note` with the keys you trust before reading the body.
    """
    if not isinstance(text, bytes):
        raise NoteError(f"a note must be bytes, not {type(text).__name__}")
    if len(text) > MAX_NOTE_BYTES:  # before any decoding: hostile input costs nothing
        raise NoteError(f"note is longer than {MAX_NOTE_BYTES} bytes")
    _decode_text(text, "note")
    # The text is separated from the signatures by the last blank line.
    split = text.rfind(b"\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    body, sig_block = text[: split + 1], text[split + 2 :]
    if not sig_block or not sig_block.endswith(b"\n"):
        raise NoteError("note has no signature lines, or they do not end in a newline")
    if sig_block.count(b"\n") > MAX_SIGNATURES:
        raise NoteError(f"note has more than {MAX_SIGNATURES} signatures")
    signatures = tuple(_parse_signature_line(line) for line in sig_block[:-1].split(b"\n"))
    return Note(body, signatures)


# -- checkpoints ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A tlog-checkpoint note body: the log's origin, its tree size and root hash, and extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", tuple(self.extensions))
        for what, line in (("origin", self.origin), *(("extension line", e) for e in self.extensions)):
            if not isinstance(line, str) or not line or any(c < " " for c in line):
                raise NoteError(f"checkpoint {what} {line!r} is empty or contains a control character")
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise NoteError(f"checkpoint {what} {line!r} is not encodable as UTF-8") from exc
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 0 <= self.size <= _MAX_TREE_SIZE:
            raise NoteError(f"checkpoint tree size {self.size!r} is not a uint64")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != _ROOT_HASH_SIZE:
            raise NoteError(f"checkpoint root hash is not {_ROOT_HASH_SIZE} bytes")
        if len(self.extensions) + 3 > MAX_TEXT_LINES:
            raise NoteError(f"checkpoint has more than {MAX_TEXT_LINES} lines")

    def body(self) -> bytes:
        """Return the note text: origin, size, base64 root hash and extension lines, each ending in a newline."""
        lines = [self.origin, str(self.size), _b64encode(self.root_hash), *self.extensions]
        return "".join(line + "\n" for line in lines).encode("utf-8")

    @classmethod
    def parse(cls, body: bytes) -> Checkpoint:
        """Parse a checkpoint note text strictly; raise NoteError on anything malformed."""
        _check_body(body)
        lines = body.decode("utf-8")[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("a checkpoint has at least three lines")
        origin, size_text, root_text, *extensions = lines
        if not _DECIMAL.fullmatch(size_text):
            raise NoteError(f"checkpoint tree size {size_text!r} is not a decimal without leading zeroes")
        root = _b64decode(root_text, "checkpoint root hash")
        checkpoint = cls(origin, int(size_text), root, tuple(extensions))
        # Unreachable while the checks above hold; kept so that one spelling per checkpoint does not
        # rest on any single check.
        if checkpoint.body() != body:  # pragma: no cover
            raise NoteError("checkpoint does not re-encode to the same bytes")
        return checkpoint


# -- Ed25519 note signatures ----------------------------------------------------------------------


class _VerifierKey:
    """A named Ed25519 public key of one signed-note signature type: what the two verifiers share."""

    _SIG_TYPE: ClassVar[int]

    def __init__(self, name: str, public_key: Ed25519PublicKey) -> None:
        self._name = _check_name(name)
        self._public_key = public_key
        self._raw = _raw_public_key(public_key)
        self._key_id = key_id(name, self._SIG_TYPE, self._raw)

    @classmethod
    def from_vkey(cls, vkey: str) -> Self:
        """Build a verifier from ``name+hex8(key id)+base64(type || public key)``."""
        name, public_key = _parse_vkey(vkey, cls._SIG_TYPE)
        return cls(name, public_key)

    @property
    def name(self) -> str:
        """The key name."""
        return self._name

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id."""
        return self._key_id

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The Ed25519 public key."""
        return self._public_key

    def vkey(self) -> str:
        """Return the verifier key string, ``name+hex8(key id)+base64(type || public key)``."""
        return _vkey(self._name, self._SIG_TYPE, self._raw, self._key_id)

    def matches(self, sig: NoteSignature) -> bool:
        """True if `sig` claims to be by this key (same name and key id)."""
        return sig.name == self._name and sig.key_id == self._key_id


class NoteVerifier(_VerifierKey):
    """Verifies Ed25519 note signatures (signed-note type 0x01) by one named key."""

    _SIG_TYPE = SIG_TYPE_ED25519

    def verify(self, body: bytes, sig: NoteSignature) -> None:
        """Check that `sig` is this key's valid signature over `body`; raise NoteError if not."""
        if not self.matches(sig):
            raise NoteError(
                f"signature by {sig.name}+{sig.key_id.hex()} is not by key {self._name}+{self._key_id.hex()}"
            )
        if len(sig.signature) != _ED25519_SIG_SIZE:
            raise NoteError(f"signature by {self._name} is not {_ED25519_SIG_SIZE} bytes")
        try:
            self._public_key.verify(sig.signature, body)
        except InvalidSignature as exc:
            raise NoteError(f"invalid signature by key {self._name}+{self._key_id.hex()}") from exc


_V = TypeVar("_V", bound=_VerifierKey)


class _SignerKey(Generic[_V]):
    """A named Ed25519 private key and its verifier: what the two signers share."""

    _VERIFIER: type[_V]

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise NoteError(f"expected an Ed25519 private key, got {type(private_key).__name__}")
        self._name = _check_name(name)
        self._private_key = private_key
        self._verifier = self._VERIFIER(name, private_key.public_key())

    @property
    def name(self) -> str:
        """The key name."""
        return self._name

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id."""
        return self._verifier.key_id

    def vkey(self) -> str:
        """Return the verifier key string peers configure to check this signer."""
        return self._verifier.vkey()

    def verifier(self) -> _V:
        """Return the matching verifier."""
        return self._verifier


class NoteSigner(_SignerKey[NoteVerifier]):
    """Signs notes with an Ed25519 key (signed-note type 0x01) under a key name."""

    _VERIFIER = NoteVerifier

    def sign(self, body: bytes) -> NoteSignature:
        """Sign a note text (which must end in a newline)."""
        _check_body(body)
        return NoteSignature(self._name, self.key_id, self._private_key.sign(body))


# -- Ed25519 cosignatures (tlog-cosignature) ------------------------------------------------------


def cosignature_message(checkpoint_body: bytes, timestamp: int) -> bytes:
    """Return the message an Ed25519 cosignature signs: header, ``time <t>`` line, checkpoint body."""
    _check_timestamp(timestamp)
    return COSIGNATURE_HEADER + f"time {timestamp}\n".encode("ascii") + checkpoint_body


def _check_timestamp(timestamp: int) -> None:
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise NoteError(f"cosignature timestamp {timestamp!r} is outside 0..2**63-1")


class CosignatureVerifier(_VerifierKey):
    """Verifies a witness's timestamped Ed25519 cosignatures (signed-note type 0x04)."""

    _SIG_TYPE = SIG_TYPE_COSIGNATURE_V1

    def verify(self, checkpoint_body: bytes, sig: NoteSignature) -> int:
        """Check the cosignature over `checkpoint_body`; return its timestamp, or raise NoteError."""
        if not self.matches(sig):
            raise NoteError(
                f"signature by {sig.name}+{sig.key_id.hex()} is not by cosigner {self._name}+{self._key_id.hex()}"
            )
        if len(sig.signature) != _COSIG_SIZE:
            raise NoteError(f"cosignature by {self._name} is not {_COSIG_SIZE} bytes")
        timestamp = int.from_bytes(sig.signature[:8], "big")
        message = cosignature_message(checkpoint_body, timestamp)
        try:
            self._public_key.verify(sig.signature[8:], message)
        except InvalidSignature as exc:
            raise NoteError(f"invalid cosignature by {self._name}+{self._key_id.hex()}") from exc
        return timestamp


class CosignatureSigner(_SignerKey[CosignatureVerifier]):
    """A witness's Ed25519 cosigning key (signed-note type 0x04)."""

    _VERIFIER = CosignatureVerifier

    def cosign(self, checkpoint_body: bytes, timestamp: int) -> NoteSignature:
        """Cosign a checkpoint body at `timestamp` (POSIX seconds).

        The body must parse as a checkpoint: a witness never puts its name to anything else.
        """
        Checkpoint.parse(checkpoint_body)
        signature = self._private_key.sign(cosignature_message(checkpoint_body, timestamp))
        return NoteSignature(self._name, self.key_id, timestamp.to_bytes(8, "big") + signature)


# -- signing and verifying whole notes ------------------------------------------------------------


def sign_note(body: bytes, signers: Sequence[NoteSigner | CosignatureSigner], *, timestamp: int | None = None) -> Note:
    """Sign `body` with every signer, in order; cosigners need `timestamp`."""
    if not signers:
        raise NoteError("a note needs at least one signer")
    _check_body(body)
    signatures: list[NoteSignature] = []
    for signer in signers:
        if isinstance(signer, CosignatureSigner):
            if timestamp is None:
                raise NoteError(f"cosigner {signer.name} needs a timestamp")
            signatures.append(signer.cosign(body, timestamp))
        elif isinstance(signer, NoteSigner):
            signatures.append(signer.sign(body))
        else:
            raise NoteError(f"not a note signer: {type(signer).__name__}")
    return Note(body, tuple(signatures))


def verify_note(note: Note, verifier: NoteVerifier) -> None:
    """Check that `note` carries at least one valid signature by `verifier`'s key; raise NoteError if not.

    Signatures by other keys are ignored (signed-note: verifiers MUST ignore unknown keys). A
    signature that claims to be by this key and fails rejects the whole note, and each distinct
    signature is checked once, so a hostile note costs at most `MAX_SIGNATURES` verifications.
    """
    checked: set[bytes] = set()
    for sig in note.signatures:
        if verifier.matches(sig) and sig.signature not in checked:
            verifier.verify(note.body, sig)
            checked.add(sig.signature)
    if not checked:
        raise NoteError(f"note has no signature by key {verifier.name}+{verifier.key_id.hex()}")


def verify_cosignature(note: Note, verifier: CosignatureVerifier) -> int:
    """Check that `note` carries a valid cosignature by `verifier`; return its latest timestamp.

    As in `verify_note`, any cosignature claiming to be by this cosigner must verify.
    """
    timestamps: dict[bytes, int] = {}
    for sig in note.signatures:
        if verifier.matches(sig) and sig.signature not in timestamps:
            timestamps[sig.signature] = verifier.verify(note.body, sig)
    if not timestamps:
        raise NoteError(f"note has no cosignature by {verifier.name}+{verifier.key_id.hex()}")
    return max(timestamps.values())
