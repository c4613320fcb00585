"""C2SP signed notes, checkpoints and cosignatures: the reference vectors, the spec examples, attacks.

Byte-exact vectors: the PeterNeumann / EnochRoot keys and notes of golang.org/x/mod/sumdb/note's
note_test.go (the reference implementation of signed notes), and the examples printed in the C2SP
signed-note, tlog-checkpoint, tlog-cosignature and tlog-witness specifications.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.audit import note as note_module
from gateway.audit.note import (
    MAX_NOTE_BYTES,
    MAX_SIGNATURES,
    MAX_TEXT_LINES,
    SIG_TYPE_COSIGNATURE_V1,
    SIG_TYPE_ED25519,
    Checkpoint,
    CosignatureSigner,
    CosignatureVerifier,
    Note,
    NoteError,
    NoteSignature,
    NoteSigner,
    NoteVerifier,
    cosignature_message,
    key_id,
    parse_note,
    parse_signature_lines,
    sign_note,
    verify_cosignature,
    verify_note,
)
from gateway.errors import InvalidArgument

# -- golang.org/x/mod/sumdb/note note_test.go -----------------------------------------------------

PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = b"If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = (
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
).encode()
ENOCH_SIG = (
    "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
).encode()


def _peter_signer() -> NoteSigner:
    material = base64.b64decode(PETER_SKEY.split("+", 4)[4])
    assert material[0] == SIG_TYPE_ED25519
    return NoteSigner("PeterNeumann", Ed25519PrivateKey.from_private_bytes(material[1:]))


def _key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


def test_signing_reproduces_the_go_note_byte_for_byte() -> None:
    signer = _peter_signer()
    assert signer.vkey() == PETER_VKEY
    assert signer.key_id.hex() == "c74f20a3"
    assert sign_note(TEXT, [signer]).text() == TEXT + b"\n" + PETER_SIG


def test_the_go_note_parses_round_trips_and_verifies() -> None:
    text = TEXT + b"\n" + PETER_SIG + ENOCH_SIG
    note = parse_note(text)
    assert note.body == TEXT
    assert [(s.name, s.key_id.hex()) for s in note.signatures] == [
        ("PeterNeumann", "c74f20a3"),
        ("EnochRoot", "af0cfe78"),
    ]
    assert note.text() == text
    verify_note(note, NoteVerifier.from_vkey(PETER_VKEY))  # EnochRoot's signature is ignored: unknown key
    verify_note(note, NoteVerifier.from_vkey(ENOCH_VKEY))


def test_a_note_without_a_signature_by_the_key_is_refused() -> None:
    note = parse_note(TEXT + b"\n" + ENOCH_SIG)
    with pytest.raises(NoteError, match="no signature by key PeterNeumann"):
        verify_note(note, NoteVerifier.from_vkey(PETER_VKEY))


def test_a_changed_text_is_refused() -> None:
    note = parse_note(TEXT.replace(b"cryptography", b"cryptographY") + b"\n" + PETER_SIG)
    with pytest.raises(NoteError, match="invalid signature"):
        verify_note(note, NoteVerifier.from_vkey(PETER_VKEY))


def test_an_invalid_signature_by_the_key_is_refused() -> None:
    """Go: four base64 characters inserted into PeterNeumann's signature."""
    bad = PETER_SIG[:60] + b"ABCD" + PETER_SIG[60:]
    with pytest.raises(NoteError):
        verify_note(parse_note(TEXT + b"\n" + bad), NoteVerifier.from_vkey(PETER_VKEY))


