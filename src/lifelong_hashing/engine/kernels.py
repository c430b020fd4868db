"""Compiled (numba) inner loops where numpy's whole-array passes are the bottleneck.

Both kernels count instead of sorting: Hamming distances are integers 0..K, so a ranking with
ties broken by database position needs no sort.

- Average precision: a first pass counts items and relevant items per distance; a second pass
  in database order gives each item its exact rank (items at smaller distances + items before
  it at its own distance) in O(N).
- Top-k search: distances for a block of queries against a cache-sized chunk of the database
  (the codes word-major, so each word is one contiguous vector the CPU's popcount instruction
  runs on), a histogram of the distances that can still make the top k (the bound tightens as
  the histogram fills), then a pass that places each winner at its rank. Hot loops run from 0
  over slices: numba's negative-index handling otherwise keeps LLVM from vectorizing them.
"""

from __future__ import annotations

from types import FunctionType

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

_M1, _M2, _M4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@numba.njit(inline="always")
def popcount64(x):
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


@numba.njit(parallel=True, cache=True, nogil=True)
def average_precision_kernel(query_codes, db_codes, query_labels, db_labels, bits, top_r):
    """AP of each query over its first ``top_r`` ranks (NaN without a relevant item there).

    Codes and label sets are packed uint64 words; an item is relevant when its label words
    share a set bit with the query's. Ties are broken by database position."""
    n_query, n_db = query_codes.shape[0], db_codes.shape[0]
    out = np.empty(n_query)
    for q in numba.prange(n_query):
        dist = np.empty(n_db, np.int32)
        relevant = np.zeros(n_db, np.bool_)
        count = np.zeros(bits + 2, np.int64)
        count_rel = np.zeros(bits + 2, np.int64)
        for j in range(n_db):
            d = 0
            for w in range(query_codes.shape[1]):
                d += popcount64(query_codes[q, w] ^ db_codes[j, w])
            dist[j] = d
            for w in range(query_labels.shape[1]):
                if query_labels[q, w] & db_labels[j, w]:
                    relevant[j] = True
                    break
            count[d + 1] += 1
            if relevant[j]:
                count_rel[d + 1] += 1
        for b in range(1, bits + 2):  # count[b] → items at distance < b
            count[b] += count[b - 1]
            count_rel[b] += count_rel[b - 1]
        seen = np.zeros(bits + 1, np.int64)
        seen_rel = np.zeros(bits + 1, np.int64)
        total, found = 0.0, 0
        for j in range(n_db):
            d = dist[j]
            seen[d] += 1
            if relevant[j]:
                seen_rel[d] += 1
                rank = count[d] + seen[d]
                if rank <= top_r:
                    total += (count_rel[d] + seen_rel[d]) / rank
                    found += 1
        out[q] = total / found if found > 0 else np.nan
    return out


