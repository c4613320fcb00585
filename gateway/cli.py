"""`psngw`: the one command of psn-gateway.

Each command group lives beside the code it drives and registers itself here
through a `register_cli(subparsers)` function. Every command function returns
an exit code. Errors are caught once, here: a `GatewayError` prints one line
(no traceback) and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.errors import GatewayError

__all__ = ["build_parser", "main"]

# psngw starts processes (benchmark hops, workers) while grpc runs: with grpc's fork support on, a
# child can abort between fork and exec (grpc/grpc#43055, its poller meeting a closed epoll fd).
# Nothing here forks to keep using grpc in the child, so turn it off before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

#: Modules that add command groups, in the order `--help` lists them.
_COMMAND_MODULES = (
    "gateway.serve",
    "gateway.pki",
    "gateway.token",
    "gateway.policy.cli",
    "gateway.audit.cli",
    "gateway.demo.cli",
    "gateway.bench",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every registered command group."""
    parser = argparse.ArgumentParser(
        prog="psngw",
        description="psn-gateway: a secure gRPC gateway for sharing police data between forces.",
    )
    parser.add_argument("--version", action="version", version=f"psngw {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command group is not part of this build yet
                continue
            raise
        module.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `psngw` with `argv`; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except GatewayError as exc:
        print(f"psngw: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
