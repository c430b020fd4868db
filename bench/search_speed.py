"""Exact Hamming search, measured side by side: the code store (the compiled counting kernel,
``kernels.hamming_topk_kernel``) against faiss IndexBinaryFlat with use_heap=False and with its
default heap, numpy packed xor + bitwise_count, a float ±1 matrix-product ranking (how research
code does it), and a compiled vector-popcount scan (the ceiling: every distance computed,
nothing selected). SYNTHETIC random codes, seeded. Writes bench/results/search_speed.json.

    python bench/search_speed.py            # 10^4, 10^5, 10^6 codes; 64 and 128 bits; 1,000 queries
    python bench/search_speed.py --small    # 10^4 and 10^5 codes, 200 queries
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from report import search_row, search_table  # noqa: E402

from lifelong_hashing.engine.codestore import CodeStore, hamming_distances, pack_codes  # noqa: E402
from lifelong_hashing.engine.kernels import ctpop  # noqa: E402

FULL_RANKING_QUERIES = 20  # a full ranking of 10^6 items per query is slow for every method


@numba.njit(parallel=True, cache=True)
def popcount_scan(queries, columns):
    """Every query × item distance with the CPU's vector popcount over word-major codes, summed
    so nothing is optimized away: the ceiling of any exact scan (it selects nothing)."""
    totals = np.zeros(queries.shape[0], np.int64)
    n = columns.shape[1]
    for q in numba.prange(queries.shape[0]):
        acc = 0
        for w in range(columns.shape[0]):
            a, col = queries[q, w], columns[w]
            for j in range(n):
                acc += ctpop(a ^ col[j])
        totals[q] = acc
    return totals


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def float_topk(q_signs, db_signs, k):
    for s in range(0, len(q_signs), 100):  # blocks bound the score matrix's memory
        scores = q_signs[s: s + 100] @ db_signs.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), axis=1), 1)


def numpy_topk(queries, db, k):
    for s in range(0, len(queries), 100):
        dist = hamming_distances(queries[s: s + 100], db)
        part = np.argpartition(dist, k, axis=1)[:, :k]
        np.take_along_axis(part, np.argsort(np.take_along_axis(dist, part, 1), axis=1, kind="stable"), 1)


def measure(n: int, bits: int, n_queries: int, k: int, rng) -> tuple[dict, dict, bool]:
    """Seconds per method for top-k and for a full ranking, on one database, and whether the
    code store's top-k equals faiss' (indices and distances)."""
    db_signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=(n, bits))
    q_signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=(n_queries, bits))
    db, queries = pack_codes(db_signs), pack_codes(q_signs)
    store = CodeStore(bits)
    store.append(np.arange(n).astype(str), 0, np.ones((n, 1), np.uint8), ("all",), {"image": db, "text": db})
    store.search(queries[:2], "image", k)  # builds the index once, as serving does
    heap, no_heap = faiss.IndexBinaryFlat(bits), faiss.IndexBinaryFlat(bits)
    no_heap.use_heap = False
    for index in (heap, no_heap):
        index.add(np.ascontiguousarray(db.view(np.uint8)[:, : bits // 8]))
    q8 = np.ascontiguousarray(queries.view(np.uint8)[:, : bits // 8])
    columns = np.ascontiguousarray(db.T)
    popcount_scan(queries[:2], columns[:, :10].copy())  # compile
    top = {
        "code store": timed(lambda: store.search(queries, "image", k)),
        "faiss no heap": timed(lambda: no_heap.search(q8, k)),
        "faiss heap": timed(lambda: heap.search(q8, k)),
        "numpy": timed(lambda: numpy_topk(queries, db, k)),
        "float": timed(lambda: float_topk(q_signs, db_signs, k)),
        "ceiling": timed(lambda: popcount_scan(queries, columns)),
    }
    ours, theirs = store.search(queries, "image", k), no_heap.search(q8, k)
    identical = bool(np.array_equal(ours[0], theirs[1]) and np.array_equal(ours[1], theirs[0]))
    fq = queries[:FULL_RANKING_QUERIES]
    full = {
        "code store": timed(lambda: store.rank(fq, "image")),
        "numpy": timed(lambda: np.argsort(hamming_distances(fq, db), axis=1)),
        "float": timed(lambda: np.argsort(-(q_signs[:FULL_RANKING_QUERIES] @ db_signs.T), axis=1)),
    }
    return top, full, identical


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--k", type=int, default=100)
    args = ap.parse_args()
    sizes, n_queries = ([10_000, 100_000], 200) if args.small else ([10_000, 100_000, 1_000_000], 1000)
    rng = np.random.default_rng(0)
    rows = []
    print(f"SYNTHETIC random codes; {n_queries} queries, top-{args.k}; full ranking with {FULL_RANKING_QUERIES} "
          f"queries; faiss threads {faiss.omp_get_max_threads()}, numba threads {numba.get_num_threads()}")
    print("\nMillions of codes scanned per second (higher is better); in brackets, the code store's time / the other's")
    print("\n" + search_table([]))
    for bits in (64, 128):
        for n in sizes:
            top, full, identical = measure(n, bits, n_queries, args.k, rng)
            for task, timing, count in (("top-100", top, n_queries), ("full ranking", full, FULL_RANKING_QUERIES)):
                rate = {m: n * count / s / 1e6 for m, s in timing.items()}
                rows.append({"codes": n, "bits": bits, "task": task, "queries": count,
                             "million_codes_per_s": {m: round(r, 1) for m, r in rate.items()},
                             **({"identical_to_faiss": identical} if task == "top-100" else {})})
                print(search_row(rows[-1]), flush=True)
    print(f"\nwritten to {write_result('search_speed' + ('_small' if args.small else ''), {'rows': rows})}")


if __name__ == "__main__":
    main()