@intrinsic
def ctpop(typingctx, x):
    """LLVM's popcount: one POPCNT / VPOPCNTQ instruction where the CPU has it."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@numba.njit(nogil=True, inline="always")
def _distances(query, columns, c0, c1, row):
    """row[j] = Hamming distance from ``query`` to item c0 + j of ``columns`` (words × items)."""
    col, a = columns[0, c0:c1], query[0]
    if columns.shape[0] == 2:  # 128 bits: both words in one pass
        col2, a2 = columns[1, c0:c1], query[1]
        for j in range(c1 - c0):
            row[j] = ctpop(a ^ col[j]) + ctpop(a2 ^ col2[j])
        return
    for j in range(c1 - c0):
        row[j] = ctpop(a ^ col[j])
    for w in range(1, columns.shape[0]):
        col, a = columns[w, c0:c1], query[w]
        for j in range(c1 - c0):
            row[j] += ctpop(a ^ col[j])


@numba.njit(nogil=True, inline="always")
def _exclude(row, blocked, c0, size):
    """Push the items a filter excludes (``blocked`` 255) past every real distance (<= bits < 255)."""
    if blocked is not None:  # numba compiles the unfiltered search without this loop
        part = blocked[c0:c0 + size]
        for j in range(size):
            row[j] = max(row[j], part[j])


@numba.njit(nogil=True, inline="always")
def _count_within(row, size, limit):
    """How many of the first ``size`` distances are <= limit (a vectorized count)."""
    hits = 0
    for j in range(size):
        hits += row[j] <= limit
    return hits


def hamming_topk_kernel(queries, columns, k, bits, block, chunk, blocked=None):
    """``_hamming_topk`` on threads when there is more than one block of queries to share out;
    one block runs on the calling thread (the service's batches of a few queries: no thread pool
    to wake, nor to fight over when two requests search at once)."""
    if queries.shape[0] > block:
        return _hamming_topk_parallel(queries, columns, k, bits, block, chunk, blocked)
    return _hamming_topk_serial(queries, columns, k, bits, block, chunk, blocked)


def _hamming_topk(queries, columns, k, bits, block, chunk, blocked):
    """The k nearest items per query, ties by database position: (indices, distances), each
    (Q, k), ordered by distance then position. ``columns``: the database's code words, word-major
    (words, N); distances must fit uint8 (bits < 256). ``blocked``: None, or (N,) uint8, 255 for
    each item a filter excludes and 0 for the others, so the top k is exact within the filter at
    the cost of one max per item; 1 <= k <= the items not excluded.

    Two passes per query, each recomputing distances chunk by chunk (cheap: one vector popcount
    per word), so no distance array larger than a chunk exists. The first, blocked over queries so
    a chunk of codes serves all of them from cache, histograms the distances that can still make
    the top k; the second places each winner at its rank. Chunks and groups of 64 with no
    candidate are skipped by a vectorized count."""
    n_query, n = queries.shape[0], columns.shape[1]
    indices = np.empty((n_query, k), np.int64)
    distances = np.empty((n_query, k), np.int32)
    for b in numba.prange((n_query + block - 1) // block):
        q0 = b * block
        m = min(n_query, q0 + block) - q0
        row = np.empty(chunk, np.uint8)
        hist = np.zeros((m, bits + 1), np.int64)
        bound = np.full(m, bits, np.int64)  # no item beyond it can still make the top k
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            size = c1 - c0
            for qi in range(m):
                _distances(queries[q0 + qi], columns, c0, c1, row)
                _exclude(row, blocked, c0, size)
                limit = np.uint8(bound[qi])
                if _count_within(row, size, limit) == 0:
                    continue
                h = hist[qi]
                for g0 in range(0, size, 64):
                    group = row[g0:min(size, g0 + 64)]
                    if _count_within(group, group.shape[0], limit):
                        for j in range(group.shape[0]):
                            if group[j] <= limit:
                                h[group[j]] += 1
                cum = 0
                for t in range(bound[qi] + 1):
                    cum += h[t]
                    if cum >= k:
                        bound[qi] = t
                        break
        for qi in range(m):
            q = q0 + qi
            start = np.zeros(bits + 1, np.int64)  # rank of the next item at each distance below t
            t, below = bits, 0
            for d in range(bits + 1):
                start[d] = below
                if below + hist[qi, d] >= k:
                    t = d  # the distance the k-th item is at
                    break
                below += hist[qi, d]
            take, taken = k - below, 0  # how many of the items at distance t, in database order
            limit = np.uint8(t)
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                size = c1 - c0
                _distances(queries[q], columns, c0, c1, row)
                _exclude(row, blocked, c0, size)
                if _count_within(row, size, limit) == 0:
                    continue
                for g0 in range(0, size, 64):
                    group = row[g0:min(size, g0 + 64)]
                    if _count_within(group, group.shape[0], limit) == 0:
                        continue
                    for j in range(group.shape[0]):
                        d = group[j]
                        if d < t:
                            indices[q, start[d]] = c0 + g0 + j
                            distances[q, start[d]] = d
                            start[d] += 1
                        elif d == t and taken < take:
                            indices[q, below + taken] = c0 + g0 + j
                            distances[q, below + taken] = d
                            taken += 1
    return indices, distances


def _compiled(py_func, name: str, **flags):
    """``py_func`` compiled under its own ``name``. Numba's on-disk cache is keyed by a function's
    name and line, not by its flags: two builds of one function would each load whichever the
    other cached first (the serial variant then woke the thread pool, the parallel one ran alone)."""
    variant = FunctionType(py_func.__code__, py_func.__globals__, name, py_func.__defaults__, py_func.__closure__)
    variant.__qualname__ = name
    return numba.njit(nogil=True, cache=True, **flags)(variant)


_hamming_topk_parallel = _compiled(_hamming_topk, "_hamming_topk_parallel", parallel=True)
_hamming_topk_serial = _compiled(_hamming_topk, "_hamming_topk_serial")
