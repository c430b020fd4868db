import os

import numpy as np
import pytest

from lifelong_hashing.engine.codestore import (
    CodeStore,
    CodeStoreError,
    ItemFilter,
    hamming_distances,
    pack_codes,
    unpack_codes,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bits", [16, 32, 64, 128])
def test_pack_unpack_round_trip_and_hamming_matches_plain_count(bits):
    rng = np.random.default_rng(bits)
    signs = rng.choice([-1, 1], size=(50, bits)).astype(np.int8)
    words = pack_codes(signs)
    assert words.dtype == np.uint64 and words.shape == (50, -(-bits // 64))
    np.testing.assert_array_equal(unpack_codes(words, bits), signs)
    plain = (signs[:7, None, :] != signs[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming_distances(words[:7], words), plain)


def _store(bits=16, n=300, seed=0):
    rng = np.random.default_rng(seed)
    store = CodeStore(bits)
    signs = {m: rng.choice([-1, 1], size=(n, bits)) for m in ("image", "text")}
    store.append([f"i{k}" for k in range(n)], 0, np.eye(3, dtype=np.uint8)[rng.integers(3, size=n)],
                 ("a", "b", "c"), {m: pack_codes(s) for m, s in signs.items()})
    return store, signs


def test_search_is_exact_with_ties_broken_by_position():
    store, signs = _store(bits=16)  # 16 bits, 300 items: many ties
    rng = np.random.default_rng(1)
    q = rng.choice([-1, 1], size=(20, 16))
    idx, dist = store.search(pack_codes(q), "text", k=25)
    plain = (q[:, None, :] != signs["text"][None, :, :]).sum(-1)
    order, ranked = store.rank(pack_codes(q), "text")
    for row in range(20):
        full = sorted(range(300), key=lambda j: (plain[row, j], j))
        assert idx[row].tolist() == full[:25] and order[row].tolist() == full
        assert dist[row].tolist() == plain[row, full[:25]].tolist()
        assert ranked[row].tolist() == plain[row, full].tolist()


@pytest.mark.parametrize("bits", [8, 64, 96, 128])
@pytest.mark.parametrize(("k", "block", "chunk"), [(1, 3, 7), (25, 3, 64), (200, 16, 2048), (301, 1, 50), (7, 64, 100)])
def test_counting_kernel_equals_a_stable_sort_and_faiss(bits, k, block, chunk):
    """Blocks and chunks that do not divide the queries and items, many ties (8 bits), k up to N;
    one block of queries (block 64) runs the serial variant. Chunks of 64 and 100 are split into
    4 whole spans (the vector check), 7 and 50 are not (every span looked at)."""
    import faiss

    from lifelong_hashing.engine.kernels import hamming_topk_kernel

    rng = np.random.default_rng(bits + k)
    db = pack_codes(rng.choice([-1, 1], size=(301, bits)))
    q = pack_codes(rng.choice([-1, 1], size=(20, bits)))
    idx, dist = hamming_topk_kernel(q, np.ascontiguousarray(db.T), k, bits, block, chunk)
    plain = hamming_distances(q, db).astype(np.int64)
    order = np.argsort(plain, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(dist, np.take_along_axis(plain, order, 1))
    index = faiss.IndexBinaryFlat(bits)
    index.use_heap = False
    index.add(np.ascontiguousarray(db.view(np.uint8)[:, : bits // 8]))
    f_dist, f_idx = index.search(np.ascontiguousarray(q.view(np.uint8)[:, : bits // 8]), k)
    np.testing.assert_array_equal(idx, f_idx)
    np.testing.assert_array_equal(dist, f_dist)



@pytest.mark.parametrize("k", [3, 100, 300])
def test_the_kernel_stays_exact_when_every_item_beats_the_last(k):
    """A database in falling distance from each query admits nearly every item as a candidate
    (the online worst case), so the candidate buffer fills and is compacted many times."""
    from lifelong_hashing.engine.kernels import hamming_topk_kernel

    rng = np.random.default_rng(k)
    q = pack_codes(rng.choice([-1, 1], size=(3, 128)))
    db = pack_codes(rng.choice([-1, 1], size=(2000, 128)))
    db = db[np.argsort(-hamming_distances(q[:1], db)[0], kind="stable")]  # far to near for query 0
    idx, dist = hamming_topk_kernel(q, np.ascontiguousarray(db.T), k, 128, block=2, chunk=100)
    plain = hamming_distances(q, db).astype(np.int64)
    order = np.argsort(plain, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(dist, np.take_along_axis(plain, order, 1))

VARIANT_RUN = """
import sys
import numba.np.ufunc.parallel as threading_layer
import numpy as np
from lifelong_hashing.engine.kernels import hamming_topk_kernel
codes = np.arange(1, 301, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
hamming_topk_kernel(np.ascontiguousarray(codes[:, : int(sys.argv[1])].T), codes, 5, 64, 16, 64)
print(threading_layer._is_initialized)
"""


def test_the_serial_and_parallel_kernels_each_run_their_own_build_from_the_on_disk_cache(tmp_path):
    """Fresh processes sharing one numba cache: a single block of queries never starts the thread
    pool, and many blocks do, whichever variant was cached first (a shared cache entry made one
    run the other's code)."""
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def starts_threads(queries: int) -> bool:
        out = subprocess.run([sys.executable, "-c", VARIANT_RUN, str(queries)], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[-1] == "True"

    assert [starts_threads(q) for q in (1, 64, 1, 64)] == [False, True, False, True]


def test_the_kernel_refuses_codes_longer_than_two_words():
    from lifelong_hashing.engine.kernels import hamming_topk_kernel

    with pytest.raises(ValueError, match="up to 128 bits"):
        hamming_topk_kernel(np.zeros((2, 3), np.uint64), np.zeros((3, 10), np.uint64), 2, 192)


@pytest.mark.parametrize("bits", [192, 256])
def test_codes_longer_than_128_bits_search_through_faiss_with_the_same_rule(bits):
    store, signs = _store(bits=bits, n=120)
    q = np.random.default_rng(2).choice([-1, 1], size=(5, bits))
    idx, dist = store.search(pack_codes(q), "text", k=30)
    plain = (q[:, None, :] != signs["text"][None, :, :]).sum(-1)
    order = np.argsort(plain, axis=1, kind="stable")[:, :30]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(dist, np.take_along_axis(plain, order, 1))


def test_search_radius_and_k_beyond_database():
    store, signs = _store(bits=16, n=10)
    q = pack_codes(signs["image"][:1])
    idx, dist = store.search(q, "image", k=15, radius=0)
    assert idx[0, 0] == 0 and dist[0, 0] == 0
    assert (idx[0, 1:] == -1).all() and (dist[0, 1:] == -1).all()
    with pytest.raises(CodeStoreError, match="k must be positive"):
        store.search(q, "image", k=0)
    with pytest.raises(CodeStoreError, match="unknown modality 'audio'"):
        store.search(q, "audio", k=1)


def test_append_never_touches_old_rows_and_rejects_bad_input():
    store, _ = _store(bits=64, n=5)
    before = {m: c.copy() for m, c in store.codes.items()}
    codes = {m: pack_codes(np.ones((2, 64))) for m in ("image", "text")}
    store.append(["n1", "n2"], 1, np.array([[0, 0, 0, 1], [1, 0, 0, 1]]), ("a", "b", "c", "d"), codes)
    for m in before:
        np.testing.assert_array_equal(store.codes[m][:5], before[m])
    assert store.labels.shape == (7, 4) and store.stage.tolist() == [0] * 5 + [1, 1]
    with pytest.raises(CodeStoreError, match="already in the store"):
        store.append(["n1"], 2, np.ones((1, 4)), ("a", "b", "c", "d"), {m: c[:1] for m, c in codes.items()})
    with pytest.raises(CodeStoreError, match="must extend"):
        store.append(["z"], 2, np.ones((1, 2)), ("x", "y"), {m: c[:1] for m, c in codes.items()})
    with pytest.raises(CodeStoreError, match=r"image codes must be \(1, 1\) uint64"):
        store.append(["z"], 2, np.ones((1, 4)), ("a", "b", "c", "d"), {"image": np.zeros((1, 2), np.uint64),
                                                                       "text": codes["text"][:1]})


def test_save_load_round_trip_and_corrupt_file(tmp_path):
    store, _ = _store(bits=32)
    path = store.save(tmp_path / "codes.npz")
    back = CodeStore.load(path)
    assert back.bits == 32 and back.categories == store.categories
    np.testing.assert_array_equal(back.ids, store.ids)
    for m in ("image", "text"):
        np.testing.assert_array_equal(back.codes[m], store.codes[m])
    (tmp_path / "bad.npz").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CodeStoreError, match="unreadable code store"):
        CodeStore.load(tmp_path / "bad.npz")


def test_the_store_keeps_which_items_came_labelled(tmp_path):
    store = CodeStore(64, ("a",))
    codes = {m: np.arange(6, dtype=np.uint64).reshape(3, 2)[:, :1] for m in ("image", "text")}
    store.append(["x", "y", "z"], 0, np.array([[1], [0], [1]], np.uint8), ("a",), codes,
                 labelled=np.array([True, False, True]))
    back = CodeStore.load(store.save(tmp_path / "codes.npz"))
    np.testing.assert_array_equal(back.labelled, [True, False, True])
    plain = CodeStore(64, ("a",))
    plain.append(["x"], 0, np.array([[1]], np.uint8), ("a",), {m: c[:1] for m, c in codes.items()})
    assert "labelled" not in np.load(plain.save(tmp_path / "plain.npz")).files  # byte-stable for labelled stores
    assert CodeStore.load(tmp_path / "plain.npz").labelled.tolist() == [True]


def _filtered_store(bits: int, n: int = 3000, seed: int = 0) -> CodeStore:
    """Many ties (few bits set differently), labels and stages spread over the items."""
    rng = np.random.default_rng(seed)
    store = CodeStore(bits, ("a", "b", "c"))
    codes = {m: pack_codes(rng.standard_normal((n, bits))) for m in ("image", "text")}
    store.append([f"shop{i % 5}/{i:05d}" for i in range(n)], 0, (rng.random((n, 3)) < 0.4).astype(np.uint8),
                 ("a", "b", "c"), codes)
    store.stage[:] = rng.integers(0, 4, n)
    return store


FILTERS = [ItemFilter(any_of=("a",)), ItemFilter(all_of=("a", "b"), stages=(1, 2)),
           ItemFilter(any_of=("b", "c"), all_of=("a",), id_prefix="shop3/"), ItemFilter(id_prefix="shop1/000"),
           ItemFilter(stages=(3, 3), id_prefix="shop2/0")]


@pytest.mark.parametrize("bits", [32, 64, 128, 256])
@pytest.mark.parametrize("where", FILTERS, ids=str)
def test_filtered_top_k_is_the_exact_top_k_of_the_items_the_filter_lets_through(bits, where):
    store = _filtered_store(bits)
    queries = pack_codes(np.random.default_rng(1).standard_normal((40, bits)))
    allowed = where.allowed(store)
    expected_allowed = np.array([(not where.any_of or any(store.labels[i, store.categories.index(c)]
                                                         for c in where.any_of))
                                 and all(store.labels[i, store.categories.index(c)] for c in where.all_of)
                                 and (where.stages is None or where.stages[0] <= store.stage[i] <= where.stages[1])
                                 and str(store.ids[i]).startswith(where.id_prefix) for i in range(len(store))])
    assert np.array_equal(allowed, expected_allowed) and 0 < allowed.sum() < len(store)
    k = 60
    idx, dist = store.search(queries, "image", k, where=where)
    full = hamming_distances(queries, store.codes["image"]).astype(np.int64)
    full[:, ~allowed] = 1 << 20
    order = np.argsort(full, axis=1, kind="stable")[:, :k]
    reach = min(k, int(allowed.sum()))
    assert np.array_equal(idx[:, :reach], order[:, :reach])  # k hits whenever k items pass: no post-filtering
    assert np.array_equal(dist[:, :reach], np.take_along_axis(full, order, 1)[:, :reach])
    assert (idx[:, reach:] == -1).all() and (dist[:, reach:] == -1).all()
    assert allowed[idx[idx >= 0]].all()


def test_a_filter_that_matches_nothing_or_names_an_unknown_category():
    store = _filtered_store(64, n=500)
    queries = pack_codes(np.random.default_rng(2).standard_normal((3, 64)))
    idx, dist = store.search(queries, "text", 5, where=ItemFilter(id_prefix="nobody"))
    assert (idx == -1).all() and (dist == -1).all()
    with pytest.raises(CodeStoreError, match=r"unknown categories \['zebra'\]"):
        store.search(queries, "text", 5, where=ItemFilter(any_of=("a", "zebra")))
    unfiltered = store.search(queries, "text", 5)
    assert all(np.array_equal(a, b) for a, b in zip(unfiltered, store.search(queries, "text", 5, where=ItemFilter()),
                                                    strict=True))
