"""Retrieval and lifelong metrics (docs/methods.md, "Metrics").

Relevance: a database item is relevant to a query when they share at least one label.
Ranking: by Hamming distance, ties broken by database position (DCMH's reference rule).

Conventions, which differ between papers (``runner.evaluate_stage`` reports the skipped counts):
- mAP@all: AP over the full ranking; a query with no relevant item in the database has no AP and
  is skipped.
- mAP@R: HashNet's convention. AP over the first R items, divided by the relevant items found
  there (not by min(R, relevant)); a query with none in its first R is skipped.
- P@k: the share of relevant items among the first k, averaged over *every* query: one with no
  relevant item scores 0, as it would for a user of the search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lifelong_hashing.config import EvalConfig
from lifelong_hashing.engine.codestore import hamming_distances, pack_codes, rank_by_distance
from lifelong_hashing.engine.kernels import average_precision_kernel

_QUERY_BLOCK = 256


@dataclass(frozen=True)
class Direction:
    """A retrieval direction: queries of one modality against the stored codes of the other."""

    query: str  # the query's modality
    database: str  # the stored codes it searches
    name: str  # for reports
    short: str  # for tables


DIRECTIONS = {"i2t": Direction("image", "text", "image→text", "I→T"),
              "t2i": Direction("text", "image", "text→image", "T→I")}


def relevance(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """(Q, N) bool: shares at least one label."""
    return (query_labels.astype(np.float32) @ db_labels.T.astype(np.float32)) > 0


def _blocks(query_codes, db_codes, query_labels, db_labels):
    for s in range(0, len(query_codes), _QUERY_BLOCK):
        yield (hamming_distances(query_codes[s: s + _QUERY_BLOCK], db_codes),
               relevance(query_labels[s: s + _QUERY_BLOCK], db_labels))


def per_query_ap(query_codes, db_codes, query_labels, db_labels, top_r: int | None = None) -> np.ndarray:
    """AP of each query over the full ranking (``top_r=None``) or its first R items; NaN where
    the query has no relevant item there (skipped by the means). AP@R divides by the relevant
    items retrieved in the first R (HashNet's convention). Counting by distance in a compiled
    loop (``kernels.py``): no sort at all."""
    if len(query_codes) == 0:
        return np.empty(0)
    query_codes, db_codes = np.ascontiguousarray(query_codes, np.uint64), np.ascontiguousarray(db_codes, np.uint64)
    bits = 64 * query_codes.shape[1]
    top = len(db_codes) if top_r is None else int(top_r)
    return average_precision_kernel(query_codes, db_codes, pack_codes(query_labels), pack_codes(db_labels), bits, top)


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, top_r: int | None = None) -> float:
    """mAP@all (``top_r=None``) or mAP@R from packed codes."""
    ap = per_query_ap(query_codes, db_codes, query_labels, db_labels, top_r)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def map_per_query_reference(query_codes, db_codes, query_labels, db_labels) -> float:
    """The plain per-query loop of research code (float distances, argsort), used to check and
    benchmark the fast path. Stable argsort gives the same tie rule: database position."""
    aps = []
    for q in range(len(query_codes)):
        d = hamming_distances(query_codes[q: q + 1], db_codes)[0].astype(np.float64)
        rel = (db_labels @ query_labels[q] > 0)[np.argsort(d, kind="stable")]
        if not rel.any():
            continue
        ranks = np.flatnonzero(rel) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    return float(np.mean(aps)) if aps else float("nan")


def per_query_precision_at_k(query_codes, db_codes, query_labels, db_labels, k: int) -> np.ndarray:
    """Each query's share of relevant items among the first k of its ranking (0 without any)."""
    vals = [np.empty(0)]
    for d, rel in _blocks(query_codes, db_codes, query_labels, db_labels):
        order = rank_by_distance(d)[:, :k]
        vals.append(np.take_along_axis(rel, order, axis=1).mean(axis=1))
    return np.concatenate(vals)


def precision_at_k(query_codes, db_codes, query_labels, db_labels, k: int) -> float:
    """Mean share of relevant items among the first k of the ranking, over every query (one
    without any relevant item counts 0)."""
    return float(per_query_precision_at_k(query_codes, db_codes, query_labels, db_labels, k).mean())


def query_scores(q_codes: np.ndarray, db_codes: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray,
                 cfg: EvalConfig) -> dict[str, np.ndarray]:
    """Per query: AP over the full ranking, AP@R and precision@k for each R and k of ``eval``.
    Each query's scores depend on it alone, so query shards scored apart and joined in order give
    the same arrays (the pipeline's Dask path, ``runner.Scorer``)."""
    out = {"map_all": per_query_ap(q_codes, db_codes, q_labels, db_labels)}
    for r in cfg.map_at:
        out[f"map_at_{r}"] = per_query_ap(q_codes, db_codes, q_labels, db_labels, r)
    for k in cfg.precision_at:
        out[f"precision_at_{k}"] = per_query_precision_at_k(q_codes, db_codes, q_labels, db_labels, k)
    return out


def pr_curve(query_codes, db_codes, query_labels, db_labels, bits: int) -> dict[str, list[float]]:
    """Precision and recall of a Hamming-ball lookup at every radius 0..bits, averaged over
    queries (precision over the queries whose ball is non-empty at that radius)."""
    hit_hist = np.zeros((0, bits + 1))
    all_hist = np.zeros((0, bits + 1))
    for d, rel in _blocks(query_codes, db_codes, query_labels, db_labels):
        offs = (np.arange(len(d)) * (bits + 1))[:, None]
        all_hist = np.vstack([all_hist, np.bincount((d + offs).ravel(), minlength=len(d) * (bits + 1))
                              .reshape(len(d), bits + 1)])
        hit_hist = np.vstack([hit_hist, np.bincount((d + offs)[rel], minlength=len(d) * (bits + 1))
                              .reshape(len(d), bits + 1)])
    retrieved, hits = np.cumsum(all_hist, axis=1), np.cumsum(hit_hist, axis=1)
    has_rel = hits[:, -1] > 0
    retrieved, hits = retrieved[has_rel], hits[has_rel]
    nonempty = retrieved > 0
    precision = (np.divide(hits, retrieved, out=np.zeros_like(hits), where=nonempty).sum(axis=0)
                 / np.maximum(nonempty.sum(axis=0), 1))
    recall = (hits / hits[:, -1:]).mean(axis=0)
    return {"radius": list(range(bits + 1)), "precision": precision.round(6).tolist(),
            "recall": recall.round(6).tolist()}


def stage_task_matrix(history: list[dict], direction: str) -> np.ndarray:
    """(stages, tasks) mAP of each task after each stage; NaN above the diagonal (not yet seen)."""
    n = len(history)
    matrix = np.full((n, n), np.nan)
    for t, rec in enumerate(history):
        matrix[t, : t + 1] = rec[direction]["task_map"]
    return matrix


def average_map(matrix: np.ndarray) -> np.ndarray:
    """Mean of each stage row over the tasks seen so far (R[t][j] for j ≤ t)."""
    return np.array([np.nanmean(matrix[t, : t + 1]) for t in range(len(matrix))])


def forgetting(matrix: np.ndarray) -> np.ndarray:
    """Per task j < T: the best mAP it ever had before the last stage minus its final mAP."""
    last = len(matrix) - 1
    return np.array([np.nanmax(matrix[j:last, j]) - matrix[last, j] for j in range(last)])


def backward_transfer(matrix: np.ndarray) -> float:
    """Mean over tasks j < T of R[T][j] − R[j][j] (negative: forgetting)."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return float(np.mean([matrix[last, j] - matrix[j, j] for j in range(last)]))
