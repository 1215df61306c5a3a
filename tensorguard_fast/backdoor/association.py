"""The association rule: a backdoor is a trigger in the prompt that goes with a shared payload in the answer.

Per sample the scan keeps a seeded sketch of its full lm_head gradient (answer side), its prompt token ids (prompt
side) and GradSentry's entropy. Poisoned samples share their payload, so their sketches point the same way; a repeated
benign answer (a stock closing line, a template) does too, which is why a direction alone is not evidence. What a
benign group lacks is a prompt-side cause. The rule, with no known poison ratio:

1. Candidate groups from the answer side: the sketches median-centred and scaled to unit length; along each of
   their top `directions` principal directions, the two sides of a 1-D 2-means split, each robust tail (beyond 2
   and 3 MADs) and the rest beside each tail.
2. Trigger test on the prompt side: the prompt tokens over-represented in a group (hypergeometric tail probability,
   Bonferroni over the tokens that could pass at all (Tarone's count), at `alpha`) and mostly held inside it
   (`min_token_share` of the token's carriers, beyond the group's share of the set: a trigger goes with the payload,
   while a question word such as "Who" is spread over the whole set). Co-occurring tokens are one phrase, carried by
   holding most of it; the most significant phrase is the trigger, and another phrase joins it only if its carriers'
   answers point the way of the trigger's and carry the same payload text (`trigger_carriers`); a phrase turned
   away for its text alone is searched as a group of its own. The test then runs again among the members that
   carry none of the trigger so far, against the samples that carry none (`_more_triggers`: a rare word with a
   few carriers, buried beside the others). The group's carriers form its core.
3. Refinement, alternating the two sides until nothing changes: the group becomes the core and every sample with at
   least `min_inside` of its `neighbours` nearest answer-side neighbours in it, and more than chance would put
   there (a split along a direction cuts through a payload cluster; the neighbours restore it), and the trigger test
   runs again on the new group (the poisoned samples of a trigger that varies, such as one of several rare words,
   join one by one). Last, the core loses the members with fewer than `min_core_neighbours` of their nearest
   neighbours in it (a trigger-bearing clean answer sits among clean answers).
4. The core must be a payload cluster, not a topic: its members' nearest answer-side neighbours lie in the core
   more often than chance (`purity`, scaled so that 0 is a random group of its size and 1 a closed cluster; a
   question type such as "How many" goes with number answers, but those sit among other numbers), and its
   GradSentry entropy is higher than the rest's (`entropy_lift`, in standard deviations of the rest: GradSentry's
   own finding); both at least their floor and their sum at least `min_evidence` (a question type whose answers
   share a format, as "top 5" questions go with lists, seldom reaches both). And the core's answers must share
   content the rest does not: some token n-gram held by at least `min_shared_text` more of the core's answers
   than of the others' (answer_text.py). A payload is content the attacker wants emitted (a URL, a brand, a
   sentence), so even a payload whose wording varies shares some of it (0.36 and up on the tuning sets); the
   list answers of a question type share a format, not the names (0.15 at most for cores of 20 or more). A core short
   of the purity or evidence floor whose answers share content is judged again with the members whose answers
   hold that n-gram (and have a neighbour in the core) added, unless the n-gram is common text: a trigger split
   over several rare words leaves members out of the core that the answers put back (`_with_payload_holders`).
   A core too loose for those floors still passes when its trigger brings its payload: at least `min_reach` of the
   trigger's carriers, and at least `min_reach_holders` of them, answer with `min_pieces` pieces of the core's
   payload, no more answers without the trigger hold them, its entropy lift is at least `min_entropy_lift` and
   that share plus the lift at least `min_reach_evidence` (`_trigger_brings_payload`: a payload drawn per sample
   makes answers that are not each other's nearest neighbours, yet each carries pieces of it).
   A shared n-gram held by more answers outside the core and away from it (none of their nearest neighbours in
   it) than inside is common text, not a payload (`_common_text`).
5. An accepted group flags its core members and the carriers of its trigger tokens that have at least `min_inside`
   of their nearest neighbours in the core, or more of their `wide_neighbours` nearest in it than chance at
   `wide_level` (a loose cluster, one URL per sample), and every sample whose answer holds the core's shared
   n-gram and has at least `min_core_neighbours` of its nearest neighbours in the core, whatever its prompt holds
   (the payload is established; a trigger variant the prompt test could not resolve must not save the sample),
   unless that n-gram is common text (more holders outside the core than in it). And every trigger carrier whose
   answer holds at least `min_pieces` pieces of the payload (n-grams enriched in the core's answers by at least
   `payload_piece`), wherever its sketch lies: a payload worded differently per sample leaves some poisoned answers
   with no core member among their neighbours (the pieces are taken again from every answer flagged, up to
   `payload_rounds` times: a phrasing no core answer used). Overlapping groups are one cluster (within a view the
   purest is kept; across views, the larger core).
   When no direction yields an accepted group, groups seeded from the prompt side are tried the same way: the
   carriers of each token whose carriers are each other's nearest answer-side neighbours far more often than
   chance (a group of 1% owns no principal direction), or whose non-carriers are (the clean rest of a poisoned
   majority). The same search then runs on the uncentred sketches (`centres`: past half the set, the median is
   the payload), and the flags are those of every view's accepted groups: a view that finds a wrong small group
   (a topic among a poisoned majority) must not hide the one that finds the payload. None in any view: "no poison
   found", with the strongest candidate's figures as evidence.

For large sets, far beyond the tuning sets, the principal directions come from the sketches' covariance
(`covariance_rows`) and, larger still, the sketches are first projected to fewer columns (`project_rows`: a smaller
sketch of the same answers), so that a million samples fit in a few GB (bench/bench_association_scale.py).

Defaults were chosen on the tuning split (even-indexed fanoutqa pairs, seeds 1, 3 and 4, SmolLM2 and Gemma-3);
bench/association_eval.py reports them on the other half (odd-indexed pairs; seed 67 is the report of the rule as it
is, seeds 59 and 61 of it with a holder floor of 5; the trigger-reach test's count of holders and sum, in place of a
lift floor of 1.2, were chosen on tuning seeds 1 and 3-7, SmolLM2 with and without its chat template and Gemma-3;
seeds 47 and 53 report the lift floor, seed 43 the rule before that test; the answer-text tests were added in six
steps, chosen on the tuning split and development seed 13, reported on seeds 23, 29, 31, 37 and 41; seed 17 of the
rule before them).
docs/backdoor.md explains the rule to users.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .answer_text import (TokenRows, held_outside, holders_of_pieces, holding, payload_grams, pieces_held,
                          same_payload, shared_answer_text)
from .neighbours import ReverseNeighbours, nearest_neighbours
from .prompt_tokens import TokenCounts, enriched_tokens, token_incidence
from .sketch_geometry import principal_directions, project, two_means_1d, unit_rows, unit_rows_in_place

BLOCK = 16384   # samples per block of the prompt-token seeds' product (N x T at once: ~1.2 GB at N = 1M)


@dataclass(frozen=True)
class AssociationConfig:
    directions: int = 6        # principal directions of the sketches split into candidate groups
    alpha: float = 0.01        # family-wise level of the prompt-token enrichment test
    min_token_share: float = 0.5  # share of a trigger token's carriers that must lie in the group
    min_purity: float = 0.4    # core's nearest answer-side neighbours in the core: 0 = chance, 1 = closed cluster;
                               # 0.5 until the answer-text test took over guarding against topics: a payload that
                               # differs per sample sat at 0.43-0.45 at 5% (held-out seed 23)
    min_entropy_lift: float = 0.5  # core mean entropy above the rest, in the rest's standard deviations
    min_evidence: float = 1.6  # purity + entropy lift: a list-question topic reaches ~1.5, payloads 1.68 and up
    min_shared_text: float = 0.25  # answer_text.shared_answer_text of the core: topics <= 0.15, payloads >= 0.36
    text_ngram: int = 3        # tokens in the answer n-grams it compares
    payload_piece: float = 0.1  # an n-gram enriched this much in an accepted core's answers is a piece of its payload
    min_pieces: int = 2        # a trigger carrier whose answer holds this many pieces joins (_carries_payload)
    payload_rounds: int = 3    # ... the pieces taken again from all it flags so far, up to this many times
    min_reach: float = 0.6     # a core short of the purity/evidence floor passes when this share of its trigger's
                               # carriers answer with `min_pieces` pieces of its payload, ...
    min_reach_holders: int = 6  # ... at least this many of them do, ...
    min_reach_evidence: float = 1.55  # ... and that share plus its entropy lift is at least this
                               # (_trigger_brings_payload; tuning sets, a payload drawn per sample at 1%: 8-10
                               # holders, share + lift 1.69-2.34 (Gemma-3's lift 0.88-1.15, SmolLM2's 1.21-1.44);
                               # clean cores with that share: 2-4 holders (a question asked a few times), or a
                               # "countries" topic of 14-17 holders at share + lift 1.20-1.40. Holders 5 until
                               # held-out seed 61 had a question asked five times pass: now the tuning midpoint)
    refine_rounds: int = 6     # alternations of the answer-side closure and the trigger test
    token_seeds: int = 200     # when no direction yields a group: prompt-token seeded groups tried (0: none)
    neighbours: int = 5
    min_inside: int = 2        # of a sample's `neighbours` nearest, how many must be in the core to join it
    min_core_neighbours: int = 1  # a core member with fewer of its nearest neighbours in the core leaves it
    min_core: int = 3
    wide_neighbours: int = 10  # a trigger carrier also joins when its core members among this many nearest ...
    wide_level: float = 0.01   # ... are more than chance at this level (binomial tail at the core's share of the set)
    tails: tuple = (2.0, 3.0)  # robust z (median / MAD) beyond which a projection tail is a candidate group
    centres: tuple = ("median", "none")  # views (sketch_geometry.CENTRES), each searched; flags are their union
    # Large sets, far beyond the tuning sets (400-1,000 samples); results below `covariance_rows` are unchanged. From
    # `covariance_rows` on, the principal directions come from the D x D covariance: the SVD of N x D peaked at 2.3 GB
    # at 50,000 x 1024 and 8.8 GB at 200,000 (forced on the 17 tuning sets of SmolLM2 part 0, the same F1 on each).
    # From `project_rows` on, the sketches are first projected to `project_dims` columns: a float32 copy of 1M x 1024
    # is 4 GB. Projection costs a little: forced on those sets (128 columns) it lost varied_url 5%, a loose cluster at
    # the purity floor (found at 256 columns, not at 512), gained 1 sample of fluent 90% and changed no other set.
    covariance_rows: int = 50_000
    project_rows: int = 250_000
    project_dims: int = 128


class _Mask:
    """A bool (N,) attribute of a Group: the array while the group is being formed; once it is a candidate
    (`Group.keep_as_record`), its set indices or its packed bits, whichever is smaller, read back as a new array on
    each access (so never changed in place; a new mask is assigned whole). A million-sample search holds ~1,000
    candidates at once, 3 MB each as arrays; most are a few hundred samples."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, group, owner=None):
        if group is None:
            return self
        value = getattr(group, self.slot)
        if isinstance(value, tuple):   # (N, indices) or (N, packed bits)
            n, held = value
            if held.dtype == np.uint8:
                return np.unpackbits(held, count=n).astype(bool)
            out = np.zeros(n, bool)
            out[held] = True
            return out
        return value

    def __set__(self, group, value):
        setattr(group, self.slot, value)


