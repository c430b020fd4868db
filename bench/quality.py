"""The benchmark that decides the default method: every method on every embedded dataset and on
the synthetic generator, two class orders, 32 and 64 bits (synthetic: 64), 3 seeds.

    python bench/quality.py            # the full grid (hours on 2 CPU cores)
    python bench/quality.py --small    # 3 epochs, 32 bits, one order: minutes

Writes ``bench/results/quality[_small].json``: a list of rows {dataset, order, bits, method,
seed, i2t, t2i, train_seconds, codes_rewritten} (i2t / t2i: final average mAP; each row also
keeps the average mAP after every stage; ``make docs`` makes the tables of docs/benchmarks.md
from it), prints mean ± sd tables, and draws one figure per
dataset (``quality_<dataset>.png``: average mAP after each stage, one line per method, mean over
seeds). mirflickr25k's image side is SIMULATED (data/mirflickr25k/README.md); so is all of the
synthetic data.

Seeds change everything a run draws: initial weights, shuffles, memory, the query split of the
datasets without an official one (mirflickr25k, synthetic), the synthetic data itself and the
class order ``b``. A difference smaller than the seeds' spread is not a ranking.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, lifelong_epochs_for, write_result  # noqa: E402
from report import quality_tables  # noqa: E402

from lifelong_hashing.config import EMBEDDED_DATASETS, METHOD_NAMES, Params, load_params  # noqa: E402
from lifelong_hashing.engine.datasets import load_dataset  # noqa: E402
from lifelong_hashing.engine.runner import run_sequence  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One dataset with its stage split and its training budget."""

    dataset: dict
    base: int
    per_stage: int
    epochs: int
    bits: tuple[int, ...] = (32, 64)


CASES = {
    # 4 base categories, then 2 + 2 + 2 (the main job's split)
    "wikipedia": Case(EMBEDDED_DATASETS["wikipedia"], base=4, per_stage=2, epochs=40),
    # 12 base labels, then 4 + 4 + 4 (the first split); items go to the stage of their newest label
    "mirflickr25k": Case(EMBEDDED_DATASETS["mirflickr25k"], base=12, per_stage=4, epochs=10),
    # SYNTHETIC multi-label: 24 categories, 8 base then 4 + 4 + 4 + 4 (bench/lifelong_scaling.py
    # runs the long sequence: 12 stages to 200,000 items)
    "synthetic": Case({"kind": "synthetic", "name": "synthetic", "n_items": 24_000, "n_categories": 24,
                       "image_dim": 128, "text_dim": 300, "noise": 0.8, "query_size": 2000},
                      base=8, per_stage=4, epochs=10, bits=(64,)),  # 32 bits would add 30 runs: not measured
}
ORDERS = ("a", "b")  # a: the dataset's own category order; b: a seeded permutation of it


def case_params(case: Case, order: str, bits: int, method: str, seed: int, epochs: int) -> Params:
    """params.yaml with the case's data, stages and epochs; lifelong stages keep params.yaml's
    ratio of lifelong to base epochs."""
    params = load_params(ROOT / "params.yaml", {
        "seed": seed, "dataset": case.dataset, "model.bits": bits, "method.name": method, "train.epochs": epochs,
        "train.lifelong_epochs": lifelong_epochs_for(epochs),
        "stages": {"base": case.base, "per_stage": case.per_stage},
        "eval": {"map_at": [], "precision_at": []}})
    if order == "b":
        names = list(load_dataset(params.dataset, seed).database.categories)
        permuted = [names[i] for i in np.random.default_rng([seed, 1]).permutation(len(names))]
        params = params.model_copy(update={"stages": params.stages.model_copy(update={"order": permuted})})
    return params


def run_one(params: Params, out: Path) -> dict:
    s = run_sequence(params, out, quiet=True)
    return {"i2t": round(s["i2t"]["final_average_map"], 5), "t2i": round(s["t2i"]["final_average_map"], 5),
            "train_seconds": round(s["total_train_seconds"], 2), "codes_rewritten": s["total_codes_rewritten"],
            "stages": len(s["stages"]), "database_size": s["stages"][-1]["database_size"],
            "average_map_i2t": [round(v, 5) for v in s["i2t"]["average_map"]],
            "average_map_t2i": [round(v, 5) for v in s["t2i"]["average_map"]]}


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("dataset", "order", "bits", "method", "seed", "epochs", "lifelong_epochs"))


