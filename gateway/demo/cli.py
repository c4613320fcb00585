"""`psngw demo`: the three-force network on this machine, as a tour or kept running.

``psngw demo`` makes a temporary PKI, directory and configs, starts the three
gateways and the three demo applications on free loopback ports, runs the
scripted tour, prints its table, stops everything, and exits 1 if any step did
not behave as expected. ``psngw demo up --dir DIR`` starts the same network and
keeps it running until Ctrl-C, with its manifest in DIR/demo.json (see
docs/demo-manifest.md and `gateway.client`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
from pathlib import Path

from gateway.errors import ConfigError
from gateway.logs import configure_logging

__all__ = ["register_cli"]


async def _tour(root: Path, verbose: bool) -> int:
    from gateway.demo.network import DemoNetwork, write_network  # noqa: PLC0415  # keep `--help` fast
    from gateway.demo.tour import print_table, run_tour  # noqa: PLC0415

    print(f"psn-gateway demo: three forces on loopback, files in {root}", flush=True)
    network = DemoNetwork(write_network(root))
    await network.start()
    try:
        for force, gw in network.gateways.items():
            ports = gw.ports
            assert ports is not None  # noqa: S101  # started
            print(f"  gateway of {force:<14} local 127.0.0.1:{ports.local:<6} peer 127.0.0.1:{ports.peer}")
        print(flush=True)
        results = await run_tour(network)
    finally:
        await network.stop()
    print_table(results, sys.stdout)
    return 0 if all(r.ok for r in results) else 1


def _demo(args: argparse.Namespace) -> int:
    configure_logging(level="debug" if args.verbose else "error", json_format=False)
    if args.dir is not None:
        return _run(_tour(args.dir, args.verbose))
    with tempfile.TemporaryDirectory(prefix="psngw-demo-") as tmp:
        return _run(_tour(Path(tmp), args.verbose))


def _run(coro: object) -> int:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]  # a coroutine returning int
    except KeyboardInterrupt:
        print("\ninterrupted: everything stopped", file=sys.stderr)
        return 130


async def _up(root: Path) -> int:
    from gateway.demo.network import DemoNetwork, write_network  # noqa: PLC0415  # keep `--help` fast

    if root.exists() and not root.is_dir():
        raise ConfigError("not a folder; give a new or empty folder", file=root)
    if root.exists() and any(root.iterdir()):
        raise ConfigError("folder is not empty; give a new or empty folder", file=root)
    network = DemoNetwork(write_network(root))
    await network.start()
    manifest = network.write_manifest()
    print(f"network running; manifest {manifest}. Ctrl-C to stop.", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await network.stop()
    print("stopped", flush=True)
    return 0


def _demo_up(args: argparse.Namespace) -> int:
    configure_logging(level=args.log_level, json_format=True)
    return _run(_up(args.dir))


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `psngw demo` and `psngw demo up`."""
    p = sub.add_parser(
        "demo",
        help="run the three-force demo tour (or keep the network up)",
        description="Start three gateways and three demo applications on loopback, run the scripted tour, print "
        "its table, stop everything; exit 1 if any step did not behave as expected.",
    )
    p.add_argument("--dir", type=Path, help="keep the network's files here instead of a temporary folder")
    p.add_argument("-v", "--verbose", action="store_true", help="show the gateways' logs")
    p.set_defaults(func=_demo)
    demo_sub = p.add_subparsers(dest="demo_command", metavar="COMMAND")
    up = demo_sub.add_parser(
        "up",
        help="start the network and keep it running",
        description="Start the three-force network and keep it running until Ctrl-C; write DIR/demo.json, the "
        "manifest clients use (docs/demo-manifest.md).",
    )
    up.add_argument("--dir", type=Path, required=True, help="a new or empty folder for the network's files")
    up.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    up.set_defaults(func=_demo_up)
