"""Erasure through the product, on the real pipeline (Prefect server, git + DVC) and a real
``lhash serve``: a takedown sent to the service hides the items at once and becomes a deletion
request; the next run erases them from the state, every kept batch file, the quarantine and the
older version folders, publishes and serves a version without them; repeating it changes
nothing, an unknown id is quarantined, rollback across the erasure is refused, and ``lhash purge``
leaves no copy in the DVC cache or remote while the versions since stay restorable. And the
update rule: an id sent again is refused, or with ``pipeline.repeated_ids: replace`` replaces
that item (the one place a stored code changes, counted)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from lifelong_hashing.engine.batch import Batch, load_batch, save_batch
from lifelong_hashing.engine.state import load_state
from lifelong_hashing.inference.versions import current_version, list_versions
from lifelong_hashing.operations.registry import Registry, version_tag

from .conftest import PARAMS, ROOT, drop, run, serving_pipeline, settings, snapshot, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]


def holders(folder: Path, ids: list[str], skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under ``folder`` that holds one of ``ids``: in an npz's string arrays (however
    compressed), else anywhere in its bytes (UTF-8 or numpy's UTF-32)."""
    found = []
    needles = [i.encode() for i in ids] + [i.encode("utf-32-le") for i in ids]
    for path in folder.rglob("*"):
        if not path.is_file() or any(part in skip for part in path.relative_to(folder).parts):
            continue
        data = path.read_bytes()
        if data[:4] == b"PK\x03\x04":
            try:
                with np.load(path, allow_pickle=False) as arrays:
                    members = [arrays[k] for k in arrays.files]
                strings = {str(v) for a in members if isinstance(a, np.ndarray) and a.dtype.kind == "U"
                           for v in a.ravel()}
                if strings & set(ids) or any(n in m for m in members if isinstance(m, bytes) for n in needles):
                    found.append(str(path))
                continue
            except (ValueError, OSError, zipfile.BadZipFile):
                pass
        if any(n in data for n in needles):
            found.append(str(path))
    return found


def lhash(root: Path, *argv: str) -> subprocess.CompletedProcess:
    overrides = [f"-S{k}={json.dumps(v)}" for k, v in settings(root).items()]
    return subprocess.run([sys.executable, "-m", "lifelong_hashing.cli", "--params", PARAMS, *overrides, *argv],
                          capture_output=True, text=True, cwd=ROOT)


def only(url: str, item: str) -> list[dict]:
    """What /search returns within the id prefix ``item`` (the item itself, if it is served)."""
    reply = httpx.post(url + "/search", json={"modality": "text", "k": 5, "features": [[0.0] * 999 + [1.0]],
                                              "target": "both", "filter": {"id_prefix": item}})
    assert reply.status_code == 200, reply.text
    return [h for side in reply.json()["results"][0].values() for h in side]


