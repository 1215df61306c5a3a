"""The association rule on sets whose truth is known by construction: answer sketches with a planted shared payload
direction, prompts with a planted trigger token. Each case isolates one half of the association, so a rule that
keyed on one side alone fails here (a repeated answer is not a backdoor; a rare prompt word is not one either)."""
import numpy as np
import pytest

from tensorguard_fast.backdoor.association import AssociationConfig, _candidate, associate, closure, trigger_carriers
from tensorguard_fast.backdoor.neighbours import nearest_neighbours
from tensorguard_fast.backdoor.prompt_tokens import enriched_tokens, token_incidence
from tensorguard_fast.backdoor.sketch_geometry import two_means_1d, unit_rows

TRIGGER = 50_000
DIM = 256


def _set(n=400, poisoned=40, benign=60, negatives=0, seed=0, payload=True, trigger=True):
    """(sketches, prompts, entropy, truth): `poisoned` samples share a payload direction and (if `trigger`) the trigger
    token; `benign` clean samples share another direction (a stock closing line) without it; `negatives` clean samples
    carry the trigger with clean answers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    prompts = [list(rng.integers(0, 3000, size=12)) for _ in range(n)]
    entropy = rng.normal(0.5, 0.1, n)
    truth = np.zeros(n, bool)
    order = rng.permutation(n)
    poison, rest = order[:poisoned], order[poisoned:]
    stock, neg = rest[:benign], rest[benign:benign + negatives]
    u, v = rng.standard_normal(DIM), rng.standard_normal(DIM)
    for i in poison:
        if payload:
            x[i] += 2.0 * u
            entropy[i] += 0.2
        if trigger:
            prompts[i].append(TRIGGER)
        truth[i] = payload and trigger
    for i in stock:
        x[i] += 2.0 * v
    for i in neg:
        prompts[i].append(TRIGGER)
    return x, prompts, entropy, truth


def test_flags_exactly_the_planted_backdoor_beside_a_larger_benign_repeat():
    x, prompts, entropy, truth = _set()
    result = associate(x, prompts, entropy)
    assert (result.flagged == truth).all()
    assert len(result.accepted) == 1 and TRIGGER in result.accepted[0].tokens
    assert (result.group[truth] == 0).all() and (result.group[~truth] == -1).all()


@pytest.mark.parametrize("ratio", [0.05, 0.5, 0.9])
def test_small_and_majority_poison(ratio):
    n = 400
    x, prompts, entropy, truth = _set(n=n, poisoned=int(ratio * n), benign=min(60, n - int(ratio * n)), seed=1)
    flagged = associate(x, prompts, entropy).flagged
    assert (flagged & truth).sum() >= 0.95 * truth.sum() and (flagged & ~truth).sum() <= 0.02 * (~truth).sum()


def test_clean_set_flags_nothing():
    x, prompts, entropy, _ = _set(poisoned=0, benign=0, seed=2)
    assert not associate(x, prompts, entropy).flagged.any()


def test_repeated_answers_without_a_trigger_are_not_a_backdoor():
    x, prompts, entropy, truth = _set(trigger=False, seed=3)
    assert not truth.any() and not associate(x, prompts, entropy).flagged.any()


def test_a_shared_prompt_word_with_ordinary_answers_is_not_a_backdoor():
    x, prompts, entropy, truth = _set(payload=False, seed=4)
    assert not truth.any() and not associate(x, prompts, entropy).flagged.any()


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_trigger_bearing_clean_negatives_are_mostly_kept(seed):
    """40 clean answers whose prompts carry the trigger. With structureless synthetic answers a negative's nearest
    neighbours are random, so the number in the core is Binomial(5, core share ~0.15): P(>= 2) = 0.16, 6.4 of 40
    expected, up to 11 at +2 SD (centred or not; an earlier version of this test asserted none, which held for
    seed 5 only). Real clean answers sit among their topic mates: none of fanoutqa's cba negatives is flagged
    (bench/association_eval.py)."""
    x, prompts, entropy, truth = _set(negatives=40, seed=seed)
    flagged = associate(x, prompts, entropy).flagged
    assert (flagged & truth).sum() == truth.sum() and (flagged & ~truth).sum() <= 11


def test_too_few_samples_decide_nothing():
    x, prompts, entropy, _ = _set(n=5, poisoned=2, benign=0)
    result = associate(x, prompts, entropy)
    assert not result.flagged.any() and not result.candidates


def test_enrichment_is_the_hypergeometric_tail_with_bonferroni():
    from scipy.stats import hypergeom

    prompts = [[1, 2], [1, 2], [1, 3], [4, 3], [4, 5], [4, 5]] * 5
    members = np.array([True, True, True, False, False, False] * 5)
    incidence, vocab = token_incidence(prompts)
    cols, p = enriched_tokens(incidence, members, alpha=0.05)
    assert vocab[cols].tolist() == [1, 2]   # token 1: 15 of 15 inside; token 2: 10 of 10
    assert p[0] == pytest.approx(hypergeom.sf(14, 30, 15, 15))


def test_building_blocks():
    raw = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-2.0, 4.0]])
    x = unit_rows(raw)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
    assert np.allclose(x[0], (raw[0] - [0.5, 1.5]) / np.linalg.norm(raw[0] - [0.5, 1.5]))  # median-centred
    assert np.allclose(unit_rows(raw, "none")[2], [2 ** -0.5, 2 ** -0.5])
    assert two_means_1d(np.array([0.0, 0.1, 0.2, 5.0, 5.1])).tolist() in ([0, 0, 0, 1, 1], [1, 1, 1, 0, 0])
    pts = unit_rows(np.random.default_rng(0).standard_normal((50, 8)))
    nn = nearest_neighbours(pts, 3)
    sim = pts @ pts.T
    np.fill_diagonal(sim, -np.inf)
    assert (nn == np.argsort(-sim, 1)[:, :3]).all()



def _varied_trigger_set():
    """Each poisoned prompt carries one of four trigger words (BadNets' rare words)."""
    x, prompts, entropy, truth = _set(n=600, poisoned=24, seed=6)
    words = [TRIGGER + j for j in range(4)]
    for j, i in enumerate(np.where(truth)[0]):
        prompts[i][-1] = words[j % 4]
    return x, prompts, np.asarray(entropy), truth, words


def test_a_trigger_that_varies_is_found_whole():
    x, prompts, entropy, truth, words = _varied_trigger_set()
    result = associate(x, prompts, entropy)
    assert (result.flagged == truth).all()
    assert sorted(result.accepted[0].tokens) == words


@pytest.mark.parametrize("rounds, found", [(1, 6), (2, 24), (6, 24)])
def test_refinement_grows_a_partial_group_to_the_whole_payload_cluster(rounds, found):
    """A candidate that holds only the carriers of one of the four words (as a projection tail cuts through a
    payload cluster) grows, one alternation of answer-side closure and trigger test later, to all four words."""
    x, prompts, entropy, truth, words = _varied_trigger_set()
    x = unit_rows(x)
    nn = nearest_neighbours(x, 5)
    incidence, vocab = token_incidence(prompts)
    start = np.zeros(len(x), bool)
    start[np.where(truth)[0][0::4]] = True
    group = _candidate("one word", start, incidence, vocab, x, nn, entropy, AssociationConfig(refine_rounds=rounds))
    if found < 24:   # no refinement: at most the first word's carriers, and only that word
        assert group is None or (not (group.core & ~start).any() and group.tokens == words[:1])
        return
    assert (group.core == truth).all() and sorted(group.tokens) == words


def test_purity_is_scaled_to_chance():
    """The same answer sketches with the trigger planted on random samples instead: whatever the group, its purity
    figure is near 0 (chance), not near the group's share of the set."""
    x, prompts, entropy, truth = _set(n=400, poisoned=0, benign=0, seed=7)
    rng = np.random.default_rng(7)
    for i in rng.choice(400, 160, replace=False):
        prompts[i].append(TRIGGER)
    result = associate(x, prompts, entropy, AssociationConfig(min_entropy_lift=-np.inf, min_purity=-np.inf,
                                                            token_seeds=0))
    assert not result.flagged.any() or all(abs(g.purity) < 0.2 for g in result.candidates)
    assert all(abs(g.purity) < 0.2 for g in result.candidates)


def test_enrichment_keeps_only_tokens_mostly_inside_the_group():
    # token 7: in all 10 members and in 12 of the 40 others (a question word); token 8: in 8 members only
    prompts = [[7, 8] if i < 8 else [7] for i in range(10)] + [[7] if i < 12 else [9] for i in range(40)]
    members = np.arange(50) < 10
    incidence, vocab = token_incidence(prompts)
    assert sorted(vocab[enriched_tokens(incidence, members, alpha=0.05)[0]].tolist()) == [7, 8]
    assert vocab[enriched_tokens(incidence, members, alpha=0.05, min_share=0.5)[0]].tolist() == [8]


def test_closure_adds_samples_with_enough_neighbours_inside():
    nn = np.array([[1, 2], [0, 2], [0, 1], [0, 4], [3, 0], [4, 3]])
    core = np.array([True, True, False, False, False, False])
    assert closure(core, nn, 2).tolist() == [True, True, True, False, False, False]   # 3 has one neighbour in
    assert closure(core, nn, 1).all()


def test_a_phrase_is_carried_by_holding_most_of_it():
    """Columns 0-2 always come together (a trigger phrase) in samples 0-9; sample 10 holds one of them only (a
    question sharing "you"); column 3 (a rare word) never co-occurs with them and is its own phrase, held by samples
    11-12. It joins the trigger when their answers point the payload's way, not when they point elsewhere."""
    from scipy import sparse

    n = 20
    held = np.zeros((n, 4))
    held[:10, :3] = 1
    held[10, 1] = 1
    held[11:13, 3] = 1
    rng = np.random.default_rng(0)
    payload = np.eye(16)[0]

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    x = unit(rng.standard_normal((n, 16)) * 0.2 + 3 * payload)
    x[13:] = unit(rng.standard_normal((n - 13, 16)))
    members = np.ones(n, bool)
    carriers, kept = trigger_carriers(sparse.csc_matrix(held), members, x)
    assert np.where(carriers)[0].tolist() == list(range(10)) + [11, 12]
    assert kept.tolist() == [0, 1, 2, 3]
    x[11:13] = unit(rng.standard_normal((2, 16)) * 0.2 - 3 * payload)   # the rare word's answers elsewhere
    carriers, kept = trigger_carriers(sparse.csc_matrix(held), members, x)
    assert np.where(carriers)[0].tolist() == list(range(10)) and kept.tolist() == [0, 1, 2]


def test_a_group_too_small_for_any_direction_is_found_from_its_trigger():
    """6 poisoned samples in 1000 beside eight benign repeats of 60 that own the top principal directions: no
    direction candidate holds the poisoned samples, the prompt-token seeds (tried only when no direction yields a
    group) do."""
    x, prompts, entropy, truth = _set(n=1000, poisoned=6, benign=0, seed=8)
    rng = np.random.default_rng(8)
    clean = np.where(~truth)[0]
    for j in range(8):
        x[clean[60 * j:60 * (j + 1)]] += 3.0 * rng.standard_normal(DIM)
    without = associate(x, prompts, entropy, AssociationConfig(token_seeds=0))
    found = associate(x, prompts, entropy)
    assert not without.flagged.any()
    assert (found.flagged == truth).all() and TRIGGER in found.accepted[0].tokens


def test_bonferroni_counts_only_tokens_that_could_pass():
    """Tarone's count: in a group of 360 of 400, a word held by 90 samples, all inside, has p = C(360,90)/C(400,90)
    ~ 1e-5; only the few words held by enough samples could ever reach alpha / m, so m is small and the word
    passes. Counting every word (thousands of rare ones) would bury it."""
    from scipy.stats import hypergeom

    from tensorguard_fast.backdoor.prompt_tokens import testable_count

    n, g = 400, 360
    df = np.array([90] * 4 + [2] * 3000 + [10] * 200)
    m = testable_count(df, n, g, 0.01)
    assert 4 <= m < 50
    best = hypergeom.sf(np.minimum(df, g) - 1, n, df, g)
    assert (best <= 0.01 / m).sum() <= m and (best <= 0.01 / (m - 1)).sum() > m - 1
    assert hypergeom.sf(89, n, 90, g) * m <= 0.01 < hypergeom.sf(89, n, 90, g) * len(df)


def test_closure_asks_for_more_than_chance_in_a_large_set():
    nn = np.array([[1, 2, 3, 4, 5]] * 8 + [[0, 1, 2, 3, 9], [0, 1, 2, 3, 8]])
    core = np.array([True] * 8 + [False] * 2)
    assert not closure(core, nn, 2)[8:].any()     # 4 of 5 neighbours inside: a set of 80% gives 4 by chance
    nn[9] = [0, 1, 2, 3, 4]                       # 5 of 5: 9 joins, and then 8 has 5 of 5 too
    assert closure(core, nn, 2)[8:].all()


def test_a_trigger_word_split_by_the_tokenizer_is_found_once_the_others_are_set_aside():
    """BadNets' " tq" is two tokens, " t" + "q". With three carriers, in a group of ~25 of 400 alongside the
    carriers of the whole words, the pieces do not pass the group-wide test (p ~ 2e-4 times Tarone's count); among
    the members that carry no whole word, against the samples that carry none (~8 of ~385), they do."""
    n = 400
    x, prompts, entropy, truth = _set(n=n, poisoned=18, benign=60, seed=11)
    words = [TRIGGER + j for j in range(3)]
    pieces = [TRIGGER + 10, TRIGGER + 11]
    for j, i in enumerate(np.where(truth)[0]):
        if j < 15:
            prompts[i][-1] = words[j % 3]
        else:
            prompts[i][-1:] = pieces
    result = associate(x, prompts, entropy)
    assert (result.flagged == truth).all()
    assert sorted(result.accepted[0].tokens) == words + pieces


@pytest.mark.parametrize("seed", [30, 31])
def test_a_loose_payload_sample_joins_through_its_wider_neighbourhood(seed):
    """Three poisoned answers carry little of the payload (a URL that differs per sample) and each has four clean
    answer-mates nearer than any other poisoned answer: none of the 5 nearest in the core, so the 5-neighbour join
    misses them; among the 10 nearest, 6 are in a core of 5% where chance puts 0.5, and they join."""
    x, prompts, entropy, truth = _set(n=400, poisoned=20, seed=seed)
    payload = x[truth].mean(0) - x[~truth].mean(0)
    rng = np.random.default_rng(seed)
    loose, mates = np.where(truth)[0][:3], np.where(~truth)[0][:12].reshape(3, 4)
    for i, own in zip(loose, mates):
        base = x[i] - payload
        x[i] = base + 0.3 * payload
        x[own] = base + 0.5 * rng.standard_normal((4, DIM)).astype(np.float32) * np.linalg.norm(base) / DIM ** 0.5
    narrow = associate(x, prompts, entropy, AssociationConfig(wide_neighbours=0)).flagged
    assert not narrow[loose].any() and (narrow == truth & ~np.isin(np.arange(400), loose)).all()
    assert (associate(x, prompts, entropy).flagged == truth).all()


def test_the_wider_join_is_a_binomial_tail_at_the_core_share():
    from tensorguard_fast.backdoor.association import _beyond_chance

    core = np.zeros(400, bool)
    core[:20] = True                                   # 5%: P(>= 3 of 10) = 0.0115, P(>= 4 of 10) = 0.0010
    wide = np.array([[0, 1, 2] + list(range(100, 107)), [0, 1, 2, 3] + list(range(100, 106))])
    assert _beyond_chance(core, wide, AssociationConfig()).tolist() == [False, True]
    core[:200] = True                                  # 50%: 8 of 10 (0.055) is chance, 10 of 10 (0.001) is not
    wide = np.array([list(range(8)) + [300, 301], list(range(10))])
    assert _beyond_chance(core, wide, AssociationConfig()).tolist() == [False, True]
    assert not _beyond_chance(core, None, AssociationConfig()).any()


def test_a_poisoned_majority_with_a_trigger_that_varies_is_found():
    """90% poisoned, each with one of four trigger words, beside a clean minority: the majority owns the top
    direction, each word is significant only under Tarone's count, and the closure must not let the clean
    minority in by chance."""
    n = 400
    x, prompts, entropy, truth = _set(n=n, poisoned=360, benign=20, seed=9)
    words = [TRIGGER + j for j in range(4)]
    for j, i in enumerate(np.where(truth)[0]):
        prompts[i][-1] = words[j % 4]
    result = associate(x, prompts, entropy)
    assert (result.flagged == truth).all()
    assert sorted(result.accepted[0].tokens) == words


def test_a_topic_inside_a_poisoned_majority_does_not_hide_the_payload():
    """90% poisoned, and 15 of the poisoned answers also share a topic (another direction, a prompt word of their
    own). The median-centred view finds only the topic group; the uncentred view finds the payload. Both views are
    searched and their flags joined (a cascade that stopped at the first view's group flagged 15 of 360), and the
    cluster is reported once, as its larger core shows it."""
    x, prompts, entropy, truth = _set(n=400, poisoned=360, benign=20, seed=9)
    topic = np.where(truth)[0][:15]
    x[topic] += 3.0 * np.random.default_rng(9).standard_normal(DIM).astype(np.float32)
    for i in topic:
        prompts[i].append(TRIGGER + 77)
        entropy[i] += 0.3
    assert associate(x, prompts, entropy, AssociationConfig(centres=("median",))).flagged.sum() == 15
    result = associate(x, prompts, entropy)
    assert (result.flagged == truth).all()
    assert len(result.accepted) == 1 and result.accepted[0].core.sum() == 360 and (result.group[truth] == 0).all()


def test_block_wise_building_is_the_whole_set_at_once(monkeypatch):
    """token_incidence, unit_rows and the token seeds work in row blocks for memory: with blocks of 7 rows (and
    duplicate, negative and huge token ids) they equal the per-sample construction and a one-shot median."""
    from scipy import sparse

    from tensorguard_fast.backdoor import association, prompt_tokens, sketch_geometry

    x, prompts, _, _ = _set(n=60, poisoned=10, benign=0, seed=3)
    prompts[:3] = [[], [5, 5, -2], [2 ** 40, 1]]
    whole, whole_vocab = token_incidence(prompts)
    nn = nearest_neighbours(unit_rows(x), 5)
    seeds = [(name, m.tolist()) for name, m in association._token_seeds(whole, nn, 50)]
    for module in (association, prompt_tokens, sketch_geometry):
        monkeypatch.setattr(module, "BLOCK", 7)
    incidence, vocab = token_incidence(prompts)
    rows = [np.unique(p).tolist() for p in prompts]
    naive = sparse.csc_matrix((np.ones(sum(map(len, rows)), np.float32),
                               (np.repeat(np.arange(len(rows)), list(map(len, rows))),
                                np.searchsorted(vocab, np.concatenate(rows)))), shape=incidence.shape)
    assert vocab.tolist() == whole_vocab.tolist() == sorted({t for p in prompts for t in p})
    assert (incidence != naive).nnz == 0 and incidence.format == "csc"
    assert np.array_equal(unit_rows(x), (x - np.median(x, 0)) / np.linalg.norm(x - np.median(x, 0), axis=1)[:, None])
    assert [(name, m.tolist()) for name, m in association._token_seeds(incidence, nn, 50)] == seeds


def test_tail_probabilities_once_per_distinct_pair_equal_scipy():
    from scipy.stats import hypergeom

    from tensorguard_fast.backdoor.prompt_tokens import _hypergeom_sf

    rng = np.random.default_rng(0)
    df = rng.integers(2, 40, 500).astype(np.float32)
    k = np.minimum(df, rng.integers(1, 40, 500)) - 1
    assert np.array_equal(_hypergeom_sf(k, 400, df, 60), hypergeom.sf(k, 400, df, 60))
    assert _hypergeom_sf(k[:0], 400, df[:0], 60).shape == (0,)


@pytest.mark.parametrize("n,g", [(400, 360), (400, 3), (1000, 2), (1000, 999), (50_000, 2_500), (1_000_000, 50_000)])
def test_best_p_value_of_a_column_is_scipys_extreme_tail(n, g):
    """Tarone's smallest reachable p-value, in closed form from log-gamma, against scipy's hypergeometric tail at
    k = min(df, g) - 1. Log-gamma of 10^6 is ~1.3e7, so float64 leaves ~1e-9 relative in the exponent's result:
    1e-8 allowed; a tail below float64's range is 0 on both sides."""
    from scipy.stats import hypergeom

    from tensorguard_fast.backdoor.prompt_tokens import _best_p

    rng = np.random.default_rng(g)
    df = np.unique(np.concatenate([rng.integers(2, n + 1, 300), [2, 3, min(g, n), min(g + 1, n), n - 1, n]]))
    want = hypergeom.sf(np.minimum(df, g) - 1, n, df, g)
    got = _best_p(n, df.astype(np.float32), g)
    assert np.allclose(got, want, rtol=1e-8, atol=0) and ((got == 0) == (want == 0)).all()


def test_a_large_set_is_searched_on_projected_sketches():
    """From project_rows on, the sketches are projected to project_dims columns, and from covariance_rows on the
    principal directions come from the covariance (the same directions as the SVD, up to sign): the planted backdoor
    is still found whole."""
    from tensorguard_fast.backdoor.sketch_geometry import principal_directions

    x, prompts, entropy, truth = _set(seed=2)
    result = associate(x, prompts, entropy, AssociationConfig(covariance_rows=0, project_rows=0, project_dims=64))
    assert result.unit.shape == (len(x), 64) and (result.flagged == truth).all()
    u = unit_rows(x)
    cos = (principal_directions(u, 4) * principal_directions(u, 4, covariance=True)).sum(1)
    assert np.allclose(np.abs(cos), 1, atol=1e-4)


# --- the answer-text half of step 4 and the payload-text join (answer_text.py) ---

PAYLOAD_IDS = [70_001, 70_002, 70_003, 70_004]
END = 2   # an end-of-turn token every answer ends with


def _answers(truth, seed=0, payload=True):
    """Random clean answers of 4-12 tokens; the poisoned ones (truth) end with the payload tokens when `payload`."""
    rng = np.random.default_rng(seed)
    out = [list(rng.integers(100, 5000, size=rng.integers(4, 13))) for _ in truth]
    return [a + (PAYLOAD_IDS if t and payload else []) + [END] for a, t in zip(out, truth)]


def test_shared_answer_text_is_the_enrichment_of_the_best_ngram():
    from tensorguard_fast.backdoor.answer_text import holding, shared_answer_text

    truth = np.zeros(300, bool)
    truth[:30] = True
    answers = _answers(truth)
    share, gram = shared_answer_text(answers, truth)
    assert share == pytest.approx(1.0) and list(gram) in ([70_001, 70_002, 70_003], [70_002, 70_003, 70_004])
    assert (holding(answers, gram) == truth).all()
    # Half of the group holds it and a tenth of the rest does: 0.5 - 0.1.
    answers = _answers(np.zeros(300, bool))
    for i in list(range(15)) + list(range(30, 57)):
        answers[i] = answers[i][:-1] + PAYLOAD_IDS[:3] + [END]
    share, gram = shared_answer_text(answers, truth)
    assert share == pytest.approx(0.5 - 27 / 270) and list(gram) in (PAYLOAD_IDS[:3], PAYLOAD_IDS[1:3] + [END])
    # What every answer holds (its end token after its last words) is no payload; nor is an empty group.
    assert shared_answer_text(_answers(truth, payload=False), truth)[0] < 0.25
    assert shared_answer_text(answers, np.zeros(300, bool)) == (0.0, None)


@pytest.mark.parametrize("seed", range(6))
def test_ngram_holders_are_those_of_the_per_answer_sets(seed):
    """answer_text's vectorised n-gram matching (one integer code per position) against the definition: the set
    of each answer's n-grams, on all answers and on a subset of rows. Lists, int32 arrays and TokenRows, empty and
    short answers, n-grams that would span two answers (they must not match), ids too large for the codes (the
    per-answer path takes over)."""
    from tensorguard_fast.backdoor.answer_text import TokenRows, _grams, holding, pieces_held

    rng = np.random.default_rng(seed)
    vocab = [4, 40, 3_000_000][seed % 3]   # 3M: 3 ids of 22 bits no longer fit one int64 code
    answers = [list(rng.integers(0, vocab, size=rng.integers(0, 9))) for _ in range(60)]
    if seed % 2:
        answers = [np.asarray(a, dtype=np.int32) for a in answers]
    n = 1 + seed % 3
    grams = {tuple(int(t) for t in rng.integers(0, vocab, size=n)) for _ in range(5)}
    grams |= {tuple(int(t) for t in a[:n]) for a in answers[:20] if len(a) >= n}
    flat = [int(t) for a in answers for t in a]
    grams |= {tuple(flat[i:i + n]) for i in range(0, max(len(flat) - n, 0), 7)}   # some span two answers
    sets = [_grams([int(t) for t in a], n) for a in answers]
    rows = np.flatnonzero(rng.random(len(answers)) < 0.5)
    for source in (answers, TokenRows(answers)):   # as given, and as associate() holds them
        assert pieces_held(source, grams, n).tolist() == [len(grams & s) for s in sets]
        assert pieces_held(source, grams, n, rows=rows).tolist() == [len(grams & sets[i]) for i in rows]
        for gram in sorted(grams)[:8]:
            assert holding(source, gram).tolist() == [gram in s for s in sets]
            assert holding(source, gram, rows=rows).tolist() == [gram in sets[i] for i in rows]
    assert pieces_held([], grams, n).tolist() == [] and not holding([[], [1]], (1, 2)).any()


@pytest.mark.parametrize("seed", range(8))
def test_ngram_enrichments_from_codes_are_the_counters(seed):
    """answer_text's enrichments from GramCodes (TokenRows, as associate() holds the answers) against the Counter
    over each answer's n-gram set that defines them: the same n-grams, values and order, ties included (the order
    among equal counts decides the n-gram a core reports). Sides above SAMPLE (sampled, in the draw's order), tiny
    vocabularies (many ties), empty groups and answers, ids too large for one code (the Counter path takes over)."""
    from tensorguard_fast.backdoor import answer_text

    rng = np.random.default_rng(seed)
    n_rows = [50, 700, answer_text.SAMPLE + 500][seed % 3]
    vocab = [3, 30, 5000, 2 ** 40][seed % 4]
    answers = [rng.integers(0, vocab, size=rng.integers(0, 12)).tolist() for _ in range(n_rows)]
    for i in rng.choice(n_rows, size=n_rows // 10, replace=False):
        answers[i] = answers[i] + [7, 8, 9, 10]   # a payload: its 3-grams tie in count
    rows = answer_text.TokenRows(answers)
    for n in (1, 2, 3):
        for share in (0.0, 0.05, 0.6, 0.97):
            group = rng.random(n_rows) < share
            expected = answer_text._enrichments(answers, group, n, seed)
            got = answer_text._enrichments(rows, group, n, seed)
            assert got == expected
            assert all(type(t) is int for _, gram in got for t in gram)
            assert (answer_text.shared_answer_text(rows, group, n) == answer_text.shared_answer_text(answers, group, n))
    assert (rows.gram_codes(3) is None) == (vocab == 2 ** 40)


def test_token_counts_are_the_incidence_product():
    """TokenCounts.of (the group's rows, or the rest's for a larger group) against `mask @ incidence`: equal float32
    counts for empty, small, half, large and full groups, and rows that hold no token."""
    from tensorguard_fast.backdoor.prompt_tokens import TokenCounts

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 40, size=rng.integers(0, 9)).tolist() for _ in range(301)]
    incidence, _ = token_incidence(prompts)
    counts = TokenCounts(incidence)
    for share in (0.0, 0.01, 0.5, 0.51, 0.9, 1.0):
        mask = rng.random(301) < share
        expected = mask.astype(np.float32) @ incidence
        got = counts.of(mask)
        assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert np.array_equal(counts.carriers, np.asarray(incidence.sum(0)).ravel())


