"""A gateway that cannot start says where, in one line, and exits 2: the config file, its line and the key.

Three kinds of failure at start, each put at the setting an operator has to change:

- a file a setting names (a certificate, a key, the JWKS, a policy folder, a database, a force's CA
  in the directory) that cannot be used: ``gateway.toml:12: tls.cert: pki/x.pem: cannot read: ...``;
- a listener whose port is taken: ``gateway.toml:6: listeners.local: cannot listen on ...``, with
  nothing left listening or running;
- the same through ``psngw serve --check``, which loads everything a start loads and stops, writing
  nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import gateway.server as server_module
from gateway.config import load_config
from gateway.demo.network import write_network
from gateway.errors import ConfigError
from gateway.server import Gateway
from gateway.tomlconf import parse_address

pytestmark = pytest.mark.integration

FORCE = "thames-valley"
CONFIG = f"gateway-{FORCE}.toml"
PSNGW = str(Path(sys.executable).with_name("psngw"))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template")
    write_network(root)
    return root


@pytest.fixture
def net(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a three-force network's files (directory, PKI, configs, policies, JWKS)."""
    root = tmp_path / "net"
    shutil.copytree(template, root)
    return root


def serve(net: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`psngw serve` on the force's config, run from the network's folder (paths in errors are relative)."""
    return subprocess.run(
        [PSNGW, "serve", "--config", CONFIG, "--log-level", "error", *extra],
        cwd=net,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def line_of(path: Path, text: str) -> int:
    """The number of the line of `path` that holds `text`."""
    numbers = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if text in line]
    assert len(numbers) == 1, f"{text!r} is on lines {numbers} of {path}"
    return numbers[0]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    path.write_text(text.replace(old, new))


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The only line of stderr of a command that failed as a config error should: exit 2, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- a file named by a setting ---------------------------------------------------------------------

#: (what to break, then where the error must point: the file with the setting, the text on its line,
#: the key, the file the setting names, and what is wrong with it)
BrokenFile = tuple[Callable[[Path], None], str, str, str, str, str]

BROKEN_FILES: dict[str, BrokenFile] = {
    "tls-cert-missing": (
        lambda net: edit(net / CONFIG, f'cert = "pki/{FORCE}/gateway-tls.pem"', 'cert = "pki/hampshire/nope.pem"'),
        CONFIG,
        'cert = "pki/hampshire/nope.pem"',
        "tls.cert",
        "pki/hampshire/nope.pem",
        "cannot read: No such file or directory",
    ),
    "tls-key-of-another-certificate": (
        lambda net: edit(net / CONFIG, f'key = "pki/{FORCE}/gateway-tls.key"', 'key = "pki/hampshire/gateway-tls.key"'),
        CONFIG,
        'key = "pki/hampshire/gateway-tls.key"',
        "tls.key",
        "pki/hampshire/gateway-tls.key",
        f"private key does not match certificate pki/{FORCE}/gateway-tls.pem",
    ),
    "jwks-file-missing": (
        lambda net: edit(net / CONFIG, f'jwks_file = "idp/{FORCE}/jwks.json"', 'jwks_file = "idp/nope.json"'),
        CONFIG,
        'jwks_file = "idp/nope.json"',
        "tokens.jwks_file",
        "idp/nope.json",
        "cannot read JWKS file: No such file or directory",
    ),
    "policy-dir-missing": (
        lambda net: edit(net / CONFIG, 'dir = "policies"', 'dir = "nope-policies"'),
        CONFIG,
        'dir = "nope-policies"',
        "policy.dir",
        "nope-policies",
        "not a directory",
    ),
    "policy-shadow-dir-missing": (
        lambda net: edit(net / CONFIG, 'dir = "policies"', 'dir = "policies"\nshadow_dir = "nope-shadow"'),
        CONFIG,
        'shadow_dir = "nope-shadow"',
        "policy.shadow_dir",
        "nope-shadow",
        "not a directory",
    ),
    "audit-db-folder-missing": (
        lambda net: edit(net / CONFIG, f'db = "audit/{FORCE}.db"', f'db = "nope/{FORCE}.db"'),
        CONFIG,
        f'db = "nope/{FORCE}.db"',
        "audit.db",
        f"nope/{FORCE}.db",
        "the folder for this database does not exist",
    ),
    "witness-db-corrupt": (
        lambda net: (net / "audit" / f"{FORCE}-witness.db").write_bytes(b"not a database\n" * 300),
        CONFIG,
        f'db = "audit/{FORCE}-witness.db"',
        "witness.db",
        f"audit/{FORCE}-witness.db",
        "not a SQLite database",
    ),
    "directory-ca-missing": (
        lambda net: edit(net / "directory.toml", 'ca = "pki/hampshire/ca.pem"', 'ca = "pki/hampshire/nope-ca.pem"'),
        "directory.toml",
        'ca = "pki/hampshire/nope-ca.pem"',
        "forces.hampshire.ca",
        "pki/hampshire/nope-ca.pem",
        "cannot read CA certificate of force hampshire: No such file or directory",
    ),
}


@pytest.mark.parametrize("check", [False, True], ids=["serve", "serve-check"])
@pytest.mark.parametrize("case", BROKEN_FILES)
def test_a_file_a_setting_names_is_reported_at_that_setting(net: Path, case: str, check: bool) -> None:
    breakage, holder, text, field, named, problem = BROKEN_FILES[case]
    breakage(net)
    line = one_line(serve(net, *(["--check"] if check else [])))
    assert line.startswith(f"psngw: {holder}:{line_of(net / holder, text)}: {field}: {named}: "), line
    assert problem in line, line


@pytest.mark.parametrize("check", [False, True], ids=["serve", "serve-check"])
def test_an_admin_listener_beyond_loopback_is_refused_at_its_line(net: Path, check: bool) -> None:
    config = net / CONFIG
    admin = re.search(r'^admin = "127\.0\.0\.1:(\d+)"$', config.read_text(), re.MULTILINE)
    assert admin is not None
    edit(config, admin.group(0), f'admin = "0.0.0.0:{admin.group(1)}"')
    line = one_line(serve(net, *(["--check"] if check else [])))
    assert line.startswith(
        f"psngw: {CONFIG}:{line_of(config, 'admin = ')}: listeners.admin: '0.0.0.0:{admin.group(1)}' is not a"
        " loopback address;"
    ), line
    assert "allow_remote" not in line  # not a config key: no advice to set it


# -- a listener whose port is taken ---------------------------------------------------------------

LISTENERS = ("local", "peer", "relay", "admin")


def listener_address(config: Path, name: str) -> str:
    found = re.search(rf'^{name} = "([^"]+)"$', config.read_text(), re.MULTILINE)
    assert found is not None, f"no listeners.{name} in {config}"
    return found.group(1)


@contextlib.contextmanager
def taken(address: str) -> Iterator[None]:
    """Someone else listening on `address` meanwhile."""
    host, port = parse_address(address)
    with socket.create_server((host, port)):
        yield


def bindable(address: str) -> bool:
    host, port = parse_address(address)
    try:
        with socket.create_server((host, port)):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("name", LISTENERS)
def test_serve_with_a_listener_port_taken_is_one_line_at_that_listener(net: Path, name: str) -> None:
    address = listener_address(net / CONFIG, name)
    with taken(address):
        line = one_line(serve(net))
    assert line == (
        f"psngw: {CONFIG}:{line_of(net / CONFIG, f'{name} = ')}: listeners.{name}: cannot listen on {address}:"
        " Address already in use"
    )


@pytest.mark.parametrize("when", ["tried-first", "bind-fails"])
@pytest.mark.parametrize("name", LISTENERS)
def test_a_gateway_that_cannot_listen_leaves_nothing_running(
    net: Path, name: str, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the port is found taken before binding anything, or only when the listener binds it."""
    if when == "bind-fails":  # the port is taken between the gateway's try and its listener's bind
        monkeypatch.setattr(server_module, "_bind_problem", lambda address, *, reuse_port: None)
    config = load_config(net / CONFIG)
    addresses = {n: listener_address(net / CONFIG, n) for n in LISTENERS}
    writers_before = {t for t in threading.enumerate() if t.name == "audit-writer"}

    async def main() -> None:
        gateway = Gateway(config)
        with taken(addresses[name]), pytest.raises(ConfigError) as info:
            await gateway.start()
        where = f"{net / CONFIG}:{line_of(net / CONFIG, f'{name} = ')}: listeners.{name}"
        assert str(info.value).startswith(f"{where}: cannot listen on {addresses[name]}: "), str(info.value)
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        again = Gateway(config)  # everything it held was let go: a new gateway starts on the same config
        await again.start()
        await again.stop(0)

    asyncio.run(main())
    assert all(bindable(address) for address in addresses.values()), addresses
    assert {t for t in threading.enumerate() if t.name == "audit-writer" and t.is_alive()} <= writers_before


# -- psngw serve --check ------------------------------------------------------------------------


def test_check_loads_everything_says_ok_and_neither_listens_nor_writes(net: Path) -> None:
    async def run_once() -> None:  # a real start first: the audit and witness databases exist, as in service
        gateway = Gateway(load_config(net / CONFIG))
        await gateway.start()
        await gateway.stop(0)

    asyncio.run(run_once())
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in net.rglob("*")}
    with taken(listener_address(net / CONFIG, "local")):  # it does not try to listen
        result = serve(net, "--check")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert re.fullmatch(rf"{CONFIG}: ok: gateway of {FORCE} in se\.psn \(3 forces, .*\), .*\n", result.stdout)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in net.rglob("*")} == before


def test_check_is_in_serve_help() -> None:
    result = subprocess.run([PSNGW, "serve", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert re.search(r"^  --check +load and check the config and every file it names", result.stdout, re.MULTILINE)


def test_check_warns_of_an_unusable_crl_as_a_start_would_and_still_says_ok(net: Path) -> None:
    (net / "pki" / "surrey" / "crl.pem").unlink()  # a start refuses surrey's certificates until it is back
    result = serve(net, "--check", "--log-level", "warning")
    assert result.returncode == 0, result.stderr
    assert "CRLs usable for 2)" in result.stdout
    assert "surrey" in result.stderr and "crl.pem" in result.stderr
