"""The pipeline flow on a real temporary Prefect server, versioning into a real git + DVC
repository with a local remote, on the Wikipedia stage batches (1 epoch, small networks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from lifelong_hashing.cli import main as lhash
from lifelong_hashing.config import load_params
from lifelong_hashing.engine.batch import Batch, load_batch, save_batch
from lifelong_hashing.engine.codestore import CodeStore
from lifelong_hashing.engine.runner import build_plan, run_stage
from lifelong_hashing.engine.state import new_state
from lifelong_hashing.inference.versions import current_version
from lifelong_hashing.operations.registry import Registry, version_tag

from .conftest import PARAMS, ROOT, drop, run, serving_pipeline, settings, snapshot, two_runs_at_once

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]


def artifacts(state) -> dict[str, list]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    out: dict[str, list] = {}  # per key, oldest first
    for a in sorted(found, key=lambda a: a.created):
        out.setdefault(a.key, []).append(a)
    return out


def linked_file(artifact) -> Path:
    """The local file a link artifact (markdown ``[text](file://...)``) points at."""
    (uri,) = re.findall(r"\((file://[^)]+)\)", artifact.data)
    return Path(uri.removeprefix("file://"))


def test_the_flow_serves_the_codes_lhash_run_trains(base_workspace):
    """A batch through the flow (file, validation, fresh process state) is the stage of a run."""
    params = load_params(PARAMS, settings(base_workspace))
    plan = build_plan(params)
    state = new_state(params, plan.stages[0].batch.image.shape[1:], plan.stages[0].batch.text.shape[1])
    run_stage(state, plan)
    served = CodeStore.load(base_workspace / "ws" / "models" / "versions" / "v0001" / "codes.npz")
    np.testing.assert_array_equal(served.ids, state.store.ids)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(served.codes[modality], state.store.codes[modality])


def gto_show(ws: Registry) -> dict:
    """What the real ``gto show`` reports for the workspace's model."""
    out = subprocess.run([str(Path(sys.executable).parent / "gto"), "show", "--json", "-r", str(ws.root)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["hashing-model"]


def prod_by_dvc(ws: Registry) -> str:
    """The commit DVC's API says is in prod."""
    from dvc.api import artifacts_show

    return artifacts_show("hashing-model", stage="prod", repo=str(ws.root))["rev"]


def test_increments_append_duplicate_and_rollback(workspace, stage_files):
    ws = Registry(workspace / "ws", str(workspace / "remote"))
    assert current_version(ws.models_dir) == "v0001" and ws.tags() == [version_tag(1)]

    drop(stage_files[1], workspace)
    drop(stage_files[2], workspace)
    state = run(workspace)
    assert state.is_completed(), state.message
    outcomes = state.result()
    assert [(o["kind"], o["version"], o["new_categories"]) for o in outcomes] == [
        ("increment", "v0002", ["literature", "media"]), ("increment", "v0003", ["music", "royalty"])]
    assert current_version(ws.models_dir) == "v0003"
    assert ws.tags() == [version_tag(1), version_tag(2), version_tag(3)]
    assert not list((workspace / "incoming").iterdir())
    assert ws.git("status", "--porcelain") == ""
    assert json.loads(ws.dvc("status", "--json")) == {}
    assert any((workspace / "remote").rglob("*")), "nothing pushed to the DVC remote"
    lock = ws.root / "dvc.lock"
    assert "params.yaml" in lock.read_text()
    metrics = json.loads(ws.metrics_path.read_text())
    assert metrics["version"] == "v0003" and len(metrics["i2t"]["matrix"]) == 3
    assert (ws.reports_dir / "monitoring" / "stage-02" / "report.html").exists()

    found = artifacts(state)
    summary = found["increment-summary"][-1].data
    assert "v0003" in summary and "music, royalty" in summary and "mAP before" in summary
    table = json.loads(found["stage-task-map"][-1].data)
    assert {"direction", "after stage", "task 0", "task 2"} <= set(table[0])
    assert linked_file(found["evidently-report"][-1]) == ws.reports_dir / "monitoring" / "stage-02" / "report.html"
    assert linked_file(found["validation-report"][-1]).name == "index.html"
    assert linked_file(found["validation-report"][-1]).exists()

    # Known categories only: encoded and appended, no training.
    stage0 = load_batch(stage_files[0])
    known = stage0.subset(np.arange(50))
    known = Batch(np.char.add("extra-", known.ids), known.image, known.text, known.labels, known.categories)
    extra = save_batch(known, workspace / "extra.npz")
    drop(extra, workspace)
    state = run(workspace)
    assert state.is_completed(), state.message
    (outcome,) = state.result()
    assert outcome["kind"] == "append" and outcome["version"] == "v0004" and outcome["stage"] == 2
    manifest = json.loads(ws.manifest_path.read_text())["batches"]
    assert len(manifest) == 4

    # The same bytes again, under another name: recognised, not processed twice.
    drop(extra, workspace, "extra-again.npz")
    state = run(workspace)
    assert state.is_completed() and state.result() == []
    assert ws.tags()[-1] == version_tag(4) and not list((workspace / "incoming").iterdir())

    # The registry: each version registered and staged, the latest in prod, as GTO and DVC see it.
    shown = gto_show(ws)
    assert shown["version"] == "v1.4.0" and shown["stage"] == {"staging": "v1.4.0", "prod": "v1.4.0"}
    assert prod_by_dvc(ws) == ws.git("rev-parse", "HEAD").strip()
    history = subprocess.run([str(Path(sys.executable).parent / "gto"), "history", "-r", str(ws.root)],
                             capture_output=True, text=True, check=True).stdout
    assert all(f"hashing-model@v1.{n}.0" in history for n in range(1, 5))

    # Promotion speaks in versions and stages: prod also serves, the training state stays.
    argv = ["--params", PARAMS] + [f"-S{k}={json.dumps(v)}" for k, v in settings(workspace).items()]
    assert lhash(argv + ["promote", "v1.3.0", "--stage", "prod"]) == 0
    assert current_version(ws.models_dir) == "v0003" and gto_show(ws)["stage"]["prod"] == "v1.3.0"
    assert json.loads(ws.state_dir.joinpath("state.json").read_text())["stage"] == 2
    assert ws.was_in_stage(4, "prod") and ws.was_in_stage(3, "prod")
    state = run(workspace)  # nothing new: a run leaves the version a person put in prod
    assert state.is_completed() and state.result() == []
    assert current_version(ws.models_dir) == "v0003" and gto_show(ws)["stage"]["prod"] == "v1.3.0"
    assert lhash(argv + ["promote", "v0004", "--stage", "prod"]) == 0 and gto_show(ws)["stage"]["prod"] == "v1.4.0"

    # Rollback: v0002's model, state and history come back as a new commit, in prod and served;
    # the next version is still new.
    assert lhash(argv + ["rollback", "v0002"]) == 0
    assert current_version(ws.models_dir) == "v0002"
    assert gto_show(ws)["stage"] == {"staging": "v1.4.0", "prod": "v1.2.0"}
    assert prod_by_dvc(ws) == ws.git("rev-parse", version_tag(2) + "^{commit}").strip()
    assert json.loads(ws.state_dir.joinpath("state.json").read_text())["stage"] == 1
    assert not (ws.models_dir / "versions" / "v0003").exists()
    assert json.loads(ws.dvc("status", "--json")) == {} and ws.git("status", "--porcelain") == ""
    assert ws.next_number() == 5
    assert lhash(argv + ["rollback", "v0009"]) == 2
    assert lhash(argv + ["promote", "v0003", "--stage", "prod"]) == 2  # not in the rolled-back tree
    assert current_version(ws.models_dir) == "v0002" and gto_show(ws)["stage"]["prod"] == "v1.2.0"
    assert lhash(["-S", f"pipeline.workspace={workspace / 'nowhere'}", "rollback", "v0001"]) == 2

    # A run finds serving as the registry has it (rolled back: nothing re-promoted).
    state = run(workspace)
    assert state.is_completed() and current_version(ws.models_dir) == "v0002"


def test_bad_batch_is_quarantined_and_nothing_changes(workspace, stage_files):
    before = snapshot(workspace)
    with np.load(stage_files[1]) as npz:
        arrays = dict(npz)
    arrays["image"][3, 5] = np.nan  # the Batch class refuses this; a sender's file need not
    np.savez(workspace / "bad.npz", **arrays)
    drop(workspace / "bad.npz", workspace)
    state = run(workspace)
    assert state.is_failed()
    assert "bad.npz" in state.message and "validation failed" in state.message
    (kept,) = list((workspace / "quarantine").iterdir())
    reason = json.loads((kept / "reason.json").read_text())
    assert reason["file"] == "bad.npz" and "finite" in reason["reason"] and "(1 of 380 items)" in reason["reason"]
    assert (kept / "batch.npz").exists() and (kept / "validation" / "validation.json").exists()
    assert not list((workspace / "incoming").iterdir())
    assert snapshot(workspace) == before


def test_the_data_contract_is_a_gx_suite_versioned_with_each_version(workspace, stage_files):
    """The suite batches meet is GX's File Data Context in the workspace (git): what the model
    learned is a run-time parameter, so the suite file changes only when the contract does, and
    a rejected batch changes nothing."""
    import great_expectations as gx

    ws = Registry(workspace / "ws", str(workspace / "remote"))
    suite_file = "gx/expectations/incoming_batch.json"
    assert suite_file in ws.git("ls-files", "gx").split()
    for stage in (1, 2):
        drop(stage_files[stage], workspace)
        assert run(workspace).is_completed()
    changed = {n: ws.git("diff", "--stat", version_tag(n), version_tag(n + 1), "--", "gx") for n in (1, 2)}
    assert suite_file in changed[1] and changed[2] == ""  # the model's shapes came in at v2; v3 kept the suite
    suite = gx.get_context(mode="file", project_root_dir=str(ws.root)).suites.get("incoming_batch")
    parameters = {json.dumps(e.configuration.kwargs.get(k)) for e in suite.expectations for k in ("value_set",
                                                                                                    "max_value")}
    assert {'{"$PARAMETER": "image_shape"}', '{"$PARAMETER": "text_shape"}', '{"$PARAMETER": "max_labels"}'} \
        <= parameters
    assert (ws.contract_dir / "uncommitted" / "data_docs" / "local_site" / "expectations" /
            "incoming_batch.html").exists()

    before = snapshot(workspace)
    with np.load(stage_files[3]) as npz:
        arrays = dict(npz)
    arrays["text"] = arrays["text"][:, :999]  # one dimension short of the model's
    np.savez(workspace / "short.npz", **arrays)
    drop(workspace / "short.npz", workspace)
    state = run(workspace)
    assert state.is_failed() and "text features have the model's 1000 dimensions" in state.message, state.message
    assert snapshot(workspace) == before


def test_export_failure_keeps_previous_version_and_next_run_retries(workspace, stage_files, monkeypatch):
    import lifelong_hashing.inference.export as export_module
    from lifelong_hashing.inference.export import ExportError

    def broken_export(*args, **kwargs):
        raise ExportError("injected: the ONNX exporter crashed")

    before = snapshot(workspace)
    drop(stage_files[1], workspace)
    with monkeypatch.context() as patch:
        patch.setattr(export_module, "export_method", broken_export)
        state = run(workspace)
    assert state.is_failed() and "injected" in state.message
    assert snapshot(workspace) == before
    assert [p.name for p in (workspace / "incoming").iterdir()] == [stage_files[1].name]
    left = sorted(p.name for p in (workspace / "ws" / ".work").glob("*"))
    assert left == ["attempts.json", "reserve"]  # no candidate, no pinned copy
    (attempt,) = json.loads((workspace / "ws" / ".work" / "attempts.json").read_text()).values()
    assert len(attempt["errors"]) == 1 and "injected" in attempt["errors"][0]

    state = run(workspace)
    assert state.is_completed(), state.message
    assert current_version(workspace / "ws" / "models") == "v0002"
    assert json.loads((workspace / "ws" / ".work" / "attempts.json").read_text()) == {}


def test_failed_push_restores_the_last_version(workspace, stage_files):
    before = snapshot(workspace)
    blocker = workspace / "blocker"
    blocker.write_text("a file where the remote's folder should be")
    drop(stage_files[1], workspace)
    state = run(workspace, **{"pipeline.push_retries": 1, "pipeline.remote": str(blocker / "remote")})
    assert state.is_failed() and "dvc push" in state.message
    after = snapshot(workspace)
    assert after == before
    assert (workspace / "incoming" / stage_files[1].name).exists()


def test_monitoring_alert_blocks_promotion(workspace, stage_files):
    before = snapshot(workspace)
    drop(stage_files[1], workspace)
    state = run(workspace, **{"monitoring.max_forgetting": 0.0, "monitoring.max_average_map_drop": 0.0})
    assert state.is_failed() and "monitoring alerts" in state.message
    (kept,) = list((workspace / "quarantine").iterdir())
    assert (kept / "stage-01" / "report.html").exists() and (kept / "batch.npz").exists()
    assert snapshot(workspace) == before


def test_concurrent_runs_process_a_batch_once(workspace, stage_files):
    drop(stage_files[1], workspace)
    states = two_runs_at_once(workspace)
    assert sorted(len(s.result()) for s in states) == [0, 1]
    ws = Registry(workspace / "ws", "")
    assert ws.tags() == [version_tag(1), version_tag(2)] and current_version(ws.models_dir) == "v0002"
    subprocess.run(["git", "fsck", "--strict"], cwd=ws.root, check=True, capture_output=True)
    assert json.loads(ws.dvc("status", "--json")) == {}


def test_a_run_serves_the_recorded_version_when_promotion_was_cut_short(workspace, stage_files):
    models = workspace / "ws" / "models"
    (models / "CURRENT").unlink()  # as if the last run died between assigning prod and the pointer
    link = workspace / "incoming" / "elsewhere.npz"
    link.symlink_to(stage_files[1])  # a name never leads outside the incoming folder
    (workspace / "incoming" / ".upload-in-progress.npz").write_bytes(b"partial")
    state = run(workspace)
    assert state.is_completed() and state.result() == []
    assert current_version(models) == "v0001"
    assert link.is_symlink() and (workspace / "incoming" / ".upload-in-progress.npz").exists()


def test_a_run_that_cannot_get_the_lock_fails_cleanly(workspace, stage_files):
    before = snapshot(workspace)
    drop(stage_files[1], workspace)
    with Registry(workspace / "ws", "").lock(0):
        state = run(workspace, **{"pipeline.lock_timeout_seconds": 1})
    assert state.is_failed() and "busy" in state.message
    assert snapshot(workspace) == before
    assert (workspace / "incoming" / stage_files[1].name).exists()


def test_run_once_from_the_command_line(workspace):
    """``python -m flows.pipeline`` with nothing new: exit 0 (its own temporary server)."""
    args = [f"-S{k}={json.dumps(v)}" for k, v in settings(workspace).items()]
    env = {**os.environ, "PREFECT_HOME": str(workspace / "prefect-home")}
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", PARAMS, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Completed" in proc.stdout


def flow_logs(state, until) -> list[str]:
    """The flow run's log messages as the Prefect server holds them (they are sent in the
    background): polled until ``until(messages)`` holds, or 20 s."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.time() + 20
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        messages = [log.message for log in logs]
        if until(messages) or time.time() > deadline:
            return messages
        time.sleep(0.3)


def test_a_batch_that_would_break_training_is_quarantined_and_the_next_batch_is_processed(workspace, stage_files):
    """float64 values beyond float32 pass a float64 check but become inf in training: one poison
    file used to stop every later run; now it is quarantined and the batch behind it promoted."""
    with np.load(stage_files[1]) as npz:
        arrays = dict(npz)
    arrays["text"] = arrays["text"].astype(np.float64)
    arrays["text"][0, 0] = 1e39
    np.savez(workspace / "huge.npz", **arrays)
    drop(workspace / "huge.npz", workspace)
    os.utime(workspace / "incoming" / "huge.npz", ns=(1, 1))  # oldest: processed first
    drop(stage_files[2], workspace)
    state = run(workspace)
    assert state.is_failed() and "huge.npz" in state.message and "finite as float32" in state.message
    (kept,) = list((workspace / "quarantine").iterdir())
    assert json.loads((kept / "reason.json").read_text())["kind"] == "rejected"
    assert current_version(workspace / "ws" / "models") == "v0002"
    assert not list((workspace / "incoming").iterdir())


def test_a_failure_of_the_environment_is_retried_then_the_batch_is_quarantined_as_poison(workspace, stage_files,
                                                                                         monkeypatch):
    """A batch whose training meets a failing disk in every run; the other batches go on, and
    after max_attempts runs it is quarantined with its errors."""
    from lifelong_hashing.operations import pipeline

    train = pipeline.train

    def failing_disk(registry, arrival, *args, **kwargs):
        if arrival.name == stage_files[1].name:
            raise OSError(5, "injected: Input/output error")
        return train(registry, arrival, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train", failing_disk)
    drop(stage_files[1], workspace)
    os.utime(workspace / "incoming" / stage_files[1].name, ns=(1, 1))
    drop(stage_files[2], workspace)
    state = run(workspace, **{"pipeline.max_attempts": 2})
    assert state.is_failed() and "attempt 1 of 2" in state.message, state.message
    assert current_version(workspace / "ws" / "models") == "v0002"  # the batch behind it
    assert [p.name for p in (workspace / "incoming").iterdir()] == [stage_files[1].name]
    assert not (workspace / "quarantine").exists()

    state = run(workspace, **{"pipeline.max_attempts": 2})
    assert state.is_failed() and "poison: failed 2 runs" in state.message
    (kept,) = list((workspace / "quarantine").iterdir())
    reason = json.loads((kept / "reason.json").read_text())
    assert reason["kind"] == "poison" and len(reason["errors"]) == 2 and (kept / "batch.npz").exists()
    assert not list((workspace / "incoming").iterdir())
    assert json.loads((workspace / "ws" / ".work" / "attempts.json").read_text()) == {}
    assert run(workspace).is_completed()


def test_every_skipped_entry_is_logged_for_what_it_is_and_names_are_escaped(workspace, stage_files):
    incoming = workspace / "incoming"
    incoming.mkdir(exist_ok=True)
    (incoming / ".upload.npz").write_bytes(b"partial")
    (incoming / "folder.npz").mkdir()
    (incoming / "link.npz").symlink_to(stage_files[1])
    (incoming / "notes.txt").write_text("hello")
    nasty = "evil\nname <b>bold `tick` [x](y).npz"
    drop(stage_files[1], workspace, nasty)
    state = run(workspace)
    assert state.is_completed(), state.message
    logs = flow_logs(state, until=lambda messages: sum(" skipped: " in m for m in messages) >= 4)
    skipped = {line.split(" skipped: ")[0]: line.split(" skipped: ")[1] for line in logs if " skipped: " in line}
    assert skipped == {"incoming: .upload.npz": "hidden (partial uploads and editor files are left alone)",
                       "incoming: folder.npz": "a folder", "incoming: link.npz": "a symbolic link (never followed)",
                       "incoming: notes.txt": "not a batch file (.npz)"}
    assert not any("evil\nname" in line for line in logs)
    summary = artifacts(state)["increment-summary"][-1].data
    assert "evil\\\\nname &lt;b&gt;bold \\`tick\\` \\[x\\]\\(y\\)\\.npz" in summary
    assert "<b>" not in summary and "evil\nname" not in summary
    manifest = json.loads((workspace / "ws" / "manifest.json").read_text())["batches"]
    assert [e["name"] for e in manifest.values()][-1] == nasty  # recorded as dropped


def test_unlabelled_items_are_appended_with_encoder_codes_and_found_by_the_service(workspace, stage_files, tmp_path):
    """A batch of items nobody labelled: validated, appended with its encoders' codes, versioned,
    and searchable through a real ``lhash serve``."""
    import httpx

    from lifelong_hashing.engine.state import load_state

    ws = Registry(workspace / "ws", str(workspace / "remote"))
    later = load_batch(stage_files[1]).subset(np.arange(30))
    unlabelled = Batch(np.char.add("unlabelled-", later.ids), later.image, later.text,
                       np.zeros_like(later.labels), later.categories, labelled=np.zeros(len(later), bool))
    drop(save_batch(unlabelled, tmp_path / "unlabelled.npz"), workspace)
    state = run(workspace)
    assert state.is_completed(), state.message
    (outcome,) = state.result()
    assert outcome["kind"] == "append" and outcome["version"] == "v0002"
    assert ws.tags()[-1] == version_tag(2) and ws.git("status", "--porcelain") == ""
    version = ws.models_dir / "versions" / "v0002"
    served = CodeStore.load(version / "codes.npz")
    rows = served.rows_of(unlabelled.ids)
    assert not served.labelled[rows].any() and served.labelled[: rows[0]].all()
    method = load_state(ws.state_dir).method
    for modality, codes in method.encoder_codes(unlabelled).items():  # each modality's own encoder
        np.testing.assert_array_equal(served.codes[modality][rows], codes)

    with serving_pipeline(workspace) as url:
        reply = httpx.post(url + "/search", json={"modality": "text", "target": "text", "k": 1000, "radius": 0,
                                                  "features": later.text[:5].tolist()}, timeout=60)
        assert reply.status_code == 200, reply.text
        for item, result in zip(unlabelled.ids[:5], reply.json()["results"], strict=True):
            hit = next(h for h in result["text"] if h["id"] == item)
            assert hit["distance"] == 0 and hit["labels"] == []
