"""Batch validation through Great Expectations on the real Wikipedia data: a model trained on
the base stage judges the next stage's batch, clean and with one defect at a time."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from lifelong_hashing.cli import main
from lifelong_hashing.config import load_params
from lifelong_hashing.engine import runner
from lifelong_hashing.engine.batch import BatchError, load_batch, save_batch
from lifelong_hashing.engine.state import new_state, save_state
from lifelong_hashing.operations.validation import BatchExpectations, validate_batch

from .conftest import ROOT

pytestmark = pytest.mark.integration


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


def _npz_declaring(path: Path, arrays: dict, name: str, shape: tuple[int, ...]) -> Path:
    """An npz whose member ``name`` declares ``shape`` but holds only a few bytes: what a hostile
    sender can make in a small file."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w") as fh:
                if key == name:
                    np.lib.format.write_array_header_2_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
                    fh.write(b"\0" * 64)
                else:
                    np.lib.format.write_array(fh, np.asarray(value), allow_pickle=False)
    return path


def test_a_small_file_declaring_a_huge_array_is_refused_from_its_header(wikipedia, tmp_path):
    """10^12 floats declared: reading them would raise MemoryError (or swap); the header is enough."""
    path = _npz_declaring(tmp_path / "bomb.npz", _arrays(wikipedia["next"]), "image", (10**6, 10**6))
    assert path.stat().st_size < 2_000_000
    result = validate_batch(path, BatchExpectations.from_state(wikipedia["state"]), wikipedia["params"].validation,
                            tmp_path / "report")
    failure = _only_failure(result, "image")
    assert "shape (1000000, 1000000) of float32" in failure.description and "bytes uncompressed" in failure.description
    with pytest.raises(BatchError, match="over the limit"):
        load_batch(path, max_rows=10**6, max_bytes=wikipedia["params"].validation.max_bytes)