def test_one_bad_signature_by_the_key_rejects_the_whole_note() -> None:
    """signed-note: if a signature from a known key fails, clients SHOULD reject the whole note."""
    bad_enoch = ENOCH_SIG[:60] + b"ABCD" + ENOCH_SIG[60:]
    text = TEXT + b"\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + bad_enoch
    note = parse_note(text)
    verify_note(note, NoteVerifier.from_vkey(PETER_VKEY))  # duplicates of a good one are fine
    with pytest.raises(NoteError):
        verify_note(note, NoteVerifier.from_vkey(ENOCH_VKEY))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(TEXT, id="no-signatures"),
        pytest.param(TEXT + b"\n", id="blank-line-only"),
        pytest.param(TEXT + b"\n" + PETER_SIG[:-1], id="no-final-newline"),
        pytest.param(b"\x01" + TEXT + b"\n" + PETER_SIG, id="control-character"),
        pytest.param(b"\xff" + TEXT + b"\n" + PETER_SIG, id="invalid-utf8"),
        pytest.param(
            TEXT
            + b"\n"
            + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZ"
            "b6KE6RyyBwJnAM=".encode(),
            id="space-in-name",
        ),
        pytest.param(TEXT + b"\n" + PETER_SIG + b"Unexpected line.\n", id="unexpected-line"),
        # further cases of ours
        pytest.param(TEXT + b"\n" + PETER_SIG.replace("—".encode(), b"-"), id="hyphen-not-em-dash"),
        pytest.param(TEXT + b"\n" + PETER_SIG.replace(b"\xe2\x80\x94 ", "—\u00a0".encode()), id="nbsp-after-dash"),
        pytest.param(TEXT + b"\n" + PETER_SIG.replace(b"PeterNeumann", b"Peter+Neumann"), id="plus-in-name"),
        pytest.param(TEXT + b"\n" + PETER_SIG.replace(b"PeterNeumann", "Peter\u2003Neumann".encode()), id="em-space"),
        pytest.param(TEXT + b"\n" + PETER_SIG.replace(b"PeterNeumann ", b" "), id="empty-name"),
        pytest.param(TEXT + b"\n" + PETER_SIG.replace(b"AM=", b"AN="), id="non-canonical-base64"),
        pytest.param(TEXT + b"\n" + PETER_SIG.replace(b"AM=", b"AM"), id="unpadded-base64"),
        pytest.param(TEXT + b"\n" + PETER_SIG.replace(b"=\n", b"=\r\n"), id="crlf"),
        pytest.param(TEXT + b"\n" + "— PeterNeumann x08g\n".encode(), id="signature-under-5-bytes"),
        pytest.param(TEXT + b"\n" + "— PeterNeumann \n".encode(), id="empty-signature"),
        pytest.param(TEXT + b"\n" + "— PeterNeumann\n".encode(), id="no-signature-field"),
        pytest.param(TEXT + b"\n" + PETER_SIG.replace(b" x08", b"  x08"), id="two-spaces"),
        pytest.param(TEXT + b"\n" + PETER_SIG.replace(b"\n", b" \n"), id="trailing-space"),
        pytest.param(TEXT + b"\n\n" + PETER_SIG, id="empty-line-first-in-signatures"),
        pytest.param(TEXT + b"\n" + PETER_SIG + b"\n", id="blank-line-after-signatures"),
        pytest.param(b"", id="empty"),
    ],
)
def test_malformed_notes_are_refused(text: bytes) -> None:
    with pytest.raises(NoteError):
        verify_note(parse_note(text), NoteVerifier.from_vkey(PETER_VKEY))


def test_signature_count_limit() -> None:
    """Go refuses a note with 101 signatures; signed-note requires accepting at least 16."""
    assert 16 <= MAX_SIGNATURES == 100
    verify_note(parse_note(TEXT + b"\n" + PETER_SIG * MAX_SIGNATURES), NoteVerifier.from_vkey(PETER_VKEY))
    with pytest.raises(NoteError, match="more than 100 signatures"):
        parse_note(TEXT + b"\n" + PETER_SIG * (MAX_SIGNATURES + 1))