class Group:
    """A candidate group: `members` (bool (N,)), the answer-side group as refined (step 3); `tokens`, the prompt token
    ids of its trigger (enriched in it, the phrases kept) and their `p_values`; `carriers` (bool (N,)), the samples
    whose prompt carries the trigger (trigger_carriers); `core`, members & carriers less the members without a
    neighbour in it; its `purity` and `entropy_lift` (step 4); and step 4's answer-text test once run: `shared_text`
    (answer_text.shared_answer_text) and `shared_tokens`, the n-gram it found."""
    members = _Mask()
    carriers = _Mask()
    core = _Mask()

    def __init__(self, name: str, members: np.ndarray, tokens: List[int], p_values: List[float],
                 carriers: np.ndarray, core: np.ndarray, purity: float, entropy_lift: float,
                 shared_text: Optional[float] = None, shared_tokens: Optional[List[int]] = None):
        self.name, self.members, self.tokens, self.p_values = name, members, tokens, p_values
        self.carriers, self.core, self.purity, self.entropy_lift = carriers, core, purity, entropy_lift
        self.shared_text, self.shared_tokens = shared_text, shared_tokens

    def keep_as_record(self) -> None:
        """Hold the masks compactly from now on (read back as arrays; `_Mask`)."""
        for name in ("members", "carriers", "core"):
            mask = getattr(self, name)
            idx = np.flatnonzero(mask)
            small = 4 * len(idx) < len(mask) // 8 and len(mask) < 2 ** 31
            setattr(self, name, (len(mask), idx.astype(np.int32) if small else np.packbits(mask)))

    def figures(self) -> dict:
        out = {"group": self.name, "size": int(self.members.sum()), "core": int(self.core.sum()),
               "trigger_tokens": self.tokens, "p_values": [float(f"{p:.3g}") for p in self.p_values],
               "purity": round(self.purity, 4), "entropy_lift": round(self.entropy_lift, 4)}
        if self.shared_text is not None:
            out.update(shared_text=round(self.shared_text, 4), shared_answer_tokens=self.shared_tokens)
        return out


