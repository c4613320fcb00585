"""The network directory: forces, units, roles and hosted applications.

One TOML file, the same at every gateway, names the network and, for each force,
its CA certificate, CRL and gateway peer address; the regional and force units and
the officer roles; and for each application, the force that hosts it, the minimum
vetting level to use it, and its gRPC services with the call type of each method.

Owns: parsing and validating that file into frozen values, and routing a gRPC
method path to the application that serves it. Does not own: reading the
certificates it points at (see `gateway.identity`).

Example::

    network = "se.psn"
    clearance_levels = ["NPPV1", "NPPV2", "NPPV3", "SC", "DV"]
    roles = ["investigator", "analyst"]

    [forces.thames-valley]
    name = "Thames Valley Police"
    ca = "pki/thames-valley/ca.pem"
    crl = "pki/thames-valley/crl.pem"
    peer_address = "127.0.0.1:7443"
    relay_address = "127.0.0.1:7453"   # optional: relay links (gateway.relaylink), else gRPC
    clients = ["analyst-desk"]   # this force's applications that may call out
    log_cert = "pki/thames-valley/log-signing.pem"   # its audit-log key, for the witnesses

    [units.serocu]
    name = "South East Regional Organised Crime Unit"

    [units.tvp-cid]
    name = "Thames Valley CID"
    force = "thames-valley"

    [applications.intel-search]
    name = "Intelligence search"
    host = "thames-valley"
    min_clearance = "SC"
    [applications.intel-search.services."psn.demo.intel.v1.IntelligenceSearch"]
    Search = "unary"
    StreamMatches = "server_stream"
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from gateway.errors import ConfigError, NotFound
from gateway.tomlconf import Origin, Section, TomlFile

__all__ = [
    "Application",
    "CallType",
    "Force",
    "Method",
    "NetworkDirectory",
    "Route",
    "Unit",
    "load_directory",
    "parse_directory",
]

#: Identifiers of forces, units, roles and applications.
NAME_PATTERN = r"[a-z][a-z0-9-]{0,62}"
_NETWORK_PATTERN = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
_SERVICE_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+"
_METHOD_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*"
_CLEARANCE_PATTERN = r"[A-Za-z0-9_-]{1,32}"


class CallType(enum.StrEnum):
    """The four gRPC call types."""

    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"
    BIDI_STREAM = "bidi_stream"

    @property
    def client_streams(self) -> bool:
        """Whether the caller sends a stream of messages."""
        return self in (CallType.CLIENT_STREAM, CallType.BIDI_STREAM)

    @property
    def server_streams(self) -> bool:
        """Whether the application answers with a stream of messages."""
        return self in (CallType.SERVER_STREAM, CallType.BIDI_STREAM)


@dataclass(frozen=True)
class Force:
    """A police force: one trust domain, one gateway.

    `clients` names this force's applications that may call its local listener
    (besides the applications it hosts). `log_cert_path` is the certificate of
    the force's audit-log key: the other forces' witnesses check its
    checkpoints with it.
    """

    name: str
    display_name: str
    trust_domain: str
    ca_path: Path
    crl_path: Path | None
    peer_address: str
    clients: tuple[str, ...] = ()
    log_cert_path: Path | None = None
    #: its gateway's relay listener (`gateway.relaylink`); None: other gateways relay by gRPC (`Relay/Mux`)
    relay_address: str | None = None

    @property
    def gateway_spiffe_id(self) -> str:
        """The SPIFFE ID of this force's gateway."""
        return f"spiffe://{self.trust_domain}/gateway"

    @property
    def gateway_server_name(self) -> str:
        """The DNS name in this force's gateway TLS certificate."""
        return f"gateway.{self.trust_domain}"

    def app_spiffe_id(self, app: str) -> str:
        """The SPIFFE ID of application `app` in this force."""
        return f"spiffe://{self.trust_domain}/app/{app}"


@dataclass(frozen=True)
class Unit:
    """A unit officers belong to: regional (force is None) or a force's own."""

    name: str
    display_name: str
    force: str | None


@dataclass(frozen=True)
class Method:
    """One gRPC method of an application's service."""

    service: str
    name: str
    call_type: CallType

    @property
    def path(self) -> str:
        """The method as gRPC names it on the wire: ``/package.Service/Method``."""
        return f"/{self.service}/{self.name}"


@dataclass(frozen=True)
class Application:
    """An application hosted by one force for the network."""

    name: str
    display_name: str
    host: str
    min_clearance: str
    methods: tuple[Method, ...]

    @property
    def services(self) -> tuple[str, ...]:
        """The gRPC services of this application, in directory order."""
        return tuple(dict.fromkeys(m.service for m in self.methods))


@dataclass(frozen=True)
class Route:
    """Where a call goes: the application, the method and the host force."""

    application: Application
    method: Method

    @property
    def host(self) -> str:
        """The force that hosts the application."""
        return self.application.host


