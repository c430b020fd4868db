"""The small exemplar memory the lifelong methods may keep between stages.

A few items per category (their ids, features of both modalities, labels, and the code each
method wants them to keep), never the database. Its size grows with the number of categories,
not with the database, so a stage's cost stays tied to the new batch. The ids are what lets a
deleted item leave the memory too (``remove``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lifelong_hashing.engine.batch import Batch


@dataclass
class ExemplarMemory:
    image: np.ndarray
    text: np.ndarray
    labels: np.ndarray  # float32 multi-hot over the current vocabulary
    codes: np.ndarray  # float32 ±1 targets the items should keep (zero-width when none)
    ids: np.ndarray  # str: the items kept

    @classmethod
    def empty(cls, image_shape: tuple[int, ...], text_dim: int, bits: int) -> ExemplarMemory:
        return cls(np.zeros((0, *image_shape), np.float32), np.zeros((0, text_dim), np.float32),
                   np.zeros((0, 0), np.float32), np.zeros((0, bits), np.float32), np.empty(0, str))

    def __len__(self) -> int:
        return len(self.codes)

    def grow_labels(self, num_categories: int) -> None:
        grown = np.zeros((len(self), num_categories), np.float32)
        grown[:, : self.labels.shape[1]] = self.labels
        self.labels = grown

    def add(self, batch: Batch, rows: np.ndarray, codes: np.ndarray | None = None) -> None:
        """Keep ``rows`` of ``batch`` with the codes they should keep (none for a memory whose
        targets the method knows otherwise, e.g. OrthoHash's codebook rows)."""
        if codes is None:
            codes = np.zeros((len(rows), self.codes.shape[1]), np.float32)
        labels = np.zeros((len(rows), self.labels.shape[1]), np.float32)
        labels[:, : batch.labels.shape[1]] = batch.labels[rows]
        self.image = np.concatenate([self.image, batch.image[rows]])
        self.text = np.concatenate([self.text, batch.text[rows]])
        self.labels = np.concatenate([self.labels, labels])
        self.codes = np.concatenate([self.codes, np.asarray(codes, np.float32)])
        self.ids = np.concatenate([self.ids, batch.ids[rows]])

    def remove(self, ids: np.ndarray) -> int:
        """Forget the exemplars of ``ids``; how many rows went. Exemplars of unknown id (a memory
        saved before they carried one) go too: nothing else can show they are not the deleted items."""
        gone = np.isin(self.ids, ids) | (self.ids == "")
        for k, v in list(vars(self).items()):
            setattr(self, k, v[~gone])
        return int(gone.sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"memory_{k}": v for k, v in vars(self).items()}

    def load_arrays(self, arrays) -> None:
        for k in vars(self):
            if k == "ids" and "memory_ids" not in arrays:  # saved by an earlier version: ids unknown
                self.ids = np.full(len(arrays["memory_codes"]), "", "<U1")
                continue
            setattr(self, k, arrays[f"memory_{k}"])


def balanced_sample(batch: Batch, per_category: int, seed) -> np.ndarray:
    """Up to ``per_category`` random rows for each category present in the batch (an item counts
    for the first category it is drawn for), sorted."""
    rng = np.random.default_rng(seed)
    taken: set[int] = set()
    for c in range(batch.labels.shape[1]):
        rows = np.setdiff1d(np.flatnonzero(batch.labels[:, c]), list(taken))
        if rows.size:
            taken.update(rng.choice(rows, size=min(per_category, rows.size), replace=False).tolist())
    return np.array(sorted(taken), dtype=np.int64)


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Sampling weight per row so that every category is drawn about equally often: the mean of
    1/count over the row's labels. Without it a stage's new categories (hundreds of items each)
    swamp the memory's old ones (a few each) and old queries drift to new codes."""
    labels = np.asarray(labels, np.float64)
    inverse = 1.0 / np.maximum(labels.sum(axis=0), 1)
    return (labels @ inverse) / labels.sum(axis=1)


def database_share_weights(n_new: int, n_memory: int, old_items: int) -> np.ndarray:
    """Sampling weight per row of [new batch; memory] so that the memory, which stands for the
    ``old_items`` already in the database, is drawn as often as those items would be in joint
    retraining: a share old / (old + new) of all draws, uniform within each part."""
    share = old_items / (old_items + n_new) if n_memory else 0.0
    return np.concatenate([np.full(n_new, (1 - share) / n_new), np.full(n_memory, share / max(n_memory, 1))])


def replay_draws(n_new: int, n_memory: int, old_categories: int, per_category: int) -> int:
    """Rows a lifelong epoch draws: the new batch plus at most ``per_category`` memory rows per
    old category. The memory may keep more than that (``method.memory_per_category``): more
    distinct old items at the same cost per stage, which is what holds old queries."""
    return n_new + min(n_memory, per_category * old_categories)
