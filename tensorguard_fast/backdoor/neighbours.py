"""Each row's k most cosine-similar other rows, exact for small sets and approximate for large ones.

The association rule (association.py) needs every sample's 5 nearest answer-side neighbours. Brute force costs N^2 D:
2.8 s at N = 20,000 (D = 128, one thread), so about two hours at N = 1,000,000. From `EXACT_BELOW` rows on, it is an
inverted file: a seeded spherical k-means on a random subsample places sqrt(probes N) centres (4 sqrt(N) at the
default 16 probes), every row joins the list of its nearest centre, and each row is compared exactly with the rows of
the `probes` lists whose centres are nearest to it. A row meets ~sqrt(probes N) candidates instead of N, so the cost
grows as N^1.5, and memory is a few fixed-size blocks plus O(N probes) integers (never an N x N or N x lists matrix).

Approximate, because a true neighbour in a list that was not probed is missed. bench/bench_neighbours.py (D = 128,
clustered unit rows, recall@5 against exact search on 2,000 queries, 2 shared cores) measured recall 0.991 at
20,000 rows, 0.998 at 100,000 and 0.968 at 1,000,000 (80 s with one BLAS thread, 122 s with OpenBLAS's two threads
fighting another busy process; 0.42 GB beyond the 0.49 GB input). On diffuse rows (uniform on the sphere, no
clusters) recall is only 0.16 at 100,000, but there a row's 5 nearest are barely nearer than anyone: the ones found
have cosine 0.30-0.34 against the true 0.34-0.38 (random pairs: 0). tests/test_neighbours.py checks the exact path
against a float64 brute force.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .ragged import row_positions

# Exact below this many rows, where it costs little: at 20,000 rows (D = 128, one BLAS thread) exact took 2.8 s and the
# approximate search 1.1 s (recall 0.991, bench/results/bench_neighbours_1threads.json; with OpenBLAS's two threads
# on a busy machine 3.4 and 5.9 s, its many small products suffer most). Beyond, exact grows as N^2 (8.9 s at 40,000
# against 1.7 s). Below, the neighbours are exactly those of the brute force the rule was tuned with.
EXACT_BELOW = 20_000
# Lists each row searches. Measured recall@5 at N = 250,000 (bench data with 100 rows a cluster, 2,000 lists): 0.972 /
# 0.974 at 12 / 16 probes; the search's cost is proportional.
PROBES = 16
# The default number of lists, sqrt(probes N), balances routing (N x lists similarities) against searching
# (N x probes x N / lists). It also makes lists finer than clusters: with sqrt(N) lists, recall at 250,000 rows fell
# to 0.82 (10 probes), as a list holding several clusters represents some of them so weakly that their rows scatter
# over many lists; faiss advises 4 to 16 sqrt(N).
SAMPLE_PER_LIST = 40      # k-means training rows per centre: faiss warns below 39; 64 bought +0.004 recall
KMEANS_ITERATIONS = 6     # recall 0.950 / 0.974 / 0.979 after 3 / 6 / 10 at 250,000 rows: the lists only route
QUERY_BLOCK = 1024
CANDIDATE_BLOCK = 16384
CELLS = QUERY_BLOCK * CANDIDATE_BLOCK  # similarities in one block: 64 MB of float32, the largest temporary
# The inverted file's blocks are smaller: its search holds the running best of every row, and a list's block of
# similarities was copied once more for the rows it improves (~140 MB at a million rows, at the rule's peak).
SEARCH_CELLS = CELLS // 8
FEW = 16                  # up to this many best columns, repeated argmax (SIMD) beats argpartition: 2.9 vs 6.1 ns a
                          # cell for 10 of 1000 columns, 5.2 vs 6.5 for 16


def nearest_neighbours(x: np.ndarray, k: int, exact_below: int = EXACT_BELOW, seed: int = 0,
                       probes: int = PROBES, lists: Optional[int] = None, sample: Optional[int] = None) -> np.ndarray:
    """(N, k) int64 indices of each row's k most cosine-similar other rows, most similar first. Rows are unit length
    (cosine = dot product); k is clipped to N - 1. Exact for N < `exact_below`, else the inverted file of the module
    docstring: `lists` centres (default sqrt(probes N)) trained on `sample` rows (default SAMPLE_PER_LIST a centre),
    `probes` lists searched per row; deterministic for a given `seed`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = min(int(k), max(n - 1, 0))
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    if n < exact_below:
        return exact_neighbours(x, k)
    return _inverted_file(x, k, max(1, int(probes)), lists, sample, np.random.default_rng(seed))


