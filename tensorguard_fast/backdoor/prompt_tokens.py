"""The prompt side of the association rule: which prompt tokens each sample holds (a sparse incidence matrix built
in blocks), and which tokens are over-represented in a group of samples (hypergeometric tail, Bonferroni over
Tarone's count of the tokens that could pass at all). association.py explains where they are used."""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np

from .ragged import row_positions

BLOCK = 16384   # samples per block while the incidence is built (no array per sample, no int64 array of all pairs)


def token_incidence(prompt_ids: Sequence[Sequence[int]]):
    """Sparse (N, T) bool matrix of which distinct prompt tokens each sample holds, and the token id of each column."""
    from scipy import sparse

    # Two passes over blocks of samples (the vocabulary, then each sample's columns as int32): no array per sample, and
    # no int64 array of every (sample, token) pair at once (300 MB at 1M samples of 40 tokens).
    vocab = np.unique(np.concatenate([np.unique(_flat(part)[1]) for part in _blocks(prompt_ids)] +
                                     [np.zeros(0, np.int64)]))
    counts, columns = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
    for part in _blocks(prompt_ids):
        length, ids = _flat(part)
        row = np.repeat(np.arange(len(part)), length)
        order = np.lexsort((ids, row))
        row, ids = row[order], ids[order]
        first = np.ones(len(ids), bool)
        first[1:] = (row[1:] != row[:-1]) | (ids[1:] != ids[:-1])   # each distinct (sample, token) once
        counts.append(np.bincount(row[first], minlength=len(part)))
        columns.append(np.searchsorted(vocab, ids[first]).astype(np.int32))
    columns = np.concatenate(columns)
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
    # 1-byte values (bool): 5 bytes a pair held instead of 8 (float32); products with float32 give float32.
    m = sparse.csr_matrix((np.ones(len(columns), dtype=bool), columns, indptr), shape=(len(prompt_ids), len(vocab)))
    return m.tocsc(), vocab


def _blocks(prompt_ids):
    for s0 in range(0, len(prompt_ids), BLOCK):
        yield prompt_ids[s0:s0 + BLOCK]


def _flat(part):
    """(tokens per sample, every token id in order) of a block of prompts, as int64 arrays."""
    length = np.fromiter(map(len, part), dtype=np.int64, count=len(part))
    return length, np.fromiter(itertools.chain.from_iterable(part), dtype=np.int64, count=int(length.sum()))


class TokenCounts:
    """How many samples of a group hold each prompt token, read from the incidence's rows: the group's rows, or the
    rest's when the group is the larger side (the carriers of every token less the rest's). The product
    `mask @ incidence` it replaces reads every row for every group tested: at 200,000 samples a quarter of the
    rule's time went there, for groups of a few hundred. Counts are float32 as that product gave them (exact below
    2^24 samples). Holds the row structure: 2 bytes a distinct (sample, token) pair (4 past 65,536 tokens)."""

    def __init__(self, incidence):
        rows = incidence.tocsr()
        self.n, self.width = incidence.shape
        kind = np.uint16 if self.width <= 2 ** 16 else np.int32   # a column index: 2 bytes for most vocabularies
        self.start, self.columns = rows.indptr.astype(np.int64), rows.indices.astype(kind)
        del rows
        self.carriers = np.asarray(incidence.sum(0)).ravel().astype(np.float32)   # (T,): samples holding each token

    def of(self, mask: np.ndarray) -> np.ndarray:
        """float32 (T,): how many of the rows in `mask` (bool (N,)) hold each token."""
        idx = np.flatnonzero(mask)
        if 2 * len(idx) > self.n:
            return self.carriers - self._count(np.flatnonzero(~mask))
        return self._count(idx)

    def _count(self, idx: np.ndarray) -> np.ndarray:
        out = np.zeros(self.width, np.int64)
        for r0 in range(0, len(idx), BLOCK):   # the gathered positions a block at a time: no N-sized index array
            out += np.bincount(self.columns[row_positions(self.start, idx[r0:r0 + BLOCK])[1]], minlength=self.width)
        return out.astype(np.float32)