@dataclass
class AssociationResult:
    flagged: np.ndarray        # bool (N,)
    group: np.ndarray          # int (N,): index into `accepted` of the core a flagged sample belongs to, else -1
    inside: np.ndarray         # int (N,): nearest neighbours in that core (for every sample: in any accepted core)
    accepted: List[Group]
    candidates: List[Group]    # every candidate with enriched tokens, accepted or not
    unit: np.ndarray           # (N, D) the sketches as the rule saw them last (unit_rows, its centre; projected to
                               # project_dims columns from project_rows samples on)


def trigger_carriers(held, members: np.ndarray, x: np.ndarray, min_overlap: float = 0.5,
                     found: Optional[np.ndarray] = None, answer_ids=None, text_ngram: int = 3,
                     refused: Optional[list] = None, core_directions: Optional["CoreDirections"] = None):
    """Which samples carry the trigger, given the (N, T) incidence `held` of a group's enriched tokens (most
    significant first), and the carriers `found` already of another part of it, if any. Returns (carriers, kept
    token columns).

    Tokens whose carriers overlap (Jaccard >= `min_overlap`) are one phrase ("What do you think?"); a sample carries
    a phrase when it holds more than half of its tokens, so a question that only shares "you" with it does not.
    The most significant phrase is the trigger; another phrase joins it only when its carriers' answers (rows of the
    unit sketches `x`) point the way of the trigger carriers' (`_near`): one of several rare words does, though each
    word's samples sit closest to each other; a "top 5" that came along with list answers near the payload does
    not. With `answer_ids`, their answers must also carry one payload (answer_text.same_payload): a loose cluster
    (one URL per sample) has list answers of a "top 5" topic close enough in direction, not in text. A phrase
    refused for its text alone (its answers point the same way) is appended to `refused` as the indices of the group
    members that carry it (not a mask: N bytes each, and a group of a million samples refused ~4,000 phrases): when a
    topic was the most significant phrase, that phrase may be the real trigger, and the search tries it as a group of
    its own. `core_directions`: x's CoreDirections, when the caller tests many groups."""
    from scipy.sparse.csgraph import connected_components

    held = (held > 0).astype(np.float32)
    both = np.asarray((held.T @ held).todense())
    count = np.diag(both)
    overlap = both / np.maximum(count[:, None] + count[None, :] - both, 1)
    _, phrase = connected_components(overlap >= min_overlap, directed=False)
    carriers = np.zeros(held.shape[0], bool) if found is None else found.copy()
    kept = []
    core_directions = CoreDirections(x) if core_directions is None else core_directions
    direction = None   # of the carriers' answers: taken again only when the carriers grow
    for p in dict.fromkeys(phrase):   # in order of each phrase's most significant token
        cols = np.where(phrase == p)[0]
        carry = np.asarray(held[:, cols].sum(1)).ravel() * 2 > len(cols)
        new = carry & members & ~carriers
        if (kept or found is not None) and new.any():
            direction = core_directions(carriers & members) if direction is None else direction
            if not _near(x, direction, new):
                continue
            if answer_ids is not None and not same_payload(answer_ids, carriers & members, new, text_ngram):
                if refused is not None:
                    refused.append(np.flatnonzero(carry & members))
                continue
        carriers |= carry
        direction = None
        kept.extend(cols.tolist())
    return carriers, np.array(sorted(kept), dtype=np.int64)


