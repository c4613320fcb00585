"""The container health check of a gateway: the gRPC health service on both of its listeners.

Usage (the image's HEALTHCHECK runs it)::

    python /opt/psngw/healthcheck.py [--config FILE] [--timeout SECONDS]

The config defaults to the ``PSNGW_CONFIG`` environment variable. The check
reads the gateway's own config, then calls ``grpc.health.v1.Health/Check``
(service ``""``, the whole gateway) on the local and the peer listener over
mutual TLS, presenting the gateway's own TLS certificate (it is a client
certificate too: the gateway uses it toward peers and backends) and verifying
the listener against the force's CA and the name ``gateway.<force>.<network>``.
A listener bound to a wildcard address is checked on loopback.

Exit 0 when both answer SERVING; 1 otherwise, with one line on stderr. The
gateway answers NOT_SERVING while it refuses traffic (its audit log cannot be
written: fail closed) and while it shuts down, so Docker marks the container
unhealthy exactly when the gateway will not carry calls.

Why not the admin listener's ``/readyz``: it reports the same state, but it is
plaintext HTTP on loopback and says nothing about the mTLS listeners the calls
use. This check exercises the real handshake and the real listeners.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import load_config
from gateway.errors import GatewayError
from gateway.tomlconf import parse_address

__all__ = ["check", "main"]

_WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", ""})  # noqa: S104  # names wildcard binds, binds nothing


def _target(listen: str) -> str:
    host, port = parse_address(listen)
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check(config_path: str, *, timeout: float = 3.0) -> list[str]:
    """Check both listeners of the gateway configured in `config_path`; return the problems (empty: healthy)."""
    config = load_config(config_path)
    force = config.directory.forces[config.force]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=force.ca_path.read_bytes(),
        private_key=config.tls.key.read_bytes(),
        certificate_chain=config.tls.cert.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", force.gateway_server_name)]
    problems = []
    for name, listen in (("local", config.listeners.local), ("peer", config.listeners.peer)):
        target = _target(listen)
        with grpc.secure_channel(target, credentials, options=options) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout
                )
            except grpc.RpcError as exc:
                problems.append(f"{name} listener {target}: {exc.code().name}: {exc.details()}")
                continue
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            problems.append(f"{name} listener {target}: {status}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; exit code 0 healthy, 1 not."""
    parser = argparse.ArgumentParser(description="gRPC health check of a psn-gateway on both listeners")
    parser.add_argument("--config", default=os.environ.get("PSNGW_CONFIG"), help="gateway config (env PSNGW_CONFIG)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per listener (default 3)")
    args = parser.parse_args(argv)
    if not args.config:
        print("healthcheck: no gateway config: set PSNGW_CONFIG or pass --config", file=sys.stderr)
        return 1
    try:
        problems = check(args.config, timeout=args.timeout)
    except (GatewayError, OSError) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"healthcheck: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
