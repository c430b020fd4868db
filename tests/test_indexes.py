"""Approximate indexes (faiss IVF and multi-index hashing) against exact search, on clustered
codes like a hashing model's: each item is one of a few class codes with some bits flipped."""

import numpy as np
import pytest

from lifelong_hashing.config import IndexConfig
from lifelong_hashing.engine.codestore import CodeStore, hamming_distances, pack_codes
from lifelong_hashing.inference.indexes import build_index, search_index, tie_aware_recall

pytestmark = pytest.mark.unit


def clustered_codes(n: int, bits: int, seed: int, flip: float = 0.12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).choice([-1, 1], size=(12, bits))
    signs = centres[rng.integers(12, size=n)] * np.where(rng.random((n, bits)) < flip, -1, 1)
    return pack_codes(signs)


def exact(db: np.ndarray, queries: np.ndarray, bits: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    store = CodeStore(bits)
    store.append([str(i) for i in range(len(db))], 0, np.ones((len(db), 1), np.uint8), ("c",),
                 {"image": db, "text": db})
    return store.search(queries, "image", k)


@pytest.mark.parametrize("cfg", [IndexConfig(kind="ivf", ivf_lists=32, ivf_probes=32),
                                 IndexConfig(kind="multihash", multihash_tables=4, multihash_flips=16)])
def test_an_index_that_probes_everything_finds_the_exact_neighbours(cfg):
    """All lists probed (IVF) or every bucket within reach (16 flips of 16-bit tables): recall 1,
    and every hit's distance is its true Hamming distance."""
    bits, k = 64, 50
    db, queries = clustered_codes(3000, bits, 0), clustered_codes(40, bits, 1)
    exact_idx, exact_dist = exact(db, queries, bits, k)
    idx, dist = search_index(build_index(db, bits, cfg), queries, bits, k)
    assert tie_aware_recall(exact_dist, dist) == 1.0
    true = hamming_distances(queries, db)
    np.testing.assert_array_equal(np.take_along_axis(true, idx, 1), dist)
    np.testing.assert_array_equal(dist, exact_dist)  # same distances, order by distance


def test_fewer_probes_trade_recall_for_work_and_the_radius_and_misses_read_minus_one():
    bits, k = 64, 100
    db, queries = clustered_codes(5000, bits, 2, flip=0.2), clustered_codes(100, bits, 3, flip=0.2)
    _, exact_dist = exact(db, queries, bits, k)
    recalls = []
    for probes in (1, 4, 64):
        index = build_index(db, bits, IndexConfig(kind="ivf", ivf_lists=64, ivf_probes=probes))
        recalls.append(tie_aware_recall(exact_dist, search_index(index, queries, bits, k)[1]))
    assert recalls[0] < recalls[1] < recalls[2] == 1.0, recalls
    index = build_index(db, bits, IndexConfig(kind="ivf", ivf_lists=64, ivf_probes=1))
    idx, dist = search_index(index, queries, bits, k, radius=10)
    assert ((dist == -1) == (idx == -1)).all() and (dist <= 10).all() and (idx == -1).any()


def test_tie_aware_recall_counts_any_item_as_near_as_the_kth():
    exact_dist = np.array([[0, 1, 1, 1]])
    assert tie_aware_recall(exact_dist, np.array([[0, 1, 1, 1]])) == 1.0  # other ids at distance 1: right
    assert tie_aware_recall(exact_dist, np.array([[0, 1, 2, -1]])) == 0.5


def test_a_multihash_table_wider_than_faiss_allows_is_refused_by_name():
    with pytest.raises(ValueError, match="multihash_tables=1 leaves 128 bits per table"):
        build_index(clustered_codes(100, 128, 0), 128, IndexConfig(kind="multihash", multihash_tables=1))
