"""`psngw serve`: run one force's gateway until SIGTERM or SIGINT.

SIGTERM and SIGINT stop taking new calls and let calls in flight finish within
the configured grace period. SIGHUP reloads certificates, CRLs, the directory
and the policy (they are also reloaded when their files change).

``--check`` loads and checks everything the gateway would at start (the
config, the directory, every certificate, key, CRL, the JWKS, the policies,
the audit and witness database paths), through the same loading step as a
real start (`gateway.server.StartFiles`), then stops: nothing listens and
nothing is written. It prints one "ok" line, or the error (file:line: key:
problem) and exits 2.

``--workers N`` runs N gateway processes on the same listeners (SO_REUSEPORT):
the kernel spreads *connections* over them, so peers open several connections
each (``[limits] peer_channels``). Every worker appends to the force's one
audit log (SQLite sequences the records: one tree, in order); worker 0 alone
signs checkpoints, collects cosignatures and serves the admin listener. The
parent process supervises: a worker that dies is restarted, and a stop signal
and SIGHUP (reload) are passed on to every worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.clock import SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.logs import configure_logging

if TYPE_CHECKING:
    from gateway.server import StartFiles

__all__ = ["check_gateway", "register_cli", "run_gateway", "supervise"]

log = logging.getLogger("psngw.serve")


async def run_gateway(config_path: Path, *, worker: int = 0, workers: int = 1) -> int:
    """Load the config, start the gateway, serve until a stop signal."""
    from gateway.server import Gateway  # noqa: PLC0415  # the server pulls in grpc: keep `psngw --help` fast

    config = load_config(config_path)
    gateway = Gateway(config, worker=worker, workers=workers)
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


def _load(config_path: Path) -> tuple[GatewayConfig, StartFiles]:
    """The gateway's loading step, as `Gateway` runs it at start: the config, then every file it names."""
    from gateway.server import StartFiles  # noqa: PLC0415  # the server pulls in grpc: keep `psngw --help` fast

    config = load_config(config_path)
    return config, StartFiles.load(config, SystemClock())


def check_gateway(config_path: Path) -> str:
    """Load and check what the gateway reads at start, then stop; a one-line summary (`ConfigError` if bad).

    Nothing listens and nothing is written. A force whose CRL is unusable does not stop a start
    (its certificates are refused until it is fixed), so it is logged as a warning, not an error.
    """
    config, files = _load(config_path)
    now = SystemClock().now()
    crls = [files.trust.crl_status(force, now) for force in config.directory.forces]
    for status in crls:
        if not status.usable:
            log.warning("CRL of %s unusable: its certificates will be refused: %s", status.force, status.reason)
    shadow = "" if files.shadow is None else f", shadow policy {files.shadow.version}"
    return (
        f"{config_path}: ok: gateway of {config.force} in {config.directory.network}"
        f" ({len(config.directory.forces)} forces, CRLs usable for {sum(s.usable for s in crls)}),"
        f" {len(config.backends)} backend(s), policy {files.policy.version}{shadow}; nothing started"
    )


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415  # optional: only when installed

        uvloop.install()


def _worker_main(config: Path, worker: int, workers: int, level: str, json_format: bool) -> None:
    configure_logging(level=level, json_format=json_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop, with SIGTERM
    _install_uvloop()
    raise SystemExit(asyncio.run(run_gateway(config, worker=worker, workers=workers)))


def supervise(config: Path, workers: int, *, level: str = "info", json_format: bool = True) -> int:
    """Run `workers` gateway processes; restart any that dies; stop them all on SIGTERM/SIGINT."""
    parsed, _ = _load(config)  # fail here, once, with file:line, not N times in the children
    for name, address in (("local", parsed.listeners.local), ("peer", parsed.listeners.peer)):
        if address.endswith(":0"):
            problem = ConfigError("workers need fixed listener ports, not 0", field=f"listeners.{name}")
            raise parsed.provenance.locate(problem)
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def start(i: int) -> BaseProcess:
        process = ctx.Process(
            target=_worker_main, args=(config, i, workers, level, json_format), name=f"psngw-worker-{i}"
        )
        process.start()
        return process

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    def reload(_signum: int, _frame: object) -> None:
        for process in procs.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs: dict[int, BaseProcess] = {}
    signal.signal(signal.SIGHUP, reload)  # passed on: each worker reloads its own copy
    procs.update({i: start(i) for i in range(workers)})
    restarts: dict[int, float] = {}
    while not stopping:
        time.sleep(0.2)
        for i, process in list(procs.items()):
            if not process.is_alive() and not stopping:
                # Back off a worker that keeps dying (a bad file, a port taken) instead of spinning.
                wait = 1.0 if time.monotonic() - restarts.get(i, 0.0) > 10 else 5.0
                log.error("worker %d exited with %s; restarting in %.0f s", i, process.exitcode, wait)
                time.sleep(wait)
                restarts[i] = time.monotonic()
                procs[i] = start(i)
    for process in procs.values():
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    for process in procs.values():
        process.join(parsed.limits.shutdown_grace + 5)
    return 0


def _serve(args: argparse.Namespace) -> int:
    level = args.log_level or ("warning" if args.check else "info")
    configure_logging(level=level, json_format=args.log_format == "json")
    if args.check:
        print(check_gateway(args.config))
        return 0
    if args.workers > 1:
        return supervise(args.config, args.workers, level=level, json_format=args.log_format == "json")
    _install_uvloop()
    return asyncio.run(run_gateway(args.config))


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `psngw serve`."""
    p = sub.add_parser(
        "serve",
        help="run one force's gateway",
        description="Run one force's gateway until SIGTERM/SIGINT (graceful); SIGHUP reloads certificates, "
        "CRLs, directory and policy. With --workers N, N processes share the listeners (SO_REUSEPORT) and "
        "the force's one audit log. With --check, load and check everything a start would, then stop. "
        "A bad file or setting prints one line, file:line: key: problem, and exits 2.",
    )
    p.add_argument("--config", type=Path, required=True, help="the gateway's TOML config file")
    p.add_argument(
        "--check",
        action="store_true",
        help="load and check the config and every file it names (directory, certificates, keys, CRLs, JWKS, "
        "policy, audit and witness database paths) as a start would, without listening or writing anything; "
        "print one 'ok' line and exit 0, or the error and exit 2",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        choices=range(1, 65),
        metavar="N",
        help="gateway processes on the same listeners (1-64; default 1)",
    )
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="default info (warning with --check)"
    )
    p.add_argument("--log-format", default="json", choices=("json", "text"), help="operator log format (stderr)")
    p.set_defaults(func=_serve)