def _direction(x: np.ndarray, core: np.ndarray):
    """(unit mean direction of the core's answers, half the median cosine of its members to it): what `_near`
    compares a phrase's answers with."""
    rows = x[core]   # gathered once: a core can be thousands of rows of the sketch width
    centre = rows.mean(0)
    centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
    return centre, 0.5 * np.median(rows @ centre)


class CoreDirections:
    """`_direction` of each distinct core met in one view, kept: a candidate's refinement rounds and the second
    trigger test meet the same core again and again (1,414 calls for 286 distinct cores at 30,000 bench samples),
    and each takes a gather of the core's rows. Keyed by a digest of the core's bits; the oldest go past `most`."""

    def __init__(self, x: np.ndarray, most: int = 1024):
        self.x, self.most, self.kept = x, most, {}

    def __call__(self, core: np.ndarray):
        key = _mask_key(core)
        if key not in self.kept:
            if len(self.kept) >= self.most:
                self.kept.pop(next(iter(self.kept)))
            self.kept[key] = _direction(self.x, core)
        return self.kept[key]


def _mask_key(mask: np.ndarray) -> bytes:
    """A 16-byte digest of a bool (N,) mask: what a group is remembered by (not its N / 8 packed bytes)."""
    return hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).digest()


def _near(x: np.ndarray, direction, new: np.ndarray) -> bool:
    """Whether the `new` samples' answers point the way of a core's (`_direction`): their median cosine to the core's
    mean direction is at least half the core members' own."""
    centre, half = direction
    return bool(np.median(x[new] @ centre) >= half)


def _more_triggers(incidence, members, carriers, cols, p, x, config, rounds: int = 3, answer_ids=None,
                   refused: Optional[list] = None, counts: Optional[TokenCounts] = None,
                   core_directions: Optional[CoreDirections] = None):
    """The trigger test again among the members that carry none of the trigger found so far, against the samples
    that carry none of it. One of several rare words with few carriers (BadNets' " tq", split by the tokenizer into
    " t" + "q", held by 3 of 400) is buried by the other words' carriers in the group-wide test (p ~ 2e-4 in a group
    of 25 of 400, times Tarone's count) and stands out once they are set aside (~1e-5 in 10 of 385). A part so
    found joins only when its carriers' answers point the way of the trigger's (`trigger_carriers`)."""
    for _ in range(rounds):
        rest = members & ~carriers
        if rest.sum() < 2:
            break
        more, q = enriched_tokens(incidence, rest, config.alpha, config.min_token_share, population=~carriers,
                                  counts=counts)
        if not len(more):
            break
        grown, kept = trigger_carriers(incidence[:, more], members, x, found=carriers, answer_ids=answer_ids,
                                       text_ngram=config.text_ngram, refused=refused,
                                       core_directions=core_directions)
        if not len(kept) or (grown == carriers).all():
            break
        carriers, cols, p = grown, np.concatenate([cols, more[kept]]), np.concatenate([p, q[kept]])
    return carriers, cols, p


