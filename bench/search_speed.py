"""Exact Hamming search, measured side by side: the code store (the compiled counting kernel,
``kernels.hamming_topk_kernel``) against faiss IndexBinaryFlat with use_heap=False and with its
default heap, numpy packed xor + bitwise_count, a float ±1 matrix-product ranking (how research
code does it), and a compiled vector-popcount scan (the ceiling: every distance computed,
nothing selected, at the kernel's own blocking). SYNTHETIC random codes, seeded. Writes
bench/results/search_speed.json.

    python bench/search_speed.py            # 10^4, 10^5, 10^6 codes; 64 and 128 bits; 1,000 queries
    python bench/search_speed.py --small    # 10^4 and 10^5 codes, 200 queries
    python bench/search_speed.py --ceiling  # only the ceiling section: 10^6 and 10^7 codes, k 10 and 100
    python bench/search_speed.py --indexes  # only the index section: 10^7 codes, 64 bits

The ceiling section puts the kernel beside the popcount-only scan at the sizes a large catalogue
has: batches of 1,000 queries (throughput, both on all threads) and single queries (latency, both
on the calling thread, as the service's small batches run), with faiss without a heap as the
reference and its results compared.

The index section measures the approximate indexes of ``serving.index`` (inference/indexes.py)
against exact search at 10^7 64-bit codes: build seconds, queries/s for a batch of 1,000, the
latency of one query alone, and tie-aware recall@100 against exact. Random codes would make every
index look useless (all distances near 32), so these are SYNTHETIC CLUSTERED codes like a hashing
model's: each item one of 24 class codes with 12 % of its bits flipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, timed, write_result  # noqa: E402
from report import ceiling_row, ceiling_table, index_row, index_table, search_row, search_table  # noqa: E402

from lifelong_hashing.config import IndexConfig  # noqa: E402
from lifelong_hashing.engine.codestore import CodeStore, faiss_bytes, hamming_distances, pack_codes  # noqa: E402
from lifelong_hashing.engine.kernels import CHUNK, QUERY_BLOCK, ctpop, hamming_topk_kernel  # noqa: E402
from lifelong_hashing.inference.indexes import build_index, search_index, tie_aware_recall  # noqa: E402

FULL_RANKING_QUERIES = 20  # a full ranking of 10^6 items per query is slow for every method
FAST_REPEATS = 3  # runs of each fast method; the fastest counts


def _popcount_scan(queries, columns, block, chunk):
    """Every query × item distance with the CPU's vector popcount over word-major codes, summed
    so nothing is optimized away: the ceiling of any exact scan (it selects nothing). Blocked as
    the kernel is (a block of queries per cache-sized chunk of codes), or the ceiling would be
    slowed by memory where the kernel is not."""
    n_query, n = queries.shape[0], columns.shape[1]
    totals = np.zeros(n_query, np.uint64)
    for b in numba.prange((n_query + block - 1) // block):
        q0 = b * block
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            for q in range(q0, min(n_query, q0 + block)):
                acc = np.uint64(0)
                for w in range(columns.shape[0]):
                    a, col = queries[q, w], columns[w, c0:c1]
                    for j in range(c1 - c0):
                        acc += ctpop(a ^ col[j])
                totals[q] += acc
    return totals


# not cached on disk: numba keys its cache by function name, so two builds of one would collide
_popcount_parallel = numba.njit(parallel=True)(_popcount_scan)
_popcount_serial = numba.njit(_popcount_scan)


def popcount_scan(queries, columns):
    """The ceiling on the same threads as the kernel: all of them for more than one block."""
    scan = _popcount_parallel if len(queries) > QUERY_BLOCK else _popcount_serial
    return scan(queries, columns, QUERY_BLOCK, CHUNK)


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
    store.search(queries, "image", k)  # builds the index and starts the kernel's threads once, as serving does
    heap, no_heap = faiss.IndexBinaryFlat(bits), faiss.IndexBinaryFlat(bits)
    no_heap.use_heap = False
    for index in (heap, no_heap):
        index.add(np.ascontiguousarray(db.view(np.uint8)[:, : bits // 8]))
    q8 = np.ascontiguousarray(queries.view(np.uint8)[:, : bits // 8])
    columns = np.ascontiguousarray(db.T)
    popcount_scan(queries[:2], columns[:, :10].copy())  # compile
    no_heap.search(q8[:2], k)  # faiss' threads started too
    top = {  # the fast ones best of 3; numpy and float take seconds to minutes, once
        "code store": timed(lambda: store.search(queries, "image", k), FAST_REPEATS),
        "faiss no heap": timed(lambda: no_heap.search(q8, k), FAST_REPEATS),
        "faiss heap": timed(lambda: heap.search(q8, k), FAST_REPEATS),
        "numpy": timed(lambda: numpy_topk(queries, db, k)),
        "float": timed(lambda: float_topk(q_signs, db_signs, k)),
        "ceiling": timed(lambda: popcount_scan(queries, columns), FAST_REPEATS),
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


CEILING_SIZES, CEILING_BITS, CEILING_KS = (1_000_000, 10_000_000), (64, 128), (10, 100)
SINGLE_QUERIES = 20  # the latency rows: this many single queries, one after another


def random_codes(n: int, bits: int, rng) -> np.ndarray:
    return np.frombuffer(rng.bytes(n * (bits // 64) * 8), np.uint64).reshape(n, bits // 64)


@numba.njit(cache=True)
def candidates_per_query(distances: np.ndarray, k: int) -> float:
    """How many items an online top-k admits on average: those below the running bound when they
    come (the k-th distance so far, ties to the earlier item), as the kernel's pass does. About
    k (1 + ln(n / k)) for random codes; each costs the kernel a look at its span."""
    total = 0
    for q in range(distances.shape[0]):
        hist = np.zeros(distances.max() + 2, np.int64)
        bound, below = distances.max() + 1, 0
        for d in distances[q]:
            if d < bound:
                total += 1
                hist[d] += 1
                below += 1
                while below >= k:
                    bound -= 1
                    below -= hist[bound]
    return total / distances.shape[0]


def paired(first, second, repeats: int = 5) -> tuple[float, float, float]:
    """Both functions' fastest times, and the median of first ÷ second over runs taken in turn,
    so a slow spell of the machine touches both sides of each ratio."""
    times = [(timed(first), timed(second)) for _ in range(repeats)]
    return min(a for a, _ in times), min(b for _, b in times), float(np.median([a / b for a, b in times]))


def measure_ceiling(n: int, bits: int, rng) -> list[dict]:
    """The kernel against the popcount-only ceiling and faiss (no heap) at each k, on one database."""
    db, queries = random_codes(n, bits, rng), random_codes(1000, bits, rng)
    columns = np.ascontiguousarray(db.T)
    index = faiss.IndexBinaryFlat(bits)
    index.use_heap = False
    index.add(faiss_bytes(db, bits))
    popcount_scan(queries[:2], columns), popcount_scan(queries, columns[:, :CHUNK].copy())  # compiled, threads up
    sample = hamming_distances(queries[:20], db).astype(np.int64)
    return [row for k in CEILING_KS for row in ceiling_rows(k, queries, columns, index, sample)]


def ceiling_rows(k: int, queries: np.ndarray, columns: np.ndarray, index, sample: np.ndarray) -> list[dict]:
    """A batch of 1,000 queries and single queries (each measured in turn with the ceiling);
    whether the top k equals faiss'; the candidates the kernel admits per query."""
    n, bits = columns.shape[1], 64 * columns.shape[0]
    q8 = faiss_bytes(queries, bits)

    def singles(search):
        return lambda: [search(queries[i:i + 1]) for i in range(SINGLE_QUERIES)]

    def kernel(q):
        return hamming_topk_kernel(q, columns, k, bits)

    kernel(queries[:2]), hamming_topk_kernel(queries, columns[:, :CHUNK].copy(), k, bits)
    index.search(q8[:2], k)
    ours, theirs = kernel(queries), index.search(q8, k)
    identical = bool(np.array_equal(ours[0], theirs[1]) and np.array_equal(ours[1], theirs[0]))
    measured = {"batch": paired(lambda: popcount_scan(queries, columns), lambda: kernel(queries)),
                "single": paired(singles(lambda q: popcount_scan(q, columns)), singles(kernel))}
    flat = {"batch": timed(lambda: index.search(q8, k), FAST_REPEATS),
            "single": timed(lambda: [index.search(q8[i:i + 1], k) for i in range(SINGLE_QUERIES)], FAST_REPEATS)}
    candidates = round(candidates_per_query(sample, k), 1)
    rows = []
    for batch, count, per in (("batch", 1000, 1), ("single", 1, SINGLE_QUERIES)):
        ceiling, ours_s, share = measured[batch]
        rows.append({"codes": n, "bits": bits, "k": k, "queries": count,
                     "seconds": {"code store": round(ours_s / per, 6), "ceiling": round(ceiling / per, 6),
                                 "faiss no heap": round(flat[batch] / per, 6)},
                     "of_ceiling": round(share, 3), "vs_faiss": round(flat[batch] / ours_s, 2),
                     "identical_to_faiss": identical, "candidates_per_query": candidates})
        print(ceiling_row(rows[-1]), flush=True)
    return rows


