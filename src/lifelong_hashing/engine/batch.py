"""The one batch format every part of the project reads and writes.

A batch is row-aligned arrays: item ids, image features (or pixels), text features and a
multi-hot label matrix whose columns are named by ``categories``, and optionally the names among
them that the batch declares new (``new_categories``: the categories a lifelong increment is to
learn) and which rows are labelled (``labelled``, all of them when absent). An unlabelled item is
stored with its encoders' codes and never trained on; its label row is not read by training (a
sender leaves it zero; a benchmark keeps the hidden truth there to score retrieval). On disk it
is an ``.npz`` with those keys (docs/data.md, "Batch format"). Every constructor validates, so
a ``Batch`` that exists is a good one; a bad one raises ``BatchError`` naming the source, the
field and what is wrong.
"""

from __future__ import annotations

import math
import os
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lifelong_hashing.files import write_npz

FIELDS = ("ids", "image", "text", "labels", "categories")
OPTIONAL_FIELDS = ("new_categories", "labelled")
# Photos in place of ``image`` (images.py reads them): encoded JPEG/PNG files, concatenated, and
# the offsets that cut them apart (docs/data.md, "Photos").
PHOTO_FIELDS = ("image_files", "image_file_offsets")
PER_ITEM_FIELDS = ("ids", "image", "text", "labels", "labelled")  # one row per item


def shown(text: str, limit: int = 60, quoted: bool = True) -> str:
    """``text`` for a message, quoted and cut to ``limit`` characters: an error never echoes a
    megabyte it was sent."""
    text = str(text)
    head = repr(text[:limit]) if quoted else text[:limit]
    return head if len(text) <= limit else f"{head}… ({len(text):,} characters)"


def name_problem(name: str) -> str | None:
    """Why an id or category name is not canonical, or None: names are NFC, with no leading or
    trailing whitespace and no control, format (zero-width) or unassigned characters, so that
    two names that look the same are the same."""
    if name != name.strip():
        return "leading or trailing whitespace"
    if name.isascii():  # the common case, without a look at every character's category
        return None if name.isprintable() else "a control character"
    if unicodedata.normalize("NFC", name) != name:
        return "not in Unicode normalisation form NFC"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cn", "Co", "Cs") for c in name):
        return "a control, zero-width or unassigned character"
    return None


def name_key(name: str) -> str:
    """What two names must not share: their case-folded compatibility form (``art``, ``Art``
    and the full-width ``ａrt`` collide)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


class BatchError(ValueError):
    """A batch (in memory or on disk) that breaks the format; the message says where and why."""

    def __init__(self, source: str, field: str, problem: str):
        self.source, self.field, self.problem = source, field, problem
        super().__init__(f"{source}: field '{field}': {problem}")


@dataclass(frozen=True)
class Batch:
    ids: np.ndarray  # (n,) str, unique
    image: np.ndarray  # (n, d_img) or (n, channels, h, w) float32
    text: np.ndarray  # (n, d_txt) float32
    labels: np.ndarray  # (n, C) uint8 in {0, 1}
    categories: tuple[str, ...]  # C names, the label columns
    source: str = "<memory>"
    new_categories: tuple[str, ...] = ()  # declared new by the sender; a subset of ``categories``
    labelled: np.ndarray | None = None  # (n,) bool; None: every row

    def __post_init__(self):
        if self.labelled is None:
            object.__setattr__(self, "labelled", np.ones(len(self.ids), bool))
        _validate(self)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def all_labelled(self) -> bool:
        return bool(self.labelled.all())

    def subset(self, rows) -> Batch:
        """Rows by index or boolean mask; the category vocabulary is kept whole."""
        return Batch(
            self.ids[rows], self.image[rows], self.text[rows], self.labels[rows], self.categories,
            source=self.source, new_categories=self.new_categories, labelled=self.labelled[rows],
        )

    def labelled_part(self) -> Batch:
        """The rows training may read: the labelled ones."""
        return self if self.all_labelled else self.subset(self.labelled)

    def without_labels(self, rows) -> Batch:
        """The same items with ``rows`` marked unlabelled; their label rows stay (hidden from
        training) for scoring."""
        labelled = self.labelled.copy()
        labelled[rows] = False
        return Batch(self.ids, self.image, self.text, self.labels, self.categories, source=self.source,
                     new_categories=self.new_categories, labelled=labelled)

    def with_categories(self, categories: tuple[str, ...] | list[str]) -> Batch:
        """Re-express the labels over a larger vocabulary that starts with this one's names."""
        categories = tuple(categories)
        unknown = [c for c in self.categories if c not in categories]
        if unknown:
            raise BatchError(self.source, "categories", f"unknown to the vocabulary: {unknown}")
        columns = [categories.index(c) for c in self.categories]
        labels = np.zeros((len(self), len(categories)), np.uint8)
        labels[:, columns] = self.labels
        return Batch(self.ids, self.image, self.text, labels, categories, source=self.source,
                     new_categories=self.new_categories, labelled=self.labelled)

    def for_model(self, known: tuple[str, ...] | list[str]) -> Batch:
        """The batch over a model's vocabulary: ``known`` then the names this batch declares new.
        A column that is neither and that no item carries (a sender's wider taxonomy) is dropped;
        one that items carry raises. Validation and training both call this: one definition."""
        known = tuple(known)
        vocabulary = known + tuple(c for c in self.new_categories if c not in known)
        used = self.labels.any(axis=0)
        keep = [j for j, c in enumerate(self.categories) if c in vocabulary or used[j]]
        kept = Batch(self.ids, self.image, self.text, self.labels[:, keep], tuple(self.categories[j] for j in keep),
                     source=self.source, new_categories=self.new_categories, labelled=self.labelled)
        return kept.with_categories(vocabulary)

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        """Stack batches over the union vocabulary (first-seen order)."""
        if not batches:
            raise BatchError("<concat>", "ids", "no batches to concatenate")
        vocabulary: list[str] = []
        for b in batches:
            vocabulary += [c for c in b.categories if c not in vocabulary]
        aligned = [b.with_categories(vocabulary) for b in batches]
        return Batch(
            np.concatenate([b.ids for b in aligned]),
            np.concatenate([b.image for b in aligned]),
            np.concatenate([b.text for b in aligned]),
            np.concatenate([b.labels for b in aligned]),
            tuple(vocabulary),
            source="+".join(sorted({b.source for b in batches})),
            new_categories=tuple(dict.fromkeys(c for b in batches for c in b.new_categories)),
            labelled=np.concatenate([b.labelled for b in aligned]),
        )


