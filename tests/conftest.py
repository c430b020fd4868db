"""Shared fixtures: small real computations (synthetic data, few epochs) so the suite stays fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifelong_hashing.config import Params

ROOT = Path(__file__).resolve().parents[1]
WIKIPEDIA = ROOT / "data" / "wikipedia" / "wikipedia.npz"


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
