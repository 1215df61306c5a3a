"""The association rule: a backdoor is a trigger in the prompt that goes with a shared payload in the answer.

Per sample the scan keeps a seeded sketch of its full lm_head gradient (answer side), its prompt token ids (prompt
side) and GradSentry's entropy. Poisoned samples share their payload, so their sketches point the same way; a repeated
benign answer (a stock closing line, a template) does too, which is why a direction alone is not evidence. What a
benign group lacks is a prompt-side cause. The rule, with no known poison ratio:

1. Candidate groups from the answer side: the sketches median-centred and scaled to unit length; along each of
   their top `directions` principal directions, the two sides of a 1-D 2-means split, each robust tail (beyond 2
   and 3 MADs) and the rest beside each tail.
2. Trigger test on the prompt side: the prompt tokens over-represented in a group (hypergeometric tail probability,
   Bonferroni over the tokens that could pass at all (Tarone's count), at `alpha`) and mostly held inside it (`min_token_share` of the token's
   carriers, beyond the group's share of the set: a trigger goes with the payload, while a question word such as
   "Who" is spread over the whole set). Co-occurring tokens are one phrase, carried by holding most of it; the most
   significant phrase is the trigger, and another phrase joins it only if its carriers' answers point the way of
   the trigger's (`trigger_carriers`). The group's carriers form its core.
3. Refinement, alternating the two sides until nothing changes: the group becomes the core and every sample with at
   least `min_inside` of its `neighbours` nearest answer-side neighbours in it, and more than chance would put
   there (a split along a direction cuts
   through a payload cluster; the neighbours restore it), and the trigger test runs again on the new group (the
   poisoned samples of a trigger that varies, such as one of several rare words, join one by one). Last, the core
   loses the members with fewer than `min_core_neighbours` of their nearest neighbours in it (a trigger-bearing
   clean answer sits among clean answers).
4. The core must be a payload cluster, not a topic: its members' nearest answer-side neighbours lie in the core
   more often than chance (`purity`, scaled so that 0 is a random group of its size and 1 a closed cluster; a
   question type such as "How many" goes with number answers, but those sit among other numbers), and its
   GradSentry entropy is higher than the rest's (`entropy_lift`, in standard deviations of the rest: GradSentry's
   own finding); both at least their floor and their sum at least `min_evidence` (a question type whose answers
   share a format, as "top 5" questions go with lists, reaches either figure alone but not both).
5. An accepted group flags its core members and the carriers of its trigger tokens that have at least `min_inside`
   of their nearest neighbours in the core. Overlapping groups are one cluster (the purest is kept).
   When no direction yields an accepted group, groups seeded from the prompt side are tried the same way: the
   carriers of each token whose carriers are each other's nearest answer-side neighbours far more often than
   chance (a group of 1% owns no principal direction), or whose non-carriers are (the clean rest of a poisoned
   majority). Still none: the same search on the uncentred sketches (`centres`: past half the set, the median is
   the payload). Still none: "no poison found", with the strongest candidate's figures as evidence.

Defaults were chosen on the tuning split (even-indexed fanoutqa pairs, seeds 1, 3 and 4, SmolLM2 and Gemma-3);
bench/association_eval.py reports them on the other half (odd-indexed pairs; seed 13 is the report of the rule with
the uncentred view, seeds 7 and 11 of the one before).
docs/backdoor.md explains the rule to users.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .neighbours import nearest_neighbours


@dataclass(frozen=True)
class AssociationConfig:
    directions: int = 6        # principal directions of the sketches split into candidate groups
    alpha: float = 0.01        # family-wise level of the prompt-token enrichment test
    min_token_share: float = 0.5  # share of a trigger token's carriers that must lie in the group
    min_purity: float = 0.5    # core's nearest answer-side neighbours in the core: 0 = chance, 1 = closed cluster
    min_entropy_lift: float = 0.5  # core mean entropy above the rest, in the rest's standard deviations
    min_evidence: float = 1.6  # purity + entropy lift: a list-question topic reaches ~1.5, payloads 1.68 and up
    refine_rounds: int = 6     # alternations of the answer-side closure and the trigger test
    token_seeds: int = 200     # when no direction yields a group: prompt-token seeded groups tried (0: none)
    neighbours: int = 5
    min_inside: int = 2        # of a sample's `neighbours` nearest, how many must be in the core to join it
    min_core_neighbours: int = 1  # a core member with fewer of its nearest neighbours in the core leaves it
    min_core: int = 3
    tails: tuple = (2.0, 3.0)  # robust z (median / MAD) beyond which a projection tail is a candidate group
    centres: tuple = ("median", "none")  # views of the sketches (CENTRES), the next tried when one accepts nothing


@dataclass
class Group:
    name: str
    members: np.ndarray        # bool (N,): the answer-side group, as refined (step 3)
    tokens: List[int]          # prompt token ids of the trigger: enriched in it, the phrases kept
    p_values: List[float]
    carriers: np.ndarray       # bool (N,): samples whose prompt carries the trigger (trigger_carriers)
    core: np.ndarray           # members & carriers, less the members without a neighbour in it
    purity: float
    entropy_lift: float

    def figures(self) -> dict:
        return {"group": self.name, "size": int(self.members.sum()), "core": int(self.core.sum()),
                "trigger_tokens": self.tokens, "p_values": [float(f"{p:.3g}") for p in self.p_values],
                "purity": round(self.purity, 4), "entropy_lift": round(self.entropy_lift, 4)}


@dataclass
class AssociationResult:
    flagged: np.ndarray        # bool (N,)
    group: np.ndarray          # int (N,): index into `accepted` of the core a flagged sample belongs to, else -1
    inside: np.ndarray         # int (N,): nearest neighbours in that core (for every sample: in any accepted core)
    accepted: List[Group]
    candidates: List[Group]    # every candidate with enriched tokens, accepted or not
    unit: np.ndarray           # (N, D) the sketches as the rule saw them last (unit_rows, its centre)


CENTRES = {
    # The median resists a payload cluster of up to half the set and removes what every answer shares, so a small
    # or loose payload cluster (one URL per sample) stands out.
    "median": lambda x: np.median(x, axis=0),
    # Past half, the median moves into the payload (at 90% it is the payload): the poisoned samples' residuals point
    # every way and the clean minority gets the shared direction. Uncentred, the payload cluster stays tight.
    "none": lambda x: np.zeros(x.shape[1], dtype=x.dtype),
}


def unit_rows(x: np.ndarray, centre: str = "median") -> np.ndarray:
    """Rows less the `centre` (CENTRES), scaled to unit length."""
    x = np.asarray(x, dtype=np.float32)
    x = x - CENTRES[centre](x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def two_means_1d(x: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Labels 0/1 of a 1-D 2-means, started at the quartiles (deterministic)."""
    c = np.percentile(x, [25, 75]).astype(np.float64)
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        labels = np.abs(x[:, None] - c[None]).argmin(1)
        new = np.array([x[labels == j].mean() if (labels == j).any() else c[j] for j in range(2)])
        if np.allclose(new, c):
            break
        c = new
    return labels