def test_size_and_line_limits() -> None:
    signer = _peter_signer()
    many_lines = b"x\n" * MAX_TEXT_LINES
    verify_note(parse_note(sign_note(many_lines, [signer]).text()), signer.verifier())
    with pytest.raises(NoteError, match="lines"):
        sign_note(many_lines + b"x\n", [signer])
    over = many_lines + b"x\n"
    with pytest.raises(NoteError, match="lines"):
        parse_note(over + b"\n" + signer.sign(b"x\n").line())
    with pytest.raises(NoteError, match="longer than"):
        parse_note(b"y" * MAX_NOTE_BYTES + b"\n\n" + PETER_SIG)
    with pytest.raises(NoteError, match="longer than"):
        signer.sign(b"y" * MAX_NOTE_BYTES + b"\n")


def test_each_layer_names_its_refusal() -> None:
    """Checks that a later check would back up still refuse on their own (and say why)."""
    signer = _peter_signer()
    body = b"z" * (MAX_NOTE_BYTES - 200) + b"\n"
    sig_line = signer.sign(body).line()
    with pytest.raises(NoteError, match=r"^note is longer than"):  # the whole note, before decoding it
        parse_note(body + b"\n" + sig_line * 3)
    with pytest.raises(NoteError, match="signed note is longer than"):
        Note(body, (signer.sign(body),) * 3)
    with pytest.raises(NoteError, match="do not end in a newline"):
        parse_note(TEXT + b"\n" + PETER_SIG[:-1])
    with pytest.raises(NoteError, match="decimal without leading zeroes"):
        Checkpoint.parse(b"o\n05\n" + ROOT_B64 + b"\n")
    with pytest.raises(NoteError, match="decimal without leading zeroes"):
        Checkpoint.parse("o\n\u0665\n".encode() + ROOT_B64 + b"\n")


def test_verification_work_is_bounded_by_distinct_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = NoteVerifier.from_vkey(PETER_VKEY)
    calls = []
    real_verify = verifier.verify

    def counting_verify(body: bytes, sig: NoteSignature) -> None:
        calls.append(sig)
        real_verify(body, sig)

    monkeypatch.setattr(verifier, "verify", counting_verify)
    verify_note(parse_note(TEXT + b"\n" + PETER_SIG * 50 + ENOCH_SIG * 50), verifier)
    assert len(calls) == 1


# -- verifier keys --------------------------------------------------------------------------------


def test_vkey_manglings_are_refused() -> None:
    """Go's TestNewVerifier: every proper substring and every single-byte change of a vkey is refused."""
    NoteVerifier.from_vkey(PETER_VKEY)
    b = PETER_VKEY.encode()
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(NoteError):
                    NoteVerifier.from_vkey(b[i:j].decode())
    for i in range(len(b)):
        mangled = bytearray(b)
        mangled[i] += 1
        with pytest.raises(NoteError):
            NoteVerifier.from_vkey(mangled.decode())
    for bad in (
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",  # wrong key length, id adjusted
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # unknown algorithm, id adjusted
        PETER_VKEY.replace("c74f20a3", "C74F20A3"),  # we accept only Go's lower-case spelling
    ):
        with pytest.raises(NoteError):
            NoteVerifier.from_vkey(bad)


def test_vkeys_are_typed() -> None:
    cosigner = CosignatureSigner("witness.example/w1", _key("w1"))
    assert CosignatureVerifier.from_vkey(cosigner.vkey()).key_id == cosigner.key_id
    with pytest.raises(NoteError, match="signature type 0x04"):
        CosignatureVerifier.from_vkey(PETER_VKEY)
    with pytest.raises(NoteError, match="signature type 0x01"):
        NoteVerifier.from_vkey(cosigner.vkey())


def test_key_id_derivation() -> None:
    """key id = SHA-256(name || 0x0A || type || public key)[:4], for both signature types."""
    private = _key("derivation")
    raw = private.public_key().public_bytes_raw()
    name = "met.police.example/audit"
    for sig_type, signer in ((SIG_TYPE_ED25519, NoteSigner(name, private)), (4, CosignatureSigner(name, private))):
        expected = hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + raw).digest()[:4]
        assert key_id(name, sig_type, raw) == signer.key_id == expected
        assert signer.vkey() == f"{name}+{expected.hex()}+" + base64.b64encode(bytes([sig_type]) + raw).decode()
    assert SIG_TYPE_COSIGNATURE_V1 == 4


