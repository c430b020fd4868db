"""The benchmark tables of docs/benchmarks.md, made from bench/results/*.json so the docs cannot
drift from the measurements. Each benchmark prints its table with the same function.

    python bench/report.py           # rewrite the generated blocks of docs/benchmarks.md and README.md
    python bench/report.py --check   # exit 1 when they are out of date (a test runs this)

A block is the text between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``; the
prose around it is written by hand. No project import: numpy, yaml and the standard library.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = (ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "methods.md", ROOT / "docs" / "images.md", ROOT / "README.md")
METHODS = ("joint", "finetune", "dlch", "ccmh_gam", "orthohash")
DATASETS = ("wikipedia", "mirflickr25k", "synthetic")
RULES = ("labels", "encoders")  # method.database_codes
CATALOGUES = ("labelled", "mixed")
DIRECTIONS = ("i2t", "t2i")
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def mean_sd(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def pm(value: tuple[float, float], digits: int) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def versus(group: list[dict], method: str, baseline: str, direction: str) -> str:
    """The gap to ``baseline``, paired by seed (a seed fixes the split, the class order of order
    b and the synthetic data, so pairing removes the task's own variance): mean ± sd of the
    per-seed gaps, "better" / "worse" only when the mean exceeds that sd, else "noise"."""
    score = {(r["method"], r["seed"]): r[direction] for r in group}
    seeds = sorted(s for m, s in score if m == method and (baseline, s) in score)
    gap, sd = mean_sd([score[(method, s)] - score[(baseline, s)] for s in seeds])
    verdict = "noise" if abs(gap) <= sd or len(seeds) < 2 else "better" if gap > 0 else "worse"
    return f"{gap:+.3f} ± {sd:.3f} ({verdict})"


def _settings(rows: list[dict], datasets: tuple[str, ...]) -> list[tuple]:
    keys = {(r["dataset"], r["order"], r["bits"], r["catalogue"]) for r in rows if r["dataset"] in datasets}
    return sorted(keys, key=lambda k: (datasets.index(k[0]), k[1], k[2], CATALOGUES.index(k[3])))


def _mean(group: list[dict], method: str, rule: str, key: str) -> float:
    return mean_sd([r[key] for r in group if (r["method"], r["rule"]) == (method, rule)])[0]


def ceiling(group: list[dict], direction: str) -> tuple[float, str]:
    """The quality ceiling of a direction: the stronger of joint's storing rules (mean over seeds)."""
    return max((_mean(group, "joint", rule, direction), rule) for rule in RULES
               if any((r["method"], r["rule"]) == ("joint", rule) for r in group))


def quality_tables(rows: list[dict], datasets: tuple[str, ...] = DATASETS) -> str:
    """bench/quality.py: per dataset, order, bits and catalogue, every method under each storing
    rule, mean ± sd over seeds: against the ceiling (the stronger joint), against joint under the
    same rule, and against finetune under the same rule (``versus``)."""
    out = []
    for dataset, order, bits, catalogue in _settings(rows, datasets):
        group = [r for r in rows if (r["dataset"], r["order"], r["bits"], r["catalogue"]) == (dataset, order, bits,
                                                                                            catalogue)]
        seeds = len({r["seed"] for r in group})
        top = {d: ceiling(group, d) for d in DIRECTIONS}
        out += [f"\n#### {dataset}, order {order}, {bits} bits, {catalogue} catalogue ({seeds} seeds; ceiling: "
                f"joint with {top['i2t'][1]} codes I→T, {top['t2i'][1]} codes T→I)\n",
                "| method | stored codes | avg mAP I→T | avg mAP T→I | % of ceiling I→T / T→I "
                "| % of joint, same codes | vs finetune, same codes | train s | % of joint's time | codes rewritten |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for rule in RULES:
            same = [r for r in group if r["rule"] == rule]
            for m in [m for m in METHODS if any(r["method"] == m for r in same)]:
                out.append(_quality_row(same, m, rule, top))
    return "\n".join(out).lstrip("\n")


def _quality_row(same: list[dict], method: str, rule: str, top: dict) -> str:
    stat = {k: mean_sd([r[k] for r in same if r["method"] == method]) for k in ("i2t", "t2i", "train_seconds")}
    has = {r["method"] for r in same}
    cells = [method, rule, pm(stat["i2t"], 4), pm(stat["t2i"], 4),
             " / ".join(f"{stat[d][0] / top[d][0]:.1%}" for d in DIRECTIONS)]
    if "joint" in has:
        cells.append(" / ".join(f"{stat[d][0] / _mean(same, 'joint', rule, d):.1%}" for d in DIRECTIONS))
        time_share = f"{stat['train_seconds'][0] / _mean(same, 'joint', rule, 'train_seconds'):.0%}"
    else:
        cells.append("–")
        time_share = "–"
    cells.append(" / ".join(versus(same, method, "finetune", d) for d in DIRECTIONS)
                 if "finetune" in has and method != "finetune" else "–")
    rewritten = max(r["codes_rewritten"] for r in same if r["method"] == method)
    cells += [pm(stat["train_seconds"], 1), time_share, f"{rewritten:,}"]
    return "| " + " | ".join(cells) + " |"


def headline_table(rows: list[dict], method: str) -> str:
    """The README's one table: the default method per dataset, catalogue and storing rule, as the
    range over that dataset's cases (orders × bits): against the ceiling (the stronger joint),
    against joint under the same rule, against finetune under the same rule, and its time."""
    out = ["| dataset | catalogue | stored codes | cases | % of ceiling I→T | % of ceiling T→I "
           "| % of joint, same codes, I→T / T→I | beats finetune, same codes | % of joint's train time "
           "| codes rewritten |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dataset in [d for d in DATASETS if any(r["dataset"] == d for r in rows)]:
        for catalogue in CATALOGUES:
            cases = [k for k in _settings(rows, (dataset,)) if k[3] == catalogue]
            for rule in RULES:
                cells = [_headline_case(rows, k, rule, method) for k in cases]
                cells = [c for c in cells if c]
                if cells:
                    out.append(_headline_row(dataset, catalogue, rule, cells))
    return "\n".join(out)


LIFELONG = ("orthohash", "dlch", "ccmh_gam")


def methods_table(rows: list[dict]) -> str:
    """The lifelong methods side by side: per dataset, catalogue and storing rule, each one's mean
    over that dataset's cases (orders × bits) of its % of the ceiling (I→T / T→I), the lower of
    the two, and its % of joint's train time. Only methods with every case measured are shown."""
    head = ["dataset", "catalogue", "stored codes", "cases"] + [f"{m}: % of ceiling I→T / T→I (time)" for m in LIFELONG]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset in [d for d in DATASETS if any(r["dataset"] == d for r in rows)]:
        for catalogue in CATALOGUES:
            cases = [k for k in _settings(rows, (dataset,)) if k[3] == catalogue]
            for rule in RULES:
                cells = [dataset, catalogue, rule, str(len(cases))]
                for method in LIFELONG:
                    got = [_headline_case(rows, k, rule, method) for k in cases]
                    if not cases or not all(got):
                        cells.append("–")
                        continue
                    ceil = [np.mean([g["ceiling"][i] for g in got]) for i in range(2)]
                    time_share = np.mean([g["time"] for g in got])
                    cells.append(f"{ceil[0]:.1%} / {ceil[1]:.1%} ({time_share:.0%})")
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _headline_case(rows: list[dict], key: tuple, rule: str, method: str) -> dict | None:
    group = [r for r in rows if (r["dataset"], r["order"], r["bits"], r["catalogue"]) == key]
    same = [r for r in group if r["rule"] == rule]
    if not any(r["method"] == method for r in same):
        return None
    mine = {k: _mean(same, method, rule, k) for k in ("i2t", "t2i", "train_seconds")}
    beaten = [versus(same, method, "finetune", d).endswith("(better)") for d in DIRECTIONS]
    return {"ceiling": [mine[d] / ceiling(group, d)[0] for d in DIRECTIONS],
            "joint": [mine[d] / _mean(same, "joint", rule, d) for d in DIRECTIONS],
            "beats": all(beaten), "time": mine["train_seconds"] / _mean(same, "joint", rule, "train_seconds"),
            "rewritten": max(r["codes_rewritten"] for r in same if r["method"] == method)}


def _headline_row(dataset: str, catalogue: str, rule: str, cases: list[dict]) -> str:
    def span(values, fmt="{:.1%}"):
        lo, hi = fmt.format(min(values)), fmt.format(max(values))
        return lo if lo == hi else f"{lo}–{hi}"

    ceil = [span([c["ceiling"][i] for c in cases]) for i in range(2)]
    joint = " / ".join(span([c["joint"][i] for c in cases]) for i in range(2))
    beats = sum(c["beats"] for c in cases)
    return (f"| {dataset} | {catalogue} | {rule} | {len(cases)} | {ceil[0]} | {ceil[1]} | {joint} "
            f"| {beats} of {len(cases)} | {span([c['time'] for c in cases], '{:.0%}')} "
            f"| {max(c['rewritten'] for c in cases):,} |")


def tuning_table(t: dict) -> str:
    """bench/tune.py: the lifelong methods' variants and the references on the validation split,
    final average mAP I→T / T→I under each storing rule, mean over the tuning seeds."""
    rows = t["rows"]
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    names = [n for n in dict.fromkeys([*t["variants"], "joint", "finetune"]) if any(r["variant"] == n for r in rows)]
    head = ["variant", "settings"] + [f"{d}, {rule} codes" for d in datasets for rule in RULES]
    head += [f"{d}: % of joint's time" for d in datasets]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name, ", ".join(f"`{k}: {v}`" for k, v in t["variants"].get(name, {}).items()) or "—"]
        for d in datasets:
            for rule in RULES:
                got = [r for r in rows if (r["variant"], r["dataset"], r["rule"]) == (name, d, rule)]
                cells.append(" / ".join(f"{np.mean([r[k] for r in got]):.3f}" for k in DIRECTIONS) if got else "–")
        for d in datasets:
            mine = [r["train_seconds"] for r in rows if (r["variant"], r["dataset"]) == (name, d)]
            joint = [r["train_seconds"] for r in rows if (r["variant"], r["dataset"]) == ("joint", d)]
            cells.append(f"{np.mean(mine) / np.mean(joint):.0%}" if mine and joint else "–")
        out.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(map(str, t["seeds"]))
    return "\n".join(out + ["", f"Validation queries drawn from the training side, tuning seeds {seeds}; "
                                 "64 bits, order a, labelled catalogue."])


def default_method() -> str:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["method"]["name"]


def scaling_tables(by_rule: dict) -> str:
    """bench/lifelong_scaling.py: under each storing rule, totals against joint under the same
    rule; then seconds per stage (one training serves both rules)."""
    out = []
    for rule, results in by_rule.items():
        joint = results["joint"]
        out += [f"{rule.capitalize()} codes:", "",
                "| method | total train s | vs joint | final avg mAP I→T | vs joint | final avg mAP T→I | vs joint "
                "| codes rewritten |", "|---|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            out.append(f"| {name} | {r['total_seconds']} | {r['total_seconds'] / joint['total_seconds']:.0%} | "
                       f"{r['final_map_i2t']:.4f} | {r['final_map_i2t'] / joint['final_map_i2t']:.1%} | "
                       f"{r['final_map_t2i']:.4f} | {r['final_map_t2i'] / joint['final_map_t2i']:.1%} | "
                       f"{r['codes_rewritten']:,} |")
        out.append("")
    results = by_rule[next(iter(by_rule))]
    out += ["Training seconds per stage (database size after the stage):", "",
            "| stage | database | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    for t, size in enumerate(results["joint"]["database_size"]):
        out.append(f"| {t} | {size:,} | " + " | ".join(str(r["stage_seconds"][t]) for r in results.values()) + " |")
    return "\n".join(out)


SEARCH_COLUMNS = (("code store", "code store"), ("faiss no heap", "faiss no heap"), ("faiss heap", "faiss heap"),
                  ("numpy", "numpy xor+popcount"), ("float", "float ±1 matmul"), ("ceiling", "popcount-only ceiling"))


def search_table(rows: list[dict]) -> str:
    """bench/search_speed.py: millions of codes scanned per second (in brackets: the code store's
    time over the other's, i.e. the other's rate over the code store's)."""
    out = ["| codes | bits | task | " + " | ".join(title for _, title in SEARCH_COLUMNS) + " | same top-k as faiss |",
           "|---|---|---|" + "---|" * (len(SEARCH_COLUMNS) + 1)]
    for row in rows:
        out.append(search_row(row))
    return "\n".join(out)


def search_row(row: dict) -> str:
    rate = row["million_codes_per_s"]
    cells = [f"{rate[m]:,.0f} ({rate[m] / rate['code store']:.2f})" if m in rate else "—" for m, _ in SEARCH_COLUMNS]
    same = {True: "yes", False: "NO"}.get(row.get("identical_to_faiss"), "—")
    return f"| {row['codes']:,} | {row['bits']} | {row['task']} | " + " | ".join(cells) + f" | {same} |"


def ceiling_table(rows: list[dict]) -> str:
    """bench/search_speed.py --ceiling: the kernel beside the popcount-only ceiling and faiss."""
    out = ["| codes | bits | k | queries | code store | popcount-only ceiling | share of the ceiling | faiss no heap "
           "(× code store's time) | same top-k as faiss | candidates a query |", "|---" * 10 + "|"]
    return "\n".join(out + [ceiling_row(row) for row in rows])


def ceiling_row(row: dict) -> str:
    s = row["seconds"]
    if row["queries"] == 1:
        cells = [f"{s[m] * 1000:.3f} ms" for m in ("code store", "ceiling")]
    else:
        cells = [f"{row['codes'] * row['queries'] / s[m] / 1e9:.2f} G codes/s" for m in ("code store", "ceiling")]
    same = "yes" if row["identical_to_faiss"] else "NO"
    return (f"| {row['codes']:,} | {row['bits']} | {row['k']} | {row['queries']:,} | {cells[0]} | {cells[1]} "
            f"| {row['of_ceiling']:.2f} | {row['vs_faiss']:.2f} | {same} | {row['candidates_per_query']:,.0f} |")


def index_table(rows: list[dict]) -> str:
    """bench/search_speed.py --indexes: approximate indexes against exact search at 10^7 codes."""
    out = ["| search | build s | queries/s (batch of 1,000) | one query ms | recall@100 |", "|---|---|---|---|---|"]
    return "\n".join(out + [index_row(row) for row in rows])


def index_row(row: dict) -> str:
    return (f"| {row['index']} | {row['build_seconds']:g} | {row['queries_per_s']:,.0f} | {row['single_query_ms']:g} "
            f"| {row['recall_at_100']:.4f} |")


def filters_table(r: dict) -> str:
    """bench/filters.py: filtered exact top-k against the same search unfiltered, one run."""
    plain = r["unfiltered"]
    out = [f"Unfiltered: one query {plain['single_ms']:g} ms, a batch of {r['batch']:,} {plain['batch_s']:g} s.", "",
           "| filter | share passing | one query ms (× unfiltered) | same, first time (mask built) | "
           f"batch of {r['batch']:,} s (× unfiltered) | gathered copy, batch s | same hits as the copy | "
           f"queries with k hits | post-filtered top {10 * r['k']:,}: queries short of k |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['filter']} | {row['share']:.1%} | {row['single_ms']:g} ({row['single_vs_unfiltered']:.2f}) "
                   f"| {row['single_first_ms']:g} ({row['single_first_vs_unfiltered']:.2f}) "
                   f"| {row['batch_s']:g} ({row['batch_vs_unfiltered']:.2f}) | {row['gather_batch_s']:g} "
                   f"| {'yes' if row['same_as_gather'] else 'NO'} | {row['k_hits_share']:.0%} "
                   f"| {row['post_filter_short_share']:.0%} |")
    return "\n".join(out)


def budget_table(r: dict) -> str:
    """bench/run_budget.py: a pipeline run's seconds, part by part (mean ± sd over the appends)."""
    parts = r["summary"]
    labels = {"before_flow": "process start to flow run (imports, settings, server)",
              "between_steps": "the flow's own work between steps", "after_flow": "flow run end to process exit"}
    out = [f"{r['data']}; {len(r['runs'])} runs.", "", "| part | seconds | share of the run |", "|---|---|---|"]
    total = parts["process"]["mean"]
    for name, stat in parts.items():
        if name != "process":
            label = labels.get(name, f"`{name.removeprefix('step: ')}`")
            out.append(f"| {label} | {pm((stat['mean'], stat['sd']), 2)} | {stat['mean'] / total:.0%} |")
    out.append(f"| **the whole run** | **{pm((total, parts['process']['sd']), 2)}** | 100% |")
    return "\n".join(out)


def arrival_table(r: dict) -> str:
    """bench/arrival.py: seconds from a batch's rename into incoming/ to its version served."""
    out = [f"{r['data']}; the deployment of prefect.yaml on a real Prefect server and worker (the worker asks "
           f"for runs every {r['worker_query_seconds']:g} s).", "",
           "| started by | arrivals | to served, s | of which waiting for a run, s | the run itself, s | "
           "slowest to served, s |", "|---|---|---|---|---|---|"]
    for key, name in (("event", f"event trigger (the watcher; debounce {r['debounce_seconds']} s)"),
                      ("schedule", f"interval schedule alone (every {r['interval_seconds']} s, no watcher)")):
        row = r[key]
        out.append(f"| {name} | {len(row['arrivals'])} | {row['to_served']['mean']:.1f} ± {row['to_served']['sd']:.1f} "
                   f"| {row['wait']['mean']:.1f} ± {row['wait']['sd']:.1f} | {row['work']['mean']:.1f} ± "
                   f"{row['work']['sd']:.1f} | {row['to_served']['max']:.1f} |")
    ratio = r["schedule"]["to_served"]["mean"] / r["event"]["to_served"]["mean"]
    out += ["", f"The event trigger serves an arrival {ratio:.1f}× sooner than the schedule alone."]
    return "\n".join(out)


DISCOVERY_SCORES = {"mahalanobis": " (the pipeline's)", "prototype": "",
                    "nearest_item": " (baseline, stored codes)", "nearest_sample": " (baseline, the same data)"}


def discovery_table(r: dict) -> str:
    """bench/discovery.py: novelty scores on held-out categories, mean ± sd over the seeds."""
    out = ["| dataset | new categories | positives / negatives | score | AUROC | flagged | precision | recall "
           "| known flagged | proposals | purity | NMI |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(row["dataset"], row["score"]) for row in r["rows"]},
                  key=lambda k: (k[0] != "wikipedia", list(DISCOVERY_SCORES).index(k[1])))
    for dataset, score in keys:
        rows = [row for row in r["rows"] if row["dataset"] == dataset and row["score"] == score]
        cell = {k: pm(mean_sd([row.get(k, float("nan")) for row in rows]), 3)
                for k in ("auroc", "precision", "recall", "known_flagged", "purity", "nmi")}
        first = rows[0]
        name = score + DISCOVERY_SCORES[score]
        out.append(f"| {dataset} | {', '.join(first['new_categories'])} | {first['positives']} / {first['negatives']} "
                   f"| {name} | {cell['auroc']} | {np.mean([row['flagged'] for row in rows]):.0f} "
                   f"| {cell['precision']} | {cell['recall']} | {cell['known_flagged']} "
                   f"| {np.mean([row['proposals'] for row in rows]):.1f} | {cell['purity']} | {cell['nmi']} |")
    return "\n".join(out)


def distributed_table(r: dict) -> str:
    """bench/sharded_encoding.py: encoding an append batch in process and on Dask workers."""
    out = ["| items | where | threads per process | wall s, cold | of it: cluster start | wall s, warm | shards "
           "| peak MB, flow process | peak MB, each worker |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if row["workers"]:
            dask = (f"| {row['cluster_start_seconds']:.1f} | {row['warm_seconds']:.1f} | {row['shards']} ",
                    " / ".join(f"{m:,.0f}" for m in row["worker_peak_mb"]))
        else:
            dask = (f"| — | {row['seconds']:.1f} | — ", "—")
        out.append(f"| {row['items']:,} | {row['config']} | {row['threads']} | {row['seconds']:.1f} {dask[0]}"
                   f"| {row['peak_mb']:,.0f} | {dask[1]} |")
    overhead = [row["task_overhead_ms"] for row in r["rows"] if "task_overhead_ms" in row]
    if "identical_codes" in r:
        cost = f"{min(overhead):g}" if min(overhead) == max(overhead) else f"{min(overhead):g}–{max(overhead):g}"
        out += ["", f"{r['shard_rows']:,} rows per shard; Dask's cost per mapped task {cost} ms; "
                    "identical codes in every configuration at 1 thread: "
                    f"{'yes' if r['identical_codes'] else 'NO'}; {r['cpu_count']} cores."]
    return "\n".join(out)


def scale_summary(search: dict, serve: dict, sharded: dict) -> str:
    """The README's three lines on large catalogues, from the search, serving and sharding results."""
    exact = next(r for r in search["rows"] if r["codes"] == 1_000_000 and r["bits"] == 64 and r["task"] == "top-100")
    rate = exact["million_codes_per_s"]
    shares = [r["of_ceiling"] for r in search["ceiling"] if r["queries"] > 1]
    indexes = {r["index"]: r for r in search["indexes"]}
    flat, ivf = indexes["exact: code store"], indexes["ivf lists=1024 probes=16"]
    largest = max(r["items"] for r in sharded["rows"])
    rows = {(r["workers"], r["threads"]): r for r in sharded["rows"] if r["items"] == largest}
    alone, two = rows[(0, 1)], rows[(2, 1)]
    return "\n".join([
        f"- **Search**: exact top-100 over 10^6 64-bit codes at {rate['code store'] / 1000:.1f} G codes/s, "
        f"{rate['code store'] / rate['faiss no heap']:.1f}× faiss' flat index, and {min(shares):.2f}–{max(shares):.2f} "
        f"of the popcount-only ceiling at 10^6–10^7 codes: exact search (`serving.index.kind: "
        f"flat`) pays off up to a few million codes. Beyond, `ivf` (faiss, built at export, versioned, recall in "
        f"the manifest): at {flat['codes']:,} codes it answers {ivf['queries_per_s'] / flat['queries_per_s']:.0f}× "
        f"the queries/s of exact search at recall@100 {ivf['recall_at_100']:.3f}. `multihash` does not pay off on "
        "hashing codes: they cluster, which fills its buckets (synthetic clustered codes).",
        f"- **Serving**: requests that arrive together are encoded and searched as one batch; `/search` serves "
        f"{serve['ratio_to_bare']:.2f} ± {serve['ratio_to_bare_sd']:.2f} of the requests/s of a bare FastAPI "
        f"endpoint under the same server ({serve['service']['requests_per_s']:.0f} vs "
        f"{serve['bare']['requests_per_s']:.0f}), a rate the client bounds. Saturated by `wrk`, a request costs "
        f"the service {_pm(serve['wrk']['ratios']['server_cpu_us_per_request'])}× the bare endpoint's CPU "
        f"(encoding and searching a query is part of it) at {_pm(serve['wrk']['ratios']['p99_ms'])}× its p99.",
        f"- **Sharded work**: `pipeline.dask` encodes append batches (and the joint baseline's re-encoding) and scores "
        f"evaluation queries shard by shard "
        f"on Dask workers (`engine.on_dask`), identical to one process. Encoding {largest:,} items: "
        f"{alone['seconds']:.0f} s in one process at one thread ({rows[(0, 2)]['seconds']:.0f} s at two), "
        f"{two['warm_seconds']:.0f} s on 2 warm one-thread workers ({two['seconds']:.0f} s cold) of this 2-core "
        "machine, "
        f"a worker peaking at {max(two['worker_peak_mb']):,.0f} MB (one shard at a time; the batch itself "
        f"{alone['peak_mb'] / 1024:.0f} GB in one process).",
    ])


def eval_table(r: dict) -> str:
    """bench/eval_speed.py: the project's mAP against a per-query loop."""
    return "\n".join(["| implementation | seconds | mAP@all |", "|---|---|---|",
                      f"| per-query argsort loop | {r['reference_seconds']:.2f} | {r['map']:.12f} |",
                      f"| project (counting by distance) | {r['project_seconds']:.3f} | {r['map']:.12f} |",
                      "", f"{r['queries']:,} queries × {r['database']:,} items: speed-up {r['speedup']}×, "
                          f"identical results: {r['identical']}"])


def memory_table(r: dict) -> str:
    """bench/memory.py: resident memory of a lifelong stage and of a search, each in a fresh process."""
    stage, search = r["stage"], r["search"]
    return "\n".join([
        "| what | its data | RSS before | peak RSS | growth |", "|---|---|---|---|---|",
        f"| lifelong DLCH stage: {stage['new_items']:,} new items onto {stage['database']:,} "
        f"| new batch {stage['new_batch_mb']:.0f} MB, stored codes {stage['store_mb']:.1f} MB "
        f"| {stage['before_mb']:.0f} MB | {stage['peak_mb']:.0f} MB | {stage['peak_mb'] - stage['before_mb']:.0f} MB |",
        f"| search: 1,000 queries, top-100 over the codes | codes {search['codes_mb']:.0f} MB, whole store "
        f"{search['store_mb']:.0f} MB | {search['before_mb']:.0f} MB | {search['peak_mb']:.0f} MB "
        f"| {search['peak_mb'] - search['before_mb']:.0f} MB |"])


def encoder_table(rows: list[dict]) -> str:
    """bench/encoder_throughput.py: rows per second, ONNX Runtime against PyTorch eager."""
    out = ["| encoder | batch | PyTorch eager rows/s | ONNX Runtime rows/s | ORT / PyTorch |", "|---|---|---|---|---|"]
    out += [f"| {r['encoder']} | {r['batch']} | {r['torch_rows_per_s']:,} | {r['onnxruntime_rows_per_s']:,} | "
            f"{r['ratio']:.2f} |" for r in rows]
    return "\n".join(out)


MATRIX_COLUMNS = ("PyTorch eager", "ONNX Runtime, served", "ONNX Runtime, spinning", "append encoding")


def matrix_table(rows: list[dict]) -> str:
    """bench/encoder_throughput.py, ``matrix``: GFLOP/s, and in brackets the share of the matrix
    rate (the same products as the encoder's layers; the 2,048² product for the backbone)."""
    out = ["| encoder | threads | MFLOP a row | same products | 2,048² product | " + " | ".join(MATRIX_COLUMNS) + " |",
           "|---" * (5 + len(MATRIX_COLUMNS)) + "|"]
    for r in rows:
        g, share = r["gflop_per_s"], r["of_matrix_rate"]
        same = f"{g['same products']:.0f}" if "same products" in g else "—"
        cells = [f"{g[c]:.0f} ({share[c]:.2f})" if c in g else "—" for c in MATRIX_COLUMNS]
        out.append(f"| {r['encoder']} | {r['threads']} | {r['mflop_per_row']:g} | {same} | "
                   f"{g['2048² product']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def load_table(r: dict) -> str:
    """bench/serve_load.py: the real service beside a bare FastAPI endpoint, same client and server."""
    rows = ["| endpoint | requests | req/s | p50 ms | p99 ms | server CPU µs / request | client CPU µs / request "
            "| errors |", "|---|---|---|---|---|---|---|---|"]
    for name, label in (("bare", "bare FastAPI (parse body, fixed hits)"), ("service", "lhash serve /search")):
        m = r[name]
        cpu = f"{m['server_cpu_us_per_request']:,.0f} | {m['client_cpu_us_per_request']:,.0f}"
        rows.append(f"| {label} | {m['requests']:,} | {m['requests_per_s']} | {m['p50_ms']} | {m['p99_ms']} "
                    f"| {cpu} | {m['errors']} |")
    out = rows + ["", f"{r['clients']} clients, {r['rounds']} alternating rounds of {r['seconds']:g} s per "
                      f"endpoint (req/s and latencies: medians), {r['database_size']:,} codes; **ratio to "
                      f"bare: {r['ratio_to_bare']:.2f} ± {r['ratio_to_bare_sd']:.2f}** (per round)"]
    slow = r.get("slow_clients")
    if slow:
        out += ["", "| /health | requests | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
        for key, label in (("health_alone", "alone"),
                           ("health_beside_slow", f"beside {slow['connections']} slow-body clients")):
            m = slow[key]
            out.append(f"| {label} | {m['requests']:,} | {m['p50_ms']} | {m['p99_ms']} | {m['errors']} |")
        out += ["", f"Each slow client sends POST headers declaring 100 kB, then one body byte a second, for "
                    f"{slow['seconds']:g} s (the service's request deadline: `serving.request_timeout_seconds`)."]
    return "\n".join(out)


def _pm(stat: dict) -> str:
    return pm((stat["mean"], stat["sd"]), 2)


def wrk_table(r: dict) -> str:
    """bench/serve_load.py, the wrk section: both endpoints saturated by a compiled client, the
    service's own work measured alone, and where the service's time goes (py-spy)."""
    w, work = r["wrk"], r["work"]
    rows = ["| endpoint | requests | req/s | p50 ms | p99 ms | server CPU µs / request | errors |",
            "|---|---|---|---|---|---|---|"]
    for name, label in (("bare", "bare FastAPI (parse body, fixed hits)"), ("service", "lhash serve /search")):
        m = w[name]
        rows.append(f"| {label} | {m['requests']:,} | {m['requests_per_s']:,.0f} | {m['p50_ms']} | {m['p99_ms']} "
                    f"| {m['server_cpu_us_per_request']:,.0f} | {m['errors']} |")
    ratio = w["ratios"]
    cpu, bare_cpu = w["service"]["server_cpu_us_per_request"], w["bare"]["server_cpu_us_per_request"]
    beyond = cpu - work["encode_search_hits_us"] - work["render_us"]
    out = rows + ["", f"wrk, one thread, {w['connections']} connections, {w['rounds']} alternating rounds of "
                      f"{w['seconds']:g} s per endpoint (medians). Service ÷ bare, per round: server CPU a request "
                      f"**{_pm(ratio['server_cpu_us_per_request'])}**, p99 **{_pm(ratio['p99_ms'])}**, "
                      f"req/s {_pm(ratio['requests_per_s'])}.", "",
           f"The service's own work, measured alone in the bench's process (a query in a batch of {work['batch']}, "
           f"as the service batches under this load): encoding {work['encode_us']:g} µs, encoding + top-k + hits "
           f"{work['encode_search_hits_us']:g} µs, the JSON of its hits {work['render_us']:g} µs. Beyond that work "
           f"a request costs the service {beyond:,.0f} µs of CPU: {beyond / bare_cpu:.2f}× the bare endpoint's."]
    spied = r.get("profile")
    if spied:
        out += ["", f"Where the service's samples go (py-spy, {spied['samples']:,} samples during one more round):", "",
                "| layer (innermost frame) | share |", "|---|---|"]
        out += [f"| {name} | {share:.1%} |" for name, share in spied["layers"].items() if share > 0]
        out += ["", "| step (frame and all it calls) | share |", "|---|---|"]
        out += [f"| `{name}` | {share:.1%} |" for name, share in spied["steps"].items()]
    return "\n".join(out)


def photos_tables(r: dict) -> str:
    """bench/photos.py: the pixel path against the shipped features (features, retrieval quality
    per method and rule, paired by seed), the photo encoder's speed, a version folder's size."""
    a = r["agreement"]
    out = [f"{a['rows']:,} photos: the pixel path's features differ from the shipped ones by at most "
           f"{a['max_abs_diff_over_scale']:.1e} of their scale (lowest cosine {a['min_cosine']:.6f}); decode + "
           f"backbone {a['seconds_per_photo'] * 1000:.0f} ms a photo.", "",
           "| method | rule | I→T shipped features | I→T pixel path | pixel − shipped | T→I shipped | T→I pixel "
           "| pixel − shipped |", "|---|---|---|---|---|---|---|---|"]
    rows = r["quality"]
    for method in [m for m in METHODS if any(q["method"] == m for q in rows)]:
        for rule in RULES:
            cells = []
            for d in DIRECTIONS:
                score = {(q["dataset"], q["seed"]): q[d] for q in rows if (q["method"], q["rule"]) == (method, rule)}
                seeds = sorted(s for p, s in score if p == "pixels" and ("shipped", s) in score)
                cells += [pm(mean_sd([score[("shipped", s)] for s in seeds]), 3),
                          pm(mean_sd([score[("pixels", s)] for s in seeds]), 3),
                          pm(mean_sd([score[("pixels", s)] - score[("shipped", s)] for s in seeds]), 4)]
            out.append(f"| {method} | {rule} | " + " | ".join(cells) + " |")
    seeds = len({q["seed"] for q in rows})
    out += ["", f"mean ± sd over {seeds} seed{'s' * (seeds > 1)}; 64 bits, 12 base labels then 4 + 4 + 4.", "",
            "| backbone | I→T | T→I | training s |", "|---|---|---|---|"]
    for variant, label in (("frozen", "frozen (the head on its 512 features)"),
                           ("partial", "last fire module trained too (on fire8's maps)")):
        group = [v for v in r["backbone_variants"] if v["variant"] == variant]
        seconds = mean_sd([v["train_seconds"] for v in group])[0]
        out.append(f"| {label} | {pm(mean_sd([v['i2t'] for v in group]), 3)} | "
                   f"{pm(mean_sd([v['t2i'] for v in group]), 3)} | {seconds:.0f} |")
    out += ["", "Lifelong OrthoHash, 20 base labels then the last 4, the same epochs and head.", "",
            "| batch | PyTorch eager photos/s | ONNX Runtime photos/s | ORT / PyTorch |", "|---|---|---|---|"]
    out += [f"| {s['batch']} | {s['torch_rows_per_s']:,} ({s['torch_threads']} threads) | "
            f"{s['onnxruntime_rows_per_s']:,} ({s['onnxruntime_threads']} thread) | {s['ratio']:.2f} |"
            for s in r["speed"]]
    sizes = r["version_bytes"]
    files = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(sizes.items()) if name != "total")
    out += ["", f"A version folder with the backbone inside: {sizes['total'] / 1e6:.1f} MB ({files})."]
    return "\n".join(out)


def _read(name: str):
    return json.loads((RESULTS / f"{name}.json").read_text())


BLOCKS = {
    "headline": lambda: headline_table(_read("quality"), default_method()),
    "quality-methods": lambda: methods_table(_read("quality")),
    "quality-wikipedia": lambda: quality_tables(_read("quality"), ("wikipedia",)),
    "quality-mirflickr25k": lambda: quality_tables(_read("quality"), ("mirflickr25k",)),
    "quality-synthetic": lambda: quality_tables(_read("quality"), ("synthetic",)),
    "tuning": lambda: tuning_table(_read("tuning")),
    "scaling-synthetic": lambda: scaling_tables(_read("lifelong_scaling")["synthetic"]["results"]),
    "scaling-wikipedia": lambda: scaling_tables(_read("lifelong_scaling")["wikipedia"]["results"]),
    "search-speed": lambda: search_table(_read("search_speed")["rows"]),
    "eval-speed": lambda: eval_table(_read("eval_speed")),
    "memory": lambda: memory_table(_read("memory")),
    "encoder-throughput": lambda: encoder_table(_read("encoder_throughput")["rows"]),
    "encoder-matrix": lambda: matrix_table(_read("encoder_throughput")["matrix"]),
    "serve-load": lambda: load_table(_read("serve_load")),
    "serve-wrk": lambda: wrk_table(_read("serve_load")),
    "run-budget": lambda: budget_table(_read("run_budget")),
    "search-ceiling": lambda: ceiling_table(_read("search_speed")["ceiling"]),
    "search-indexes": lambda: index_table(_read("search_speed")["indexes"]),
    "filters": lambda: filters_table(_read("filters")),
    "arrival": lambda: arrival_table(_read("arrival")),
    "discovery": lambda: discovery_table(_read("discovery")),
    "distributed": lambda: distributed_table(_read("sharded_encoding")),
    "photos": lambda: photos_tables(_read("photos")),
    "scale-summary": lambda: scale_summary(_read("search_speed"), _read("serve_load"), _read("sharded_encoding")),
}


def render(path: Path, text: str) -> str:
    """``text`` with every generated block made anew; an unknown block name is an error."""
    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"{path}: unknown generated block {name!r} (have {sorted(BLOCKS)})")
        return f"{match.group(1)}{BLOCKS[name]()}\n{match.group(4)}"

    return BLOCK.sub(fill, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated block is out of date")
    args = ap.parse_args()
    stale = []
    for path in DOCS:
        current = path.read_text()
        fresh = render(path, current)
        if fresh == current:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(fresh)
    if args.check and stale:
        print(f"out of date: {', '.join(map(str, stale))}: run `python bench/report.py`", file=sys.stderr)
        return 1
    print(("up to date" if not stale else f"rewrote {', '.join(map(str, stale))}") + " (generated from bench/results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