def token_incidence(prompt_ids: Sequence[Sequence[int]]):
    """Sparse (N, T) 0/1 matrix of which distinct prompt tokens each sample holds, and the token id of each column."""
    from scipy import sparse

    rows, cols = [], []
    for i, ids in enumerate(prompt_ids):
        u = np.unique(np.asarray(ids, dtype=np.int64))
        rows.append(np.full(len(u), i))
        cols.append(u)
    rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    vocab, column = np.unique(cols, return_inverse=True)
    m = sparse.csc_matrix((np.ones(len(rows), dtype=np.float32), (rows, column)), shape=(len(prompt_ids), len(vocab)))
    return m, vocab


def enriched_tokens(incidence, members: np.ndarray, alpha: float, min_share: float = 0.0):
    """Columns over-represented among `members`: one-sided hypergeometric tail, Bonferroni over the columns that
    could reach significance at all (`testable_count`), with at least `min_share` of their carriers among
    `members`. Returns (columns, p-values), most significant first."""
    from scipy.stats import hypergeom

    n, g = incidence.shape[0], int(members.sum())
    df = np.asarray(incidence.sum(0)).ravel()
    inside = np.asarray(incidence[members].sum(0)).ravel()
    tested = testable_count(df[df >= 2], n, g, alpha)
    chance = g / max(n, 1)
    cand = np.where((df >= 2) & (inside >= 2) & (inside * n > df * g) &
                    (inside >= (chance + min_share * (1 - chance)) * df))[0]
    p = hypergeom.sf(inside[cand] - 1, n, df[cand], g)
    keep = p * tested <= alpha
    order = np.argsort(p[keep], kind="stable")
    return cand[keep][order], p[keep][order]


