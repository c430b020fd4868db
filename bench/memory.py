"""Peak resident memory, each measurement in a fresh process: a lifelong stage at scale and
exact search over 10^6 codes, set beside the size of the data itself. SYNTHETIC data.
Writes bench/results/memory.json.

    python bench/memory.py [--small]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402
from report import memory_table  # noqa: E402

# Each probe runs in a fresh process and prints its resident memory right before the measured
# work (VmRSS) and its peak after it (ru_maxrss), so set-up costs are not mistaken for the work.
RSS = """
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
"""

PREPARE = """
import sys
from lifelong_hashing.engine.batch import save_batch
from lifelong_hashing.config import load_params
from lifelong_hashing.engine.runner import build_plan, run_stage
from lifelong_hashing.engine.state import new_state, save_state
items, work = int(sys.argv[1]), sys.argv[2]
params = load_params("params.yaml", {
    "dataset": {"kind": "synthetic", "name": "synthetic", "n_items": items + 2000, "n_categories": 24,
                "image_dim": 128, "text_dim": 300, "query_size": 2000},
    "stages": {"base": 22, "per_stage": 2}, "model.hidden": [512], "train.epochs": 2,
    "train.lifelong_epochs": 2, "train.batch_size": 256, "method.name": "dlch",
    "eval": {"map_at": [], "precision_at": []}})
plan = build_plan(params)
first = plan.stages[0].batch
state = new_state(params, first.image.shape[1:], first.text.shape[1])
run_stage(state, plan)
save_state(state, work + "/state")
save_batch(plan.stages[1].batch, work + "/new.npz")
"""

STAGE_PROBE = RSS + """
import json, resource, sys, time
from lifelong_hashing.engine.batch import load_batch
from lifelong_hashing.engine.stages import Stage
from lifelong_hashing.engine.state import load_state
work = sys.argv[2]
state = load_state(work + "/state")
batch = load_batch(work + "/new.npz")
stage = Stage(1, batch.categories[len(state.method.categories):], batch.categories, batch)
before = rss_mb()
state.method.learn(stage, state.store)
print(json.dumps({"new_batch_mb": (batch.image.nbytes + batch.text.nbytes) / 2**20, "new_items": len(batch),
                  "database": len(state.store), "store_mb": sum(c.nbytes for c in state.store.codes.values()) / 2**20,
                  "before_mb": before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SEARCH_PROBE = RSS + """
import json, resource, sys
import faiss  # loaded before measuring: the library itself is not the search's memory
import numpy as np
from lifelong_hashing.engine.codestore import CodeStore, pack_codes
n = int(sys.argv[1])
rng = np.random.default_rng(0)
db = pack_codes(rng.integers(0, 2, size=(n, 64), dtype=np.int8))
store = CodeStore(64)
store.append(np.char.add("item", np.arange(n).astype(str)), 0, np.ones((n, 1), np.uint8), ("all",),
             {"image": db, "text": db})
queries = pack_codes(rng.integers(0, 2, size=(1000, 64), dtype=np.int8))
del rng
store.search(queries[:1], "image", 1)  # the index is built once per store, as in serving
before = rss_mb()
store.search(queries, "image", 100)
print(json.dumps({"codes_mb": db.nbytes / 2**20, "store_mb": (db.nbytes * 2 + store.ids.nbytes
                  + store.labels.nbytes + store.stage.nbytes) / 2**20, "before_mb": before,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def probe(code: str, *args) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(done.stderr)
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    items, codes = (20_000, 100_000) if args.small else (200_000, 1_000_000)
    work = tempfile.mkdtemp(prefix="lhash-mem-")
    probe(PREPARE, items, work)
    stage = probe(STAGE_PROBE, items, work)
    search = probe(SEARCH_PROBE, codes)
    print(memory_table({"stage": stage, "search": search}))
    print("(RSS before includes Python and the libraries: PyTorch alone is several hundred MB)")
    print(f"written to {write_result('memory' + ('_small' if args.small else ''), {'stage': stage, 'search': search})}")


if __name__ == "__main__":
    main()
