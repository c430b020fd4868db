import time

import numpy as np
import pytest

from lifelong_hashing.engine.batch import Batch, BatchError, labels_from_ids, load_batch, make_batch, save_batch

pytestmark = pytest.mark.unit


def _batch(n=5, source="<memory>"):
    rng = np.random.default_rng(0)
    labels = np.eye(3, dtype=np.uint8)[rng.integers(3, size=n)]
    return make_batch([f"id{i}" for i in range(n)], rng.random((n, 4)), rng.random((n, 6)), labels,
                      ["a", "b", "c"], source=source)


def test_round_trip_keeps_every_field(tmp_path):
    b = _batch()
    back = load_batch(save_batch(b, tmp_path / "b.npz"))
    assert back.categories == b.categories
    for field in ("ids", "image", "text", "labels"):
        np.testing.assert_array_equal(getattr(back, field), getattr(b, field))
    assert back.image.dtype == np.float32 and back.labels.dtype == np.uint8


def test_declared_new_categories_round_trip_and_must_be_batch_categories(tmp_path):
    b = _batch()
    declared = Batch(b.ids, b.image, b.text, b.labels, b.categories, new_categories=("c",))
    assert load_batch(save_batch(declared, tmp_path / "b.npz")).new_categories == ("c",)
    assert load_batch(save_batch(b, tmp_path / "plain.npz")).new_categories == ()
    with pytest.raises(BatchError, match="new_categories.*'z'"):
        Batch(b.ids, b.image, b.text, b.labels, b.categories, new_categories=("z",))


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (lambda a: a.update(image=np.ones((4, 4))), "image", "4 rows but 5 ids"),
        (lambda a: a.update(text=np.ones((5,))), "text", "expected 2-D"),
        (lambda a: a.update(image=np.where(np.eye(5, 4) > 0, np.nan, 1.0)), "image", "NaN"),
        (lambda a: a.update(text=np.full((5, 6), np.inf)), "text", "NaN or infinite"),
        (lambda a: a.update(labels=np.full((5, 3), 2)), "labels", "0/1"),
        (lambda a: a.update(labels=np.zeros((5, 3))), "labels", "without any label"),
        (lambda a: a.update(labels=np.ones((5, 2))), "labels", "expected shape (5, 3)"),
        (lambda a: a.update(ids=["x"] * 5), "ids", "duplicate ids"),
        (lambda a: a.update(categories=["a", "a", "c"]), "categories", "unique"),
    ],
)
def test_bad_fields_raise_naming_the_field(change, field, words):
    b = _batch()
    args = {"ids": b.ids, "image": b.image, "text": b.text, "labels": b.labels, "categories": b.categories}
    change(args)
    with pytest.raises(BatchError) as err:
        make_batch(**args, source="incoming/x.npz")
    assert err.value.field == field and words in str(err.value) and "incoming/x.npz" in str(err.value)


def test_empty_batch_is_rejected():
    with pytest.raises(BatchError, match="empty batch"):
        make_batch([], np.zeros((0, 4)), np.zeros((0, 6)), np.zeros((0, 3)), ["a", "b", "c"])


def test_unknown_label_ids_are_named():
    assert labels_from_ids([0, 2, [0, 1]], 3).tolist() == [[1, 0, 0], [0, 0, 1], [1, 1, 0]]
    with pytest.raises(BatchError, match=r"row 1: label ids \[7\] outside 0..2"):
        labels_from_ids([0, 7], 3)


def test_corrupt_truncated_and_incomplete_files(tmp_path):
    path = save_batch(_batch(), tmp_path / "good.npz")
    data = path.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    np.savez(tmp_path / "incomplete.npz", ids=np.array(["a"]), image=np.ones((1, 2), np.float32))
    for name, words in (("truncated", "corrupt or truncated"), ("garbage", "corrupt or truncated"),
                        ("incomplete", "missing from file"), ("absent", "does not exist")):
        with pytest.raises(BatchError, match=words) as err:
            load_batch(tmp_path / f"{name}.npz")
        assert f"{name}.npz" in str(err.value)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    target = save_batch(_batch(3), tmp_path / "b.npz")
    before = target.read_bytes()

    def broken(member, array, **kwargs):
        member.write(b"half an array")
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", broken)
    with pytest.raises(OSError, match="disk full"):
        save_batch(_batch(5), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz"]


def test_vocabulary_growth_and_concat():
    a = _batch(3)
    b = make_batch(["n1"], np.ones((1, 4)), np.ones((1, 6)), [[0, 1]], ["c", "d"])
    both = Batch.concat([a, b])
    assert both.categories == ("a", "b", "c", "d")
    assert both.labels[-1].tolist() == [0, 0, 0, 1] and both.labels[:3, :3].tolist() == a.labels.tolist()
    with pytest.raises(BatchError, match="unknown to the vocabulary"):
        b.with_categories(("a", "b", "c"))


def test_the_same_batch_gives_the_same_bytes(tmp_path):
    """No zip timestamps: DVC's hash of a file follows its content (files.write_npz)."""
    first = save_batch(_batch(3), tmp_path / "a.npz").read_bytes()
    time.sleep(2.1)  # zip timestamps have a 2-second resolution
    assert save_batch(_batch(3), tmp_path / "b.npz").read_bytes() == first
    assert load_batch(tmp_path / "b.npz").ids.tolist() == _batch(3).ids.tolist()


def test_unlabelled_rows_are_marked_and_round_trip(tmp_path):
    b = _batch()
    labels = b.labels.copy()
    labels[[1, 3]] = 0
    mixed = make_batch(b.ids, b.image, b.text, labels, b.categories, labelled=np.array([1, 0, 1, 0, 1], bool))
    back = load_batch(save_batch(mixed, tmp_path / "mixed.npz"))
    np.testing.assert_array_equal(back.labelled, [True, False, True, False, True])
    assert back.labelled_part().ids.tolist() == ["id0", "id2", "id4"]
    assert not np.load(save_batch(b, tmp_path / "plain.npz")).__contains__("labelled")  # old files unchanged
    assert load_batch(tmp_path / "plain.npz").all_labelled


def test_a_row_without_labels_must_be_marked_unlabelled():
    b = _batch()
    labels = b.labels.copy()
    labels[2] = 0
    with pytest.raises(BatchError, match="1 rows without any label .*'id2'.*labelled=False"):
        make_batch(b.ids, b.image, b.text, labels, b.categories)
    with pytest.raises(BatchError, match="labelled.*booleans"):
        make_batch(b.ids, b.image, b.text, b.labels, b.categories, labelled=np.ones(5))


def test_concat_subset_and_vocabulary_changes_keep_the_labelled_mask():
    b = _batch().without_labels([0, 4])
    late = _batch(3)
    late = make_batch(["late0", "late1", "late2"], late.image, late.text, late.labels, late.categories)
    wide = Batch.concat([b, late.without_labels([1])]).with_categories(["a", "b", "c", "d"])
    np.testing.assert_array_equal(wide.labelled, [False, True, True, True, False, True, False, True])
    np.testing.assert_array_equal(wide.subset(np.arange(2)).labelled, [False, True])
    np.testing.assert_array_equal(b.for_model(("a", "b", "c")).labelled, b.labelled)
