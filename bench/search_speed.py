"""Exact Hamming top-k: the code store (faiss IndexBinaryFlat, use_heap=False) against faiss'
default heap path and a numpy popcount + counting-sort scan.

Measured side by side in one run; prints codes scanned per second and the ratio. Synthetic
random codes (SYNTHETIC), seeded.  Usage: python bench/search_speed.py [--size 100000]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from lifelong_hashing.codestore import CodeStore, hamming_distances, pack_codes, rank_by_distance


def best_of(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--k", type=int, default=100)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    db = pack_codes(rng.choice([-1, 1], size=(args.size, args.bits)))
    queries = pack_codes(rng.choice([-1, 1], size=(args.queries, args.bits)))
    store = CodeStore(args.bits)
    store.append(np.arange(args.size).astype(str), 0, np.ones((args.size, 1), np.uint8), ("all",),
                 {"image": db, "text": db})
    heap = faiss.IndexBinaryFlat(args.bits)
    heap.add(np.ascontiguousarray(db.view(np.uint8)[:, : args.bits // 8]))
    q8 = np.ascontiguousarray(queries.view(np.uint8)[:, : args.bits // 8])
    timings = {
        "code store (faiss, use_heap=False)": best_of(lambda: store.search(queries, "image", args.k)),
        "faiss IndexBinaryFlat, default heap": best_of(lambda: heap.search(q8, args.k)),
        "numpy popcount + counting sort": best_of(
            lambda: rank_by_distance(hamming_distances(queries, db))[:, : args.k]),
    }
    scanned = args.size * args.queries
    print(f"SYNTHETIC codes: {args.size} x {args.bits} bits, {args.queries} queries, top-{args.k}, "
          f"faiss threads {faiss.omp_get_max_threads()}")
    base = timings["code store (faiss, use_heap=False)"]
    for name, seconds in timings.items():
        print(f"{name:38s} {scanned / seconds / 1e6:8.1f} M codes/s   time ratio to code store {seconds / base:5.2f}")


if __name__ == "__main__":
    main()
