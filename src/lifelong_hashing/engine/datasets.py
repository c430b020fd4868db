"""Loaders for the layouts users bring, each returning a database/query split of ``Batch``es.

- ``npz``: any npz with named keys (the embedded Wikipedia data is one, see ``data/wikipedia``);
- ``dcmh_mat``: DCMH-style MIRFlickr-25K / NUS-WIDE / MS-COCO folders of .mat files
  (LAll, YAll, and image features or pixels in FAll/XAll/IAll), MATLAB v5 or v7.3 (HDF5);
- ``synthetic``: a seeded generator with label co-occurrence, for tests and scale benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lifelong_hashing.config import DatasetConfig
from lifelong_hashing.engine.batch import Batch, BatchError, labels_from_ids, make_batch, read_npz

IMAGE_KEYS = ("FAll", "XAll", "IAll")  # DCMH layouts: features first, pixels last


@dataclass(frozen=True)
class SplitDataset:
    """The database (which is also the training data) and the fixed held-out queries."""

    name: str
    database: Batch
    queries: Batch


def load_dataset(cfg: DatasetConfig, seed: int = 0) -> SplitDataset:
    """The dataset's database and queries: its test queries, or with ``cfg.queries ==
    "validation"`` a validation split of the training side in their place."""
    if cfg.kind == "synthetic":
        split = synthetic_dataset(cfg.n_items, cfg.n_categories, cfg.image_dim, cfg.text_dim,
                                  noise=cfg.noise, query_size=min(cfg.query_size, cfg.n_items // 5), seed=seed)
    elif cfg.kind == "dcmh_mat":
        split = load_dcmh_mat(cfg.path, query_size=cfg.query_size, seed=seed,
                              category_names=cfg.category_names, name=cfg.name)
    else:
        split = load_npz_dataset(cfg, seed=seed)
    return validation_split(split, cfg.validation_share, seed) if cfg.queries == "validation" else split


def validation_split(split: SplitDataset, share: float, seed: int) -> SplitDataset:
    """A seeded ``share`` of the database as queries, the rest as the database; the test queries
    are dropped, so nothing tuned on this split has seen them."""
    perm = np.random.default_rng([seed, 2]).permutation(len(split.database))
    is_query = np.zeros(len(split.database), bool)
    is_query[perm[: max(1, int(round(share * len(split.database))))]] = True
    return SplitDataset(split.name, split.database.subset(~is_query), split.database.subset(is_query))


def load_npz_dataset(cfg: DatasetConfig, seed: int = 0) -> SplitDataset:
    """A generic npz: feature, label and (optional) id, category-name and split keys from params."""
    src = cfg.path
    wanted = [cfg.image_key, cfg.text_key, cfg.labels_key]
    wanted += [k for k in (cfg.ids_key, cfg.categories_key, cfg.split_key) if k]
    arrays = read_npz(src, wanted)
    raw_labels = arrays[cfg.labels_key]
    n = len(raw_labels)
    if cfg.categories_key:
        names = [str(c) for c in arrays[cfg.categories_key]]
    else:
        names = cfg.category_names or _default_names(raw_labels)
    labels = labels_from_ids(raw_labels, len(names), src) if raw_labels.ndim == 1 else raw_labels
    ids = arrays[cfg.ids_key] if cfg.ids_key else np.array([f"{cfg.name}-{i:07d}" for i in range(n)])
    full = make_batch(ids, arrays[cfg.image_key], arrays[cfg.text_key], labels, names, source=src)
    if cfg.split_key:
        split = arrays[cfg.split_key].astype(str)
        if not {"train", "test"} <= set(split.tolist()):
            raise BatchError(src, cfg.split_key, "must contain both 'train' and 'test' rows")
        return SplitDataset(cfg.name, full.subset(split == "train"), full.subset(split == "test"))
    return _random_split(cfg.name, full, cfg.query_size, seed)


def _default_names(raw_labels: np.ndarray) -> list[str]:
    count = int(raw_labels.max()) + 1 if raw_labels.ndim == 1 else raw_labels.shape[1]
    return [f"class_{i:02d}" for i in range(count)]


def _random_split(name: str, full: Batch, query_size: int, seed: int) -> SplitDataset:
    """DCMH protocol: a seeded random query set, every other item in the database."""
    if query_size >= len(full):
        raise BatchError(full.source, "query_size", f"{query_size} queries but only {len(full)} items")
    perm = np.random.default_rng(seed).permutation(len(full))
    is_query = np.zeros(len(full), bool)
    is_query[perm[:query_size]] = True
    return SplitDataset(name, full.subset(~is_query), full.subset(is_query))


def _read_mat(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a .mat file: MATLAB v5 through scipy, v7.3 (HDF5) through h5py.

    HDF5 stores MATLAB's column-major arrays with reversed axes; they are transposed back.
    """
    import h5py
    import scipy.io

    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as fh:
                return {k: np.asarray(v).T for k, v in fh.items() if isinstance(v, h5py.Dataset)}
        return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    except Exception as err:  # scipy/h5py raise many types for a damaged file; all mean the same
        raise BatchError(str(path), "file", f"cannot read .mat file: {type(err).__name__}: {err}") from err


