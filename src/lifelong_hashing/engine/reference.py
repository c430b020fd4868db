"""What the model was trained on, kept small: the yardstick for validating the next batch and
for measuring drift.

Per modality it keeps the exact per-dimension range of every item trained on so far, and a
seeded sample of at most ``rows_per_stage`` rows from each stage (with their ids, so their codes
can be looked up in the code store). Pixel images are kept flattened. It lives in the state
directory as ``reference.npz`` and grows by one stage sample per increment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lifelong_hashing.engine.batch import Batch, read_npz
from lifelong_hashing.engine.codestore import MODALITIES
from lifelong_hashing.files import write_npz

_ARRAYS = ("ids", "stage", "labels_max", *(f"{m}_{k}" for m in MODALITIES for k in ("min", "max", "sample")))


def flat_features(x: np.ndarray) -> np.ndarray:
    """(n, d) or (n, c, h, w) → (n, features)."""
    return x.reshape(len(x), -1)


@dataclass
class ReferenceProfile:
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # modality → (min, max)
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, str))  # sampled rows
    stage: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # modality → (rows, features)
    max_labels: int = 0  # most labels any trained item carried

    @property
    def empty(self) -> bool:
        return not self.ranges

    def add_stage(self, batch: Batch, stage: int, rows_per_stage: int, seed: int) -> None:
        """Fold a trained batch in: widen the ranges, keep a seeded sample of its rows."""
        rng = np.random.default_rng([seed, stage])
        keep = np.sort(rng.choice(len(batch), min(rows_per_stage, len(batch)), replace=False))
        for m in MODALITIES:
            x = flat_features(getattr(batch, m))
            lo, hi = x.min(axis=0), x.max(axis=0)
            if m in self.ranges:
                lo, hi = np.minimum(lo, self.ranges[m][0]), np.maximum(hi, self.ranges[m][1])
                self.samples[m] = np.concatenate([self.samples[m], x[keep]])
            else:
                self.samples[m] = x[keep].copy()
            self.ranges[m] = (lo, hi)
        self.ids = np.concatenate([self.ids, batch.ids[keep]])
        self.stage = np.concatenate([self.stage, np.full(len(keep), stage, np.int32)])
        self.max_labels = max(self.max_labels, int(batch.labels[batch.labelled].sum(axis=1).max(initial=0)))

    def remove(self, ids: np.ndarray) -> int:
        """Drop the sampled rows of ``ids`` (a deleted item); the per-dimension ranges, aggregates
        over every item trained on, stay. Returns how many rows went."""
        gone = np.isin(self.ids, ids)
        self.ids, self.stage = self.ids[~gone], self.stage[~gone]
        self.samples = {m: x[~gone] for m, x in self.samples.items()}
        return int(gone.sum())

    def rows(self, stages: slice | int) -> np.ndarray:
        """Boolean mask of the sampled rows of one stage (int) or a range of stages (slice)."""
        if isinstance(stages, int):
            return self.stage == stages
        lo = -np.inf if stages.start is None else stages.start
        hi = np.inf if stages.stop is None else stages.stop
        return (self.stage >= lo) & (self.stage < hi)

    def save(self, path: str | Path) -> None:
        if self.empty:
            return
        arrays = {"ids": self.ids, "stage": self.stage, "labels_max": np.int64(self.max_labels)}
        for m in MODALITIES:
            arrays[f"{m}_min"], arrays[f"{m}_max"] = self.ranges[m]
            arrays[f"{m}_sample"] = self.samples[m]
        write_npz(path, arrays, compress=True)

    @staticmethod
    def load(path: str | Path) -> ReferenceProfile:
        """The saved profile, or an empty one where none was saved yet (before stage 0)."""
        if not Path(path).exists():
            return ReferenceProfile()
        a = read_npz(path, list(_ARRAYS))
        return ReferenceProfile(
            ranges={m: (a[f"{m}_min"], a[f"{m}_max"]) for m in MODALITIES},
            ids=a["ids"], stage=a["stage"], samples={m: a[f"{m}_sample"] for m in MODALITIES},
            max_labels=int(a["labels_max"]))