# Edwards25519, just enough to check that the blocklist really holds points of small order.
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P


def _decode_point(raw: bytes) -> tuple[int, int]:
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if x * x % _P != x2:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    assert x * x % _P == x2, "not on the curve"
    if x & 1 != sign:
        x = _P - x
    return x % _P, y


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    return (x1 * y2 + x2 * y1) * pow(1 + t, _P - 2, _P) % _P, (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P


def test_the_small_order_blocklist_is_right_and_enforced() -> None:
    points = note_module._SMALL_ORDER_POINTS
    assert len(points) == 8
    for raw in points:
        point = _decode_point(raw)
        for _ in range(3):
            point = _add(point, point)
        assert point == (0, 1), raw.hex()  # [8]P is the identity
        with pytest.raises(NoteError, match="small order"):
            NoteVerifier("bad", Ed25519PublicKey.from_public_bytes(raw))
        vkey = f"bad+{key_id('bad', 1, raw).hex()}+" + base64.b64encode(b"\x01" + raw).decode()
        with pytest.raises(NoteError, match="small order"):
            NoteVerifier.from_vkey(vkey)
    honest = _decode_point(_key("honest").public_key().public_bytes_raw())
    point = honest
    for _ in range(3):
        point = _add(point, point)
    assert point != (0, 1)


def test_non_canonical_public_keys_are_refused() -> None:
    raw = (2**255 - 19 + 1).to_bytes(32, "little")  # y = p + 1, which is y = 1 spelt another way
    vkey = f"bad+{key_id('bad', 1, raw).hex()}+" + base64.b64encode(b"\x01" + raw).decode()
    with pytest.raises(NoteError, match="not canonically encoded"):
        NoteVerifier.from_vkey(vkey)


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\tb", "a\u00a0b", "a\u2003b", "a\u3000b", "a\x7fb\x01", "\n"])
def test_bad_key_names_are_refused(name: str) -> None:
    for make in (NoteSigner, CosignatureSigner):
        with pytest.raises(NoteError):
            make(name, _key("x"))
    with pytest.raises(NoteError):
        NoteSignature(name, b"\x00" * 4, b"\x00" * 64)


# -- the C2SP spec examples -----------------------------------------------------------------------

SIGNED_NOTE_EXAMPLE = (
    "Ognuno sta solo sul cuor della terra\n"
    "trafitto da un raggio di sole:\n"
    "\n"
    "ed è subito sera.\n"
    "\n"
    "— quasimodo.example/salvatore "
    "NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
).encode()

CHECKPOINT_BODY = b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
LOG_SIG_LINE = (
    "— example.com/behind-the-sofa "
    "Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
).encode()
WITNESS_SIG_LINE = (
    "— witness.example.com/w1 "
    "jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
).encode()


def test_signed_note_example() -> None:
    """The note text may contain blank lines; the last one separates the signatures."""
    note = parse_note(SIGNED_NOTE_EXAMPLE)
    assert note.body.endswith("ed è subito sera.\n".encode())
    assert b"\n\n" in note.body
    (sig,) = note.signatures
    assert sig.name == "quasimodo.example/salvatore"
    assert len(sig.key_id) == 4 and len(sig.signature) == 64
    assert note.text() == SIGNED_NOTE_EXAMPLE


def test_tlog_checkpoint_example() -> None:
    note = parse_note(CHECKPOINT_BODY + b"\n" + LOG_SIG_LINE)
    checkpoint = Checkpoint.parse(note.body)
    assert checkpoint.origin == "example.com/behind-the-sofa"
    assert checkpoint.size == 20852163
    assert base64.b64encode(checkpoint.root_hash) == b"CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
    assert checkpoint.extensions == ()
    assert checkpoint.body() == CHECKPOINT_BODY


def test_tlog_cosignature_example() -> None:
    """The spec gives no witness key, so check the framing: key id, big-endian timestamp, 64 bytes."""
    note = parse_note(CHECKPOINT_BODY + b"\n" + LOG_SIG_LINE + WITNESS_SIG_LINE)
    cosig = note.signatures[1]
    assert cosig.name == "witness.example.com/w1"
    assert cosig.key_id.hex() == "8d66cf3f"
    assert len(cosig.signature) == 8 + 64
    assert int.from_bytes(cosig.signature[:8], "big") == 1679315147
    assert cosignature_message(CHECKPOINT_BODY, 1679315147) == (
        b"cosignature/v1\n"
        b"time 1679315147\n"
        b"example.com/behind-the-sofa\n"
        b"20852163\n"
        b"CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )


def test_tlog_witness_response_example() -> None:
    response = (
        "— witness.example/w1 "
        "CMp+6LWBU0anHGH5aNDTJkH/gj79sG+T6+iP2ThYN5krrDJbR1HDnucjL39QsZTSvVjyQLrdk3DXDqI5G2HgLatVs0pWh6Up69HVOw==\n"
        "— witness.example/w1 "
        "I7rEps0pvK2UqkS2gSpVUDhrhVtQV9lgF6pRrWAvjJHjyWpW7VcE3SiOlVlbQNt64vWhO+DlkL0+UfzuOBMh9ChdMkP1vi/lCAsmlw==\n"
        "— witness.example/w2 "
        "AWui8Sk55XjYLOijihBjhqEH6nS1ndDymE0a+6idX7pLcnoB+dhnz0854aLZgrrKbYKA7nC3HNJhm/kWl7oJlqU3rXXvpysAdyP3wQ==\n"
    ).encode()
    sigs = parse_signature_lines(response)
    assert [s.name for s in sigs] == ["witness.example/w1", "witness.example/w1", "witness.example/w2"]
    assert all(len(s.signature) == 72 for s in sigs)
    assert b"".join(s.line() for s in sigs) == response
    for bad in (b"", b"\n", response[:-1], response + b"\n", b"not a signature\n"):
        with pytest.raises(NoteError):
            parse_signature_lines(bad)


# -- checkpoints ----------------------------------------------------------------------------------

ROOT = hashlib.sha256(b"root").digest()
ROOT_B64 = base64.b64encode(ROOT)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"o\n5\n" + ROOT_B64 + b"\next\n", id="one-extension"),
        pytest.param(b"o\n0\n" + ROOT_B64 + b"\n", id="size-zero"),
        pytest.param(b"o\n18446744073709551615\n" + ROOT_B64 + b"\n", id="max-uint64"),
        pytest.param("fòrce log 1\n5\n".encode() + ROOT_B64 + b"\n", id="origin-with-space-and-accent"),
    ],
)
def test_checkpoints_that_parse(body: bytes) -> None:
    checkpoint = Checkpoint.parse(body)
    assert checkpoint.body() == body
    assert checkpoint.root_hash == ROOT


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"o\n5\n" + ROOT_B64, id="no-final-newline"),
        pytest.param(b"o\n5\n", id="two-lines"),
        pytest.param(b"\n5\n" + ROOT_B64 + b"\n", id="empty-origin"),
        pytest.param(b"o\n05\n" + ROOT_B64 + b"\n", id="leading-zero"),
        pytest.param(b"o\n+5\n" + ROOT_B64 + b"\n", id="plus-sign"),
        pytest.param(b"o\n-5\n" + ROOT_B64 + b"\n", id="negative"),
        pytest.param(b"o\n 5\n" + ROOT_B64 + b"\n", id="space-before-size"),
        pytest.param(b"o\n5_0\n" + ROOT_B64 + b"\n", id="underscore-in-size"),
        pytest.param("o\n\u0665\n".encode() + ROOT_B64 + b"\n", id="arabic-indic-digit"),
        pytest.param(b"o\n\n" + ROOT_B64 + b"\n", id="empty-size"),
        pytest.param(b"o\n18446744073709551616\n" + ROOT_B64 + b"\n", id="over-uint64"),
        pytest.param(b"o\n5\n" + base64.b64encode(ROOT[:31]) + b"\n", id="short-root"),
        pytest.param(b"o\n5\n" + ROOT_B64.rstrip(b"=") + b"\n", id="unpadded-root"),
        pytest.param(b"o\n5\n" + ROOT_B64[:-2] + b"9=\n", id="non-canonical-root"),
        pytest.param(b"o\n5\n" + ROOT_B64 + b"\n\n", id="empty-extension"),
        pytest.param(b"o\r\n5\n" + ROOT_B64 + b"\n", id="carriage-return"),
        pytest.param(b"o\n5\n" + ROOT_B64 + b" \n", id="trailing-space-after-root"),
        pytest.param(b"\xff\n5\n" + ROOT_B64 + b"\n", id="invalid-utf8"),
        pytest.param(b"o\n5\n" + ROOT_B64 + b"\n" + b"e\n" * MAX_TEXT_LINES, id="too-many-lines"),
    ],
)
def test_malformed_checkpoints_are_refused(body: bytes) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(body)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"origin": "", "size": 1, "root_hash": ROOT},
        {"origin": "a\nb", "size": 1, "root_hash": ROOT},
        {"origin": "o", "size": -1, "root_hash": ROOT},
        {"origin": "o", "size": 1 << 64, "root_hash": ROOT},
        {"origin": "o", "size": True, "root_hash": ROOT},
        {"origin": "o", "size": 1, "root_hash": ROOT[:31]},
        {"origin": "o", "size": 1, "root_hash": ROOT, "extensions": ("",)},
        {"origin": "o", "size": 1, "root_hash": ROOT, "extensions": ("a\nb",)},
        {"origin": "\ud800", "size": 1, "root_hash": ROOT},
    ],
)
def test_checkpoint_values_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(NoteError):
        Checkpoint(**kwargs)