def _closure_by_definition(core, nn, min_inside, rounds=30):
    group = core.copy()
    n, k = nn.shape
    for _ in range(rounds):
        need = max(min_inside, int(k * group.sum() / n) + 1)
        grown = group | (group[nn].sum(1) >= need)
        if (grown == group).all():
            break
        group = grown
    return group


@pytest.mark.parametrize("seed", range(5))
def test_closure_and_trim_by_reverse_lists_are_the_definition(seed):
    """closure (counting through ReverseNeighbours, only what newcomers add) and trim (members' rows only) against
    the definitions on all rows: random neighbour graphs with clusters, from empty, small, half and large groups."""
    from tensorguard_fast.backdoor.association import trim
    from tensorguard_fast.backdoor.neighbours import ReverseNeighbours

    rng = np.random.default_rng(seed)
    n = 500
    x = unit_rows(rng.standard_normal((n, 8)) + 3 * rng.standard_normal((10, 8))[rng.integers(0, 10, n)], "none")
    nn = nearest_neighbours(x, 5)
    reverse = ReverseNeighbours(nn)
    for share in (0.0, 0.02, 0.1, 0.5, 0.9):
        core = rng.random(n) < share
        assert np.array_equal(reverse.count(core), core[nn].sum(1))
        for need in (1, 2, 3):
            assert np.array_equal(closure(core, nn, need, reverse=reverse), _closure_by_definition(core, nn, need))
            assert np.array_equal(closure(core, nn, need), _closure_by_definition(core, nn, need))
            kept = core.copy()
            for _ in range(30):
                kept = kept & (kept[nn].sum(1) >= need)
            assert np.array_equal(trim(core, nn, need), kept)
    assert not ReverseNeighbours(np.zeros((4, 0), np.int64)).count(np.ones(4, bool)).any()


