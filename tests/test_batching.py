"""The query batcher: requests that wait together are worked on together, each gets its own rows."""

import asyncio
import threading

import numpy as np
import pytest

from lifelong_hashing.inference.batching import QueryBatcher

pytestmark = pytest.mark.unit


def test_waiting_requests_of_one_key_share_a_batch_and_get_their_own_rows():
    batches: list[int] = []
    gate = threading.Event()

    def hold(rows: np.ndarray) -> np.ndarray:
        gate.wait(5)  # keeps the only worker busy until every other request is waiting
        return rows

    def work(rows: np.ndarray) -> np.ndarray:
        batches.append(len(rows))
        return rows * 2

    async def scenario() -> list:
        batcher = QueryBatcher(threads=1, max_rows=6)
        try:
            held = asyncio.create_task(batcher.submit("hold", np.zeros((1, 2)), hold, lambda out: out))
            await asyncio.sleep(0.2)
            sizes = [1, 2, 1, 3, 1, 2]
            keys = ["a", "a", "b", "a", "a", "b"]
            rows = [np.full((n, 2), i, dtype=np.float32) for i, n in enumerate(sizes)]
            tasks = [asyncio.create_task(batcher.submit(k, r, work, lambda out: out.copy()))
                     for k, r in zip(keys, rows, strict=True)]
            await asyncio.sleep(0.2)
            gate.set()
            replies = await asyncio.gather(*tasks)
            await held
            return [np.array_equal(reply, r * 2) for reply, r in zip(replies, rows, strict=True)]
        finally:
            batcher.close()

    assert all(asyncio.run(scenario()))
    # Key "a" took 1 + 2 + 3 rows (its last row would pass max_rows=6), then "b" its 1 + 2, then
    # the "a" left over: oldest first, one key per batch.
    assert batches == [6, 3, 1]


def test_an_error_in_a_batch_reaches_every_request_of_it_and_the_worker_goes_on():
    def work(rows: np.ndarray) -> np.ndarray:
        if np.isnan(rows).any():
            raise ValueError("bad rows")
        return rows

    async def scenario():
        batcher = QueryBatcher(threads=1, max_rows=10)
        try:
            with pytest.raises(ValueError, match="bad rows"):
                await batcher.submit("k", np.array([[np.nan]]), work, lambda out: out)
            return await batcher.submit("k", np.array([[1.0]]), work, lambda out: out.tolist())
        finally:
            batcher.close()

    assert asyncio.run(scenario()) == [[1.0]]
