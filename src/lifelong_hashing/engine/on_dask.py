"""The data-parallel steps of an increment on a Dask cluster (``pipeline.dask``): database codes
(an append batch, the joint baseline's re-encoding) and the evaluation's per-query scores, shard
by shard on the workers. ``sharding`` cuts the work into files and reads the answers back; this
module sends the shard files to the workers and counts what they did. The codes and scores are
those of one process (``tests/test_distributed.py``).

Workers get paths, never arrays (large arrays through the scheduler are slow and memory-hungry),
and run ``sharding``'s functions, so a worker needs this package and nothing of the flow.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lifelong_hashing.config import DaskConfig, EvalConfig
from lifelong_hashing.engine import sharding
from lifelong_hashing.engine.state import save_method

log = logging.getLogger(__name__)


class DaskCluster:
    """``pipeline.dask`` for one run: a client of the scheduler at ``cfg.address``, or of a
    LocalCluster of ``cfg.workers`` single-threaded processes, started at first use and closed
    with ``close`` (each task runs ``train.threads`` torch threads itself)."""

    def __init__(self, cfg: DaskConfig):
        self.cfg, self._local, self._client = cfg, None, None

    def map(self, fn, *iterables) -> list:
        """``fn`` over the iterables on the workers, results in order; a failed task raises."""
        client = self.client()
        return client.gather(client.map(fn, *iterables, pure=False))

    def client(self):
        """The Dask client, connecting (or starting the LocalCluster) on first use."""
        if self._client is None:
            from distributed import Client, LocalCluster

            if not self.cfg.address:
                self._local = LocalCluster(n_workers=self.cfg.workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
            self._client = Client(self.cfg.address or self._local)
        return self._client

    def close(self) -> None:
        for part in (self._client, self._local):
            if part is not None:
                part.close()
        self._client = self._local = None


class DaskEncoder:
    """Database codes by shards on the cluster (a ``DatabaseEncoder``): each call saves the
    method's encoders and the batch's shard files under ``work`` for the workers. Counts the
    shards and seconds it spent."""

    def __init__(self, cluster: DaskCluster, work: Path, rows: int):
        self.cluster, self.work, self.rows = cluster, work, rows
        self.calls, self.shards, self.seconds = 0, 0, 0.0

    def __call__(self, method, batch) -> dict:
        start = time.perf_counter()
        self.calls += 1
        out = self.work / f"encoding-{self.calls}"
        encoders = str(save_method(method, out / "method"))
        shards = [str(p) for p in sharding.write_shards(batch, out / "shards", self.rows)]
        codes = sharding.read_shard_codes(self.cluster.map(sharding.encode_shard, [encoders] * len(shards), shards))
        elapsed = time.perf_counter() - start
        self.shards, self.seconds = self.shards + len(shards), self.seconds + elapsed
        log.info("encoded %d items in %d shards on Dask in %.1f s", len(batch), len(shards), elapsed)
        return codes


class DaskScorer:
    """The evaluation's per-query scores (a ``Scorer``), by query shards of ``rows`` on the cluster."""

    def __init__(self, cluster: DaskCluster, work: Path, rows: int):
        self.cluster, self.work, self.rows = cluster, work, rows
        self.calls, self.shards = 0, 0

    def __call__(self, q_codes, db_codes, q_labels, db_labels, cfg: EvalConfig) -> dict:
        self.calls += 1
        database, shards = sharding.write_query_shards(q_codes, q_labels, db_codes, db_labels,
                                                       self.work / f"scoring-{self.calls}", self.rows)
        self.shards += len(shards)
        n = len(shards)
        return sharding.read_shard_scores(self.cluster.map(sharding.score_shard, [str(database)] * n,
                                                           [str(p) for p in shards], [cfg] * n))