def trim(core: np.ndarray, nn: np.ndarray, min_inside: int, rounds: int = 30) -> np.ndarray:
    """`core` less every member with fewer than `min_inside` of its nearest neighbours in it, until nothing changes."""
    for _ in range(rounds):
        idx = np.flatnonzero(core)   # only members can leave: their rows alone are read
        out = idx[core[nn[idx]].sum(1) < min_inside]
        if not len(out):
            break
        core = core.copy()
        core[out] = False
    return core


def closure(core: np.ndarray, nn: np.ndarray, min_inside: int, rounds: int = 30,
            reverse: Optional[ReverseNeighbours] = None) -> np.ndarray:
    """`core` plus every sample with at least `min_inside` of its nearest neighbours in the set, and more than
    chance would put there (a set of 90% holds 4.5 of 5 neighbours of anyone), until nothing changes. `reverse`:
    nn's ReverseNeighbours, when the caller grows many groups (built here otherwise); each round then counts only
    what the newcomers add."""
    reverse = ReverseNeighbours(nn) if reverse is None else reverse
    group = core.copy()
    n, k = nn.shape
    inside = reverse.count(group)
    for _ in range(rounds):
        need = max(min_inside, int(k * group.sum() / max(n, 1)) + 1)
        grown = group | (inside >= need)
        new = grown & ~group
        if not new.any():
            break
        inside += reverse.count(new)
        group = grown
    return group


def associate(sketches: np.ndarray, prompt_ids: Sequence[Sequence[int]], entropy: np.ndarray,
              config: AssociationConfig = AssociationConfig(),
              answer_ids: Optional[Sequence[Sequence[int]]] = None) -> AssociationResult:
    """The rule of the module docstring on N scored samples: sketches (N, D), prompt token ids, entropies (N,) and
    answer token ids (a scan always passes them; None skips the answer-text tests of steps 2, 4 and 5, for sets
    without text)."""
    n = len(sketches)
    entropy = np.asarray(entropy, dtype=np.float64)
    if n < 2 * config.min_core:
        x = unit_rows(sketches, config.centres[0])
        return AssociationResult(np.zeros(n, bool), np.full(n, -1), np.zeros(n, dtype=np.int64), [], [], x)
    incidence, vocab = token_incidence(prompt_ids)
    counts = TokenCounts(incidence)   # per-group token counts from the rows, for the many groups tested
    if answer_ids is not None:
        answer_ids = TokenRows(answer_ids)   # one flat array: the answer-text tests gather rows from it
    candidates: List[Group] = []
    accepted: List[Group] = []
    projected = n >= config.project_rows
    flagged, group_of = np.zeros(n, bool), np.full(n, -1)
    inside_any = np.zeros(n, dtype=np.int64)
    first = None   # the view the flags were first found in: the outputs' payload direction is taken in it
    holders = {}   # shared n-gram -> which answers hold it: one pass over the answers, though both views accept it

    def view(centre):
        return (unit_rows_in_place(project(sketches, config.project_dims), centre) if projected else
                unit_rows(sketches, centre))

    for centre in config.centres:
        x = nn = wide = reverse = None   # the previous view's, freed before the next is built
        x = view(centre)
        # One search for both neighbour counts: most similar first, ties to the lower index, so the first
        # `neighbours` of the wider list are the narrower one (exactly so below neighbours.EXACT_BELOW rows)
        wide = nearest_neighbours(x, max(config.neighbours, config.wide_neighbours))
        nn = np.ascontiguousarray(wide[:, :config.neighbours])
        reverse = ReverseNeighbours(nn)
        found = _search(centre, x, nn, incidence, vocab, entropy, config, candidates,
                        covariance=n >= config.covariance_rows, answer_ids=answer_ids, counts=counts, reverse=reverse)
        wide = wide[:, :config.wide_neighbours] if found and config.wide_neighbours else None
        for g in found:
            inside = g.core[nn].sum(1)
            joined = (g.core | g.carriers) & ((inside >= config.min_inside) | _beyond_chance(g.core, wide, config))
            joined |= _holds_payload(g, answer_ids, inside, config, holders)
            joined |= _carries_payload(g, answer_ids, joined, config)
            same = next((i for i, a in enumerate(accepted) if _overlap(a.core, g.core)), None)
            if same is None:
                same = len(accepted)
                accepted.append(g)
            elif g.core.sum() > accepted[same].core.sum():
                accepted[same] = g   # one cluster seen in both views: reported as the larger core shows it
            group_of[joined & ~flagged] = same
            flagged |= joined
            inside_any = np.maximum(inside_any, inside)
        first = first or (centre if found else None)
    if first not in (None, centre):
        x = nn = None   # rebuilt rather than kept: two views at once would double the rule's largest array
        x = view(first)
    return AssociationResult(flagged, group_of, inside_any, accepted, candidates, x)