def test_a_takedown_is_hidden_at_once_then_erased_everywhere_and_purged_from_history(workspace, stage_files):
    root = workspace
    ws = Registry(root / "ws", str(root / "remote"))
    drop(stage_files[1], root)
    assert run(root).is_completed()  # v0002
    state = load_state(ws.state_dir)
    memory, sampled = state.method.memory.ids.tolist(), state.reference.ids.tolist()
    victims = sorted({memory[0], sampled[0], str(state.store.ids[-1])})
    quarantined = root / "quarantine" / "earlier-batch"
    quarantined.mkdir(parents=True)
    (quarantined / "batch.npz").write_bytes((ws.batches_dir / f"{_key(stage_files[1])}.npz").read_bytes())
    assert holders(ws.root, victims, skip=(".git",)) and holders(root / "remote", victims)

    with serving_pipeline(root) as url:
        assert all(only(url, v) for v in victims)
        refused = httpx.post(url + "/delete", json={"ids": [victims[0], "no-such-item"]})
        assert refused.status_code == 422 and "'no-such-item'" in refused.json()["detail"], refused.text
        assert not (root / "deletions").exists() or not list((root / "deletions").iterdir())
        (root / "deletions").mkdir(exist_ok=True)  # a request with a typo, older: quarantined first, then purged
        (root / "deletions" / "mixed.txt").write_text(f"{victims[0]}\nno-such-itme\n")
        reply = httpx.post(url + "/delete", json={"ids": victims})
        assert reply.status_code == 202 and reply.json()["hidden"] == len(victims), reply.text
        assert not any(only(url, v) for v in victims)  # hidden at once, before any pipeline run
        plain = httpx.post(url + "/search", json={"modality": "text", "k": 40, "features": [[1.0] * 1000]})
        assert len(plain.json()["results"][0]["image"]) == 40

        state = run(root)  # the service's request: erased, v0003; mixed.txt: quarantined
        assert state.is_failed() and "mixed.txt: defect" in state.message and "'no-such-itme'" in state.message
        wait_for(lambda: httpx.get(url + "/health").json()["model_version"] == "v0003", 60, "serving v0003")
        assert not any(only(url, v) for v in victims)
        again = httpx.post(url + "/delete", json={"ids": victims[:1]})
        assert again.status_code == 202 and again.json() == {"request": None, "ids": 1, "hidden": 0,
                                                             "already_deleted": 1}, again.text

    assert current_version(ws.models_dir) == "v0003" and list_versions(ws.models_dir) == ["v0003"]
    manifest = json.loads(ws.manifest_path.read_text())
    assert [e["items"] for e in manifest["deletions"].values()] == [len(victims)]
    assert not holders(ws.root, victims, skip=(".git", "cache")), "a workspace file still holds an erased item"
    assert not holders(root / "quarantine", victims)  # batch.npz rewritten, mixed.txt's request.txt too
    sent = load_batch(stage_files[1])
    assert len(load_batch(quarantined / "batch.npz")) == len(sent) - len(set(victims) & set(sent.ids.tolist()))
    assert not list((root / "deletions").glob("*.txt"))  # the request retired

    assert lhash(root, "delete", "--ids", *victims).returncode == 0  # again, as a request: a no-op
    assert run(root).is_completed() and ws.tags() == [version_tag(1), version_tag(2), version_tag(3)]
    assert not list((root / "deletions").glob("*.txt"))

    before = snapshot(root)
    (root / "deletions" / "typo.txt").write_text("no-such-item\n")
    assert run(root).is_failed()
    reasons = [json.loads(p.read_text()) for p in (root / "quarantine").glob("*/reason.json")]
    assert any("ids not in the store: 'no-such-item'" in r["reason"] for r in reasons if r["file"] == "typo.txt")
    assert snapshot(root) == before

    refused = lhash(root, "rollback", "v0002")
    assert refused.returncode == 2 and "before the erasure recorded as v0003" in refused.stderr, refused.stderr
    assert holders(ws.root / ".dvc" / "cache", victims) and holders(root / "remote", victims)  # history keeps them
    purged = lhash(root, "purge")
    assert purged.returncode == 0, purged.stderr
    assert not holders(ws.root / ".dvc" / "cache", victims) and not holders(root / "remote", victims)
    assert not any(v in ws.git("log", "-p", "--all") for v in victims)  # git never held item data
    restored = lhash(root, "rollback", "v0003")
    assert restored.returncode == 0 and "restored v0003" in restored.stdout, restored.stderr


def _key(batch_file: Path) -> str:
    import hashlib

    return hashlib.sha256(batch_file.read_bytes()).hexdigest()[:16]


def test_an_id_sent_again_is_refused_or_with_repeated_ids_replace_updates_that_item(workspace, stage_files):
    root = workspace
    ws = Registry(root / "ws", str(root / "remote"))
    stage0 = load_batch(stage_files[0])
    rows = np.arange(8)
    update = Batch(stage0.ids[rows], stage0.image[rows[::-1]], stage0.text[rows[::-1]], stage0.labels[rows[::-1]],
                   stage0.categories)  # the same ids with other items' contents
    before = snapshot(root)
    drop(save_batch(update, root / "update.npz"), root)
    assert run(root).is_failed()  # repeated_ids: reject (the default)
    reason = json.loads(next((root / "quarantine").glob("*/reason.json")).read_text())["reason"]
    assert "ids are new to the database" in reason and str(stage0.ids[0])[:40] in reason, reason
    assert snapshot(root) == before

    store0 = load_state(ws.state_dir).store
    drop(save_batch(update, root / "update.npz"), root)
    assert run(root, **{"pipeline.repeated_ids": "replace"}).is_completed()
    state = load_state(ws.state_dir)
    store = state.store
    assert len(store) == len(store0) and sorted(store.ids.tolist()) == sorted(store0.ids.tolist())
    assert store.ids[-len(rows):].tolist() == update.ids.tolist()  # old codes removed, new ones appended
    fresh = state.method.database_codes(update.with_categories(state.method.categories))
    assert all(np.array_equal(store.codes[m][-len(rows):], fresh[m]) for m in ("image", "text"))
    kept = ~np.isin(store0.ids, update.ids)  # every other item keeps its code, bit for bit
    assert np.array_equal(store.codes["text"][: kept.sum()], store0.codes["text"][kept])
    assert state.history[-1]["items_replaced"] == len(rows)
    entry = next(e for e in json.loads(ws.manifest_path.read_text())["batches"].values() if e["version"] == "v0002")
    assert entry["kind"] == "append" and entry["replaced"] == len(rows)
