"""Compiled (numba) inner loops where numpy's whole-array passes are the bottleneck.

Both kernels count instead of sorting: Hamming distances are integers 0..K, so a ranking with
ties broken by database position needs no sort.

- Average precision: a first pass counts items and relevant items per distance; a second pass
  in database order gives each item its exact rank (items at smaller distances + items before
  it at its own distance) in O(N).
- Top-k search: one pass over the database per block of queries, a cache-sized chunk at a
  time (the codes word-major, so each word is one contiguous vector the CPU's popcount
  instruction runs on). Per query and chunk, one vector loop tells which quarters of the chunk
  hold an item below the query's bound; only items below it become candidates, the bound
  falling as they come, and a counting sort of the candidates gives the top k. Hot loops run
  from 0 over slices, or on unsigned offsets: numba's negative-index handling otherwise keeps
  LLVM from vectorizing them.
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


QUERY_BLOCK = 64  # queries sharing each chunk of codes while it is in cache
CHUNK = 1024  # codes per chunk, checked as 4 spans: the block reads a chunk from the L1 cache
GROUP = 64  # codes checked again, one group at a time, in a span that holds an item below a bound


@numba.njit(nogil=True, inline="always")
def _distance(a, col, a2, col2, part, j):
    """Distance from the query (words a, a2) to item j of the slices ``col``, ``col2`` (None for
    64-bit codes), pushed past every real distance (<= bits < 255) when ``part`` (a filter's
    slice, or None) excludes it. The Nones are types, so numba compiles each case without the
    branches, and the loops that call this vectorize."""
    d = ctpop(a ^ col[j])
    if col2 is not None:
        d += ctpop(a2 ^ col2[j])
    if part is not None:
        d = max(d, np.uint64(part[j]))
    return d


@numba.njit(nogil=True, inline="always")
def _spans_below(a, col, a2, col2, part, span, bound):
    """Bit i set when an item of span i (items i * span to (i + 1) * span of the slices, 4 spans)
    is below ``bound``. "Below" ORs the differences d - bound, whose top bit is set only when
    d < bound: a one-cycle dependency where a min or a count is a longer one. The four spans go
    in one loop, so the loop and its reductions are paid once per chunk."""
    s0, s1, s2, s3 = np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0)
    span = np.uint64(span)  # unsigned offsets: numba adds no negative-index fix-up, LLVM vectorizes
    for j in range(span):
        s0 |= _distance(a, col, a2, col2, part, j) - bound
        s1 |= _distance(a, col, a2, col2, part, j + span) - bound
        s2 |= _distance(a, col, a2, col2, part, j + 2 * span) - bound
        s3 |= _distance(a, col, a2, col2, part, j + 3 * span) - bound
    top = np.uint64(63)
    return (s0 >> top) | (s1 >> top) << np.uint64(1) | (s2 >> top) << np.uint64(2) | (s3 >> top) << np.uint64(3)


@numba.njit(nogil=True, inline="always")
def _any_below(a, col, a2, col2, part, j0, j1, bound):
    """Whether an item j0..j1 is below ``bound`` (as ``_spans_below``, for one group)."""
    acc = np.uint64(0)
    for j in range(np.uint64(j1 - j0)):
        acc |= _distance(a, col, a2, col2, part, np.uint64(j0) + j) - bound
    return acc >> np.uint64(63)


@numba.njit(nogil=True, inline="always")
def _distances(a, col, a2, col2, part, j0, j1, row):
    """row[j] = distance to item j0 + j, for a group that holds an item below the bound."""
    for j in range(np.uint64(j1 - j0)):  # unsigned offsets, as in _spans_below
        row[j] = _distance(a, col, a2, col2, part, np.uint64(j0) + j)


# A query's candidates: item positions and distances in database order, their histogram, and its
# state: how many there are, the bound (only an item below it can still make the top k: the
# smallest distance with k candidates at or below it, bits + 1 until there are k) and how many
# candidates lie below the bound.
_COUNT, _BOUND, _BELOW = 0, 1, 2


@numba.njit(nogil=True, inline="always")
def _admit(q, position, d, found, found_at, hist, state, k):
    """Add the item at ``position``, distance d < bound, to query q's candidates and tighten the
    bound: amortised O(1), since the bound only falls. Items at the bound that come later lose
    their tie to the earlier ones, so the bound excludes its own distance. (Rows indexed, not
    sliced: a slice per candidate costs more than the rest of this.)"""
    if state[q, _COUNT] == found.shape[1]:
        _compact(found[q], found_at[q], hist[q], state[q], k)
    count = state[q, _COUNT]
    found[q, count], found_at[q, count] = position, d
    state[q, _COUNT] = count + 1
    hist[q, d] += 1
    below, bound = state[q, _BELOW] + 1, state[q, _BOUND]
    while below >= k:
        bound -= 1
        below -= hist[q, bound]
    state[q, _BELOW], state[q, _BOUND] = below, bound


@numba.njit(nogil=True, inline="always")
def _compact(found, found_at, hist, state, k):
    """Drop the candidates that can no longer make the top k: those past the bound and, at the
    bound, all but the first ones needed. Keeps database order; leaves k candidates."""
    bound, need = state[_BOUND], k - state[_BELOW]
    kept, at_bound = 0, 0
    for i in range(state[_COUNT]):
        d = found_at[i]
        if d < bound or (d == bound and at_bound < need):
            at_bound += d == bound
            found[kept], found_at[kept] = found[i], d
            kept += 1
    hist[bound] = at_bound
    hist[bound + 1:] = 0
    state[_COUNT] = kept


@numba.njit(nogil=True, inline="always")
def _place(found, found_at, hist, state, k, indices, distances):
    """The top k in order: a counting sort of the candidates by distance, stable, so ties stay in
    database order; at the k-th distance only the first ones needed are taken."""
    start = np.zeros(hist.shape[0], np.int64)  # the rank of the next item at each distance
    rank = 0
    for d in range(hist.shape[0]):
        start[d] = rank
        rank += hist[d]
    for i in range(state[_COUNT]):
        d = found_at[i]
        if start[d] < k:
            indices[start[d]], distances[start[d]] = found[i], d
            start[d] += 1


def hamming_topk_kernel(queries, columns, k, bits, block=QUERY_BLOCK, chunk=CHUNK, blocked=None):
    """``_hamming_topk`` on threads when there is more than one block of queries to share out;
    one block runs on the calling thread (the service's batches of a few queries: no thread pool
    to wake, nor to fight over when two requests search at once)."""
    if columns.shape[0] not in (1, 2):
        raise ValueError(f"the kernel takes codes of 1 or 2 words (up to 128 bits), got {columns.shape[0]}")
    run = _hamming_topk_parallel if queries.shape[0] > block else _hamming_topk_serial
    if columns.shape[0] == 1:
        return run(queries, columns[0], None, k, bits, block, chunk, blocked)
    return run(queries, columns[0], columns[1], k, bits, block, chunk, blocked)


def _hamming_topk(queries, words, words2, k, bits, block, chunk, blocked):
    """The k nearest items per query, ties by database position: (indices, distances), each
    (Q, k), ordered by distance then position. ``words``, ``words2``: the database's first and
    second code words, (N,) each (None for 64-bit codes). ``blocked``: None, or (N,) uint8, 255
    for each item a filter excludes and 0 for the others, so the top k is exact within the filter
    at the cost of one max per item; 1 <= k <= the items not excluded.

    One pass over the database per block of queries, a chunk at a time so the chunk's codes serve
    every query of the block from cache. Per query and chunk, one vector loop tells which of its
    4 spans hold an item below the query's bound; only their groups are checked again, and a
    group's items below the bound admitted as candidates, the bound falling as they come. The
    pass runs near the popcount-only ceiling, slowed by the candidates an online selection must
    look at, about k (1 + ln(N / k)) a query (bench/results/search_speed.json, "ceiling")."""
    n_query, n = queries.shape[0], words.shape[0]
    indices = np.empty((n_query, k), np.int64)
    distances = np.empty((n_query, k), np.int32)
    span = (chunk + 3) // 4
    for b in numba.prange((n_query + block - 1) // block):
        q0 = b * block
        m = min(n_query, q0 + block) - q0
        row = np.empty(GROUP, np.uint64)
        found = np.empty((m, max(2 * k, 256)), np.int64)
        found_at = np.empty(found.shape, np.int64)
        hist = np.zeros((m, bits + 2), np.int64)
        state = np.zeros((m, 3), np.int64)
        state[:, _BOUND] = bits + 1
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            col = words[c0:c1]
            col2 = None if words2 is None else words2[c0:c1]
            part = None if blocked is None else blocked[c0:c1]
            for qi in range(m):
                a, bound = queries[q0 + qi, 0], np.uint64(state[qi, _BOUND])
                a2 = queries[q0 + qi, queries.shape[1] - 1]  # read only with col2
                whole = c1 - c0 == 4 * span  # the last chunk may be short: all its spans are looked at
                spans = _spans_below(a, col, a2, col2, part, span, bound) if whole else np.uint64(15)
                for s0 in range(0, c1 - c0, span):
                    if not (spans >> np.uint64(s0 // span)) & np.uint64(1):
                        continue
                    s1 = min(c1 - c0, s0 + span)
                    for g0 in range(s0, s1, GROUP):
                        g1 = min(s1, g0 + GROUP)
                        if not _any_below(a, col, a2, col2, part, g0, g1, bound):
                            continue
                        _distances(a, col, a2, col2, part, g0, g1, row)
                        for j in range(g1 - g0):
                            if row[j] < bound:
                                _admit(qi, c0 + g0 + j, row[j], found, found_at, hist, state, k)
                                bound = np.uint64(state[qi, _BOUND])
        for qi in range(m):
            _place(found[qi], found_at[qi], hist[qi], state[qi], k, indices[q0 + qi], distances[q0 + qi])
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