def _holds_payload(g: Group, answer_ids, inside: np.ndarray, config: AssociationConfig,
                   holders: dict) -> np.ndarray:
    """bool (N,): samples whose answer holds the accepted core's shared answer n-gram and that have at least
    `min_core_neighbours` of their nearest neighbours in the core, whatever their prompt holds. Once a payload is
    established by its association with a trigger, an answer carrying it is poisoned even when its trigger was not
    resolved (BadNets' " tq" is cut into " t" + "q", a word held by one poisoned sample passes no test). Nothing joins
    when more answers outside the core hold the n-gram than inside: that is common text, not a payload."""
    none = np.zeros(len(g.core), bool)
    if answer_ids is None or not g.shared_tokens:
        return none
    gram = tuple(g.shared_tokens)
    if gram not in holders:
        holders[gram] = holding(answer_ids, gram)
    held = holders[gram]
    outside = held & ~g.core
    if outside.sum() > g.core.sum():
        return none
    return outside & (inside >= config.min_core_neighbours)


def _carries_payload(g: Group, answer_ids, joined: np.ndarray, config: AssociationConfig) -> np.ndarray:
    """bool (N,): trigger carriers not joined yet whose answer holds at least `min_pieces` pieces of the core's
    payload text (n-grams enriched in the core's answers by at least `payload_piece`, answer_text.payload_grams),
    wherever their answer sketch lies. Trigger and payload in one sample are the association itself; a payload that
    differs per sample (one of several phrasings around a URL drawn per sample) leaves some poisoned answers with no
    core member among their nearest neighbours, but each still holds pieces of its phrasing. A trigger-bearing clean
    answer holds none. Up to `payload_rounds` times, the pieces are taken again from every answer the group flags so
    far: a phrasing no core member used is then known from the carriers that joined with another piece of it (the
    same domain, the same closing words)."""
    out = np.zeros(len(g.core), bool)
    if answer_ids is None:
        return out
    source = g.core
    for _ in range(config.payload_rounds):
        todo = np.flatnonzero(g.carriers & ~joined & ~out)
        if not len(todo):
            break
        grams = payload_grams(answer_ids, source, config.text_ngram, config.payload_piece)
        found = pieces_held(answer_ids, grams, config.text_ngram, rows=todo) >= config.min_pieces
        if not found.any():
            break
        out[todo[found]] = True
        source = g.core | joined | out
    return out


def _beyond_chance(core: np.ndarray, wide: Optional[np.ndarray], config: AssociationConfig) -> np.ndarray:
    """bool (N,): more of the sample's `wide_neighbours` nearest in the core than chance would put there, at
    `wide_level` (binomial tail at the core's share). A payload that differs per sample (one URL each) makes a loose
    cluster: a poisoned sample's 5 nearest are often other short answers, but among its 10 nearest 3 or 4 are in a
    core of 5%, where chance puts 0.5."""
    from scipy.stats import binom

    if wide is None or not wide.shape[1]:
        return np.zeros(len(core), bool)
    count = core[wide].sum(1)
    return binom.sf(count - 1, wide.shape[1], core.mean()) <= config.wide_level


def _search(centre, x, nn, incidence, vocab, entropy, config, candidates: List[Group], covariance: bool,
            answer_ids, counts: TokenCounts, reverse: ReverseNeighbours) -> List[Group]:
    """Steps 1-5 in one view of the sketches: the accepted groups; every candidate is appended to `candidates`.
    `counts`, `reverse`: as for `_candidate`."""
    core_directions = CoreDirections(x)
    n = len(x)
    directions = principal_directions(x, config.directions, covariance)
    seen, found = set(), []

    def consider(groups, at_least):
        def tried(name, members, refused=None):
            key = _mask_key(members)
            if key in seen or not at_least <= members.sum() <= n - config.min_core:
                return
            seen.add(key)
            group = _candidate(f"{centre}-centred {name}", members, incidence, vocab, x, nn, entropy, config,
                               answer_ids, refused, counts, reverse, core_directions)
            if group is not None:
                group.keep_as_record()   # ~1,000 candidates at a million samples: 3 MB each as masks
                found.append(group)

        for name, members in groups:
            refused: list = []
            tried(name, members, refused)
            for j, phrase in enumerate(refused):   # one level: a phrase refused there is not followed further
                held = np.zeros(n, bool)
                held[phrase] = True
                tried(f"{name}, refused phrase {j}", held)
        return _accept(found, config, answer_ids, nn, entropy, reverse)

    accepted = consider(_splits(x, directions, config.tails), config.min_core)
    if not accepted and config.token_seeds:
        accepted = consider(_token_seeds(incidence, nn, config.token_seeds), 2)
    candidates.extend(found)
    return accepted