def make_batch(ids, image, text, labels, categories, source: str = "<memory>", new_categories=(),
               labelled=None) -> Batch:
    """Build a batch from array-likes, casting to the canonical dtypes before validation."""
    try:
        ids_arr = np.asarray(ids).astype(str)
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, which _validate names
            image_arr = np.asarray(image, dtype=np.float32)
            text_arr = np.asarray(text, dtype=np.float32)
        labels_raw = np.asarray(labels)
    except (TypeError, ValueError) as err:
        raise BatchError(source, "arrays", f"cannot convert to arrays: {err}") from err
    if labels_raw.size and not np.isin(labels_raw, (0, 1)).all():
        raise BatchError(source, "labels", "must be multi-hot 0/1 values")
    if labelled is not None:
        labelled = np.asarray(labelled)
        if labelled.dtype != bool:
            raise BatchError(source, "labelled", f"must be booleans, got dtype {labelled.dtype}")
    return Batch(ids_arr, image_arr, text_arr, labels_raw.astype(np.uint8),
                 tuple(str(c) for c in categories), source=source,
                 new_categories=tuple(str(c) for c in new_categories), labelled=labelled)


def labels_from_ids(label_ids, num_categories: int, source: str = "<memory>") -> np.ndarray:
    """Multi-hot rows from integer label ids (one id per row, or a list per row)."""
    rows = [np.atleast_1d(np.asarray(r)) for r in label_ids]
    out = np.zeros((len(rows), num_categories), np.uint8)
    for i, r in enumerate(rows):
        if r.size and (not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= num_categories):
            raise BatchError(source, "labels", f"row {i}: label ids {r.tolist()} outside 0..{num_categories - 1}")
        out[i, r] = 1
    return out


