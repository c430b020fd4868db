"""Evaluation speed: the project's mAP@all (counting by distance in a compiled loop) against the
plain per-query argsort loop of research code, on the same codes, side by side. 2,000 queries ×
18,000 database items, 24 labels, 64 bits (MIRFlickr-25K's shape), SYNTHETIC random codes and
labels. Tie rule for both: database position. Writes bench/results/eval_speed.json.

    python bench/eval_speed.py [--small]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from report import eval_table  # noqa: E402

from lifelong_hashing.engine.codestore import pack_codes  # noqa: E402
from lifelong_hashing.engine.metrics import map_per_query_reference, mean_average_precision  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="500 queries × 5,000 items")
    args = ap.parse_args()
    n_query, n_db = (500, 5000) if args.small else (2000, 18000)
    rng = np.random.default_rng(0)
    q, db = pack_codes(rng.normal(size=(n_query, 64))), pack_codes(rng.normal(size=(n_db, 64)))
    lq = (rng.random((n_query, 24)) < 0.12).astype(np.uint8)
    ldb = (rng.random((n_db, 24)) < 0.12).astype(np.uint8)
    mean_average_precision(q[:2], db[:10], lq[:2], ldb[:10])  # compiled-code warm-up
    start = time.perf_counter()
    fast = mean_average_precision(q, db, lq, ldb)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = map_per_query_reference(q, db, lq, ldb)
    ref_s = time.perf_counter() - start
    identical = abs(fast - reference) < 1e-12
    print(f"SYNTHETIC: {n_query} queries × {n_db} items, 24 labels, 64 bits; ties by database position")
    result = {"queries": n_query, "database": n_db, "reference_seconds": round(ref_s, 3),
              "project_seconds": round(fast_s, 4), "speedup": round(ref_s / fast_s, 1), "identical": identical,
              "map": fast}
    print(eval_table(result))
    path = write_result("eval_speed" + ("_small" if args.small else ""), result)
    print(f"written to {path}")
    if not identical:
        sys.exit("results differ")


if __name__ == "__main__":
    main()
