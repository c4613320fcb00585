"""Crash-test child: append records under load and print each acknowledged one; the parent SIGKILLs it.

Usage: python -m tests.unit.audit._crash_child DB FIRST_RECORD_NUMBER

Prints ``open <records> <checkpoint size> <truncated>`` once, then ``ack <index> <record number>``
for every append that resolved (durable), flushed at once, from 32 concurrent appenders.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

from gateway.clock import SystemClock
from tests.unit.audit._helpers import make_record, new_log


async def _main(db: Path, first: int) -> None:
    log = new_log(db, clock=SystemClock(), checkpoint_every=25, checkpoint_interval=0.05, witness_quorum=0)
    report = log.open()
    print(f"open {report.records} {report.checkpoint_size} {len(report.truncated)}", flush=True)
    numbers = itertools.count(first)

    async def appender() -> None:
        while True:
            n = next(numbers)
            result = await log.append(make_record(n))
            sys.stdout.write(f"ack {result.index} {n}\n")
            sys.stdout.flush()

    await asyncio.gather(*(appender() for _ in range(32)))


if __name__ == "__main__":
    asyncio.run(_main(Path(sys.argv[1]), int(sys.argv[2])))
