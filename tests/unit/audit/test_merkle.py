"""RFC 6962 Merkle tree: every shared test vector, the README's root table, generated proofs, tampering.

The vectors in ../shared/vectors/rfc6962 are transparency-dev/merkle's testdata; each file is one
case, found by glob, so adding a file adds a case.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit.merkle import (
    EMPTY_ROOT,
    MAX_PROOF_LENGTH,
    MerkleTree,
    ProofError,
    TreeError,
    bench_tree,
    leaf_hash,
    node_hash,
    root_from_consistency,
    root_from_inclusion,
    verify_consistency,
    verify_inclusion,
)
from gateway.errors import InvalidArgument

# A copy of ../shared/vectors/rfc6962 lives in the repository, so a clone alone runs every vector;
# test_vector_copy_matches_the_shared_files checks the copy against the shared files when present.
VECTORS = Path(__file__).resolve().parents[2] / "data" / "rfc6962"
SHARED_VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors" / "rfc6962"
INCLUSION_FILES = sorted(VECTORS.glob("inclusion/**/*.json"))
CONSISTENCY_FILES = sorted(VECTORS.glob("consistency/**/*.json"))


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "", validate=True)


def _proof(value: list[str] | None) -> list[bytes]:
    return [_b64(p) for p in value or []]


def _vector_id(path: Path) -> str:
    return str(path.relative_to(VECTORS))


# -- the shared vectors ---------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_VECTORS.is_dir(), reason="../shared/vectors is not beside this clone")
def test_vector_copy_matches_the_shared_files() -> None:
    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert tree(VECTORS) == tree(SHARED_VECTORS)


def test_the_vectors_were_found() -> None:
    """Fails if the glob finds nothing: an empty parametrised test would otherwise just be skipped."""
    assert INCLUSION_FILES, f"no inclusion vectors under {VECTORS}"
    assert CONSISTENCY_FILES, f"no consistency vectors under {VECTORS}"
    for files in (INCLUSION_FILES, CONSISTENCY_FILES):
        outcomes = {_load(f)["wantErr"] for f in files}
        assert outcomes == {True, False}, "the vectors should include both accepted and rejected proofs"


@pytest.mark.parametrize("path", INCLUSION_FILES, ids=_vector_id)
def test_inclusion_vector(path: Path) -> None:
    case = _load(path)
    args = (_b64(case["leafHash"]), case["leafIdx"], case["treeSize"], _proof(case["proof"]), _b64(case["root"]))
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("path", CONSISTENCY_FILES, ids=_vector_id)
def test_consistency_vector(path: Path) -> None:
    case = _load(path)
    args = (case["size1"], case["size2"], _proof(case["proof"]), _b64(case["root1"]), _b64(case["root2"]))
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


# -- the README's eight leaves and root table -----------------------------------------------------

LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_readme_root_table_matches_ours() -> None:
    """The table in the vectors' README is the one hard-coded here (so neither drifts)."""
    readme = (VECTORS / "README.md").read_text()
    for n, root in enumerate(ROOTS):
        assert f"| {n} | {root} |" in readme


@pytest.mark.parametrize("n", range(len(ROOTS)))
def test_standard_leaves_give_the_published_roots(n: int) -> None:
    hashes = [leaf_hash(x) for x in LEAVES]
    assert MerkleTree(hashes[:n]).root().hex() == ROOTS[n]
    assert MerkleTree(hashes).root(n).hex() == ROOTS[n]


def test_hash_primitives() -> None:
    assert EMPTY_ROOT.hex() == ROOTS[0]
    assert leaf_hash(b"").hex() == ROOTS[1]
    assert node_hash(leaf_hash(b""), leaf_hash(b"\x00")).hex() == ROOTS[2]
    assert issubclass(ProofError, InvalidArgument)
    assert issubclass(TreeError, InvalidArgument)


def test_known_proofs_from_transparency_dev() -> None:
    """Hand-written proofs from transparency-dev/merkle's verify_test.go, over the eight leaves."""
    tree = MerkleTree(leaf_hash(x) for x in LEAVES)
    h = bytes.fromhex
    assert tree.inclusion_proof(0, 8) == [
        h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    ]
    assert tree.inclusion_proof(5, 8) == [
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]
    assert tree.inclusion_proof(2, 3) == [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]
    assert tree.consistency_proof(6, 8) == [
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]
    assert tree.consistency_proof(2, 5) == [
        h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
        h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
    ]
    assert tree.consistency_proof(6, 7) == [
        h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
        h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
        h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    ]


