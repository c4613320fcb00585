"""RFC 6962 / RFC 9162 Merkle tree: leaf and node hashes, an append-only tree, proofs and their verifiers.

This module owns the arithmetic of tamper evidence and nothing else: it takes hashes and sizes and
returns hashes and proofs, or raises. It reads no files and keeps no records; the store feeds it
leaf hashes (``leaf_hash(record bytes)``) and keeps them durable.

The verifiers follow transparency-dev/merkle (``proof/verify.go``) case for case, so that a proof
this gateway accepts is one every RFC 6962 verifier accepts:

- inclusion: ``index >= size`` is an error, the leaf hash must be 32 bytes, the proof must have
  exactly the length the (index, size) pair implies;
- consistency: ``size2 < size1`` is an error, a proof from ``size1 == 0`` is an error (it proves
  nothing), ``size1 == size2`` needs an empty proof and equal roots, an empty proof is otherwise an
  error, and the proof must have exactly the implied length.

One deliberate tightening: every proof element must be exactly 32 bytes. transparency-dev does not
check element sizes, but a wrong-sized element can only verify by shifting bytes between adjacent
elements, which would make the same proof readable two ways; refusing it changes no honest outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Sequence

from gateway.errors import InvalidArgument

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_PROOF_LENGTH",
    "MerkleTree",
    "ProofError",
    "TreeError",
    "bench_tree",
    "leaf_hash",
    "node_hash",
    "root_from_consistency",
    "root_from_inclusion",
    "verify_consistency",
    "verify_inclusion",
]

#: Size in bytes of every hash in the tree (SHA-256).
HASH_SIZE = 32

#: SHA-256 of the empty string: the root of the empty tree (RFC 6962 section 2.1).
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()

#: Tree sizes and indices are uint64 on the wire (RFC 6962, checkpoints).
_MAX_SIZE = (1 << 64) - 1

#: No proof in a tree of at most 2**64 leaves is longer than this (RFC 9162: at most 64 elements,
#: of which a consistency proof may need 63 plus one seed; tlog-witness allows 63 lines).
MAX_PROOF_LENGTH = 64

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_sha256 = hashlib.sha256


class ProofError(InvalidArgument):
    """A Merkle proof does not verify, or is malformed (wrong length, wrong sizes, bad hashes)."""

    default_public = "invalid proof"


class TreeError(InvalidArgument):
    """A request to the tree is out of range: an index or size beyond the tree, or a bad leaf hash."""


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 6962 leaf hash, SHA-256(0x00 || data)."""
    return _sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 interior node hash, SHA-256(0x01 || left || right)."""
    return _sha256(_NODE_PREFIX + left + right).digest()


# -- the tree -------------------------------------------------------------------------------------


class MerkleTree:
    """Append-only tree over leaf hashes, in memory.

    The tree keeps, per level, the hashes of every complete subtree built so far: level 0 holds the
    leaf hashes, level k the hashes of the aligned runs of 2**k leaves. Each level is one contiguous
    ``bytearray`` of 32-byte hashes, so a million leaves cost about 64 MB and no per-hash objects.
    Appending a leaf hashes only the subtrees it completes (one node hash on average); the root of
    any earlier size and every proof are assembled from at most O(log n) stored or combined hashes.

    With `dense_levels` L and a `leaves` source, levels below L are kept only for the block of
    2**L leaves still being filled: memory is about 64/2**L bytes per leaf instead of 64 (with
    L = 8, a quarter of a byte), and a node of a finished block is recomputed when a root or
    proof needs it from the block's leaf hashes, which `leaves(start, end)` returns (the
    concatenated hashes of leaves [start, end), e.g. read back from the log's database).

    Not thread-safe: one writer, or a lock around it.
    """

    __slots__ = ("_base", "_dense", "_leaves", "_levels", "_size")

    def __init__(
        self,
        leaf_hashes: Iterable[bytes] = (),
        *,
        dense_levels: int | None = None,
        leaves: Callable[[int, int], bytes] | None = None,
    ) -> None:
        if (dense_levels is None) != (leaves is None):
            raise TreeError("dense_levels and leaves go together")
        if dense_levels is not None and not 1 <= dense_levels <= 24:
            raise TreeError("dense_levels must be 1..24")
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self._dense = dense_levels
        self._leaves = leaves
        #: per level below `dense_levels`: how many nodes from the front were dropped
        self._base: list[int] = [0] * (dense_levels or 0)
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        """Number of leaves in the tree."""
        return self._size

    def __len__(self) -> int:
        return self._size

    def append(self, leaf_hash: bytes) -> int:
        """Add one leaf hash; return the new leaf's index."""
        if len(leaf_hash) != HASH_SIZE:
            raise TreeError(f"a leaf hash is {HASH_SIZE} bytes, got {len(leaf_hash)}")
        levels = self._levels
        levels[0] += leaf_hash
        index = self._size
        self._size = n = index + 1
        level = 0
        # Each trailing zero bit of the new size is a subtree this leaf completes.
        while not n & 1:
            digest = _sha256(_NODE_PREFIX + levels[level][-2 * HASH_SIZE :]).digest()
            level += 1
            if level == len(levels):
                levels.append(bytearray())
            levels[level] += digest
            n >>= 1
        if self._dense is not None:
            self._prune()
        return index

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Add many leaf hashes in order (faster than repeated `append`)."""
        batch = leaf_hashes if isinstance(leaf_hashes, (list, tuple)) else list(leaf_hashes)
        if not batch:
            return
        lengths = set(map(len, batch))
        if lengths != {HASH_SIZE}:
            bad = sorted(lengths - {HASH_SIZE})
            raise TreeError(f"a leaf hash is {HASH_SIZE} bytes, got lengths {bad}")
        levels = self._levels
        old_count = self._size
        levels[0] += b"".join(batch)
        self._size = new_count = old_count + len(batch)
        level = 0
        # Bottom up: at each level hash the pairs that became complete; the parents of level k are
        # exactly the pairs (2i, 2i+1) with 2i+1 < count, so only the new ones are hashed.
        while new_count >= 2:
            first, last = old_count >> 1, new_count >> 1
            if first == last:
                break
            src = levels[level]
            step = 2 * HASH_SIZE
            prefix = _NODE_PREFIX
            # Positions in the stored level: node indexes minus the nodes pruned from its front.
            shift = (self._base[level] if level < len(self._base) else 0) * HASH_SIZE
            parents = b"".join(
                [
                    _sha256(prefix + src[off - shift : off - shift + step]).digest()
                    for off in range(first * step, last * step, step)
                ]
            )
            level += 1
            if level == len(levels):
                levels.append(bytearray())
            levels[level] += parents
            old_count, new_count = first, last
        if self._dense is not None:
            self._prune()

    def use_leaves(self, leaves: Callable[[int, int], bytes]) -> None:
        """Read the leaves of finished blocks from `leaves` from now on (a pruned tree only)."""
        if self._dense is None:
            raise TreeError("only a pruned tree (dense_levels) reads its leaves back")
        self._leaves = leaves

    def _prune(self) -> None:
        """Drop the nodes below the dense levels that belong to finished blocks."""
        assert self._dense is not None  # noqa: S101  # only called when pruning
        blocks = self._size >> self._dense
        for level in range(self._dense):
            keep_from = blocks << (self._dense - level)
            drop = keep_from - self._base[level]
            if drop > 0:
                del self._levels[level][: drop * HASH_SIZE]
                self._base[level] = keep_from

    def leaf(self, index: int) -> bytes:
        """Return the leaf hash at `index`."""
        _check_index(index, self._size)
        return self._node(0, index)

    def root(self, size: int | None = None) -> bytes:
        """Return the root of the tree made of the first `size` leaves (default: all of them)."""
        size = self._size_arg(size)
        if size == 0:
            return EMPTY_ROOT
        return self._range_hash(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Return the audit path of leaf `index` in the tree of the first `size` leaves (RFC 6962 PATH).

        Elements are ordered from the leaf's sibling upwards, as RFC 6962 and transparency-dev do.
        """
        size = self._size_arg(size)
        _check_index(index, size)
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            split = lo + _largest_power_of_two_below(hi - lo)
            if index < split:
                path.append(self._range_hash(split, hi))
                hi = split
            else:
                path.append(self._range_hash(lo, split))
                lo = split
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Return the consistency proof from the tree of `old_size` leaves to that of `new_size` (RFC 6962 PROOF).

        Empty when ``old_size == 0`` or ``old_size == new_size``, like transparency-dev's generator:
        there is nothing to prove, and the verifier treats those cases on their own.
        """
        new_size = self._size_arg(new_size)
        if not isinstance(old_size, int) or isinstance(old_size, bool) or not 0 <= old_size <= new_size:
            raise TreeError(f"old size {old_size!r} is outside 0..{new_size}")
        if old_size in (0, new_size):
            return []
        # SUBPROOF(m, D[lo:hi], b), unrolled: `tail` collects what each level appends after recursing.
        tail: list[bytes] = []
        lo, hi, complete = 0, new_size, True
        m = old_size
        while m != hi - lo:
            k = _largest_power_of_two_below(hi - lo)
            if m <= k:
                tail.append(self._range_hash(lo + k, hi))
                hi = lo + k
            else:
                tail.append(self._range_hash(lo, lo + k))
                lo, m, complete = lo + k, m - k, False
        head = [] if complete else [self._range_hash(lo, hi)]
        tail.reverse()
        return head + tail

    # -- internals --------------------------------------------------------------------------------

    def _size_arg(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= self._size:
            raise TreeError(f"tree size {size!r} is outside 0..{self._size}")
        return size

    def _node(self, level: int, index: int) -> bytes:
        base = self._base[level] if level < len(self._base) else 0
        if index >= base:
            pos = (index - base) * HASH_SIZE
            return bytes(self._levels[level][pos : pos + HASH_SIZE])
        # A node of a finished block: recompute it from its leaves.
        assert self._leaves is not None  # noqa: S101  # only pruned trees have a base
        start, end = index << level, (index + 1) << level
        data = self._leaves(start, end)
        if len(data) != (end - start) * HASH_SIZE:
            raise TreeError(f"leaf source gave {len(data)} bytes for leaves {start}..{end - 1}")
        nodes = [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]
        while len(nodes) > 1:
            nodes = [node_hash(nodes[i], nodes[i + 1]) for i in range(0, len(nodes), 2)]
        return nodes[0]

    def _range_hash(self, start: int, end: int) -> bytes:
        """MTH of leaves [start, end), where `start` is aligned to a power of two >= end - start.

        Every range the RFC 6962 recursion visits has that shape, so the range splits into the
        stored complete subtrees given by the binary digits of its length, largest first; RFC 6962
        folds them from the right.
        """
        nodes: list[bytes] = []
        pos, remaining = start, end - start
        while remaining:
            level = remaining.bit_length() - 1
            nodes.append(self._node(level, pos >> level))
            pos += 1 << level
            remaining -= 1 << level
        digest = nodes.pop()
        while nodes:
            digest = node_hash(nodes.pop(), digest)
        return digest


def _largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly less than n (n >= 2): RFC 6962's split point k."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_index(index: int, size: int) -> None:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < size:
        raise TreeError(f"leaf index {index!r} is outside 0..{size - 1}")


# -- verifiers ------------------------------------------------------------------------------------


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_SIZE:
        raise ProofError(f"{name} {value!r} is not a uint64")


def _check_proof(proof: Sequence[bytes]) -> list[bytes]:
    if len(proof) > MAX_PROOF_LENGTH:
        raise ProofError(f"proof has {len(proof)} elements, more than any tree needs ({MAX_PROOF_LENGTH})")
    elements = list(proof)
    for i, element in enumerate(elements):
        if not isinstance(element, bytes) or len(element) != HASH_SIZE:
            raise ProofError(f"proof element {i} is not a {HASH_SIZE}-byte hash")
    return elements


def _decomp_incl_proof(index: int, size: int) -> tuple[int, int]:
    """Split an inclusion proof's length into the part below and above where paths to `index` and `size-1` meet."""
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if not (index >> i) & 1 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def root_from_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """Compute the root a tree of `size` leaves must have if `proof` shows `leaf_hash` at `index`.

    Raises ProofError if the arguments cannot form a valid proof.
    """
    _check_count("leaf index", index)
    _check_count("tree size", size)
    if index >= size:
        raise ProofError(f"leaf index {index} is beyond the tree size {size}")
    if not isinstance(leaf_hash, bytes) or len(leaf_hash) != HASH_SIZE:
        raise ProofError(f"the leaf hash is not {HASH_SIZE} bytes")
    elements = _check_proof(proof)
    inner, border = _decomp_incl_proof(index, size)
    if len(elements) != inner + border:
        raise ProofError(f"inclusion proof has {len(elements)} elements, want {inner + border}")
    digest = _chain_inner(leaf_hash, elements[:inner], index)
    return _chain_border_right(digest, elements[inner:])


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `proof` shows `leaf_hash` at `index` in the tree of `size` leaves with `root`.

    Raises ProofError if it does not.
    """
    calculated = root_from_inclusion(leaf_hash, index, size, proof)
    if not isinstance(root, bytes) or not hmac.compare_digest(calculated, root):
        raise ProofError(f"inclusion proof for leaf {index} does not lead to the root of the tree of size {size}")


def root_from_consistency(old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes) -> bytes:
    """Check `proof` against `old_root` and compute the root the tree of `new_size` leaves must have.

    Raises ProofError if the proof is malformed or does not lead to `old_root`.
    """
    _check_count("old size", old_size)
    _check_count("new size", new_size)
    elements = _check_proof(proof)
    if new_size < old_size:
        raise ProofError(f"new size {new_size} is smaller than old size {old_size}")
    if old_size == 0:
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if old_size == new_size:
        if elements:
            raise ProofError("old size equals new size, but the proof is not empty")
        return old_root
    if not elements:
        raise ProofError("empty consistency proof")

    inner, border = _decomp_incl_proof(old_size - 1, new_size)
    shift = (old_size & -old_size).bit_length() - 1  # trailing zero bits of old_size
    inner -= shift
    # The proof starts with the root of the largest complete subtree ending at old_size, unless
    # old_size is itself a power of two, in which case that subtree is the whole old tree.
    if old_size == 1 << shift:
        seed, start = old_root, 0
    else:
        seed, start = elements[0], 1
    if len(elements) != start + inner + border:
        raise ProofError(f"consistency proof has {len(elements)} elements, want {start + inner + border}")
    path = elements[start:]
    mask = (old_size - 1) >> shift
    old_calculated = _chain_border_right(_chain_inner_right(seed, path[:inner], mask), path[inner:])
    if not isinstance(old_root, bytes) or not hmac.compare_digest(old_calculated, old_root):
        raise ProofError(f"consistency proof does not lead to the old root (size {old_size})")
    return _chain_border_right(_chain_inner(seed, path[:inner], mask), path[inner:])


def verify_consistency(old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes) -> None:
    """Check that the tree of `new_size` leaves with `new_root` extends the one of `old_size` with `old_root`.

    Raises ProofError if it does not.
    """
    calculated = root_from_consistency(old_size, new_size, proof, old_root)
    if not isinstance(new_root, bytes) or not hmac.compare_digest(calculated, new_root):
        raise ProofError(f"consistency proof from size {old_size} does not lead to the new root (size {new_size})")


# -- benchmark ------------------------------------------------------------------------------------


def bench_tree(n: int = 1_000_000) -> dict[str, float]:
    """Measure building a tree over `n` leaf hashes and taking its root; return rates and ratios.

    Figures (per second unless named otherwise), all from the same run:

    - ``extend_leaves_per_s``: `MerkleTree(leaf_hashes)` plus `root()`, the auditors' `verify` path;
    - ``append_leaves_per_s``: the same leaves one `append` at a time, the live log's path;
    - ``sha256_per_s``: bare 64-byte SHA-256 calls, the floor under both (a tree of n leaves needs
      n - 1 node hashes);
    - ``extend_vs_sha256`` and ``append_vs_sha256``: the tree rates over the bare hash rate.
    """
    if n < 2:
        raise ValueError("bench_tree needs at least two leaves")
    hashes = [leaf_hash(i.to_bytes(8, "big")) for i in range(n)]

    start = time.perf_counter()
    tree = MerkleTree(hashes)
    root = tree.root()
    extend_s = time.perf_counter() - start

    start = time.perf_counter()
    appended = MerkleTree()
    for h in hashes:
        appended.append(h)
    append_root = appended.root()
    append_s = time.perf_counter() - start
    if append_root != root:  # pragma: no cover - a self-check of the benchmark, not a test
        raise AssertionError("append and extend built different trees")

    pair = b"\x01" + hashes[0] + hashes[1]
    start = time.perf_counter()
    for _ in range(n - 1):
        _sha256(pair).digest()
    sha_s = time.perf_counter() - start

    extend_rate = n / extend_s
    append_rate = n / append_s
    sha_rate = (n - 1) / sha_s
    return {
        "leaves": float(n),
        "extend_seconds": extend_s,
        "extend_leaves_per_s": extend_rate,
        "append_seconds": append_s,
        "append_leaves_per_s": append_rate,
        "sha256_per_s": sha_rate,
        "extend_vs_sha256": extend_rate / sha_rate,
        "append_vs_sha256": append_rate / sha_rate,
    }