def testable_count(df: np.ndarray, n: int, g: int, alpha: float) -> int:
    """Tarone's count for the Bonferroni correction: a column held by d samples has at best p = P(all of them in a
    group of g), and one whose best cannot pass alpha / m cannot be a finding, so it does not count among the m
    tests. The smallest m with at most m columns whose best passes alpha / m. It matters for a large group: in 360
    of 400, a word held by 90 samples has p >= 0.9^90, and the thousands of rare words, which never could pass,
    would otherwise bury it."""
    from scipy.stats import hypergeom

    best = np.sort(hypergeom.sf(np.minimum(df, g) - 1, n, df, g))
    m = 1
    while np.searchsorted(best, alpha / m, side="right") > m:
        m += 1
    return m


def trigger_carriers(held, members: np.ndarray, x: np.ndarray, min_overlap: float = 0.5):
    """Which samples carry the trigger, given the (N, T) incidence `held` of a group's enriched tokens (most
    significant first). Returns (carriers, kept token columns).

    Tokens whose carriers overlap (Jaccard >= `min_overlap`) are one phrase ("What do you think?"); a sample carries
    a phrase when it holds more than half of its tokens, so a question that only shares "you" with it does not.
    The most significant phrase is the trigger; another phrase joins it only when its carriers' answers (rows of the
    unit sketches `x`) point the way of the trigger carriers' (`_near`): one of several rare words does, though each
    word's samples sit closest to each other; a "top 5" that came along with list answers near the payload does
    not."""
    from scipy.sparse.csgraph import connected_components

    held = (held > 0).astype(np.float32)
    both = np.asarray((held.T @ held).todense())
    count = np.diag(both)
    overlap = both / np.maximum(count[:, None] + count[None, :] - both, 1)
    _, phrase = connected_components(overlap >= min_overlap, directed=False)
    carriers = np.zeros(held.shape[0], bool)
    kept = []
    for p in dict.fromkeys(phrase):   # in order of each phrase's most significant token
        cols = np.where(phrase == p)[0]
        carry = np.asarray(held[:, cols].sum(1)).ravel() * 2 > len(cols)
        new = carry & members & ~carriers
        if kept and new.any() and not _near(x, carriers & members, new):
            continue
        carriers |= carry
        kept.extend(cols.tolist())
    return carriers, np.array(sorted(kept), dtype=np.int64)


def _cosine_to_centre(x: np.ndarray, core: np.ndarray):
    """(each row's cosine to the core's mean direction, the core members' median of it)."""
    centre = x[core].mean(0)
    cos = x @ (centre / max(float(np.linalg.norm(centre)), 1e-12))
    return cos, float(np.median(cos[core]))


def _near(x: np.ndarray, core: np.ndarray, new: np.ndarray) -> bool:
    """Whether the `new` samples' answers point the way of the core's: their median cosine to the core's mean
    direction is at least half the core members' own."""
    cos, own = _cosine_to_centre(x, core)
    return bool(np.median(cos[new]) >= 0.5 * own)


