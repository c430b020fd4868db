"""Encoding an append batch in one process against shard by shard on Dask workers (the pipeline's
``pipeline.dask`` path: ``engine.on_dask``, one Dask task per shard file in and packed-code file
out), on SYNTHETIC items with Wikipedia's shapes (128-d image, 1,000-d text)
through the trained default model. Each configuration runs in a fresh process, so peak memory
is its own; all must give the same codes (checked by hash). Also measured: the cost per task of
Dask alone (a no-op task mapped 64 times on one worker). Writes
bench/results/sharded_encoding.json. (Not named distributed.py: on the import path of the
benchmarks, that name would shadow Dask's ``distributed`` package.)

    python bench/sharded_encoding.py [--sizes 100000 1000000] [--state runs/wikipedia/state]

Threads: a worker is one process running one task at a time with ``train.threads`` torch
threads (the codes depend on the thread count). Scaling is measured at 1 thread per process
(in process vs 1 vs 2 workers); in process at 2 threads is the default's reference.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402
from report import distributed_table  # noqa: E402

CONFIGS = [("in process", 0, 1), ("in process", 0, 2), ("1 worker", 1, 1), ("2 workers", 2, 1)]
SHARD_ROWS = 65_536


def synthetic_batch(n: int, categories: tuple[str, ...], seed: int = 0):
    """Wikipedia-shaped items: non-negative SIFT-like counts, sparse TF-IDF-like text, one label."""
    from lifelong_hashing.engine.batch import Batch

    rng = np.random.default_rng(seed)
    image = rng.gamma(0.5, 2.0, size=(n, 128)).astype(np.float32)
    text = (rng.random((n, 1000), dtype=np.float32) < 0.02) * rng.random((n, 1000), dtype=np.float32)
    text /= np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-6)
    labels = np.eye(len(categories), dtype=np.uint8)[rng.integers(len(categories), size=n)]
    return Batch(np.char.add("s", np.arange(n).astype(str)), image, text, labels, categories)


def state_with_threads(state_dir: Path, threads: int, out: Path) -> Path:
    """A copy of the trained state whose params say ``threads`` (workers load the state from disk)."""
    if not out.exists():
        shutil.copytree(state_dir, out)
        record = json.loads((out / "state.json").read_text())
        record["params"]["train"]["threads"] = threads
        (out / "state.json").write_text(json.dumps(record))
    return out


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: a process started by fork and
    exec, as Dask's nanny starts workers, inherits its parent's ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def digest(codes: dict) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(codes[m]).tobytes() for m in ("image", "text"))).hexdigest()


def one(size: int, workers: int, state_dir: Path, work: Path) -> dict:
    """One configuration, in this (fresh) process."""
    from lifelong_hashing.engine.state import load_method

    method = load_method(state_dir)
    batch = synthetic_batch(size, method.categories).with_categories(method.categories)
    if workers == 0:
        start = time.perf_counter()
        codes = method.database_codes(batch)
        return {"seconds": time.perf_counter() - start, "peak_mb": peak_mb(), "codes": digest(codes)}
    from lifelong_hashing.config import DaskConfig
    from lifelong_hashing.engine.on_dask import DaskCluster, DaskEncoder

    start = time.perf_counter()
    cluster = DaskCluster(DaskConfig(workers=workers))  # as the pipeline starts one
    try:
        cluster.map(int, range(workers))  # the cluster starts here
        cluster_seconds = time.perf_counter() - start
        runs = []
        for attempt in ("cold", "warm"):  # warm: the workers have imported torch and loaded the model
            encoder = DaskEncoder(cluster, work / f"encoding-{size}-{workers}-{attempt}", SHARD_ROWS)
            began = time.perf_counter()
            codes = encoder(method, batch)
            runs.append((time.perf_counter() - began, encoder.shards, digest(codes)))
        worker_peaks = sorted(cluster.client().run(peak_mb).values())
        overhead = task_overhead(cluster) if workers == 1 else None
    finally:
        cluster.close()
    (cold, shards, codes), (warm, _, warm_codes) = runs
    if warm_codes != codes:
        sys.exit("a warm run gave other codes than the cold one")
    return {"seconds": cold + cluster_seconds, "warm_seconds": warm, "cluster_start_seconds": cluster_seconds,
            "shards": shards, "peak_mb": peak_mb(), "worker_peak_mb": worker_peaks, "codes": codes,
            **({"task_overhead_ms": overhead} if overhead else {})}


def task_overhead(cluster, tasks: int = 64) -> float:
    """Milliseconds per mapped no-op task on the cluster: what each shard costs beyond its work."""
    cluster.map(int, range(4))
    start = time.perf_counter()
    cluster.map(int, range(tasks))
    return round((time.perf_counter() - start) / tasks * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--state", type=Path, default=ROOT / "runs" / "wikipedia" / "state")
    ap.add_argument("--one", type=int, nargs=3, metavar=("SIZE", "WORKERS", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        size, workers, threads = args.one
        state = state_with_threads(args.state, threads, args.work / f"state-{threads}")
        print(json.dumps(one(size, workers, state, args.work)))
        return
    if not (args.state / "state.json").exists():
        sys.exit(f"{args.state} has no trained state: run `make run` first")
    work = Path(tempfile.mkdtemp(prefix="lhash-dask-"))
    rows = []
    print(distributed_table({"rows": []}))
    try:
        for size in args.sizes:
            for name, workers, threads in CONFIGS:
                out = subprocess.run([sys.executable, __file__, "--one", str(size), str(workers), str(threads),
                                      "--state", str(args.state), "--work", str(work)],
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    sys.exit(f"{name} at {size:,} failed:\n{out.stderr[-3000:]}")
                measured = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"items": size, "config": name, "workers": workers, "threads": threads, **measured})
                print(distributed_table({"rows": rows}).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for size in args.sizes:
        same = {r["codes"] for r in rows if r["items"] == size and r["threads"] == 1}
        print(f"{size:,} items, 1 thread: identical codes in every configuration: {len(same) == 1}")
    result = {"rows": rows, "shard_rows": SHARD_ROWS, "cpu_count": os.cpu_count(),
              "identical_codes": all(len({r["codes"] for r in rows if r["items"] == s and r["threads"] == 1}) == 1
                                     for s in args.sizes)}
    print(f"written to {write_result('sharded_encoding', result)}")


if __name__ == "__main__":
    main()
