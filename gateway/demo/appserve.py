"""Run one demo application (or the raw echo backend) in its own process.

``python -m gateway.demo.appserve --kind echo --listen 127.0.0.1:9001 --cert C --key K --ca CA
--allowed-caller spiffe://hampshire.se.psn/gateway`` serves one application from
`gateway.demo.apps` with mutual TLS until SIGTERM or SIGINT, then stops
gracefully. When it is serving it prints one line, ``ready <port>``, on stdout,
so a parent process (``psngw bench``) knows when to start sending calls.

The benchmark needs its backends in processes of their own: a backend on the
gateway's event loop would share the gateway's CPU and hide the gateway's cost.

Owns: the process entry of one demo application. Does not own: the
applications themselves (`gateway.demo.apps`), or the network layout
(`gateway.demo.network`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.demo.apps import APPLICATIONS, start_app

__all__ = ["build_parser", "main", "serve"]

#: How often (seconds) the process checks that its parent is still alive.
_PARENT_POLL = 1.0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m gateway.demo.appserve``."""
    p = argparse.ArgumentParser(
        prog="python -m gateway.demo.appserve",
        description="Serve one demo application (or the raw echo backend) with mTLS until SIGTERM/SIGINT.",
    )
    p.add_argument("--kind", required=True, choices=sorted(APPLICATIONS), help="which application to serve")
    p.add_argument("--listen", required=True, help="host:port to listen on (loopback for the demo)")
    p.add_argument("--cert", type=Path, required=True, help="the application's server certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    p.add_argument("--ca", type=Path, required=True, help="the CA that issues the callers' certificates (PEM)")
    p.add_argument("--allowed-caller", required=True, help="the only SPIFFE ID answered (this force's gateway)")
    p.add_argument("--max-message-bytes", type=int, default=8 * 1024 * 1024, help="largest message in or out")
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop when installed (auto, as `psngw serve` does), or plain asyncio",
    )
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the parent process goes away (used by `psngw bench`, so no backend outlives it)",
    )
    return p


async def serve(args: argparse.Namespace) -> int:
    """Start the application, print ``ready <port>``, serve until a stop signal (or the parent is gone)."""
    app = await start_app(
        args.kind,
        listen=args.listen,
        cert=args.cert,
        key=args.key,
        ca=args.ca,
        allowed_caller=args.allowed_caller,
        max_message_bytes=args.max_message_bytes,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    print(f"ready {app.port}", flush=True)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=_PARENT_POLL)
            if args.exit_with_parent and os.getppid() != parent:
                break  # orphaned: the parent died without stopping us
    finally:
        await app.stop(0.5)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and serve; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.loop != "asyncio":
        try:
            import uvloop  # noqa: PLC0415  # optional, as in `psngw serve`
        except ImportError:
            if args.loop == "uvloop":
                print("appserve: uvloop is not installed", file=sys.stderr)
                return 2
        else:
            uvloop.install()
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
