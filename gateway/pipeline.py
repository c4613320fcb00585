"""The checks a call passes through, as a sequence of named stages.

A `Call` collects what the gateway learns about one call (who the peer is,
where it goes, the officer, the purpose, the envelope, the decision). A
`Stage` looks at the call and either adds to it or refuses it by raising a
`GatewayError`. A `Pipeline` runs stages in order and records which stage
refused. Each listener has its own pipeline; each issue adds its stage in one
place (`gateway.server.build_pipelines`).

Stages are small and mostly pure: the ones here take their inputs from the
call and from values given at construction (a trust store getter, the
directory, a clock); none opens a socket.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.clock import Clock
from gateway.directory import NetworkDirectory, Route
from gateway.errors import DeadlineExceeded, GatewayError, InvalidArgument, PermissionDenied, Unauthenticated
from gateway.identity import PeerIdentity, TrustStore, Usage
from gateway.ids import new_id
from gateway.metadata import check_forwarded_size, split_metadata
from gateway.policy.values import Decision, DecisionRequest
from gateway.principal import Principal, Purpose
from gateway.purpose import PURPOSE_KEYS, PurposeConfig, parse_purpose
from gateway.token import TokenVerifier

__all__ = [
    "Call",
    "DeadlineStage",
    "Listener",
    "MetadataStage",
    "PeerIdentityStage",
    "Pipeline",
    "PolicyStage",
    "PurposeStage",
    "RouteStage",
    "Stage",
    "TokenStage",
    "new_request_id",
]


class Listener(enum.StrEnum):
    """Which listener a call arrived on."""

    LOCAL = "local"
    PEER = "peer"


def new_request_id() -> str:
    """A fresh 128-bit request id, hex (`gateway.ids`)."""
    return new_id()


@dataclass
class Call:
    """What the gateway knows about one call, filled in stage by stage."""

    listener: Listener
    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    peer_certificate: bytes | None
    started_at: float
    started_mono: float
    deadline_mono: float | None = None
    request_id: str = field(default_factory=new_request_id)
    peer: PeerIdentity | None = None
    route: Route | None = None
    token: str | None = None
    principal: Principal | None = None
    purpose_fields: Mapping[str, str] = field(default_factory=dict)
    purpose: Purpose | None = None
    passthrough: tuple[tuple[str, str | bytes], ...] = ()
    #: the verified request envelope (peer listener), from gateway.envelope
    envelope: Any = None
    #: the policy decision, from gateway.policy
    decision: Decision | None = None
    #: the first relay frame or request, read before the envelope stage
    relay_request: Any = None
    origin_force: str | None = None
    origin_gateway: str | None = None
    refusal: GatewayError | None = None
    refusal_stage: str | None = None
    request_digest: bytes = b""
    request_messages: int = 0
    response_digest: bytes = b""
    response_messages: int = 0
    envelope_signature: bytes = b""
    seal_signature: bytes = b""
    status: str = ""
    status_message: str = ""

    def remaining(self, now_mono: float) -> float | None:
        """Seconds left before the call's deadline, or None if it has none."""
        if self.deadline_mono is None:
            return None
        return self.deadline_mono - now_mono


class Stage(Protocol):
    """One check a call passes through."""

    name: str

    async def __call__(self, call: Call) -> None:
        """Add to `call`, or refuse it by raising a `GatewayError`."""
        ...


class Pipeline:
    """Named stages run in order; the first refusal stops the call.

    `observe`, if given, is told each stage's name and duration in seconds (metrics).
    """

    def __init__(self, stages: Sequence[Stage], *, observe: Callable[[str, float], None] | None = None) -> None:
        self.stages = tuple(stages)
        self._observe = observe

    @property
    def names(self) -> tuple[str, ...]:
        """The stage names, in order."""
        return tuple(s.name for s in self.stages)

    async def admit(self, call: Call) -> None:
        """Run every stage; on refusal, note the stage in the call and re-raise."""
        observe = self._observe
        for stage in self.stages:
            started = time.perf_counter()
            try:
                await stage(call)
            except GatewayError as exc:
                call.refusal = exc
                call.refusal_stage = stage.name
                raise
            finally:
                if observe is not None:
                    observe(stage.name, time.perf_counter() - started)


class PeerIdentityStage:
    """The TLS peer's certificate: a verified identity fit for this listener.

    Local listener: an application of this force (one the directory lists as
    hosted by, or a client of, this force). Peer listener: the gateway of
    another force in the directory.
    """

    name = "peer-identity"

    def __init__(
        self,
        listener: Listener,
        *,
        force: str,
        trust: Callable[[], TrustStore],
        directory: Callable[[], NetworkDirectory],
        clock: Clock,
    ) -> None:
        self.listener = listener
        self.force = force
        self._trust = trust
        self._directory = directory
        self._clock = clock

    async def __call__(self, call: Call) -> None:
        """Verify `call.peer_certificate` and pin it to this listener's role."""
        if not call.peer_certificate:
            raise Unauthenticated("no client certificate")
        identity = self._trust().verify(call.peer_certificate, Usage.CLIENT, self._clock.now())
        if self.listener is Listener.LOCAL:
            if identity.force != self.force:
                raise Unauthenticated(
                    f"{identity.spiffe_id} is of force {identity.force}; local listener is {self.force}'s"
                )
            directory = self._directory()
            own = directory.forces[self.force]
            hosted = {a.name for a in directory.applications.values() if a.host == self.force}
            if identity.kind != "app" or identity.app not in (set(own.clients) | hosted):
                raise Unauthenticated(f"{identity.spiffe_id} is not an application of {self.force} in the directory")
        else:
            if identity.kind != "gateway":
                raise Unauthenticated(f"{identity.spiffe_id} is not a gateway; peer listener takes gateways only")
            if identity.force == self.force:
                raise Unauthenticated(f"{identity.spiffe_id} is this force's own gateway, not a peer")
        call.peer = identity


