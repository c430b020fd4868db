"""Lifelong stages against retraining as the database grows: training seconds per stage and in
total, final average mAP both directions under each storing rule, stored codes rewritten. SYNTHETIC data (the seeded
generator: multi-label, co-occurring labels, two modalities), 12 category-incremental stages
growing to --items database items; then the same methods on Wikipedia's stages. Stages after the
base one train params.yaml's share of the base epochs, as the product does.

    python bench/lifelong_scaling.py            # 200,000 items (several minutes)
    python bench/lifelong_scaling.py --small    # 24,000 items, for a quick look
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, lifelong_epochs_for, write_result  # noqa: E402
from quality import RULES, summaries_by_rule  # noqa: E402
from report import scaling_tables  # noqa: E402

from lifelong_hashing.config import load_params  # noqa: E402

METHODS = ["joint", "finetune", "dlch", "ccmh_gam", "orthohash"]


def synthetic_params(items: int, epochs: int):
    return load_params(ROOT / "params.yaml", {
        "dataset": {"kind": "synthetic", "name": "synthetic", "n_items": items + 2000, "n_categories": 24,
                    "image_dim": 128, "text_dim": 300, "noise": 0.8, "query_size": 2000},
        "stages": {"base": 2, "per_stage": 2},
        "model.hidden": [512], "train.epochs": epochs,
        "train.lifelong_epochs": lifelong_epochs_for(epochs), "train.batch_size": 256,
        "eval": {"map_at": [], "precision_at": []},
    })


def run_all(params, methods) -> dict:
    """{rule: {method: totals and seconds per stage}}: every method under both storing rules,
    each trained once where its training never reads the stored codes (quality.summaries_by_rule)."""
    results: dict[str, dict] = {rule: {} for rule in RULES}
    for name in methods:
        run_params = params.model_copy(update={"method": params.method.model_copy(update={"name": name})})
        for rule, s in summaries_by_rule(run_params, RULES).items():
            results[rule][name] = {
                "stage_seconds": [round(t["train_seconds"], 2) for t in s["timings"]],
                "database_size": [r["database_size"] for r in s["stages"]],
                "total_seconds": round(s["total_train_seconds"], 1),
                "final_map_i2t": round(s["i2t"]["final_average_map"], 4),
                "final_map_t2i": round(s["t2i"]["final_average_map"], 4),
                "codes_rewritten": s["total_codes_rewritten"], "device": s["stages"][-1]["device"],
            }
        print(f"  {name}: {results[RULES[0]][name]['total_seconds']} s", file=sys.stderr, flush=True)
    return results


def print_tables(title: str, results: dict) -> None:
    print(f"\n### {title}\n\n{scaling_tables(results)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--small", action="store_true", help="24,000 items")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--no-wikipedia", action="store_true")
    args = ap.parse_args()
    items = 24_000 if args.small else args.items
    print(f"synthetic, {items} items …", file=sys.stderr)
    payload = {"synthetic": {"items": items, "epochs": args.epochs, "lifelong_epochs": lifelong_epochs_for(args.epochs),
                             "results": run_all(synthetic_params(items, args.epochs), args.methods)}}
    device = payload["synthetic"]["results"][RULES[0]]["joint"]["device"]
    print(f"device: {device}" + (" (no CUDA here: the same code runs on CPU)" if device == "cpu" else ""))
    print_tables(f"SYNTHETIC, 12 stages growing to {items} items, 64 bits, {args.epochs} epochs a joint or "
                 f"finetune stage, {lifelong_epochs_for(args.epochs)} a lifelong one",
                 payload["synthetic"]["results"])
    if not args.no_wikipedia:
        print("Wikipedia …", file=sys.stderr)
        payload["wikipedia"] = {"results": run_all(load_params(ROOT / "params.yaml"), args.methods)}
        print_tables("Wikipedia, 4 base categories then 2+2+2, 64 bits (params.yaml)",
                     payload["wikipedia"]["results"])
    print(f"\nwritten to {write_result('lifelong_scaling' + ('_small' if args.small else ''), payload)}")


if __name__ == "__main__":
    main()
