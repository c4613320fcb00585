"""A whole three-force network on one machine: files, certificates, processes.

`write_network` writes, under one folder, the network directory, a development
PKI for every force (`gateway.pki.init_network`), and one gateway config per
force, on free loopback ports. `DemoNetwork` starts the three gateways and the
demo applications (in this process, on one event loop) and stops them.

The demo tour, `psngw demo up`, the integration tests and the benchmark all
use this module, so they all run the same network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import pki
from gateway.config import GatewayConfig, load_config
from gateway.demo.apps import AppServer, start_app
from gateway.directory import NetworkDirectory, load_directory
from gateway.errors import ConfigError
from gateway.server import Gateway
from gateway.token import DevIdp, init_dev_idp

__all__ = ["FORCES", "DemoNetwork", "NetworkLayout", "free_ports", "write_network"]

NETWORK = "se.psn"

#: force -> (display name, the demo application it hosts)
FORCES: dict[str, tuple[str, str]] = {
    "thames-valley": ("Thames Valley Police", "intel-search"),
    "hampshire": ("Hampshire Constabulary", "custody-records"),
    "surrey": ("Surrey Police", "case-files"),
}

#: The client application every force has (it calls out through its gateway).
CLIENT_APP = "analyst-desk"

#: Justification codes the demo gateways accept.
PURPOSE_CODES = ("investigation", "intelligence-development", "safeguarding", "custody-management", "court-preparation")

_ECHO = """
[applications.echo-{force}]
name = "Raw echo backend at {force} (benchmark)"
host = "{force}"
min_clearance = "NPPV1"
[applications.echo-{force}.services."psn.bench.v1.Echo{n}"]
Unary = "unary"
ServerStream = "server_stream"
ClientStream = "client_stream"
Bidi = "bidi_stream"
"""


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class ForcePorts:
    """The loopback ports of one force's gateway and its hosted applications."""

    local: int
    peer: int
    admin: int
    apps: Mapping[str, int]
    #: the relay link listener (`gateway.relaylink`); 0 when the network has none
    relay: int = 0


@dataclass(frozen=True)
class NetworkLayout:
    """Where everything of a written network is."""

    root: Path
    directory_path: Path
    configs: Mapping[str, Path]
    ports: Mapping[str, ForcePorts]
    material: Mapping[str, pki.ForceMaterial]
    hosted: Mapping[str, tuple[str, ...]]
    idps: Mapping[str, DevIdp]

    def directory(self) -> NetworkDirectory:
        """The network directory."""
        return load_directory(self.directory_path)

    def config(self, force: str) -> GatewayConfig:
        """The gateway config of `force`."""
        return load_config(self.configs[force])

    def local_address(self, force: str) -> str:
        """The local listener address of `force`'s gateway."""
        return f"127.0.0.1:{self.ports[force].local}"


def policies_source() -> Path:
    """The policies/ folder of the source tree: the demo network's policy and directory."""
    path = Path(__file__).resolve().parents[2] / "policies"
    if not (path / "directory.example.toml").is_file():
        raise ConfigError(
            "the demo needs the project's policies/ folder (run it from a clone of psn-gateway)", file=path
        )
    return path


def _directory_text(ports: Mapping[str, ForcePorts], *, echo: bool, relay_links: bool) -> str:
    """The policies' example directory, on this run's loopback ports, with log certificates (and echo apps)."""
    text = (policies_source() / "directory.example.toml").read_text()
    for force in FORCES:
        section = re.compile(rf"(\[forces\.{force}\][^\[]*?)peer_address = \"[^\"]*\"", re.S)
        text, n = section.subn(
            rf'\g<1>peer_address = "127.0.0.1:{ports[force].peer}"\n'
            + (rf'relay_address = "127.0.0.1:{ports[force].relay}"\n' if relay_links else "")
            + rf'log_cert = "pki/{force}/log-signing.pem"',
            text,
        )
        if n != 1:
            raise ConfigError(f"no peer_address for force {force}", file=policies_source() / "directory.example.toml")
    header = "# Generated for the demo from policies/directory.example.toml, on loopback ports.\n"
    text = header + text
    if echo:
        for n, force in enumerate(FORCES, start=1):
            text += _ECHO.format(force=force, n=n)
    return text


