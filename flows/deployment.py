"""The pipeline as a Prefect deployment, started in one command against a running Prefect
server: the work pool ``lifelong-hashing`` (process type), ``prefect deploy --all`` of
prefect.yaml (an event trigger and an interval schedule, one run at a time), a worker of the
pool, and the arrival watcher (``flows.watch``) that emits the events.

    make prefect-server                                                     # once, keep it running
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deployment    # make deployment

``--params``/``-S`` reach both the deployment's runs (as its parameters) and the watcher.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from flows.watch import server_configured
from lifelong_hashing.config import ConfigError, add_params_arguments, load_params, parse_overrides

POOL = "lifelong-hashing"
PROJECT = Path(__file__).resolve().parents[1]  # prefect.yaml's folder: where the worker runs flows
PREFECT = [sys.executable, "-m", "prefect"]
WORKER_QUERY_SECONDS = "2"


def deploy(params_path: str, overrides: dict) -> None:
    """Create (or update) the work pool and deploy every deployment of prefect.yaml with these
    parameters; a failure raises with Prefect's own message."""
    for args in (["work-pool", "create", POOL, "--type", "process", "--overwrite"],
                 ["--no-prompt", "deploy", "--all", "--params",
                  json.dumps({"params_path": str(Path(params_path).resolve()), "overrides": overrides})]):
        proc = subprocess.run([*PREFECT, *args], cwd=PROJECT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"prefect {' '.join(args[:3])} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")


def start(params_args: list[str], log=None) -> list[subprocess.Popen]:
    """A worker of the pool and the arrival watcher, as child processes. The worker asks for
    runs every ``WORKER_QUERY_SECONDS`` (Prefect's default, 10 s, would be most of the wait)."""
    out = {"stdout": log, "stderr": subprocess.STDOUT} if log else {}
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS",
                                                                        WORKER_QUERY_SECONDS)}
    return [subprocess.Popen([*PREFECT, "worker", "start", "--pool", POOL], cwd=PROJECT, env=env, **out),
            subprocess.Popen([sys.executable, "-m", "flows.watch", *params_args], cwd=PROJECT, env=env, **out)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        load_params(args.params, overrides)  # a bad params file fails here, not in every run
    except ConfigError as err:
        print(f"flows.deployment: error: {err}", file=sys.stderr)
        return 2
    if not server_configured("flows.deployment"):
        return 2
    try:
        deploy(args.params, overrides)
    except RuntimeError as err:
        print(f"flows.deployment: error: {err}", file=sys.stderr)
        return 1
    procs = start(["--params", str(Path(args.params).resolve()), *(f"-S{s}" for s in args.set or [])])
    signal.signal(signal.SIGTERM, lambda *_: stop(procs))
    print(f"deployed prefect.yaml to {PREFECT_API_URL.value()}; worker (pool {POOL}) and watcher running "
          f"(pids {', '.join(str(p.pid) for p in procs)}); Ctrl-C stops both", flush=True)
    try:
        os.wait()  # until either child stops
    except (KeyboardInterrupt, ChildProcessError):
        pass
    finally:
        stop(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