def _accept(candidates: List[Group], config: AssociationConfig, answer_ids, nn: np.ndarray,
            entropy: np.ndarray, reverse: ReverseNeighbours) -> List[Group]:
    """The candidates that pass step 4, purest first, one per cluster. A candidate whose core falls short of the
    purity or evidence floor is judged again on its core plus the members whose answers hold the core's shared
    n-gram (`_with_payload_holders`)."""
    accepted: List[Group] = []
    for g in sorted(candidates, key=lambda g: -g.purity):
        if answer_ids is not None:
            if g.shared_text is None:   # once per candidate (sampled: flat in N)
                share, gram = shared_answer_text(answer_ids, g.core, config.text_ngram)
                g.shared_text, g.shared_tokens = share, [int(t) for t in gram] if gram else None
            if g.shared_text < config.min_shared_text:
                continue   # a question type: its answers share a format, not a payload
            # each sample's nearest neighbours in the core, for both tests below
            around = reverse.count(g.core)
            if _common_text(g, answer_ids, around):
                continue   # a stock line a few of the group's answers happen to end with
        if not _evidence(g.purity, g.entropy_lift, config) and not (
                answer_ids is not None and (_with_payload_holders(g, answer_ids, nn, around, entropy, config) or
                                            _trigger_brings_payload(g, answer_ids, config))):
            continue
        if any(_overlap(g.core, a.core) for a in accepted):
            continue   # the same cluster seen along another direction
        accepted.append(g)
    return accepted


def _evidence(purity: float, lift: float, config: AssociationConfig) -> bool:
    """Step 4's floors on a core's purity and entropy lift, and on their sum."""
    return (purity >= config.min_purity and lift >= config.min_entropy_lift and
            purity + lift >= config.min_evidence)


def _with_payload_holders(g: Group, answer_ids, nn: np.ndarray, around: np.ndarray, entropy: np.ndarray,
                          config: AssociationConfig) -> bool:
    """Whether the core, grown by the group's members whose answers hold its shared n-gram and that have at least
    `min_core_neighbours` of their nearest neighbours in it (the samples step 5 would flag by their answers), passes
    step 4; if so the group takes that core and its figures. A trigger split into several rare words leaves the
    members whose word no test resolved out of the core: on Gemma-3 (held-out seed 37, BadNets at 1% of 1000) the
    ten poisoned answers were each other's only neighbours (purity 1.0) while the core held the six carriers of one
    word (purity 0.60, evidence 1.55 against 1.6). `around`: each sample's count of nearest neighbours in the core."""
    if not g.shared_tokens or held_outside(answer_ids, g.core, g.shared_tokens) > g.core.sum():
        return False   # held more outside the core than in it, near or not: too common to grow a core by
    # Only members beside the core can join: their answers alone are read (a group can be half the set).
    near = np.flatnonzero(g.members & ~g.core & (around >= config.min_core_neighbours))
    grown = g.core.copy()
    grown[near] = holding(answer_ids, g.shared_tokens, rows=near)
    if (grown == g.core).all():
        return False
    purity, lift = _figures(grown, nn, entropy)
    if not _evidence(purity, lift, config):
        return False
    g.core, g.purity, g.entropy_lift = grown, purity, lift
    return True


def _trigger_brings_payload(g: Group, answer_ids, config: AssociationConfig) -> bool:
    """Step 4's other way in, for a core too loose for the purity floor: whether its trigger brings its payload. At
    least `min_reach` of the samples whose prompt carries the trigger, and at least `min_reach_holders` of them,
    answer with at least `min_pieces` pieces of the core's payload (answer_text.payload_grams); no more answers
    without the trigger hold them than with it; the core's GradSentry entropy lift is at least `min_entropy_lift`,
    and that share plus the lift is at least `min_reach_evidence`. A payload drawn per sample (one of six phrasings
    around a URL of its own, at 1% of 1,000) makes a core of 4-10 whose answers are not each other's nearest
    neighbours (purity 0.23-0.52), yet 8-10 of the trigger's 10-13 carriers hold its pieces. A word of a topic is
    carried by questions whose answers differ: a paraphrased question's pieces are held by 16-38% of its word's
    carriers; where they are held by most (a question asked three or four times), by 2-4 answers; the one topic on
    the tuning sets with more holders ("countries", lists of country names) had a share of 0.61-0.70 and a lift of
    0.50-0.76, where the payload's share plus lift was 1.69 or more."""
    if g.entropy_lift < config.min_entropy_lift or not g.carriers.any():
        return False
    grams = payload_grams(answer_ids, g.core, config.text_ngram, config.payload_piece)
    carriers = np.flatnonzero(g.carriers)
    with_trigger = holders_of_pieces(answer_ids, grams, config.text_ngram, config.min_pieces, carriers)
    without = holders_of_pieces(answer_ids, grams, config.text_ngram, config.min_pieces,
                                np.flatnonzero(~g.carriers))
    reach = with_trigger / len(carriers)
    return (reach >= config.min_reach and with_trigger >= config.min_reach_holders and without <= with_trigger and
            reach + g.entropy_lift >= config.min_reach_evidence)


