"""The benchmark that decides the default method: every method on every embedded dataset and on
the synthetic generator, two class orders, 32 and 64 bits, 3 seeds, each under
both storing rules (``method.database_codes``) and in two catalogues.

    python bench/quality.py            # the full grid (hours on 2 CPU cores)
    python bench/quality.py --small    # 3 epochs, 32 bits, one order: minutes

Like for like: every method is scored under each storing rule (``labels``: a labelled item
stores the code its labels give; ``encoders``: its encoders' codes), so a ratio to joint
compares lifelong learning, not storing rules; the ceiling of a direction is the stronger of
joint's rules. Catalogues: ``labelled`` (every item comes labelled) and ``mixed`` (half of each
stage's items arrive unlabelled: never trained on, stored with encoder codes, their labels used
only to score). A method whose training never reads the stored codes (``reads_stored_codes``)
is trained once and scored under both rules; DLCH is trained once per rule.

Writes ``bench/results/quality[_small].json``: a list of rows {dataset, order, bits, catalogue,
rule, method, seed, i2t, t2i, train_seconds, codes_rewritten, ...} (i2t / t2i: final average mAP
on the test queries; each row also keeps the average mAP after every stage; ``make docs`` makes
the tables of docs/benchmarks.md from it), prints mean ± sd tables, and draws one figure per
dataset (``quality_<dataset>.png``). mirflickr25k's image side is real (SqueezeNet features of
the photos, data/mirflickr25k/README.md); all of the synthetic data is SYNTHETIC.

Seeds change everything a run draws: initial weights, shuffles, memory, the query split of the
datasets without an official one (mirflickr25k, synthetic), the synthetic data itself, the class
order ``b`` and which items arrive unlabelled. The settings were chosen on a validation split of
the training side with other seeds (bench/tune.py), never on these test queries. A difference
smaller than the seeds' spread is not a ranking.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, lifelong_epochs_for, write_result  # noqa: E402
from report import quality_tables  # noqa: E402

from lifelong_hashing.config import EMBEDDED_DATASETS, METHOD_NAMES, Params, load_params  # noqa: E402
from lifelong_hashing.engine.codestore import CodeStore  # noqa: E402
from lifelong_hashing.engine.datasets import load_dataset  # noqa: E402
from lifelong_hashing.engine.methods import METHODS  # noqa: E402
from lifelong_hashing.engine.runner import (  # noqa: E402
    build_plan,
    evaluate_stage,
    history_summary,
    learn_stage,
    stage_groups,
)
from lifelong_hashing.engine.state import new_state  # noqa: E402


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
    # 12 base labels, then 4 + 4 + 4; items go to the stage of their newest label
    "mirflickr25k": Case(EMBEDDED_DATASETS["mirflickr25k"], base=12, per_stage=4, epochs=10),
    # SYNTHETIC multi-label: 24 categories, 8 base then 4 + 4 + 4 + 4 (bench/lifelong_scaling.py
    # runs the long sequence: 12 stages to 200,000 items)
    "synthetic": Case({"kind": "synthetic", "name": "synthetic", "n_items": 24_000, "n_categories": 24,
                       "image_dim": 128, "text_dim": 300, "noise": 0.8, "query_size": 2000},
                      base=8, per_stage=4, epochs=10),
}
ORDERS = ("a", "b")  # a: the dataset's own category order; b: a seeded permutation of it
RULES = ("labels", "encoders")
CATALOGUES = {"labelled": 0.0, "mixed": 0.5}  # share of each stage's items that arrive unlabelled


def case_params(case: Case, order: str, bits: int, method: str, seed: int, epochs: int,
                unlabelled_share: float = 0.0, queries: str = "test", overrides: dict | None = None) -> Params:
    """params.yaml with the case's data, stages and epochs; lifelong stages keep params.yaml's
    ratio of lifelong to base epochs. ``queries``: ``test``, or ``validation`` for tuning;
    ``overrides``: dotted params keys, as ``-S`` takes them (a tuning variant)."""
    params = load_params(ROOT / "params.yaml", {
        "seed": seed, "dataset": {**case.dataset, "queries": queries}, "model.bits": bits, "method.name": method,
        "train.epochs": epochs, "train.lifelong_epochs": lifelong_epochs_for(epochs),
        "stages": {"base": case.base, "per_stage": case.per_stage, "unlabelled_share": unlabelled_share},
        "eval": {"map_at": [], "precision_at": []}, **(overrides or {})})
    if order == "b":
        names = list(load_dataset(params.dataset, seed).database.categories)
        permuted = [names[i] for i in np.random.default_rng([seed, 1]).permutation(len(names))]
        params = params.model_copy(update={"stages": params.stages.model_copy(update={"order": permuted})})
    return params


def with_rule(params: Params, rule: str) -> Params:
    return params.model_copy(update={"method": params.method.model_copy(update={"database_codes": rule})})


def run_rules(params: Params, rules: tuple[str, ...]) -> dict[str, dict]:
    """One training of ``params``' method, scored under each storing rule: the first rule's store
    is the run's own; each other rule gets a store that the same encoders write after every
    stage. Only for a method whose training never reads the stored codes."""
    params = with_rule(params, rules[0])
    plan = build_plan(params)
    first = plan.stages[0].batch
    state = new_state(params, first.image.shape[1:], first.text.shape[1])
    stores = {rule: CodeStore(params.model.bits) for rule in rules[1:]}
    histories: dict[str, list[dict]] = {rule: [] for rule in rules[1:]}
    for stage in plan.stages:
        learn_stage(state, stage, plan.queries)
        for rule, store in stores.items():
            before = {m: c.copy() for m, c in store.codes.items()}
            state.method.write_codes(stage, store, rule)
            state.method.rewrite_codes(store, lambda method, batch, rule=rule: method.database_codes(batch, rule))
            scores = evaluate_stage(state.method, store, plan.queries, stage_groups(state), params)
            histories[rule].append({**state.history[-1], **scores, "codes_rewritten": store.rows_changed(before),
                                    "database_size": len(store)})
    return {rules[0]: history_summary(state.history, state.timings),
            **{rule: history_summary(h, state.timings) for rule, h in histories.items()}}


def summaries_by_rule(params: Params, rules: tuple[str, ...]) -> dict[str, dict]:
    """Each rule's run summary for one method and setting: one training scored under every rule,
    or one training per rule for a method whose training reads the stored codes."""
    if METHODS[params.method.name].reads_stored_codes:
        return {rule: run_rules(params, (rule,))[rule] for rule in rules}
    return run_rules(params, rules)


def run_case(params: Params, rules: tuple[str, ...]) -> dict[str, dict]:
    """Each rule's result row for one method and setting."""
    return {rule: result_row(s) for rule, s in summaries_by_rule(params, rules).items()}


