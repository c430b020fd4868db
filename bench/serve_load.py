"""Bounded load test of the real retrieval service on loopback: /search with one Wikipedia text
query per request, several concurrent clients, for a fixed time. Reports requests/s, p50/p99
latency and errors, and writes bench/results/serve_load.json.

    python bench/serve_load.py [--seconds 30] [--clients 8] [--state runs/wikipedia/state]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, models_dir_from_state, start_service, write_result  # noqa: E402
from report import load_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--state", type=Path, default=ROOT / "runs" / "wikipedia" / "state")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lhash-load-"))
    models = models_dir_from_state(args.state, work / "models")
    data = np.load(ROOT / "data" / "wikipedia" / "wikipedia.npz")
    queries = data["text_tfidf"][data["split"] == "test"]
    proc, url = start_service(models, work / "serve.log")
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    errors = [0] * args.clients
    stop_at = time.perf_counter() + args.seconds

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        with httpx.Client(base_url=url, timeout=30) as session:
            while time.perf_counter() < stop_at:
                body = {"modality": "text", "k": args.k, "features": [queries[rng.integers(len(queries))].tolist()]}
                start = time.perf_counter()
                try:
                    ok = session.post("/search", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies[i].append(time.perf_counter() - start)
                errors[i] += not ok

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1000
    result = {"seconds": round(elapsed, 1), "clients": args.clients, "requests": int(lat.size),
              "requests_per_s": round(lat.size / elapsed, 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
              "p99_ms": round(float(np.percentile(lat, 99)), 2), "errors": int(sum(errors)),
              "database_size": database_size(models), "query": "1 Wikipedia text query (1,000-d TF-IDF), top-10"}
    print(load_table(result))
    print(f"written to {write_result('serve_load', result)}")


def database_size(models: Path) -> int:
    from lifelong_hashing.engine.codestore import CodeStore
    from lifelong_hashing.inference.versions import current_dir

    return len(CodeStore.load(current_dir(models) / "codes.npz"))


if __name__ == "__main__":
    main()