# -- notes, signers and cosigners -----------------------------------------------------------------


def test_note_values_are_validated() -> None:
    sig = _peter_signer().sign(TEXT)
    with pytest.raises(NoteError, match="at least one signature"):
        Note(TEXT, ())
    with pytest.raises(NoteError, match="newline"):
        Note(TEXT[:-1], (sig,))
    with pytest.raises(NoteError, match="control character"):
        Note(b"a\x00\n", (sig,))
    with pytest.raises(NoteError):
        NoteSignature("PeterNeumann", b"\x00" * 3, b"\x00")
    with pytest.raises(NoteError):
        NoteSignature("PeterNeumann", b"\x00" * 4, b"")
    assert issubclass(NoteError, InvalidArgument)


def test_with_signatures_merges_without_duplicates() -> None:
    log = _peter_signer()
    witness = CosignatureSigner("witness.example/w1", _key("w1"))
    body = Checkpoint("example.com/log", 3, ROOT).body()
    note = sign_note(body, [log])
    cosig = witness.cosign(body, 1_700_000_000)
    merged = note.with_signatures([cosig, note.signatures[0], cosig])
    assert merged.signatures == (note.signatures[0], cosig)
    verify_note(merged, log.verifier())
    assert verify_cosignature(merged, witness.verifier()) == 1_700_000_000


