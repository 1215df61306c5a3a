"""distance/similarity and FamilyClassifier: synthetic fingerprints for the mechanics, then a small real zoo
(SmolLM2 and two random inits of its config, with cheap derivatives) for both profiles."""
import numpy as np
import pytest

from tensorguard_fast import FamilyClassifier, Fingerprint, distance, fast_fingerprint, similarity
from tensorguard_fast.evaluation import zoo


def _fp(vec, model, profile="full"):
    return Fingerprint(np.asarray(vec, float), [f"f{i}" for i in range(len(vec))],
                       {"model": model, "profile": profile})


def test_distance_and_similarity():
    a, b = _fp([1, 0, 0, 0], "a"), _fp([0, 1, 0, 0], "b")
    assert distance(a, a) == 0 and similarity(a, a) == pytest.approx(1)
    assert distance(a, b) == pytest.approx(np.sqrt(2 / 4))
    assert similarity(a, b) == pytest.approx(0)
    with pytest.raises(ValueError, match="different features"):
        distance(a, _fp([1, 0, 0], "c"))


def test_classifier_mechanics():
    rng = np.random.default_rng(0)
    centres = {"x": rng.normal(size=16), "y": rng.normal(size=16), "z": rng.normal(size=16)}
    bases = {k: _fp(v, k) for k, v in centres.items()}
    models, truth = [], []
    for k, v in centres.items():
        for i in range(4):
            models.append(_fp(v + 0.05 * rng.normal(size=16), f"{k}{i}"))
            truth.append(k)
    stranger = _fp(rng.normal(size=16), "stranger")
    for method in ("kmeans", "nearest"):
        clf = FamilyClassifier(bases, method=method)
        preds = clf.fit_predict(models + [stranger])
        assert [p.family for p in preds[:-1]] == truth
        assert all(p.known and p.margin > 0 for p in preds[:-1])
        assert preds[-1].family == "unknown" and not preds[-1].known
        assert clf.threshold_used > 0
        closed = FamilyClassifier(bases, method=method, open_set=False).fit_predict([stranger])[0]
        assert closed.known and closed.family == closed.nearest


def test_kmeans_open_set_verdict_does_not_depend_on_who_else_is_classified():
    """A model at 0.4 of the base-to-base distance from its base is known however many far-away models are
    classified with it; a radius in kmeans' standardised space would move with that population."""
    rng = np.random.default_rng(2)
    centres = {k: rng.normal(size=16) for k in "xy"}
    bases = {k: _fp(v, k) for k, v in centres.items()}
    step = centres["y"] - centres["x"]
    near = _fp(centres["x"] + 0.4 * np.linalg.norm(step) * rng.normal(size=16) / 4, "near")
    alone = FamilyClassifier(bases, method="kmeans").fit_predict([near])[0]
    crowd = [_fp(10 * rng.normal(size=16), f"far{i}") for i in range(6)]
    crowded = FamilyClassifier(bases, method="kmeans").fit_predict([near] + crowd)[0]
    assert alone.family == crowded.family == "x"
    assert alone.distance == pytest.approx(crowded.distance) == pytest.approx(distance(near, bases["x"]))


def test_single_base_uses_population_outlier_rule():
    rng = np.random.default_rng(1)
    base = rng.normal(size=8)
    members = [_fp(base + 0.01 * rng.normal(size=8), f"m{i}") for i in range(10)]
    far = _fp(rng.normal(size=8), "far")
    preds = FamilyClassifier({"b": _fp(base, "b")}, method="nearest").fit_predict(members + [far])
    assert all(p.known for p in preds[:-1]) and not preds[-1].known


def _at(centre, d, rng):
    """A point at RMS distance exactly d from `centre` (the profiles' distance), in a random direction."""
    step = rng.normal(size=centre.size)
    return centre + d * step / np.sqrt(np.mean(step ** 2))


