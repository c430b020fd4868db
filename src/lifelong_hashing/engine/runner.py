"""Run a stage sequence (``lhash run``), one stage from a saved state (``lhash stage``), and
several methods on the same stages (``lhash compare``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lifelong_hashing.config import EvalConfig, Params
from lifelong_hashing.engine.batch import Batch, shown
from lifelong_hashing.engine.codestore import CodeStore, CodeStoreError
from lifelong_hashing.engine.datasets import load_dataset
from lifelong_hashing.engine.methods import Method
from lifelong_hashing.engine.methods.base import DatabaseEncoder, encode_here
from lifelong_hashing.engine.metrics import (
    DIRECTIONS,
    average_map,
    backward_transfer,
    forgetting,
    pr_curve,
    query_scores,
    stage_task_matrix,
)
from lifelong_hashing.engine.report import format_table
from lifelong_hashing.engine.requests import deleted_id_hash
from lifelong_hashing.engine.stages import Stage, StagePlan, plan_stages, queries_by_task
from lifelong_hashing.engine.state import (
    TIMING_KEYS,
    RunState,
    load_state,
    new_state,
    runtime_info,
    save_state,
)
from lifelong_hashing.files import write_json, write_text

log = logging.getLogger(__name__)


def build_plan(params: Params) -> StagePlan:
    return plan_stages(load_dataset(params.dataset, params.seed), params.stages, params.seed)


Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, EvalConfig], dict[str, np.ndarray]]


def evaluate_stage(method: Method, store: CodeStore, queries: Batch, groups: list[tuple[str, ...]],
                   params: Params, scorer: Scorer = query_scores) -> dict:
    """Retrieval quality after the stages that introduced ``groups``, both directions: per-task
    mAP (a row of the stage×task matrix) and, over all answerable queries, mAP@all, mAP@R and
    precision@k. ``scorer`` computes the per-query scores (in this process by default)."""
    answerable, task = queries_by_task(queries, groups)
    out = {}
    for direction, d in DIRECTIONS.items():
        q_codes = method.encode(d.query, getattr(answerable, d.query))
        per_query = scorer(q_codes, store.codes[d.database], answerable.labels, store.labels, params.eval)
        ap = per_query["map_all"]
        scores = {
            "map_all": float(np.nanmean(ap)),
            "task_map": [float(np.nanmean(ap[task == j])) for j in range(len(groups))],
            "queries": int(len(answerable)),
            "skipped": {"map_all": int(np.isnan(ap).sum())},  # queries left out of a mean (metrics.py)
        }
        for r in params.eval.map_at:
            ap_r = per_query[f"map_at_{r}"]
            scores[f"map_at_{r}"] = float(np.nanmean(ap_r)) if np.isfinite(ap_r).any() else float("nan")
            scores["skipped"][f"map_at_{r}"] = int(np.isnan(ap_r).sum())
        for k in params.eval.precision_at:
            scores[f"precision_at_{k}"] = float(per_query[f"precision_at_{k}"].mean())
        out[direction] = scores
    return out


def stage_groups(state: RunState) -> list[tuple[str, ...]]:
    """The categories each completed stage introduced, in stage order."""
    return [tuple(record["new_categories"]) for record in state.history]


def learn_stage(state: RunState, stage: Stage, queries: Batch, scorer: Scorer = query_scores,
                encoder: DatabaseEncoder = encode_here) -> dict:
    """Train one stage, evaluate it on ``queries`` and append its record to the state's history
    (what was learned) and its timing to the state's timings (how long it took: kept apart, so
    that the same params give the same state files). Returns both in one dict. ``scorer`` and
    ``encoder`` say where per-query scores and re-encoded database codes are computed."""
    result = vars(state.method.learn(stage, state.store, encoder))
    state.reference.add_stage(stage.batch, stage.index, state.params.monitoring.reference_rows_per_stage,
                              state.params.seed)
    groups = stage_groups(state) + [tuple(stage.new_categories)]
    timing = {"stage": stage.index, **{k: result.pop(k) for k in TIMING_KEYS}}
    record = {**result, "database_size": len(state.store),
              **evaluate_stage(state.method, state.store, queries, groups, state.params, scorer)}
    state.history.append(record)
    state.timings.append(timing)
    log.info("%s stage %d: %d items, database %d, %.1f s training, mAP I→T %.4f, T→I %.4f", state.method.name,
             stage.index, len(stage.batch), len(state.store), timing["train_seconds"], record["i2t"]["map_all"],
             record["t2i"]["map_all"])
    return {**record, **timing}


def append_known(state: RunState, batch: Batch, queries: Batch, scorer: Scorer = query_scores,
                 encoder: DatabaseEncoder = encode_here) -> dict:
    """Encode a batch of known categories with the current encoders (by ``encoder``) and add
    them to the store (no training); the latest stage's evaluation is refreshed to the grown
    database."""
    state.method.append(batch, state.store, encoder)
    record = state.history[-1]
    record.update(evaluate_stage(state.method, state.store, queries, stage_groups(state), state.params, scorer))
    record["database_size"] = len(state.store)
    record["items_appended"] = record.get("items_appended", 0) + len(batch)
    return record


def delete_items(state: RunState, ids, queries: Batch, scorer: Scorer = query_scores) -> dict:
    """Erase items: from the code store, from what the method keeps of them (exemplars, the joint
    baseline's batches), from the reference profile's samples and from the photos kept for export
    parity, then refresh the latest stage's evaluation as an append does. An id deleted before
    and not stored again is skipped (deleting is idempotent: the state keeps a hash of each
    deleted id, never the id); one that was never stored is an error naming it, and nothing
    changes. Returns what went where."""
    ids = np.unique(np.asarray(ids).astype(str))
    stored = np.isin(ids, state.store.ids)
    before = np.array([deleted_id_hash(i) in state.deleted for i in ids], bool)
    unknown = ids[~stored & ~before]
    if unknown.size:
        more = f" and {unknown.size - 5:,} more" if unknown.size > 5 else ""
        raise CodeStoreError(f"ids not in the store: {', '.join(map(shown, unknown[:5].tolist()))}{more}; "
                             "nothing was deleted")
    fresh = ids[stored]
    counts = {"requested": len(ids), "already_deleted": int((~stored).sum()), "deleted": 0}
    if len(fresh):
        counts.update(_take_out(state, fresh))
        state.deleted |= {deleted_id_hash(i) for i in fresh}
        record = state.history[-1]
        record.update(evaluate_stage(state.method, state.store, queries, stage_groups(state), state.params, scorer))
        record["database_size"] = len(state.store)
        record["items_deleted"] = record.get("items_deleted", 0) + counts["deleted"]
    return counts


def remove_for_update(state: RunState, ids) -> int:
    """Take out the stored items among ``ids`` that a batch sends again, so that its new codes
    replace them (``pipeline.repeated_ids: replace``): their codes, memory rows, reference
    samples and photos go, as in a deletion, but they leave no tombstone. How many."""
    present = state.store.ids[state.store.rows_present(np.asarray(ids).astype(str).tolist())]
    return _take_out(state, present)["deleted"] if len(present) else 0


def _take_out(state: RunState, ids: np.ndarray) -> dict:
    """Stored items out of everything that holds them: the code store, what the method keeps of
    them, the reference samples and the parity photos. What went where."""
    return {"deleted": state.store.remove(ids), "memory_rows": state.method.forget(ids),
            "reference_rows": state.reference.remove(ids), "photos": _forget_photos(state, ids)}


def _forget_photos(state: RunState, ids: np.ndarray) -> int:
    """Drop the deleted items' photos from the export-parity sample; a sample saved before photos
    carried ids goes whole (it cannot tell whose they are). How many went."""
    if not state.photos:
        return 0
    erased = set(ids.tolist())
    keep = [i for i, item in enumerate(state.photo_ids) if item not in erased]
    gone = len(state.photos) - len(keep)
    state.photos, state.photo_ids = tuple(state.photos[i] for i in keep), tuple(state.photo_ids[i] for i in keep)
    return gone


def run_stage(state: RunState, plan: StagePlan) -> dict:
    """Train the next stage of a plan."""
    t = state.stage + 1
    if t >= len(plan.stages):
        raise ValueError(f"all {len(plan.stages)} stages are done")
    return learn_stage(state, plan.stages[t], plan.queries)


def history_summary(history: list[dict], timings: list[dict] | None = None) -> dict:
    """What the stage records alone give: the records, and per direction the stage×task matrix
    with its summaries (average mAP, forgetting, backward transfer). No model needed. With
    ``timings`` also the training seconds per stage and in total."""
    summary: dict = {"stages": history}
    for direction in DIRECTIONS:
        matrix = stage_task_matrix(history, direction)
        avg = average_map(matrix)
        forget = forgetting(matrix)
        summary[direction] = {
            "matrix": [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in matrix],
            "average_map": avg.round(6).tolist(),
            "final_average_map": float(avg[-1]),
            "forgetting": forget.round(6).tolist(),
            "mean_forgetting": float(forget.mean()) if len(forget) else 0.0,
            "backward_transfer": backward_transfer(matrix),
        }
    summary["total_codes_rewritten"] = int(sum(r["codes_rewritten"] for r in history))
    if timings is not None:
        summary["timings"] = timings
        summary["total_train_seconds"] = float(sum(t["train_seconds"] for t in timings))
    return summary


def summarize(state: RunState, queries: Batch) -> dict:
    """The metrics.json of a run: the history summary plus the run's identity and the final
    precision–recall curves on ``queries``."""
    history = state.history
    summary = {"method": state.method.name, "dataset": state.params.dataset.name, "bits": state.params.model.bits,
               "device": history[-1]["device"], "runtime": runtime_info(state.params.train.threads),
               **history_summary(history, state.timings)}
    answerable, _ = queries_by_task(queries, stage_groups(state))
    bits = state.params.model.bits
    summary["pr_curve"] = {
        key: pr_curve(state.method.encode(d.query, getattr(answerable, d.query)), state.store.codes[d.database],
                      answerable.labels, state.store.labels, bits)
        for key, d in DIRECTIONS.items()}
    return summary


def stage_table(summary: dict) -> str:
    rows = []
    seconds = {t["stage"]: t["train_seconds"] for t in summary.get("timings", [])}
    for rec in summary["stages"]:
        took = seconds.get(rec["stage"])
        rows.append([rec["stage"], ",".join(rec["new_categories"]), rec["items_added"], rec["database_size"],
                     "" if took is None else f"{took:.1f}", rec["codes_rewritten"],
                     f"{rec['i2t']['map_all']:.4f}", f"{rec['t2i']['map_all']:.4f}"])
    head = ["stage", "new categories", "items", "database", "train s", "rewritten",
            *(f"mAP {d.short}" for d in DIRECTIONS.values())]
    text = format_table(head, rows)
    for key, d in DIRECTIONS.items():
        s = summary[key]
        text += (f"\n{d.short}: final average mAP {s['final_average_map']:.4f}, mean forgetting "
                 f"{s['mean_forgetting']:.4f}, backward transfer {s['backward_transfer']:.4f}")
    return text


def task_map_rows(summary: dict, direction: str) -> list[dict]:
    """One row per (stage, task) of a direction's stage×task matrix: the data of ``dvc plots``."""
    return [{"stage": t, "task": f"task {j}", "map": v}
            for t, row in enumerate(summary[direction]["matrix"]) for j, v in enumerate(row) if v is not None]


def write_outputs(summary: dict, out_dir: Path) -> None:
    """metrics.json (everything but timings: the same params give the same bytes), table.md
    (with training seconds, for people) and plots/map_<direction>.csv (mAP per task across
    stages). The timings themselves are in timings.json, written with the state."""
    metrics = {k: v for k, v in summary.items() if k not in ("timings", "total_train_seconds")}
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "table.md", stage_table(summary) + "\n")
    write_plots(summary, out_dir / "plots")