class RouteStage:
    """The gRPC method -> application -> host force, through the directory."""

    name = "route"

    def __init__(self, directory: Callable[[], NetworkDirectory], *, force: str, listener: Listener) -> None:
        self._directory = directory
        self.force = force
        self.listener = listener

    async def __call__(self, call: Call) -> None:
        """Set `call.route`; `NotFound` for a method no application serves.

        On the peer listener, also `PermissionDenied` for a method this force does not host, and
        `InvalidArgument` for an envelope that signs another call type than the directory's for
        the method: what the envelope's digests cover depends on it (a client-stream envelope
        signs no request message, so posing a server stream as one would bring the backend a
        request nothing signed).
        """
        route = self._directory().route(call.method)
        if self.listener is Listener.PEER:
            if route.host != self.force:
                # A peer may only ask for what this force hosts: no onward relaying.
                raise PermissionDenied(
                    f"{call.method} is hosted by {route.host}, not by {self.force}: no transit relaying"
                )
            signed = call.envelope.value.call_type if call.envelope is not None else None
            if signed is not None and signed is not route.method.call_type:
                raise InvalidArgument(
                    f"the envelope signs a {signed} call, but {call.method} is {route.method.call_type}"
                )
        call.route = route


class DeadlineStage:
    """Every call gets a deadline: the caller's, the default if none, refused if out of bounds."""

    name = "deadline"

    def __init__(self, *, default: float, maximum: float, clock: Clock) -> None:
        self.default = default
        self.maximum = maximum
        self._clock = clock

    async def __call__(self, call: Call) -> None:
        """Set `call.deadline_mono` (the caller's time_remaining was put there by the edge)."""
        now = self._clock.monotonic()
        if call.deadline_mono is None:
            call.deadline_mono = now + self.default
            return
        remaining = call.deadline_mono - now
        if remaining <= 0:
            raise DeadlineExceeded("deadline already passed on arrival")
        if remaining > self.maximum:
            # Capped, not refused: a caller asking for "forever" gets the longest we allow.
            call.deadline_mono = now + self.maximum


class MetadataStage:
    """Header hygiene: sort the application's metadata into token, purpose and pass-through."""

    name = "metadata"

    def __init__(self, *, max_entries: int, max_bytes: int, max_forwarded_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_forwarded_bytes = max_forwarded_bytes

    async def __call__(self, call: Call) -> None:
        """Refuse the gateway's own headers and oversized metadata; keep the rest apart."""
        md = split_metadata(call.metadata, max_entries=self.max_entries, max_total_bytes=self.max_bytes)
        check_forwarded_size(md.passthrough, self.max_forwarded_bytes, what="metadata to forward")
        call.token = md.token
        call.purpose_fields = md.purpose_fields
        call.passthrough = md.passthrough


class TokenStage:
    """The officer: a verified token of this force's identity provider."""

    name = "token"

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def __call__(self, call: Call) -> None:
        """Set `call.principal` from the token (refused if absent or not verified)."""
        call.principal = await self._verifier.verify(call.token)


class PurposeStage:
    """The purpose (DPA 2018 s62): justification code, case reference, free text."""

    name = "purpose"

    #: parsed purposes kept at most; past it the cache starts again
    _CACHE_SIZE = 1024

    def __init__(self, config: PurposeConfig) -> None:
        self._config = config
        #: purposes parsed recently, by their three raw values (an application often repeats one for many calls)
        self._parsed: dict[tuple[object, ...], Purpose] = {}

    async def __call__(self, call: Call) -> None:
        """Set `call.purpose`; `InvalidArgument` if missing or malformed."""
        fields = call.purpose_fields
        key = tuple(fields.get(k) for k in PURPOSE_KEYS) if len(fields) == len(PURPOSE_KEYS) else None
        purpose = self._parsed.get(key) if key is not None else None
        if purpose is None:
            # Only what parsed cleanly is kept: a refusal is worked out, and its reason given, every time.
            purpose = parse_purpose(fields, self._config)
            if key is not None:
                if len(self._parsed) >= self._CACHE_SIZE:
                    self._parsed.clear()
                self._parsed[key] = purpose
        call.purpose = purpose


class PolicyStage:
    """Policy: may this officer, from this origin force, call this method (deny by default).

    The origin force is the TLS peer's (the local force on the local listener,
    the relaying gateway's force on the peer listener), never a token claim.
    The caller learns only the decision id and policy version; the audit log
    gets the rule and the full reason.
    """

    name = "policy"

    def __init__(self, decide: Callable[[DecisionRequest], Decision], *, own_force: str) -> None:
        self._decide = decide
        self._own = own_force

    async def __call__(self, call: Call) -> None:
        """Set `call.decision`; `PermissionDenied` unless allowed."""
        if call.principal is None:
            raise PermissionDenied("no verified principal to decide for")
        origin = call.origin_force if call.listener is Listener.PEER else self._own
        if origin is None:
            raise PermissionDenied("no origin force to decide for")
        principal = call.principal
        decision = self._decide(
            DecisionRequest(origin, principal.units, principal.roles, principal.clearance, call.method)
        )
        call.decision = decision
        if not decision.allowed:
            raise PermissionDenied(
                decision.reason,
                public=f"permission denied (decision {decision.decision_id}, policy {decision.policy_version})",
            )
