"""Property-based fuzz of every decoder the gateway has: a clean error, never a crash.

For random (and randomly mutated) input each decoder either returns its value or
raises the error its module documents — a `GatewayError` subclass (`RequestRefused`
for what a caller or peer sends, `ConfigError` for files, `RecordError` and
`NoteError` for the audit log) — and never anything else (a `KeyError`,
`UnicodeDecodeError`, `DecodeError`, `AttributeError`... escaping a decoder is a
crash at the edge: no log line, no record, grpc's own text to the caller).

Decoders: relay requests and frames (`gateway.relay.parse_relay_request`, and the
host's reading of a stream after its envelope), envelopes and seals
(`gateway.envelope`: the body parsers and the verifier), metadata
(`gateway.metadata.split_metadata`, relayed entries), purpose
(`gateway.purpose.parse_purpose`), policy files (`gateway.policy`), the network
directory and gateway config (`gateway.directory`, `gateway.config`), signed notes
and checkpoints (`gateway.audit.note`), and audit records (`AuditRecord.decode`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.audit.note import (
    Checkpoint,
    CosignatureVerifier,
    NoteError,
    NoteVerifier,
    parse_note,
    parse_signature_lines,
)
from gateway.audit.record import AuditRecord, RecordError, format_time
from gateway.clock import FakeClock
from gateway.config import load_config
from gateway.demo.network import NetworkLayout, write_network
from gateway.directory import CallType, NetworkDirectory, parse_directory
from gateway.envelope import (
    EnvelopeVerifier,
    InMemoryReplayStore,
    MessageDigest,
    Signer,
    parse_envelope_body,
    parse_request_seal_body,
    parse_response_seal_body,
)
from gateway.errors import ConfigError, GatewayError, RequestRefused, RevocationDataUnavailable
from gateway.identity import PeerIdentity, TrustStore, Usage
from gateway.metadata import check_relayed_metadata, from_relay_entries, split_metadata
from gateway.pipeline import Call, Listener
from gateway.policy import PolicyError, load_policy
from gateway.policy.files import PolicySource, SourceFile, decode_policy_text, parse_policy, read_policy_source
from gateway.principal import Principal, Purpose
from gateway.purpose import PurposeConfig, decode_text, parse_purpose
from gateway.relay import EnvelopeStage, RelayHostDownstream, parse_relay_request
from gateway.tomlconf import TomlFile

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TV, HA = "thames-valley", "hampshire"
SEARCH = "/psn.demo.intel.v1.IntelligenceSearch/Search"
REVIEW = "/psn.demo.casefiles.v1.CaseFiles/Review"


@dataclasses.dataclass(frozen=True)
class World:
    """A demo network on disk (no process started), and what the decoders need of it."""

    layout: NetworkLayout
    directory: NetworkDirectory
    trust: TrustStore
    signer: Signer  # Hampshire's gateway signing key
    peer: PeerIdentity  # Hampshire's gateway, as the TLS peer of Thames Valley's peer listener

    def verifier(self, own_force: str = TV) -> EnvelopeVerifier:
        return EnvelopeVerifier(
            trust=lambda: self.trust,
            own_force=own_force,
            window=120.0,
            replay=InMemoryReplayStore(),
            clock=FakeClock(time.time()),
            max_deadline=300.0,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    layout = write_network(tmp_path_factory.mktemp("fuzz-net"))
    directory = layout.directory()
    from gateway.identity import load_trust_store

    trust = load_trust_store(directory)
    material = layout.material[HA]
    signer = Signer.from_files(material.gateway_signing.cert_path, material.gateway_signing.key_path)
    peer = trust.verify(material.gateway_tls.cert_path.read_bytes(), Usage.CLIENT, time.time())
    return World(layout, directory, trust, signer, peer)


def _clean(exc: BaseException, *families: type[BaseException]) -> None:
    """Fail unless `exc` is one of the documented error families."""
    if not isinstance(exc, families or (GatewayError,)):
        raise AssertionError(f"{type(exc).__name__} escaped a decoder: {exc!r}") from exc


# -- relay requests and frames ----------------------------------------------------------------


def _frames() -> st.SearchStrategy[bytes]:
    """Random bytes, and real frames with random contents (closer to what a broken peer sends)."""
    signed = st.builds(relay_pb2.Signed, body=st.binary(max_size=300), signer_certificate=st.binary(max_size=80),
                       signature=st.binary(max_size=80))  # fmt: skip
    frame = st.one_of(
        st.builds(lambda s: relay_pb2.RelayFrame(envelope=s), signed),
        st.builds(lambda s: relay_pb2.RelayFrame(request_seal=s), signed),
        st.builds(lambda s: relay_pb2.RelayFrame(response_seal=s), signed),
        st.builds(
            lambda q, d: relay_pb2.RelayFrame(message=relay_pb2.StreamMessage(seq=q, data=d)),
            st.integers(0, 2**64 - 1),
            st.binary(max_size=64),
        ),
        st.builds(
            lambda k, v: relay_pb2.RelayFrame(
                headers=relay_pb2.Headers(metadata=[relay_pb2.MetadataEntry(key=k, value=v)])
            ),
            st.text(max_size=20),
            st.binary(max_size=20),
        ),
    ).map(lambda f: f.SerializeToString())
    return st.one_of(st.binary(max_size=400), frame)


@FUZZ
@given(data=_frames(), unary=st.booleans())
def test_relay_requests_parse_or_are_invalid(data: bytes, unary: bool) -> None:
    try:
        parsed = parse_relay_request(data, unary=unary)
    except Exception as exc:  # noqa: BLE001  # what is under test is which exception
        _clean(exc, RequestRefused)
    else:
        assert isinstance(parsed, relay_pb2.UnaryRelayRequest if unary else relay_pb2.RelayFrame)


@FUZZ
@given(data=_frames(), unary=st.booleans())
def test_the_envelope_stage_refuses_any_garbage_cleanly(world: World, data: bytes, unary: bool) -> None:
    call = Call(Listener.PEER, "/psn.gateway.v1.Relay/" + ("Unary" if unary else "Stream"), (), None, time.time(), 0.0)
    call.peer = world.peer
    call.relay_request = data
    try:
        asyncio.run(EnvelopeStage(world.verifier())(call))
    except Exception as exc:  # noqa: BLE001
        _clean(exc, RequestRefused, RevocationDataUnavailable)
    else:
        raise AssertionError("random bytes passed the envelope stage")


class _Context:
    """A servicer context whose reads are the frames given (then EOF)."""

    def __init__(self, frames: list[bytes]) -> None:
        self._frames = list(frames)

    async def read(self) -> Any:
        return self._frames.pop(0) if self._frames else grpc.aio.EOF


def _verified_stream_envelope(world: World) -> tuple[Any, EnvelopeVerifier]:
    from gateway.envelope import Envelope, seal_envelope

    verifier = world.verifier(own_force="surrey")
    now = time.time()
    env = Envelope(
        request_id=uuid.uuid4().hex,
        origin_force=HA,
        origin_gateway=world.directory.forces[HA].gateway_spiffe_id,
        host_force="surrey",
        application="case-files",
        method=REVIEW,
        call_type=CallType.BIDI_STREAM,
        principal=Principal("DC-1", HA, ("serocu",), ("investigator",), "SC"),
        purpose=Purpose("investigation", "OP-1", "fuzz"),
        issued_at=round(now, 3),
        deadline=round(now + 30, 3),
        messages_digest=None,
        message_count=0,
        metadata=(),
    )
    signed, _ = seal_envelope(env, world.signer)
    return verifier.verify_envelope(signed, peer=world.peer), verifier


@FEW
@given(frames=st.lists(_frames(), max_size=4))
def test_the_host_reads_a_stream_of_garbage_after_a_good_envelope_cleanly(world: World, frames: list[bytes]) -> None:
    verified, verifier = _verified_stream_envelope(world)
    call = Call(Listener.PEER, REVIEW, (), None, time.time(), 0.0)
    call.envelope = verified
    downstream = RelayHostDownstream(_Context(frames), call, verifier)  # type: ignore[arg-type]

    async def drain() -> None:
        for _ in range(len(frames) + 1):
            if await downstream.read() is None:
                return

    try:
        asyncio.run(drain())
    except Exception as exc:  # noqa: BLE001
        _clean(exc, RequestRefused, RevocationDataUnavailable)


# -- envelopes and seals ----------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=600))
def test_envelope_and_seal_bodies_parse_or_are_refused(body: bytes) -> None:
    for parse in (parse_envelope_body, parse_request_seal_body, parse_response_seal_body):
        try:
            parse(body)
        except Exception as exc:  # noqa: BLE001
            _clean(exc, RequestRefused)


@FUZZ
@given(data=st.data())
def test_a_signed_envelope_mutated_anywhere_is_refused_cleanly(world: World, data: st.DataObject) -> None:
    verified, _ = _verified_stream_envelope(world)
    cert = world.signer.certificate.public_bytes(Encoding.DER)
    wire = bytearray(
        relay_pb2.Signed(body=verified.body, signer_certificate=cert, signature=verified.signature).SerializeToString()
    )
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
    try:
        signed = relay_pb2.Signed.FromString(bytes(wire))
    except Exception:  # noqa: BLE001  # not even a Signed: the relay parser's business (above)
        return
    verifier = world.verifier(own_force="surrey")
    for check in (
        lambda: verifier.verify_envelope(signed, peer=world.peer),
        lambda: verifier.verify_request_seal(signed, envelope=verified, digest=MessageDigest().digest, count=0),
        lambda: verifier.verify_response_seal(
            signed, envelope_digest=verified.digest, request_id="x", host_force="surrey", digest=b"", count=0
        ),
    ):
        try:
            check()
        except Exception as exc:  # noqa: BLE001
            _clean(exc, RequestRefused, RevocationDataUnavailable)


# -- metadata and purpose -------------------------------------------------------------------------

_KEYS = st.one_of(
    st.sampled_from(
        [
            "authorization",
            "psn-purpose-code",
            "psn-purpose-case",
            "psn-purpose-text",
            "psn-gw-officer",
            "x-bin",
            "grpc-timeout",
            ":path",
            "user-agent",
            "x-trace",
            "psn-other",
        ]
    ),
    st.text(max_size=12),
)
_VALUES = st.one_of(st.text(max_size=40), st.binary(max_size=40))


@FUZZ
@given(md=st.lists(st.tuples(_KEYS, _VALUES), max_size=80))
def test_metadata_is_sorted_or_refused(md: list[tuple[str, str | bytes]]) -> None:
    try:
        split_metadata(md)
    except Exception as exc:  # noqa: BLE001
        _clean(exc, RequestRefused)


@FUZZ
@given(entries=st.lists(st.tuples(_KEYS, st.binary(max_size=40)), max_size=80), details=st.booleans())
def test_relayed_metadata_is_checked_or_refused(entries: list[tuple[str, bytes]], details: bool) -> None:
    try:
        check_relayed_metadata(entries, status_details=details)
        from_relay_entries(entries, status_details=details)
    except Exception as exc:  # noqa: BLE001
        _clean(exc, RequestRefused)


_PURPOSE = PurposeConfig(codes=("investigation", "safeguarding"))


@FUZZ
@given(
    fields=st.dictionaries(
        st.one_of(st.sampled_from(["psn-purpose-code", "psn-purpose-case", "psn-purpose-text"]), st.text(max_size=20)),
        st.one_of(st.text(max_size=80), st.text(alphabet="%0123456789ABCDEFabcdef xyz", max_size=80)),
        max_size=4,
    )
)
def test_purpose_is_parsed_or_refused(fields: dict[str, str]) -> None:
    try:
        parse_purpose(fields, _PURPOSE)
    except Exception as exc:  # noqa: BLE001
        _clean(exc, RequestRefused)
    try:
        decode_text(fields.get("psn-purpose-text", ""), max_len=500)
    except Exception as exc:  # noqa: BLE001
        _clean(exc, RequestRefused)


# -- policy files -------------------------------------------------------------------------------


def _mutations(text: bytes) -> st.SearchStrategy[bytes]:
    """`text` with random edits: bytes replaced, inserted, cut; lines dropped or doubled; random bytes."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(text)
        for _ in range(draw(st.integers(1, 5))):
            op = draw(st.sampled_from(["replace", "insert", "cut", "line", "truncate"]))
            at = draw(st.integers(0, max(0, len(data) - 1)))
            if op == "replace" and data:
                data[at] = draw(st.integers(0, 255))
            elif op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif op == "cut":
                del data[at : at + draw(st.integers(1, 20))]
            elif op == "line":
                lines = bytes(data).split(b"\n")
                i = draw(st.integers(0, len(lines) - 1))
                lines.insert(i, lines[i]) if draw(st.booleans()) else lines.pop(i)
                data = bytearray(b"\n".join(lines))
            else:
                del data[at:]
        return bytes(data)

    return st.one_of(mutate(), st.binary(max_size=300))


