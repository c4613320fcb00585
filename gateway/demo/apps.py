"""The three demo applications and a raw echo backend, as small real gRPC servers.

- intelligence search (hosted by Thames Valley): unary `Search`, server-streaming `StreamMatches`;
- custody records (hosted by Hampshire): unary `GetRecord`, client-streaming `BulkLookup`;
- case files (hosted by Surrey): server-streaming `FetchDocument`, bidirectional `Review`.

All data is deterministic and obviously fictional. Each application serves
mTLS and only answers its own force's gateway (the SPIFFE ID in the client
certificate), as a hosted application behind psn-gateway should. The echo
backend answers any method with the bytes it was sent; the benchmark uses it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gateway._proto.psn.demo.casefiles.v1 import casefiles_pb2, casefiles_pb2_grpc
from gateway._proto.psn.demo.custody.v1 import custody_pb2, custody_pb2_grpc
from gateway._proto.psn.demo.intel.v1 import intel_pb2, intel_pb2_grpc

__all__ = [
    "APPLICATIONS",
    "AppServer",
    "CaseFiles",
    "CustodyRecords",
    "IntelligenceSearch",
    "document_bytes",
    "start_app",
]

_REPORTS = (
    ("IR-0001", "FICTIONAL SUBJECT ALPHA", "B2", "Seen at a fictional address in Exampletown."),
    ("IR-0002", "FICTIONAL SUBJECT ALPHA", "C3", "Associated with a fictional vehicle, index AB00 CDE."),
    ("IR-0003", "FICTIONAL SUBJECT BRAVO", "A1", "Fictional report: no real person."),
    ("IR-0004", "FICTIONAL SUBJECT ALPHA", "B3", "Fictional report of a meeting in Sampleford."),
    ("IR-0005", "FICTIONAL SUBJECT CHARLIE", "E5", "Unverified fictional information."),
)

_CUSTODY = {
    f"HC/{n:05d}/26": custody_pb2.CustodyRecord(
        custody_number=f"HC/{n:05d}/26",
        detainee=f"FICTIONAL DETAINEE {n}",
        station=("Exampletown", "Sampleford", "Demoport")[n % 3],
        offence=("Fictional offence A", "Fictional offence B")[n % 2],
        status=("In custody", "Released under investigation", "Charged")[n % 3],
    )
    for n in range(1, 51)
}


def document_bytes(case_reference: str, document_id: str, size: int = 64 * 1024) -> bytes:
    """A deterministic fictional document of `size` bytes."""
    out = bytearray()
    block = 0
    while len(out) < size:
        line = f"{case_reference} {document_id} fictional paragraph {block}: "
        out += line.encode() + hashlib.sha256(line.encode()).hexdigest().encode() + b"\n"
        block += 1
    return bytes(out[:size])


def _caller(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    return next(iter(context.auth_context().get("peer_spiffe_id", ())), b"").decode() or None


async def _only_gateway(context: grpc.aio.ServicerContext[Any, Any], allowed: str) -> None:
    caller = _caller(context)
    if caller != allowed:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "only this force's gateway may call this application")


class IntelligenceSearch(intel_pb2_grpc.IntelligenceSearchServicer):
    """Fictional intelligence reports, hosted by Thames Valley."""

    def __init__(self, allowed_caller: str) -> None:
        self._allowed = allowed_caller

    def _find(self, request: intel_pb2.SearchRequest) -> list[intel_pb2.Match]:
        limit = request.max_results or 10
        subject = request.subject.upper()
        return [
            intel_pb2.Match(report_id=r, subject=s, grading=g, summary=t) for r, s, g, t in _REPORTS if subject in s
        ][:limit]

    async def Search(  # gRPC method name
        self, request: intel_pb2.SearchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> intel_pb2.SearchResponse:
        """All matching reports at once."""
        await _only_gateway(context, self._allowed)
        if not request.subject:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "subject is required")
        return intel_pb2.SearchResponse(matches=self._find(request))

    async def StreamMatches(  # gRPC method name
        self, request: intel_pb2.SearchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[intel_pb2.Match]:
        """Matching reports one by one."""
        await _only_gateway(context, self._allowed)
        for match in self._find(request):
            yield match


class CustodyRecords(custody_pb2_grpc.CustodyRecordsServicer):
    """Fictional custody records, hosted by Hampshire."""

    def __init__(self, allowed_caller: str) -> None:
        self._allowed = allowed_caller

    async def GetRecord(  # gRPC method name
        self, request: custody_pb2.GetRecordRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> custody_pb2.CustodyRecord:
        """One record; NOT_FOUND with status details if there is none."""
        await _only_gateway(context, self._allowed)
        record = _CUSTODY.get(request.custody_number)
        if record is None:
            detail = custody_pb2.NotFoundDetail(
                custody_number=request.custody_number, hint="numbers run HC/00001/26-HC/00050/26"
            )
            status = custody_pb2.ErrorStatus(code=grpc.StatusCode.NOT_FOUND.value[0], message="no such custody record")
            status.details.add().Pack(detail)
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "no such custody record",
                trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
            )
        return record

    async def BulkLookup(  # gRPC method name
        self, request_iterator: AsyncIterator[custody_pb2.GetRecordRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> custody_pb2.BulkLookupSummary:
        """Many numbers in, one summary out."""
        await _only_gateway(context, self._allowed)
        summary = custody_pb2.BulkLookupSummary()
        async for request in request_iterator:
            record = _CUSTODY.get(request.custody_number)
            if record is None:
                summary.not_found.append(request.custody_number)
            else:
                summary.found.append(record)
        return summary


class CaseFiles(casefiles_pb2_grpc.CaseFilesServicer):
    """Fictional case files, hosted by Surrey."""

    def __init__(self, allowed_caller: str) -> None:
        self._allowed = allowed_caller

    async def FetchDocument(  # gRPC method name
        self, request: casefiles_pb2.FetchDocumentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[casefiles_pb2.DocumentChunk]:
        """The document in chunks of `chunk_size` bytes (default 16 KiB)."""
        await _only_gateway(context, self._allowed)
        data = document_bytes(request.case_reference, request.document_id)
        size = min(max(request.chunk_size or 16384, 1024), 1 << 20)
        for offset in range(0, len(data), size):
            yield casefiles_pb2.DocumentChunk(
                offset=offset, data=data[offset : offset + size], last=offset + size >= len(data)
            )

    async def Review(  # gRPC method name
        self, request_iterator: AsyncIterator[casefiles_pb2.ReviewComment], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[casefiles_pb2.ReviewAck]:
        """An acknowledgement for each comment, as it arrives."""
        await _only_gateway(context, self._allowed)
        n = 0
        async for comment in request_iterator:
            n += 1
            status = "noted" if comment.comment else "empty comment ignored"
            yield casefiles_pb2.ReviewAck(sequence=n, paragraph=comment.paragraph, status=status)


class _Echo(grpc.GenericRpcHandler):
    """Any method: unary echoes, streams echo each message, client streams return the last."""

    def __init__(self, allowed_caller: str) -> None:
        self._allowed = allowed_caller

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        method = handler_call_details.method
        allowed = self._allowed

        async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            await _only_gateway(context, allowed)
            return request

        async def stream(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> AsyncIterator[bytes]:
            await _only_gateway(context, allowed)
            if method.endswith("/ServerStream"):
                # The request says how many bytes to send back, in 64 KiB messages.
                total = int((await anext(requests)).decode() or "0")
                chunk = b"x" * 65536
                while total > 0:
                    yield chunk[: min(total, len(chunk))]
                    total -= len(chunk)
                return
            last = b""
            async for message in requests:
                last = message
                if method.endswith("/Bidi"):
                    yield message
            if method.endswith("/ClientStream"):
                yield last

        if method.endswith("/Unary"):
            return grpc.unary_unary_rpc_method_handler(unary)
        return grpc.stream_stream_rpc_method_handler(stream)


@dataclass(frozen=True)
class _AppKind:
    register: Callable[[str, grpc.aio.Server], None]


def _register_intel(allowed: str, server: grpc.aio.Server) -> None:
    intel_pb2_grpc.add_IntelligenceSearchServicer_to_server(IntelligenceSearch(allowed), server)


def _register_custody(allowed: str, server: grpc.aio.Server) -> None:
    custody_pb2_grpc.add_CustodyRecordsServicer_to_server(CustodyRecords(allowed), server)


def _register_casefiles(allowed: str, server: grpc.aio.Server) -> None:
    casefiles_pb2_grpc.add_CaseFilesServicer_to_server(CaseFiles(allowed), server)


def _register_echo(allowed: str, server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((_Echo(allowed),))


#: The demo applications by name, as the demo directory names them.
APPLICATIONS: dict[str, _AppKind] = {
    "intel-search": _AppKind(_register_intel),
    "custody-records": _AppKind(_register_custody),
    "case-files": _AppKind(_register_casefiles),
    "echo": _AppKind(_register_echo),
}


@dataclass
class AppServer:
    """A running demo application."""

    name: str
    server: grpc.aio.Server
    port: int

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving."""
        await self.server.stop(grace)


async def start_app(
    kind: str,
    *,
    listen: str,
    cert: Path,
    key: Path,
    ca: Path,
    allowed_caller: str,
    max_message_bytes: int = 8 * 1024 * 1024,
) -> AppServer:
    """Start demo application `kind` on `listen` with mTLS (clients from `ca`, only `allowed_caller`)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    APPLICATIONS[kind].register(allowed_caller, server)
    creds = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=ca.read_bytes(), require_client_auth=True
    )
    port = server.add_secure_port(listen, creds)
    await server.start()
    return AppServer(kind, server, port)


async def serve_forever(app: AppServer) -> None:
    """Serve until cancelled."""
    try:
        await app.server.wait_for_termination()
    finally:
        await asyncio.shield(app.stop())
