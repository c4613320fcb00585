"""The audit log: durable records, a Merkle tree over them, signed checkpoints and witnesses.

The package holds the pure tamper-evidence core (`merkle`, `note`, `witness`) and,
beside it, the record encoding, the durable store and the auditors' tools. Each
module says what it owns; import them by name (``from gateway.audit import merkle``).
"""

from __future__ import annotations

__all__: list[str] = []
