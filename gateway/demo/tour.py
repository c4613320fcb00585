"""The scripted tour of the demo network: every force calls every application, and the refusals.

Each step is a real call through the real gateways over loopback mTLS. The
tour prints a table (caller force, application, method, call type, expected,
got) and reports whether every step behaved as expected.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import client, pki
from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc
from gateway._proto.psn.gateway.v1 import relay_pb2
from gateway.demo.network import FORCES, DemoNetwork
from gateway.principal import Purpose

__all__ = ["Officer", "Step", "StepResult", "demo_steps", "print_table", "run_tour"]

PURPOSE = Purpose("investigation", "OP-DEMO-0001", "Demo tour: fictional enquiry")


@dataclass(frozen=True)
class Officer:
    """Who a step calls as (minted by the force's development identity provider)."""

    officer: str
    units: tuple[str, ...]
    roles: tuple[str, ...]
    clearance: str


#: A regional organised-crime detective with SC clearance.
DETECTIVE = Officer("DC-1001", ("serocu",), ("investigator",), "SC")

#: Each force's own custody unit (a force's unit is accepted only from that force).
_CUSTODY_UNIT = {"thames-valley": "tvp-custody", "hampshire": "hants-custody", "surrey": "surrey-custody"}


def custody_officer(force: str) -> Officer:
    """A custody sergeant of `force`: bulk custody look-ups are theirs alone."""
    return Officer("PS-2002", (_CUSTODY_UNIT[force],), ("custody-officer",), "NPPV3")


@dataclass(frozen=True)
class Step:
    """One call of the tour and the status it must end with."""

    caller: str
    application: str
    method: str
    call_type: str
    expected: str
    note: str
    run: Callable[[DemoNetwork, Path], Awaitable[None]]


@dataclass(frozen=True)
class StepResult:
    """A step and the status it ended with."""

    step: Step
    got: str

    @property
    def ok(self) -> bool:
        """Whether the step behaved as expected."""
        return self.got == self.step.expected


def _channel(
    manifest: Path, force: str, *, officer: Officer | None = DETECTIVE, purpose: Purpose | None = PURPOSE
) -> grpc.aio.Channel:
    endpoint = client.from_manifest(manifest, force)
    if officer is None:
        return endpoint.aio_secure_channel(token=lambda: "", purpose=purpose)
    token = endpoint.unsafe_dev_token(
        officer=officer.officer, units=officer.units, roles=officer.roles, clearance=officer.clearance
    )
    return endpoint.aio_secure_channel(token=token, purpose=purpose)


async def _search(ch: grpc.aio.Channel) -> None:
    reply = await intel_pb2_grpc.IntelligenceSearchStub(ch).Search(intel_pb2.SearchRequest(subject="alpha"), timeout=10)
    assert reply.matches, "no matches"  # noqa: S101  # demo check


async def _stream_matches(ch: grpc.aio.Channel) -> None:
    stub = intel_pb2_grpc.IntelligenceSearchStub(ch)
    got = [m.report_id async for m in stub.StreamMatches(intel_pb2.SearchRequest(subject="alpha"), timeout=10)]
    assert got == ["IR-0001", "IR-0002", "IR-0004"], got  # noqa: S101  # demo check


async def _get_record(ch: grpc.aio.Channel, number: str = "HC/00007/26") -> None:
    stub = custody_pb2_grpc.CustodyRecordsStub(ch)
    record = await stub.GetRecord(custody_pb2.GetRecordRequest(custody_number=number), timeout=10)
    assert record.custody_number == number  # noqa: S101  # demo check


async def _bulk_lookup(ch: grpc.aio.Channel) -> None:
    async def numbers() -> AsyncIterator[custody_pb2.GetRecordRequest]:
        for n in ("HC/00001/26", "HC/00002/26", "HC/77777/26"):
            yield custody_pb2.GetRecordRequest(custody_number=n)

    summary = await custody_pb2_grpc.CustodyRecordsStub(ch).BulkLookup(numbers(), timeout=10)
    assert len(summary.found) == 2 and list(summary.not_found) == ["HC/77777/26"]  # noqa: S101  # demo check


async def _fetch_document(ch: grpc.aio.Channel) -> None:
    stub = casefiles_pb2_grpc.CaseFilesStub(ch)
    request = casefiles_pb2.FetchDocumentRequest(case_reference="OP-DEMO-0001", document_id="MG5", chunk_size=16384)
    size = sum([len(c.data) async for c in stub.FetchDocument(request, timeout=10)])
    assert size == 64 * 1024, size  # noqa: S101  # demo check


async def _review(ch: grpc.aio.Channel) -> None:
    call = casefiles_pb2_grpc.CaseFilesStub(ch).Review(timeout=10)
    acks = []
    for paragraph in ("1.1", "1.2", "2.4"):
        await call.write(casefiles_pb2.ReviewComment(case_reference="OP-DEMO-0001", paragraph=paragraph, comment="ok"))
        ack = await call.read()  # bidirectional: each comment is acknowledged before the next
        assert isinstance(ack, casefiles_pb2.ReviewAck), "stream ended early"  # noqa: S101  # demo check
        acks.append(ack)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # noqa: S101  # demo check
    assert await call.code() is grpc.StatusCode.OK  # noqa: S101  # demo check
    assert [a.sequence for a in acks] == [1, 2, 3]  # noqa: S101  # demo check


_METHODS: dict[str, tuple[str, str, Callable[[grpc.aio.Channel], Awaitable[None]]]] = {
    "Search": ("intel-search", "unary", _search),
    "StreamMatches": ("intel-search", "server stream", _stream_matches),
    "GetRecord": ("custody-records", "unary", _get_record),
    "BulkLookup": ("custody-records", "client stream", _bulk_lookup),
    "FetchDocument": ("case-files", "server stream", _fetch_document),
    "Review": ("case-files", "bidi stream", _review),
}


def _call_step(
    caller: str,
    method: str,
    expected: str,
    note: str,
    *,
    officer: Officer | None = DETECTIVE,
    purpose: Purpose | None = PURPOSE,
    action: Callable[[grpc.aio.Channel], Awaitable[None]] | None = None,
) -> Step:
    application, call_type, default = _METHODS[method]

    async def run(network: DemoNetwork, manifest: Path) -> None:
        async with _channel(manifest, caller, officer=officer, purpose=purpose) as ch:
            await (action or default)(ch)

    return Step(caller, application, method, call_type, expected, note, run)


async def _unknown_service(ch: grpc.aio.Channel) -> None:
    lookup: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary("/psn.demo.firearms.v1.Licensing/Lookup")
    await lookup(b"", timeout=10)


async def _missing_record(ch: grpc.aio.Channel) -> None:
    await _get_record(ch, "HC/99999/26")


def _imposter(network: DemoNetwork, out: Path, *, issuer_force: str, claims_force: str) -> tuple[Path, Path]:
    """A gateway TLS certificate issued by `issuer_force`'s CA that claims `claims_force`'s gateway."""
    material = network.layout.material[issuer_force]
    ca = x509.load_pem_x509_certificate(material.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(material.ca_key.read_bytes(), None)
    directory = network.layout.directory()
    profile = pki.leaf_profile(
        pki.CertKind.GATEWAY_TLS, trust_domain=directory.forces[claims_force].trust_domain, display_name="imposter"
    )
    key = pki.generate_key()
    now = datetime.now(UTC)
    cert = pki.build_certificate(
        profile,
        public_key=key.public_key(),
        issuer=ca,
        issuer_key=ca_key,  # type: ignore[arg-type]  # the demo CA key is a supported type
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(hours=1),
    )
    cert_path, key_path = out / "imposter.pem", out / "imposter.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


def _peer_call_step(caller: str, host: str, expected: str, note: str, *, credentials: str) -> Step:
    """A call straight to `host`'s peer listener, presenting credentials that must be refused."""

    async def run(network: DemoNetwork, manifest: Path) -> None:
        layout = network.layout
        if credentials == "imposter":
            cert, key = _imposter(network, layout.root, issuer_force=caller, claims_force=host)
        else:
            app = layout.material[caller].app_clients["analyst-desk"]
            cert, key = app.cert_path, app.key_path
        roots = b"".join(layout.material[f].ca.read_bytes() for f in FORCES)
        creds = grpc.ssl_channel_credentials(roots, key.read_bytes(), cert.read_bytes())
        target = layout.directory().forces[host]
        options = [("grpc.ssl_target_name_override", target.gateway_server_name)]
        async with grpc.aio.secure_channel(target.peer_address, creds, options=options) as ch:
            unary = ch.unary_unary(
                "/psn.gateway.v1.Relay/Unary",
                request_serializer=relay_pb2.UnaryRelayRequest.SerializeToString,
                response_deserializer=relay_pb2.UnaryRelayResponse.FromString,
            )
            await unary(relay_pb2.UnaryRelayRequest(), timeout=10)

    return Step(caller, "(relay)", "Relay/Unary", "unary", expected, note, run)


def _local_cert_step(caller: str, target: str, expected: str, note: str) -> Step:
    """An application of `caller` presenting its own certificate to `target`'s local listener."""

    async def run(network: DemoNetwork, manifest: Path) -> None:
        endpoint = client.from_manifest(manifest, caller)
        own = client.from_manifest(manifest, target)
        token = own.unsafe_dev_token(officer="DC-1001", units=["serocu"], roles=["investigator"], clearance="SC")
        roots = b"".join(network.layout.material[f].ca.read_bytes() for f in FORCES)
        channel = client.aio_secure_channel(
            own.local_address,
            ca=roots,
            cert=endpoint.app.cert,
            key=endpoint.app.key,
            server_name=own.server_name,
            token=token,
            purpose=PURPOSE,
        )
        async with channel as ch:
            await _search(ch)

    return Step(caller, "intel-search", "Search", "unary", expected, note, run)


def demo_steps() -> list[Step]:
    """Every step of the tour, in order."""
    steps = [
        _call_step(force, method, "OK", "allowed: SEROCU detective, SC")
        if method != "BulkLookup"
        else _call_step(force, method, "OK", "allowed: the force's custody unit", officer=custody_officer(force))
        for force in FORCES
        for method in _METHODS
    ]
    steps += [
        _call_step("hampshire", "BulkLookup", "PERMISSION_DENIED", "policy: regional units may not bulk-look-up"),
        _call_step(
            "surrey",
            "Search",
            "PERMISSION_DENIED",
            "policy: custody staff never search intelligence",
            officer=custody_officer("surrey"),
        ),
        _call_step(
            "thames-valley",
            "Search",
            "PERMISSION_DENIED",
            "vetting: NPPV3 below intel-search's SC",
            officer=Officer("DC-3003", ("serocu",), ("investigator",), "NPPV3"),
        ),
        _call_step(
            "surrey",
            "GetRecord",
            "NOT_FOUND",
            "the application's own status and details, end to end",
            action=_missing_record,
        ),
        _call_step("hampshire", "Search", "NOT_FOUND", "unknown service", action=_unknown_service),
        _call_step("thames-valley", "Search", "INVALID_ARGUMENT", "no purpose given", purpose=None),
        _call_step("surrey", "Search", "UNAUTHENTICATED", "no officer token", officer=None),
        _local_cert_step("hampshire", "thames-valley", "UNAUTHENTICATED", "another force's app certificate (local)"),
        _peer_call_step(
            "thames-valley", "hampshire", "UNAUTHENTICATED", "app certificate on the peer listener", credentials="app"
        ),
        _peer_call_step(
            "thames-valley",
            "surrey",
            "UNAUTHENTICATED",
            "Thames Valley's CA minting a Surrey gateway",
            credentials="imposter",
        ),
    ]
    return steps


async def run_step(step: Step, network: DemoNetwork, manifest: Path) -> StepResult:
    """Run one step; its result is the status it ended with."""
    try:
        await step.run(network, manifest)
    except grpc.aio.AioRpcError as exc:
        return StepResult(step, exc.code().name)
    except AssertionError as exc:
        return StepResult(step, f"WRONG DATA: {exc}")
    return StepResult(step, "OK")


async def run_tour(network: DemoNetwork, steps: Sequence[Step] | None = None) -> list[StepResult]:
    """Run the tour against a running network."""
    manifest = network.write_manifest()
    return [await run_step(step, network, manifest) for step in (steps if steps is not None else demo_steps())]


def print_table(results: Sequence[StepResult], out: TextIO) -> None:
    """The tour's table: caller force, application, method, call type, expected, got."""
    head = ("caller force", "application", "method", "call type", "expected", "got", "", "what it shows")
    rows = [
        (
            r.step.caller,
            r.step.application,
            r.step.method,
            r.step.call_type,
            r.step.expected,
            r.got,
            "ok" if r.ok else "UNEXPECTED",
            r.step.note,
        )
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*head), file=out)
    print(line.format(*("-" * w for w in widths)), file=out)
    for row in rows:
        print(line.format(*row), file=out)
    failed = sum(not r.ok for r in results)
    print(
        f"\n{len(results) - failed} of {len(results)} steps as expected" + (f"; {failed} NOT" if failed else ""),
        file=out,
    )