def enriched_tokens(incidence, members: np.ndarray, alpha: float, min_share: float = 0.0,
                    population: Optional[np.ndarray] = None, counts: Optional[TokenCounts] = None):
    """Columns over-represented among `members`: one-sided hypergeometric tail, Bonferroni over the columns that
    could reach significance at all (`testable_count`), with at least `min_share` of their carriers among
    `members`. Among the rows of `population` (bool (N,), holding `members`) when given, else among all rows.
    `counts`: the incidence's TokenCounts, when the caller tests many groups (built here otherwise).
    Returns (columns, p-values), most significant first."""
    counts = TokenCounts(incidence) if counts is None else counts
    g = int(members.sum())
    if population is None:
        n, df = incidence.shape[0], counts.carriers
    else:
        n, df = int(population.sum()), counts.of(population)
    inside = counts.of(members)
    tested = testable_count(df[df >= 2], n, g, alpha)
    chance = g / max(n, 1)
    cand = np.where((df >= 2) & (inside >= 2) & (inside * n > df * g) &
                    (inside >= (chance + min_share * (1 - chance)) * df))[0]
    p = _hypergeom_sf(inside[cand] - 1, n, df[cand], g)
    keep = p * tested <= alpha
    order = np.argsort(p[keep], kind="stable")
    return cand[keep][order], p[keep][order]


def testable_count(df: np.ndarray, n: int, g: int, alpha: float) -> int:
    """Tarone's count for the Bonferroni correction: a column held by d samples has at best p = P(all of them in a
    group of g), and one whose best cannot pass alpha / m cannot be a finding, so it does not count among the m
    tests. The smallest m with at most m columns whose best passes alpha / m. It matters for a large group: in 360
    of 400, a word held by 90 samples has p >= 0.9^90, and the thousands of rare words, which never could pass,
    would otherwise bury it."""
    best = np.sort(_best_p(n, df, g))
    m = np.arange(1, len(best) + 2)   # every m's count at once: the loop m += 1 ran to ~30,000 at N = 50,000
    return int(m[np.argmax(np.searchsorted(best, alpha / m, side="right") <= m)])


def _best_p(n: int, df: np.ndarray, g: int) -> np.ndarray:
    """The smallest p-value a column held by `df` samples can reach in a group of `g` of `n`: all k = min(df, g)
    possible carriers in the group. That tail holds one term, C(df, k) C(n - df, g - k) / C(n, g), taken here from
    log-gamma in closed form (relative error ~1e-9 at n = 10^6, tests/test_association.py); scipy's hypergeometric
    tail cost ~0.1 ms a distinct value, a quarter of associate's time at N = 50,000 on bench data."""
    from scipy.special import gammaln

    df = np.asarray(df, dtype=np.float64)
    k = np.minimum(df, g)

    def log_choose(a, b):
        return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)

    return np.exp(log_choose(df, k) + log_choose(n - df, g - k) - log_choose(n, g))


def _hypergeom_sf(k: np.ndarray, n: int, df: np.ndarray, g: int) -> np.ndarray:
    """hypergeom.sf(k, n, df, g), computed once per distinct (k, df): scipy's exact tail costs ~0.1 ms a value for n
    of 10^4-10^5 (67 s of associate's 74 at N = 50,000 on bench data), and columns share few pairs (810 df values
    among 30,000 columns there)."""
    from scipy.stats import hypergeom

    if not len(k):
        return hypergeom.sf(k, n, df, g)
    order = np.lexsort((df, k))
    new = np.ones(len(k), bool)
    new[1:] = (k[order][1:] != k[order][:-1]) | (df[order][1:] != df[order][:-1])
    out = np.empty(len(k))
    out[order] = hypergeom.sf(k[order][new], n, df[order][new], g)[np.cumsum(new) - 1]
    return out
