"""docker/ without a Docker engine: the files parse, and every path, command and port in them is real.

No Docker engine runs where the tests run, so these tests read docker/Dockerfile, docker/compose.yaml and the
files they mount, and check them against the project itself:

- compose.yaml parses with `parse_yaml_subset`, a small, strict reader of the YAML the file uses. PyYAML is not a
  dependency and should not become one for a test; writing the compose file as JSON (valid YAML too) would lose
  its comments, which are half of its value to an operator. The reader refuses everything it does not know
  (anchors, aliases, tags, block strings, flow mappings, tabs, duplicate keys, YAML 1.1 words such as ``no``
  unquoted), so the file cannot drift into YAML that this test would misread;
- every service runs the image built from docker/Dockerfile (never a pulled one); bind mounts exist; volumes are
  declared; commands parse with the real argument parsers (`gateway.cli.build_parser`, the appserve parser) or
  name scripts the image contains;
- the gateways' exposed and published ports are their configs' listeners; the directory's peer and relay addresses, the
  backends' addresses and the demo manifest agree with the services and their ports; each application's
  certificate, key, CA and allowed caller are its host force's;
- the configs load with the gateway's own parser once init-network.sh's commands have made the PKI, and the
  policy checks clean against the compose directory;
- the Dockerfile builds from python:3.11-slim, copies files that exist (and that the build context admits), runs
  as a non-root user and has a HEALTHCHECK that runs the gRPC health check;
- and, as an integration test, the whole compose network is rehearsed on loopback: service names mapped to
  127.0.0.1 and ports to free ones, every service started with its own command, then healthcheck.py against each
  gateway and the client service's call.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import build_parser
from gateway.cli import main as psngw_main
from gateway.client import load_manifest
from gateway.config import load_config
from gateway.demo import appserve
from gateway.directory import load_directory
from gateway.tomlconf import parse_address

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
IMAGE = "psn-gateway:dev"
NET = "/net"  # where the containers see the network's files
IMAGE_HELPERS = "/opt/psngw"  # where the Dockerfile puts the helpers and the examples


# -- a strict reader of the YAML subset compose.yaml uses --------------------------------------------------------


class YamlSubsetError(ValueError):
    """The text uses YAML this reader does not accept."""


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]+")
_PLAIN_SCALAR = re.compile(r"[A-Za-z0-9_./@~+-][A-Za-z0-9_./@~+:=-]*")
_INT = re.compile(r"[-+]?[0-9]+")
_YAML11_WORDS = {"yes", "no", "on", "off", "y", "n", "true", "false", "null"}


def _strip_comment(text: str) -> str:
    """`text` without a trailing comment (a # at the start or after a space, outside quotes)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == "\\" and quote == '"':
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    return text.rstrip()


def _balance(text: str) -> int:
    depth, quote, escaped = 0, None, False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch == '"':
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
    return depth


def _scalar(text: str, where: int) -> Any:
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise YamlSubsetError(f"line {where}: bad double-quoted string {text!r}") from exc
        if not isinstance(value, str):
            raise YamlSubsetError(f"line {where}: {text!r} is not one string")
        return value
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise YamlSubsetError(f'line {where}: a flow list must be JSON (["a", 1]): {text!r}') from exc
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
            raise YamlSubsetError(f"line {where}: flow lists hold strings and integers only")
        return value
    lowered = text.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    if lowered in ("null", "~"):
        return None
    if lowered in _YAML11_WORDS:
        raise YamlSubsetError(f"line {where}: {text!r} means different things to YAML 1.1 and 1.2: quote it")
    if _INT.fullmatch(text):
        return int(text)
    if not _PLAIN_SCALAR.fullmatch(text) or ": " in text:
        raise YamlSubsetError(f"line {where}: {text!r} is not a plain scalar this reader accepts: quote it")
    return text


def parse_yaml_subset(text: str) -> Any:
    """Parse block mappings and lists of scalars (quoted, plain, JSON-style flow lists); refuse the rest."""
    lines: list[tuple[int, str, int]] = []  # (indent, content, line number)
    raw = text.splitlines()
    i = 0
    while i < len(raw):
        number, line = i + 1, raw[i]
        i += 1
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise YamlSubsetError(f"line {number}: tab in indentation")
        content = _strip_comment(line)
        if not content.strip():
            continue
        stripped = content.strip()
        if stripped in ("---", "...") or stripped[0] in "&*!|>{%@`":
            raise YamlSubsetError(f"line {number}: {stripped[:20]!r} is outside the accepted subset")
        if re.search(r"(^|\s)[&*!][A-Za-z]|:\s*[|>]\s*$", stripped):
            raise YamlSubsetError(f"line {number}: anchors, aliases, tags and block strings are not accepted")
        while _balance(content) > 0 and i < len(raw):  # a flow list over several lines
            content += " " + _strip_comment(raw[i]).strip()
            i += 1
        if _balance(content) != 0:
            raise YamlSubsetError(f"line {number}: unbalanced brackets")
        lines.append((len(content) - len(content.lstrip(" ")), content.strip(), number))

    def split_key(content: str, number: int) -> tuple[str, str] | None:
        if content.startswith('"'):
            end = content.find('"', 1)
            key, after = content[1:end], content[end + 1 :]
        else:
            match = re.match(r"([^\s:\"'\[\]{}#]+):(?=\s|$)", content)
            if not match:
                return None
            key, after = match.group(1), content[match.end() - 1 :]
            if not _PLAIN_KEY.fullmatch(key):
                raise YamlSubsetError(f"line {number}: key {key!r} must be quoted")
        if not after.startswith(":") or (len(after) > 1 and after[1] != " "):
            return None
        return key, after[1:].strip()

    def block(pos: int, indent: int) -> tuple[Any, int]:
        if lines[pos][1].startswith("- ") or lines[pos][1] == "-":
            return sequence(pos, indent)
        return mapping(pos, indent)

    def nested(pos: int, indent: int, number: int) -> tuple[Any, int]:
        if pos < len(lines) and lines[pos][0] > indent:
            return block(pos, lines[pos][0])
        if pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("-"):
            raise YamlSubsetError(f"line {number}: indent a list under its key")
        return None, pos

    def mapping(pos: int, indent: int, first: str | None = None) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        while pos < len(lines) and lines[pos][0] == indent:
            _, content, number = lines[pos]
            if first is not None:
                content, first = first, None
            if content.startswith("-"):
                raise YamlSubsetError(f"line {number}: a list item where a key was expected")
            split = split_key(content, number)
            if split is None:
                raise YamlSubsetError(f"line {number}: expected 'key: value', got {content!r}")
            key, rest = split
            if key in out:
                raise YamlSubsetError(f"line {number}: duplicate key {key!r}")
            if rest:
                out[key], pos = _scalar(rest, number), pos + 1
            else:
                out[key], pos = nested(pos + 1, indent, number)
        if pos < len(lines) and lines[pos][0] > indent:
            raise YamlSubsetError(f"line {lines[pos][2]}: unexpected indentation")
        return out, pos

    def sequence(pos: int, indent: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        while pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("-"):
            _, content, number = lines[pos]
            if content != "-" and not content.startswith("- "):
                raise YamlSubsetError(f"line {number}: write '- item'")
            rest = content[1:].strip()
            if not rest:
                value, pos = nested(pos + 1, indent, number)
            elif split_key(rest, number) is not None:
                inner = indent + 2
                lines[pos] = (inner, rest, number)
                value, pos = mapping(pos, inner)
            else:
                value, pos = _scalar(rest, number), pos + 1
            out.append(value)
        return out, pos

    if not lines:
        return None
    if lines[0][0] != 0:
        raise YamlSubsetError(f"line {lines[0][2]}: the document must start at column 0")
    value, pos = block(0, 0)
    if pos != len(lines):
        raise YamlSubsetError(f"line {lines[pos][2]}: unexpected content")
    return value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('a: 1\nb:\n  c: "x: y"  # comment\n  d: ["p", 2]\n', {"a": 1, "b": {"c": "x: y", "d": ["p", 2]}}),
        (
            'l:\n  - "1:2"\n  - k: v\n    m: true\n  - plain/path.toml\n',
            {"l": ["1:2", {"k": "v", "m": True}, "plain/path.toml"]},
        ),
        ('c: ["a",\n    "b"]\nv:\n', {"c": ["a", "b"], "v": None}),
    ],
)
def test_yaml_subset_reads(text: str, expected: Any) -> None:
    assert parse_yaml_subset(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "a: &anchor 1\n",
        "a: *alias\n",
        "a: !tag x\n",
        "a: |\n  text\n",
        "a: {b: 1}\n",
        "a: 1\na: 2\n",
        "a:\n\tb: 1\n",
        "restart: no\n",
        "a: b: c\n",
        "a:\n- b\n",
        "a: 1\n  b: 2\n",
        "a: [1,\n",
    ],
)
def test_yaml_subset_refuses(text: str) -> None:
    with pytest.raises(YamlSubsetError):
        parse_yaml_subset(text)


