"""The one exception root of psn-gateway, and its two families.

Every error the gateway raises on purpose is a `GatewayError`. Each carries
`reason`, the full explanation for the audit log and the operator's log, and
`public`, the short text a caller may see (never internal detail).

The families are kept apart on purpose (STYLE.md 4):

- `RequestRefused`: the input is bad. A forged signature, a missing purpose, an
  unknown service. Logged and refused; the gateway keeps serving.
- `InfrastructureError`: our own side failed. A backend down, the audit log
  unwritable, revocation data stale. The gate closes (fail closed) until it is
  repaired.
- `ConfigError`: a file an operator or officer wrote is wrong. Names the file,
  line and field; the CLI prints one line and exits 2.

The only place a gRPC status is chosen for these is `gateway.status`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "AuditUnavailable",
    "ConfigError",
    "DeadlineExceeded",
    "GatewayError",
    "InfrastructureError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RequestRefused",
    "ResourceExhausted",
    "RevocationDataUnavailable",
    "Unauthenticated",
    "Unavailable",
]


class GatewayError(Exception):
    """Root of every error psn-gateway raises on purpose."""

    #: What a caller is told when no more specific public text is given.
    default_public = "request failed"

    def __init__(self, reason: str, *, public: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.public = public if public is not None else self.default_public


# -- the input is bad ---------------------------------------------------------


class RequestRefused(GatewayError):
    """The caller's input is bad: refused, logged, and the gateway keeps serving."""

    default_public = "request refused"


class Unauthenticated(RequestRefused):
    """An identity could not be verified: certificate, token, envelope or seal."""

    default_public = "unauthenticated"


class PermissionDenied(RequestRefused):
    """The identity is known but not allowed to do this."""

    default_public = "permission denied"


class InvalidArgument(RequestRefused):
    """The request is malformed: missing purpose, bad metadata, bad frames."""

    default_public = "invalid argument"


class NotFound(RequestRefused):
    """No application in the network directory serves this service or method."""

    default_public = "not found"


class ResourceExhausted(RequestRefused):
    """A size or rate limit was exceeded."""

    default_public = "resource exhausted"


class DeadlineExceeded(RequestRefused):
    """The call's deadline passed, or was outside the allowed bounds."""

    default_public = "deadline exceeded"


# -- our infrastructure failed ------------------------------------------------


class InfrastructureError(GatewayError):
    """The gateway's own side failed; the call is refused until it is repaired."""

    default_public = "unavailable"


class Unavailable(InfrastructureError):
    """A dependency (backend, peer gateway) cannot be reached."""


class AuditUnavailable(Unavailable):
    """The audit log cannot be written durably: the gateway refuses traffic."""


class RevocationDataUnavailable(Unavailable):
    """A force's CRL is missing, unreadable or past nextUpdate plus grace."""


# -- a file is wrong ----------------------------------------------------------


class ConfigError(GatewayError):
    """A configuration, directory or policy file is wrong.

    `str()` gives one line: ``file:line: field: message``.
    """

    default_public = "configuration error"

    def __init__(
        self,
        message: str,
        *,
        file: Path | str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        head = f"{where}: {self.field}: " if self.field else f"{where}: "
        return head + self.message

    def __str__(self) -> str:
        return self._render()