@dataclass(frozen=True)
class NetworkDirectory:
    """The whole network, as every gateway knows it."""

    network: str
    forces: Mapping[str, Force]
    units: Mapping[str, Unit]
    roles: tuple[str, ...]
    clearance_levels: tuple[str, ...]
    applications: Mapping[str, Application]
    path: Path | None = None
    #: the files this directory's settings name (CA certificates, CRLs, log certificates), with where each is named
    named: Mapping[Path, Origin] = field(default_factory=dict, repr=False, compare=False)
    _methods: Mapping[str, Route] = field(default_factory=dict, repr=False, compare=False)
    _services: Mapping[str, Application] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        methods: dict[str, Route] = {}
        services: dict[str, Application] = {}
        for app in self.applications.values():
            for m in app.methods:
                methods[m.path] = Route(app, m)
                services[m.service] = app
        object.__setattr__(self, "_methods", MappingProxyType(methods))
        object.__setattr__(self, "_services", MappingProxyType(services))

    def route(self, method_path: str) -> Route:
        """The route for a gRPC method path; `NotFound` if no application serves it."""
        route = self._methods.get(method_path)
        if route is None:
            service = method_path.lstrip("/").partition("/")[0]
            if service in self._services:
                raise NotFound(f"service {service} has no method {method_path!r} in the directory")
            raise NotFound(f"no application in the directory serves {method_path!r}")
        return route

    def force_of_trust_domain(self, trust_domain: str) -> Force | None:
        """The force whose trust domain is `trust_domain`, if any."""
        for force in self.forces.values():
            if force.trust_domain == trust_domain:
                return force
        return None

    def clearance_rank(self, level: str) -> int:
        """Position of a vetting level (higher is more); -1 if unknown."""
        try:
            return self.clearance_levels.index(level)
        except ValueError:
            return -1

    def all_methods(self) -> tuple[Route, ...]:
        """Every routable method, in directory order."""
        return tuple(self._methods.values())


def load_directory(path: Path | str) -> NetworkDirectory:
    """Read and validate the directory file at `path`."""
    return parse_directory(TomlFile.load(path))


def parse_directory(file: TomlFile) -> NetworkDirectory:
    """Validate a parsed directory file; any problem is a `ConfigError` with file:line."""
    root = file.root()
    network = root.text("network", pattern=_NETWORK_PATTERN, max_len=200)
    levels = root.text_list("clearance_levels", pattern=_CLEARANCE_PATTERN, non_empty=True)
    roles = root.text_list("roles", (), pattern=NAME_PATTERN)
    forces = _parse_forces(root, network)
    units = _parse_units(root, forces)
    applications = _parse_applications(root, forces, levels)
    root.finish()
    return NetworkDirectory(
        network=network,
        forces=MappingProxyType(forces),
        units=MappingProxyType(units),
        roles=roles,
        clearance_levels=levels,
        applications=MappingProxyType(applications),
        path=file.path,
        named=MappingProxyType(dict(file.named)),
    )


def _parse_forces(root: Section, network: str) -> dict[str, Force]:
    forces: dict[str, Force] = {}
    peer_addresses: dict[str, str] = {}
    for name, sec in root.table("forces", required=True).tables():
        _check_name(sec, name, "force")
        force = Force(
            name=name,
            display_name=sec.text("name", name),
            trust_domain=f"{name}.{network}",
            ca_path=sec.file_path("ca"),
            crl_path=sec.file_path("crl", None),
            peer_address=sec.address("peer_address"),
            clients=sec.text_list("clients", (), pattern=NAME_PATTERN),
            log_cert_path=sec.file_path("log_cert", None),
            relay_address=sec.address("relay_address", None),
        )
        for key, address in (("peer_address", force.peer_address), ("relay_address", force.relay_address)):
            if address is None:
                continue
            if address in peer_addresses:
                sec.fail(key, f"same address as {peer_addresses[address]}")
            peer_addresses[address] = f"force {name}'s {key}"
        sec.finish()
        forces[name] = force
    if not forces:
        root.fail("forces", "no forces defined")
    return forces


def _parse_units(root: Section, forces: Mapping[str, Force]) -> dict[str, Unit]:
    units: dict[str, Unit] = {}
    for name, sec in root.table("units").tables():
        _check_name(sec, name, "unit")
        owner = sec.text("force", None)
        if owner is not None and owner not in forces:
            sec.fail("force", f"unknown force {owner!r}")
        units[name] = Unit(name, sec.text("name", name), owner)
        sec.finish()
    return units


def _parse_applications(root: Section, forces: Mapping[str, Force], levels: tuple[str, ...]) -> dict[str, Application]:
    applications: dict[str, Application] = {}
    seen_services: dict[str, str] = {}
    for name, sec in root.table("applications").tables():
        _check_name(sec, name, "application")
        host = sec.text("host")
        if host not in forces:
            sec.fail("host", f"unknown force {host!r}")
        clearance = sec.text("min_clearance")
        if clearance not in levels:
            sec.fail("min_clearance", f"{clearance!r} is not one of clearance_levels")
        methods: list[Method] = []
        services = sec.table("services", required=True)
        for service, msec in services.tables():
            if not _fullmatch(_SERVICE_PATTERN, service):
                services.fail(service, "not a fully qualified gRPC service name (package.Service)")
            if service in seen_services:
                services.fail(service, f"service already belongs to application {seen_services[service]!r}")
            seen_services[service] = name
            if not msec.data:
                services.fail(service, "service lists no methods")
            for method_name in list(msec.data):
                if not _fullmatch(_METHOD_PATTERN, method_name):
                    msec.fail(method_name, "not a gRPC method name")
                kind = msec.choice(method_name, tuple(c.value for c in CallType))
                methods.append(Method(service, method_name, CallType(kind)))
            msec.finish()
        if not methods:
            sec.fail("services", "application has no services")
        applications[name] = Application(name, sec.text("name", name), host, clearance, tuple(methods))
        sec.finish()
    return applications


def _fullmatch(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def _check_name(sec: Section, name: str, what: str) -> None:
    if not _fullmatch(NAME_PATTERN, name):
        raise ConfigError(
            f"{what} name {name!r} must be lower-case letters, digits and '-'",
            file=sec.file.path,
            line=sec.file.line_of(sec.keys),
            field=".".join(str(k) for k in sec.keys),
        )