def figures(rows: list[dict], suffix: str) -> list[Path]:
    """One PNG per dataset: average mAP after each stage (mean over seeds), one line per method,
    a panel per direction; orders and bits each get their own line style."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset in [d for d in CASES if any(r["dataset"] == d for r in rows)]:
        group = [r for r in rows if r["dataset"] == dataset]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
        settings = sorted({(r["order"], r["bits"]) for r in group})
        styles = ["-", "--", ":", "-."]
        for ax, direction, title in ((axes[0], "i2t", "image → text"), (axes[1], "t2i", "text → image")):
            for color, method in zip(plt.cm.tab10.colors, METHOD_NAMES, strict=False):
                for style, (order, bits) in zip(styles, settings, strict=False):
                    curves = [r[f"average_map_{direction}"] for r in group
                              if r["method"] == method and (r["order"], r["bits"]) == (order, bits)]
                    if not curves:
                        continue
                    mean = np.mean(np.array(curves), axis=0)
                    label = method if len(settings) == 1 else f"{method} ({order}, {bits} b)"
                    ax.plot(range(len(mean)), mean, style, color=color, marker="o", markersize=3, label=label)
            ax.set_title(title)
            ax.set_xlabel("stage")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel("average mAP over the tasks so far")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2 if len(settings) > 1 else 1)
        note = {"mirflickr25k": " (simulated image side)", "synthetic": " (SYNTHETIC)"}.get(dataset, "")
        fig.suptitle(f"{dataset}{note}: average mAP after each stage, mean over seeds")
        fig.tight_layout()
        path = RESULTS / f"quality_{dataset}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="3 epochs, 32 bits, order a, 12k synthetic items")
    ap.add_argument("--datasets", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(METHOD_NAMES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bits", nargs="+", type=int, help="default: each dataset's (32 64; synthetic 64; --small: 32)")
    ap.add_argument("--orders", nargs="+", choices=ORDERS, help="default: a b (--small: a)")
    ap.add_argument("--epochs", type=int, help="override every dataset's epochs (--small: 3)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the results file and "
                                                           "measure only the missing ones")
    args = ap.parse_args()
    orders = args.orders or (["a"] if args.small else list(ORDERS))
    epochs = args.epochs or (3 if args.small else None)
    name = "quality_small" if args.small else "quality"
    path = RESULTS / f"{name}.json"
    rows: list[dict] = json.loads(path.read_text()) if args.resume and path.exists() else []
    done = {row_key(r) for r in rows}
    scratch = Path(tempfile.mkdtemp(prefix="lhash-quality-"))
    started = time.perf_counter()
    for dataset in args.datasets:
        case = CASES[dataset]
        if args.small and dataset == "synthetic":
            case = Case({**case.dataset, "n_items": 12_000}, case.base, case.per_stage, case.epochs)
        for order in orders:
            for b in args.bits or ([32] if args.small else case.bits):
                for seed in range(args.seeds):
                    for method in args.methods:
                        params = case_params(case, order, b, method, seed, epochs or case.epochs)
                        row = {"dataset": dataset, "order": order, "bits": b, "method": method, "seed": seed,
                               "epochs": params.train.epochs, "lifelong_epochs": params.train.lifelong_epochs}
                        if row_key(row) in done:
                            continue
                        row.update(run_one(params, scratch / f"{dataset}-{order}-{b}-{seed}-{method}"))
                        rows.append(row)
                        print(f"[{time.perf_counter() - started:7.0f} s] {dataset} {order} {b} bits seed {seed} "
                              f"{method}: I→T {row['i2t']:.4f} T→I {row['t2i']:.4f} {row['train_seconds']:.1f} s",
                              file=sys.stderr, flush=True)
                        write_result(name, rows)  # a long run keeps what it has measured
    print(quality_tables(rows))
    for path in figures(rows, "_small" if args.small else ""):
        print(f"figure: {path.relative_to(ROOT)}")
    print(f"rows: {(RESULTS / f'{name}.json').relative_to(ROOT)} ({len(rows)})")


if __name__ == "__main__":
    main()
