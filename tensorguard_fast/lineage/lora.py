"""LoRA merged exactly as peft's `merge_and_unload` does, or refused by name; never silently approximated.

Two inputs:
- an adapter directory (adapter_config.json + adapter_model.safetensors) on a base `WeightSource`:
  `LoraMergedSource` merges each adapted tensor when it is read. Per-module rank and alpha come from `rank_pattern` /
  `alpha_pattern` (peft's own pattern matcher), rsLoRA scales by alpha / sqrt(r), DoRA rescales rows by the stored
  magnitude, embedding adapters add (B A)^T; the delta is cast to the adapter's dtype and added in place, as peft does.
- a PeftModel (or any model with peft tuner layers) passed as an nn.Module: `merged_peft_state` copies one adapted
  layer at a time and runs peft's own `merge` on the copy, so the caller's model is left untouched and memory stays
  at one extra layer.
Anything else (other PEFT types, lora_bias, layer_replication, LoRA on raw parameters, unknown adapter tensors, DoRA
on embeddings or with fan_in_fan_out) is refused with its name.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .sources import ModelLoadError, SafetensorsSource, WeightSource, first_line

# adapter_config keys that change what a merge means; set, they are refused (peft variants we do not reproduce)
_REFUSED_OPTIONS = ("lora_bias", "layer_replication", "target_parameters", "alora_invocation_tokens", "use_qalora",
                    "arrow_config", "use_bdlora", "kasa_config", "velora_config", "monteclora_config",
                    "trainable_token_indices")
_PREFIX = "base_model.model."


def _pattern_value(patterns: dict, module: str, default):
    """The value peft uses for `module` under rank_pattern / alpha_pattern (its own matcher when available)."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not a readable adapter config ({type(exc).__name__}: {first_line(exc)})") \
            from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: not a PEFT adapter config (a JSON object was expected)")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ModelLoadError(f"{path}: PEFT type {peft_type} is not supported (LoRA only); merge it with "
                             f"merge_and_unload() and save the result")
    for option in _REFUSED_OPTIONS:
        if config.get(option):
            raise ModelLoadError(f"{path}: the LoRA option {option}={config[option]!r} is not supported; merge with "
                                 f"peft's merge_and_unload() and save the merged model instead")
    return config


class LoraMergedSource(WeightSource):
    """A base model with a PEFT LoRA adapter directory merged tensor by tensor, as `merge_and_unload` computes it."""

    def __init__(self, base: WeightSource, adapter_dir: Path, config: dict, name: str):
        self.base = base
        self.name = name
        self.path = str(adapter_dir)
        self.tied_embeddings = base.tied_embeddings
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.exists():
            raise ModelLoadError(f"{adapter_dir}: adapter_config.json found but no adapter_model.safetensors "
                                 f"(a pickled adapter_model.bin is not read)")
        self._files = [weights, adapter_dir / "adapter_config.json"]
        adapter = SafetensorsSource([weights], name, str(weights))
        state = {k: adapter.get(k) for k in adapter.keys()}
        self.config = config
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self.dora = bool(config.get("use_dora", False))
        self.pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor, float, bool]] = {}  # target -> (A, B, scale, embed)
        self.magnitudes: Dict[str, torch.Tensor] = {}
        self.replaced: Dict[str, torch.Tensor] = {}
        base_keys = set(base.keys())
        for key, value in state.items():
            stem = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            for a_tag, b_tag, embed in ((".lora_A.weight", ".lora_B.weight", False),
                                        (".lora_embedding_A", ".lora_embedding_B", True)):
                if stem.endswith(a_tag):
                    module = stem[:-len(a_tag)]
                    b = state.get(key[:-len(a_tag)] + b_tag)
                    if b is None:
                        raise ModelLoadError(f"{weights}: {key} has no matching {b_tag.strip('.')} tensor")
                    self._add_pair(weights, module, value, b, embed, base_keys)
                    break
            else:
                if stem.endswith((".lora_B.weight", ".lora_embedding_B")):
                    continue
                if stem.endswith(".lora_magnitude_vector"):
                    self.magnitudes[stem[:-len(".lora_magnitude_vector")] + ".weight"] = value
                    continue
                # modules_to_save copies and saved embedding layers: full tensors that replace the base ones
                target = stem.replace(".modules_to_save.default", "").replace(".base_layer.", ".")
                if target not in base_keys or "lora_" in stem:
                    raise ModelLoadError(f"{weights}: adapter tensor {key!r} is of a kind not supported here "
                                         f"(it matches no base tensor {target!r}); merge with merge_and_unload()")
                self.replaced[target] = value
        for target in self.magnitudes:
            if target not in self.pairs:
                raise ModelLoadError(f"{weights}: DoRA magnitude for {target!r} has no LoRA pair")

    def _add_pair(self, weights: Path, module: str, a: torch.Tensor, b: torch.Tensor, embed: bool, base_keys) -> None:
        target = module + ".weight"
        if target not in base_keys:
            raise ModelLoadError(f"{weights}: adapter targets {target!r}, absent from base {self.base.describe()}")
        r = int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8)))
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", r)))
        if a.shape[0] != r:
            raise ModelLoadError(f"{weights}: {module} has rank {a.shape[0]} but adapter_config.json gives r={r}")
        if self.dora and (embed or self.fan_in_fan_out):
            raise ModelLoadError(f"{weights}: DoRA on {module} ({'an embedding' if embed else 'fan_in_fan_out'}) "
                                 f"is not supported; merge with merge_and_unload()")
        scale = alpha / (r ** 0.5) if self.config.get("use_rslora") else alpha / r
        self.pairs[target] = (a, b, scale, embed)

    def keys(self):
        return self.base.keys()

    def shape(self, key: str):
        return self.base.shape(key)

    def dtype(self, key: str) -> str:
        return self.base.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        w = self.replaced.get(key)
        w = self.base.get(key) if w is None else w
        if key not in self.pairs:
            return w
        a, b, scale, embed = self.pairs[key]
        # peft: B @ A in float32 on CPU for half types, times the scale, cast back to the adapter's dtype
        delta = ((b.float() @ a.float()) * scale).to(a.dtype)
        if embed or self.fan_in_fan_out:
            delta = delta.T
        merged = w.clone()
        if key not in self.magnitudes:
            merged += delta
            return merged
        norm = torch.linalg.norm(w + delta, dim=1).to(w.dtype)  # DoRA: row norms of the unmerged weight + delta
        factor = self.magnitudes[key] / norm
        return (factor.view(-1, 1) * (merged + delta)).to(w.dtype)

    def file_hashes(self) -> Dict[str, str]:
        from ..io.digest import file_digest

        hashes = {f"base/{k}": v for k, v in self.base.file_hashes().items()}
        hashes.update({f.name: file_digest(f) for f in self._files})
        return hashes


