"""The code store: database codes packed 64 bits to a word, with their ids, stage and labels
(and whether each item came labelled: an unlabelled one has its encoders' codes).

Each item keeps one code per modality: I→T search scans the ``text`` codes with an image query,
T→I the ``image`` codes with a text query. Hamming ranking breaks ties by database position
(insertion order), the rule of DCMH's reference evaluation.

Exact top-k search runs on a compiled counting kernel (``kernels.hamming_topk_kernel``) for codes
of up to 128 bits: the CPU's vector popcount over word-major codes, blocked over queries, a bound
that only lets the few items that can still make the top k through, and a counting sort of them
instead of a heap; it keeps the tie rule and outruns faiss'
``IndexBinaryFlat`` (``bench/search_speed.py``; bench/results/search_speed.json). Longer codes
use faiss ``IndexBinaryFlat`` with ``use_heap=False``, whose counting selection keeps the same
rule. Full rankings (for metrics) use the numpy path, which needs every distance anyway.

A search may be restricted by an ``ItemFilter`` (categories, stages, an id prefix), exactly: k
hits whenever k items pass it. When many pass, the kernel pushes the others past every distance
(the cost of an unfiltered search); when few do, it scans a copy of only their codes (a cost in
proportion to them). ``bench/filters.py`` measures both against unfiltered search.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lifelong_hashing.engine.kernels import hamming_topk_kernel
from lifelong_hashing.files import write_npz

MODALITIES = ("image", "text")
FILTERS_KEPT = 8  # the latest filters searched keep their items with the store's derived data
GATHER_SHARE = 0.25  # a filter letting fewer items through than this share scans a copy of just theirs
_CHUNK_ELEMENTS = 1 << 24  # distances computed per block: bounds memory to ~16 MB at a time


class CodeStoreError(ValueError):
    pass


def pack_codes(signs: np.ndarray) -> np.ndarray:
    """(n, K) real or ±1 or bool → (n, ceil(K/64)) uint64; bit set where the value is > 0."""
    signs = np.asarray(signs)
    if signs.ndim != 2:
        raise CodeStoreError(f"codes must be 2-D (n, bits), got shape {signs.shape}")
    packed = np.packbits(signs > 0, axis=1, bitorder="little")
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view("<u8")


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``pack_codes``: (n, W) uint64 → (n, bits) int8 in {-1, +1}."""
    raw = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1, bitorder="little")[:, :bits]
    return raw.astype(np.int8) * 2 - 1