# -- the compose file -----------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    doc = parse_yaml_subset((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


COMPOSE = _compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DIRECTORY_FILE = DOCKER / "directory.toml"
DIRECTORY = tomllib.loads(DIRECTORY_FILE.read_text(encoding="utf-8"))
FORCES = sorted(DIRECTORY["forces"])
NETWORK = DIRECTORY["network"]


def _gateway_service(force: str) -> str:
    return f"gw-{force}"


def _config_of(force: str) -> dict[str, Any]:
    return tomllib.loads((DOCKER / f"gateway-{force}.toml").read_text(encoding="utf-8"))


def _port(address: str) -> int:
    return parse_address(address)[1]


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only) for a service's volumes."""
    out: dict[str, tuple[str, bool]] = {}
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        assert len(parts) in (2, 3), f"volume {entry!r}: write SOURCE:TARGET[:ro]"
        assert len(parts) == 2 or parts[2] == "ro", f"volume {entry!r}: the only option used is ro"
        out[parts[1]] = (parts[0], len(parts) == 3)
    return out


def _option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_compose_has_the_three_forces() -> None:
    assert COMPOSE["name"] == "psn-gateway"
    hosted = {app: spec["host"] for app, spec in DIRECTORY["applications"].items()}
    assert set(SERVICES) == {"pki", "client", *hosted, *(_gateway_service(f) for f in FORCES)}
    assert FORCES == ["hampshire", "surrey", "thames-valley"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_runs_the_project_image(name: str) -> None:
    service = SERVICES[name]
    assert service["image"] == IMAGE
    assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert service["pull_policy"] == "build", "never pull an image of this name from a registry"
    assert isinstance(service["command"], list) and all(isinstance(a, str) for a in service["command"])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_mounts_exist(name: str) -> None:
    declared = set(COMPOSE["volumes"])
    for target, (source, _) in _mounts(SERVICES[name]).items():
        assert target.startswith(f"{NET}/"), f"{name}: mount {target} outside {NET}"
        if source.startswith((".", "/")):
            assert (DOCKER / source).exists(), f"{name}: bind mount source {source} does not exist"
        else:
            assert source in declared, f"{name}: volume {source} is not declared under volumes:"
    used = {src for svc in SERVICES.values() for src, _ in _mounts(svc).values()}
    assert declared <= used, f"declared but unused volumes: {declared - used}"


def _check_psngw(argv: list[str], where: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `psngw {' '.join(argv)}` does not parse: {err.getvalue().strip()}")
    assert callable(getattr(args, "func", None)), f"{where}: `psngw {' '.join(argv)}` is not a command"


def _init_script_commands() -> list[list[str]]:
    commands = []
    for number, line in enumerate((DOCKER / "init-network.sh").read_text(encoding="utf-8").splitlines(), 1):
        words = shlex.split(line, comments=True)
        if words and words[0] == "psngw":
            commands.append(words[1:])
        elif words and "psngw" in words:
            pytest.fail(f"init-network.sh:{number}: keep each psngw command on a line of its own")
    return commands


def _dockerfile_copies() -> dict[str, str]:
    """Image path -> repository path of every file the Dockerfile copies from the build context."""
    out: dict[str, str] = {}
    for instruction, args in _dockerfile():
        if instruction != "COPY" or args.startswith("--from"):
            continue
        *sources, target = args.split()
        for source in sources:
            name = Path(source).name
            image_path = target.rstrip("/") + "/" + name if target.endswith("/") or len(sources) > 1 else target
            out[image_path] = source
    return out


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_command_is_real(name: str) -> None:
    argv = SERVICES[name]["command"]
    copies = _dockerfile_copies()
    if argv[0] == "psngw":
        _check_psngw(argv[1:], name)
    elif argv[:3] == ["python", "-m", "gateway.demo.appserve"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                appserve.build_parser().parse_args(argv[3:])
            except SystemExit:
                pytest.fail(f"{name}: appserve arguments do not parse: {err.getvalue().strip()}")
    elif argv[0] in ("python", "sh"):
        script = argv[1]
        if script.startswith(f"{IMAGE_HELPERS}/examples/"):
            assert copies.get(f"{IMAGE_HELPERS}/examples") == "examples"
            assert (ROOT / "examples" / script.removeprefix(f"{IMAGE_HELPERS}/examples/")).is_file()
        else:
            assert script in copies, f"{name}: {script} is not copied into the image"
            assert (ROOT / copies[script]).is_file()
        if script.endswith("init-network.sh"):
            assert _init_script_commands(), "init-network.sh runs no psngw command"
            for command in _init_script_commands():
                _check_psngw(command, "init-network.sh")
    else:
        pytest.fail(f"{name}: unexpected command {argv}")


@pytest.mark.parametrize("force", FORCES)
def test_gateway_ports_and_paths_match_its_config(force: str) -> None:
    name = _gateway_service(force)
    service = SERVICES[name]
    config_path = f"{NET}/gateway-{force}.toml"
    assert service["command"] == ["psngw", "serve", "--config", config_path]
    assert service["environment"] == {"PSNGW_CONFIG": config_path}, "the health check reads PSNGW_CONFIG"
    mounts = _mounts(service)
    assert mounts[config_path] == (f"./gateway-{force}.toml", True)
    assert mounts[f"{NET}/directory.toml"] == ("./directory.toml", True)
    assert mounts[f"{NET}/policies"] == ("../policies", True)
    assert mounts[f"{NET}/pki"] == ("pki", True) and mounts[f"{NET}/idp"] == ("idp", True)
    assert mounts[f"{NET}/audit"] == (f"audit-{force}", False)
    assert "healthcheck" not in service, "gateways keep the image's gRPC health check"

    config = _config_of(force)
    assert config["force"] == force and config["directory"] == "directory.toml"
    local, peer = _port(config["listeners"]["local"]), _port(config["listeners"]["peer"])
    assert parse_address(config["listeners"]["local"])[0] == "0.0.0.0"
    assert parse_address(config["listeners"]["peer"])[0] == "0.0.0.0"
    assert parse_address(config["listeners"]["admin"])[0] == "127.0.0.1", "the admin listener stays on loopback"
    relay = _port(config["listeners"]["relay"])
    assert parse_address(config["listeners"]["relay"])[0] == "0.0.0.0"
    assert sorted(int(p) for p in service["expose"]) == sorted([local, peer, relay])
    assert service["ports"] == [f"127.0.0.1:{local}:{local}"], "publish the local listener, on the host's loopback"
    assert DIRECTORY["forces"][force]["peer_address"] == f"{name}:{peer}"
    assert DIRECTORY["forces"][force]["relay_address"] == f"{name}:{relay}"
    assert config["policy"]["dir"] == "policies"
    for table in ("tls", "signing", "log_signing"):
        for key in ("cert", "key"):
            assert config[table][key].startswith(f"pki/{force}/")
    assert config["tokens"]["jwks_file"] == f"idp/{force}/jwks.json"
    assert config["audit"]["db"].startswith("audit/") and config["witness"]["db"].startswith("audit/")


@pytest.mark.parametrize("app", sorted(DIRECTORY["applications"]))
def test_backend_address_is_the_application_service(app: str) -> None:
    host = DIRECTORY["applications"][app]["host"]
    backend = _config_of(host)["backends"][app]["address"]
    service_name, port = parse_address(backend)
    assert service_name == app
    argv = SERVICES[app]["command"]
    assert _option(argv, "--kind") == app
    assert _port(_option(argv, "--listen")) == port
    assert SERVICES[app]["expose"] == [str(port)]
    assert _option(argv, "--cert") == f"{NET}/pki/{host}/app-{app}-server.pem"
    assert _option(argv, "--key") == f"{NET}/pki/{host}/app-{app}-server.key"
    assert _option(argv, "--ca") == f"{NET}/pki/{host}/ca.pem"
    assert _option(argv, "--allowed-caller") == f"spiffe://{host}.{NETWORK}/gateway"
    assert SERVICES[_gateway_service(host)]["depends_on"][app] == {"condition": "service_started"}
    assert _mounts(SERVICES[app]) == {f"{NET}/pki": ("pki", True)}


def test_every_service_but_pki_waits_for_it() -> None:
    for name, service in SERVICES.items():
        if name in ("pki", "client"):
            continue
        assert service["depends_on"]["pki"] == {"condition": "service_completed_successfully"}, name
    assert _mounts(SERVICES["pki"])[f"{NET}/pki"] == ("pki", False)
    assert SERVICES["pki"]["command"] == ["sh", f"{IMAGE_HELPERS}/init-network.sh"]


def test_demo_manifest_matches_the_compose_network() -> None:
    manifest = load_manifest(DOCKER / "demo.json")
    assert manifest.network == NETWORK
    assert sorted(manifest.forces) == FORCES
    for force, endpoint in manifest.forces.items():
        config = _config_of(force)
        service = _gateway_service(force)
        assert endpoint.local_address == f"{service}:{_port(config['listeners']['local'])}"
        assert endpoint.peer_address == DIRECTORY["forces"][force]["peer_address"]
        assert endpoint.ca == DOCKER / DIRECTORY["forces"][force]["ca"]
        assert endpoint.server_name == f"gateway.{force}.{NETWORK}"
        assert endpoint.app.name in DIRECTORY["forces"][force]["clients"]
        assert endpoint.app.cert == DOCKER / f"pki/{force}/app-{endpoint.app.name}-client.pem"
        assert endpoint.idp == DOCKER / f"idp/{force}"
        assert (endpoint.issuer, endpoint.audience) == (config["tokens"]["issuer"], config["tokens"]["audience"])
    assert {app: host for app, (host, _) in manifest.applications.items()} == {
        app: spec["host"] for app, spec in DIRECTORY["applications"].items()
    }
    client = SERVICES["client"]
    assert _mounts(client)[f"{NET}/demo.json"] == ("./demo.json", True)
    assert f"{NET}/demo.json" in client["command"]
    assert client["profiles"] == ["tools"]


# -- the configs load, once the PKI job has run ---------------------------------------------------------------


def _network_copy(tmp: Path) -> Path:
    """The files the compose network mounts at /net, under `tmp`, with the PKI job's commands run there."""
    net = tmp / "net"
    net.mkdir()
    for name in ["directory.toml", "demo.json", *(f"gateway-{f}.toml" for f in FORCES)]:
        shutil.copy(DOCKER / name, net / name)
    shutil.copytree(ROOT / "policies", net / "policies")
    for folder in ("pki", "idp", "audit"):
        (net / folder).mkdir()
    for command in _init_script_commands():
        argv = [arg.replace(NET, str(net)) for arg in command]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert psngw_main(argv) == 0, f"init-network.sh: psngw {' '.join(command)} failed"
    return net


def test_configs_load_after_the_pki_job(tmp_path: Path) -> None:
    net = _network_copy(tmp_path)
    for force in FORCES:
        config = load_config(net / f"gateway-{force}.toml")
        assert config.force == force
        assert config.tls.cert.is_file() and config.signing.key.is_file() and config.log_signing.cert.is_file()
        assert config.tokens.jwks_file is not None and config.tokens.jwks_file.is_file()
        assert {a for a, spec in DIRECTORY["applications"].items() if spec["host"] == force} == set(config.backends)
    for endpoint in load_manifest(net / "demo.json").forces.values():
        assert endpoint.ca.is_file() and endpoint.app.cert.is_file() and endpoint.app.key.is_file()
        assert (endpoint.idp / "jwks.json").is_file()


def test_policy_checks_clean_against_the_compose_directory() -> None:
    from gateway.policy import Severity, check_policy  # only this test needs the policy package

    findings = check_policy(ROOT / "policies", load_directory(DIRECTORY_FILE))
    errors = [str(f) for f in findings if f.severity is Severity.ERROR]
    assert not errors, errors


def test_init_script_is_posix_sh() -> None:
    script = DOCKER / "init-network.sh"
    assert script.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    assert os.access(script, os.X_OK)
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# -- the Dockerfile ---------------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (DOCKER / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


_KNOWN_INSTRUCTIONS = {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "HEALTHCHECK", "CMD", "EXPOSE", "LABEL"}


def test_dockerfile_instructions() -> None:
    instructions = _dockerfile()
    assert {i for i, _ in instructions} <= _KNOWN_INSTRUCTIONS
    froms = [args for i, args in instructions if i == "FROM"]
    assert froms and all(args.split()[0] == "python:3.11-slim" for args in froms)


def test_dockerfile_runs_as_a_non_root_user() -> None:
    instructions = _dockerfile()
    last_from = max(n for n, (i, _) in enumerate(instructions) if i == "FROM")
    users = [(n, args) for n, (i, args) in enumerate(instructions) if i == "USER" and n > last_from]
    assert users, "the final stage sets no USER"
    n, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert all(i != "RUN" for i, _ in instructions[n + 1 :]), "nothing runs as root after USER"
    assert any(i == "RUN" and "useradd" in args and user.split(":")[0] in args for i, args in instructions)


def test_dockerfile_copies_files_that_exist_and_the_context_admits() -> None:
    ignore = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "**", "the build context starts from nothing and admits what the image needs"
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for image_path, source in _dockerfile_copies().items():
        assert (ROOT / source).exists(), f"COPY {source} -> {image_path}: no such file"
        assert source.rstrip("/") in admitted, f"COPY {source}: excluded by Dockerfile.dockerignore"
    for secret in ("**/*.key", "**/*.pem", "**/*.db"):
        assert secret in ignore


def test_dockerfile_health_check_runs_the_grpc_check() -> None:
    instructions = _dockerfile()
    checks = [args for i, args in instructions if i == "HEALTHCHECK"]
    assert len(checks) == 1
    cmd = json.loads(checks[0].split(" CMD ", 1)[1])
    assert cmd == ["python", f"{IMAGE_HELPERS}/healthcheck.py"]
    assert _dockerfile_copies()[f"{IMAGE_HELPERS}/healthcheck.py"] == "docker/healthcheck.py"
    default = json.loads(next(args for i, args in instructions if i == "CMD"))
    assert default[0] == "psngw"
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()):
        psngw_main(default[1:])
    assert exit_info.value.code == 0


def test_healthcheck_without_a_config_is_unhealthy() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PSNGW_CONFIG"}
    result = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py")], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 1
    assert "no gateway config" in result.stderr


# -- the rehearsal: the compose network on loopback -----------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class _Rehearsal:
    """The compose network's processes on this machine: service names -> 127.0.0.1, ports -> free ones."""

    def __init__(self, net: Path) -> None:
        self.net = net
        self.bin = Path(sys.executable).parent
        hosts = "|".join(re.escape(h) for h in (*SERVICES, "0.0.0.0", "127.0.0.1"))
        ports = sorted({int(p) for text in self._texts() for p in re.findall(rf"(?:{hosts}):(\d+)", text)})
        self.port_map = dict(zip(ports, _free_ports(len(ports)), strict=True))
        self._address = re.compile(rf"(?:{hosts}):(\d+)")
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _texts(self) -> Iterator[str]:
        for name in ["directory.toml", "demo.json", *(f"gateway-{f}.toml" for f in FORCES)]:
            yield (DOCKER / name).read_text(encoding="utf-8")
        for service in SERVICES.values():
            yield " ".join(service["command"])

    def local(self, text: str) -> str:
        """`text` as it is on this machine: addresses on loopback with free ports, /net in the temporary folder."""
        text = self._address.sub(lambda m: f"127.0.0.1:{self.port_map[int(m.group(1))]}", text)
        text = text.replace(NET, str(self.net))  # first: the paths put in below must not be rewritten again
        text = text.replace(f"{IMAGE_HELPERS}/examples", str(ROOT / "examples"))
        return text.replace(f"{IMAGE_HELPERS}/init-network.sh", str(self.net / "init-network.sh"))

    def argv(self, name: str) -> list[str]:
        argv = [self.local(a) for a in SERVICES[name]["command"]]
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "psngw":
            argv[0] = str(self.bin / "psngw")
        return argv

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = (self.net / f"{name}.log").open("wb")
        env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen(self.argv(name), cwd=self.net, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.processes.append((name, proc))
        return proc

    def stop(self) -> None:
        for _, proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.net.glob("*.log"))


@pytest.mark.integration
def test_rehearse_the_compose_network_on_loopback(tmp_path: Path) -> None:
    net = tmp_path / "net"
    net.mkdir()
    rehearsal = _Rehearsal(net)
    for name in ["directory.toml", "demo.json", *(f"gateway-{f}.toml" for f in FORCES)]:
        (net / name).write_text(rehearsal.local((DOCKER / name).read_text(encoding="utf-8")), encoding="utf-8")
    shutil.copytree(ROOT / "policies", net / "policies")
    for folder in ("pki", "idp", "audit"):
        (net / folder).mkdir()
    script = net / "init-network.sh"
    script.write_text(rehearsal.local((DOCKER / "init-network.sh").read_text(encoding="utf-8")), encoding="utf-8")
    try:
        # The one-shot job, twice: the second run must leave the PKI alone.
        for _ in range(2):
            pki = rehearsal.start("pki")
            assert pki.wait(timeout=120) == 0, rehearsal.logs()
        assert "already there" in (net / "pki.log").read_text()
        for name in SERVICES:
            if name not in ("pki", "client") and not name.startswith("gw-"):
                rehearsal.start(name)
        for force in FORCES:
            rehearsal.start(_gateway_service(force))
        for force in FORCES:  # wait for the gateway's own word, then ask the health check once
            log = net / f"{_gateway_service(force)}.log"
            deadline = time.monotonic() + 120
            while f"gateway of {force} serving" not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline, f"{force} never started serving\n{rehearsal.logs()}"
                time.sleep(0.2)
        env = {k: v for k, v in os.environ.items() if k != "PSNGW_CONFIG"}
        checks = {
            force: subprocess.Popen(
                [sys.executable, str(DOCKER / "healthcheck.py")],
                env={**env, "PSNGW_CONFIG": str(net / f"gateway-{force}.toml")},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for force in FORCES
        }
        for force, check in checks.items():
            _out, err = check.communicate(timeout=60)
            assert check.returncode == 0, f"{force} is not healthy: {err}\n{rehearsal.logs()}"
        client = subprocess.run(
            rehearsal.argv("client"), cwd=net, capture_output=True, text=True, timeout=60, check=False
        )
        assert client.returncode == 0, f"{client.stdout}{client.stderr}\n{rehearsal.logs()}"
        assert "IR-0001" in client.stdout
        # Stop one gateway: its health check turns unhealthy.
        gateway = next(p for n, p in rehearsal.processes if n == "gw-hampshire")
        gateway.terminate()
        assert gateway.wait(timeout=30) == 0
        check = subprocess.run(
            [sys.executable, str(DOCKER / "healthcheck.py"), "--config", str(net / "gateway-hampshire.toml")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 1 and "UNAVAILABLE" in check.stderr
    finally:
        rehearsal.stop()
