"""The payload half of the association rule, read from the answers' tokens: do a group's answers share a token
sequence that the rest of the set does not hold? A payload is content the attacker wants emitted (a URL, a brand, a
sentence), so the poisoned answers share some of it even when its wording varies; a question type ("top 5 ...")
shares a format (lists of names) but not the names. association.py explains where it is used."""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .ragged import row_positions

SAMPLE = 2000   # answers drawn from each side: a share is then known to +-0.011 (1 SD), against a 0.25 floor
TOP = 50        # most frequent n-grams of the group tried
BLOCK = 16384   # answers per block while their n-gram codes are built (the Python tuples of a block at once)


class TokenRows:
    """Token id rows (the answers) as one flat array and row offsets, built once per `associate` call: the n-gram
    matching below gathers the rows it reads with no per-row Python work. Indexing gives a row (a view)."""

    def __init__(self, rows: Sequence[Sequence[int]]):
        lengths, flat = _concatenated(rows)
        fits = not len(flat) or (flat.min() >= 0 and flat.max() < 2 ** 31)
        self.flat = flat.astype(np.int32) if fits else flat   # token ids: 4 bytes a token held, not 8
        self.start = np.concatenate([[0], np.cumsum(lengths)])
        self._grams: Dict[int, Optional[GramCodes]] = {}

    def gram_codes(self, n: int) -> Optional["GramCodes"]:
        """Each answer's distinct n-grams as codes (GramCodes), built on first use; None when the ids are too large
        for one int64 code or negative."""
        if n not in self._grams:
            self._grams[n] = GramCodes.build(self, n)
        return self._grams[n]

    def __len__(self) -> int:
        return len(self.start) - 1

    def __getitem__(self, i):
        return self.flat[self.start[i]:self.start[i + 1]]

    def take(self, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(lengths, concatenated ids) of the rows `idx`."""
        lengths, at = row_positions(self.start, idx)
        return lengths, self.flat[at]


class GramCodes:
    """Each answer's distinct n-grams, one int64 code each (the ids as digits in base max id + 1), in the order that
    iterating its `_grams` set meets them, rows one after another. A Counter fed the sets of some answers in turn
    (what `_enrichments` did per candidate, ~20 ms for 2,000 answers) then equals counting these codes, with each
    gram's first position as the Counter's insertion order: so `most_common`'s order among equal counts, which
    decides the n-gram reported, is kept exactly. One Python pass over all answers per call (0.8 s for 100,000
    answers of 4-13 tokens) instead of one over 2,000 per test; 8 bytes a distinct n-gram held."""

    def __init__(self, base: int, n: int, codes: np.ndarray, start: np.ndarray):
        self.base, self.n, self.codes, self.start = base, n, codes, start

    @classmethod
    def build(cls, rows: "TokenRows", n: int) -> Optional["GramCodes"]:
        base = int(rows.flat.max(initial=0)) + 1
        if base ** n >= 2 ** 63 or (rows.flat < 0).any():
            return None
        codes, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for r0 in range(0, len(rows), BLOCK):
            sets = [_grams(rows[i], n) for i in range(r0, min(r0 + BLOCK, len(rows)))]
            counts.append(np.fromiter(map(len, sets), np.int64, len(sets)))
            digits = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(sets)), np.int64,
                                 int(counts[-1].sum()) * n).reshape(-1, n)
            codes.append(_codes(digits, base))
        return cls(base, n, np.concatenate(codes), np.concatenate([[0], np.cumsum(np.concatenate(counts))]))

    def take(self, idx: np.ndarray) -> np.ndarray:
        """The codes of the answers `idx`, in that order."""
        return self.codes[row_positions(self.start, idx)[1]]

    def gram(self, code: int) -> tuple:
        digits = []
        for _ in range(self.n):
            code, d = divmod(int(code), self.base)
            digits.append(d)
        return tuple(digits[::-1])


def _codes(digits: np.ndarray, base: int) -> np.ndarray:
    """int64 (M,): each row of an (M, n) array of ids as one code, the ids as digits in base `base` (the callers
    check that base^n < 2^63)."""
    code = np.zeros(len(digits), np.int64)
    for k in range(digits.shape[1]):
        code = code * base + digits[:, k]
    return code


def _lookup(wanted: np.ndarray, codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(found, index): which of `codes` are among the non-empty `wanted`, and for each the index in `wanted` of its
    match (the first, for repeats; meaningless where not found)."""
    order = np.argsort(wanted, kind="stable")
    at = np.minimum(np.searchsorted(wanted[order], codes), len(order) - 1)
    return wanted[order][at] == codes, order[at]


def _concatenated(rows: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """(lengths, every id in order as int64) of token id rows."""
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    flat = (np.concatenate([np.asarray(r, dtype=np.int64).ravel() for r in rows]) if lengths.sum()
            else np.zeros(0, np.int64))
    return lengths, flat


def _grams(ids: Sequence[int], n: int) -> set:
    ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)   # Python ints: the same hashes, faster
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def _rows(answer_ids, rows: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(lengths, concatenated ids) of the answers `rows` (default: all) of `answer_ids`."""
    if isinstance(answer_ids, TokenRows):   # all rows: the arrays as held, no gather
        return (np.diff(answer_ids.start), answer_ids.flat) if rows is None else answer_ids.take(rows)
    return _concatenated(answer_ids if rows is None else [answer_ids[i] for i in rows])


def _held_pairs(answers, grams: Sequence[tuple], n: int) -> Tuple[np.ndarray, np.ndarray]:
    """(answer, gram) index pairs, each once, for every n-gram of `grams` that an answer holds; `answers` is
    (lengths, concatenated ids) as `_rows` gives them.

    Vectorised: each n-gram position of the concatenated answers gets one integer code (the ids as digits in base
    max id + 1), matched against the grams' codes; the Python loops it replaces (a set per answer) were the rule's
    largest cost at 50,000 samples and more, where they run on every sampled side of every candidate."""
    empty = np.zeros(0, np.int64)
    lengths, flat = answers
    if not len(lengths) or not len(grams):
        return empty, empty
    flat = flat.astype(np.int64, copy=False)
    wanted = np.asarray(grams, dtype=np.int64).reshape(len(grams), n)
    base = int(max(flat.max(initial=0), wanted.max(initial=0))) + 1
    if len(flat) < n or base ** n >= 2 ** 63 or (wanted < 0).any() or (flat < 0).any():
        return _held_pairs_slow(np.split(flat, np.cumsum(lengths)[:-1]), grams, n)
    codes = _codes(np.lib.stride_tricks.sliding_window_view(flat, n), base)   # one per position
    owner = np.repeat(np.arange(len(lengths)), lengths)[:len(codes)]
    ends = np.cumsum(lengths)
    whole = ends[owner] - np.arange(len(codes)) >= n   # the n-gram lies inside one answer
    found, which = _lookup(_codes(wanted, base), codes)
    hit = whole & found
    pairs = np.unique(np.stack([owner[hit], which[hit]], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _held_pairs_slow(answers, grams, n):
    """`_held_pairs` from each answer's set of n-grams: for ids too large for one int64 code, or negative."""
    index = {tuple(int(t) for t in g): j for j, g in enumerate(grams)}
    pairs = [(i, index[g]) for i, a in enumerate(answers) for g in _grams([int(t) for t in a], n) if g in index]
    pairs = np.array(sorted(set(pairs)), dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def _at_most(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`idx`, or `SAMPLE` of them drawn without replacement when there are more."""
    return idx if len(idx) <= SAMPLE else rng.choice(idx, SAMPLE, replace=False)


def _enrichments(answer_ids: Sequence[Sequence[int]], group: np.ndarray, n: int, seed: int) -> list:
    """[(enrichment, n-gram)] for the group's `TOP` most frequent n-grams: the share of the group's answers holding
    it less the share of the other answers, each share on at most `SAMPLE` answers of its side (seeded)."""
    rng = np.random.default_rng(seed)
    inside, outside = np.flatnonzero(group), np.flatnonzero(~group)
    if not len(inside):
        return []
    inside, outside = _at_most(inside, rng), _at_most(outside, rng)
    codes = answer_ids.gram_codes(n) if isinstance(answer_ids, TokenRows) else None
    if codes is not None:
        return _enrichments_by_code(codes, inside, outside)
    counts = Counter(g for i in inside for g in _grams(answer_ids[i], n))
    if not counts:
        return []
    top = counts.most_common(TOP)
    _, which = _held_pairs(_rows(answer_ids, outside), [gram for gram, _ in top], n)
    rest = np.bincount(which, minlength=len(top)) / len(outside) if len(outside) else np.zeros(len(top))
    return [(count / len(inside) - float(share), gram) for (gram, count), share in zip(top, rest)]


def _enrichments_by_code(codes: GramCodes, inside: np.ndarray, outside: np.ndarray) -> list:
    """`_enrichments` from GramCodes, the same list in the same order: `Counter.most_common` sorts by count, equal
    counts in insertion order (each code's first position among the inside answers' codes)."""
    held = codes.take(inside)
    if not len(held):
        return []
    uniq, first, count = np.unique(held, return_index=True, return_counts=True)
    top = np.lexsort((first, -count))[:TOP]
    wanted = uniq[top]
    rest = np.zeros(len(top))
    if len(outside):
        found, which = _lookup(wanted, codes.take(outside))
        # an answer holds each of its codes once: a hit is one (answer, gram) pair
        rest = np.bincount(which[found], minlength=len(top)) / len(outside)
    return [(int(c) / len(inside) - float(share), codes.gram(u)) for u, c, share in zip(wanted, count[top], rest)]


def shared_answer_text(answer_ids: Sequence[Sequence[int]], group: np.ndarray, n: int = 3,
                       seed: int = 0) -> Tuple[float, Optional[tuple]]:
    """(enrichment, n-gram): the largest share of the group's answers holding one token n-gram, less the share of
    the other answers holding it, over the group's `TOP` most frequent n-grams; (0.0, None) when none is enriched.
    An n-gram every answer ends with (an end-of-turn token) is held on both sides and scores ~0. Shares are taken
    on at most `SAMPLE` answers of each side (seeded), so the cost does not grow with the set."""
    best, best_gram = 0.0, None
    for enrichment, gram in _enrichments(answer_ids, group, n, seed):
        if enrichment > best:
            best, best_gram = enrichment, gram
    return best, best_gram


def payload_grams(answer_ids: Sequence[Sequence[int]], group: np.ndarray, n: int = 3, floor: float = 0.25,
                  seed: int = 0) -> set:
    """Every n-gram of the group's answers enriched in them by at least `floor` (shared_answer_text's measure): the
    payload's text, all of its pieces. A payload worded differently per sample (one of several phrasings around a
    URL drawn per sample) has several pieces, each held by a part of the group."""
    return {gram for enrichment, gram in _enrichments(answer_ids, group, n, seed) if enrichment >= floor}


def pieces_held(answer_ids: Sequence[Sequence[int]], grams: set, n: int = 3,
                rows: Optional[np.ndarray] = None) -> np.ndarray:
    """int (N,), or one per index of `rows` when given: how many of the n-grams `grams` each answer holds."""
    answers = _rows(answer_ids, rows)
    who, _ = _held_pairs(answers, sorted(grams), n)
    return np.bincount(who, minlength=len(answers[0])).astype(np.int64)


def holders_of_pieces(answer_ids: Sequence[Sequence[int]], grams: set, n: int, least: int, rows: np.ndarray,
                      seed: int = 0) -> float:
    """How many of the answers `rows` (indices) hold at least `least` of the n-grams `grams`: counted on at most
    `SAMPLE` of them (seeded) and scaled to all of them."""
    if not len(rows) or not grams:
        return 0.0
    drawn = _at_most(np.asarray(rows), np.random.default_rng(seed))
    return float((pieces_held(answer_ids, grams, n, rows=drawn) >= least).mean() * len(rows))


def holding(answer_ids: Sequence[Sequence[int]], gram: Sequence[int], rows: Optional[np.ndarray] = None) -> np.ndarray:
    """bool (N,), or one per index of `rows` when given: which answers hold the token sequence `gram` (a cluster's
    shared n-gram) anywhere."""
    gram = tuple(int(t) for t in gram)
    codes = answer_ids.gram_codes(len(gram)) if gram and isinstance(answer_ids, TokenRows) else None
    if codes is not None:   # the answers' codes, not every position's: no temporaries of 8 bytes a token
        return _holding_by_code(codes, gram, len(answer_ids) if rows is None else rows)
    answers = _rows(answer_ids, rows)
    out = np.zeros(len(answers[0]), bool)
    if gram:
        out[_held_pairs(answers, [gram], len(gram))[0]] = True
    return out


def _holding_by_code(codes: GramCodes, gram: tuple, rows) -> np.ndarray:
    """`holding` from GramCodes: `rows` a count (every answer) or the indices of the answers wanted."""
    every = np.isscalar(rows)
    out = np.zeros(rows if every else len(rows), bool)
    if any(t < 0 or t >= codes.base for t in gram):
        return out   # an id no answer holds
    code = int(_codes(np.array([gram], np.int64), codes.base)[0])
    if every:
        at = np.flatnonzero(codes.codes == code)
        out[np.searchsorted(codes.start, at, side="right") - 1] = True
    else:
        lengths, at = row_positions(codes.start, rows)
        out[np.repeat(np.arange(len(lengths)), lengths)[codes.codes[at] == code]] = True
    return out


def held_outside(answer_ids: Sequence[Sequence[int]], group: np.ndarray, gram: Sequence[int],
                 among: Optional[np.ndarray] = None, seed: int = 0) -> float:
    """How many answers outside the group (and in `among`, when given) hold the n-gram `gram`: counted on at most
    `SAMPLE` of them (seeded) and scaled to all of them."""
    outside = np.flatnonzero(~group if among is None else ~group & among)
    if not len(outside):
        return 0.0
    drawn = _at_most(outside, np.random.default_rng(seed))
    return float(holding(answer_ids, gram, rows=drawn).mean() * len(outside))


def same_payload(answer_ids: Sequence[Sequence[int]], old: np.ndarray, new: np.ndarray, n: int = 3,
                 seed: int = 0) -> bool:
    """Whether two sets of answers (bool masks) carry one payload: the n-gram most enriched in their union (against
    every other answer) is held by each set at no less than half the other's rate. Two trigger words of one
    backdoor pass (both sides hold the payload); a question type beside a trigger does not (its list answers hold
    none of the payload's tokens)."""
    union = old | new
    _, gram = shared_answer_text(answer_ids, union, n)
    if gram is None or not old.any() or not new.any():
        return False
    rng = np.random.default_rng(seed)
    rates = []
    for part in (old, new):   # each rate on at most SAMPLE answers, as the shares above
        idx = _at_most(np.flatnonzero(part), rng)
        rates.append(holding(answer_ids, gram, rows=idx).mean())
    return bool(min(rates) >= 0.5 * max(rates) and max(rates) > 0)