# -- generated proofs against the RFC's recursive definitions -------------------------------------

REF_LEAVES = tuple(leaf_hash(i.to_bytes(2, "big")) for i in range(70))


def _split(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


@functools.cache
def _ref_mth(lo: int, hi: int) -> bytes:
    """RFC 6962 2.1: MTH(D[lo:hi]), straight from the definition."""
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return REF_LEAVES[lo]
    k = _split(n)
    return node_hash(_ref_mth(lo, lo + k), _ref_mth(lo + k, hi))


def _ref_path(m: int, lo: int, hi: int) -> list[bytes]:
    """RFC 6962 2.1.1: PATH(m, D[lo:hi])."""
    n = hi - lo
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*_ref_path(m, lo, lo + k), _ref_mth(lo + k, hi)]
    return [*_ref_path(m - k, lo + k, hi), _ref_mth(lo, lo + k)]


def _ref_subproof(m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
    """RFC 6962 2.1.2: SUBPROOF(m, D[lo:hi], b)."""
    n = hi - lo
    if m == n:
        return [] if complete else [_ref_mth(lo, hi)]
    k = _split(n)
    if m <= k:
        return [*_ref_subproof(m, lo, lo + k, complete), _ref_mth(lo + k, hi)]
    return [*_ref_subproof(m - k, lo + k, hi, False), _ref_mth(lo, lo + k)]


def test_roots_match_the_rfc_definition() -> None:
    tree = MerkleTree(REF_LEAVES)
    for n in range(len(REF_LEAVES) + 1):
        assert tree.root(n) == _ref_mth(0, n)


def test_every_inclusion_proof_up_to_64_is_the_rfc_path_and_verifies() -> None:
    tree = MerkleTree(REF_LEAVES)
    for size in range(1, 65):
        root = tree.root(size)
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert proof == _ref_path(index, 0, size), (index, size)
            verify_inclusion(tree.leaf(index), index, size, proof, root)
            assert root_from_inclusion(tree.leaf(index), index, size, proof) == root


def test_every_consistency_proof_up_to_64_is_the_rfc_proof_and_verifies() -> None:
    tree = MerkleTree(REF_LEAVES)
    for new in range(1, 65):
        for old in range(1, new + 1):
            proof = tree.consistency_proof(old, new)
            assert proof == _ref_subproof(old, 0, new, True), (old, new)
            verify_consistency(old, new, proof, tree.root(old), tree.root(new))
            assert root_from_consistency(old, new, proof, tree.root(old)) == tree.root(new)


# -- the tree's own behaviour ---------------------------------------------------------------------


def test_append_returns_indices_and_matches_extend() -> None:
    one_by_one = MerkleTree()
    for i, h in enumerate(REF_LEAVES):
        assert one_by_one.append(h) == i
        assert one_by_one.size == len(one_by_one) == i + 1
    in_batches = MerkleTree()
    for start in range(0, len(REF_LEAVES), 7):  # uneven batches cross subtree boundaries
        in_batches.extend(REF_LEAVES[start : start + 7])
    in_batches.extend([])
    for n in range(len(REF_LEAVES) + 1):
        assert one_by_one.root(n) == in_batches.root(n) == MerkleTree(REF_LEAVES[:n]).root()
    assert [one_by_one.leaf(i) for i in range(len(REF_LEAVES))] == list(REF_LEAVES)


def test_historical_roots_and_proofs_do_not_change_as_the_tree_grows() -> None:
    tree = MerkleTree(REF_LEAVES[:13])
    root13, proof = tree.root(), tree.inclusion_proof(5)
    tree.extend(REF_LEAVES[13:])
    assert tree.root(13) == root13
    assert tree.inclusion_proof(5, 13) == proof


def test_empty_tree() -> None:
    tree = MerkleTree()
    assert tree.size == 0
    assert tree.root() == EMPTY_ROOT
    assert tree.consistency_proof(0) == []
    with pytest.raises(TreeError):
        tree.leaf(0)


def test_trivial_consistency_proofs_are_empty() -> None:
    tree = MerkleTree(REF_LEAVES[:9])
    assert tree.consistency_proof(0, 9) == []
    assert tree.consistency_proof(9) == []


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda t: t.append(b"\x00" * 31), id="append-short-hash"),
        pytest.param(lambda t: t.append(b"\x00" * 33), id="append-long-hash"),
        pytest.param(lambda t: t.extend([b"\x00" * 32, b"\x00" * 31, b"\x00" * 33]), id="extend-mixed-lengths"),
        pytest.param(lambda t: t.leaf(5), id="leaf-beyond-size"),
        pytest.param(lambda t: t.leaf(-1), id="leaf-negative"),
        pytest.param(lambda t: t.root(6), id="root-beyond-size"),
        pytest.param(lambda t: t.root(-1), id="root-negative"),
        pytest.param(lambda t: t.inclusion_proof(5), id="inclusion-index-equals-size"),
        pytest.param(lambda t: t.inclusion_proof(1, 1), id="inclusion-index-beyond-given-size"),
        pytest.param(lambda t: t.inclusion_proof(0, 0), id="inclusion-in-empty-prefix"),
        pytest.param(lambda t: t.consistency_proof(4, 3), id="consistency-old-above-new"),
        pytest.param(lambda t: t.consistency_proof(2, 6), id="consistency-new-beyond-size"),
        pytest.param(lambda t: t.consistency_proof(-1), id="consistency-negative"),
        pytest.param(lambda t: t.root(True), id="bool-is-not-a-size"),
    ],
)
def test_tree_refuses_out_of_range_requests(call: Any) -> None:
    tree = MerkleTree(REF_LEAVES[:5])
    with pytest.raises(TreeError):
        call(tree)
    assert tree.size == 5  # a refused append left the tree unchanged
    assert tree.root() == _ref_mth(0, 5)


