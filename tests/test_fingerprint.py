"""fast_fingerprint: the tensorguard profile against TensorGuard's way (autograd, materialised gradients, numpy and
scipy statistics), and the properties the full profile promises."""
import json

import numpy as np
import pytest
import torch

from tensorguard_fast import Fingerprint, fast_fingerprint
from tensorguard_fast.lineage.family import distance
from tensorguard_fast.lineage.fingerprint import TENSORGUARD_KEYS
from tensorguard_fast.lineage.profile_tensorguard import select_tensors
from tensorguard_fast.lineage.loading import open_model
from tensorguard_fast.evaluation.tensorguard_way import tensorguard_reference
from tensorguard_fast.evaluation import zoo

from lineage_models import tiny_llama


@pytest.mark.parametrize("seed,hidden", [(0, 64), (3, 96)])
def test_tensorguard_profile_matches_tensorguards_way(seed, hidden):
    model = tiny_llama(seed=seed, hidden=hidden, layers=5)
    fp = fast_fingerprint(model, profile="tensorguard")
    ref = tensorguard_reference(open_model(model), subsample=False, float64_stats=True)
    assert fp.names == list(ref)
    assert fp.names == TENSORGUARD_KEYS
    # the reference's gradient is float32 (as TensorGuard's); ours is exact
    np.testing.assert_allclose(fp.vector, [ref[k] for k in fp.names], rtol=2e-5, atol=1e-9)
    ref32 = tensorguard_reference(open_model(model), subsample=False)
    np.testing.assert_allclose(fp.vector, [ref32[k] for k in fp.names], rtol=1e-3, atol=1e-7)


def test_tensorguard_selection_follows_the_published_rule():
    names = ["model.embed_tokens.weight"]
    for i in range(16):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    names.sort()
    attn = [n for n in names if "attn" in n]
    mlp = [n for n in names if "mlp" in n]
    picked = select_tensors(names, np.random.RandomState(0))
    assert picked[:7] == ["model.embed_tokens.weight", attn[0], attn[31], attn[63], mlp[0], mlp[23], mlp[47]]
    assert len(picked) == 10 and len(set(picked)) == 10
    assert select_tensors(names[:9], np.random.RandomState(0)) == names[:9]


def test_tensorguard_layer_cut_and_counts():
    model = tiny_llama(seed=0, layers=18)
    fp = fast_fingerprint(model, profile="tensorguard").as_dict()
    kept = sum(p.numel() for n, p in model.state_dict().items()
               if not any(f"layers.{i}." in n for i in (16, 17)))
    assert fp["total_params"] == kept
    assert fp["num_layers"] == 10
    sel = fast_fingerprint(model, profile="tensorguard").metadata["selected_tensors"]
    assert not any("layers.16." in s or "layers.17." in s for s in sel)


def test_full_profile_is_fixed_length_across_architectures():
    a = fast_fingerprint(tiny_llama(seed=0, hidden=64, layers=4))
    b = fast_fingerprint(tiny_llama(seed=0, hidden=96, layers=7, vocab=700))
    assert a.names == b.names and a.vector.shape == b.vector.shape
    assert 1.2 < distance(a, b) < 1.6  # different widths: unrelated probes, unrelated sketches


def test_full_profile_separates_same_shape_inits_and_keeps_derivatives():
    base = {k: v for k, v in tiny_llama(seed=0).state_dict().items()}
    other = {k: v for k, v in tiny_llama(seed=1).state_dict().items()}
    fp_base, fp_other = fast_fingerprint(base), fast_fingerprint(other)
    assert distance(fp_base, fp_other) > 1.2
    for derived in (zoo.add_noise(base, 1e-3), zoo.quantize_roundtrip(base, 8), zoo.magnitude_prune(base, 0.2),
                    zoo.extend_vocab(base, 50)):
        fp = fast_fingerprint(derived)
        assert distance(fp, fp_base) < 0.5 < distance(fp, fp_other)


