"""The sweep behind the default's settings, on a validation split of the training side.

    python bench/tune.py --jobs 2      # every variant, both datasets, the tuning seeds

Every run here draws its queries from the training side (``dataset.queries: validation``:
a seeded share of the database, removed from it; the test queries are never loaded) and uses
the tuning seeds, which the quality benchmark never uses (it runs seeds 0, 1, 2). Each row keeps
the SHA-256 of the query ids it was scored on, so that a test can check that no tuning run saw
a test query. Writes ``bench/results/tuning.json``; ``make docs`` makes the table of
docs/methods.md from it.

Each variant changes a few settings (params keys) of one lifelong method: lifelong OrthoHash,
DLCH and CCMH-GAM each get a sweep of the settings they share (learning rate, memory, replay) and
of their own; joint and finetune run beside them on the same splits. The default method and its
settings are chosen here, on the validation split; the quality benchmark only reports them.
Both storing rules are scored from one training.

    python bench/tune.py --jobs 2 --variants DLCH "CCMH-GAM"   # only the variants whose names
                                                              # start so; the other rows are kept
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
# The other lifelong methods: the same shared knobs around params.yaml, and one or two of their own
OTHER_VARIANTS: dict[str, tuple[str, dict]] = {
    "DLCH": ("dlch", {}),
    "DLCH, lr 3e-4": ("dlch", {"train.lifelong_lr": 0.0003}),
    "DLCH, memory 100": ("dlch", {"method.memory_per_category": 100}),
    "DLCH, replay 200": ("dlch", {"method.replay_per_category": 200}),
    "DLCH, old sample 500": ("dlch", {"method.dlch.old_sample": 500}),
    "CCMH-GAM": ("ccmh_gam", {}),
    "CCMH-GAM, lr 3e-4": ("ccmh_gam", {"train.lifelong_lr": 0.0003}),
    "CCMH-GAM, memory 100": ("ccmh_gam", {"method.memory_per_category": 100}),
    "CCMH-GAM, replay weight 2": ("ccmh_gam", {"method.ccmh_gam.replay_weight": 2.0}),
    "CCMH-GAM, no projection": ("ccmh_gam", {"method.ccmh_gam.projection": False}),
}
REFERENCES = ("joint", "finetune")


def variants() -> dict[str, tuple[str, dict]]:
    """Every variant: name → (method, the params it sets)."""
    return {**{name: ("orthohash", o) for name, o in VARIANTS.items()}, **OTHER_VARIANTS,
            **{m: (m, {}) for m in REFERENCES}}


def jobs(datasets: tuple[str, ...], seeds: tuple[int, ...], threads: int,
         names: list[str]) -> list[tuple[str, Job]]:
    """(variant, job) for each of ``names`` on every dataset and seed."""
    out = []
    for dataset in datasets:
        case = CASES[dataset]
        for seed in seeds:
            for name in names:
                method, overrides = variants()[name]
                out.append((name, Job(dataset, case, "a", 64, "labelled", seed, method, case.epochs, threads,
                                      queries="validation", overrides=tuple(sorted(overrides.items())))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(TUNING_SEEDS))
    ap.add_argument("--variants", nargs="+", help="run only the variants whose names start so (and keep the other "
                                                   "rows of bench/results/tuning.json); default: all")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, each at one thread")
    args = ap.parse_args()
    if set(args.seeds) & {0, 1, 2}:
        sys.exit("tuning seeds must not be benchmark seeds (0, 1, 2)")
    names = [n for n in variants() if not args.variants or n.startswith(tuple(args.variants))]
    path = RESULTS / "tuning.json"
    rows = [r for r in json.loads(path.read_text())["rows"] if r["variant"] not in names] \
        if args.variants and path.exists() else []
    todo = jobs(tuple(args.datasets), tuple(args.seeds), 1 if args.jobs > 1 else 2, names)
    started = time.perf_counter()
    for index, measured in run_jobs([job for _, job in todo], RULES, args.jobs):
        variant = todo[index][0]
        for row in measured:
            rows.append({"variant": variant, "overrides": dict(todo[index][1].overrides), **row})
            print(f"[{time.perf_counter() - started:6.0f} s] {row['dataset']} seed {row['seed']} {variant} "
                  f"({row['rule']}): I→T {row['i2t']:.4f} T→I {row['t2i']:.4f}", file=sys.stderr, flush=True)
        write_result("tuning", {"seeds": args.seeds, "variants": {n: o for n, (_, o) in variants().items()},
                                "methods": {n: m for n, (m, _) in variants().items()}, "rows": rows})
    print(tuning_table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
