"""The witness protocol over gRPC between gateways (psn.gateway.v1.Witness).

`GrpcWitnessClient` is how a force's log submits its checkpoints to a peer
force's witness (the `WitnessClient` of `gateway.audit.collector`).
`witness_reply` runs the local `Witness` for a submission that arrived on the
peer listener from an authenticated peer gateway; the server edge calls it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import grpc

from gateway._proto.psn.gateway.v1 import witness_pb2
from gateway.audit.witness import Witness, WitnessConflict, WitnessEquivocation
from gateway.errors import Unavailable

__all__ = ["ADD_CHECKPOINT", "GrpcWitnessClient", "witness_reply"]

ADD_CHECKPOINT = "/psn.gateway.v1.Witness/AddCheckpoint"


class GrpcWitnessClient:
    """Submits checkpoints to one peer force's witness over its peer listener."""

    def __init__(self, channel: Callable[[], grpc.aio.Channel], *, peer: str, timeout: float) -> None:
        self._channel = channel
        self._peer = peer
        self._timeout = timeout

    async def add_checkpoint(self, old_size: int, proof: list[bytes], note: bytes) -> bytes:
        """Submit; the cosignature line(s), or `WitnessConflict` with the size the witness holds."""
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
            raise Unavailable(f"witness of {self._peer}: {exc.code().name}: {exc.details()}") from exc
        if response.WhichOneof("result") == "conflict_size":
            raise WitnessConflict(
                f"witness of {self._peer} holds size {response.conflict_size}", known_size=response.conflict_size
            )
        return response.cosignature


async def witness_reply(
    witness: Witness, request: witness_pb2.AddCheckpointRequest, *, submitter_origin: str
) -> witness_pb2.AddCheckpointResponse:
    """Run the witness on a submission (in a thread: it verifies and writes durably).

    A size conflict is an answer (the size held), not an error; every other
    refusal raises its `GatewayError` for the edge to map to a status.
    """
    proof: Sequence[bytes] = list(request.consistency_proof)
    try:
        signature = await asyncio.to_thread(
            witness.add_checkpoint, request.old_size, proof, request.checkpoint, submitter_origin=submitter_origin
        )
    except WitnessEquivocation:
        raise
    except WitnessConflict as exc:
        return witness_pb2.AddCheckpointResponse(conflict_size=exc.known_size)
    return witness_pb2.AddCheckpointResponse(cosignature=signature.line())