def load_dcmh_mat(path: str | Path, query_size: int = 2000, seed: int = 0,
                  category_names: list[str] | None = None, name: str = "dcmh") -> SplitDataset:
    """A folder (or one file) of DCMH .mat files: ``LAll`` labels, ``YAll`` tags and image
    ``FAll``/``XAll`` features or ``IAll`` uint8 pixels (n, 3, H, W) scaled to [0, 1]."""
    path = Path(path)
    files = sorted(path.glob("*.mat")) if path.is_dir() else [path]
    if not files:
        raise BatchError(str(path), "file", "no .mat files found")
    arrays: dict[str, np.ndarray] = {}
    for f in files:
        arrays.update(_read_mat(f))
    src = str(path)
    for key in ("LAll", "YAll"):
        if key not in arrays:
            raise BatchError(src, key, f"missing (found {sorted(arrays)})")
    image_key = next((k for k in IMAGE_KEYS if k in arrays), None)
    if image_key is None:
        raise BatchError(src, "image", f"none of {IMAGE_KEYS} found (found {sorted(arrays)})")
    image = arrays[image_key]
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    labels = arrays["LAll"]
    names = category_names or _default_names(labels)
    if len(names) != labels.shape[1]:
        raise BatchError(src, "category_names", f"{len(names)} names for {labels.shape[1]} label columns")
    ids = [f"{name}-{i:07d}" for i in range(len(labels))]
    full = make_batch(ids, image, arrays["YAll"], labels, names, source=src)
    return _random_split(name, full, query_size, seed)


def synthetic_dataset(n_items: int, n_categories: int, image_dim: int, text_dim: int, *,
                      noise: float = 0.8, query_size: int = 500, seed: int = 0,
                      latent_dim: int = 32) -> SplitDataset:
    """SYNTHETIC multi-label two-modal data with class structure, co-occurrence and noise.

    Each category has a latent prototype; an item's latent vector is the mean of its labels'
    prototypes plus Gaussian noise. Images are a dense random projection of it (like CNN
    features), texts a non-negative sparse projection (like tag counts). A second or third label
    is drawn from a fixed co-occurrence row of the first, so labels correlate as in real data.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(n_categories, latent_dim)).astype(np.float32)
    cooccur = rng.dirichlet(np.full(n_categories, 0.3), size=n_categories)
    np.fill_diagonal(cooccur, 0)
    cooccur /= cooccur.sum(axis=1, keepdims=True)
    labels = np.zeros((n_items, n_categories), np.uint8)
    first = rng.integers(n_categories, size=n_items)
    labels[np.arange(n_items), first] = 1
    extra = np.minimum(rng.poisson(0.5, size=n_items), 2)
    for i in np.flatnonzero(extra):
        labels[i, rng.choice(n_categories, size=extra[i], replace=False, p=cooccur[first[i]])] = 1
    latent = labels @ prototypes / labels.sum(axis=1, keepdims=True)
    latent += noise * rng.normal(size=latent.shape).astype(np.float32)
    image = np.tanh(latent @ rng.normal(size=(latent_dim, image_dim)).astype(np.float32) / np.sqrt(latent_dim))
    image += 0.1 * rng.normal(size=image.shape).astype(np.float32)
    text_proj = rng.normal(size=(latent_dim, text_dim)).astype(np.float32) * (rng.random((1, text_dim)) < 0.3)
    text = np.maximum(latent @ text_proj, 0).astype(np.float32)
    names = [f"synthetic_{c:03d}" for c in range(n_categories)]
    ids = [f"synthetic-{i:07d}" for i in range(n_items)]
    full = make_batch(ids, image, text, labels, names, source=f"synthetic(seed={seed})")
    return _random_split("synthetic", full, query_size, seed)


def text_vocabulary(cfg: DatasetConfig) -> dict | None:
    """Words (and idf) of the text feature columns, when the dataset names them."""
    if not cfg.vocabulary_key:
        return None
    arrays = read_npz(cfg.path, [k for k in (cfg.vocabulary_key, cfg.idf_key) if k])
    idf = arrays[cfg.idf_key].astype(float).tolist() if cfg.idf_key else None
    return {"words": [str(w) for w in arrays[cfg.vocabulary_key]], "idf": idf, "l2_normalize": cfg.text_l2_normalize}
