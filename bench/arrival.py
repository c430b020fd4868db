"""Seconds from a batch's arrival (renamed into the incoming folder, as an upload finishes) to its
version answering on a running ``lhash serve``, through the deployment of prefect.yaml on a real
Prefect server and worker (``flows.deployment``), with the product's default params on the real
Wikipedia data. Two ways to start a run, measured side by side in one run:

- **event**: the arrival watcher emits an event, and the deployment's trigger (debounced) runs it;
- **schedule**: no watcher; only the deployment's interval schedule (prefect.yaml) finds the file,
  as the deployment did before the trigger. A file arrives at a uniformly random moment of the
  interval (seeded), so its wait is what an arrival meets on average.

Each arrival is an append of known categories (encode, export, monitor, version, promote; no
training). Per arrival: the seconds until the flow run started (the wait), the run's own seconds
(the work), and until the service answered with the new version. Writes
bench/results/arrival.json.

    python bench/arrival.py [--files 3] [--seed 0]
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, known_appends, start_prefect_server, utc, wait_healthy, write_result  # noqa: E402

sys.path.insert(0, str(ROOT))
from flows import deployment as deploying  # noqa: E402

APPEND_ROWS = 200


def arrive(src: Path, incoming: Path) -> float:
    partial = incoming / f".{src.name}.part"
    shutil.copyfile(src, partial)
    os.replace(partial, incoming / src.name)
    return time.time()


def served(service: str) -> str | None:
    try:
        return httpx.get(service + "/health", timeout=2).json().get("model_version")
    except httpx.HTTPError:
        return None


def wait_for_version(service: str, version: str, timeout: float = 1200) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if served(service) == version:
            return time.time()
        time.sleep(0.2)
    sys.exit(f"{version} was not served within {timeout:.0f} s")


def run_of(client, after: float) -> tuple[float, float]:
    """(start, end) of the first completed run of the deployment that started after ``after``."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime
    from prefect.client.schemas.sorting import FlowRunSort

    from_time = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=utc(after)))
    for run in client.read_flow_runs(flow_run_filter=from_time, sort=FlowRunSort.START_TIME_ASC):
        if run.state.is_completed() and run.start_time.timestamp() >= after:
            return run.start_time.timestamp(), run.end_time.timestamp()
    sys.exit("no completed run found")


def measure(files: list[Path], incoming: Path, service: str, first: int, client, phase=None) -> list[dict]:
    rows = []
    for i, src in enumerate(files):
        if phase is not None:
            time.sleep(phase())
        arrived = arrive(src, incoming)
        answered = wait_for_version(service, f"v{first + i:04d}")
        start, end = run_of(client, arrived)
        rows.append({"file": src.name, "to_served": answered - arrived, "wait": start - arrived, "work": end - start})
        print(f"  {src.name}: served after {answered - arrived:.1f} s (wait {start - arrived:.1f}, "
              f"run {end - start:.1f})", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {"arrivals": rows}
    for key in ("to_served", "wait", "work"):
        values = [r[key] for r in rows]
        out[key] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "max": max(values)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    deployment = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]
    interval = deployment["schedules"][0]["interval"]
    trigger = deployment["triggers"][0]
    work = Path(tempfile.mkdtemp(prefix="lhash-arrival-"))
    base, appends = known_appends(work, 2 * args.files, APPEND_ROWS, "arrival")
    (work / "prefect").mkdir()
    server, url = start_prefect_server(work / "prefect")
    os.environ.update({"PREFECT_API_URL": url, "PREFECT_HOME": str(work / "prefect")})
    root = work / "pipeline"
    overrides = {"pipeline.workspace": str(root / "ws"), "pipeline.remote": str(root / "remote"),
                 "pipeline.incoming": str(root / "incoming"), "pipeline.quarantine": str(root / "quarantine"),
                 "pipeline.deletions": str(root / "deletions"), "pipeline.discovery.ask": False,
                 "dataset.path": str(ROOT / "data/wikipedia/wikipedia.npz")}
    params_args = ["--params", str(ROOT / "params.yaml"), *(f"-S{k}={v}" for k, v in overrides.items())]
    (root / "incoming").mkdir(parents=True)
    procs, service_proc = [], None
    try:
        deploying.deploy(str(ROOT / "params.yaml"), overrides)
        log = open(work / "deployment.log", "w")
        procs = deploying.start(params_args, log)
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # Prefect read its settings when flows.deployment imported it, before this server existed
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            time.sleep(5)  # the watcher's observer
            arrive(base, root / "incoming")
            models = root / "ws" / "models"
            while not (models / "CURRENT").exists():
                time.sleep(0.5)
            port = free_port()
            service_proc = subprocess.Popen(
                [sys.executable, "-m", "lifelong_hashing.cli", "--params", str(ROOT / "params.yaml"), "serve",
                 "--models", str(models), "--port", str(port)], stdout=open(work / "serve.log", "w"),
                stderr=subprocess.STDOUT, cwd=ROOT)
            service = wait_healthy(service_proc, f"http://127.0.0.1:{port}", work / "serve.log")
            print("event trigger:", flush=True)
            event = measure(appends[: args.files], root / "incoming", service, 2, client)
            procs[1].terminate()  # the watcher: from now on only the schedule starts runs
            procs[1].wait(30)
            print(f"interval schedule ({interval} s):", flush=True)
            rng = random.Random(args.seed)
            schedule = measure(appends[args.files:], root / "incoming", service, 2 + args.files, client,
                               phase=lambda: rng.uniform(0, interval))
    finally:
        deploying.stop([*procs, *([service_proc] if service_proc else []), server])  # kills what will not stop
    result = {"what": "seconds from a batch's rename into incoming/ to its version answering on lhash serve",
              "data": "Wikipedia (real), default params; each arrival an append of "
                      f"{APPEND_ROWS} known items (no training)",
              "interval_seconds": interval, "debounce_seconds": trigger["within"],
              "worker_query_seconds": float(deploying.WORKER_QUERY_SECONDS), "seed": args.seed,
              "event": summary(event), "schedule": summary(schedule)}
    print(f"wrote {write_result('arrival', result)}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
