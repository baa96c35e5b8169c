"""Top-k over a bank scored in chunks of keys: memory stays queries x chunk, never queries x bank.

A scorer gives the scores of all queries against keys ``[a, b)``; each chunk keeps its best ``k`` per
query (``np.partition`` for the k-th score) and merges them with the best so far. Ties are broken by
key id (lower first) in the chunk and in the merge, so the result is the same whatever the chunk size:
the first ``k`` of a stable sort of the whole row by descending score.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# Scores held at once (queries x chunk keys): 4M float32 = 16 MiB, plus the scorer's own temporaries.
MAX_BLOCK = 1 << 22
# A chunk never has fewer keys than this, however many queries come at once.
MIN_CHUNK = 1024

ScoreBlock = Callable[[int, int], np.ndarray]  # (a, b) -> (n_queries, b - a) scores of keys a..b-1


def chunk_keys(n_queries: int) -> int:
    """Keys per chunk for ``n_queries`` queries scored at once."""
    return max(MIN_CHUNK, MAX_BLOCK // max(n_queries, 1))


def _chunk_top(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row of ``s`` (ties: lower column first), unordered scores/columns.

    Few temporaries the size of the row (a 1M-key row is 4 MB; each fresh one costs page faults):
    one partitioned copy and two masks per row, where a cumulative count of ties took 8 bytes a key."""
    n = s.shape[1]
    if k >= n:
        return s, np.broadcast_to(np.arange(n, dtype=np.int64), s.shape)
    kth = np.partition(s, n - k, axis=1)[:, n - k:n - k + 1]  # the k-th best score of each row
    above = s > kth
    need = k - above.sum(1)  # how many of the tied columns to keep, lowest first
    cols = np.empty((s.shape[0], k), np.int64)
    for r in range(s.shape[0]):
        ties = np.flatnonzero(s[r] == kth[r, 0])[:need[r]]  # need >= 1: the k-th best is a tie of itself
        cols[r] = np.sort(np.concatenate([np.flatnonzero(above[r]), ties]))
    return np.take_along_axis(s, cols, axis=1), cols


def _best(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by descending score then ascending id, cut to ``k``."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def chunked_top(score_block: ScoreBlock, n_queries: int, size: int, k: int,
                chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the best ``k`` of ``size`` keys per query, best first, scored ``chunk`` keys
    at a time (default ``chunk_keys(n_queries)``)."""
    k = min(k, size)
    best_s = np.zeros((n_queries, 0), np.float32)
    best_i = np.zeros((n_queries, 0), np.int64)
    if k <= 0 or n_queries == 0:
        return best_s, best_i
    step = chunk or chunk_keys(n_queries)
    for a in range(0, size, step):
        b = min(size, a + step)
        s, cols = _chunk_top(score_block(a, b), k)
        best_s, best_i = _best(np.concatenate([best_s, s.astype(best_s.dtype, copy=False)], axis=1),
                               np.concatenate([best_i, cols + a], axis=1), k)
    return best_s, best_i


def top_from_scores(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same selection over a score matrix already in memory (one chunk)."""
    return chunked_top(lambda a, b: s[:, a:b], s.shape[0], s.shape[1], k, chunk=max(s.shape[1], 1))
