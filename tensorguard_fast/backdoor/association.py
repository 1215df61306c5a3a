"""The association rule: a backdoor is a trigger in the prompt that goes with a shared payload in the answer.

Per sample the scan keeps a seeded sketch of its full lm_head gradient (answer side), its prompt token ids (prompt
side) and GradSentry's entropy. Poisoned samples share their payload, so their sketches point the same way; a repeated
benign answer (a stock closing line, a template) does too, which is why a direction alone is not evidence. What a
benign group lacks is a prompt-side cause. The rule, with no known poison ratio:

1. Candidate groups from the answer side: the sketches are median-centred and scaled to unit length; along each of
   their top `directions` principal directions, the two sides of a 1-D 2-means split, each robust tail (beyond 2
   and 3 MADs) and the rest beside each tail.
2. Trigger test on the prompt side: the prompt tokens over-represented in a group (hypergeometric tail probability,
   Bonferroni over the tokens tested, at `alpha`). The group's carriers of those tokens form its core.
3. The core must be a payload cluster, not a topic: most of its members' nearest answer-side neighbours are in the
   core (`purity`; a question type such as "How many" goes with number answers, but those answers sit among other
   numbers), and its GradSentry entropy is higher than the rest's (`entropy_lift`, in standard deviations of the
   rest: GradSentry's own finding, used here as a vote).
4. An accepted core is trimmed to the members with at least `min_inside` of their `neighbours` nearest neighbours in
   it, and extended to the group's and the carriers' samples that meet the same test. Overlapping cores are merged
   (the purest first). No accepted group: "no poison found", with the best candidate's figures as evidence.

Defaults were chosen on the tuning split (even-indexed fanoutqa pairs, seed 1, SmolLM2); bench/backdoor_eval.py
reports them on the other half. docs/backdoor.md explains the rule to users.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class AssociationConfig:
    directions: int = 6        # principal directions of the sketches split into candidate groups
    alpha: float = 0.01        # family-wise level of the prompt-token enrichment test
    min_purity: float = 0.6    # share of a core's nearest answer-side neighbours that lie in the core
    min_entropy_lift: float = 0.5  # core mean entropy above the rest, in the rest's standard deviations
    neighbours: int = 5
    min_inside: int = 2        # of a sample's `neighbours` nearest, how many must be in the core to belong to it
    min_core: int = 3
    tails: tuple = (2.0, 3.0)  # robust z (median / MAD) beyond which a projection tail is a candidate group


@dataclass
class Group:
    name: str
    members: np.ndarray        # bool (N,): the answer-side candidate group
    tokens: List[int]          # prompt token ids enriched in it
    p_values: List[float]
    carriers: np.ndarray       # bool (N,): samples whose prompt holds one of `tokens`
    core: np.ndarray           # members & carriers
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


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Median-centred rows scaled to unit length (the median resists the payload cluster, up to half the data)."""
    x = np.asarray(x, dtype=np.float32)
    x = x - np.median(x, axis=0)
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


def nearest_neighbours(x: np.ndarray, k: int, block: int = 2048) -> np.ndarray:
    """(N, k) indices of each row's k most cosine-similar other rows (rows are unit length), in row blocks."""
    n = len(x)
    k = min(k, max(n - 1, 0))
    out = np.zeros((n, k), dtype=np.int64)
    for r0 in range(0, n, block):
        sim = x[r0:r0 + block] @ x.T
        sim[np.arange(sim.shape[0]), np.arange(r0, r0 + sim.shape[0])] = -np.inf
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k else np.zeros((sim.shape[0], 0), dtype=np.int64)
        order = np.take_along_axis(sim, part, 1).argsort(1)[:, ::-1]
        out[r0:r0 + block] = np.take_along_axis(part, order, 1)
    return out


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


def enriched_tokens(incidence, members: np.ndarray, alpha: float):
    """Columns over-represented among `members`: one-sided hypergeometric tail, Bonferroni over the tested columns
    (those held by >= 2 samples). Returns (columns, p-values), most significant first."""
    from scipy.stats import hypergeom

    n, g = incidence.shape[0], int(members.sum())
    df = np.asarray(incidence.sum(0)).ravel()
    inside = np.asarray(incidence[members].sum(0)).ravel()
    tested = max(1, int((df >= 2).sum()))
    cand = np.where((df >= 2) & (inside >= 2) & (inside * n > df * g))[0]
    p = hypergeom.sf(inside[cand] - 1, n, df[cand], g)
    keep = p * tested <= alpha
    order = np.argsort(p[keep], kind="stable")
    return cand[keep][order], p[keep][order]


def _absorb(core: np.ndarray, nn: np.ndarray, min_inside: int) -> np.ndarray:
    """Drop core members with fewer than `min_inside` neighbours in the core, until nothing changes."""
    for _ in range(20):
        keep = core & (core[nn].sum(1) >= min_inside)
        if (keep == core).all():
            break
        core = keep
    return core


def associate(sketches: np.ndarray, prompt_ids: Sequence[Sequence[int]], entropy: np.ndarray,
              config: AssociationConfig = AssociationConfig()) -> AssociationResult:
    """The rule of the module docstring on N scored samples: sketches (N, D), prompt token ids, entropies (N,)."""
    n = len(sketches)
    entropy = np.asarray(entropy, dtype=np.float64)
    none = AssociationResult(np.zeros(n, bool), np.full(n, -1), np.zeros(n, dtype=np.int64), [], [])
    if n < 2 * config.min_core:
        return none
    x = unit_rows(sketches)
    nn = nearest_neighbours(x, config.neighbours)
    incidence, vocab = token_incidence(prompt_ids)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    candidates, seen = [], set()
    for name, members in _splits(x, vt[:config.directions], config.tails):
        key = members.tobytes()
        if key in seen or not config.min_core <= members.sum() <= n - config.min_core:
            continue
        seen.add(key)
        group = _candidate(name, members, incidence, vocab, nn, entropy, config)
        if group is not None:
            candidates.append(group)
    accepted: List[Group] = []
    for g in sorted(candidates, key=lambda g: -g.purity):
        if g.purity < config.min_purity or g.entropy_lift < config.min_entropy_lift:
            continue
        if any((g.core & a.core).sum() >= 0.5 * min(g.core.sum(), a.core.sum()) for a in accepted):
            continue   # the same cluster seen along another direction
        accepted.append(g)
    flagged, group_of = np.zeros(n, bool), np.full(n, -1)
    inside_any = np.zeros(n, dtype=np.int64)
    for gi, g in enumerate(accepted):
        core = _absorb(g.core, nn, config.min_inside)
        inside = core[nn].sum(1)
        joined = core | ((g.members | g.carriers) & (inside >= config.min_inside))
        group_of[joined & ~flagged] = gi
        flagged |= joined
        inside_any = np.maximum(inside_any, inside)
    return AssociationResult(flagged, group_of, inside_any, accepted, candidates)


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


def _candidate(name, members, incidence, vocab, nn, entropy, config) -> Optional[Group]:
    cols, p = enriched_tokens(incidence, members, config.alpha)
    if not len(cols):
        return None
    carriers = np.asarray(incidence[:, cols].sum(1)).ravel() > 0
    core = members & carriers
    if core.sum() < config.min_core or (~core).sum() < 2:
        return None
    idx = np.where(core)[0]
    purity = float(np.isin(nn[idx], idx).mean()) if nn.shape[1] else 0.0
    rest = entropy[~core]
    lift = float((entropy[core].mean() - rest.mean()) / (rest.std() + 1e-12))
    return Group(name, members, [int(t) for t in vocab[cols]], [float(v) for v in p], carriers, core, purity, lift)
