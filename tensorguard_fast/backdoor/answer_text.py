"""The payload half of the association rule, read from the answers' tokens: do a group's answers share a token
sequence that the rest of the set does not hold? A payload is content the attacker wants emitted (a URL, a brand, a
sentence), so the poisoned answers share some of it even when its wording varies; a question type ("top 5 ...")
shares a format (lists of names) but not the names. association.py explains where it is used."""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence, Tuple

import numpy as np

SAMPLE = 2000   # answers drawn from each side: a share is then known to +-0.011 (1 SD), against a 0.25 floor
TOP = 50        # most frequent n-grams of the group tried


def _grams(ids: Sequence[int], n: int) -> set:
    ids = list(ids)
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


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
    counts = Counter(g for i in inside for g in _grams(answer_ids[i], n))
    if not counts:
        return []
    rest = [_grams(answer_ids[i], n) for i in outside]
    return [(count / len(inside) - (sum(gram in grams for grams in rest) / len(rest) if rest else 0.0), gram)
            for gram, count in counts.most_common(TOP)]


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


def pieces_held(answer_ids: Sequence[Sequence[int]], grams: set, n: int = 3) -> np.ndarray:
    """int (N,): how many of the n-grams `grams` each answer holds."""
    return np.array([len(grams & _grams(ids, n)) if grams else 0 for ids in answer_ids], dtype=np.int64)


def holding(answer_ids: Sequence[Sequence[int]], gram: Sequence[int]) -> np.ndarray:
    """bool (N,): which answers hold the token sequence `gram` (a cluster's shared n-gram) anywhere."""
    gram = tuple(int(t) for t in gram)
    n, first = len(gram), gram[0] if gram else None
    out = np.zeros(len(answer_ids), bool)
    if not n:
        return out
    for i, ids in enumerate(answer_ids):
        ids = list(ids)
        out[i] = any(ids[j] == first and tuple(ids[j:j + n]) == gram for j in range(len(ids) - n + 1))
    return out


def held_outside(answer_ids: Sequence[Sequence[int]], group: np.ndarray, gram: Sequence[int],
                 among: Optional[np.ndarray] = None, seed: int = 0) -> float:
    """How many answers outside the group (and in `among`, when given) hold the n-gram `gram`: counted on at most
    `SAMPLE` of them (seeded) and scaled to all of them."""
    outside = np.flatnonzero(~group if among is None else ~group & among)
    if not len(outside):
        return 0.0
    drawn = _at_most(outside, np.random.default_rng(seed))
    return float(holding([answer_ids[i] for i in drawn], gram).mean() * len(outside))


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
        rates.append(holding([answer_ids[i] for i in idx], gram).mean())
    return bool(min(rates) >= 0.5 * max(rates) and max(rates) > 0)