# ---------------------------------------------------------------------------------------------- PeftModel objects

def is_peft_module(model: torch.nn.Module) -> bool:
    """True for a PeftModel or any module holding peft tuner layers (inject_adapter_in_model)."""
    import sys

    if "peft" not in sys.modules:
        return False  # peft was never imported, so no tuner layer can exist
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules())


def _direct_state(module: torch.nn.Module, prefix: str, out: Dict[str, torch.Tensor]) -> None:
    for name, p in module._parameters.items():
        if p is not None:
            out[prefix + name] = p.detach()
    for name, buf in module._buffers.items():
        if buf is not None and name not in module._non_persistent_buffers_set:
            out[prefix + name] = buf.detach()


def merged_peft_state(model: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], torch.nn.Module]:
    """(state dict of `model` merged as merge_and_unload would give it, the underlying base model)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    name = type(model).__name__
    for adapter, cfg in (getattr(model, "peft_config", None) or {}).items():
        kind = str(getattr(cfg, "peft_type", "LORA")).split(".")[-1].upper()
        if kind != "LORA":
            raise ModelLoadError(f"{name}: adapter {adapter!r} is {kind}, not LoRA; call merge_and_unload() and "
                                 f"fingerprint the merged model")
        for option in _REFUSED_OPTIONS:
            if getattr(cfg, option, None):
                raise ModelLoadError(f"{name}: adapter {adapter!r} sets {option}; call merge_and_unload() and "
                                     f"fingerprint the merged model")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state: Dict[str, torch.Tensor] = {}
    done: Optional[str] = None
    for path, module in base.named_modules():
        if done is not None and (path + ".").startswith(done):
            continue  # inside a layer already merged
        prefix = f"{path}." if path else ""
        if hasattr(module, "unload_and_optionally_merge_module"):
            merged = copy.deepcopy(module).unload_and_optionally_merge_module(merge=True, safe_merge=False,
                                                                              adapter_names=None)
        elif isinstance(module, LoraLayer):
            layer = copy.deepcopy(module)
            layer.merge()  # peft's own merge (DoRA, rank/alpha patterns included), on a copy of this layer only
            merged = layer.get_base_layer()
        elif isinstance(module, BaseTunerLayer):
            raise ModelLoadError(f"{name}: layer {path} is a {type(module).__name__}, not LoRA; call "
                                 f"merge_and_unload() and fingerprint the merged model")
        else:
            _direct_state(module, prefix, state)
            continue
        state.update({prefix + k: v.detach() for k, v in merged.state_dict().items()})
        done = prefix
    return state, base