def result_row(s: dict) -> dict:
    return {"i2t": round(s["i2t"]["final_average_map"], 5), "t2i": round(s["t2i"]["final_average_map"], 5),
            "train_seconds": round(s["total_train_seconds"], 2), "codes_rewritten": s["total_codes_rewritten"],
            "stages": len(s["stages"]), "database_size": s["stages"][-1]["database_size"],
            "average_map_i2t": [round(v, 5) for v in s["i2t"]["average_map"]],
            "average_map_t2i": [round(v, 5) for v in s["t2i"]["average_map"]]}


KEY = ("dataset", "order", "bits", "catalogue", "rule", "method", "seed", "epochs", "lifelong_epochs")


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def figures(rows: list[dict], suffix: str) -> list[Path]:
    """One PNG per dataset: average mAP after each stage (mean over seeds), one line per method
    and storing rule (solid: labels, dashed: encoders), a panel per direction; the labelled
    catalogue, order a, the dataset's longest codes."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset in [d for d in CASES if any(r["dataset"] == d for r in rows)]:
        group = [r for r in rows if r["dataset"] == dataset and r["catalogue"] == "labelled" and r["order"] == "a"]
        if not group:
            continue
        bits = max(r["bits"] for r in group)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
        for ax, direction, title in ((axes[0], "i2t", "image → text"), (axes[1], "t2i", "text → image")):
            for color, method in zip(plt.cm.tab10.colors, METHOD_NAMES, strict=False):
                for style, rule in zip(("-", "--"), RULES, strict=True):
                    curves = [r[f"average_map_{direction}"] for r in group
                              if (r["method"], r["rule"], r["bits"]) == (method, rule, bits)]
                    if curves:
                        mean = np.mean(np.array(curves), axis=0)
                        ax.plot(range(len(mean)), mean, style, color=color, marker="o", markersize=3,
                                label=f"{method} ({rule})")
            ax.set_title(title)
            ax.set_xlabel("stage")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel("average mAP over the tasks so far")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        note = {"mirflickr25k": " (real SqueezeNet image features)", "synthetic": " (SYNTHETIC)"}.get(dataset, "")
        fig.suptitle(f"{dataset}{note}, order a, {bits} bits: average mAP after each stage, mean over seeds")
        fig.tight_layout()
        path = RESULTS / f"quality_{dataset}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Job:
    """One method in one setting: trained once (or once per rule), a result row per rule."""

    dataset: str
    case: Case
    order: str
    bits: int
    catalogue: str
    seed: int
    method: str
    epochs: int
    threads: int
    queries: str = "test"  # bench/tune.py: "validation"
    overrides: tuple[tuple[str, object], ...] = ()  # bench/tune.py: the variant's params

    def params(self) -> Params:
        params = case_params(self.case, self.order, self.bits, self.method, self.seed, self.epochs,
                             CATALOGUES[self.catalogue], self.queries, dict(self.overrides))
        return params.model_copy(update={"train": params.train.model_copy(update={"threads": self.threads})})

    def rows(self, rules: tuple[str, ...]) -> list[dict]:
        params = self.params()
        head = {"dataset": self.dataset, "order": self.order, "bits": self.bits, "catalogue": self.catalogue,
                "method": self.method, "seed": self.seed, "epochs": params.train.epochs,
                "lifelong_epochs": params.train.lifelong_epochs, "queries": params.dataset.queries,
                "query_ids_sha256": query_ids_sha256(params)}
        return [{**head, "rule": rule, **row} for rule, row in run_case(params, rules).items()]


def query_ids_sha256(params: Params) -> str:
    """The fingerprint of the queries a run is scored on: their ids, sorted, one per line."""
    ids = sorted(load_dataset(params.dataset, params.seed).queries.ids.tolist())
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def jobs_of(args) -> list[Job]:
    orders = args.orders or (["a"] if args.small else list(ORDERS))
    threads = 1 if args.jobs > 1 else load_params(ROOT / "params.yaml").train.threads
    jobs = []
    for dataset in args.datasets:
        case = CASES[dataset]
        if args.small and dataset == "synthetic":
            case = Case({**case.dataset, "n_items": 12_000}, case.base, case.per_stage, case.epochs)
        for order in orders:
            for bits in args.bits or ([32] if args.small else case.bits):
                for catalogue in args.catalogues:
                    for seed in range(args.seeds):
                        jobs += [Job(dataset, case, order, bits, catalogue, seed, method,
                                     args.epochs or (3 if args.small else case.epochs), threads)
                                 for method in args.methods]
    return jobs


def _run_job(job: Job, rules: tuple[str, ...]) -> list[dict]:
    return job.rows(rules)


def run_jobs(jobs: list[Job], rules: tuple[str, ...], workers: int):
    """(index of the job, its rows) as the jobs finish, ``workers`` side by side (each at one
    thread when more than one: several 2-thread processes on 2 cores ran 10–70× slower)."""
    if workers > 1:
        os.environ.update(dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"), "1"))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_job, job, rules): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            yield futures[future], future.result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="3 epochs, 32 bits, order a, 12k synthetic items")
    ap.add_argument("--datasets", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(METHOD_NAMES))
    ap.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    ap.add_argument("--catalogues", nargs="+", choices=list(CATALOGUES), default=list(CATALOGUES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bits", nargs="+", type=int, help="default: 32 64 (--small: 32)")
    ap.add_argument("--orders", nargs="+", choices=ORDERS, help="default: a b (--small: a)")
    ap.add_argument("--epochs", type=int, help="override every dataset's epochs (--small: 3)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, each at one thread (one per core)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the results file and "
                                                           "measure only the missing ones")
    args = ap.parse_args()
    name = "quality_small" if args.small else "quality"
    path = RESULTS / f"{name}.json"
    rows: list[dict] = json.loads(path.read_text()) if args.resume and path.exists() else []
    done = {row_key(r) for r in rows}
    rules = tuple(args.rules)
    todo = [job for job in jobs_of(args)
            if any(row_key({**vars(job), "rule": rule, "lifelong_epochs": lifelong_epochs_for(job.epochs)})
                   not in done for rule in rules)]
    started = time.perf_counter()
    for _, measured in run_jobs(todo, rules, args.jobs):
        for row in measured:
            rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
            print(f"[{time.perf_counter() - started:7.0f} s] {row['dataset']} {row['order']} {row['bits']} bits "
                  f"{row['catalogue']} seed {row['seed']} {row['method']} ({row['rule']}): I→T {row['i2t']:.4f} "
                  f"T→I {row['t2i']:.4f} {row['train_seconds']:.1f} s", file=sys.stderr, flush=True)
        write_result(name, sorted(rows, key=row_order))  # a long run keeps what it has measured
    print(quality_tables(rows))
    for path in figures(rows, "_small" if args.small else ""):
        print(f"figure: {path.relative_to(ROOT)}")
    print(f"rows: {(RESULTS / f'{name}.json').relative_to(ROOT)} ({len(rows)})")


def row_order(row: dict) -> tuple:
    return (list(CASES).index(row["dataset"]), row["order"], row["bits"], row["catalogue"], row["rule"],
            METHOD_NAMES.index(row["method"]), row["seed"])


if __name__ == "__main__":
    main()
