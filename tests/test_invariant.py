"""The invariant profile: unchanged by function-preserving obfuscations (residual-stream, neuron and head
permutations, norm/linear rescaling), moved by real changes; on small random models of SmolLM2's architecture (Llama,
GQA 3 q heads per key head, tied embeddings) and Gemma-3's (1 + w norms, q/k norms, post-norms, GELU, one key head).

Tolerance, derived: the fingerprint is computed in float32 (unit roundoff u = 2^-24). Reordering a sum of n terms
(a permutation) or rounding each weight once more (a rescaling) changes a dot product by about sqrt(n) u relative;
the features chain at most three products (q, its key-group sum times W_k, the anchors) and a centring and a
division, so we allow 16 sqrt(n) u with n the longest contraction (the MLP width): 4e-6 for these models. A real
change is measured against the same scale: 1e-3 relative noise on every weight moves the fingerprint by ~2e-3.
"""
import math

import numpy as np
import pytest
import torch

from tensorguard_fast import distance, fast_fingerprint
from tensorguard_fast.evaluation import zoo
from tensorguard_fast.lineage import profiles
from tensorguard_fast.lineage.profile_invariant import anchor_ids, feature_names

U32 = 2.0 ** -24


def smollm2_like(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=16, vocab_size=640, tie_word_embeddings=True,
                         rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def gemma3_like(seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=32, vocab_size=640, sliding_window=8,
                              tie_word_embeddings=True, query_pre_attn_scalar=32)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    # Gemma initialises its norm weights to 0 (i.e. 1 + 0): give them spread so rescaling them is a real test
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


ARCHS = {"smollm2": smollm2_like, "gemma3": gemma3_like}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tolerance(config):
    return 16 * math.sqrt(config.intermediate_size) * U32


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    model = ARCHS[request.param]()
    state = _state(model)
    config = model.config
    return {"name": request.param, "config": config, "state": state,
            "fp": fast_fingerprint(state, config=config), "checker": zoo.FunctionChecker(config)}


@pytest.mark.parametrize("obfuscation", list(zoo.OBFUSCATIONS) + ["obf-all"])
def test_invariant_to_function_preserving_obfuscations(arch, obfuscation):
    config = arch["config"]
    changed, logit_diff = zoo.obfuscate(arch["state"], config, obfuscation, seed=5, checker=arch["checker"])
    assert logit_diff <= zoo.FUNCTION_TOLERANCE
    # the obfuscation really moved the weights (else this test could not fail)
    moved = [k for k in changed if not torch.equal(changed[k], arch["state"][k])]
    assert moved
    fp = fast_fingerprint(changed, config=config)
    tol = _tolerance(config)
    assert distance(fp, arch["fp"]) <= tol, (obfuscation, distance(fp, arch["fp"]), tol)
    # the profile this replaces as default is not invariant: the same copy reads as far away
    if obfuscation in ("perm-residual", "obf-all"):
        full = distance(fast_fingerprint(changed, profile="full"), fast_fingerprint(arch["state"], profile="full"))
        assert full > 0.5


def test_obfuscation_check_rejects_a_real_change(arch):
    noisy = zoo.add_noise(arch["state"], 1e-3, seed=1)
    with pytest.raises(AssertionError, match="not function-preserving"):
        zoo.check_function_preserving(arch["state"], noisy, arch["config"], arch["checker"])


def test_not_invariant_to_real_changes(arch):
    config, base = arch["config"], arch["fp"]
    tol = _tolerance(config)
    noisy = fast_fingerprint(zoo.add_noise(arch["state"], 1e-3, seed=1), config=config)
    assert distance(noisy, base) > 100 * tol
    assert distance(noisy, base) < 0.05
    other = fast_fingerprint(_state(ARCHS[arch["name"]](seed=1)), config=config)
    assert distance(other, base) > 1.2  # an independent init: unrelated blocks, ~sqrt(2)
    # a permuted copy of the other model stays with the other model, not with this one
    perm = fast_fingerprint(zoo.permute_residual(_state(ARCHS[arch["name"]](seed=1)), config, seed=3), config=config)
    assert distance(perm, other) <= tol < 1.2 < distance(perm, base)


def test_config_read_from_directory_matches_explicit_config(arch, tmp_path):
    model = ARCHS[arch["name"]]()
    model.save_pretrained(str(tmp_path / "m"))
    fp_dir = fast_fingerprint(tmp_path / "m")
    assert fp_dir.metadata["head_dim_source"] in ("config", "q_norm")
    assert distance(fp_dir, arch["fp"]) <= _tolerance(arch["config"])


def test_anchor_ids_are_stable_and_seeded():
    a = anchor_ids(49152, 0, 1)
    assert np.array_equal(a, anchor_ids(49152 + 1000, 0, 1))  # an extended vocabulary keeps its anchors
    assert not np.array_equal(a, anchor_ids(49152, 1, 1))
    assert len(set(a.tolist())) == len(a) and a.min() >= 256 and a.max() < 32768
    small = anchor_ids(640, 0, 1)
    assert small.min() >= 64 and small.max() < 512


def test_fixed_length_and_registry():
    from lineage_models import tiny_llama

    a = fast_fingerprint(tiny_llama(seed=0, hidden=64, layers=4))
    b = fast_fingerprint(tiny_llama(seed=0, hidden=96, layers=7, vocab=700))
    assert a.profile == profiles.DEFAULT == "invariant"
    assert a.names == b.names == feature_names()
    assert 1.2 < distance(a, b) < 1.6
    for name in ("invariant", "full", "tensorguard"):
        spec = profiles.get(name)
        assert spec.name == name and callable(spec.features)
    with pytest.raises(ValueError, match="unknown profile"):
        profiles.get("nope")
