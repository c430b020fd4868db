"""Batch validation through Great Expectations on the real Wikipedia data: a model trained on
the base stage judges the next stage's batch, clean and with one defect at a time."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lifelong_hashing import runner
from lifelong_hashing.batch import save_batch
from lifelong_hashing.cli import main
from lifelong_hashing.config import load_params
from lifelong_hashing.state import new_state, save_state
from lifelong_hashing.validation import BatchExpectations, validate_batch

from .conftest import ROOT


@pytest.fixture(scope="module")
def wikipedia(tmp_path_factory):
    """Stage 0 of Wikipedia trained for one epoch, its state saved, and stage 1's batch."""
    params = load_params(ROOT / "params.yaml", {"train.epochs": 1, "train.device": "cpu",
                                                "dataset.path": str(ROOT / "data/wikipedia/wikipedia.npz")})
    plan = runner.build_plan(params)
    state = new_state(params, plan.stages[0].batch.image.shape[1:], plan.stages[0].batch.text.shape[1])
    runner.run_stage(state, plan)
    folder = tmp_path_factory.mktemp("wikipedia")
    save_state(state, folder / "state")
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump()))
    return {"params": params, "state": state, "state_dir": folder / "state", "params_file": params_file,
            "next": plan.stages[1].batch, "stored_ids": plan.stages[0].batch.ids}


def _arrays(batch) -> dict:
    return {"ids": batch.ids.copy(), "image": batch.image.copy(), "text": batch.text.copy(),
            "labels": batch.labels.copy(), "categories": np.asarray(batch.categories),
            "new_categories": np.asarray(batch.new_categories)}


def _validate(wikipedia, tmp_path, arrays):
    path = tmp_path / "incoming.npz"
    np.savez(path, **arrays)
    return validate_batch(path, BatchExpectations.from_state(wikipedia["state"]), wikipedia["params"].validation,
                          tmp_path / "report")


def _only_failure(result, field):
    assert not result.accepted
    assert [f.field for f in result.failures] == [field], result.summary()
    return result.failures[0]


def test_clean_stage_batch_is_accepted_with_its_new_categories(wikipedia, tmp_path):
    path = save_batch(wikipedia["next"], tmp_path / "stage1.npz")
    result = validate_batch(path, BatchExpectations.from_state(wikipedia["state"]), wikipedia["params"].validation,
                            tmp_path / "report")
    assert result.accepted, result.summary()
    assert result.new_categories == ["literature", "media"] and result.rows == len(wikipedia["next"])
    assert result.expectations >= 13 and not result.failures
    saved = json.loads(Path(result.json_path).read_text())
    assert saved["accepted"] is True and saved["sha256"] == result.sha256
    html = Path(result.html_path).read_text()  # the GX data docs page of this validation
    assert "Great Expectations" in html and "label_non_binary" in html and "undeclared_categories" in html


def test_wrong_dimension_is_rejected(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    a["text"] = a["text"][:, :999]
    failure = _only_failure(_validate(wikipedia, tmp_path, a), "text_shape")
    assert failure.rows == len(a["ids"]) and "1000 dimensions" in failure.description
    assert failure.examples[0].endswith(": 999")


def test_nan_is_rejected_naming_the_item(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    a["image"][7, 3] = np.nan
    failure = _only_failure(_validate(wikipedia, tmp_path, a), "image_nonfinite")
    assert failure.rows == 1 and failure.examples == [f"{a['ids'][7]}: 1"]


def test_non_binary_labels_are_rejected(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    a["labels"][[2, 5]] = a["labels"][[2, 5]] * 3
    failure = _only_failure(_validate(wikipedia, tmp_path, a), "label_non_binary")
    assert failure.rows == 2 and {e.split(":")[0] for e in failure.examples} == set(a["ids"][[2, 5]])


def test_ids_already_in_the_database_are_rejected(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    a["ids"][:3] = wikipedia["stored_ids"][:3]
    failure = _only_failure(_validate(wikipedia, tmp_path, a), "id_in_database")
    assert failure.rows == 3 and failure.examples[0].startswith(str(wikipedia["stored_ids"][0]))


def test_undeclared_unknown_category_is_rejected(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    a["categories"] = np.append(a["categories"], "poetry")
    a["labels"] = np.concatenate([a["labels"], np.zeros((len(a["ids"]), 1), np.uint8)], axis=1)
    a["labels"][4] = 0
    a["labels"][4, -1] = 1  # one item labelled only with a category nobody declared
    failure = _only_failure(_validate(wikipedia, tmp_path, a), "undeclared_categories")
    assert failure.rows == 1 and failure.examples == [f"{a['ids'][4]}: poetry"]
    a["new_categories"] = np.append(a["new_categories"], "poetry")  # declared: now fine
    assert _validate(wikipedia, tmp_path, a).accepted


def test_scaled_features_fall_outside_the_reference_range(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    a["image"] *= 5
    result = _validate(wikipedia, tmp_path, a)
    assert "image_out_of_range" in [f.field for f in result.failures] and not result.accepted


def test_corrupt_file_is_rejected_without_a_traceback(wikipedia, tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    result = validate_batch(path, BatchExpectations.from_state(wikipedia["state"]), wikipedia["params"].validation,
                            tmp_path / "report")
    assert not result.accepted and result.failures[0].expectation == "batch_structure"
    assert "corrupt" in result.failures[0].description


def test_cli_validate_prints_what_failed_and_exits_non_zero(wikipedia, tmp_path, capsys):
    a = _arrays(wikipedia["next"])
    a["image"][0, 0] = np.inf
    bad = tmp_path / "bad.npz"
    np.savez(bad, **a)
    args = ["--params", str(wikipedia["params_file"]), "validate", "--state", str(wikipedia["state_dir"])]
    assert main([*args, str(bad), "--out", str(tmp_path / "bad-report")]) == 1
    out = capsys.readouterr().out
    assert "REJECTED" in out and "image_nonfinite" in out and str(a["ids"][0]) in out
    assert (tmp_path / "bad-report" / "validation.json").exists()
    assert list((tmp_path / "bad-report" / "docs").rglob("index.html"))
    good = save_batch(wikipedia["next"], tmp_path / "good.npz")
    assert main([*args, str(good), "--out", str(tmp_path / "good-report")]) == 0
    assert "ACCEPTED" in capsys.readouterr().out
