"""The live policy of a gateway: atomic swap on reload, last good kept, shadow mode.

`PolicyHolder.reload` builds and checks a new policy completely off to the
side (call it from a worker thread, never on the event loop), then swaps it in
with one reference assignment: a call sees the old policy or the new one,
never a mixture. A rejected policy leaves the old one answering and is
recorded in `last_error` and `reload_failures` for health and metrics.

`ShadowPolicy` evaluates a candidate policy beside the live one on real
traffic and reports every disagreement; it enforces nothing.

Owns: `PolicyHolder`, `ShadowPolicy`, `Disagreement`, `PolicyConfig`. Does
not own: watching files or signals (the server does, and calls `reload`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.directory import NetworkDirectory
from gateway.policy.decide import Policy
from gateway.policy.load import load_policy
from gateway.policy.values import Decision, DecisionRequest, Finding, PolicyError, ShadowResult
from gateway.tomlconf import Section

__all__ = ["Disagreement", "PolicyConfig", "PolicyHolder", "ShadowPolicy"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyConfig:
    """The ``[policy]`` table of a gateway config.

    ``dir`` is the policy directory; ``shadow_dir``, if set, a candidate
    policy evaluated beside it in shadow mode (logged, never enforced).
    """

    dir: Path
    shadow_dir: Path | None = None

    @classmethod
    def from_section(cls, sec: Section) -> PolicyConfig:
        """Parse the ``[policy]`` table."""
        out = cls(sec.file_path("dir"), sec.file_path("shadow_dir", None))
        sec.finish()
        return out


class PolicyHolder:
    """The live policy: read `current` per call; `reload` swaps atomically or keeps the old one.

    With `isolate` (the default) a reload checks the new policy against casbin
    in a child process, so the gateway's process only parses and builds.
    """

    def __init__(self, policy: Policy, *, isolate: bool = True) -> None:
        self._current = policy
        self._isolate = isolate
        self._retired: Policy | None = None
        self._reload_lock = threading.Lock()
        #: Why the last reload failed; None after a successful one.
        self.last_error: str | None = None
        #: How many reloads were rejected since start.
        self.reload_failures = 0
        #: How many reloads swapped in a new policy since start.
        self.reloads = 0

    @property
    def current(self) -> Policy:
        """The policy in force now."""
        return self._current

    def decide(self, request: DecisionRequest) -> Decision:
        """Decide `request` on the policy in force now."""
        return self._current.decide(request)

    def reload(self, policy_dir: Path | str, directory: NetworkDirectory) -> Policy:
        """Load `policy_dir` and swap it in; `PolicyError` (old policy kept) if it is rejected.

        Blocking: takes as long as a full load and check. Reloads are
        serialised; decisions never wait for them.
        """
        with self._reload_lock:
            try:
                policy = load_policy(policy_dir, directory, isolate=self._isolate, previous=self._current)
            except PolicyError as exc:
                self._failed(str(exc))
                raise
            except Exception as exc:
                # A bug while loading must not take the gateway down or swap anything in.
                self._failed(f"{policy_dir}: internal error while loading the policy: {exc!r}")
                raise PolicyError(Finding(str(policy_dir), None, f"internal error: {exc!r}")) from exc
            # Keep the outgoing policy referenced until the next reload, so the
            # last reference is never dropped (and a large table freed) on a
            # thread that is deciding a call.
            self._retired = self._current
            self._current = policy
            self.last_error = None
            self.reloads += 1
            _log.info("policy %s loaded from %s", policy.version, policy_dir)
            return policy

    def _failed(self, message: str) -> None:
        self.last_error = message
        self.reload_failures += 1
        _log.warning("policy reload rejected, keeping %s: %s", self._current.version, message)


@dataclass(frozen=True)
class Disagreement:
    """A call on which the candidate policy would have decided differently."""

    request: DecisionRequest
    live: Decision
    candidate: Decision


class ShadowPolicy:
    """A candidate policy evaluated beside the live one; it enforces nothing.

    `decide` returns the live decision (the one to enforce) with `shadow` set
    to what the candidate said; each disagreement is passed to
    `on_disagreement` (a failing callback is logged, never raised).
    """

    def __init__(
        self,
        live: PolicyHolder | Policy,
        candidate: Policy,
        on_disagreement: Callable[[Disagreement], None] | None = None,
    ) -> None:
        self._live = live
        self.candidate = candidate
        self._on_disagreement = on_disagreement
        #: Calls evaluated and disagreements seen (read them for metrics).
        self.evaluated = 0
        self.disagreements = 0
        self._count_lock = threading.Lock()

    def decide(self, request: DecisionRequest) -> Decision:
        """The live decision for `request`, with the candidate's answer attached."""
        live = self._live.decide(request)
        try:
            candidate = self.candidate.decide(request)
        except Exception:  # noqa: BLE001  # shadow mode must never change or break the live decision
            _log.exception("shadow policy %s failed; live decision unchanged", self.candidate.version)
            return live
        agrees = candidate.allowed == live.allowed
        with self._count_lock:
            self.evaluated += 1
            self.disagreements += not agrees
        shadow = ShadowResult(candidate.policy_version, candidate.allowed, candidate.rule, candidate.reason, agrees)
        if not agrees and self._on_disagreement is not None:
            try:
                self._on_disagreement(Disagreement(request, live, candidate))
            except Exception:  # noqa: BLE001  # a failing logger must not break the live decision
                _log.exception("shadow disagreement callback failed")
        return dataclasses.replace(live, shadow=shadow)