INDEX_SETTINGS = [IndexConfig(kind="ivf", ivf_lists=lists, ivf_probes=probes)
                  for lists in (1024, 4096) for probes in (4, 16, 64)]
INDEX_SETTINGS += [IndexConfig(kind="multihash", multihash_tables=tables, multihash_flips=flips)
                   for tables, flips in ((3, 1), (3, 2), (4, 1))]


def clustered_codes(n: int, bits: int, rng, classes: int = 24, flip: float = 0.12) -> np.ndarray:
    centres = np.random.default_rng(12345).integers(0, 2, size=(classes, bits), dtype=np.uint8)
    out = np.empty((n, bits // 64), np.uint64)
    for s in range(0, n, 1_000_000):  # bounded memory: 10^7 × 64 bytes of bits at once is 640 MB
        m = min(n, s + 1_000_000) - s
        bits_ = centres[rng.integers(classes, size=m)] ^ (rng.random((m, bits)) < flip)
        out[s:s + m] = np.packbits(bits_, axis=1, bitorder="little").view("<u8")
    return out


def measure_indexes(n: int, bits: int, n_queries: int, k: int, rng) -> list[dict]:
    db, queries = clustered_codes(n, bits, rng), clustered_codes(n_queries, bits, rng)
    store = CodeStore(bits)
    store.append(np.arange(n).astype(str), 0, np.ones((n, 1), np.uint8), ("all",), {"image": db, "text": db})
    store.search(queries[:2], "image", k)
    exact = store.search(queries, "image", k)[1]
    flat = faiss.IndexBinaryFlat(bits)
    flat.use_heap = False
    flat.add(faiss_bytes(db, bits))
    searches = {"exact: code store": (0.0, lambda q: store.search(q, "image", k)),
                "exact: faiss flat, no heap": (0.0, lambda q: search_index(flat, q, bits, k))}
    for cfg in INDEX_SETTINGS:
        start = time.perf_counter()
        index = build_index(db, bits, cfg)
        build = time.perf_counter() - start
        name = (f"ivf lists={cfg.ivf_lists} probes={cfg.ivf_probes}" if cfg.kind == "ivf" else
                f"multihash tables={cfg.multihash_tables} flips={cfg.multihash_flips}")
        searches[name] = (build, lambda q, index=index: search_index(index, q, bits, k))
    rows = []
    for name, (build, search) in searches.items():
        seconds = timed(lambda search=search: search(queries))
        single = min(timed(lambda search=search, i=i: search(queries[i:i + 1])) for i in range(20))
        rows.append({"codes": n, "bits": bits, "index": name, "build_seconds": round(build, 2),
                     "queries_per_s": round(n_queries / seconds, 1), "single_query_ms": round(single * 1000, 2),
                     "recall_at_100": round(tie_aware_recall(exact, search(queries)[1]), 4)})
        print(index_row(rows[-1]), flush=True)
    return rows


def update_result(section: dict, name: str = "search_speed") -> None:
    """Replace one section of the result file, keeping the others."""
    path = RESULTS / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    print(f"\nwritten to {write_result(name, {**result, **section})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--indexes", action="store_true", help="only the index section (10^7 codes)")
    ap.add_argument("--ceiling", action="store_true", help="only the ceiling section (10^6 and 10^7 codes)")
    ap.add_argument("--index-codes", type=int, default=10_000_000)
    ap.add_argument("--k", type=int, default=100)
    args = ap.parse_args()
    if args.indexes:
        print(f"SYNTHETIC CLUSTERED codes, {args.index_codes:,} × 64 bits; 1,000 queries, top-{args.k}; "
              f"faiss threads {faiss.omp_get_max_threads()}\n\n" + index_table([]))
        rows = measure_indexes(args.index_codes, 64, 1000, args.k, np.random.default_rng(0))
        update_result({"indexes": rows})
        return
    if args.ceiling:
        print(f"SYNTHETIC random codes; threads: numba {numba.get_num_threads()}, faiss {faiss.omp_get_max_threads()}"
              f" (single queries: one thread each)\n\n" + ceiling_table([]))
        rng = np.random.default_rng(1)
        rows = [row for n in CEILING_SIZES for bits in CEILING_BITS for row in measure_ceiling(n, bits, rng)]
        update_result({"ceiling": rows})
        return
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
    update_result({"rows": rows}, "search_speed" + ("_small" if args.small else ""))


if __name__ == "__main__":
    main()