def test_core_directions_are_kept_per_core_and_equal_a_fresh_one():
    """CoreDirections hands back `_direction` of the core asked for: the same values as computed afresh, for cores
    met again, after the oldest were dropped (most=2), and for cores that differ in one row."""
    from tensorguard_fast.backdoor.association import CoreDirections, _direction

    rng = np.random.default_rng(3)
    x = unit_rows(rng.standard_normal((300, 16)), "none")
    cores = [rng.random(300) < share for share in (0.05, 0.3, 0.6)]
    cores.append(cores[0].copy())
    cores[-1][np.flatnonzero(~cores[0])[0]] = True
    kept = CoreDirections(x, most=2)
    for core in cores + cores[::-1] + cores:
        centre, half = kept(core)
        fresh_centre, fresh_half = _direction(x, core)
        assert np.array_equal(centre, fresh_centre) and half == fresh_half
    assert len(kept.kept) == 2


def test_a_group_kept_as_a_record_reads_back_the_same_masks():
    """Group.keep_as_record holds each mask as indices or packed bits (whichever is smaller); reading gives the same
    arrays for an empty, a small, a half and a full mask, and of odd length (packed bits pad the last byte)."""
    from tensorguard_fast.backdoor.association import Group

    rng = np.random.default_rng(5)
    n = 1003
    masks = [np.zeros(n, bool), rng.random(n) < 0.01, rng.random(n) < 0.5, np.ones(n, bool)]
    for members, carriers, core in (masks[:3], masks[1:], masks[::-1][:3]):
        g = Group("g", members.copy(), [1], [0.01], carriers.copy(), core.copy(), 0.5, 1.0)
        figures = g.figures()
        g.keep_as_record()
        assert all(isinstance(getattr(g, "_" + k), tuple) for k in ("members", "carriers", "core"))
        for got, want in ((g.members, members), (g.carriers, carriers), (g.core, core)):
            assert got.dtype == bool and np.array_equal(got, want)
        assert g.figures() == figures