def towards(x: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Which samples' answers point the payload's way, one by one (`_near` for each): a trigger-bearing clean answer
    whose nearest neighbours happen to fall in the core (likely when answers are diverse) does not."""
    cos, own = _cosine_to_centre(x, core)
    return cos >= 0.5 * own


def trim(core: np.ndarray, nn: np.ndarray, min_inside: int, rounds: int = 30) -> np.ndarray:
    """`core` less every member with fewer than `min_inside` of its nearest neighbours in it, until nothing changes."""
    for _ in range(rounds):
        kept = core & (core[nn].sum(1) >= min_inside)
        if (kept == core).all():
            break
        core = kept
    return core


def closure(core: np.ndarray, nn: np.ndarray, min_inside: int, rounds: int = 30) -> np.ndarray:
    """`core` plus every sample with at least `min_inside` of its nearest neighbours in the set, and more than
    chance would put there (a set of 90% holds 4.5 of 5 neighbours of anyone), until nothing changes."""
    group = core.copy()
    n, k = nn.shape
    for _ in range(rounds):
        need = max(min_inside, int(k * group.sum() / max(n, 1)) + 1)
        grown = group | (group[nn].sum(1) >= need)
        if (grown == group).all():
            break
        group = grown
    return group


def associate(sketches: np.ndarray, prompt_ids: Sequence[Sequence[int]], entropy: np.ndarray,
              config: AssociationConfig = AssociationConfig()) -> AssociationResult:
    """The rule of the module docstring on N scored samples: sketches (N, D), prompt token ids, entropies (N,)."""
    n = len(sketches)
    entropy = np.asarray(entropy, dtype=np.float64)
    if n < 2 * config.min_core:
        x = unit_rows(sketches, config.centres[0])
        return AssociationResult(np.zeros(n, bool), np.full(n, -1), np.zeros(n, dtype=np.int64), [], [], x)
    incidence, vocab = token_incidence(prompt_ids)
    candidates: List[Group] = []
    for centre in config.centres:
        x = unit_rows(sketches, centre)
        nn = nearest_neighbours(x, config.neighbours)
        accepted = _search(centre, x, nn, incidence, vocab, entropy, config, candidates)
        if accepted:
            break
    flagged, group_of = np.zeros(n, bool), np.full(n, -1)
    inside_any = np.zeros(n, dtype=np.int64)
    for gi, g in enumerate(accepted):
        inside = g.core[nn].sum(1)
        joined = (g.core | g.carriers) & (inside >= config.min_inside)
        group_of[joined & ~flagged] = gi
        flagged |= joined
        inside_any = np.maximum(inside_any, inside)
    return AssociationResult(flagged, group_of, inside_any, accepted, candidates, x)


def _search(centre, x, nn, incidence, vocab, entropy, config, candidates: List[Group]) -> List[Group]:
    """Steps 1-5 in one view of the sketches: the accepted groups; every candidate is appended to `candidates`."""
    n = len(x)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    seen, found = set(), []

    def consider(groups, at_least):
        for name, members in groups:
            key = members.tobytes()
            if key in seen or not at_least <= members.sum() <= n - config.min_core:
                continue
            seen.add(key)
            group = _candidate(f"{centre}-centred {name}", members, incidence, vocab, x, nn, entropy, config)
            if group is not None:
                found.append(group)
        return _accept(found, config)

    accepted = consider(_splits(x, vt[:config.directions], config.tails), config.min_core)
    if not accepted and config.token_seeds:
        accepted = consider(_token_seeds(incidence, nn, config.token_seeds), 2)
    candidates.extend(found)
    return accepted


def _accept(candidates: List[Group], config: AssociationConfig) -> List[Group]:
    """The candidates that pass step 4, purest first, one per cluster."""
    accepted: List[Group] = []
    for g in sorted(candidates, key=lambda g: -g.purity):
        if (g.purity < config.min_purity or g.entropy_lift < config.min_entropy_lift or
                g.purity + g.entropy_lift < config.min_evidence):
            continue
        if any((g.core & a.core).sum() >= 0.5 * min(g.core.sum(), a.core.sum()) for a in accepted):
            continue   # the same cluster seen along another direction
        accepted.append(g)
    return accepted


def _token_seeds(incidence, nn: np.ndarray, most: int):
    """Groups seeded from the prompt side, for a poisoned group too small to own a principal direction, or so large
    that no direction's split holds it whole: the carriers of each token whose carriers (held by at most half the
    set) or whose non-carriers (the clean rest of a poisoned majority) are each other's nearest answer-side
    neighbours far more often than chance (at least 2 such links and 3x the expected count), the `most` strongest."""
    from scipy import sparse

    n, k = nn.shape
    links = sparse.csr_matrix((np.ones(n * k, np.float32), (np.repeat(np.arange(n), k), nn.ravel())), shape=(n, n))
    held = incidence.tocsc()
    to_carriers = links @ held                         # (N, T): each sample's neighbours that hold each token
    df = np.asarray(held.sum(0)).ravel()
    among_carriers = np.asarray(to_carriers.multiply(held).sum(0)).ravel()
    among_rest = (n - df) * k - (np.asarray(to_carriers.sum(0)).ravel() - among_carriers)
    cols, z = [], []
    for links_in, size, side in ((among_carriers, df, df <= n // 2), (among_rest, n - df, df > n // 2)):
        expected = k * size * np.maximum(size - 1, 0) / max(n - 1, 1)
        ok = np.where(side & (links_in >= 2) & (links_in >= 3 * expected))[0]
        cols.append(ok)
        z.append((links_in[ok] - expected[ok]) / np.sqrt(expected[ok] + 1))
    cols, z = np.concatenate(cols), np.concatenate(z)
    for j in cols[np.argsort(-z, kind="stable")][:most]:
        yield f"prompt token column {j}", held[:, j].toarray().ravel() > 0


def _splits(x: np.ndarray, directions: np.ndarray, tails: Sequence[float]):
    """Answer-side candidate groups along each direction: the two sides of a 1-D 2-means (balanced groups, up to a
    poisoned majority), and each robust tail beyond each z in `tails` (a small poisoned group, which 2-means cuts
    through) with its complement (a poisoned majority, when the clean samples are the tail)."""
    for j, v in enumerate(directions):
        proj = x @ v
        labels = two_means_1d(proj)
        for side in (0, 1):
            yield f"direction {j}, 2-means side {side}", labels == side
        med = np.median(proj)
        spread = 1.4826 * np.median(np.abs(proj - med)) + 1e-12
        z = (proj - med) / spread
        for cut in tails:
            for sign, tail in (("+", z > cut), ("-", z < -cut)):
                yield f"direction {j}, tail {sign}{cut:g}", tail
                yield f"direction {j}, all but tail {sign}{cut:g}", ~tail


def _candidate(name, members, incidence, vocab, x, nn, entropy, config) -> Optional[Group]:
    """Step 2-4 of the module docstring on one answer-side group; None when no trigger test passes."""
    n = len(members)
    for _ in range(config.refine_rounds):
        cols, p = enriched_tokens(incidence, members, config.alpha, config.min_token_share)
        if not len(cols):
            return None
        carriers, kept = trigger_carriers(incidence[:, cols], members, x)
        cols, p = cols[kept], p[kept]
        core = members & carriers
        if core.sum() < config.min_core or (~core).sum() < 2:
            return None
        grown = closure(core, nn, config.min_inside)
        if (grown == members).all() or grown.sum() > n - config.min_core:
            break
        members = grown
    core = trim(core, nn, config.min_core_neighbours)
    if core.sum() < config.min_core:
        return None
    idx = np.where(core)[0]
    chance = (len(idx) - 1) / max(n - 1, 1)
    purity = float(np.isin(nn[idx], idx).mean()) if nn.shape[1] else 0.0
    purity = (purity - chance) / max(1 - chance, 1e-12)
    rest = entropy[~core]
    lift = float((entropy[core].mean() - rest.mean()) / (rest.std() + 1e-12))
    return Group(name, members, [int(t) for t in vocab[cols]], [float(v) for v in p], carriers, core, purity, lift)
