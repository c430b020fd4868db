"""Batches of real photos through the pipeline flow on a real Prefect server, git + DVC:
validated (decoded within limits, read by the backbone), trained, exported as a pixel graph,
versioned, served, and searched with a photo; a batch with a broken photo is quarantined."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from lifelong_hashing.config import EMBEDDED_DATASETS
from lifelong_hashing.files import write_npz
from lifelong_hashing.inference.versions import current_version
from lifelong_hashing.operations.registry import Registry, version_tag

from .conftest import drop, run, serving_pipeline, snapshot
from .test_images import MIRFLICKR, photo_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]

PHOTO_MODEL = {**{f"dataset.{k}": v for k, v in EMBEDDED_DATASETS["mirflickr25k"].items()},
               "dataset.path": str(MIRFLICKR / "mirflickr25k.npz"), "model.image_backbone": "squeezenet1_1"}


def photo_batch(path: Path, rows: range, new: list[str], truncate: int | None = None) -> Path:
    """Rows of mirflickr25k as a sender of photos writes them: JPEG files, tags, the labels of
    the ``new`` categories (items with none of them left out); ``truncate``: the photo cut short."""
    data = np.load(MIRFLICKR / "mirflickr25k.npz")
    names = [str(c) for c in data["category_names"]]
    columns = [names.index(c) for c in new]
    rows = [r for r in rows if data["labels"][r, columns].any()]
    files = [photo_bytes(r) for r in rows]
    if truncate is not None:
        files[truncate] = files[truncate][:600]
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])])
    write_npz(path, {"ids": data["ids"][rows], "image_files": np.frombuffer(b"".join(files), np.uint8),
                     "image_file_offsets": offsets, "text": data["text_tags_bow"][rows].astype(np.float32),
                     "labels": data["labels"][np.ix_(rows, columns)], "categories": np.array(new),
                     "new_categories": np.array(new)})
    return path


def test_photo_batches_are_learned_versioned_and_served_and_a_broken_photo_is_quarantined(tmp_path):
    names = [str(c) for c in np.load(MIRFLICKR / "mirflickr25k.npz")["category_names"]]
    ws = Registry(tmp_path / "ws", str(tmp_path / "remote"))
    drop(photo_batch(tmp_path / "photos-1.npz", range(0, 160), names[:16]), tmp_path)
    state = run(tmp_path, **PHOTO_MODEL)
    assert state.is_completed(), state.message
    manifest = json.loads((ws.models_dir / "versions" / "v0001" / "manifest.json").read_text())
    assert manifest["encoders"]["image"]["input"] == "pixels"
    assert manifest["encoders"]["image"]["parity"]["bit_agreement"] == 1.0
    assert (ws.state_dir / "photos.npz").exists()

    before = snapshot(tmp_path)
    drop(photo_batch(tmp_path / "broken.npz", range(160, 230), names[16:], truncate=2), tmp_path)
    state = run(tmp_path, **PHOTO_MODEL)
    assert state.is_failed()
    (kept,) = list((tmp_path / "quarantine").iterdir())
    reason = json.loads((kept / "reason.json").read_text())["reason"]
    assert "photos are JPEG or PNG files" in reason and "(1 of" in reason
    assert snapshot(tmp_path) == before

    drop(photo_batch(tmp_path / "photos-2.npz", range(160, 300), names[16:]), tmp_path)
    state = run(tmp_path, **PHOTO_MODEL)
    assert state.is_completed(), state.message
    assert current_version(ws.models_dir) == "v0002" and ws.tags()[-1] == version_tag(2)

    with serving_pipeline(tmp_path, **PHOTO_MODEL) as url:
        photo = photo_bytes(250)
        reply = httpx.post(url + "/search", data={"k": "10", "target": "image"},
                           files=[("image", ("im.jpg", photo, "image/jpeg"))], timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model_version"] == "v0002"
        hits = reply.json()["results"][0]["image"]
        assert len(hits) == 10 and all(h["id"].startswith("mirflickr-") and h["labels"] for h in hits)
