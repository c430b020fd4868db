"""The scheduled deployment against a real ``prefect server start`` on loopback: a batch dropped
into the incoming folder is picked up by the next scheduled run and promoted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from lifelong_hashing.inference.versions import current_version

from .conftest import PARAMS, ROOT, drop, settings, wait_for

pytestmark = pytest.mark.e2e


def test_scheduled_deployment_picks_up_a_dropped_batch(prefect_api, stage_files, tmp_path):
    url, env = prefect_api
    root = tmp_path / "pipeline"
    overrides = {**settings(root), "pipeline.schedule.interval_seconds": 5}
    args = [f"-S{k}={json.dumps(v)}" for k, v in overrides.items()]
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--params", PARAMS, *args], cwd=ROOT,
                             env={**env, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deployment = wait_for(lambda: _deployment(client), 120, "the served deployment", [serve])
            assert deployment.schedules and deployment.schedules[0].schedule.interval.total_seconds() == 5
            drop(stage_files[0], root)
            models = root / "ws" / "models"
            wait_for(lambda: current_version(models) == "v0001", 300, "the dropped batch to be promoted", [serve])
            ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            runs = client.read_flow_runs(deployment_filter=ours)
            assert any(r.state.is_completed() for r in runs)
        assert not list((root / "incoming").iterdir())
    finally:
        serve.terminate()
        serve.wait(60)
        log.close()


def _deployment(client):
    try:
        return client.read_deployment_by_name("lifelong-hashing-pipeline/scan-incoming")
    except ObjectNotFound:
        return None


def test_serve_without_a_server_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.run([sys.executable, "-m", "flows.serve", "--params", PARAMS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "prefect server start" in proc.stderr and "PREFECT_API_URL" in proc.stderr
