"""The deployment of prefect.yaml against a real ``prefect server start`` on loopback, with a real
worker and the arrival watcher (``flows.deployment``): a batch renamed into the incoming folder
starts a run through the event trigger, a burst of arrivals is taken by one run, a partial upload
starts nothing, and the deployment runs one at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import deployment as deploying
from lifelong_hashing.inference.versions import current_version

from .conftest import PARAMS, ROOT, settings, wait_for

pytestmark = pytest.mark.e2e


def arrive(src: Path, incoming: Path, name: str) -> None:
    """An upload that finishes the recommended way: written under a hidden name, then renamed."""
    incoming.mkdir(parents=True, exist_ok=True)
    partial = incoming / f".{name}.part"
    partial.write_bytes(src.read_bytes())
    os.replace(partial, incoming / name)


def test_an_arrival_starts_the_deployment_and_a_burst_takes_one_run(prefect_api, stage_files, tmp_path, monkeypatch):
    url, env = prefect_api
    root = tmp_path / "pipeline"
    overrides = settings(root)
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the deploy commands, the worker and the watcher reach the server
    deploying.deploy(PARAMS, overrides)
    log = open(tmp_path / "deployment.log", "w")
    procs = deploying.start(["--params", PARAMS, *(f"-S{k}={json.dumps(v)}" for k, v in overrides.items())], log)
    incoming, models = root / "incoming", root / "ws" / "models"
    try:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            found = client.read_deployment_by_name("lifelong-hashing-pipeline/scan-incoming")
            assert found.global_concurrency_limit.limit == 1 and found.work_pool_name == deploying.POOL
            assert found.concurrency_options.collision_strategy == "ENQUEUE"
            assert [s.schedule.interval.total_seconds() for s in found.schedules] == [300]
            wait_for(lambda: "watching" in (tmp_path / "deployment.log").read_text(), 120, "the watcher", procs)

            (incoming / ".still-uploading.npz").parent.mkdir(parents=True, exist_ok=True)
            (incoming / ".still-uploading.npz").write_bytes(b"partial")  # never renamed: starts nothing
            arrive(stage_files[0], incoming, "stage-0.npz")
            wait_for(lambda: _current(models) == "v0001", 300, "the arrival to be served", procs)

            arrive(stage_files[1], incoming, "stage-1.npz")  # a burst: one run takes both
            arrive(stage_files[2], incoming, "stage-2.npz")
            wait_for(lambda: _current(models) == "v0003", 300, "the burst to be served", procs)
            ours = DeploymentFilter(id=DeploymentFilterId(any_=[found.id]))

            def triggered_runs_done():  # a run serves its version, then publishes its artifacts
                runs = client.read_flow_runs(deployment_filter=ours)
                triggered = [r for r in runs if r.created_by and r.created_by.type == "AUTOMATION"]
                return (runs, triggered) if all(r.state.is_final() for r in triggered) else None

            runs, triggered = wait_for(triggered_runs_done, 120, "the triggered runs to finish", procs)
            assert all(r.state.is_completed() for r in triggered), [r.state for r in triggered]
            assert len(triggered) == 2, [(r.name, r.created_by) for r in runs]  # one for the first, one for the burst
            assert not any(r.auto_scheduled and r.state.is_completed() for r in runs)  # the schedule did not do it
        assert sorted(p.name for p in incoming.iterdir()) == [".still-uploading.npz"]
    finally:
        deploying.stop(procs)
        log.close()


def _current(models: Path) -> str | None:
    return current_version(models) if models.exists() else None


def test_the_watcher_and_the_deployment_without_a_server_say_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    for module in ("flows.watch", "flows.deployment"):
        proc = subprocess.run([sys.executable, "-m", module, "--params", PARAMS], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "prefect server start" in proc.stderr and "PREFECT_API_URL" in proc.stderr