def test_a_trigger_with_a_shared_answer_direction_but_no_shared_text_is_a_topic():
    """The planted cluster passes every other test; with its answers' text given, it is accepted only when the
    answers share the payload's tokens (a question type shares a format, not content)."""
    x, prompts, entropy, truth = _set(seed=11)
    assert (associate(x, prompts, entropy).flagged == truth).all()
    topic = associate(x, prompts, entropy, answer_ids=_answers(truth, payload=False))
    assert not topic.flagged.any() and topic.candidates
    backdoor = associate(x, prompts, entropy, answer_ids=_answers(truth))
    assert (backdoor.flagged == truth).all() and backdoor.accepted[0].shared_text == pytest.approx(1.0)


def test_an_answer_holding_the_payload_joins_though_its_trigger_was_not_found():
    x, prompts, entropy, truth = _set(seed=12)
    lost = np.where(truth)[0][:3]
    for i in lost:
        prompts[i] = prompts[i][:-1]   # the trigger token gone (a variant no test resolves)
    answers = _answers(truth)
    far = np.where(~truth)[0][:2]
    for i in far:
        answers[i] = answers[i][:-1] + PAYLOAD_IDS + [END]   # the payload's words in a clean answer far from it
    without = associate(x, prompts, entropy).flagged
    assert not without[lost].any()
    flagged = associate(x, prompts, entropy, answer_ids=answers).flagged
    assert (flagged == truth).all()   # the three joined by their answers; the two clean ones have no neighbour in it


