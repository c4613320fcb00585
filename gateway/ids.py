"""Identifiers for requests and decisions: unique, unguessable, and made without a system call.

A keyed BLAKE2b of a per-process counter, 16 bytes, hex: unique (one counter
per process, a new random key after a fork) and unguessable without the key,
like 16 random bytes. Made without `os.urandom` on the hot path, because that
system call releases the GIL and lets any other thread (the audit writer) run
in the middle of a call.
"""

from __future__ import annotations

import hashlib
import itertools
import os

__all__ = ["new_id"]


class _Ids:
    def __init__(self) -> None:
        self.rekey()
        os.register_at_fork(after_in_child=self.rekey)

    def rekey(self) -> None:
        self._key = os.urandom(32)
        self._counter = itertools.count()

    def new(self) -> str:
        count = next(self._counter).to_bytes(16, "big")
        return hashlib.blake2b(count, key=self._key, digest_size=16).hexdigest()


_IDS = _Ids()


def new_id() -> str:
    """A fresh 128-bit identifier, 32 lower-case hex digits."""
    return _IDS.new()
