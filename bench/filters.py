"""Filtered exact search against unfiltered search, side by side at 10^6 codes (issue 22).

A filter (``codestore.ItemFilter``) is applied inside the search kernel: excluded items are pushed
past every distance, so the top k is exact within the filter. Measured here against the same
unfiltered search (the reference), and against the two ways a filter is usually bolted on:
gathering the allowed codes into a new array and searching that (exact, the results must be
identical), and post-filtering an unfiltered top-k (fast, but it returns fewer than k hits when
the filter is selective: the share of queries short of k is reported). SYNTHETIC random 64-bit
codes, seeded; each filter lets a known share of the items through. Writes
bench/results/filters.json.

    python bench/filters.py            # 10^6 codes
    python bench/filters.py --small    # 10^5 codes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed, write_result  # noqa: E402

from lifelong_hashing.engine.codestore import CodeStore, ItemFilter, pack_codes  # noqa: E402
from lifelong_hashing.engine.kernels import hamming_topk_kernel  # noqa: E402

SHARES = {"half": 0.5, "tenth": 0.1, "hundredth": 0.01, "thousandth": 0.001}  # category → items carrying it
STAGES = 5
K, BATCH, SINGLE_REPEATS, BATCH_REPEATS = 100, 1000, 20, 3
POST_FILTER_FACTOR = 10  # a post-filter fetches 10 k before filtering


def catalogue(n: int, bits: int, seed: int = 0) -> CodeStore:
    """n items: random codes, one category per share in SHARES drawn independently, a stage
    each (0..STAGES-1) and ids "shop<i mod 10>/<i>"."""
    rng = np.random.default_rng(seed)
    store = CodeStore(bits, tuple(SHARES))
    labels = np.stack([rng.random(n) < share for share in SHARES.values()], axis=1).astype(np.uint8)
    codes = pack_codes(rng.standard_normal((n, bits)))
    store.append(np.char.add(np.char.add("shop", (np.arange(n) % 10).astype(str)), np.char.add("/", np.arange(n)
                                                                                                .astype(str))),
                 0, labels, tuple(SHARES), {"image": codes, "text": codes})
    store.stage[:] = rng.integers(0, STAGES, n)
    return store


FILTERS = {
    "category 50 %": ItemFilter(any_of=("half",)),
    "category 10 %": ItemFilter(any_of=("tenth",)),
    "category 1 %": ItemFilter(any_of=("hundredth",)),
    "category 0.1 %": ItemFilter(any_of=("thousandth",)),
    "last stage (20 %)": ItemFilter(stages=(STAGES - 1, STAGES - 1)),
    "id prefix (10 %)": ItemFilter(id_prefix="shop3/"),
    "category 10 % and stage 3-4": ItemFilter(any_of=("tenth",), stages=(3, 4)),
}


def gathered(store: CodeStore, queries: np.ndarray, where: ItemFilter) -> tuple[np.ndarray, np.ndarray]:
    """The exact alternative: copy the allowed codes (word-major, as the kernel reads them) into
    an array of their own and search that with the same kernel."""
    rows = np.flatnonzero(where.allowed(store))
    reach = min(K, len(rows))
    idx, dist = hamming_topk_kernel(queries, np.ascontiguousarray(store.codes["image"][rows].T), reach, store.bits)
    pad = ((0, 0), (0, K - reach))
    return np.pad(rows[idx], pad, constant_values=-1), np.pad(dist, pad, constant_values=-1)


def post_filtered(store: CodeStore, queries: np.ndarray, where: ItemFilter) -> np.ndarray:
    """The fast, inexact alternative: an unfiltered top 10 k, then the filter. Hits per query."""
    idx, _ = store.search(queries, "image", POST_FILTER_FACTOR * K)
    return where.allowed(store)[idx].sum(axis=1)


def measure(store: CodeStore, name: str, where: ItemFilter, queries: np.ndarray, plain: dict) -> dict:
    allowed = where.allowed(store)
    ours = store.search(queries, "image", K, where=where)
    theirs = gathered(store, queries, where)
    single = queries[:1]

    def first_time():  # a filter not searched lately: its mask is built for the search
        store._derived.pop(("filter", where), None)
        store.search(single, "image", K, where=where)

    row = {"filter": name, "share": round(float(allowed.mean()), 5),
           "mask_ms": round(1e3 * timed(lambda: where.allowed(store), SINGLE_REPEATS), 3),
           "single_first_ms": round(1e3 * timed(first_time, SINGLE_REPEATS), 3),
           "single_ms": round(1e3 * timed(lambda: store.search(single, "image", K, where=where), SINGLE_REPEATS), 3),
           "batch_s": round(timed(lambda: store.search(queries, "image", K, where=where), BATCH_REPEATS), 4),
           "gather_single_ms": round(1e3 * timed(lambda: gathered(store, single, where), SINGLE_REPEATS), 3),
           "gather_batch_s": round(timed(lambda: gathered(store, queries, where), BATCH_REPEATS), 4),
           "same_as_gather": bool(all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))),
           "k_hits_share": float((ours[0] >= 0).all(axis=1).mean()),
           "post_filter_short_share": float((post_filtered(store, queries, where) < K).mean())}
    row["single_vs_unfiltered"] = round(row["single_ms"] / plain["single_ms"], 2)
    row["single_first_vs_unfiltered"] = round(row["single_first_ms"] / plain["single_ms"], 2)
    row["batch_vs_unfiltered"] = round(row["batch_s"] / plain["batch_s"], 2)
    print(row, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    n, bits = (100_000 if args.small else 1_000_000), 64
    store = catalogue(n, bits)
    queries = pack_codes(np.random.default_rng(1).standard_normal((BATCH, bits)))
    store.search(queries, "image", K)  # warm-up: compiles, starts the kernel's threads, builds the columns
    store.search(queries[:1], "image", K, where=FILTERS["category 10 %"])
    plain = {"single_ms": round(1e3 * timed(lambda: store.search(queries[:1], "image", K), SINGLE_REPEATS), 3),
             "batch_s": round(timed(lambda: store.search(queries, "image", K), BATCH_REPEATS), 4)}
    rows = [measure(store, name, where, queries, plain) for name, where in FILTERS.items()]
    write_result("filters_small" if args.small else "filters",
                 {"codes": n, "bits": bits, "k": K, "batch": BATCH, "unfiltered": plain, "rows": rows,
                  "data": "SYNTHETIC random codes"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