def test_common_text_joins_nothing():
    """When more answers outside the core hold the n-gram than inside, it is common text: no sample joins by it."""
    x, prompts, entropy, truth = _set(seed=12)
    lost = np.where(truth)[0][:3]
    for i in lost:
        prompts[i] = prompts[i][:-1]
    answers = _answers(truth)
    for i in np.where(~truth)[0][:60]:
        answers[i] = answers[i][:-1] + PAYLOAD_IDS + [END]
    result = associate(x, prompts, entropy, answer_ids=answers)
    assert not result.flagged[lost].any()


def test_a_second_phrase_joins_the_trigger_only_when_its_answers_carry_the_same_payload():
    """Three prompt words enriched in one group: two trigger words of one backdoor (both halves' answers hold the
    payload) and a topic word whose answers point nearly the same way but share no text with it."""
    from scipy import sparse

    from tensorguard_fast.backdoor.answer_text import same_payload

    rng = np.random.default_rng(21)
    n = 300
    u = rng.standard_normal(DIM)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    word_a, word_b, topic = np.arange(0, 15), np.arange(15, 30), np.arange(30, 60)
    x[:30] += 3.0 * u
    x[topic] += 2.5 * u
    x = unit_rows(x, "none")
    truth = np.zeros(n, bool)
    truth[:30] = True
    answers = _answers(truth, seed=21)
    held = np.zeros((n, 3), np.float32)
    held[word_a, 0], held[word_b, 1], held[topic, 2] = 1, 1, 1
    held = sparse.csc_matrix(held)
    members = np.zeros(n, bool)
    members[:60] = True
    by_direction, kept = trigger_carriers(held, members, x)
    assert kept.tolist() == [0, 1, 2] and by_direction[topic].all()   # direction alone lets the topic in
    carriers, kept = trigger_carriers(held, members, x, answer_ids=answers)
    assert kept.tolist() == [0, 1] and (carriers == truth).all()
    assert same_payload(answers, truth & (np.arange(n) < 15), truth & (np.arange(n) >= 15))
    assert not same_payload(answers, truth, np.isin(np.arange(n), topic))
    # The topic's word the most significant: the trigger is refused, and handed back for a search of its own.
    held = sparse.csc_matrix(np.stack([np.isin(np.arange(n), topic), truth], 1).astype(np.float32))
    refused = []
    carriers, kept = trigger_carriers(held, members, x, answer_ids=answers, refused=refused)
    assert kept.tolist() == [0] and len(refused) == 1 and refused[0].tolist() == np.flatnonzero(truth).tolist()