@pytest.fixture(scope="module")
def policy_source(world: World) -> PolicySource:
    return read_policy_source(world.layout.root / "policies")


@FUZZ
@given(data=st.data())
def test_policy_rows_parse_or_give_findings(world: World, policy_source: PolicySource, data: st.DataObject) -> None:
    rows = list(policy_source.rows)
    i = data.draw(st.integers(0, len(rows) - 1))
    rows[i] = SourceFile(rows[i].name, data.draw(_mutations(rows[i].data)))
    source = dataclasses.replace(policy_source, rows=tuple(rows))
    decode_policy_text(rows[i].data)
    parsed, findings = parse_policy(source, world.directory)
    assert parsed is not None or any(f.is_error for f in findings)


@FEW
@given(data=st.data())
def test_a_policy_directory_with_a_mangled_file_loads_or_is_rejected(
    world: World, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    import shutil

    root = tmp_path_factory.mktemp("policy")
    shutil.copytree(world.layout.root / "policies", root, dirs_exist_ok=True)
    target = data.draw(st.sampled_from(sorted(p for p in root.rglob("*") if p.suffix in (".csv", ".conf", ".toml"))))
    target.write_bytes(data.draw(_mutations(target.read_bytes())))
    try:
        load_policy(root, world.directory)
    except Exception as exc:  # noqa: BLE001
        _clean(exc, PolicyError)


# -- directory and gateway config ----------------------------------------------------------------


def _toml_ish() -> st.SearchStrategy[str]:
    key = st.from_regex(r"[a-z_][a-z0-9_-]{0,10}", fullmatch=True)
    value = st.one_of(
        st.integers(-5, 10**6).map(str),
        st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters='"\\\n'), max_size=20).map(
            lambda s: f'"{s}"'
        ),
        st.sampled_from(["true", "false", "[]", '["a", "b"]', "1.5", "{}", "nan", "inf", '"127.0.0.1:0"']),
    )
    line = st.one_of(
        st.builds(lambda k, v: f"{k} = {v}", key, value),
        st.builds(lambda k: f"[{k}]", key),
        st.builds(lambda a, b: f"[{a}.{b}]", key, key),
        st.builds(lambda a, b: f'[{a}."{b}"]', key, key),
        st.just(""),
    )
    return st.lists(line, max_size=25).map("\n".join)


