"""The live policy: atomic swap under concurrent decisions, last good kept, shadow mode."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from gateway.directory import NetworkDirectory
from gateway.errors import ConfigError
from gateway.policy import Disagreement, Policy, PolicyConfig, PolicyHolder, ShadowPolicy, load_policy
from gateway.tomlconf import TomlFile

from .conftest import POLICIES, request

SEARCH = "/psn.demo.intel.v1.IntelligenceSearch/Search"
PROBE = request("hampshire", SEARCH, units=("jou",))
JOU_ROW = "p, unit:jou, hampshire, /psn.demo.intel.v1.IntelligenceSearch/Search, allow\n"


@pytest.fixture
def two_policies(tmp_path: Path) -> tuple[Path, Path]:
    """Policy A allows PROBE; policy B is A without that grant."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(POLICIES, a)
    shutil.copytree(POLICIES, b)
    rules = b / "rules" / "intel-search.csv"
    text = rules.read_text()
    assert JOU_ROW in text
    rules.write_text(text.replace(JOU_ROW, ""))
    return a, b


def test_reload_swaps_in_the_new_policy(two_policies: tuple[Path, Path], directory: NetworkDirectory) -> None:
    a, b = two_policies
    holder = PolicyHolder(load_policy(a, directory), isolate=False)
    old = holder.current
    assert holder.decide(PROBE).allowed
    new = holder.reload(b, directory)
    assert holder.current is new is not old
    assert new.version != old.version
    assert not holder.decide(PROBE).allowed
    assert (holder.reloads, holder.reload_failures, holder.last_error) == (1, 0, None)


def test_a_decision_in_flight_keeps_its_policy(two_policies: tuple[Path, Path], directory: NetworkDirectory) -> None:
    a, b = two_policies
    holder = PolicyHolder(load_policy(a, directory), isolate=False)
    policy = holder.current  # what a call read when it started
    holder.reload(b, directory)
    decision = policy.decide(PROBE)
    assert decision.allowed
    assert decision.policy_version == policy.version


def test_reload_under_concurrent_decisions_gives_no_wrong_answer(
    two_policies: tuple[Path, Path], directory: NetworkDirectory
) -> None:
    a, b = two_policies
    holder = PolicyHolder(load_policy(a, directory), isolate=False)
    rule = holder.current.decide(PROBE).rule
    assert rule is not None and rule.endswith(JOU_ROW.strip())
    expected = {
        load_policy(a, directory).version: (True, rule),
        load_policy(b, directory).version: (False, None),
    }
    seen: dict[str, int] = dict.fromkeys(expected, 0)
    wrong: list[object] = []
    stop = threading.Event()
    lock = threading.Lock()

    def decide_loop() -> None:
        counts = dict.fromkeys(expected, 0)
        while not stop.is_set():
            decision = holder.current.decide(PROBE)
            if expected.get(decision.policy_version) != (decision.allowed, decision.rule) and len(wrong) < 10:
                wrong.append(decision)
            counts[decision.policy_version] += 1
        with lock:
            for version, n in counts.items():
                seen[version] += n

    threads = [threading.Thread(target=decide_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(12):
            holder.reload(b if i % 2 == 0 else a, directory)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert wrong == []
    assert all(n > 0 for n in seen.values()), seen
    assert holder.reloads == 12


def test_isolated_reload_under_decisions(two_policies: tuple[Path, Path], directory: NetworkDirectory) -> None:
    a, b = two_policies
    holder = PolicyHolder(load_policy(a, directory))  # isolate=True: casbin in a child process
    stop = threading.Event()
    answers: set[tuple[str, bool]] = set()

    def decide_loop() -> None:
        while not stop.is_set():
            decision = holder.current.decide(PROBE)
            answers.add((decision.policy_version, decision.allowed))

    thread = threading.Thread(target=decide_loop)
    thread.start()
    try:
        holder.reload(b, directory)
        holder.reload(a, directory)
    finally:
        stop.set()
        thread.join()
    va, vb = load_policy(a, directory).version, load_policy(b, directory).version
    assert answers <= {(va, True), (vb, False)}
    assert (vb, False) in answers


def test_an_unexpected_error_while_loading_keeps_the_old_policy(
    policy: Policy, directory: NetworkDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.policy import live

    def explode(*args: object, **kwargs: object) -> Policy:
        raise KeyError("bug")

    monkeypatch.setattr(live, "load_policy", explode)
    holder = PolicyHolder(policy)
    with pytest.raises(ConfigError, match="internal error"):
        holder.reload(POLICIES, directory)
    assert holder.current is policy
    assert holder.reload_failures == 1
    assert holder.last_error is not None and "KeyError" in holder.last_error


# -- shadow mode -------------------------------------------------------------------------


def test_shadow_reports_disagreements_and_enforces_nothing(
    two_policies: tuple[Path, Path], directory: NetworkDirectory
) -> None:
    a, b = two_policies
    live, candidate = load_policy(a, directory), load_policy(b, directory)
    reported: list[Disagreement] = []
    shadow = ShadowPolicy(PolicyHolder(live), candidate, reported.append)

    decision = shadow.decide(PROBE)
    assert decision.allowed  # the live policy decides
    assert decision.policy_version == live.version
    assert decision.shadow is not None
    assert (decision.shadow.allowed, decision.shadow.agrees, decision.shadow.policy_version) == (
        False,
        False,
        candidate.version,
    )
    assert len(reported) == 1
    assert reported[0].request == PROBE
    assert reported[0].live.allowed and not reported[0].candidate.allowed

    same = shadow.decide(request("hampshire", SEARCH, units=("serocu",)))
    assert same.allowed and same.shadow is not None and same.shadow.agrees
    assert len(reported) == 1
    assert (shadow.evaluated, shadow.disagreements) == (2, 1)


def test_shadow_failures_never_touch_the_live_decision(
    two_policies: tuple[Path, Path], directory: NetworkDirectory
) -> None:
    a, b = two_policies
    live, candidate = load_policy(a, directory), load_policy(b, directory)

    def failing_callback(_: Disagreement) -> None:
        raise RuntimeError("log sink down")

    shadow = ShadowPolicy(live, candidate, failing_callback)
    assert shadow.decide(PROBE).allowed

    class Broken:
        version = "sha256:broken"

        def decide(self, _request: object) -> None:
            raise RuntimeError("bug")

    shadow = ShadowPolicy(live, Broken())  # type: ignore[arg-type]
    decision = shadow.decide(PROBE)
    assert decision.allowed
    assert decision.shadow is None


# -- config ------------------------------------------------------------------------------


def test_policy_config_from_section(tmp_path: Path) -> None:
    file = TomlFile.parse(b'[policy]\ndir = "policies"\nshadow_dir = "candidate"\n', tmp_path / "gateway.toml")
    config = PolicyConfig.from_section(file.root().table("policy"))
    assert config == PolicyConfig(tmp_path / "policies", tmp_path / "candidate")
    bad = TomlFile.parse(b'[policy]\ndir = "policies"\nwatch = true\n', tmp_path / "gateway.toml")
    with pytest.raises(ConfigError, match=r"gateway\.toml:3: policy\.watch: unknown key"):
        PolicyConfig.from_section(bad.root().table("policy"))


def test_a_reload_against_the_same_directory_shares_its_index(
    two_policies: tuple[Path, Path], directory: NetworkDirectory
) -> None:
    from gateway.directory import load_directory

    a, b = two_policies
    holder = PolicyHolder(load_policy(a, directory), isolate=False)
    old = holder.current
    new = holder.reload(b, directory)
    assert new._index is old._index
    another = load_directory(POLICIES / "directory.example.toml")  # equal, but another object
    newer = holder.reload(a, another)
    assert newer._index is not new._index
    assert newer.directory is another