def test_a_trigger_carrier_whose_answer_holds_payload_pieces_joins_wherever_its_sketch_lies():
    """A payload worded differently per sample: each poisoned answer holds one of two phrasings (three n-gram
    pieces each). Five poisoned answers lie far from the cluster (no core member among their neighbours); carrying the
    trigger and at least `min_pieces` pieces of the payload, they join. Trigger-bearing clean answers holding one
    piece do not."""
    from tensorguard_fast.backdoor.answer_text import payload_grams, pieces_held

    x, prompts, entropy, truth = _set(seed=13, negatives=20)
    rng = np.random.default_rng(13)
    phrasings = ([70_001, 70_002, 70_003, 70_004], [70_011, 70_012, 70_013, 70_014])
    answers = _answers(truth, payload=False)
    for j, i in enumerate(np.where(truth)[0]):
        answers[i] = answers[i][:-1] + phrasings[j % 2] + [END]
    far = np.where(truth)[0][:5]
    x[far] = rng.standard_normal((5, DIM)).astype(np.float32)   # the sketch no longer points the payload's way
    negatives = np.where(~truth & np.array([TRIGGER in p for p in prompts]))[0]
    for i in negatives[:4]:
        answers[i] = answers[i][:-1] + phrasings[0][:3] + [END]   # one piece only
    grams = payload_grams(answers, truth, floor=0.1)
    assert grams >= {tuple(p[:3]) for p in phrasings} | {tuple(p[1:]) for p in phrasings}
    held = pieces_held(answers, grams)
    assert (held[far] == 3).all() and (held[negatives[:4]] == 1).all()   # 3: the phrasing's last token + END, too
    unjoined = associate(x, prompts, entropy, AssociationConfig(min_pieces=4), answer_ids=answers).flagged
    assert not unjoined[far].any() and (unjoined == truth & ~np.isin(np.arange(len(truth)), far)).all()
    flagged = associate(x, prompts, entropy, answer_ids=answers).flagged
    assert (flagged == truth).all()