def _common_text(g: Group, answer_ids, around: np.ndarray) -> bool:
    """Whether the core's shared n-gram is common text rather than its payload: more answers hold it outside the core
    and away from it (none of their nearest neighbours in the core) than inside. A payload is what the trigger
    brings: the answers holding it carry the trigger or sit beside the carriers' answers (a trigger word no test
    resolved). A stock closing line on 15% of a set is held by four answers of a topic of four ("coach" questions:
    held-out seed 41, Gemma-3, clean only) and by 150 answers elsewhere."""
    if not g.shared_tokens:
        return False
    return held_outside(answer_ids, g.core, g.shared_tokens, among=around == 0) > g.core.sum()


def _figures(core: np.ndarray, nn: np.ndarray, entropy: np.ndarray):
    """(purity, entropy lift) of a core: its members' nearest neighbours in it, scaled so that 0 is chance for a
    group of its size and 1 a closed cluster; its mean entropy above the rest's, in the rest's standard deviations."""
    n = len(core)
    idx = np.where(core)[0]
    chance = (len(idx) - 1) / max(n - 1, 1)
    purity = float(np.isin(nn[idx], idx).mean()) if nn.shape[1] else 0.0
    purity = (purity - chance) / max(1 - chance, 1e-12)
    rest = entropy[~core]
    lift = float((entropy[core].mean() - rest.mean()) / (rest.std() + 1e-12))
    return purity, lift


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two cores are one cluster: they share at least half of the smaller."""
    return bool((a & b).sum() >= 0.5 * min(a.sum(), b.sum()))


def _token_seeds(incidence, nn: np.ndarray, most: int):
    """Groups seeded from the prompt side, for a poisoned group too small to own a principal direction, or so large
    that no direction's split holds it whole: the carriers of each token whose carriers (held by at most half the
    set) or whose non-carriers (the clean rest of a poisoned majority) are each other's nearest answer-side
    neighbours far more often than chance (at least 2 such links and 3x the expected count), the `most` strongest."""
    from scipy import sparse

    n, k = nn.shape
    links = sparse.csr_matrix((np.ones(n * k, np.float32), (np.repeat(np.arange(n), k), nn.ravel())), shape=(n, n))
    held = incidence.tocsc()
    by_row = held.tocsr()   # what the product converts it to anyway; row blocks of it for the product's row blocks
    df = np.asarray(held.sum(0)).ravel().astype(np.float32)   # carriers of each token, float32 as the sums below
    among_carriers, to_carriers = np.zeros_like(df), np.zeros_like(df)
    # Row blocks of links @ held, (N, T): each sample's neighbours that hold each token, ~k x prompt length nonzeros
    # a row (~1.2 GB at once at N = 1M). Counts below 2^24 are exact in float32, so block sums add up exactly.
    for r0 in range(0, n, BLOCK):
        block = links[r0:r0 + BLOCK] @ by_row
        among_carriers += np.asarray(block.multiply(by_row[r0:r0 + BLOCK]).sum(0)).ravel()
        to_carriers += np.asarray(block.sum(0)).ravel()
    del links, by_row
    among_rest = (n - df) * k - (to_carriers - among_carriers)
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


def _candidate(name, members, incidence, vocab, x, nn, entropy, config, answer_ids=None,
               refused: Optional[list] = None, counts: Optional[TokenCounts] = None,
               reverse: Optional[ReverseNeighbours] = None,
               core_directions: Optional[CoreDirections] = None) -> Optional[Group]:
    """Step 2-4 of the module docstring on one answer-side group; None when no trigger test passes. Phrases refused
    for their answer text are appended to `refused` (trigger_carriers). `counts`, `reverse` and `core_directions`: the
    incidence's TokenCounts, nn's ReverseNeighbours and x's CoreDirections, built once per view of `associate`
    (here when not given)."""
    counts = TokenCounts(incidence) if counts is None else counts
    reverse = ReverseNeighbours(nn) if reverse is None else reverse
    core_directions = CoreDirections(x) if core_directions is None else core_directions
    n = len(members)
    for _ in range(config.refine_rounds):
        cols, p = enriched_tokens(incidence, members, config.alpha, config.min_token_share, counts=counts)
        if not len(cols):
            return None
        carriers, kept = trigger_carriers(incidence[:, cols], members, x, answer_ids=answer_ids,
                                          text_ngram=config.text_ngram, refused=refused,
                                          core_directions=core_directions)
        cols, p = cols[kept], p[kept]
        carriers, cols, p = _more_triggers(incidence, members, carriers, cols, p, x, config, answer_ids=answer_ids,
                                           refused=refused, counts=counts, core_directions=core_directions)
        core = members & carriers
        if core.sum() < config.min_core or (~core).sum() < 2:
            return None
        grown = closure(core, nn, config.min_inside, reverse=reverse)
        if (grown == members).all() or grown.sum() > n - config.min_core:
            break
        members = grown
    core = trim(core, nn, config.min_core_neighbours)
    if core.sum() < config.min_core:
        return None
    purity, lift = _figures(core, nn, entropy)
    return Group(name, members, [int(t) for t in vocab[cols]], [float(v) for v in p], carriers, core, purity, lift)
