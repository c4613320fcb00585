"""The one place a gRPC status is chosen for a gateway error.

Every refusal anywhere in the gateway raises a `GatewayError`; the server edge
asks `status_for` which status the caller gets. The caller sees the status and
the error's `public` text only; the full `reason` goes to the audit log.
"""

from __future__ import annotations

import grpc

from gateway import errors

__all__ = ["STATUS_TABLE", "status_for"]

#: Most specific class first: the first matching row wins.
STATUS_TABLE: tuple[tuple[type[errors.GatewayError], grpc.StatusCode], ...] = (
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.InfrastructureError, grpc.StatusCode.UNAVAILABLE),
    (errors.RequestRefused, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.GatewayError, grpc.StatusCode.INTERNAL),
)


def status_for(error: errors.GatewayError) -> grpc.StatusCode:
    """The gRPC status a caller gets for `error`."""
    for kind, code in STATUS_TABLE:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL
