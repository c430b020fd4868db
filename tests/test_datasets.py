import h5py
import numpy as np
import pytest
import scipy.io

from lifelong_hashing.config import DatasetConfig
from lifelong_hashing.engine.batch import BatchError
from lifelong_hashing.engine.datasets import load_dataset, load_dcmh_mat, synthetic_dataset

from .conftest import ROOT, WIKIPEDIA

pytestmark = pytest.mark.unit


def test_embedded_wikipedia_official_split():
    ds = load_dataset(DatasetConfig(path=str(WIKIPEDIA)))
    assert (len(ds.database), len(ds.queries)) == (2173, 693)
    assert ds.database.image.shape[1] == 128 and ds.database.text.shape[1] == 1000
    assert ds.database.categories[:3] == ("art", "biology", "geography")
    assert (ds.database.labels.sum(axis=1) == 1).all()
    counts = ds.database.labels.sum(axis=0) + ds.queries.labels.sum(axis=0)
    assert counts.tolist() == [172, 360, 340, 333, 267, 236, 237, 185, 285, 451]
    assert not set(ds.database.ids) & set(ds.queries.ids)


def _dcmh_arrays(n=60, classes=5):
    rng = np.random.default_rng(1)
    labels = (rng.random((n, classes)) < 0.3).astype(np.uint8)
    labels[np.arange(n), rng.integers(classes, size=n)] = 1
    return {"LAll": labels, "YAll": (rng.random((n, 30)) < 0.1).astype(np.float64),
            "FAll": rng.normal(size=(n, 16)).astype(np.float32)}


def test_dcmh_mat_v5_files(tmp_path):
    arrays = _dcmh_arrays()
    for key, value in arrays.items():
        scipy.io.savemat(tmp_path / f"mirflickr25k-{key.lower()}.mat", {key: value})
    ds = load_dcmh_mat(tmp_path, query_size=10, name="mirflickr")
    assert (len(ds.database), len(ds.queries)) == (50, 10)
    both = np.concatenate([ds.database.image, ds.queries.image])
    np.testing.assert_allclose(np.sort(both, axis=0), np.sort(arrays["FAll"], axis=0))
    assert ds.database.ids[0].startswith("mirflickr-")


def test_dcmh_mat_v73_hdf5_is_transposed_back(tmp_path):
    arrays = _dcmh_arrays()
    # MATLAB v7.3 writes column-major arrays: HDF5 readers see the axes reversed.
    with h5py.File(tmp_path / "nus.mat", "w") as fh:
        for key, value in arrays.items():
            fh.create_dataset(key, data=value.T)
    ds = load_dcmh_mat(tmp_path / "nus.mat", query_size=10)
    assert ds.database.labels.shape[1] == 5 and ds.database.text.shape[1] == 30
    rows = {i: r for i, r in zip(ds.database.ids, ds.database.labels, strict=True)}
    assert rows["dcmh-0000003"].tolist() == arrays["LAll"][3].tolist()


def test_dcmh_pixels_are_scaled(tmp_path):
    arrays = _dcmh_arrays(n=20)
    del arrays["FAll"]
    arrays["IAll"] = np.full((20, 3, 8, 8), 255, np.uint8)
    scipy.io.savemat(tmp_path / "coco.mat", arrays)
    ds = load_dcmh_mat(tmp_path, query_size=5)
    assert ds.database.image.shape == (15, 3, 8, 8) and ds.database.image.max() == 1.0


def test_dcmh_errors_name_what_is_missing(tmp_path):
    with pytest.raises(BatchError, match="no .mat files"):
        load_dcmh_mat(tmp_path)
    arrays = _dcmh_arrays()
    scipy.io.savemat(tmp_path / "only-labels.mat", {"LAll": arrays["LAll"]})
    with pytest.raises(BatchError, match="'YAll': missing"):
        load_dcmh_mat(tmp_path)
    (tmp_path / "only-labels.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(BatchError, match="cannot read .mat file"):
        load_dcmh_mat(tmp_path)


def test_generic_npz_without_split_uses_seeded_queries(tmp_path):
    arrays = _dcmh_arrays()
    np.savez(tmp_path / "mine.npz", img=arrays["FAll"], txt=arrays["YAll"].astype(np.float32), lab=arrays["LAll"])
    cfg = DatasetConfig(path=str(tmp_path / "mine.npz"), name="mine", image_key="img", text_key="txt",
                        labels_key="lab", categories_key=None, ids_key=None, split_key=None, query_size=12)
    a, b = load_dataset(cfg, seed=3), load_dataset(cfg, seed=3)
    assert len(a.queries) == 12 and a.queries.ids.tolist() == b.queries.ids.tolist()
    assert a.database.categories == tuple(f"class_{i:02d}" for i in range(5))
    cfg_bad = cfg.model_copy(update={"text_key": "nope"})
    with pytest.raises(BatchError, match="'nope': missing from file"):
        load_dataset(cfg_bad)


def test_synthetic_is_seeded_multilabel_and_two_modal():
    a = synthetic_dataset(2000, 10, 32, 50, query_size=200, seed=5)
    b = synthetic_dataset(2000, 10, 32, 50, query_size=200, seed=5)
    c = synthetic_dataset(2000, 10, 32, 50, query_size=200, seed=6)
    np.testing.assert_array_equal(a.database.image, b.database.image)
    assert not np.array_equal(a.database.image, c.database.image)
    labels = a.database.labels
    assert a.database.image.shape[1] == 32 and a.database.text.shape[1] == 50
    assert 0.2 < (labels.sum(axis=1) > 1).mean() < 0.6  # a real share of multi-label items
    assert (a.database.text >= 0).all() and a.database.ids[0].startswith("synthetic-")
    # class structure: same-class items are closer than other-class items in image space
    single = labels.sum(axis=1) == 1
    x, y = a.database.image[single], labels[single].argmax(axis=1)
    centroids = np.stack([x[y == k].mean(axis=0) for k in range(10)])
    nearest = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == y).mean() > 0.5


@pytest.mark.parametrize("name", ["wikipedia", "mirflickr25k"])
def test_the_validation_split_comes_from_the_training_side_and_never_holds_a_test_query(name):
    from lifelong_hashing.config import EMBEDDED_DATASETS

    cfg = DatasetConfig(**{**EMBEDDED_DATASETS[name], "path": str(ROOT / EMBEDDED_DATASETS[name]["path"])})
    test = load_dataset(cfg, seed=4)
    validation = load_dataset(cfg.model_copy(update={"queries": "validation"}), seed=4)
    train_side = set(test.database.ids.tolist())
    queries, database = set(validation.queries.ids.tolist()), set(validation.database.ids.tolist())
    assert queries <= train_side and database <= train_side and not queries & database
    assert queries | database == train_side
    assert not queries & set(test.queries.ids.tolist())
    assert abs(len(queries) - cfg.validation_share * len(train_side)) <= 1
    again = load_dataset(cfg.model_copy(update={"queries": "validation"}), seed=5)
    assert set(again.queries.ids.tolist()) != queries  # a tuning seed draws its own split