def test_sign_note_with_log_key_and_cosigners() -> None:
    log = NoteSigner("example.com/log", _key("log"))
    w1 = CosignatureSigner("witness.example/w1", _key("w1"))
    w2 = CosignatureSigner("witness.example/w2", _key("w2"))
    body = Checkpoint("example.com/log", 9, ROOT, ("ext",)).body()
    with pytest.raises(NoteError, match="needs a timestamp"):
        sign_note(body, [log, w1])
    with pytest.raises(NoteError, match="at least one signer"):
        sign_note(body, [])
    note = parse_note(sign_note(body, [log, w1, w2], timestamp=1_800_000_000).text())
    verify_note(note, log.verifier())
    assert verify_cosignature(note, w1.verifier()) == 1_800_000_000
    assert w2.verifier().verify(body, note.signatures[2]) == 1_800_000_000


def test_a_cosignature_is_not_a_note_signature_and_vice_versa() -> None:
    """Same name, same key: the type byte in the key id keeps the two kinds of signature apart."""
    private = _key("shared")
    log, witness = NoteSigner("example.com/k", private), CosignatureSigner("example.com/k", private)
    assert log.key_id != witness.key_id
    body = Checkpoint("example.com/k", 1, ROOT).body()
    with pytest.raises(NoteError, match="no signature by key"):
        verify_note(Note(body, (witness.cosign(body, 5),)), log.verifier())
    with pytest.raises(NoteError, match="no cosignature"):
        verify_cosignature(Note(body, (log.sign(body),)), witness.verifier())


