"""The pipeline's Dask path (``engine.on_dask``) on real LocalClusters of 2 worker processes: an append
batch encoded shard by shard and evaluated by query shards, and the joint baseline's re-encoding
of the whole database, give the code store and the scores that one process gives, exactly; a
worker killed mid-run leaves the served version as it was and the batch for the next run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from lifelong_hashing.config import load_params
from lifelong_hashing.engine.batch import Batch, load_batch, save_batch
from lifelong_hashing.engine.codestore import CodeStore
from lifelong_hashing.engine.runner import append_known
from lifelong_hashing.engine.state import RunState, load_state
from lifelong_hashing.inference.versions import current_dir, current_version
from lifelong_hashing.operations.pipeline import evaluation_queries
from lifelong_hashing.operations.registry import Registry

from .conftest import PARAMS, drop, run, settings, snapshot, thread_in_context

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
SHARD_ROWS = 4096  # one encoder block: the batch below makes 3 shards


def known_batch(stage_file, root, copies: int = 10) -> Batch:
    """Stage-0 items again under new ids (known categories only: an append), ~9,000 rows."""
    stage0 = load_batch(stage_file)
    rows = np.tile(np.arange(len(stage0)), copies)
    ids = np.char.add(np.char.add("copy-", (np.arange(len(rows)) // len(stage0)).astype(str)),
                      np.char.add("-", stage0.ids[rows]))
    batch = Batch(ids, stage0.image[rows], stage0.text[rows], stage0.labels[rows], stage0.categories)
    path = save_batch(batch, root / "known.npz")
    return load_batch(path)


def in_process(workspace, batch: Batch) -> RunState:
    """What the in-process append gives: the served state encoding the whole batch, then
    evaluated on the pipeline's queries in one process."""
    params = load_params(PARAMS, settings(workspace))
    state = load_state(Registry(workspace / "ws", str(workspace / "remote")).state_dir)
    append_known(state, batch.for_model(state.method.categories), evaluation_queries(params))
    return state


def in_process_store(workspace, batch: Batch) -> CodeStore:
    return in_process(workspace, batch).store


def served_store(workspace) -> CodeStore:
    return CodeStore.load(current_dir(workspace / "ws" / "models") / "codes.npz")


def test_an_append_encoded_and_scored_on_a_local_cluster_equals_the_in_process_run(workspace, stage_files):
    """Codes bit for bit, and the evaluation record (every mAP, precision and count) exactly."""
    batch = known_batch(stage_files[0], workspace)
    reference = in_process(workspace, batch)
    expected = reference.store
    drop(workspace / "known.npz", workspace)
    state = run(workspace, **{"pipeline.dask.workers": 2, "pipeline.dask.shard_rows": SHARD_ROWS,
                              "pipeline.dask.query_shard_rows": 200})
    assert state.is_completed(), state.message
    (outcome,) = state.result()
    assert outcome["kind"] == "append" and outcome["version"] == "v0002" and outcome["shards_on_dask"] == 3
    recorded = json.loads((Registry(workspace / "ws", "").state_dir / "state.json").read_text())["history"][-1]
    # each direction's queries of the categories seen so far, in shards of 200
    assert outcome["query_shards_on_dask"] == sum(-(-recorded[d]["queries"] // 200) for d in ("i2t", "t2i"))
    assert recorded == json.loads(json.dumps(reference.history[-1]))
    served = served_store(workspace)
    assert len(served) == len(expected) == 902 + len(batch)
    np.testing.assert_array_equal(served.ids, expected.ids)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(served.codes[modality], expected.codes[modality])


def test_the_joint_baselines_re_encoding_on_a_local_cluster_equals_the_in_process_run(tmp_path, stage_files):
    """A new-category batch for the joint baseline: it retrains on everything, and the ~9,900
    items stored before are re-encoded in 3 shards on the workers, giving the in-process codes."""
    joint = {"method.name": "joint", "method.database_codes": "encoders"}  # label codes would not change
    here = tmp_path / "in-process"
    drop(stage_files[0], here)
    assert run(here, **joint).is_completed()
    known_batch(stage_files[0], here)
    drop(here / "known.npz", here)
    assert run(here, **joint).is_completed()  # the database: stage 0 and 9,020 appended items
    drop(stage_files[1], here)
    on_dask = tmp_path / "on-dask"
    shutil.copytree(here, on_dask, symlinks=True)
    state = run(on_dask, **joint, **{"pipeline.dask.workers": 2, "pipeline.dask.shard_rows": SHARD_ROWS})
    assert state.is_completed(), state.message
    (outcome,) = state.result()
    assert outcome["kind"] == "increment" and outcome["shards_on_dask"] == 3 and outcome["query_shards_on_dask"] > 0
    assert run(here, **joint).is_completed()
    expected, served = served_store(here), served_store(on_dask)
    assert len(served) == len(expected) > 902 + 9020
    np.testing.assert_array_equal(served.ids, expected.ids)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(served.codes[modality], expected.codes[modality])
    history = [json.loads((Registry(root / "ws", "").state_dir / "state.json").read_text())["history"]
               for root in (here, on_dask)]
    assert history[0] == history[1] and history[1][-1]["codes_rewritten"] > 0


def test_a_worker_killed_mid_run_keeps_the_served_version_and_the_batch_is_retried(workspace, stage_files):
    import dask
    from distributed import Client, LocalCluster

    batch = known_batch(stage_files[0], workspace, copies=20)
    expected = in_process_store(workspace, batch)
    drop(workspace / "known.npz", workspace)
    before = snapshot(workspace)
    # No silent re-run on another worker: the kill must fail the run, as on a cluster that keeps
    # losing workers, so that the pipeline's own retry is what is tested.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dask_settings = {"pipeline.dask.address": cluster.scheduler_address, "pipeline.dask.shard_rows": SHARD_ROWS}
        outcome: dict = {}
        runner = thread_in_context(lambda: outcome.setdefault("state", run(workspace, **dask_settings)))
        runner.start()
        killed = kill_a_busy_worker(client, timeout=240)
        runner.join(600)
        assert killed, "no shard task was seen running on a worker"
        state = outcome["state"]
        assert state.is_failed() and "KilledWorker" in state.message, state.message
        assert snapshot(workspace) == before
        assert current_version(workspace / "ws" / "models") == "v0001"
        assert [p.name for p in (workspace / "incoming").iterdir()] == ["known.npz"]
        client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed one
        state = run(workspace, **dask_settings)
    assert state.is_completed(), state.message
    served = served_store(workspace)
    np.testing.assert_array_equal(served.ids, expected.ids)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(served.codes[modality], expected.codes[modality])


def kill_a_busy_worker(client, timeout: float) -> bool:
    """SIGKILL the process of the first worker seen running a task."""
    pids = client.run(os.getpid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [worker for worker, tasks in client.processing().items() if tasks]
        if busy:
            os.kill(pids[busy[0]], signal.SIGKILL)
            return True
        time.sleep(0.02)
    return False
