"""The sweep behind the default's settings, on a validation split of the training side.

    python bench/tune.py --jobs 2      # every variant, both datasets, the tuning seeds

Every run here draws its queries from the training side (``dataset.queries: validation``:
a seeded share of the database, removed from it; the test queries are never loaded) and uses
the tuning seeds, which the quality benchmark never uses (it runs seeds 0, 1, 2). Each row keeps
the SHA-256 of the query ids it was scored on, so that a test can check that no tuning run saw
a test query. Writes ``bench/results/tuning.json``; ``make docs`` makes the table of
docs/methods.md from it.

Each variant changes a few of lifelong OrthoHash's settings (params keys); joint and finetune
run beside them on the same splits. Both storing rules are scored from one training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402
from quality import CASES, RULES, Job, run_jobs  # noqa: E402
from report import tuning_table  # noqa: E402

TUNING_SEEDS = (100, 101)  # never a benchmark seed (bench/quality.py runs 0, 1, 2)
DATASETS = ("mirflickr25k", "wikipedia")

# name → the params it sets (everything else as in params.yaml); "before" is the default this
# sweep replaced (tuned, then, on seed 0's test queries)
BEFORE = {"train.lifelong_lr": 0.0003, "method.orthohash.distill": 1.0, "method.memory_per_category": 100}
VARIANTS: dict[str, dict] = {
    "before": BEFORE,
    "lr 1e-3": {**BEFORE, "train.lifelong_lr": 0.001},
    "lr 1e-3, no distillation": {**BEFORE, "train.lifelong_lr": 0.001, "method.orthohash.distill": 0.0},
    "+ memory 300": {"train.lifelong_lr": 0.001, "method.orthohash.distill": 0.0, "method.memory_per_category": 300},
    "+ memory 1000": {"train.lifelong_lr": 0.001, "method.orthohash.distill": 0.0,
                      "method.memory_per_category": 1000},
    "+ memory 1000, replay 50": {"train.lifelong_lr": 0.001, "method.orthohash.distill": 0.0,
                                 "method.memory_per_category": 1000, "method.replay_per_category": 50},
    "+ memory 1000, replay 200": {"train.lifelong_lr": 0.001, "method.orthohash.distill": 0.0,
                                  "method.memory_per_category": 1000, "method.replay_per_category": 200},
}
REFERENCES = ("joint", "finetune")


def jobs(datasets: tuple[str, ...], seeds: tuple[int, ...], threads: int) -> list[tuple[str, Job]]:
    """(variant, job) for every variant of lifelong OrthoHash and every reference method."""
    out = []
    for dataset in datasets:
        case = CASES[dataset]
        for seed in seeds:
            def job(method: str, overrides: dict, case=case, dataset=dataset, seed=seed) -> Job:
                return Job(dataset, case, "a", 64, "labelled", seed, method, case.epochs, threads,
                           queries="validation", overrides=tuple(sorted(overrides.items())))
            out += [(name, job("orthohash", overrides)) for name, overrides in VARIANTS.items()]
            out += [(method, job(method, {})) for method in REFERENCES]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(TUNING_SEEDS))
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, each at one thread")
    args = ap.parse_args()
    if set(args.seeds) & {0, 1, 2}:
        sys.exit("tuning seeds must not be benchmark seeds (0, 1, 2)")
    todo = jobs(tuple(args.datasets), tuple(args.seeds), 1 if args.jobs > 1 else 2)
    rows, started = [], time.perf_counter()
    for index, measured in run_jobs([job for _, job in todo], RULES, args.jobs):
        variant = todo[index][0]
        for row in measured:
            rows.append({"variant": variant, "overrides": dict(todo[index][1].overrides), **row})
            print(f"[{time.perf_counter() - started:6.0f} s] {row['dataset']} seed {row['seed']} {variant} "
                  f"({row['rule']}): I→T {row['i2t']:.4f} T→I {row['t2i']:.4f}", file=sys.stderr, flush=True)
        write_result("tuning", {"seeds": args.seeds, "variants": VARIANTS, "rows": rows})
    print(tuning_table(json.loads((RESULTS / "tuning.json").read_text())))

if __name__ == "__main__":
    main()