def _copy_policies(root: Path, *, echo: bool) -> Path:
    """The policy, copied beside the network (so that tests may edit it), with echo rules for the benchmark."""
    target = root / "policies"
    shutil.copytree(policies_source(), target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.html"))
    if echo:
        with (target / "groups.csv").open("a") as groups:
            groups.write("\n# The benchmark's echo applications (generated).\n")
            for n, force in enumerate(FORCES, start=1):
                groups.write(f"g2, /psn.bench.v1.Echo{n}/*, app:echo-{force}\n")
        rows = [f"p, unit:serocu, {caller}, app:echo-{host}, allow" for host in FORCES for caller in FORCES]
        (target / "rules" / "echo.csv").write_text(
            "# The benchmark's echo applications (generated).\n" + "\n".join(rows) + "\n"
        )
    return target


def _config_text(force: str, ports: ForcePorts, hosted: Iterable[str]) -> str:
    lines = [
        f"# Gateway of {FORCES[force][0]} (generated for the demo)",
        f'force = "{force}"',
        'directory = "directory.toml"',
        "",
        "[listeners]",
        f'local = "127.0.0.1:{ports.local}"',
        f'peer = "127.0.0.1:{ports.peer}"',
        f'admin = "127.0.0.1:{ports.admin}"',
        *([f'relay = "127.0.0.1:{ports.relay}"'] if ports.relay else []),
        "",
        "[tls]",
        f'cert = "pki/{force}/gateway-tls.pem"',
        f'key = "pki/{force}/gateway-tls.key"',
        "",
        "[signing]",
        f'cert = "pki/{force}/gateway-signing.pem"',
        f'key = "pki/{force}/gateway-signing.key"',
        "",
    ]
    lines += [
        "[policy]  # which units may reach which applications (psngw policy ...)",
        'dir = "policies"',
        "",
        "[tokens]  # officer tokens from this force's identity provider (here the UNSAFE development one)",
        f'issuer = "{idp_issuer(force)}"',
        f'audience = "{idp_audience(force)}"',
        'algorithms = ["ES256"]',
        f'jwks_file = "idp/{force}/jwks.json"',
        "",
        "[purpose]  # DPA 2018 s62: every call says why",
        "codes = [" + ", ".join(f'"{c}"' for c in PURPOSE_CODES) + "]",
        "",
        "[audit]  # durable before disclosure: SQLite WAL, synchronous=FULL, group commit",
        f'db = "audit/{force}.db"',
        "checkpoint_interval_seconds = 2.0",
        "witness_quorum = 2",
        "",
        "[log_signing]  # the force's audit-log key: signs checkpoints, cosigns peers' checkpoints",
        f'cert = "pki/{force}/log-signing.pem"',
        f'key = "pki/{force}/log-signing.key"',
        "",
        "[witness]  # what this gateway has cosigned for the other forces' logs",
        f'db = "audit/{force}-witness.db"',
        "",
    ]
    for app in hosted:
        lines += [f"[backends.{app}]", f'address = "127.0.0.1:{ports.apps[app]}"', ""]
    return "\n".join(lines)


def idp_issuer(force: str) -> str:
    """The issuer of `force`'s (development) identity provider."""
    return f"https://idp.{force}.{NETWORK}"


def idp_audience(force: str) -> str:
    """The audience `force`'s gateway expects in officer tokens."""
    return f"psn-gateway/{force}"


def write_network(
    root: Path, *, echo: bool = False, signing_key: str | None = None, relay_links: bool = True
) -> NetworkLayout:
    """Write directory, PKI and configs for the three demo forces under `root`.

    `signing_key` chooses the gateways' envelope-signing key type (``ed25519`` by default, or ``p256``).
    `relay_links=False` leaves out the relay listeners: gateways relay to each other by gRPC only.
    """
    root.mkdir(parents=True, exist_ok=True)
    hosted: dict[str, tuple[str, ...]] = {
        force: (app, *((f"echo-{force}",) if echo else ())) for force, (_, app) in FORCES.items()
    }
    numbers = iter(free_ports(sum(4 + len(apps) for apps in hosted.values())))
    ports = {
        force: ForcePorts(
            next(numbers),
            next(numbers),
            next(numbers),
            {app: next(numbers) for app in hosted[force]},
            next(numbers) if relay_links else 0,
        )
        for force in FORCES
    }
    (root / "audit").mkdir(mode=0o700, exist_ok=True)
    directory_path = root / "directory.toml"
    directory_path.write_text(_directory_text(ports, echo=echo, relay_links=relay_links))
    _copy_policies(root, echo=echo)
    material = pki.init_network(load_directory(directory_path), overwrite=True, signing_key_type=signing_key)
    idps = {force: init_dev_idp(root / "idp" / force, overwrite=True) for force in FORCES}
    configs = {}
    for force in FORCES:
        path = root / f"gateway-{force}.toml"
        path.write_text(_config_text(force, ports[force], hosted[force]))
        configs[force] = path
    return NetworkLayout(root, directory_path, configs, ports, material, hosted, idps)


class DemoNetwork:
    """The three gateways and their hosted applications, running in this process."""

    def __init__(self, layout: NetworkLayout) -> None:
        self.layout = layout
        self.gateways: dict[str, Gateway] = {}
        self.apps: dict[str, AppServer] = {}

    async def start_app(self, force: str, app: str) -> AppServer:
        """Start (or restart) one hosted application of `force`."""
        material = self.layout.material[force]
        server = material.app_servers[app]
        directory = self.layout.directory()
        kind = "echo" if app.startswith("echo-") else app
        running = await start_app(
            kind,
            listen=f"127.0.0.1:{self.layout.ports[force].apps[app]}",
            cert=server.cert_path,
            key=server.key_path,
            ca=material.ca,
            allowed_caller=directory.forces[force].gateway_spiffe_id,
        )
        self.apps[app] = running
        return running

    async def start_gateway(self, force: str, **kwargs: Any) -> Gateway:
        """Start (or restart) the gateway of `force`."""
        gateway = Gateway(self.layout.config(force), **kwargs)
        await gateway.start()
        self.gateways[force] = gateway
        return gateway

    async def start(self) -> None:
        """Start every application, then every gateway."""
        for force, apps in self.layout.hosted.items():
            for app in apps:
                await self.start_app(force, app)
        for force in FORCES:
            await self.start_gateway(force)

    async def stop(self) -> None:
        """Stop the gateways (graceful), then the applications."""
        await asyncio.gather(*(g.stop(grace=1.0) for g in self.gateways.values()))
        await asyncio.gather(*(a.stop(0.5) for a in self.apps.values()))
        self.gateways.clear()
        self.apps.clear()

    def manifest(self) -> dict[str, Any]:
        """What a client needs to call into the running network (format: `gateway.client`)."""
        layout = self.layout
        directory = layout.directory()

        def rel(path: Path) -> str:
            return str(path.relative_to(layout.root))

        forces = {}
        for force in FORCES:
            material = layout.material[force]
            client = material.app_clients[CLIENT_APP]
            forces[force] = {
                "local_address": layout.local_address(force),
                "peer_address": f"127.0.0.1:{layout.ports[force].peer}",
                "ca": rel(material.ca),
                "server_name": directory.forces[force].gateway_server_name,
                "app": {"name": CLIENT_APP, "cert": rel(client.cert_path), "key": rel(client.key_path)},
                "idp": rel(layout.idps[force].directory),
                "issuer": idp_issuer(force),
                "audience": idp_audience(force),
            }
        applications = {
            name: {"force": app.host, "services": list(app.services)} for name, app in directory.applications.items()
        }
        return {"network": directory.network, "forces": forces, "applications": applications}

    def write_manifest(self) -> Path:
        """Write `manifest()` as `demo.json` in the network folder; return its path."""
        path = self.layout.root / "demo.json"
        tmp = path.with_name(".demo.json.tmp")
        tmp.write_text(json.dumps(self.manifest(), indent=2) + "\n")
        tmp.replace(path)  # a client reading it never sees half a file
        return path


@contextlib.asynccontextmanager
async def running_network(root: Path, *, echo: bool = False) -> Any:
    """Write and start a network under `root`; stop it on exit."""
    network = DemoNetwork(write_network(root, echo=echo))
    await network.start()
    try:
        yield network
    finally:
        await network.stop()