def test_cosignature_checks() -> None:
    witness = CosignatureSigner("witness.example/w1", _key("w1"))
    verifier = CosignatureVerifier.from_vkey(witness.vkey())
    body = Checkpoint("example.com/log", 9, ROOT).body()
    other = Checkpoint("example.com/log", 10, ROOT).body()
    sig = witness.cosign(body, 1_800_000_000)
    assert verifier.verify(body, sig) == 1_800_000_000
    with pytest.raises(NoteError, match="invalid cosignature"):
        verifier.verify(other, sig)
    later = (1_800_000_001).to_bytes(8, "big") + sig.signature[8:]  # the timestamp is signed too
    with pytest.raises(NoteError, match="invalid cosignature"):
        verifier.verify(body, NoteSignature(sig.name, sig.key_id, later))
    with pytest.raises(NoteError, match="72 bytes"):
        verifier.verify(body, NoteSignature(sig.name, sig.key_id, sig.signature[8:]))
    with pytest.raises(NoteError, match="not by cosigner"):
        verifier.verify(body, NoteSignature("witness.example/w2", sig.key_id, sig.signature))
    with pytest.raises(NoteError, match="2\\*\\*63"):
        witness.cosign(body, 1 << 63)
    with pytest.raises(NoteError, match="2\\*\\*63"):
        witness.cosign(body, -1)
    with pytest.raises(NoteError):
        witness.cosign(b"not a checkpoint\n", 5)  # a witness only ever cosigns checkpoints


def test_note_signer_checks() -> None:
    signer = NoteSigner("example.com/log", _key("log"))
    verifier = NoteVerifier.from_vkey(signer.vkey())
    sig = signer.sign(TEXT)
    verifier.verify(TEXT, sig)
    with pytest.raises(NoteError, match="64 bytes"):
        verifier.verify(TEXT, NoteSignature(sig.name, sig.key_id, sig.signature + b"\x00"))
    with pytest.raises(NoteError, match="not by key"):
        verifier.verify(TEXT, NoteSignature(sig.name, b"\x00" * 4, sig.signature))
    with pytest.raises(NoteError, match="newline"):
        signer.sign(b"no newline")
    with pytest.raises(NoteError, match="private key"):
        NoteSigner("n", object())  # type: ignore[arg-type]  # the wrong type is the point of the test
    with pytest.raises(NoteError, match="public key"):
        NoteVerifier("n", object())  # type: ignore[arg-type]  # as above


# -- properties -----------------------------------------------------------------------------------

_NAME = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="+\x85"),
    min_size=1,
    max_size=20,
).filter(lambda s: not any(c.isspace() for c in s))
_LINE = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)
_BODY = st.lists(_LINE, min_size=1, max_size=6).map(lambda lines: "".join(x + "\n" for x in lines).encode())
_SIGNERS = {label: NoteSigner(f"signer{label}.example", _key(f"s{label}")) for label in range(3)}