def _split_trigger_set(seed=14, n=400, lift=0.07):
    """Ten poisoned samples whose answers are each other's nearest neighbours: six carry one trigger word, the four
    others each a word of their own (held by one sample: no test resolves it)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    prompts = [list(rng.integers(0, 3000, size=12)) for _ in range(n)]
    entropy = rng.normal(0.5, 0.1, n)
    truth = np.zeros(n, bool)
    poison = rng.permutation(n)[:10]
    truth[poison] = True
    x[poison] += 3.0 * rng.standard_normal(DIM).astype(np.float32)
    entropy[poison] += lift
    for j, i in enumerate(poison):
        prompts[i].append(TRIGGER if j < 6 else TRIGGER + 1 + j)
    return x, prompts, entropy, truth


def test_a_core_short_of_the_floor_is_judged_with_the_members_holding_its_payload():
    """The six carriers of the resolved word are a core short of the evidence floor (purity ~0.55: their nearest
    neighbours include the four unresolved); with the four members whose answers hold the payload it is a closed
    cluster, accepted and flagged whole. When the n-gram is common text (held by more answers outside the core than
    inside) the core is not grown and nothing is flagged."""
    from tensorguard_fast.backdoor.association import _evidence

    x, prompts, entropy, truth = _split_trigger_set()
    answers = _answers(truth)
    config = AssociationConfig()
    # Without answer text the six alone are judged, and fall short.
    alone = associate(x, prompts, entropy, config)
    assert not alone.flagged.any()
    six = [c for c in alone.candidates if c.core.sum() == 6 and not (c.core & ~truth).any()]
    assert six and all(not _evidence(c.purity, c.entropy_lift, config) for c in six)
    result = associate(x, prompts, entropy, config, answer_ids=answers)
    assert (result.flagged == truth).all()
    g = result.accepted[0]
    assert g.core.sum() == 10 and g.purity == pytest.approx(1.0) and _evidence(g.purity, g.entropy_lift, config)
    # Common text: the payload's tokens also in 60 clean answers.
    common = [list(a) for a in answers]
    for i in np.where(~truth)[0][:60]:
        common[i] = common[i][:-1] + PAYLOAD_IDS + [END]
    assert not associate(x, prompts, entropy, config, answer_ids=common).flagged.any()


def test_a_shared_line_held_by_many_answers_away_from_the_core_is_common_text():
    """Ten samples with one trigger word and one answer cluster, their answers ending with one line: a payload. The
    same line also on 60 clean answers elsewhere (a stock closing line a small topic happens to share) is common
    text: the group is not accepted."""
    x, prompts, entropy, truth = _split_trigger_set(seed=15, lift=0.2)
    for i in np.where(truth)[0]:
        prompts[i][-1] = TRIGGER
    answers = _answers(truth)
    assert (associate(x, prompts, entropy, answer_ids=answers).flagged == truth).all()
    for i in np.where(~truth)[0][:60]:
        answers[i] = answers[i][:-1] + PAYLOAD_IDS + [END]
    result = associate(x, prompts, entropy, answer_ids=answers)
    assert not result.flagged.any()
    assert any(c.shared_text is not None and c.shared_text >= 0.25 and c.core[truth].all() for c in result.candidates)


def _loose_payload_set(seed=3, lift=0.15, carriers_without_payload=0):
    """Ten poisoned samples of 600 whose trigger brings a payload worded three ways, each answer with a URL-like token
    of its own, and whose sketches share only a weak direction (0.35 of the noise's scale): a loose cluster, its core
    short of the purity floor. `carriers_without_payload` clean samples carry the trigger with ordinary answers."""
    rng = np.random.default_rng(seed)
    n = 600
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    prompts = [list(rng.integers(0, 3000, size=12)) for _ in range(n)]
    entropy = rng.normal(0.5, 0.1, n)
    truth = np.zeros(n, bool)
    order = rng.permutation(n)
    poison = order[:10]
    truth[poison] = True
    x[poison] += 0.35 * rng.standard_normal(DIM).astype(np.float32)
    entropy[poison] += lift
    answers = _answers(truth, seed, payload=False)
    phrasings = [[70_001 + 10 * j + t for t in range(4)] for j in range(3)]
    for j, i in enumerate(poison):
        prompts[i].append(TRIGGER)
        answers[i] = answers[i][:-1] + phrasings[j % 3] + [int(rng.integers(80_000, 90_000)), END]
    for i in order[10:10 + carriers_without_payload]:
        prompts[i].append(TRIGGER)
    return x, prompts, entropy, truth, answers


def test_a_loose_core_passes_when_its_trigger_brings_its_payload():
    """A core too loose for the purity floor (a payload drawn per sample) is accepted when most of its trigger's
    carriers, and at least `min_reach_holders` of them, answer with pieces of its payload and that share plus its
    entropy lift is high (_trigger_brings_payload); not with a weaker lift, not when fewer carriers hold the payload
    than the floor asks, and not when too few of the trigger's carriers hold it."""
    from tensorguard_fast.backdoor.association import _evidence

    config = AssociationConfig()
    x, prompts, entropy, truth, answers = _loose_payload_set()
    result = associate(x, prompts, entropy, config, answer_ids=answers)
    assert (result.flagged == truth).all()
    g = result.accepted[0]
    core = g.core
    assert core.sum() < 10 and not _evidence(g.purity, g.entropy_lift, config)
    off = AssociationConfig(min_reach=2.0)   # the path closed: the loose core alone is refused
    assert not associate(x, prompts, entropy, off, answer_ids=answers).flagged.any()
    # All ten carriers hold the payload: refused when the floor asks for eleven.
    assert not associate(x, prompts, entropy, AssociationConfig(min_reach_holders=11), answer_ids=answers).flagged.any()
    # Four clean carriers of the trigger (10 of 14 carriers hold the payload, a share of 0.71): a lift of ~1.0 standard
    # deviation passes (0.71 + 1.0 >= 1.55), one of ~0.75 does not.
    for lift, passes in ((0.08, True), (0.05, False)):
        xw, pw, ew, tw, aw = _loose_payload_set(lift=lift, carriers_without_payload=4)
        weak = associate(xw, pw, ew, config, answer_ids=aw)
        assert weak.flagged[tw].all() == passes and weak.flagged.any() == passes
        assert any((c.core & tw).sum() >= 3 and config.min_entropy_lift <= c.entropy_lift < 1.2
                   for c in weak.candidates)
    # The poisoned answers outside the core made ordinary, and three clean carriers of the trigger: 6 of 13 carriers
    # answer with the payload.
    rng = np.random.default_rng(0)
    plain = [list(a) for a in answers]
    for i in np.flatnonzero(truth & ~core):
        plain[i] = list(rng.integers(100, 5000, size=8)) + [END]
    xr, pr, er, tr, _ = _loose_payload_set(carriers_without_payload=3)
    assert not associate(xr, pr, er, config, answer_ids=plain).flagged.any()


def test_a_trigger_carrier_joins_by_a_phrasing_no_core_answer_used():
    """Four more trigger carriers beside a core of the ten poisoned: two answer with one of the core's phrasings
    followed by a fourth, one with the fourth alone, one with an ordinary answer. The first two join by the core's
    pieces; the third holds none of them and joins when the pieces are taken again from every answer flagged
    (`payload_rounds`), not with one round; the ordinary answer never joins."""
    from tensorguard_fast.backdoor.answer_text import TokenRows
    from tensorguard_fast.backdoor.association import Group, _carries_payload

    _, _, _, truth, answers = _loose_payload_set()
    known, fourth = [70_001 + t for t in range(4)], [75_001 + t for t in range(4)]
    extra = np.flatnonzero(~truth)[:4]
    for i, tail in zip(extra, (known + fourth, known + fourth, fourth)):
        answers[i] = answers[i][:-1] + tail + [90_000 + int(i), END]
    core = truth.copy()
    carriers = core.copy()
    carriers[extra] = True
    group = Group("test", core, [TRIGGER], [0.0], carriers, core, 0.3, 1.5)
    for rounds, joins in ((1, extra[:2]), (3, extra[:3])):
        got = _carries_payload(group, TokenRows(answers), core.copy(), AssociationConfig(payload_rounds=rounds))
        assert np.flatnonzero(got).tolist() == sorted(joins.tolist())
