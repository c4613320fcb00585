"""`psngw serve`: run one force's gateway until SIGTERM or SIGINT.

SIGTERM and SIGINT stop taking new calls and let calls in flight finish within
the configured grace period. SIGHUP reloads certificates, CRLs, the directory
and the policy (they are also reloaded when their files change).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from gateway.config import load_config
from gateway.logs import configure_logging

__all__ = ["register_cli", "run_gateway"]

log = logging.getLogger("psngw.serve")


async def run_gateway(config_path: Path) -> int:
    """Load the config, start the gateway, serve until a stop signal."""
    from gateway.server import Gateway  # noqa: PLC0415  # the server pulls in grpc: keep `psngw --help` fast

    config = load_config(config_path)
    gateway = Gateway(config)
    await gateway.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
    await stop.wait()
    log.info("stop signal: finishing calls in flight (grace %.1f s)", config.limits.shutdown_grace)
    await gateway.stop()
    return 0


def _serve(args: argparse.Namespace) -> int:
    configure_logging(level=args.log_level, json_format=args.log_format == "json")
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415  # optional: only when installed

        uvloop.install()
    return asyncio.run(run_gateway(args.config))


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `psngw serve`."""
    p = sub.add_parser(
        "serve",
        help="run one force's gateway",
        description="Run one force's gateway until SIGTERM/SIGINT (graceful); SIGHUP reloads certificates, "
        "CRLs, directory and policy.",
    )
    p.add_argument("--config", type=Path, required=True, help="the gateway's TOML config file")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", default="json", choices=("json", "text"), help="operator log format (stderr)")
    p.set_defaults(func=_serve)