def exact_neighbours(x: np.ndarray, k: int, queries: Optional[np.ndarray] = None) -> np.ndarray:
    """(len(queries), k) int64: the exact k most similar other rows of the rows `queries` (default: every row),
    most similar first (ties: the lower index, up to float32 rounding), by brute force in blocks."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    queries = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    k = min(int(k), max(n - 1, 0))
    if k <= 0:
        return np.zeros((len(queries), 0), dtype=np.int64)
    out = np.empty((len(queries), k), dtype=np.int64)
    every = np.arange(n)
    for q0 in range(0, len(queries), QUERY_BLOCK):
        out[q0:q0 + QUERY_BLOCK] = _best_others(x, queries[q0:q0 + QUERY_BLOCK], every, k)
    return out


def default_lists(n: int, probes: int = PROBES) -> int:
    """sqrt(probes N) lists: see PROBES."""
    return max(1, round(math.sqrt(probes * n)))


def _inverted_file(x, k, probes, lists, sample, rng) -> np.ndarray:
    n, m = len(x), k + 1
    lists = int(min(n, lists or default_lists(n, probes)))
    centres = _spherical_kmeans(x, lists, sample or SAMPLE_PER_LIST * lists, rng)
    route = _nearest_centres(x, centres, min(probes, lists))   # (N, probes): column 0 is the row's own list
    rows, start = _rows_by_list(route[:, :1], lists)        # each list's own rows
    visits, vstart = _rows_by_list(route[:, 1:], lists)    # the rows that probe it as one of their other lists
    del route
    best_v = np.full((n, m), -np.inf, dtype=np.float32)
    best_i = np.full((n, m), -1, dtype=np.int32 if n < 2 ** 31 else np.int64)   # 4-byte ids: its largest array
    # Every row searches its own list first, where most of its neighbours are: the bar this sets is one that most
    # other lists do not beat, and those skip the selection and the merge.
    for c in range(lists):
        members = rows[start[c]:start[c + 1]]
        _search_list(x, members, members, best_v, best_i)
    for c in range(lists):
        _search_list(x, rows[start[c]:start[c + 1]], visits[vstart[c]:vstart[c + 1]], best_v, best_i)
    del rows, visits, best_v   # freed before the output is made, rather than held beside it
    short = np.nonzero((best_i < 0).any(1))[0]  # its probed lists held under k others: search it exactly
    out = _drop_self(best_i, np.arange(n)).astype(np.int64)
    del best_i
    out[short] = exact_neighbours(x, k, short)
    return out


def _rows_by_list(labels, lists):
    """The rows that hold each list among their `labels` ((N, c) list ids), in row order, and where each list's rows
    start: what a stable argsort of the raveled labels, divided by c, gives. Built by counting, a block of rows at a
    time, into 4-byte row ids: the argsort would hold an 8-byte index per (row, list) pair and its sorted labels
    (~300 MB at a million rows and 15 other probed lists, which was the rule's peak)."""
    n, per = labels.shape
    ids = np.int32 if n < 2 ** 31 else np.int64
    step = max(1, CANDIDATE_BLOCK * 64 // max(per, 1))   # ~1M pairs a block
    counts = np.zeros(lists, dtype=np.int64)
    for r0 in range(0, n, step):
        counts += np.bincount(labels[r0:r0 + step].ravel(), minlength=lists)
    start = np.concatenate([[0], np.cumsum(counts)])
    out = np.empty(int(start[-1]), dtype=ids)
    cursor = start[:-1].copy()
    for r0 in range(0, n, step):
        block = labels[r0:r0 + step].ravel()
        order = np.argsort(block, kind="stable")
        label = block[order]
        here = np.bincount(block, minlength=lists)
        first = np.cumsum(here) - here   # where each list's pairs start in the sorted block
        out[cursor[label] + np.arange(len(block)) - first[label]] = r0 + order // per
        cursor += here
    return out, start


def _search_list(x, rows, queries, best_v, best_i) -> None:
    """Merge the rows of one list into the running best (values, ids) of the querying rows."""
    m = best_v.shape[1]
    for r0 in range(0, len(rows), CANDIDATE_BLOCK):
        ids = rows[r0:r0 + CANDIDATE_BLOCK]
        r = x[ids]
        block = max(1, SEARCH_CELLS // len(ids))
        for q0 in range(0, len(queries), block):
            q = queries[q0:q0 + block]
            sim = x[q] @ r.T
            better = sim.max(1) > best_v[q, -1]
            if not better.all():
                q, sim = q[better], sim[better]
            if len(q):
                v, j = _best_columns(sim, min(m, len(ids)))
                best_v[q], best_i[q] = _merge(best_v[q], best_i[q], v, ids[j], m)


def _spherical_kmeans(x, lists, sample, rng, iterations=KMEANS_ITERATIONS) -> np.ndarray:
    """(lists, D) unit centres from Lloyd iterations on a random subsample, seeded with random rows of it."""
    pick = np.sort(rng.choice(len(x), size=min(len(x), max(sample, lists)), replace=False))
    s = x[pick]
    centres = s[rng.choice(len(s), size=lists, replace=False)]
    for _ in range(iterations):
        label = _nearest_centres(s, centres, 1)[:, 0]
        counts = np.bincount(label, minlength=lists)
        full = counts > 0
        starts = (np.cumsum(counts) - counts)[full]
        sums = np.add.reduceat(s[np.argsort(label, kind="stable")], starts, axis=0)
        centres[full] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        if not full.all():   # an empty list restarts from a random row rather than idling
            centres[~full] = s[rng.choice(len(s), size=int((~full).sum()), replace=False)]
    return centres


def _nearest_centres(x, centres, p) -> np.ndarray:
    """(N, p) int32: each row's p most similar centres, nearest first, in row blocks of CELLS similarities."""
    block = max(1, CELLS // len(centres))
    out = np.empty((len(x), p), dtype=np.int32)
    for r0 in range(0, len(x), block):
        out[r0:r0 + block] = _best_columns(x[r0:r0 + block] @ centres.T, p)[1]
    return out


def _best_others(x, queries, candidates, k) -> np.ndarray:
    """(len(queries), k) ids among `candidates` (row ids, at least k + 1) most similar to each query, less itself."""
    q = x[queries]
    best_v = best_i = None
    for c0 in range(0, len(candidates), CANDIDATE_BLOCK):
        ids = candidates[c0:c0 + CANDIDATE_BLOCK]
        v, j = _best_columns(q @ x[ids].T, min(k + 1, len(ids)))
        best_v, best_i = (v, ids[j]) if best_v is None else _merge(best_v, best_i, v, ids[j], k + 1)
    return _drop_self(best_i, queries)


def _merge(v1, i1, v2, i2, m):
    """The m best of two (values, ids) sets per row, best first."""
    v, i = np.concatenate([v1, v2], 1), np.concatenate([i1, i2], 1)
    o = np.argsort(-v, axis=1, kind="stable")[:, :m]
    return np.take_along_axis(v, o, 1), np.take_along_axis(i, o, 1)


def _drop_self(best_i, queries) -> np.ndarray:
    """Each row's best k + 1 less the query itself, or less the last when it is not among them (a duplicate of it
    may tie with it and win the place), which leaves the best k others either way."""
    is_self = best_i == np.asarray(queries)[:, None]
    drop = np.where(is_self.any(1), is_self.argmax(1), best_i.shape[1] - 1)
    keep = np.ones(best_i.shape, dtype=bool)
    keep[np.arange(len(best_i)), drop] = False
    return best_i[keep].reshape(len(best_i), best_i.shape[1] - 1)


def _best_columns(sim, m):
    """Values and columns of each row's m largest entries, largest first (ties: the lower column). Overwrites sim."""
    rows = np.arange(len(sim))
    if m <= FEW:
        cols = np.empty((len(sim), m), dtype=np.int64)
        vals = np.empty((len(sim), m), dtype=sim.dtype)
        for t in range(m):
            cols[:, t] = j = sim.argmax(1)
            vals[:, t] = sim[rows, j]
            sim[rows, j] = -np.inf
        return vals, cols
    part = np.argpartition(sim, sim.shape[1] - m, axis=1)[:, -m:]
    vals = np.take_along_axis(sim, part, 1)
    o = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(vals, o, 1), np.take_along_axis(part, o, 1)


class ReverseNeighbours:
    """The neighbour lists turned around: which rows list each row among their nearest. Counting how many of every
    row's nearest lie in a group (`group[nn].sum(1)`) then visits the group's rows only, so that growing a group of a
    few hundred by its neighbours (association.closure, many rounds a candidate) costs no pass over all N rows.
    4 bytes a (row, neighbour) pair."""

    def __init__(self, nn: np.ndarray):
        n, k = nn.shape
        flat = nn.ravel()
        self.n = n
        self.rows = (np.argsort(flat, kind="stable") // max(k, 1)).astype(np.int32 if n < 2 ** 31 else np.int64)
        self.start = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=n))]).astype(np.int64)

    def count(self, group: np.ndarray) -> np.ndarray:
        """int64 (N,): each row's nearest neighbours in `group` (bool (N,)), as `group[nn].sum(1)` counts them."""
        out = np.zeros(self.n, np.int64)
        idx = np.flatnonzero(group)
        for r0 in range(0, len(idx), CANDIDATE_BLOCK):   # gathered positions a block at a time
            at = row_positions(self.start, idx[r0:r0 + CANDIDATE_BLOCK])[1]
            if 8 * len(at) < self.n:   # a few rows: no pass over all N (a round of closure adds a handful)
                np.add.at(out, self.rows[at], 1)
            else:
                out += np.bincount(self.rows[at], minlength=self.n)
        return out
