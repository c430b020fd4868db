"""Queries that arrive together are worked on together: one encoder run and one top-k scan for all.

An encoder run reads its weights from memory once, however many rows it encodes, so a row in a
batch costs a fraction of a row alone (``bench/encoder_throughput.py``), and the search kernel
scans the codes once per block of queries. So the service hands each validated request to a ``QueryBatcher``,
which runs every waiting request with the same key (model version, operation, its parameters)
as one batch, up to a row limit, and hands each request back its own rows. Under light load a
batch is one request and nothing waits; under load batches grow by themselves.

Where a batch runs depends on its size. Small requests (the service's ``serving.inline_rows``
and ``inline_hits``) run on the event loop, batched with the small requests that arrived in the
same turn of the loop: handing one to a thread and back cost more than its work
(``bench/serve_load.py`` measures the service's CPU per request; docs/benchmarks.md). At most
``inline_rows`` rows run per turn, so the loop is never held for long and ``/health`` keeps
answering. Larger requests go to a fixed
number of worker threads (``serving.search_threads``) and never hold the loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Request:
    key: Hashable
    rows: np.ndarray
    work: Callable[[np.ndarray], Sequence[Any]]  # all rows of a batch → one result per row
    render: Callable[[Sequence[Any]], Any]       # this request's results → its reply
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class QueryBatcher:
    def __init__(self, threads: int, max_rows: int, inline_rows: int = 0):
        self.max_rows, self.inline_rows = max_rows, inline_rows
        self._waiting: collections.deque[_Request] = collections.deque()  # for the worker threads
        self._inline: collections.deque[_Request] = collections.deque()   # for the event loop's next turn
        self._ready = threading.Condition()
        self._closed = False
        self._workers = [threading.Thread(target=self._run, name=f"query-batcher-{i}", daemon=True)
                         for i in range(threads)]
        for worker in self._workers:
            worker.start()

    async def submit(self, key: Hashable, rows: np.ndarray, work: Callable, render: Callable,
                     inline: bool = False) -> Any:
        """The rendered reply for ``rows``, computed in a batch with the waiting requests of
        ``key``: on the event loop when ``inline`` (a small request) and it fits ``inline_rows``,
        else on a worker thread."""
        loop = asyncio.get_running_loop()
        request = _Request(key, rows, work, render, loop.create_future(), loop)
        if inline and len(rows) <= self.inline_rows:
            if not self._inline:
                loop.call_soon(self._run_inline)
            self._inline.append(request)
        else:
            with self._ready:
                if self._closed:
                    raise RuntimeError("the query batcher is closed")
                self._waiting.append(request)
                self._ready.notify()
        return await request.future

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for worker in self._workers:
            worker.join(timeout=10)

    def _run_inline(self) -> None:
        """One batch of the small requests on the loop; the next turn takes the rest, so requests
        that arrive meanwhile (and ``/health``) are not held behind them."""
        batch = _take_batch(self._inline, self.inline_rows)
        for request, (reply, error) in zip(batch, _compute(batch), strict=True):
            _settle(request.future, reply, error)
        if self._inline:
            asyncio.get_running_loop().call_soon(self._run_inline)

    def _take(self) -> list[_Request] | None:
        with self._ready:
            while not self._waiting and not self._closed:
                self._ready.wait()
            return _take_batch(self._waiting, self.max_rows) if self._waiting else None

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            for request, (reply, error) in zip(batch, _compute(batch), strict=True):
                request.loop.call_soon_threadsafe(_settle, request.future, reply, error)


def _take_batch(waiting: collections.deque[_Request], max_rows: int) -> list[_Request]:
    """The oldest waiting request and every other one of its key that fits in ``max_rows``."""
    first = waiting.popleft()
    batch, rows, kept = [first], len(first.rows), collections.deque()
    while waiting:
        other = waiting.popleft()
        if other.key == first.key and rows + len(other.rows) <= max_rows:
            batch.append(other)
            rows += len(other.rows)
        else:
            kept.append(other)
    waiting.extendleft(reversed(kept))
    return batch


def _compute(batch: list[_Request]) -> list[tuple[Any, BaseException | None]]:
    """(reply, error) per request: one ``work`` run over all their rows, each request rendering
    its own results; an error of the run reaches every request of the batch."""
    try:
        rows = np.concatenate([r.rows for r in batch]) if len(batch) > 1 else batch[0].rows
        results = batch[0].work(rows)
        start, replies = 0, []
        for request in batch:
            replies.append((request.render(results[start:start + len(request.rows)]), None))
            start += len(request.rows)
        return replies
    except Exception as err:  # noqa: BLE001 - handed to every request of the batch
        return [(None, err) for _ in batch]


def _settle(future: asyncio.Future, reply: Any, error: BaseException | None) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(reply)
