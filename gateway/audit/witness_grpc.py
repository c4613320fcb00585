"""The witness protocol over gRPC between gateways (psn.gateway.v1.Witness).

`GrpcWitnessClient` is how a force's log submits its checkpoints to a peer
force's witness (the `WitnessClient` of `gateway.audit.collector`).
`witness_reply` runs the local `Witness` for a submission that arrived on the
peer listener from an authenticated peer gateway; the server edge calls it.

The client keeps a witness's refusal apart from a witness it cannot reach: a
status saying the witness looked at the checkpoint and refused it is a
`RequestRefused` carrying the witness's status details as its `public` text
(`gateway.audit.witness.conflict_kind` reads a rollback or fork from it); any
other failure is `Unavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Final

import grpc

from gateway._proto.psn.gateway.v1 import witness_pb2
from gateway.audit.witness import ConflictEvidence, Witness, WitnessConflict, WitnessEquivocation
from gateway.errors import RequestRefused, Unavailable

__all__ = ["ADD_CHECKPOINT", "GrpcWitnessClient", "witness_reply"]

ADD_CHECKPOINT = "/psn.gateway.v1.Witness/AddCheckpoint"

#: The statuses of a witness (or its peer listener) that looked at the submission and refused it.
_REFUSED: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


class GrpcWitnessClient:
    """Submits checkpoints to one peer force's witness over its peer listener."""

    def __init__(self, channel: Callable[[], grpc.aio.Channel], *, peer: str, timeout: float) -> None:
        self._channel = channel
        self._peer = peer
        self._timeout = timeout

    async def add_checkpoint(self, old_size: int, proof: list[bytes], note: bytes) -> bytes:
        """Submit; the cosignature line(s), or `WitnessConflict` with the size the witness holds.

        Raises `RequestRefused` (public: the witness's status details) when the witness refused the
        checkpoint, and `Unavailable` when it could not be asked or did not answer.
        """
        call: grpc.aio.UnaryUnaryMultiCallable[witness_pb2.AddCheckpointRequest, witness_pb2.AddCheckpointResponse]
        call = self._channel().unary_unary(
            ADD_CHECKPOINT,
            request_serializer=witness_pb2.AddCheckpointRequest.SerializeToString,
            response_deserializer=witness_pb2.AddCheckpointResponse.FromString,
        )
        request = witness_pb2.AddCheckpointRequest(old_size=old_size, consistency_proof=proof, checkpoint=note)
        try:
            response = await call(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            reason = f"witness of {self._peer}: {code.name}: {details}"
            if code in _REFUSED:
                raise RequestRefused(reason, public=details) from exc
            raise Unavailable(reason) from exc
        if response.WhichOneof("result") == "conflict_size":
            raise WitnessConflict(
                f"witness of {self._peer} holds size {response.conflict_size}", known_size=response.conflict_size
            )
        return response.cosignature


async def witness_reply(
    witness: Witness,
    request: witness_pb2.AddCheckpointRequest,
    *,
    submitter_origin: str,
    submitter: str | None = None,
    on_conflict: Callable[[ConflictEvidence], None] | None = None,
) -> witness_pb2.AddCheckpointResponse:
    """Run the witness on a submission (in a thread: it verifies and writes durably).

    A size conflict is an answer (the size held), not an error; every other
    refusal raises its `GatewayError` for the edge to map to a status.
    `submitter` and `on_conflict` are passed to `Witness.add_checkpoint`
    (`on_conflict` runs in the worker thread).
    """
    proof: Sequence[bytes] = list(request.consistency_proof)
    try:
        signature = await asyncio.to_thread(
            witness.add_checkpoint,
            request.old_size,
            proof,
            request.checkpoint,
            submitter_origin=submitter_origin,
            submitter=submitter,
            on_conflict=on_conflict,
        )
    except WitnessEquivocation:
        raise
    except WitnessConflict as exc:
        return witness_pb2.AddCheckpointResponse(conflict_size=exc.known_size)
    return witness_pb2.AddCheckpointResponse(cosignature=signature.line())
