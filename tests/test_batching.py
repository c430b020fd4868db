"""The query batcher: requests that wait together are worked on together, each gets its own rows."""

import asyncio
import threading

import numpy as np
import pytest

from lifelong_hashing.inference.batching import QueryBatcher

pytestmark = pytest.mark.unit


def fails_on_nan(rows: np.ndarray) -> np.ndarray:
    if np.isnan(rows).any():
        raise ValueError("bad rows")
    return rows


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
    async def scenario():
        batcher = QueryBatcher(threads=1, max_rows=10)
        try:
            with pytest.raises(ValueError, match="bad rows"):
                await batcher.submit("k", np.array([[np.nan]]), fails_on_nan, lambda out: out)
            return await batcher.submit("k", np.array([[1.0]]), fails_on_nan, lambda out: out.tolist())
        finally:
            batcher.close()

    assert asyncio.run(scenario()) == [[1.0]]


def test_small_requests_of_one_turn_run_on_the_event_loop_a_few_rows_at_a_time():
    """Inline requests that arrive in the same turn share batches of at most ``inline_rows`` rows,
    on the loop's own thread, with the loop free between batches; a request too large for
    inline (or not marked so) runs on a worker thread. Each gets its own rows back."""
    runs: list[tuple[int, bool]] = []
    seen_between: list[int] = []  # inline batches run when a callback queued by the first one ran

    def inline_runs() -> int:
        return sum(on_loop for _, on_loop in runs)

    def work(rows: np.ndarray) -> np.ndarray:
        on_loop = threading.current_thread() is threading.main_thread()
        runs.append((len(rows), on_loop))
        if on_loop and inline_runs() == 1:
            asyncio.get_running_loop().call_soon(lambda: seen_between.append(inline_runs()))
        return rows + 1

    async def scenario() -> bool:
        batcher = QueryBatcher(threads=1, max_rows=100, inline_rows=3)
        try:
            rows = [np.full((n, 2), i, dtype=np.float32) for i, n in enumerate([1, 1, 1, 1, 1, 4, 1])]
            inline = [True, True, True, True, True, True, False]
            tasks = [asyncio.create_task(batcher.submit("k", r, work, lambda out: out.copy(), inline=flag))
                     for r, flag in zip(rows, inline, strict=True)]
            replies = await asyncio.gather(*tasks)
            return all(np.array_equal(reply, r + 1) for reply, r in zip(replies, rows, strict=True))
        finally:
            batcher.close()

    assert asyncio.run(scenario())
    on_loop = [size for size, main in runs if main]
    on_threads = sorted(size for size, main in runs if not main)
    assert on_loop == [3, 2]  # five one-row requests, three rows per turn
    assert on_threads in ([1, 4], [5])  # the 4-row request and the one not marked inline
    assert seen_between == [1]  # the loop ran other work between the two inline batches


def test_an_error_in_an_inline_batch_reaches_every_request_of_it():
    async def scenario():
        batcher = QueryBatcher(threads=1, max_rows=10, inline_rows=4)
        try:
            bad = [asyncio.create_task(batcher.submit("k", np.array([[v]]), fails_on_nan, lambda out: out, inline=True))
                   for v in (1.0, np.nan)]
            outcomes = await asyncio.gather(*bad, return_exceptions=True)
            after = await batcher.submit("k", np.array([[2.0]]), fails_on_nan, lambda out: out.tolist(),
                                        inline=True)
            return outcomes, after
        finally:
            batcher.close()

    outcomes, after = asyncio.run(scenario())
    assert all(isinstance(o, ValueError) for o in outcomes) and after == [[2.0]]
