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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

# Each probe prints {"baseline_mb", "data_mb"} after its imports and setup, then does the work;
# the parent reads the child's peak RSS from its own report of ru_maxrss.
STAGE_PROBE = """
import json, resource, sys
from lifelong_hashing.config import load_params
from lifelong_hashing.runner import build_plan, run_stage
from lifelong_hashing.state import new_state
items = int(sys.argv[1])
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
data_mb = sum(b.image.nbytes + b.text.nbytes for b in (s.batch for s in plan.stages)) / 2**20
new_mb = (plan.stages[1].batch.image.nbytes + plan.stages[1].batch.text.nbytes) / 2**20
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
run_stage(state, plan)
print(json.dumps({"data_mb": data_mb, "new_batch_mb": new_mb, "database": len(state.store),
                  "new_items": len(plan.stages[1].batch), "peak_before_stage_mb": before}))
"""

SEARCH_PROBE = """
import json, resource, sys
import numpy as np
from lifelong_hashing.codestore import CodeStore, pack_codes
n = int(sys.argv[1])
rng = np.random.default_rng(0)
db = pack_codes(rng.integers(0, 2, size=(n, 64), dtype=np.int8))
store = CodeStore(64)
store.append(np.char.add("item", np.arange(n).astype(str)), 0, np.ones((n, 1), np.uint8), ("all",),
             {"image": db, "text": db})
queries = pack_codes(rng.integers(0, 2, size=(1000, 64), dtype=np.int8))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
store.search(queries, "image", 100)
print(json.dumps({"codes_mb": db.nbytes / 2**20, "store_mb": (db.nbytes * 2 + store.ids.nbytes
                  + store.labels.nbytes + store.stage.nbytes) / 2**20, "peak_before_search_mb": before}))
"""


def probe(code: str, arg: int) -> dict:
    wrapper = code + "\nimport resource\nprint(json.dumps({'peak_mb': resource.getrusage(resource.RUSAGE_SELF)" \
                     ".ru_maxrss / 1024}))\n"
    out = subprocess.run([sys.executable, "-c", wrapper, str(arg)], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip().splitlines()
    return {**json.loads(out[-2]), **json.loads(out[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    items, codes = (20_000, 100_000) if args.small else (200_000, 1_000_000)
    stage = probe(STAGE_PROBE, items)
    search = probe(SEARCH_PROBE, codes)
    print("| what | data | peak RSS before | peak RSS after | growth |")
    print("|---|---|---|---|---|")
    print(f"| lifelong DLCH stage: {stage['new_items']:,} new items onto {stage['database']:,} "
          f"| features of all {stage['data_mb']:.0f} MB, of the new batch {stage['new_batch_mb']:.0f} MB "
          f"| {stage['peak_before_stage_mb']:.0f} MB | {stage['peak_mb']:.0f} MB "
          f"| {stage['peak_mb'] - stage['peak_before_stage_mb']:.0f} MB |")
    print(f"| search: 1,000 queries, top-100 over {codes:,} codes of 64 bits | codes {search['codes_mb']:.0f} MB, "
          f"whole store {search['store_mb']:.0f} MB | {search['peak_before_search_mb']:.0f} MB "
          f"| {search['peak_mb']:.0f} MB | {search['peak_mb'] - search['peak_before_search_mb']:.0f} MB |")
    print("(the 'before' peak holds the generated data set, Python, PyTorch and the libraries)")
    print(f"written to {write_result('memory' + ('_small' if args.small else ''), {'stage': stage, 'search': search})}")


if __name__ == "__main__":
    main()