def write_plots(summary: dict, plots_dir: Path) -> None:
    """``map_<direction>.csv``: mAP per task across stages, what ``dvc plots show`` draws."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    for direction in DIRECTIONS:
        lines = ["stage,task,map"] + [f"{r['stage']},{r['task']},{r['map']:.6f}"
                                      for r in task_map_rows(summary, direction)]
        write_text(plots_dir / f"map_{direction}.csv", "\n".join(lines) + "\n")


def run_sequence(params: Params, out_dir: str | Path, *, quiet: bool = False) -> dict:
    """Every stage in one process, saving the state after each so a crash loses one stage at most."""
    out_dir = Path(out_dir)
    plan = build_plan(params)
    first = plan.stages[0].batch
    state = new_state(params, first.image.shape[1:], first.text.shape[1])
    for _ in tqdm(plan.stages, desc=f"{params.method.name} stages", disable=quiet or None):
        run_stage(state, plan)
        save_state(state, out_dir / "state")
    summary = summarize(state, plan.queries)
    write_outputs(summary, out_dir)
    return summary


def resume_stage(params: Params, state_dir: str | Path) -> dict:
    """Run the next stage from a state directory in this (fresh) process and save it back."""
    state_dir = Path(state_dir)
    plan = build_plan(params)
    if (state_dir / "state.json").exists():
        state = load_state(state_dir)
    else:
        first = plan.stages[0].batch
        state = new_state(params, first.image.shape[1:], first.text.shape[1])
    record = run_stage(state, plan)
    save_state(state, state_dir)
    if state.stage == len(plan.stages) - 1:
        write_outputs(summarize(state, plan.queries), state_dir.parent)
    return record


def compare(params: Params, methods: list[str], out_dir: str | Path, *, quiet: bool = False) -> dict:
    """Each method on the same stages; one row per method."""
    out_dir = Path(out_dir)
    rows, results = [], {}
    for name in methods:
        run_params = params.model_copy(update={"method": params.method.model_copy(update={"name": name})})
        s = run_sequence(run_params, out_dir / name, quiet=quiet)
        results[name] = s
        rows.append([name, f"{s['i2t']['final_average_map']:.4f}", f"{s['t2i']['final_average_map']:.4f}",
                     f"{s['i2t']['mean_forgetting']:.4f}", f"{s['t2i']['mean_forgetting']:.4f}",
                     f"{s['total_train_seconds']:.1f}", s["total_codes_rewritten"]])
    head = ["method", *(f"avg mAP {d.short}" for d in DIRECTIONS.values()),
            *(f"forgetting {d.short}" for d in DIRECTIONS.values()), "train s", "codes rewritten"]
    table = format_table(head, rows)
    write_text(out_dir / "compare.md", table + "\n")
    write_json(out_dir / "compare.json",
               {name: {k: v for k, v in s.items() if k not in ("stages", "pr_curve")} for name, s in results.items()})
    return {"table": table, "results": results}