def hamming_distances(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """All query × database Hamming distances, (Q, N) uint16 (uint8 would overflow at 256 bits)."""
    queries, database = np.asarray(queries, np.uint64), np.asarray(database, np.uint64)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise CodeStoreError(f"packed code widths differ: queries {queries.shape}, database {database.shape}")
    out = np.empty((len(queries), len(database)), np.uint16)
    step = max(1, _CHUNK_ELEMENTS // max(1, len(database) * queries.shape[1]))
    for start in range(0, len(queries), step):
        q = queries[start: start + step]
        acc = np.bitwise_count(q[:, None, 0] ^ database[None, :, 0]).astype(np.uint16)
        for w in range(1, queries.shape[1]):
            acc += np.bitwise_count(q[:, None, w] ^ database[None, :, w])
        out[start: start + step] = acc
    return out


def rank_by_distance(distances: np.ndarray) -> np.ndarray:
    """Full ranking per row, ties by database position: a stable radix (counting) sort of the
    small-integer distances, O(N) per query instead of argsort's O(N log N)."""
    return np.argsort(distances, axis=-1, kind="stable")


@dataclass(frozen=True)
class ItemFilter:
    """Which stored items a search may return: all its conditions hold. ``any_of``: at least one
    of these categories; ``all_of``: every one of them; ``stages``: a stage index within
    (first, last), inclusive (appended items carry the stage they joined); ``id_prefix``: ids
    starting with it; ``exclude``: ids never to return (the service's items awaiting erasure).
    Hashable, so requests with the same filter can share a batch."""

    any_of: tuple[str, ...] = ()
    all_of: tuple[str, ...] = ()
    stages: tuple[int, int] | None = None
    id_prefix: str = ""
    exclude: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.any_of or self.all_of or self.stages is not None or self.id_prefix or self.exclude)

    def allowed(self, store: CodeStore) -> np.ndarray:
        """(n,) bool: the store's items this filter lets through. A category the store does not
        know is an error naming it (a typo would otherwise match nothing, silently)."""
        keep = np.ones(len(store), bool)
        for names, combine in ((self.any_of, np.any), (self.all_of, np.all)):
            if names:
                keep &= combine(store.labels[:, store.category_columns(names)] > 0, axis=1)
        if self.stages is not None:
            first, last = self.stages
            keep &= (store.stage >= first) & (store.stage <= last)
        if self.id_prefix:
            keep &= store.id_prefix_mask(self.id_prefix)
        if self.exclude:
            keep[store.rows_present(self.exclude)] = False
        return keep


@dataclass
class _Within:
    """A filter's items in a store. When many pass, the kernel scans every code with the others
    ``blocked`` (255; 0 for the allowed); when fewer than ``GATHER_SHARE`` do, a copy of just
    their codes (word-major, made per modality at first use) is scanned, and ``rows`` map its
    hits back, in store order so ties still go by position."""

    allowed: np.ndarray  # (n,) bool
    count: int
    blocked: np.ndarray | None = None
    rows: np.ndarray | None = None
    _columns: dict = field(default_factory=dict)

    @classmethod
    def of(cls, allowed: np.ndarray) -> _Within:
        count = int(np.count_nonzero(allowed))
        if count < GATHER_SHARE * len(allowed):
            return cls(allowed, count, rows=np.flatnonzero(allowed))
        return cls(allowed, count, blocked=np.subtract(allowed.view(np.uint8), 1, dtype=np.uint8))  # 1→0, 0→255

    def columns(self, store: CodeStore, modality: str) -> np.ndarray:
        if modality not in self._columns:
            self._columns[modality] = np.ascontiguousarray(store.codes[modality][self.rows].T)
        return self._columns[modality]


@dataclass
class CodeStore:
    bits: int
    categories: tuple[str, ...] = ()
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype="<U1"))
    stage: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    labels: np.ndarray | None = None
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    labelled: np.ndarray | None = None  # (n,) bool
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # search indexes, label sets

    def __post_init__(self):
        if self.bits <= 0 or self.bits % 8:
            raise CodeStoreError(f"bits must be a positive multiple of 8, got {self.bits}")
        words = -(-self.bits // 64)
        if self.labels is None:
            self.labels = np.zeros((0, len(self.categories)), np.uint8)
        if self.labelled is None:
            self.labelled = np.ones(len(self.ids), bool)
        for m in MODALITIES:
            self.codes.setdefault(m, np.zeros((0, words), np.uint64))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def words(self) -> int:
        return -(-self.bits // 64)

    def append(self, ids, stage: int, labels: np.ndarray, categories: tuple[str, ...],
               codes: dict[str, np.ndarray], labelled: np.ndarray | None = None) -> None:
        """Add new items' codes; earlier rows are never touched. Vocabulary may only grow."""
        ids = np.asarray(ids).astype(str)
        labelled = np.ones(len(ids), bool) if labelled is None else np.asarray(labelled, bool)
        if categories[: len(self.categories)] != self.categories:
            raise CodeStoreError("category vocabulary must extend the stored one")
        clash = np.intersect1d(ids, self.ids)
        if clash.size:
            raise CodeStoreError(f"ids already in the store: {clash[:5].tolist()}")
        for m in MODALITIES:
            if codes[m].shape != (len(ids), self.words) or codes[m].dtype != np.uint64:
                raise CodeStoreError(f"{m} codes must be ({len(ids)}, {self.words}) uint64, got "
                                     f"{codes[m].shape} {codes[m].dtype}")
        grown = np.zeros((len(self), len(categories)), np.uint8)
        grown[:, : self.labels.shape[1]] = self.labels
        self.labels = np.concatenate([grown, labels.astype(np.uint8)])
        self.categories = tuple(categories)
        self.ids = np.concatenate([self.ids, ids])
        self.labelled = np.concatenate([self.labelled, labelled])
        self.stage = np.concatenate([self.stage, np.full(len(ids), stage, np.int32)])
        for m in MODALITIES:
            self.codes[m] = np.concatenate([self.codes[m], codes[m]])
        self._derived.clear()

    def rows_changed(self, before: dict[str, np.ndarray]) -> int:
        """How many of the rows ``before`` held (a copy of ``codes``) now hold another code."""
        changed = np.zeros(len(before["image"]), bool)
        for m in MODALITIES:
            changed |= (self.codes[m][: len(before[m])] != before[m]).any(axis=1)
        return int(changed.sum())

    def rows_of(self, ids) -> np.ndarray:
        """Row of each id; an id not in the store is an error."""
        ids = np.asarray(ids).astype(str)
        if not len(self):
            raise CodeStoreError(f"ids not in the store (it is empty): {ids[:5].tolist()}")
        rows, found = self._lookup(ids)
        if not found.all():
            raise CodeStoreError(f"ids not in the store: {ids[~found][:5].tolist()}")
        return rows

    def remove(self, ids) -> int:
        """Delete the items ``ids`` (every one must be stored: ``rows_of``); the rest keep their
        codes and their order. Returns how many went."""
        keep = np.ones(len(self), bool)
        keep[self.rows_of(ids)] = False
        self.ids, self.stage, self.labels, self.labelled = (a[keep] for a in (self.ids, self.stage, self.labels,
                                                                              self.labelled))
        for m in MODALITIES:
            self.codes[m] = self.codes[m][keep]
        self._derived.clear()
        return int((~keep).sum())

    def overwrite(self, ids, codes: dict[str, np.ndarray]) -> None:
        """Replace the stored codes of ``ids``: only joint retraining does this."""
        rows = self.rows_of(ids)
        for m, packed in codes.items():
            self.codes[m][rows] = packed
        self._derived.clear()

    def _index(self, modality: str):
        import faiss

        if modality not in self._derived:
            index = faiss.IndexBinaryFlat(self.bits)
            index.use_heap = False
            index.add(faiss_bytes(self.codes[modality], self.bits))
            self._derived[modality] = index
        return self._derived[modality]

    def _columns(self, modality: str) -> np.ndarray:
        """The codes word-major (words × items), the layout the search kernel vectorizes over."""
        key = ("columns", modality)
        if key not in self._derived:
            self._derived[key] = np.ascontiguousarray(self.codes[modality].T)
        return self._derived[key]

    def label_sets(self) -> tuple[list[list[str]], np.ndarray]:
        """The distinct label sets as lists of names, and each item's set: hits share these lists
        instead of building names per hit."""
        if "label_sets" not in self._derived:
            sets, inverse = np.unique(self.labels, axis=0, return_inverse=True)
            self._derived["label_sets"] = ([[self.categories[c] for c in np.flatnonzero(row)] for row in sets],
                                           inverse.reshape(-1))
        return self._derived["label_sets"]

    def category_columns(self, names) -> list[int]:
        unknown = [n for n in names if n not in self.categories]
        if unknown:
            raise CodeStoreError(f"unknown categories {unknown[:5]}; the store has {list(self.categories)}")
        return [self.categories.index(n) for n in names]

    def _id_order(self) -> tuple[np.ndarray, np.ndarray]:
        """The store's rows in id order and the ids in that order (kept with the derived data)."""
        if "id_order" not in self._derived:
            order = np.argsort(self.ids, kind="stable")
            self._derived["id_order"] = order, self.ids[order]
        return self._derived["id_order"]

    def rows_present(self, ids) -> np.ndarray:
        """The rows of those of ``ids`` that are stored (the others are left out)."""
        if not len(self):
            return np.empty(0, np.int64)
        rows, found = self._lookup(np.asarray(list(ids), dtype=str))
        return rows[found]

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each id's row (by binary search in the sorted ids) and whether it is stored at all."""
        order, ordered = self._id_order()
        at = np.minimum(np.searchsorted(ordered, ids), len(self) - 1)
        return order[at], ordered[at] == ids

    def id_prefix_mask(self, prefix: str) -> np.ndarray:
        """(n,) bool, ids starting with ``prefix``: a range of the sorted ids, not a string
        comparison per item."""
        order, ordered = self._id_order()
        lo, hi = np.searchsorted(ordered, [prefix, prefix + "\U0010ffff"])
        mask = np.zeros(len(self), bool)
        mask[order[lo:hi]] = True
        return mask

    def search(self, query_codes: np.ndarray, modality: str, k: int, radius: int | None = None,
               where: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k (ties by position) among ``modality`` codes, within ``where`` when given;
        rows beyond ``radius``, or past the items there are, are -1 with distance -1. Returns
        (indices, distances), (Q, k)."""
        if modality not in MODALITIES:
            raise CodeStoreError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        if k <= 0:
            raise CodeStoreError(f"k must be positive, got {k}")
        query_codes = np.asarray(query_codes)
        if query_codes.ndim != 2 or query_codes.shape[1] != self.words or query_codes.dtype != np.uint64:
            raise CodeStoreError(f"queries must be (n, {self.words}) uint64 packed codes, got "
                                 f"{query_codes.shape} {query_codes.dtype}")
        within = self._within(where) if where else None
        reach = min(k, len(self) if within is None else within.count)
        if reach == 0:
            empty = np.full((len(query_codes), k), -1)
            return empty.astype(np.int64), empty.astype(np.int32)
        query_codes = np.ascontiguousarray(query_codes)
        if self.bits > 128:
            idx, top = self._faiss_search(query_codes, modality, reach, within)
        elif within is not None and within.rows is not None:  # few pass: scan only their codes
            idx, top = hamming_topk_kernel(query_codes, within.columns(self, modality), reach, self.bits)
            idx = within.rows[idx]
        else:  # distances fit a byte: the compiled counting kernel (bench/search_speed.py)
            idx, top = hamming_topk_kernel(query_codes, self._columns(modality), reach, self.bits,
                                           blocked=None if within is None else within.blocked)
        if radius is not None:
            far = top > radius
            idx[far], top[far] = -1, -1
        if idx.shape[1] < k:
            pad = ((0, 0), (0, k - idx.shape[1]))
            idx, top = np.pad(idx, pad, constant_values=-1), np.pad(top, pad, constant_values=-1)
        return idx, top

    def _within(self, where: ItemFilter) -> _Within:
        """``where``'s items, kept for the latest filters: a service sees the same ones again and again."""
        key = ("filter", where)
        if key not in self._derived:
            kept = [k for k in self._derived if isinstance(k, tuple) and k[0] == "filter"]
            for old in kept[: max(0, len(kept) - FILTERS_KEPT + 1)]:
                del self._derived[old]
            self._derived[key] = _Within.of(where.allowed(self))
        return self._derived[key]

    def _faiss_search(self, query_codes: np.ndarray, modality: str, k: int,
                      within: _Within | None) -> tuple[np.ndarray, np.ndarray]:
        """Codes longer than 128 bits: faiss' exact flat index, or within a filter a flat index
        over the allowed items (kept in order, so ties still go by position)."""
        import faiss

        if within is None:
            index, rows = self._index(modality), None
        else:
            rows = np.flatnonzero(within.allowed)
            index = faiss.IndexBinaryFlat(self.bits)
            index.use_heap = False
            index.add(faiss_bytes(self.codes[modality][rows], self.bits))
        top, idx = index.search(faiss_bytes(query_codes, self.bits), k)
        idx = idx.astype(np.int64) if rows is None else rows[idx]
        return idx, top.astype(np.int32)

    def rank(self, query_codes: np.ndarray, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """Full ranking of every stored item per query, ties by position: (order, distances)."""
        if modality not in MODALITIES:
            raise CodeStoreError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        dist = hamming_distances(query_codes, self.codes[modality])
        order = rank_by_distance(dist)
        return order, np.take_along_axis(dist, order, axis=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic and byte stable (``files.write_npz``): a crash never leaves a half-written
        store, and the same codes give the same file."""
        return write_npz(path, {"bits": np.int64(self.bits), "categories": np.asarray(self.categories, dtype=str),
                                "ids": self.ids, "stage": self.stage, "labels": self.labels,
                                **{f"codes_{m}": self.codes[m] for m in MODALITIES},
                                **({} if self.labelled.all() else {"labelled": self.labelled})})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CodeStore:
        try:
            with np.load(path, allow_pickle=False) as d:
                store = cls(int(d["bits"]), tuple(d["categories"].tolist()), d["ids"], d["stage"],
                            d["labels"], {m: d[f"codes_{m}"] for m in MODALITIES},
                            d["labelled"] if "labelled" in d.files else None)
        except (KeyError, OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise CodeStoreError(f"{path}: unreadable code store: {err}") from err
        n = len(store.ids)
        shapes = [(store.stage, (n,)), (store.labelled, (n,)), (store.labels, (n, len(store.categories))),
                  *((store.codes[m], (n, store.words)) for m in MODALITIES)]
        if any(array.shape != shape for array, shape in shapes):
            raise CodeStoreError(f"{path}: inconsistent array shapes in code store")
        return store


def words_from_bytes(packed_bytes: np.ndarray) -> np.ndarray:
    """(n, K/8) packed bytes, as the exported encoders emit them → (n, ceil(K/64)) uint64 words."""
    n, width = packed_bytes.shape
    if width % 8 == 0:
        return np.ascontiguousarray(packed_bytes).view("<u8")
    words = np.zeros((n, -(-width // 8) * 8), np.uint8)
    words[:, :width] = packed_bytes
    return words.view("<u8")


def faiss_bytes(words: np.ndarray, bits: int) -> np.ndarray:
    """The K/8 code bytes faiss expects (little-endian words: the first bytes hold the bits)."""
    return np.ascontiguousarray(np.ascontiguousarray(words).view(np.uint8)[:, : bits // 8])
