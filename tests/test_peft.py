"""LoRA adapters and PeftModel objects give exactly the tensors of peft's own merge_and_unload, or are refused by name.

Tiny random Llama configs (no download): rank_pattern / alpha_pattern, rsLoRA, DoRA, LoRA on the embedding,
modules_to_save, as an in-memory PeftModel and as a saved adapter directory.
"""
import copy
import json

import numpy as np
import pytest
import torch

from tensorguard_fast import fast_fingerprint
from tensorguard_fast.lineage.loading import ModelLoadError, open_model

from lineage_models import save_tiny, tiny_llama

PATTERNS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                alpha_pattern={"down_proj": 3, "layers.2.self_attn.q_proj": 20})


def _peft(seed=0, **config):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=seed), LoraConfig(**config))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)  # a trained-looking adapter, not the zero init
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return model


def _merged(model):
    state = copy.deepcopy(model).merge_and_unload().state_dict()
    state.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    return state


def _assert_same(source, expected):
    assert sorted(source.keys()) == sorted(expected)
    for key in source.keys():
        torch.testing.assert_close(source.get(key), expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("config", [
    PATTERNS,
    dict(PATTERNS, use_rslora=True),
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"], use_dora=True,
         rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 5}),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
], ids=["patterns", "rslora", "dora", "embedding+modules_to_save"])
def test_peft_model_object_is_merged_exactly(config):
    model = _peft(**config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _assert_same(open_model(model), _merged(model))
    for k, v in model.state_dict().items():  # the caller's model is left as it was
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("config", [
    PATTERNS,
    dict(PATTERNS, use_rslora=True),
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "gate_proj"], use_dora=True,
         rank_pattern={"o_proj": 2}, alpha_pattern={"gate_proj": 5}),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
], ids=["patterns", "rslora", "dora", "embedding+modules_to_save"])
def test_adapter_directory_is_merged_exactly(tmp_path, config):
    model = _peft(**config)
    base = save_tiny(tmp_path / "base", seed=0)
    model.save_pretrained(str(tmp_path / "adapter"))
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg))
    expected = _merged(model)
    source = open_model(tmp_path / "adapter")
    for key in source.keys():
        torch.testing.assert_close(source.get(key), expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_fingerprint_of_a_peft_model_is_the_merged_one():
    model = _peft(**PATTERNS)
    merged = copy.deepcopy(model).merge_and_unload()
    a = fast_fingerprint(model, profile="full")
    b = fast_fingerprint(merged, profile="full")
    np.testing.assert_allclose(a.vector, b.vector, rtol=0, atol=1e-6)
    base = fast_fingerprint(tiny_llama(seed=0), profile="full")
    assert np.abs(a.vector - base.vector).max() > 1e-3  # the adapter is not dropped


def test_other_peft_types_and_options_are_refused_by_name(tmp_path):
    from peft import IA3Config, get_peft_model

    ia3 = get_peft_model(tiny_llama(seed=0), IA3Config(target_modules=["k_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"]))
    with pytest.raises(ModelLoadError, match="IA3"):
        open_model(ia3)
    model = _peft(r=4, lora_alpha=8, target_modules=["q_proj"])
    base = save_tiny(tmp_path / "base", seed=0)
    model.save_pretrained(str(tmp_path / "adapter"))
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(base_model_name_or_path=str(base), lora_bias=True)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="adapter_config.json.*lora_bias"):
        open_model(tmp_path / "adapter")
    cfg.update(lora_bias=False, peft_type="LOHA")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="LOHA"):
        open_model(tmp_path / "adapter")
