"""Where a pipeline run's seconds go, for an append batch of 500 known items on the product's
default params and the real Wikipedia data: each step of the flow (scan, validate, train,
export, monitor, version, promote) as the Prefect server recorded it, the time between the steps
(the flow's own work: the lock, recovery checks, the serving pointer, artifacts), and what the
process spends before its flow run starts (imports, settings, connecting to the server) and
after it ends. ``flows.pipeline`` runs as a user runs it (``make pipeline``), once for the base
stage and then once per append, against a real ``prefect server start``; the appends are
measured. Writes bench/results/run_budget.json.

    python bench/run_budget.py [--appends 3] [--rows 500]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, known_appends, start_prefect_server, utc, write_result  # noqa: E402
from report import budget_table  # noqa: E402


def run_flow(args: list[str], env: dict, log: Path) -> tuple[float, float]:
    """One ``python -m flows.pipeline`` to its exit: (start, end) wall times."""
    start = time.time()
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-m", "flows.pipeline", *args], env=env, cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"the pipeline run failed; see {log}")
    return start, time.time()


def budget(client, started: float, ended: float) -> dict:
    """The seconds of the flow run that started after ``started``: before it, each step, between
    the steps, after it."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterStartTime


    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=utc(started))))
    run = min(runs, key=lambda r: r.start_time)
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    steps: dict[str, float] = {}
    for task in tasks:
        if task.start_time and task.end_time:
            name = task.name.rsplit("-", 1)[0]
            steps[name] = steps.get(name, 0.0) + (task.end_time - task.start_time).total_seconds()
    flow = (run.end_time - run.start_time).total_seconds()
    return {"process": ended - started, "before_flow": run.start_time.timestamp() - started,
            "steps": steps, "between_steps": flow - sum(steps.values()),
            "after_flow": ended - run.end_time.timestamp()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--appends", type=int, default=3)
    parser.add_argument("--rows", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lhash-budget-"))
    base, batches = known_appends(work, args.appends, args.rows, "append")
    (work / "prefect").mkdir()
    server, url = start_prefect_server(work / "prefect")
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(work / "prefect")}
    root = work / "pipeline"
    overrides = {"pipeline.workspace": root / "ws", "pipeline.remote": root / "remote",
                 "pipeline.incoming": root / "incoming", "pipeline.quarantine": root / "quarantine",
                 "pipeline.deletions": root / "deletions", "pipeline.discovery.ask": False,
                 "dataset.path": ROOT / "data/wikipedia/wikipedia.npz"}
    flow_args = ["--params", str(ROOT / "params.yaml"), *(f"-S{k}={v}" for k, v in overrides.items())]
    (root / "incoming").mkdir(parents=True)
    rows = []
    try:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.replace(base, root / "incoming" / base.name)
        run_flow(flow_args, env, work / "runs.log")
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            for batch in batches:
                os.replace(batch, root / "incoming" / batch.name)
                started, ended = run_flow(flow_args, env, work / "runs.log")
                rows.append(budget(client, started, ended))
                print(f"  {batch.name}: {rows[-1]['process']:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    result = {"data": f"Wikipedia (real), default params; each run an append of {args.rows} known items",
              "runs": rows, "summary": summarize(rows)}
    print(budget_table(result))
    print(f"wrote {write_result('run_budget', result)}")
    return 0


def summarize(rows: list[dict]) -> dict:
    """Mean and sd over the runs of every part of the budget."""
    parts = {"process": [r["process"] for r in rows], "before_flow": [r["before_flow"] for r in rows],
             "between_steps": [r["between_steps"] for r in rows], "after_flow": [r["after_flow"] for r in rows]}
    for name in rows[0]["steps"]:
        parts[f"step: {name}"] = [r["steps"].get(name, 0.0) for r in rows]
    return {name: {"mean": round(statistics.mean(v), 2), "sd": round(statistics.stdev(v), 2) if len(v) > 1 else 0.0}
            for name, v in parts.items()}


if __name__ == "__main__":
    sys.exit(main())