@settings(deadline=None)
@given(body=_BODY, names=st.lists(_NAME, min_size=1, max_size=3))
def test_round_trip(body: bytes, names: list[str]) -> None:
    signers = [NoteSigner(name, _key(name)) for name in names]
    note = sign_note(body, signers)
    parsed = parse_note(note.text())
    assert parsed == note
    assert parsed.text() == note.text()
    for signer in signers:
        verify_note(parsed, NoteVerifier.from_vkey(signer.vkey()))


@settings(deadline=None, max_examples=300)
@given(body=_BODY, position=st.integers(min_value=0), new=st.integers(0, 255))
def test_any_single_byte_change_is_refused(body: bytes, position: int, new: int) -> None:
    signer = _SIGNERS[0]
    text = sign_note(body, [signer]).text()
    position %= len(text)
    assume(text[position] != new)
    mutated = text[:position] + bytes([new]) + text[position + 1 :]
    with pytest.raises(NoteError):
        verify_note(parse_note(mutated), signer.verifier())


@settings(deadline=None, max_examples=300)
@given(
    position=st.integers(min_value=0),
    new=st.integers(0, 255),
    timestamp=st.integers(0, (1 << 63) - 1),
)
def test_any_single_byte_change_of_a_cosigned_checkpoint_is_refused(position: int, new: int, timestamp: int) -> None:
    witness = CosignatureSigner("witness.example/w1", _key("w1"))
    body = Checkpoint("example.com/log", 12345, ROOT).body()
    text = Note(body, (witness.cosign(body, timestamp),)).text()
    position %= len(text)
    assume(text[position] != new)
    mutated = text[:position] + bytes([new]) + text[position + 1 :]
    with pytest.raises(NoteError):
        verify_cosignature(parse_note(mutated), witness.verifier())


_VALID = (TEXT + b"\n" + PETER_SIG + ENOCH_SIG, SIGNED_NOTE_EXAMPLE, CHECKPOINT_BODY + b"\n" + WITNESS_SIG_LINE)


@st.composite
def _mangled(draw: st.DrawFn) -> bytes:
    """Valid notes with random splices, to reach deeper than random bytes do."""
    text = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text[pos:pos] = draw(st.sampled_from([b"\n", b"\n\n", "— ".encode(), b" ", b"+", b"=", b"\x00", b"\xe2"]))
        else:
            del text[pos : pos + draw(st.integers(1, 5))]
    return bytes(text)


@settings(deadline=None, max_examples=500)
@given(data=st.one_of(st.binary(max_size=300), _mangled()))
def test_parsers_raise_only_note_error(data: bytes) -> None:
    try:
        note = parse_note(data)
    except NoteError:
        pass
    else:
        assert note.text() == data  # whatever parses has exactly one spelling
    try:
        checkpoint = Checkpoint.parse(data)
    except NoteError:
        pass
    else:
        assert checkpoint.body() == data
    with contextlib.suppress(NoteError):
        parse_signature_lines(data)


@settings(deadline=None)
@given(vkey=st.one_of(st.text(max_size=100), st.sampled_from([PETER_VKEY, ENOCH_VKEY]).map(lambda k: k[:-3] + "+==")))
def test_from_vkey_raises_only_note_error(vkey: str) -> None:
    for make in (NoteVerifier.from_vkey, CosignatureVerifier.from_vkey):
        with contextlib.suppress(NoteError):
            make(vkey)


@settings(deadline=None)
@given(
    origin=_LINE.filter(bool),
    size=st.integers(0, (1 << 64) - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(_LINE.filter(bool), max_size=3),
)
def test_checkpoint_round_trip(origin: str, size: int, root: bytes, extensions: list[str]) -> None:
    checkpoint = Checkpoint(origin, size, root, tuple(extensions))
    assert Checkpoint.parse(checkpoint.body()) == checkpoint