def test_rows_and_bytes_are_refused_before_decompressing(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    n = 250_000
    big = {"ids": np.array([f"x{i}" for i in range(n)]), "image": np.zeros((n, 128), np.float32),
           "text": np.zeros((n, 8), np.float32), "labels": np.ones((n, 1), np.uint8),
           "categories": a["categories"][:1]}
    path = tmp_path / "rows.npz"
    np.savez_compressed(path, **big)
    limited = wikipedia["params"].validation.model_copy(update={"max_rows": 1000})
    result = validate_batch(path, BatchExpectations.from_state(wikipedia["state"]), limited, tmp_path / "r1")
    assert not result.accepted and "declares 250,000 rows, over the limit of 1,000" in result.reason
    small_bytes = wikipedia["params"].validation.model_copy(update={"max_bytes": 10_000_000})
    result = validate_batch(path, BatchExpectations.from_state(wikipedia["state"]), small_bytes, tmp_path / "r2")
    assert not result.accepted and "bytes uncompressed, over the limit of 10,000,000" in result.reason


def test_object_arrays_are_refused_without_unpickling(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    a["ids"] = a["ids"].astype(object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **a)
    failure = _only_failure(validate_batch(path, BatchExpectations.from_state(wikipedia["state"]),
                                           wikipedia["params"].validation, tmp_path / "report"), "ids")
    assert "pickles are never loaded" in failure.description


def test_values_beyond_float32_are_non_finite_as_training_reads_them(wikipedia, tmp_path):
    """float64 1e39 is finite, but training's float32 cast makes it inf: validation must see the same."""
    a = _arrays(wikipedia["next"])
    a["text"] = a["text"].astype(np.float64)
    a["text"][11, 0] = 1e39
    failure = _only_failure(_validate(wikipedia, tmp_path, a), "text_nonfinite")
    assert failure.rows == 1 and failure.examples == [f"{a['ids'][11]}: 1"]


def test_declarations_must_agree_with_the_columns(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    a["new_categories"] = np.append(a["new_categories"], "opera")  # declared, but no such column
    failure = _only_failure(_validate(wikipedia, tmp_path, a), "new_categories")
    assert "not among the batch's categories: ['opera']" in failure.description



def test_a_column_no_item_carries_is_dropped_as_training_drops_it(wikipedia, tmp_path):
    """A sender's wider taxonomy: an undeclared, unknown column that no item uses is not a defect."""
    a = _arrays(wikipedia["next"])
    a["categories"] = np.append(a["categories"], "poetry")
    a["labels"] = np.concatenate([a["labels"], np.zeros((len(a["ids"]), 1), np.uint8)], axis=1)
    result = _validate(wikipedia, tmp_path, a)
    assert result.accepted, result.summary()
    batch = load_batch(tmp_path / "incoming.npz").for_model(wikipedia["state"].method.categories)
    assert "poetry" not in batch.categories
    assert batch.categories == (*wikipedia["state"].method.categories, "literature", "media")


def test_whatever_validation_accepts_loads_for_training(wikipedia, tmp_path):
    """The cases above all load for training only if validation accepted them: one definition."""
    a = _arrays(wikipedia["next"])
    a["image"] = a["image"].astype(np.float64)  # another dtype, same values: both accept
    result = _validate(wikipedia, tmp_path, a)
    assert result.accepted, result.summary()
    batch = load_batch(tmp_path / "incoming.npz")
    assert batch.image.dtype == np.float32 and len(batch) == result.rows


def _unlabelled(arrays: dict, rows) -> dict:
    labelled = np.ones(len(arrays["ids"]), bool)
    labelled[rows] = False
    arrays["labels"][rows] = 0
    return {**arrays, "labelled": labelled}


def test_unlabelled_items_are_accepted_beside_labelled_ones(wikipedia, tmp_path, capsys):
    result = _validate(wikipedia, tmp_path, _unlabelled(_arrays(wikipedia["next"]), np.arange(0, 300, 2)))
    assert result.accepted, result.summary()
    assert result.new_categories == ["literature", "media"]
    only = _arrays(wikipedia["next"])  # a batch nobody labelled, through `lhash validate`
    np.savez(tmp_path / "unlabelled.npz", **_unlabelled({**only, "new_categories": np.array([], str)},
                                                        np.arange(len(only["ids"]))))
    args = ["--params", str(wikipedia["params_file"]), "validate", "--state", str(wikipedia["state_dir"])]
    assert main([*args, str(tmp_path / "unlabelled.npz"), "--out", str(tmp_path / "cli")]) == 0
    assert "ACCEPTED" in capsys.readouterr().out
    assert load_batch(tmp_path / "unlabelled.npz").labelled.sum() == 0


@pytest.mark.parametrize(("change", "field", "words"), [
    (lambda a: a["labels"].__setitem__((0, 0), 1), "unlabelled_label_count", "carry no labels"),
    (lambda a: a.update(labelled=a["labelled"].astype(np.uint8)), "labelled", "booleans"),
    (lambda a: a["labels"].__setitem__((1, 0), 0) or a["labelled"].__setitem__(1, True), "label_count", "1.."),
])
def test_bad_unlabelled_marks_are_rejected_naming_the_field(wikipedia, tmp_path, change, field, words):
    a = _unlabelled(_arrays(wikipedia["next"]), [0])
    a["labels"][1] = 0
    a["labelled"][1] = False
    change(a)
    failure = next(f for f in _validate(wikipedia, tmp_path, a).failures if f.field == field)
    assert words in failure.description


def test_a_new_category_only_unlabelled_items_carry_is_rejected(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    media = a["labels"][:, list(a["categories"]).index("media")] == 1
    failure = _only_failure(_validate(wikipedia, tmp_path, _unlabelled(a, media)), "new_categories")
    assert "no labelled item carries them: ['media']" in failure.description


@pytest.mark.parametrize(("odd", "why"), [
    (" wiki-1", "leading or trailing whitespace"),
    ("wiki-1\u200b", "zero-width"),
    ("cafe\u0301", "NFC"),
    ("wiki\x07", "control"),
])
def test_ids_that_are_not_canonical_are_rejected(wikipedia, tmp_path, odd, why):
    a = _arrays(wikipedia["next"])
    a["ids"] = a["ids"].astype("<U40")
    a["ids"][3] = odd
    failure = _only_failure(_validate(wikipedia, tmp_path, a), "id_problem")
    assert failure.rows == 1 and why in failure.examples[0]


def test_ids_that_collide_after_case_folding_are_rejected_naming_both(wikipedia, tmp_path):
    a = _arrays(wikipedia["next"])
    a["ids"] = a["ids"].astype("<U40")
    stored = str(wikipedia["stored_ids"][0])  # Wikipedia's ids are hex digests: letters in them
    a["ids"][0] = stored.upper()
    a["ids"][1], a["ids"][2] = "Item-x", "item-X"  # the same id twice in the batch, but for case
    result = _validate(wikipedia, tmp_path, a)
    fields = {f.field: f for f in result.failures}
    assert fields["id_in_database"].examples == [f"{a['ids'][0]}: {stored}"]
    assert fields["id_key"].rows == 2 and set(fields) == {"id_in_database", "id_key"}


@pytest.mark.parametrize("name", ["Literature", "literature ", "ｌiterature"])
def test_a_category_that_differs_from_another_only_in_case_or_form_is_rejected(wikipedia, tmp_path, name):
    a = _arrays(wikipedia["next"])
    a["categories"] = np.where(a["categories"] == "media", name, a["categories"])
    a["new_categories"] = np.where(a["new_categories"] == "media", name, a["new_categories"])
    failure = _only_failure(_validate(wikipedia, tmp_path, a), "categories")
    assert repr(name) in failure.description and ("'literature'" in failure.description or "canonical" in
                                                  failure.description)


def _with_new_categories(batch, n: int) -> dict:
    """The batch with ``n`` more new categories, one item of each."""
    a = _arrays(batch)
    extra = [f"c{i}" for i in range(n)]
    a["categories"] = np.append(a["categories"], extra)
    a["new_categories"] = np.append(a["new_categories"], extra)
    a["labels"] = np.concatenate([a["labels"], np.zeros((len(a["ids"]), n), np.uint8)], axis=1)
    a["labels"][:n] = 0
    a["labels"][:n, -n:] = np.eye(n, dtype=np.uint8)
    return a


def test_a_batch_naming_too_many_categories_is_refused_from_its_headers(wikipedia, tmp_path):
    path = tmp_path / "wide.npz"
    np.savez(path, **_with_new_categories(wikipedia["next"], 60))
    limited = wikipedia["params"].validation.model_copy(update={"max_categories": 50})
    result = validate_batch(path, BatchExpectations.from_state(wikipedia["state"]), limited, tmp_path / "r")
    assert not result.accepted and "over the limit of 50 (validation.max_categories)" in result.reason
    assert result.expectations == 1  # refused before the suite ran
    a = _with_new_categories(wikipedia["next"], 46)
    new_only = ~np.isin(a["categories"], wikipedia["state"].method.categories)  # no known column
    a["categories"], a["labels"] = a["categories"][new_only], a["labels"][:, new_only]
    np.savez(path, **a)  # 48 columns fit the batch limit; 4 known + 48 new do not fit the model's
    result = validate_batch(path, BatchExpectations.from_state(wikipedia["state"]), limited, tmp_path / "r2")
    assert [f.field for f in result.failures] == ["new_categories"] and "would know 52" in result.reason


def _rezip(src: Path, dest: Path, edit) -> Path:
    """``src``'s members written again, ``edit(info, data)`` choosing each one's header and bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            for new_info, data in edit(info, zin.read(info)):
                zout.writestr(new_info, data)
    return dest


@pytest.mark.parametrize(("edit", "words"), [
    (lambda info, data: [(info, data), (info, data)] if info.filename == "labels.npy" else [(info, data)],
     "appear more than once: 'labels.npy'"),
    (lambda info, data: [(zipfile.ZipInfo(info.filename), data)] if info.filename != "ids.npy"
     else [(_with(zipfile.ZipInfo(info.filename), compress_type=zipfile.ZIP_LZMA), data)],
     "uses compression method 14"),
])
def test_a_zip_that_is_not_plain_is_a_defect_named_at_once(wikipedia, tmp_path, edit, words, capsys):
    good = save_batch(wikipedia["next"], tmp_path / "good.npz")
    bad = _rezip(good, tmp_path / "odd.npz", edit)
    result = validate_batch(bad, BatchExpectations.from_state(wikipedia["state"]), wikipedia["params"].validation,
                            tmp_path / "report")
    assert not result.accepted and words in result.reason
    with pytest.raises(BatchError, match="zip member"):
        load_batch(bad)
    args = ["--params", str(wikipedia["params_file"]), "validate", "--state", str(wikipedia["state_dir"])]
    assert main([*args, str(bad), "--out", str(tmp_path / "cli")]) == 1
    captured = capsys.readouterr()
    assert "REJECTED" in captured.out and "Traceback" not in captured.out + captured.err


def test_an_encrypted_member_is_a_defect_named_at_once(wikipedia, tmp_path):
    good = save_batch(wikipedia["next"], tmp_path / "good.npz")
    data = bytearray(good.read_bytes())
    # bit 0 of the general purpose flags, in every local and central header: "encrypted"
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        while at != -1:
            data[at + offset] |= 0x1
            at = data.find(signature, at + 4)
    bad = tmp_path / "encrypted.npz"
    bad.write_bytes(bytes(data))
    result = validate_batch(bad, BatchExpectations.from_state(wikipedia["state"]), wikipedia["params"].validation,
                            tmp_path / "report")
    assert not result.accepted and "is encrypted" in result.reason


def _with(info: zipfile.ZipInfo, **fields) -> zipfile.ZipInfo:
    for key, value in fields.items():
        setattr(info, key, value)
    return info
