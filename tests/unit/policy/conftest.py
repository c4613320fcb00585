"""Shared fixtures: the policy in policies/, the example directory, and small policies written on the fly."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from gateway.directory import NetworkDirectory, load_directory, parse_directory
from gateway.policy import DecisionRequest, Policy, load_policy
from gateway.tomlconf import TomlFile

ROOT = Path(__file__).resolve().parents[3]
POLICIES = ROOT / "policies"
DATA = Path(__file__).resolve().parent / "data"

#: A small network for tests that write their own rows.
SMALL_DIRECTORY = b"""
network = "test.psn"
clearance_levels = ["NPPV1", "NPPV2", "SC"]
roles = ["analyst", "supervisor"]

[forces.north]
ca = "pki/north/ca.pem"
peer_address = "127.0.0.1:7001"

[forces.south]
ca = "pki/south/ca.pem"
peer_address = "127.0.0.1:7002"

[units.rocu]
name = "Regional crime unit"

[units.north-cid]
force = "north"

[units.south-cid]
force = "south"

[applications.search]
host = "north"
min_clearance = "NPPV2"
[applications.search.services."t.search.v1.Search"]
Find = "unary"
Stream = "server_stream"

[applications.records]
host = "south"
min_clearance = "NPPV1"
[applications.records.services."t.records.v1.Records"]
Get = "unary"
Bulk = "client_stream"
[applications.records.services."t.records.v1.Admin"]
Purge = "unary"
"""

FIND = "/t.search.v1.Search/Find"
STREAM = "/t.search.v1.Search/Stream"
GET = "/t.records.v1.Records/Get"
BULK = "/t.records.v1.Records/Bulk"
PURGE = "/t.records.v1.Admin/Purge"
SMALL_METHODS = (FIND, STREAM, GET, BULK, PURGE)
SMALL_G2 = (
    "g2, /t.search.v1.Search/*, app:search\n"
    "g2, /t.records.v1.Records/*, app:records\n"
    "g2, /t.records.v1.Admin/*, app:records\n"
)


def small_directory() -> NetworkDirectory:
    """The small test network, parsed from TOML as the gateway parses its directory."""
    return parse_directory(TomlFile.parse(SMALL_DIRECTORY, "small-directory.toml"))


def write_policy(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """A policy directory under `root`: the real model.conf plus `files` (relative name -> content)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(POLICIES / "model.conf", root / "model.conf")
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def request(
    force: str, method: str, units: tuple[str, ...] = (), roles: tuple[str, ...] = (), clearance: str = "SC"
) -> DecisionRequest:
    """A decision request, briefly."""
    return DecisionRequest(force, units, roles, clearance, method)


@pytest.fixture(scope="session")
def directory() -> NetworkDirectory:
    """The example directory the real policy is written against."""
    return load_directory(POLICIES / "directory.example.toml")


@pytest.fixture(scope="session")
def policy(directory: NetworkDirectory) -> Policy:
    """The real policy, loaded and checked once."""
    return load_policy(POLICIES, directory)


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    """A writable copy of policies/."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


@pytest.fixture
def small() -> Callable[..., Path]:
    """Write a small policy (rows for the small directory) and return its directory."""
    counter = iter(range(1000))

    def make(tmp: Path, rules: str, groups: str = SMALL_G2, tests: str | None = None) -> Path:
        files: dict[str, str | bytes] = {"groups.csv": groups, "rules/rules.csv": rules}
        if tests is not None:
            files["tests/cases.toml"] = tests
        return write_policy(tmp / f"small-{next(counter)}", files)

    return make
