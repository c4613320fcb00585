"""The audit stage: every call, allowed or refused, becomes one durable record at this gateway.

`record_for` turns what the pipeline learned about a call into an
`AuditRecord` (pure). `AuditRecorder` appends it to the force's log and
returns only once it is on disk: the server awaits it before a response, a
stream's first message, or a refusal leaves the gateway. If the log cannot be
written, `AuditUnavailable` propagates and the call is refused (fail closed).
"""

from __future__ import annotations

import base64
import logging

from gateway.audit.record import AuditRecord, format_time
from gateway.audit.store import AuditLog
from gateway.clock import Clock
from gateway.pipeline import Call, Listener

__all__ = ["AuditRecorder", "record_for"]

calls_log = logging.getLogger("psngw.calls")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii") if data else ""


def record_for(call: Call, event: str, *, gateway: str, force: str, now: float, now_mono: float) -> AuditRecord:
    """The audit record of `call` at this gateway, for `event` (call, stream-open, stream-close)."""
    principal = call.principal
    purpose = call.purpose
    route = call.route
    decision = call.decision
    if call.listener is Listener.LOCAL:
        origin_force, origin_gateway = force, gateway
    else:
        origin_force = call.origin_force or (call.peer.force if call.peer else "")
        origin_gateway = call.origin_gateway or (call.peer.spiffe_id if call.peer else "")
    units = principal.units if principal else ()
    # `from_fields` runs the constructor's checks without its forty frozen-attribute assignments.
    return AuditRecord.from_fields(
        {
            "event": event,
            "time": format_time(now),
            "gateway": gateway,
            "force": force,
            "request_id": call.request_id,
            "peer": call.peer.spiffe_id if call.peer else "",
            "origin_force": origin_force,
            "origin_gateway": origin_gateway,
            "officer_id": principal.officer_id if principal else "",
            "units": units,
            "roles": principal.roles if principal else (),
            "clearance": principal.clearance if principal else "",
            "purpose_code": purpose.justification if purpose else "",
            "purpose_case": purpose.case_reference if purpose else "",
            "purpose_text": purpose.text if purpose else "",
            "application": route.application.name if route else "",
            "method": call.method,
            "call_type": route.method.call_type.value if route else "",
            "host_force": route.host if route else "",
            "recipients": (origin_force, *units) if origin_force else (),
            "decision_allowed": decision.allowed if decision is not None else None,
            "decision_rule": (decision.rule or "") if decision is not None else "",
            "policy_version": decision.policy_version if decision is not None else "",
            "decision_id": decision.decision_id if decision is not None else "",
            "status": call.status if event != "stream-open" else "",
            "refusal_stage": call.refusal_stage or ("" if call.refusal is None else "forward"),
            "refusal_reason": call.refusal.reason if call.refusal else "",
            "latency_ms": round(max(0.0, now_mono - call.started_mono) * 1000, 3),
            "request_digest": call.request_digest.hex(),
            "response_digest": call.response_digest.hex(),
            "request_messages": call.request_messages,
            "response_messages": call.response_messages,
            "envelope_signature": _b64(call.envelope_signature),
            "seal_signature": _b64(call.seal_signature),
        }
    )


class AuditRecorder:
    """Records calls in the force's audit log (durable) and the operator log."""

    def __init__(self, log: AuditLog, *, gateway: str, force: str, clock: Clock, worker: int = 0) -> None:
        self.log = log
        self._worker = worker
        self._gateway = gateway
        self._force = force
        self._clock = clock

    async def record(self, call: Call, event: str, *, alone: bool = False) -> None:
        """Append the call's record; return once it is on disk (else `AuditUnavailable`).

        `alone`: no other call is in flight in this process (`AuditLog.append`).
        """
        record = record_for(
            call,
            event,
            gateway=self._gateway,
            force=self._force,
            now=self._clock.now(),
            now_mono=self._clock.monotonic(),
        )
        result = await self.log.append(record, alone=alone)
        calls_log.info(
            "%s %s %s",
            event,
            call.method,
            record.status or "-",
            extra={
                "request_id": call.request_id,
                "event": event,
                "listener": call.listener.value,
                "peer": record.peer or None,
                "officer": record.officer_id or None,
                "status": record.status or None,
                "refusal_stage": record.refusal_stage or None,
                "refusal_reason": record.refusal_reason or None,
                "audit_index": result.index,
                "worker": self._worker,
            },
        )