@pytest.mark.parametrize("method", ["nearest", "kmeans"])
def test_invariant_open_set_radius_is_the_measured_one(method):
    """The invariant profile's radius is measured against unrelated models (profiles.py), so it does not shrink
    when two bases are related: with bases 0.5 apart, the half-distance rule (the full profile's) would call a
    model 0.9 from its base unknown; the invariant profile keeps it, and calls one beyond 1.2 unknown. With one
    base the same radius holds (no population outlier rule)."""
    from tensorguard_fast.lineage import profiles

    radius = profiles.get("invariant").open_set_radius
    assert radius == profiles.get("invariant").same_family_threshold   # classify and compare agree
    rng = np.random.default_rng(5)
    x = rng.normal(size=512)
    y = _at(x, 0.5, rng)
    models = [_at(x, 0.9, rng), _at(x, radius + 0.1, rng)]
    for profile, expect in (("invariant", [True, False]), ("full", [False, False])):
        bases = {"x": _fp(x, "x", profile), "y": _fp(y, "y", profile)}
        preds = FamilyClassifier(bases, method=method).fit_predict([_fp(m, f"m{i}", profile)
                                                                    for i, m in enumerate(models)])
        assert [p.known for p in preds] == expect, profile
        assert all(p.nearest == "x" for p in preds if p.known)
    clf = FamilyClassifier({"x": _fp(x, "x", "invariant")}, method=method)
    preds = clf.fit_predict([_fp(m, f"m{i}", "invariant") for i, m in enumerate(models)])
    assert clf.threshold_used == radius and [p.known for p in preds] == [True, False]
    forced = FamilyClassifier({"x": _fp(x, "x", "invariant")}, method=method, threshold=0.5)
    assert not any(p.known for p in forced.fit_predict([_fp(models[0], "m0", "invariant")]))


@pytest.fixture(scope="module")
def small_zoo(smollm2_dir):
    """{profile: {(family, variant): Fingerprint}} for SmolLM2 and two random inits of its config."""
    from safetensors.torch import load_file

    states = {"smollm2": load_file(str(smollm2_dir / "model.safetensors")),
              "rand1": zoo.random_init(smollm2_dir, 1), "rand2": zoo.random_init(smollm2_dir, 2)}
    variants = {"base": lambda s: s, "int4": lambda s: zoo.quantize_roundtrip(s, 4),
                "prune50": lambda s: zoo.magnitude_prune(s, 0.5), "noise": lambda s: zoo.add_noise(s, 1e-3),
                "extvocab": lambda s: zoo.extend_vocab(s, 500)}
    out = {"invariant": {}, "full": {}, "tensorguard": {}}
    for fam, state in states.items():
        for var, make in variants.items():
            if fam == "rand2" and var != "base":
                continue
            derived = make(state)
            for profile in out:
                out[profile][(fam, var)] = fast_fingerprint(derived, profile=profile, name=f"{fam}.{var}",
                                                            config=smollm2_dir)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["invariant", "full"])
def test_small_zoo_unit_block_profiles(small_zoo, profile):
    fps = small_zoo[profile]
    bases = {f: fps[(f, "base")] for f in ("smollm2", "rand1", "rand2")}
    derived = [(k, fp) for k, fp in fps.items() if k[1] != "base"]
    for method in ("nearest", "kmeans"):
        preds = FamilyClassifier(bases, method=method, open_set=False).fit_predict([fp for _, fp in derived])
        assert [p.family for p in preds] == [k[0] for k, _ in derived], method
    preds = FamilyClassifier(bases, method="nearest").fit_predict([fp for _, fp in derived])
    assert all(p.known for p in preds)
    # hold SmolLM2 out: its derivatives must not be claimed by the random families
    held = FamilyClassifier({f: bases[f] for f in ("rand1", "rand2")}, method="nearest")
    assert all(p.family == "unknown" for p in held.fit_predict([fp for k, fp in derived if k[0] == "smollm2"]))
    assert distance(bases["rand1"], bases["rand2"]) > 1.3


@pytest.mark.slow
def test_small_zoo_tensorguard_profile_runs(small_zoo):
    """TensorGuard's features are recorded for comparison; its weakness (same-shape families look alike) shows as
    two random inits being far closer than a pretrained model is to either."""
    fps = small_zoo["tensorguard"]
    r12 = distance(fps[("rand1", "base")], fps[("rand2", "base")])
    assert r12 < distance(fps[("smollm2", "base")], fps[("rand1", "base")])
    bases = {f: fps[(f, "base")] for f in ("smollm2", "rand1", "rand2")}
    preds = FamilyClassifier(bases, method="kmeans").fit_predict([fp for k, fp in fps.items() if k[1] != "base"])
    assert len(preds) == 8