def test_full_profile_seed_and_determinism():
    model = tiny_llama(seed=0)
    a, b = fast_fingerprint(model, seed=0), fast_fingerprint(model, seed=0)
    np.testing.assert_array_equal(a.vector, b.vector)
    c = fast_fingerprint(model, seed=1)
    assert distance(a, c) > 1.0
    assert a.metadata["seed"] == 0 and c.metadata["seed"] == 1


def test_json_round_trip(tmp_path):
    for profile in ("full", "tensorguard"):
        fp = fast_fingerprint(tiny_llama(seed=0), profile=profile)
        fp.to_json(tmp_path / f"{profile}.json")
        back = Fingerprint.from_json(tmp_path / f"{profile}.json")
        np.testing.assert_array_equal(back.vector, fp.vector)
        assert back.names == fp.names and back.metadata == fp.metadata


def test_reads_tensorguard_feature_files(tmp_path):
    # the released files' layout (values here are made up)
    values = {k: float(i + 1) / 7 for i, k in enumerate(TENSORGUARD_KEYS)}
    values.update(total_params=1234, num_layers=10, model_name="some-model")
    path = tmp_path / "some-model_features.json"
    path.write_text(json.dumps(values))
    fp = Fingerprint.from_tensorguard_json(path)
    assert fp.profile == "tensorguard" and fp.model == "some-model"
    assert fp.names == TENSORGUARD_KEYS
    assert fp.as_dict()["total_params"] == 1234
    assert Fingerprint.from_json(path).names == fp.names
    ours = fast_fingerprint(tiny_llama(seed=0), profile="tensorguard")
    distance(ours, fp)  # comparable with our own tensorguard fingerprints


def test_profiles_do_not_mix():
    a = fast_fingerprint(tiny_llama(seed=0), profile="full")
    b = fast_fingerprint(tiny_llama(seed=0), profile="tensorguard")
    with pytest.raises(ValueError, match="same --profile"):
        distance(a, b)
    with pytest.raises(ValueError, match="unknown profile"):
        fast_fingerprint(tiny_llama(seed=0), profile="nope")


@pytest.mark.slow
def test_smollm2_tensorguard_profile_sane(smollm2_dir):
    fp = fast_fingerprint(smollm2_dir, profile="tensorguard").as_dict()
    # grad of ||W x|| has Frobenius norm ||x|| (x has 576 or 1536 entries): the weight-independence docs/methods.md section 1.1 notes
    assert 20 < fp["embedding_norm"] < 30 and fp["num_layers"] == 10
    full = fast_fingerprint(smollm2_dir)
    assert full.metadata["roles_missing"] == [] and full.metadata["num_layers"] == 30


def test_batched_gradient_stats_equal_outer_moments_and_materialised_gradient():
    from tensorguard_fast import reference
    from tensorguard_fast.lineage.profile_tensorguard import gradient_stats
    from tensorguard_fast.ops.moments import outer_moments

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(97, 127, generator=gen)
    probes = torch.randn(3, 127, generator=gen)
    stats, bad = gradient_stats(w, probes)
    assert bad == 0
    for j in range(3):
        x = probes[j].double()
        v = (w @ probes[j]).double()  # the mat-vec is float32 in both; the rest is checked in float64
        u = v / v.norm()
        for m in (outer_moments(u, x), reference.moments(torch.outer(u, x))):
            got = stats[j]
            assert got["mean"] == pytest.approx(m.mean, abs=1e-5 * m.std)  # sum u cancels: judge against the spread
            assert got["std"] == pytest.approx(m.std, rel=1e-5)
            assert got["norm"] == pytest.approx(m.l2, rel=1e-5)
            assert got["skewness"] == pytest.approx(m.skewness, rel=1e-4, abs=1e-9)
            assert got["kurtosis"] == pytest.approx(m.kurtosis, rel=1e-4)
    w[5, 7] = float("nan")
    stats, bad = gradient_stats(w, probes)
    assert bad == 1 and all(np.isfinite(list(s.values())).all() for s in stats)