def _validate(b: Batch) -> None:
    src = b.source
    if b.ids.ndim != 1:
        raise BatchError(src, "ids", f"expected 1-D, got shape {b.ids.shape}")
    n = len(b.ids)
    if n == 0:
        raise BatchError(src, "ids", "empty batch (0 rows)")
    if b.ids.dtype.kind != "U":
        raise BatchError(src, "ids", f"expected strings, got dtype {b.ids.dtype}")
    uniq, counts = np.unique(b.ids, return_counts=True)
    if (counts > 1).any():
        raise BatchError(src, "ids", f"duplicate ids: {', '.join(map(shown, uniq[counts > 1][:5].tolist()))}")
    if any(i == "" for i in b.ids[:]):
        raise BatchError(src, "ids", "empty id string")
    for name, arr, ndims in (("image", b.image, (2, 4)), ("text", b.text, (2,))):
        if arr.ndim not in ndims:
            raise BatchError(src, name, f"expected {' or '.join(map(str, ndims))}-D, got shape {arr.shape}")
        if arr.shape[0] != n:
            raise BatchError(src, name, f"{arr.shape[0]} rows but {n} ids")
        if arr.dtype != np.float32:
            raise BatchError(src, name, f"expected float32, got {arr.dtype}")
        if arr.shape[1] == 0:
            raise BatchError(src, name, "zero feature dimensions")
        bad = ~np.isfinite(arr.reshape(n, -1)).all(axis=1)
        if bad.any():
            raise BatchError(src, name,
                             f"{int(bad.sum())} rows with NaN or infinite values (first id {shown(b.ids[bad][0])})")
    if len(set(b.categories)) != len(b.categories) or not b.categories:
        raise BatchError(src, "categories", f"must be non-empty and unique, got "
                                            f"{', '.join(map(shown, list(b.categories)[:20]))}")
    undeclared = [c for c in b.new_categories if c not in b.categories]
    if undeclared:
        raise BatchError(src, "new_categories", f"not among the batch's categories: {undeclared}")
    if b.labels.shape != (n, len(b.categories)):
        raise BatchError(src, "labels", f"expected shape ({n}, {len(b.categories)}), got {b.labels.shape}")
    if b.labels.dtype != np.uint8 or b.labels.max() > 1:
        raise BatchError(src, "labels", "must be uint8 multi-hot with values 0/1")
    if b.labelled.shape != (n,) or b.labelled.dtype != bool:
        raise BatchError(src, "labelled", f"expected ({n},) booleans, got {b.labelled.shape} {b.labelled.dtype}")
    unlabeled = b.labelled & (b.labels.sum(axis=1) == 0)
    if unlabeled.any():
        raise BatchError(src, "labels",
                         f"{int(unlabeled.sum())} rows without any label (first id {shown(b.ids[unlabeled][0])}); "
                         "mark unlabelled items with labelled=False")


def save_batch(batch: Batch, path: str | os.PathLike, compress: bool = True) -> Path:
    """Atomic (a crash never leaves a half-written batch) and byte stable (``files.write_npz``).
    Uncompressed for scratch files read back at once (shards): deflate is the slow part."""
    return write_npz(path, {"ids": batch.ids, "image": batch.image, "text": batch.text, "labels": batch.labels,
                            "categories": np.asarray(batch.categories, dtype=str),
                            "new_categories": np.asarray(batch.new_categories, dtype=str),
                            **({} if batch.all_labelled else {"labelled": batch.labelled})}, compress=compress)