@FUZZ
@given(text=st.one_of(_toml_ish(), st.text(max_size=200)))
def test_a_random_directory_file_is_a_config_error(text: str) -> None:
    try:
        parse_directory(TomlFile.parse(text.encode("utf-8", "surrogatepass")))
    except Exception as exc:  # noqa: BLE001
        _clean(exc, ConfigError)


@FUZZ
@given(data=st.data())
def test_a_mangled_real_directory_parses_or_is_a_config_error(world: World, data: st.DataObject) -> None:
    raw = data.draw(_mutations(world.layout.directory_path.read_bytes()))
    try:
        parse_directory(TomlFile.parse(raw, world.layout.directory_path))
    except Exception as exc:  # noqa: BLE001
        _clean(exc, ConfigError)


@FEW
@given(data=st.data())
def test_a_mangled_gateway_config_loads_or_is_a_config_error(
    world: World, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    real = world.layout.configs[TV]
    path = real.with_name(f"fuzz-{uuid.uuid4().hex}.toml")
    text = data.draw(st.one_of(_mutations(real.read_bytes()), _toml_ish().map(str.encode)))
    path.write_bytes(text)
    try:
        load_config(path)
    except Exception as exc:  # noqa: BLE001
        _clean(exc, ConfigError)
    finally:
        path.unlink()


# -- signed notes, checkpoints, records --------------------------------------------------------------


_NOTE = (
    "thames-valley.se.psn/audit\n5\nJ/Vw1bmZkPKmOKpN0Z0c7vDqaU6sqxAo7FXyc3cKx9k=\n\n"
    "\u2014 thames-valley.se.psn/audit "
    "AAAAAQ3Vt1jbZdSWdGHgNZqpGgsBLuHbIRlYEWw8NTWWIyHCSuH1yVh/Hl3+NZCWj7EgfJY8l3bJm5+0yWoi8w2jyy6OtwY=\n"
).encode()


@FUZZ
@given(data=st.data())
def test_notes_checkpoints_and_keys_parse_or_are_note_errors(data: st.DataObject) -> None:
    raw = data.draw(st.one_of(_mutations(_NOTE), st.binary(max_size=300)))
    for parse in (parse_note, parse_signature_lines, Checkpoint.parse):
        try:
            parse(raw)
        except Exception as exc:  # noqa: BLE001
            _clean(exc, NoteError)
    text = raw.decode("utf-8", "replace")
    for key in (NoteVerifier.from_vkey, CosignatureVerifier.from_vkey):
        try:
            key(text)
        except Exception as exc:  # noqa: BLE001
            _clean(exc, NoteError)


def _record() -> bytes:
    return AuditRecord(
        event="call",
        time=format_time(1_800_000_000.5),
        gateway="spiffe://thames-valley.se.psn/gateway",
        force=TV,
        request_id="ab" * 16,
        officer_id="DC-1",
        units=("serocu",),
        method=SEARCH,
        call_type="unary",
        status="OK",
        latency_ms=1.5,
        request_digest="00" * 32,
        envelope_signature="AAAA",
    ).encode()


@FUZZ
@given(data=st.data())
def test_audit_records_decode_or_are_record_errors(data: st.DataObject) -> None:
    raw = data.draw(st.one_of(_mutations(_record()), st.binary(max_size=300), st.just(_record())))
    try:
        record = AuditRecord.decode(raw)
    except Exception as exc:  # noqa: BLE001
        _clean(exc, RecordError)
    else:
        assert record.encode() == raw  # only canonical bytes decode


def test_the_fuzzed_world_is_sound(world: World) -> None:
    # The inputs above are mutations of real, valid files: check the originals are accepted as they are.
    parse_directory(TomlFile.parse(world.layout.directory_path.read_bytes()))
    load_config(world.layout.configs[TV])
    assert AuditRecord.decode(_record()).officer_id == "DC-1"
    parsed, findings = parse_policy(read_policy_source(world.layout.root / "policies"), world.directory)
    assert parsed is not None, [str(f) for f in findings if f.is_error]
    verified, _ = _verified_stream_envelope(world)
    assert verified.value.call_type is CallType.BIDI_STREAM
