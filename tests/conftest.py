"""Shared fixtures: small real computations (synthetic data, few epochs) so the suite stays fast."""

from __future__ import annotations

import shutil
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
            "validation.reports_dir": str(root / "scratch"), "monitoring.reports_dir": str(root / "scratch"),
            "monitoring.workspace": str(root / "scratch"), **extra}


def drop(src: Path, root: Path, name: str | None = None) -> Path:
    """Put a batch file into the incoming folder of the pipeline under `root`."""
    incoming = root / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(src, incoming / (name or src.name)))
