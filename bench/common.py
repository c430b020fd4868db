"""Shared helpers for the benchmarks: a model version to measure, a service on loopback, timing."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def models_dir_from_state(state_dir: Path, models_dir: Path) -> Path:
    """Publish ``state_dir`` into ``models_dir`` (once) and promote it."""
    from lifelong_hashing.config import ExportConfig
    from lifelong_hashing.engine.state import load_state
    from lifelong_hashing.inference.export import publish
    from lifelong_hashing.inference.versions import current_version, promote

    if current_version(models_dir) is None:
        if not (state_dir / "state.json").exists():
            sys.exit(f"{state_dir} has no trained state: run `make run` first")
        promote(models_dir, publish(load_state(state_dir), models_dir, ExportConfig(int8_min_agreement=None)).name)
    return models_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(models_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """``lhash serve`` on a free loopback port, once it answers /health."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lifelong_hashing.cli", "--params", str(ROOT / "params.yaml"),
                                 "serve", "--models", str(models_dir), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, wait_healthy(proc, f"http://127.0.0.1:{port}", log_path)


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path) -> str:
    """``url`` once it answers /health; exits with the log's path when it never does."""
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"{url} did not start; see {log_path}")


def lifelong_epochs_for(epochs: int) -> int:
    """The lifelong stages' epochs for a run of ``epochs`` base epochs, at params.yaml's ratio, so a
    benchmark with a shorter budget measures the product's defaults scaled down, not other ones."""
    from lifelong_hashing.config import load_params

    train = load_params(ROOT / "params.yaml").train
    return math.ceil(epochs * train.lifelong_epochs / train.epochs)


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def timed(fn, repeats: int = 1) -> float:
    """The fastest of ``repeats`` runs: the least disturbed by the machine's other work."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A real ``prefect server start`` on a free loopback port, its database under ``home``."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home.parent / "prefect-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the Prefect server did not start")


def utc(stamp: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(stamp, tz=UTC)


def known_appends(root: Path, count: int, rows: int, prefix: str) -> tuple[Path, list[Path]]:
    """The base stage of the default plan on the real Wikipedia data, and ``count`` appends of
    ``rows`` of its items under new ids (``prefix`` and the append's number): known categories,
    so a run encodes and appends them without training."""
    import dataclasses

    import numpy as np

    from lifelong_hashing.config import load_params
    from lifelong_hashing.engine.batch import load_batch, save_batch
    from lifelong_hashing.engine.runner import build_plan

    params = load_params(ROOT / "params.yaml", {"dataset.path": str(ROOT / "data/wikipedia/wikipedia.npz")})
    base = save_batch(build_plan(params).stages[0].batch, root / "stage-0.npz")
    items = load_batch(base)
    appends = []
    for i in range(count):
        part = items.subset(np.arange(i * rows, (i + 1) * rows) % len(items))
        ids = np.char.add(f"{prefix}{i}-", part.ids)
        appends.append(save_batch(dataclasses.replace(part, ids=ids, new_categories=()), root / f"append-{i}.npz"))
    return base, appends

