"""Crash safety of the pipeline, on real runs: killed with SIGKILL at every step boundary and
inside each git and DVC command that records a version, a disk that fills up, a batch file
replaced or renamed while it is processed. After each, the next run must leave the workspace as
if the failure never happened, or as if the batch had been processed once."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lifelong_hashing.cli import main as lhash
from lifelong_hashing.engine.batch import load_batch, save_batch
from lifelong_hashing.engine.codestore import CodeStore
from lifelong_hashing.files import sha256_of
from lifelong_hashing.inference.retrieval import RetrievalModel
from lifelong_hashing.inference.versions import current_dir, current_version, version_name
from lifelong_hashing.operations import pipeline
from lifelong_hashing.operations.registry import Registry, parse_version, version_tag

from .conftest import PARAMS, ROOT, drop, run, settings, snapshot, two_runs_at_once

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]

# Every step boundary of a run, and inside / after each command that records a version.
KILL_POINTS = [
    "after:pin", "after:validate", "after:train", "after:export", "after:monitor", "after:begin",
    "before:write_metrics", "inside:dvc commit:1.0", "after:dvc commit", "inside:dvc push:1.0", "after:dvc push",
    "inside:git commit:0.005", "after:git commit", "after:gto register", "after:gto assign", "after:record",
    "before:point_serving_at", "after:promote", "after:retire",
]


def append_batch(stage_file: Path, out: Path, tag: str, rows: slice) -> Path:
    """Items of known categories under new ids: an append (encoded, recorded, no training)."""
    base = load_batch(stage_file)
    part = base.subset(np.arange(len(base))[rows])
    ids = np.array([f"{tag}-{i}" for i in range(len(part))])
    return save_batch(dataclasses.replace(part, ids=ids, new_categories=()), out / f"{tag}.npz")


def killed_run(root: Path, point: str, env: dict) -> None:
    args = [f"-S{k}={json.dumps(v)}" for k, v in settings(root).items()]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_run.py"), point, "--params", PARAMS, *args],
                          cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, (
        f"{point}: the run was not killed (exit {proc.returncode}): {proc.stderr[-3000:]}")


def assert_consistent(root: Path, sent: dict[str, Path]) -> None:
    """The invariants after a completed run: every batch sent is in the store once and recorded
    once, and gone from the incoming folder; the workspace is clean; manifest, tags, metrics and
    the served version agree; the served version loads and answers."""
    ws = Registry(root / "ws", str(root / "remote"))
    assert ws.git("status", "--porcelain") == ""
    assert json.loads(ws.dvc("status", "--json")) == {}
    assert not ws.journal_path.exists()
    assert list((root / "incoming").iterdir()) == []
    manifest = json.loads(ws.manifest_path.read_text())["batches"]
    ids = CodeStore.load(ws.state_dir / "codes.npz").ids.tolist()
    for name, path in sent.items():
        assert sha256_of(path) in manifest, f"{name} was never recorded"
        batch_ids = load_batch(path).ids.tolist()
        assert sum(ids.count(i) for i in batch_ids) == len(batch_ids), f"{name}: items stored other than once"
    tags = ws.tags()
    assert sorted((e["tag"] for e in manifest.values()), key=lambda t: parse_version(t)) == tags
    served = current_version(ws.models_dir)
    assert served == version_name(parse_version(tags[-1]))
    assert ws.in_stage("prod") == ws.in_stage("staging") == parse_version(tags[-1])
    assert json.loads(ws.metrics_path.read_text())["version"] == served
    model = RetrievalModel(current_dir(ws.models_dir))
    x = load_batch(next(iter(sent.values()))).text[:2]
    assert len(model.search("text", model.features("text", x.tolist()), 5, None, ("image",))) == 2


def test_a_run_killed_at_any_point_is_finished_or_undone_by_the_next(workspace, stage_files, prefect_api, tmp_path):
    sent: dict[str, Path] = {}
    for i, point in enumerate(KILL_POINTS):
        batch = append_batch(stage_files[0], tmp_path, f"kill{i:02d}", slice(i * 7, i * 7 + 20))
        drop(batch, workspace)
        killed_run(workspace, point, prefect_api[1])
        state = run(workspace)
        assert state.is_completed(), f"{point}: {state.message}"
        sent[point] = batch
        try:
            assert_consistent(workspace, sent)
        except AssertionError as err:
            raise AssertionError(f"after a kill at {point}: {err}") from err
    ws = Registry(workspace / "ws", str(workspace / "remote"))
    for tag in reversed(ws.tags()):  # every version recorded across the kills can be served again
        assert lhash(["--params", PARAMS, "-S", f"pipeline.workspace={ws.root}", "-S",
                      f"pipeline.remote={ws.remote}", "rollback", tag]) == 0
        assert current_version(ws.models_dir) == version_name(parse_version(tag))
        RetrievalModel(current_dir(ws.models_dir))


def test_runs_killed_on_a_batch_count_as_attempts_until_it_is_poison(workspace, stage_files):
    drop(stage_files[1], workspace)
    ws = Registry(workspace / "ws", str(workspace / "remote"))
    sha = sha256_of(stage_files[1])
    killed = f"2026-01-01T00:00:00Z {pipeline._STARTED}"
    ws.work_dir.mkdir(exist_ok=True)
    ws.attempts_path.write_text(json.dumps({sha: {"name": stage_files[1].name, "errors": [killed] * 3}}))
    before = snapshot(workspace)
    state = run(workspace)
    assert state.is_failed() and "poison: failed 3 runs" in state.message and "killed?" in state.message
    (kept,) = (workspace / "quarantine").iterdir()
    assert json.loads((kept / "reason.json").read_text())["kind"] == "poison"
    assert (kept / "batch.npz").read_bytes() == stage_files[1].read_bytes()
    assert snapshot(workspace) == before


def test_a_step_over_its_time_budget_is_a_failed_attempt(workspace, stage_files):
    before = snapshot(workspace)
    drop(stage_files[1], workspace)
    state = run(workspace, **{"pipeline.step_timeout_seconds": 0.5})
    assert state.is_failed() and "attempt 1 of 3" in state.message and "timed out" in state.message.lower()
    assert snapshot(workspace) == before
    assert (workspace / "incoming" / stage_files[1].name).exists()


# ---- a file changed under the pipeline ------------------------------------------------------
def test_a_batch_replaced_while_it_is_processed_is_learned_as_it_was_pinned(workspace, stage_files, tmp_path,
                                                                           monkeypatch):
    a = append_batch(stage_files[0], tmp_path, "swap-a", slice(0, 30))
    b = append_batch(stage_files[0], tmp_path, "swap-b", slice(30, 60))
    target = drop(a, workspace, "app4.npz")
    validate = pipeline.validate

    def swap_then_validate(*args, **kwargs):  # another upload replaces the file mid-run
        shutil.copyfile(b, target.with_name(".upload"))
        os.replace(target.with_name(".upload"), target)
        return validate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "validate", swap_then_validate)
    assert run(workspace).is_completed()
    monkeypatch.setattr(pipeline, "validate", validate)
    ws = Registry(workspace / "ws", str(workspace / "remote"))
    manifest = json.loads(ws.manifest_path.read_text())["batches"]
    assert sha256_of(a) in manifest and sha256_of(b) not in manifest
    kept = ws.batches_dir / f"{sha256_of(a)[:16]}.npz"
    assert kept.read_bytes() == a.read_bytes()
    ids = set(CodeStore.load(ws.state_dir / "codes.npz").ids.tolist())
    assert set(load_batch(a).ids) <= ids and not set(load_batch(b).ids) & ids
    assert target.read_bytes() == b.read_bytes()  # the new content waits for the next run
    assert run(workspace).is_completed()
    assert set(load_batch(b).ids) <= set(CodeStore.load(ws.state_dir / "codes.npz").ids.tolist())
    assert not target.exists() and not (workspace / "quarantine").exists()


def test_a_batch_changed_before_it_is_pinned_or_renamed_after_is_never_half_quarantined(
        workspace, stage_files, tmp_path, monkeypatch):
    a = append_batch(stage_files[0], tmp_path, "change-a", slice(0, 30))
    b = append_batch(stage_files[0], tmp_path, "change-b", slice(30, 60))
    target = drop(a, workspace, "app5.npz")
    pin = pipeline.pin

    def rewrite_then_pin(registry, arrival):  # rewritten in place between the scan and the copy
        shutil.copyfile(b, target)
        return pin(registry, arrival)

    monkeypatch.setattr(pipeline, "pin", rewrite_then_pin)
    before = snapshot(workspace)
    state = run(workspace)
    assert state.is_completed() and state.result() == []
    assert snapshot(workspace) == before and target.read_bytes() == b.read_bytes()

    validate = pipeline.validate

    def rename_then_validate(*args, **kwargs):
        target.rename(target.with_name("renamed.npz"))
        return validate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "pin", pin)
    monkeypatch.setattr(pipeline, "validate", rename_then_validate)
    state = run(workspace)
    assert state.is_completed(), state.message
    monkeypatch.setattr(pipeline, "validate", validate)
    assert set(load_batch(b).ids) <= set(CodeStore.load(workspace / "ws" / "state" / "codes.npz").ids.tolist())
    assert run(workspace).is_completed()  # the renamed file: the same content, already processed
    assert list((workspace / "incoming").iterdir()) == [] and not (workspace / "quarantine").exists()


# ---- a full disk ----------------------------------------------------------------------------
@pytest.fixture
def small_disk(workspace):
    """The workspace moved onto a tmpfs with 160 MB to spare (needs root to mount)."""
    ws = workspace / "ws"
    used = sum(p.stat().st_size for p in ws.rglob("*") if p.is_file())
    mount = workspace / "disk"
    mount.mkdir()
    size = used + (160 << 20)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        shutil.copytree(ws, mount / "ws", symlinks=True)
        shutil.rmtree(ws)
        ws.symlink_to(mount / "ws")
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def fill(disk: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the disk."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(shutil.disk_usage(disk).free - leave, 1))
    return filler


def test_a_disk_too_full_to_record_changes_nothing_and_counts_an_attempt(small_disk, workspace, stage_files,
                                                                          tmp_path):
    before = snapshot(workspace)
    drop(append_batch(stage_files[0], tmp_path, "full", slice(0, 40)), workspace)
    filler = fill(small_disk, 40 << 20)  # room to encode and export, not to record
    state = run(workspace)
    assert state.is_failed() and "nothing was changed" in state.message and "attempt 1 of 3" in state.message
    assert snapshot(workspace) == before
    filler.unlink()
    assert run(workspace).is_completed()
    assert current_version(workspace / "ws" / "models") == "v0002"


def test_a_disk_that_fills_while_recording_is_restored(small_disk, workspace, stage_files, monkeypatch, tmp_path):
    before = snapshot(workspace)
    batch = drop(append_batch(stage_files[0], tmp_path, "filling", slice(0, 40)), workspace)
    record = Registry.record

    def fill_then_record(self, *args):  # another writer takes the rest of the disk before `dvc commit`
        fill(small_disk, 0)
        return record(self, *args)

    monkeypatch.setattr(Registry, "record", fill_then_record)
    state = run(workspace)
    assert state.is_failed() and "attempt 1 of 3" in state.message
    assert "No space left on device" in state.message
    (small_disk / "filler").unlink()
    assert snapshot(workspace) == before
    ws = Registry(workspace / "ws", str(workspace / "remote"))
    assert not ws.journal_path.exists()
    attempts = json.loads(ws.attempts_path.read_text())
    assert len(attempts[sha256_of(batch)]["errors"]) == 1
    monkeypatch.setattr(Registry, "record", record)
    assert run(workspace).is_completed()
    assert ws.tags()[-1] == version_tag(2) and current_version(ws.models_dir) == "v0002"


# ---- the rest --------------------------------------------------------------------------------
def test_two_runs_started_at_once_on_a_fresh_workspace_create_it_once(tmp_path, stage_files):
    """Creating the workspace (git init, dvc init) happens under the lock."""
    drop(stage_files[0], tmp_path)
    two_runs_at_once(tmp_path)
    ws = Registry(tmp_path / "ws", str(tmp_path / "remote"))
    assert ws.tags() == [version_tag(1)] and current_version(ws.models_dir) == "v0001"
    subprocess.run(["git", "fsck", "--strict"], cwd=ws.root, check=True, capture_output=True)


def test_partial_uploads_go_and_dvc_failures_name_their_own_error(workspace, stage_files):
    partial = workspace / "remote" / "files" / "md5" / "ab" / "cdef0123.Zm9vYmFyYmF6cXV4.tmp"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half an upload")
    state = run(workspace)
    assert state.is_completed() and not partial.exists()
    drop(stage_files[1], workspace)
    blocker = workspace / "blocker"
    blocker.write_text("a file where the remote's folder should be")
    state = run(workspace, **{"pipeline.push_retries": 0, "pipeline.remote": str(blocker / "remote")})
    assert state.is_failed() and "`dvc push` failed" in state.message
    assert "ERROR" in state.message and "Having any troubles" not in state.message
