"""Work cut into shards on disk for other processes (the pipeline's Dask path): a batch to
encode, queries to score.

A shard is a batch file of a slice of the rows (features in); its codes come back as an npz of
packed codes (out). Tasks pass these paths, never arrays: a task's arguments and results travel
through the scheduler, where large arrays are slow and memory-hungry. Slices start at multiples
of the encoders' block (``ENCODE_BLOCK`` rows), so each row goes through the encoders in the same
block as in one process; with the same thread count (``train.threads``, set when the model
loads) the bits are the same, which the tests check.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from lifelong_hashing.config import EvalConfig
from lifelong_hashing.engine.batch import Batch, load_batch, save_batch
from lifelong_hashing.engine.codestore import MODALITIES
from lifelong_hashing.engine.methods.base import ENCODE_BLOCK
from lifelong_hashing.engine.metrics import query_scores
from lifelong_hashing.files import write_npz


def shard_bounds(rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard: ``rows_per_shard`` rounded up to whole encoder blocks."""
    size = -(-max(rows_per_shard, 1) // ENCODE_BLOCK) * ENCODE_BLOCK
    return [(start, min(rows, start + size)) for start in range(0, rows, size)]


def write_shards(batch: Batch, out_dir: str | Path, rows_per_shard: int) -> list[Path]:
    """The batch's rows as shard files ``shard-00000.npz``, … in ``out_dir``, in row order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [save_batch(batch.subset(np.arange(start, stop)), out_dir / f"shard-{i:05d}.npz", compress=False)
            for i, (start, stop) in enumerate(shard_bounds(len(batch), rows_per_shard))]


def encode_shard(state_dir: str | Path, shard: str | Path) -> Path:
    """The database codes of one shard's items, as the method of the state at ``state_dir``
    stores them, written beside the shard (``shard-00000.codes.npz``); returns that path."""
    method = _method(str(state_dir), _fingerprint(Path(state_dir) / "model"))
    codes = method.database_codes(load_batch(shard))
    return write_npz(Path(shard).with_suffix(".codes.npz"), {m: codes[m] for m in MODALITIES})


def read_shard_codes(paths: list[str | Path]) -> dict[str, np.ndarray]:
    """The shards' codes joined in order: what encoding the whole batch in one process gives."""
    parts = [_arrays(p) for p in paths]
    return {m: np.concatenate([part[m] for part in parts]) for m in MODALITIES}


def _arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return dict(npz)


@functools.lru_cache(maxsize=2)
def _method(state_dir: str, fingerprint: tuple):
    """One load per worker process and model: a worker encodes many shards of one batch. The
    fingerprint is part of the key: a state saved anew at the same path is a new model."""
    from lifelong_hashing.engine.state import load_method

    return load_method(state_dir)


def _fingerprint(model_dir: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()))


def write_query_shards(codes: np.ndarray, labels: np.ndarray, database_codes: np.ndarray,
                       database_labels: np.ndarray, out_dir: str | Path,
                       rows_per_shard: int) -> tuple[Path, list[Path]]:
    """An evaluation split for workers: the database side (codes and labels) as one file, the
    query codes and labels as shards of ``rows_per_shard`` (one empty shard when there are no
    queries, so the scores still come back, empty). Returns (database file, shards)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    database = write_npz(out_dir / "database.npz", {"codes": database_codes, "labels": database_labels})
    shards = [write_npz(out_dir / f"queries-{i:05d}.npz", {"codes": codes[s:s + rows_per_shard],
                                                            "labels": labels[s:s + rows_per_shard]})
              for i, s in enumerate(range(0, max(len(codes), 1), max(rows_per_shard, 1)))]
    return database, shards


def score_shard(database: str | Path, shard: str | Path, cfg: EvalConfig) -> Path:
    """Per-query scores (``metrics.query_scores``) of one query shard against the database file,
    written beside the shard (``queries-00000.scores.npz``); returns that path."""
    db, queries = _arrays(database), _arrays(shard)
    scores = query_scores(queries["codes"], db["codes"], queries["labels"], db["labels"], cfg)
    return write_npz(Path(shard).with_suffix(".scores.npz"), scores)


def read_shard_scores(paths: list[str | Path]) -> dict[str, np.ndarray]:
    """The shards' per-query scores joined in order: what scoring every query at once gives."""
    parts = [_arrays(p) for p in paths]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