def npz_headers(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's declared shape and dtype, read from the npy headers inside the zip: nothing is
    decompressed beyond a header, so a small file declaring a huge array costs nothing to refuse."""
    src = str(path)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            _check_members(src, archive.infolist())
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version not in readers:
                        raise BatchError(src, name, f"npy format version {version} is not supported")
                    shape, _, dtype = readers[version](fh)
                headers[name] = (tuple(int(d) for d in shape), dtype)
    except BatchError:
        raise
    except FileNotFoundError as err:
        raise BatchError(src, "file", "does not exist") from err
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as err:
        raise BatchError(src, "file", f"corrupt or truncated npz: {err}") from err
    return headers


def _check_members(src: str, members: list[zipfile.ZipInfo]) -> None:
    """An npz is a plain zip: each member once, not encrypted, stored or deflated. Anything else
    is a defect of the file (``np.load`` would take the last of two same-named members)."""
    names = [m.filename for m in members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BatchError(src, "file", f"zip members appear more than once: {', '.join(map(shown, twice[:5]))}")
    for m in members:
        if m.flag_bits & 0x1:
            raise BatchError(src, "file", f"zip member {shown(m.filename)} is encrypted")
        if m.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BatchError(src, "file", f"zip member {shown(m.filename)} uses compression method "
                                          f"{m.compress_type}; only stored and deflated are read")


def check_declared_size(path: str | os.PathLike, max_rows: int | None, max_bytes: int | None,
                        max_categories: int | None = None) -> None:
    """Refuse, by the headers alone, a file whose arrays declare more rows, bytes or categories
    than allowed: what a batch costs to validate and train on is bounded before any of it runs."""
    src, sizes = str(path), {}
    headers = npz_headers(path)
    for name, (shape, dtype) in headers.items():
        if dtype.hasobject:
            raise BatchError(src, name, f"dtype {dtype} holds Python objects (pickles are never loaded)")
        if max_rows is not None and name in FIELDS and shape and shape[0] > max_rows:
            raise BatchError(src, name, f"declares {shape[0]:,} rows, over the limit of {max_rows:,}")
        width = shape[-1] if name == "labels" and len(shape) == 2 else shape[0] if shape else 0
        if max_categories is not None and name in ("labels", "categories", "new_categories") \
                and width > max_categories:
            raise BatchError(src, name, f"declares {width:,} categories, over the limit of {max_categories:,} "
                                        "(validation.max_categories)")
        sizes[name] = math.prod(shape) * dtype.itemsize
    if max_bytes is not None and sum(sizes.values()) > max_bytes:
        largest = max(sizes, key=sizes.get)
        shape, dtype = headers[largest]
        raise BatchError(src, largest, f"declares shape {shape} of {dtype}: the arrays hold "
                                       f"{sum(sizes.values()):,} bytes uncompressed, over the limit of {max_bytes:,}")


def read_npz(path: str | os.PathLike, keys: list[str], optional: tuple[str, ...] = (),
             max_rows: int | None = None, max_bytes: int | None = None,
             max_categories: int | None = None) -> dict[str, np.ndarray]:
    """The named arrays of an npz file (and those of ``optional`` that it has); a missing,
    unreadable or incomplete file, a zip that is not plain, or one over the limits raises
    ``BatchError`` naming the file and what is wrong. The limits are checked on the headers,
    before anything is decompressed."""
    src = str(path)
    check_declared_size(path, max_rows, max_bytes, max_categories)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise BatchError(src, missing[0], f"missing from file (has {sorted(data.files)})")
            return {k: data[k] for k in (*keys, *optional) if k in data.files}
    except BatchError:
        raise
    except FileNotFoundError as err:
        raise BatchError(src, "file", "does not exist") from err
    except MemoryError as err:
        raise BatchError(src, "file", "its arrays do not fit in memory (set validation.max_bytes)") from err
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as err:
        raise BatchError(src, "file", f"corrupt or truncated npz: {err}") from err


def batch_from_arrays(arrays: dict[str, np.ndarray], source: str) -> Batch:
    """The batch a file's arrays make: the one conversion (and so the one set of checks) that
    training and validation both apply."""
    return make_batch(arrays["ids"], arrays["image"], arrays["text"], arrays["labels"],
                      arrays["categories"].tolist(), source=source,
                      new_categories=arrays.get("new_categories", np.empty(0, str)).tolist(),
                      labelled=arrays.get("labelled"))


def read_batch_arrays(path: str | os.PathLike, max_rows: int | None = None, max_bytes: int | None = None,
                      max_categories: int | None = None) -> dict[str, np.ndarray]:
    """A batch file's arrays, raw: image features, pixels or photo files, the rest as stored."""
    required = [k for k in FIELDS if k != "image"]
    arrays = read_npz(path, required, ("image", *PHOTO_FIELDS, *OPTIONAL_FIELDS), max_rows, max_bytes,
                      max_categories)
    if "image" not in arrays and PHOTO_FIELDS[0] not in arrays:
        raise BatchError(str(path), "image", "missing from file: a batch carries image features or pixels "
                                             f"('image') or photo files ('{PHOTO_FIELDS[0]}')")
    return arrays


def erase_from_batch_file(path: str | os.PathLike, ids) -> int:
    """Rewrite a batch file without the items ``ids`` (every per-item array, photo files
    included), atomically; the file is left as it is when it holds none of them. Returns how
    many items went. Erasure's reach into the batches a workspace or quarantine keeps."""
    from lifelong_hashing.engine.images import FILES_KEY, OFFSETS_KEY, pack_files, split_files

    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    n = len(arrays["ids"])
    gone = np.isin(arrays["ids"].astype(str), np.asarray(list(ids), dtype=str))
    if not gone.any():
        return 0
    out = {}
    for key, value in arrays.items():
        if key == FILES_KEY:
            files = split_files(value, arrays[OFFSETS_KEY], n, str(path))
            out.update(pack_files([f for f, erased in zip(files, gone, strict=True) if not erased]))
        elif key != OFFSETS_KEY:
            out[key] = value[~gone] if value.ndim and len(value) == n and key in PER_ITEM_FIELDS else value
    write_npz(path, out, compress=True)
    return int(gone.sum())


def load_batch(path: str | os.PathLike, max_rows: int | None = None, max_bytes: int | None = None,
               photos=None) -> Batch:
    """Read and validate a batch file; any defect raises ``BatchError`` naming the file. Photos
    become features through ``photos`` (an ``images.PhotoReader``; None: the model takes features)."""
    from lifelong_hashing.engine.images import read_batch_photos

    arrays, _ = read_batch_photos(read_batch_arrays(path, max_rows, max_bytes), photos, str(path))
    return batch_from_arrays(arrays, str(path))
