"""Shared fixtures: small real computations (synthetic data, few epochs) so the suite stays fast."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lifelong_hashing.config import Params, load_params
from lifelong_hashing.engine.batch import save_batch
from lifelong_hashing.engine.runner import build_plan

ROOT = Path(__file__).resolve().parents[1]
WIKIPEDIA = ROOT / "data" / "wikipedia" / "wikipedia.npz"
PARAMS = str(ROOT / "params.yaml")


def small_params(method: str = "dlch", **overrides) -> Params:
    """Synthetic multi-label data, 3 stages, tiny networks and few epochs."""
    raw = {
        "seed": 0,
        "dataset": {"kind": "synthetic", "name": "synthetic", "n_items": 900, "n_categories": 8,
                    "image_dim": 24, "text_dim": 40, "noise": 0.3, "query_size": 150},
        "stages": {"base": 4, "per_stage": 2},
        "model": {"bits": 32, "hidden": [64], "dropout": 0.0},
        "train": {"epochs": 12, "lifelong_epochs": 8, "batch_size": 64, "device": "cpu"},
        "method": {"name": method, "memory_per_category": 10, "dlch": {"old_sample": 200},
                   "ccmh_gam": {"label_epochs": 60}},
        "eval": {"map_at": [50], "precision_at": [10]},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return Params.model_validate(raw)


@pytest.fixture
def params_factory():
    return small_params


# ---- the operational pipeline (test_pipeline, test_deployment) ------------------------------
@pytest.fixture(scope="session")
def stage_files(tmp_path_factory):
    """The four Wikipedia stage batches as files, as a sender would drop them."""
    out = tmp_path_factory.mktemp("stages")
    plan = build_plan(load_params(PARAMS, {"dataset.path": str(WIKIPEDIA)}))
    return [save_batch(s.batch, out / f"wikipedia-stage-{s.index}.npz") for s in plan.stages]


def settings(root: Path, **extra) -> dict:
    """Params overrides for a pipeline under `root`: Wikipedia, 1 epoch, small networks."""
    return {"dataset.path": str(WIKIPEDIA), "train.epochs": 1, "train.lifelong_epochs": 1, "train.device": "cpu",
            "model.hidden": [128], "export.int8_min_agreement": None,
            "pipeline.workspace": str(root / "ws"), "pipeline.remote": str(root / "remote"),
            "pipeline.incoming": str(root / "incoming"), "pipeline.quarantine": str(root / "quarantine"),
            "pipeline.deletions": str(root / "deletions"),
            "pipeline.discovery.ask": False,  # tests that answer proposals ask for it (test_discovery)
            "validation.reports_dir": str(root / "scratch"), "monitoring.reports_dir": str(root / "scratch"),
            "monitoring.workspace": str(root / "scratch"), **extra}


def drop(src: Path, root: Path, name: str | None = None) -> Path:
    """Put a batch file into the incoming folder of the pipeline under `root`."""
    incoming = root / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(src, incoming / (name or src.name)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(wiki: dict, models: Path, name: str, serving: dict | None = None, env: dict | None = None):
    """``lhash serve`` of ``models`` in its own process on a free loopback port, with the params
    of ``wiki`` ({"params", "root"}) and ``serving`` overrides; yields (url, process). Its log
    goes to a file (a full pipe would stall it)."""
    import httpx
    import yaml

    port = free_port()
    params = wiki["params"].model_copy(update={
        "serving": wiki["params"].serving.model_copy(update=serving or {}),
        "pipeline": wiki["params"].pipeline.model_copy(update={"deletions": str(wiki["root"] / f"deletions-{name}")})})
    params_file = wiki["root"] / f"params-{name}.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump()))
    command = [sys.executable, "-m", "lifelong_hashing.cli", "--params", str(params_file), "serve",
               "--models", str(models), "--port", str(port)]
    log_path = wiki["root"] / f"serve-{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            proc.kill()
            pytest.fail("service did not start: " + log_path.read_text())
        try:
            yield url, proc
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def wait_for(check, timeout: float, what: str, procs=()):
    """``check()``'s first truthy value, polled each second; fails when a process in ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: {proc.args[:4]} exited with {proc.returncode}")
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real ``prefect server start`` on loopback for the session (schedules need a real one;
    in-process flow runs use it too): its API URL and the environment that reaches it."""
    import httpx

    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    url = f"http://127.0.0.1:{port}/api"

    def healthy():
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(healthy, 180, "the Prefect server", [proc])
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="session")
def prefect_harness(prefect_api):
    """In-process flow runs of the session report to the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api[0]}):
        yield


def thread_in_context(target, *args) -> threading.Thread:
    """A thread running ``target`` in a copy of this thread's context. The session's Prefect
    settings are a context variable, which a plain thread does not inherit: a flow run there
    would start a temporary server of its own (15 s) and report to it."""
    return threading.Thread(target=contextvars.copy_context().run, args=(target, *args))


def run(root: Path, **extra):
    """One run of the pipeline flow on the pipeline under ``root``; its final Prefect state."""
    from flows.pipeline import process_incoming

    return process_incoming(PARAMS, settings(root, **extra), return_state=True)


def two_runs_at_once(root: Path) -> list:
    """Two runs of the pipeline flow under ``root`` started together; their final states."""
    states = [None, None]

    def go(i):
        states[i] = run(root)

    threads = [thread_in_context(go, i) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s.is_completed() for s in states), [s.message for s in states]
    return states


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def serving_pipeline(root: Path, **extra):
    """``lhash serve`` of the models of the pipeline under ``root`` (its params: ``settings``),
    in its own process on a free loopback port, once healthy; yields its URL."""
    from lifelong_hashing.operations.registry import Registry

    models = Registry(root / "ws", str(root / "remote")).models_dir
    port = free_port()
    argv = [f"-S{k}={json.dumps(v)}" for k, v in settings(root, **extra).items()]
    with open(root / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lifelong_hashing.cli", "--params", PARAMS, *argv, "serve",
                                 "--models", str(models), "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(url), 90, "lhash serve", [proc])
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def snapshot(root: Path) -> dict:
    """What must not change when a run fails: served version, git head, code store, DVC status."""
    from lifelong_hashing.inference.versions import current_version
    from lifelong_hashing.operations.registry import Registry

    ws = Registry(root / "ws", str(root / "remote"))
    return {"served": current_version(ws.models_dir), "head": ws.git("rev-parse", "HEAD").strip(),
            "tags": ws.tags(), "codes": hashlib.sha256((ws.state_dir / "codes.npz").read_bytes()).hexdigest(),
            "dvc_status": ws.dvc("status", "--json").strip(), "git_status": ws.git("status", "--porcelain")}


@pytest.fixture(scope="session")
def base_workspace(tmp_path_factory, stage_files, prefect_harness):
    """A pipeline whose first version (stage 0) is served; tests work on copies of it."""
    root = tmp_path_factory.mktemp("base")
    drop(stage_files[0], root)
    assert run(root).is_completed()
    return root


@pytest.fixture
def workspace(base_workspace, tmp_path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(base_workspace, root, symlinks=True)
    return root