# -- the verifiers' edge cases, by name -----------------------------------------------------------

TREE8 = MerkleTree(REF_LEAVES[:8])
R = {n: TREE8.root(n) for n in range(9)}
L2 = TREE8.leaf(2)
P_INCL = TREE8.inclusion_proof(2, 7)
P_CONS = TREE8.consistency_proof(3, 7)


def _incl(leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> Callable[[], None]:
    return lambda: verify_inclusion(leaf, index, size, proof, root)


def _cons(old: int, new: int, proof: list[bytes], old_root: bytes, new_root: bytes) -> Callable[[], None]:
    return lambda: verify_consistency(old, new, proof, old_root, new_root)


# Each refusal names its reason, so a test fails if the check that should refuse is removed even
# when a later check would still refuse the input.
REFUSALS: dict[str, tuple[Callable[[], None], str]] = {
    "inclusion: index equals size": (_incl(L2, 7, 7, P_INCL, R[7]), "beyond the tree size"),
    "inclusion: index beyond size": (_incl(L2, 8, 7, P_INCL, R[7]), "beyond the tree size"),
    "inclusion: empty tree": (_incl(TREE8.leaf(0), 0, 0, [], EMPTY_ROOT), "beyond the tree size"),
    "inclusion: missing element": (_incl(L2, 2, 7, P_INCL[:-1], R[7]), "elements, want"),
    "inclusion: trailing element": (_incl(L2, 2, 7, [*P_INCL, R[7]], R[7]), "elements, want"),
    "inclusion: leading element": (_incl(L2, 2, 7, [R[7], *P_INCL], R[7]), "elements, want"),
    "inclusion: short leaf hash": (_incl(L2[:31], 2, 7, P_INCL, R[7]), "leaf hash is not 32 bytes"),
    "inclusion: short proof element": (_incl(L2, 2, 7, [P_INCL[0][:31], *P_INCL[1:]], R[7]), "32-byte hash"),
    "inclusion: negative index": (_incl(L2, -1, 7, P_INCL, R[7]), "uint64"),
    "inclusion: size over uint64": (_incl(L2, 2, 1 << 64, P_INCL, R[7]), "uint64"),
    "inclusion: wrong root": (_incl(L2, 2, 7, P_INCL, R[8]), "does not lead"),
    "inclusion: wrong leaf": (_incl(TREE8.leaf(3), 2, 7, P_INCL, R[7]), "does not lead"),
    "inclusion: wrong index": (_incl(L2, 3, 7, P_INCL, R[7]), "does not lead"),
    "inclusion: far too long proof": (_incl(L2, 2, 7, [R[7]] * (MAX_PROOF_LENGTH + 1), R[7]), "than any tree"),
    "consistency: from size 0": (_cons(0, 7, [], EMPTY_ROOT, R[7]), "empty tree is meaningless"),
    "consistency: from size 0 to 0": (_cons(0, 0, [], EMPTY_ROOT, EMPTY_ROOT), "empty tree is meaningless"),
    "consistency: old above new": (_cons(7, 3, P_CONS, R[7], R[3]), "smaller than old size"),
    "consistency: equal sizes, a proof": (_cons(7, 7, [R[7]], R[7], R[7]), "proof is not empty"),
    "consistency: equal sizes, different roots": (_cons(7, 7, [], R[7], R[6]), "new root"),
    "consistency: empty proof": (_cons(3, 7, [], R[3], R[7]), "empty consistency proof"),
    "consistency: missing element": (_cons(3, 7, P_CONS[:-1], R[3], R[7]), "elements, want"),
    "consistency: trailing element": (_cons(3, 7, [*P_CONS, R[3]], R[3], R[7]), "elements, want"),
    "consistency: leading element": (_cons(3, 7, [R[3], *P_CONS], R[3], R[7]), "elements, want"),
    "consistency: short element": (_cons(3, 7, [P_CONS[0][:31], *P_CONS[1:]], R[3], R[7]), "32-byte hash"),
    "consistency: wrong old root": (_cons(3, 7, P_CONS, R[4], R[7]), "old root"),
    "consistency: wrong new root": (_cons(3, 7, P_CONS, R[3], R[8]), "new root"),
    "consistency: swapped roots": (_cons(3, 7, P_CONS, R[7], R[3]), "old root"),
    "consistency: negative size": (_cons(-1, 7, P_CONS, R[3], R[7]), "uint64"),
    "consistency: bool size": (_cons(True, 7, P_CONS, R[3], R[7]), "uint64"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_verifier_refuses(name: str) -> None:
    call, reason = REFUSALS[name]
    with pytest.raises(ProofError, match=reason):
        call()


def test_verifier_accepts_the_trivial_cases() -> None:
    verify_consistency(7, 7, [], R[7], R[7])
    verify_consistency(3, 7, P_CONS, R[3], R[7])
    verify_inclusion(TREE8.leaf(0), 0, 1, [], R[1])


# -- property tests: random trees, single-bit tampering -------------------------------------------


def _flip(data: bytes, bit: int) -> bytes:
    bit %= len(data) * 8
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@st.composite
def _inclusion_case(draw: st.DrawFn) -> tuple[MerkleTree, int, int]:
    n = draw(st.integers(1, 300))
    tree = MerkleTree(leaf_hash(i.to_bytes(4, "big") + bytes([draw(st.integers(0, 3))])) for i in range(n))
    size = draw(st.integers(1, n))
    index = draw(st.integers(0, size - 1))
    return tree, index, size


@st.composite
def _consistency_case(draw: st.DrawFn) -> tuple[MerkleTree, int, int]:
    n = draw(st.integers(2, 300))
    tree = MerkleTree(leaf_hash(i.to_bytes(4, "big")) for i in range(n))
    new = draw(st.integers(2, n))
    old = draw(st.integers(1, new - 1))
    return tree, old, new


@settings(deadline=None)
@given(case=_inclusion_case(), target=st.sampled_from(["proof", "root", "leaf"]), bit=st.integers(0, 1 << 16))
def test_any_single_bit_change_breaks_an_inclusion_proof(
    case: tuple[MerkleTree, int, int], target: str, bit: int
) -> None:
    tree, index, size = case
    leaf, proof, root = tree.leaf(index), tree.inclusion_proof(index, size), tree.root(size)
    verify_inclusion(leaf, index, size, proof, root)
    if target == "proof":
        if not proof:
            return
        i = bit % len(proof)
        proof[i] = _flip(proof[i], bit // len(proof))
    elif target == "root":
        root = _flip(root, bit)
    else:
        leaf = _flip(leaf, bit)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, size, proof, root)


@settings(deadline=None)
@given(case=_consistency_case(), target=st.sampled_from(["proof", "old", "new"]), bit=st.integers(0, 1 << 16))
def test_any_single_bit_change_breaks_a_consistency_proof(
    case: tuple[MerkleTree, int, int], target: str, bit: int
) -> None:
    tree, old, new = case
    proof, old_root, new_root = tree.consistency_proof(old, new), tree.root(old), tree.root(new)
    verify_consistency(old, new, proof, old_root, new_root)
    if target == "proof":
        i = bit % len(proof)
        proof[i] = _flip(proof[i], bit // len(proof))
    elif target == "old":
        old_root = _flip(old_root, bit)
    else:
        new_root = _flip(new_root, bit)
    with pytest.raises(ProofError):
        verify_consistency(old, new, proof, old_root, new_root)


@settings(deadline=None)
@given(
    index=st.integers(-2, 70),
    size=st.integers(-2, 70),
    proof=st.lists(st.binary(min_size=0, max_size=40), max_size=8),
    leaf=st.binary(max_size=40),
    root=st.binary(max_size=40),
)
def test_garbage_raises_only_proof_error(index: int, size: int, proof: list[bytes], leaf: bytes, root: bytes) -> None:
    calls: list[Callable[[], None]] = [
        lambda: verify_inclusion(leaf, index, size, proof, root),
        lambda: verify_consistency(index, size, proof, leaf, root),
    ]
    for call in calls:
        with contextlib.suppress(ProofError):
            call()


@settings(deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6))
def test_trees_grown_in_any_batches_agree(sizes: list[int]) -> None:
    hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(sum(sizes))]
    tree, pos = MerkleTree(), 0
    for n in sizes:
        tree.extend(hashes[pos : pos + n])
        pos += n
        assert tree.root() == MerkleTree(hashes[:pos]).root()
    reference = MerkleTree()
    for h in hashes:
        reference.append(h)
    assert all(tree.root(n) == reference.root(n) for n in range(len(hashes) + 1))


# -- benchmark (not a test: `make bench`) ---------------------------------------------------------


@pytest.mark.bench
def test_bench_tree_build_rate() -> None:
    figures = bench_tree(1_000_000)
    print()
    for key, value in figures.items():
        print(f"  {key:24} {value:,.3f}")
    assert figures["extend_leaves_per_s"] > 0


# -- the pruned tree (dense levels + a leaf source) ---------------------------------------------


@pytest.mark.parametrize("dense", [1, 2, 3, 5])
@pytest.mark.parametrize("by", ["append", "extend"])
def test_a_pruned_tree_answers_exactly_like_a_full_one(dense: int, by: str) -> None:
    hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(150)]
    store = b"".join(hashes)
    reads: list[tuple[int, int]] = []

    def leaves(start: int, end: int) -> bytes:
        reads.append((start, end))
        return store[start * 32 : end * 32]

    full = MerkleTree(hashes)
    pruned = MerkleTree(dense_levels=dense, leaves=leaves)
    if by == "append":
        for h in hashes:
            pruned.append(h)
    else:
        for chunk in range(0, 150, 17):
            pruned.extend(hashes[chunk : chunk + 17])
    assert pruned.size == full.size
    for size in range(1, 151, 7):
        assert pruned.root(size) == full.root(size)
        for index in range(0, size, 5):
            assert pruned.inclusion_proof(index, size) == full.inclusion_proof(index, size)
        for old in range(0, size + 1, 6):
            assert pruned.consistency_proof(old, size) == full.consistency_proof(old, size)
    assert all(pruned.leaf(i) == hashes[i] for i in range(150))
    assert reads and all(end - start <= 1 << dense for start, end in reads)


def test_a_pruned_tree_keeps_little_memory() -> None:
    n = 1 << 14
    tree = MerkleTree(dense_levels=8, leaves=lambda s, e: b"\0" * ((e - s) * 32))
    tree.extend(leaf_hash(i.to_bytes(4, "big")) for i in range(n))
    stored = sum(len(level) for level in tree._levels)
    assert stored <= (n >> 8) * 2 * 32 + 8 * 2 * 32 * 256  # levels >= 8 plus at most one block below


def test_a_wrong_leaf_source_is_an_error_not_a_wrong_root() -> None:
    hashes = [leaf_hash(bytes([i])) for i in range(16)]
    tree = MerkleTree(hashes, dense_levels=2, leaves=lambda s, e: b"short")
    with pytest.raises(TreeError):
        tree.root(3)
