"""Separate hosts: each force's gateway in its own network namespace, the tour across them, a link cut and healed.

The test makes four namespaces: one per force, and a hub holding a bridge that
joins them (each force's namespace is connected to it by a veth pair). Addresses
come from the documentation range 192.0.2.0/24: the hub's bridge is 192.0.2.1,
the forces 192.0.2.11, .12 and .13. In each force's namespace its demo application
(``python -m gateway.demo.appserve``, on that namespace's loopback) and its gateway
(``psngw serve``, listening on the force's address) run as processes of their own.
The callers (the demo tour, and the probes) run in the hub namespace.

Then Hampshire's link is cut (``ip link set eth0 down`` in its namespace): calls to
its application from the other forces are refused (the caller sees UNAVAILABLE or
DEADLINE_EXCEEDED within the call's deadline, and the origin's log holds the refusal),
while the other two forces keep serving each other. The link is healed and the same
calls succeed again, with no process restarted.

Skipped, with the reason, unless run as root with iproute2's ``ip`` and namespaces
that can be created. No traffic leaves the namespaces the test makes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.network import write_network
from tests.integration._hostile_common import add_to_table, records
from tests.netharness import NetworkThread

pytestmark = [pytest.mark.integration, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
FORCES = {"thames-valley": "tv", "hampshire": "ha", "surrey": "su"}
ADDRESS = {"thames-valley": "192.0.2.11", "hampshire": "192.0.2.12", "surrey": "192.0.2.13"}
HUB_ADDRESS = "192.0.2.1"
APP_KIND = {"thames-valley": "intel-search", "hampshire": "custody-records", "surrey": "case-files"}
PROBE_TIMEOUT = 3.0


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (run as root to test separate hosts)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    name = f"psnt-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


_REASON = _why_not()
if _REASON is not None:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Namespaces:
    """The hub and the three forces' namespaces; removed (with every link in them) on `remove`."""

    def __init__(self) -> None:
        tag = f"psnt{os.getpid() % 100000}"
        self.hub = f"{tag}-hub"
        self.force = {force: f"{tag}-{short}" for force, short in FORCES.items()}
        self.made: list[str] = []

    def make(self) -> None:
        """Namespaces, a bridge in the hub, a veth pair from each force to it; all links up."""
        for ns in (self.hub, *self.force.values()):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", "br0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for force, ns in self.force.items():
            hub_end = f"v{FORCES[force]}"
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", hub_end, "netns", self.hub)
            _ip("-n", ns, "addr", "add", f"{ADDRESS[force]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.hub, "link", "set", hub_end, "master", "br0")
            _ip("-n", self.hub, "link", "set", hub_end, "up")

    def link(self, force: str, state: str) -> None:
        """Set `force`'s link to the hub up or down."""
        _ip("-n", self.force[force], "link", "set", "eth0", state)

    def remove(self) -> None:
        """Delete every namespace made (their veths and the bridge go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _rewrite(layout: Any) -> None:
    """Peer and relay addresses in the directory, and listeners in the configs, on the namespaces' addresses."""
    directory = layout.directory_path.read_text()
    for force in FORCES:
        for port in (layout.ports[force].peer, layout.ports[force].relay):
            directory, n = re.subn(rf'"127\.0\.0\.1:{port}"', f'"{ADDRESS[force]}:{port}"', directory)
            assert n == 1, force
    layout.directory_path.write_text(directory)
    for force, path in layout.configs.items():
        text = path.read_text()
        for port in (layout.ports[force].local, layout.ports[force].peer, layout.ports[force].relay):
            text = text.replace(f'"127.0.0.1:{port}"', f'"{ADDRESS[force]}:{port}"')
        # Short deadlines and a quick breaker, so that a cut shows within the test's time.
        text += "\n[limits]\nmax_deadline_seconds = 10\ndefault_deadline_seconds = 10\npeer_cooldown_seconds = 1\n"
        text = add_to_table(text, "audit", "checkpoint_interval_seconds = 1.0")
        path.write_text(text.replace("checkpoint_interval_seconds = 2.0\n", ""))


class Processes:
    """The processes the test starts, each stopped by its own pid."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, ns: str, argv: list[str]) -> Path:
        """Start `argv` inside namespace `ns`; its output goes to logs/NAME.log."""
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env()
            )
        self.running.append((name, proc))
        return log

    def stop(self) -> None:
        """SIGTERM each (graceful), then SIGKILL what is left after 5 s."""
        for _, proc in self.running:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for _, proc in self.running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def _wait_for_line(log: Path, pattern: str, what: str, procs: Processes, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pattern in log.read_text(errors="replace"):
            return
        for name, proc in procs.running:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text(errors='replace')[-2000:]}")


class Client:
    """Runs the hub-side client (tests/integration/_hostile_netns_client.py) in the hub namespace."""

    def __init__(self, hub: str, layout_file: Path) -> None:
        self.hub = hub
        self.layout_file = layout_file

    def run(self, command: dict[str, Any]) -> Any:
        """Run one command; its JSON result."""
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.hub,
                sys.executable,
                "-m",
                "tests.integration._hostile_netns_client",
                str(self.layout_file),
                json.dumps(command),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(),
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def calls(self, *calls: tuple[str, str, str]) -> list[tuple[str, str, str, float]]:
        """(force, method, officer) calls with the probe timeout: (force, method, status, seconds) each."""
        out = self.run({"calls": [[f, m, PROBE_TIMEOUT, o] for f, m, o in calls]})
        return [(r["force"], r["method"], r["status"], r["seconds"]) for r in out]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Namespaces, Client, Any]]:
    root = tmp_path_factory.mktemp("netns-net")
    layout = write_network(root)
    _rewrite(layout)
    fields = _fields(layout)  # the identity providers' keys do not pickle: the client loads them again
    layout_file = root / "layout.pickle"
    layout_file.write_bytes(pickle.dumps({**fields, "addresses": ADDRESS}))
    spaces = Namespaces()
    procs = Processes(root)
    try:
        spaces.make()
        for force, ns in spaces.force.items():
            app = APP_KIND[force]
            server = layout.material[force].app_servers[app]
            log = procs.start(
                f"app-{force}",
                ns,
                [
                    sys.executable,
                    "-m",
                    "gateway.demo.appserve",
                    "--kind",
                    app,
                    "--listen",
                    f"127.0.0.1:{layout.ports[force].apps[app]}",
                    "--cert",
                    str(server.cert_path),
                    "--key",
                    str(server.key_path),
                    "--ca",
                    str(layout.material[force].ca),
                    "--allowed-caller",
                    layout.directory().forces[force].gateway_spiffe_id,
                    "--loop",
                    "asyncio",
                ],
            )
            _wait_for_line(log, "ready", f"{force}'s application", procs)
        gateway_logs = {
            force: procs.start(
                f"gateway-{force}",
                ns,
                [str(Path(sys.executable).with_name("psngw")), "serve", "--config", str(layout.configs[force]),
                 "--log-format", "text"],
            )
            for force, ns in spaces.force.items()
        }  # fmt: skip
        for force, log in gateway_logs.items():
            _wait_for_line(log, "serving", f"{force}'s gateway", procs)
        yield spaces, Client(spaces.hub, layout_file), layout
    finally:
        procs.stop()
        spaces.remove()


def _fields(layout: Any) -> dict[str, Any]:
    return {
        "root": layout.root,
        "directory_path": layout.directory_path,
        "configs": dict(layout.configs),
        "ports": {f: dataclasses.replace(p, apps=dict(p.apps)) for f, p in layout.ports.items()},
        "material": {
            f: dataclasses.replace(m, app_servers=dict(m.app_servers), app_clients=dict(m.app_clients))
            for f, m in layout.material.items()
        },
        "hosted": dict(layout.hosted),
    }


def _records(layout: Any, force: str, **flt: Any) -> list[Any]:
    fake = NetworkThread.__new__(NetworkThread)
    fake.layout = layout
    return records(fake, force, **flt)


def test_the_tour_across_namespaces_then_a_cut_link_refuses_and_heals(hosts: tuple[Namespaces, Client, Any]) -> None:
    spaces, client, layout = hosts
    # 1. The whole tour, every force's gateway on its own host.
    tour = client.run({"tour": True})
    wrong = [step for step in tour if step["got"] != step["expected"]]
    assert len(tour) >= 25 and not wrong, wrong
    assert _records(layout, "hampshire", origin_force="surrey"), "relays crossed the namespaces"

    # 2. Cut Hampshire off.
    spaces.link("hampshire", "down")
    try:
        cut = client.calls(
            ("surrey", "GetRecord", "DC-CUT-1"),
            ("thames-valley", "GetRecord", "DC-CUT-2"),
            ("surrey", "Search", "DC-CUT-3"),
            ("thames-valley", "FetchDocument", "DC-CUT-4"),
            ("hampshire", "Search", "DC-CUT-5"),
        )
    finally:
        spaces.link("hampshire", "up")
    status = {(f, m): (s, t) for f, m, s, t in cut}
    for caller in ("surrey", "thames-valley"):
        got, seconds = status[(caller, "GetRecord")]
        assert got in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and seconds < PROBE_TIMEOUT + 2, (caller, got, seconds)
    assert status[("surrey", "Search")][0] == "OK"  # the other two forces still serve each other
    assert status[("thames-valley", "FetchDocument")][0] == "OK"
    assert status[("hampshire", "Search")][0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")  # its callers cannot reach it
    # The origin's log holds each refused call. A silent partition (packets dropped, no reset) leaves the
    # relay waiting until the caller's deadline, so the record is the caller giving up (CANCELLED) or the
    # gateway's own deadline; a refused connection is UNAVAILABLE naming the relay.
    for caller, officer in (("surrey", "DC-CUT-1"), ("thames-valley", "DC-CUT-2")):
        deadline = time.monotonic() + 5
        while not (got_records := _records(layout, caller, officer=officer)) and time.monotonic() < deadline:
            time.sleep(0.1)  # a cancelled call is recorded in the background
        [refused] = got_records
        assert refused.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"), refused.status
        assert refused.response_messages == 0 and refused.host_force == "hampshire"
        if refused.status == "UNAVAILABLE":
            assert "relay to hampshire" in refused.refusal_reason, refused.refusal_reason

    # 3. Healed: the same calls succeed again, nobody restarted.
    deadline = time.monotonic() + 20
    while True:
        healed = client.calls(("surrey", "GetRecord", "DC-HEAL"), ("thames-valley", "GetRecord", "DC-HEAL"))
        if all(s == "OK" for _, _, s, _ in healed):
            break
        assert time.monotonic() < deadline, healed
        time.sleep(0.5)
    again = client.calls(("hampshire", "Search", "DC-HEAL"), ("hampshire", "FetchDocument", "DC-HEAL"))
    assert [s for _, _, s, _ in again] == ["OK", "OK"], again
