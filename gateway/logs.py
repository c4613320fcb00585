"""Structured operator logs: one JSON object per line, the request id on every call line.

The operator log is not the audit log: it is for running the gateway (what
was refused and why, reloads, expiry warnings), may be rotated and shipped
anywhere, and never holds anything the audit log needs to prove.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "configure_logging"]

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"})


class JsonFormatter(logging.Formatter):
    """Format records as single-line JSON with any `extra=` fields."""

    @staticmethod
    def converter(secs: float | None = None) -> time.struct_time:
        """Times in UTC."""
        return time.gmtime(secs)

    def format(self, record: logging.LogRecord) -> str:
        """One JSON object: time, level, logger, message, then extra fields."""
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure_logging(*, level: str = "info", json_format: bool = True) -> None:
    """Send every logger (``psngw.*``, ``gateway.*``, libraries) to stderr, as JSON lines by default."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
