"""Compiled (numba) inner loops where numpy's whole-array passes are the bottleneck.

Average precision by counting: Hamming distances are integers 0..K, so a query's ranking with
ties broken by database position needs no sort. A first pass counts items and relevant items
per distance; a second pass in database order gives each item its exact rank
(items at smaller distances + items before it at its own distance) in O(N), no argsort.
"""

from __future__ import annotations

import numba
import numpy as np

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
