"""Derivatives of a model, for measuring whether a fingerprint keeps them with their family.

Each transform takes and returns a state dict (name -> tensor), float32, and never changes the input. Used by
bench/lineage_eval.py (the full zoo) and the tests (a small zoo). Randomness is seeded, so a zoo is reproducible.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Dict, List

import torch

State = Dict[str, torch.Tensor]


def _is_matrix(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.is_floating_point()


def random_init(config_dir, seed: int) -> State:
    """Weights of a fresh model of the same config (the library's own initialiser), seeded: a new family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return state_of(model)


def state_of(model) -> State:
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def add_noise(state: State, relative: float = 1e-3, seed: int = 0) -> State:
    """w + relative * std(W) * N(0, 1) on every floating tensor."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.numel() > 1:
            out[k] = v + relative * v.std() * torch.randn(v.shape, generator=gen)
        else:
            out[k] = v.clone()
    return out


def magnitude_prune(state: State, fraction: float) -> State:
    """Zero the `fraction` smallest-magnitude entries of every 2-D tensor (per tensor, unstructured)."""
    out = {}
    for k, v in state.items():
        if _is_matrix(k, v) and fraction > 0:
            flat = v.abs().flatten()
            kth = max(1, int(fraction * flat.numel()))
            cut = flat.kthvalue(kth).values
            out[k] = torch.where(v.abs() <= cut, torch.zeros_like(v), v)
        else:
            out[k] = v.clone()
    return out


def quantize_roundtrip(state: State, bits: int, group: int = 64) -> State:
    """Symmetric absmax quantisation and back: int8 per row (bits=8), int4 per group of `group` inputs (bits=4),
    the schemes of LLM.int8-style and GPTQ/llama.cpp-style checkpoints without their error correction."""
    levels = 2 ** (bits - 1) - 1
    out = {}
    for k, v in state.items():
        if not _is_matrix(k, v):
            out[k] = v.clone()
            continue
        if bits >= 8 or v.shape[1] % group:
            scale = v.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
            out[k] = (v / scale).round().clamp(-levels, levels) * scale
        else:
            g = v.reshape(v.shape[0], -1, group)
            scale = g.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / levels
            out[k] = ((g / scale).round().clamp(-levels - 1, levels) * scale).reshape(v.shape)
    return out


def extend_vocab(state: State, extra: int = 1000, seed: int = 0) -> State:
    """Append `extra` token rows to every vocabulary matrix (embed, untied lm_head), drawn around the mean row as
    `resize_token_embeddings` does."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if _is_matrix(k, v) and ("embed_tokens" in k or "lm_head" in k):
            mean = v.mean(0, keepdim=True)
            std = v.std(0, keepdim=True)
            out[k] = torch.cat([v, mean + 0.1 * std * torch.randn((extra, v.shape[1]), generator=gen)])
        else:
            out[k] = v.clone()
    return out


def merge(a: State, b: State, weight: float = 0.5) -> State:
    """Linear merge (model soup) of two same-shape siblings."""
    return {k: (weight * a[k] + (1 - weight) * b[k]) if a[k].is_floating_point() else a[k].clone() for k in a}


def relative_change(before: State, after: State) -> float:
    """Mean over 2-D tensors of ||after - before|| / ||before|| (how far a fine-tune moved the weights)."""
    vals = [float((after[k] - before[k]).norm() / before[k].norm().clamp_min(1e-12))
            for k in before if before[k].dim() == 2 and k in after and after[k].shape == before[k].shape]
    return sum(vals) / max(len(vals), 1)


def fanoutqa_texts(limit: int = 400) -> List[str]:
    """Question/answer lines from the fanoutqa dev set (the package's JSON file; the package's import needs extras)."""
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fanoutqa is not installed (pip install --no-deps fanoutqa)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "fanout-final-dev.json"
    texts = []
    for item in json.loads(path.read_text()):
        texts.append(f"Question: {item['question']}")
        for sub in item.get("decomposition", []):
            answer = sub.get("answer")
            answer = ", ".join(map(str, answer)) if isinstance(answer, list) else str(answer)
            texts.append(f"Question: {sub['question']}\nAnswer: {answer}")
        if len(texts) >= limit:
            break
    return texts[:limit]


def finetune(model, tokenizer, texts: List[str], steps: int, lr: float, batch: int = 4, seq: int = 64,
             lora_rank: int = 0, seed: int = 0):
    """Causal-LM training on `texts` (AdamW). lora_rank > 0: a PEFT LoRA adapter on q/k/v/o (returned unmerged, so
    it can be saved as an adapter directory); else every parameter is trained. Returns the trained model."""
    torch.manual_seed(seed)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "o_proj"], lora_dropout=0.0)
        model = get_peft_model(model, cfg)
        # PEFT initialises B = 0; training moves it.
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for step in range(steps):
        chunk = [texts[(step * batch + i) % len(texts)] for i in range(batch)]
        enc = tokenizer(chunk, return_tensors="pt", padding="max_length", truncation=True, max_length=seq)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def save(state: State, config_dir, out_dir) -> Path:
    """A loadable model directory: model.safetensors + the config (and tokenizer files) of `config_dir`."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    for name in os.listdir(config_dir):
        if name.endswith(".json") and name != "model.safetensors.index.json" or name.endswith(".jinja"):
            shutil.copy(Path(config_dir) / name, out / name)
    return out


# ----------------------------------------------------------------------------- function-preserving obfuscations
# Each takes the state and the model's transformers config, returns a state whose model computes the same logits
# (check_function_preserving verifies it), and never changes the input. Conventions of Llama-style (SmolLM2) and
# Gemma-3 checkpoints: Gemma's RMSNorm multiplies by (1 + w), its post-attention/post-feed-forward norms act on the
# block outputs, and it has per-head q_norm/k_norm.

def _arch(config):
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    gemma = str(config.model_type).startswith("gemma")
    return heads, kv, head_dim, gemma


def _layer_keys(state: State):
    layers = sorted({int(k.split("layers.")[1].split(".")[0]) for k in state if "layers." in k})
    return [(i, f"model.layers.{i}.") for i in layers]


def permute_residual(state: State, config, seed: int = 0) -> State:
    """One permutation of the residual stream applied to every matrix and norm that touches it: embedding (and
    untied lm_head) columns, every residual-width norm weight, q/k/v/gate/up input columns, o/down output rows."""
    d = config.hidden_size
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif v.dim() == 1 and v.shape[0] == d and "norm" in k and "q_norm" not in k and "k_norm" not in k:
            out[k] = v[perm].clone()
        elif v.dim() == 2 and any(s in k for s in ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj",
                                                   "gate_proj", "up_proj")):
            out[k] = v[:, perm].clone()
        elif v.dim() == 2 and any(s in k for s in ("o_proj", "down_proj")):
            out[k] = v[perm, :].clone()
        else:
            out[k] = v.clone()
    return out


def permute_neurons(state: State, config, seed: int = 0) -> State:
    """A permutation of each layer's MLP neurons: gate/up rows and down columns."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in state.items()}
    for _, p in _layer_keys(state):
        n = state[p + "mlp.up_proj.weight"].shape[0]
        perm = torch.randperm(n, generator=gen)
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            out[p + name] = state[p + name][perm].clone()
        out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, perm].clone()
    return out


def permute_heads(state: State, config, seed: int = 0) -> State:
    """A permutation of the query heads within each key/value group (q rows and o columns, head blocks), and of
    the key/value groups themselves (k/v rows, with their q heads and o columns)."""
    heads, kv, hd, _ = _arch(config)
    r = heads // kv
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in state.items()}
    for _, p in _layer_keys(state):
        groups = torch.randperm(kv, generator=gen)
        order = torch.cat([g * r + torch.randperm(r, generator=gen) for g in groups.tolist()])  # q head order
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in order.tolist()])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups.tolist()])
        out[p + "self_attn.q_proj.weight"] = state[p + "self_attn.q_proj.weight"][q_rows].clone()
        out[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q_rows].clone()
        for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            out[p + name] = state[p + name][kv_rows].clone()
    return out


def rescale(state: State, config, seed: int = 0, spread: float = 2.0) -> State:
    """Rescalings that cancel, with factors c drawn log-uniformly in [1/spread, spread]:
    - each pre-norm's weight x c per channel, the matrices that read it (q/k/v after the attention norm, gate/up after
      the MLP norm) / c on those input columns (Gemma: (1 + w) x c);
    - MLP: up rows x c, down columns / c (per neuron);
    - attention: v rows x c, o columns / c (per value dimension, for every q head that reads it); for models without
      q_norm, q rows x c and k rows / c per rotary pair (c shared by dimensions i and i + head_dim / 2)."""
    heads, kv, hd, gemma = _arch(config)
    r = heads // kv
    gen = torch.Generator().manual_seed(seed)

    def factors(n):
        return torch.exp((torch.rand(n, generator=gen) * 2 - 1) * torch.log(torch.tensor(spread)))

    out = {k: v.clone() for k, v in state.items()}
    off = 1.0 if gemma else 0.0
    for _, p in _layer_keys(state):
        mlp_norm = p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")
        for norm, consumers in ((p + "input_layernorm.weight", ("self_attn.q_proj", "self_attn.k_proj",
                                                                "self_attn.v_proj")),
                                (mlp_norm, ("mlp.gate_proj", "mlp.up_proj"))):
            c = factors(state[norm].shape[0])
            out[norm] = (state[norm] + off) * c - off
            for m in consumers:
                out[p + m + ".weight"] = state[p + m + ".weight"] / c
        c = factors(state[p + "mlp.up_proj.weight"].shape[0])
        out[p + "mlp.up_proj.weight"] = out[p + "mlp.up_proj.weight"] * c[:, None]
        out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"] / c
        c = factors(kv * hd)
        out[p + "self_attn.v_proj.weight"] = out[p + "self_attn.v_proj.weight"] * c[:, None]
        c_o = c.view(kv, 1, hd).expand(kv, r, hd).reshape(-1)
        out[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"] / c_o
        if p + "self_attn.q_norm.weight" not in state:
            half = factors(kv * hd // 2).view(kv, 1, hd // 2)
            ck = torch.cat([half, half], dim=2).reshape(-1)  # rotate_half pairs i and i + hd/2
            cq = torch.cat([half, half], dim=2).expand(kv, r, hd).reshape(-1)
            out[p + "self_attn.q_proj.weight"] = out[p + "self_attn.q_proj.weight"] * cq[:, None]
            out[p + "self_attn.k_proj.weight"] = out[p + "self_attn.k_proj.weight"] / ck[:, None]
    return out


OBFUSCATIONS = {"perm-residual": permute_residual, "perm-neurons": permute_neurons, "perm-heads": permute_heads,
                "rescale": rescale}


def obfuscate_all(state: State, config, seed: int = 0) -> State:
    """Every obfuscation above, one after the other."""
    for i, fn in enumerate(OBFUSCATIONS.values()):
        state = fn(state, config, seed=seed + i)
    return state


class FunctionChecker:
    """Logits of states of one architecture on fixed random tokens, in float64, from one model instance (the states
    are copied into it). Float64 everywhere except where transformers computes in float32 on purpose (RMSNorm casts
    to float32): measured differences of permuted/rescaled copies are ~1e-7 of the logits, so FUNCTION_TOLERANCE
    (1e-4 absolute) cannot be tripped by rounding, while any real change of the function moves logits by far more."""

    def __init__(self, config, seed: int = 0, batch: int = 2, length: int = 12):
        from transformers import AutoModelForCausalLM

        self.config = config
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
        self.tokens = torch.randint(0, config.vocab_size, (batch, length),
                                    generator=torch.Generator().manual_seed(seed))

    def logits(self, state: State) -> torch.Tensor:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if getattr(self.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        with torch.no_grad():
            return self.model(self.tokens).logits.clone()


# transformers' RMSNorm runs in float32 even in a float64 model, so a permuted copy differs by ~1e-7 of the logits'
# size (measured: 5e-7 absolute on random-init SmolLM2, up to 1.0e-4 absolute on Gemma-3-270M, whose logits are
# far larger than a random init's).
# The tolerance is 1e-4 of max(1, the largest |logit|), well above those, while a real change of the function moves
# the logits by more (tests/test_invariant.py: 1e-3 relative noise on a tiny model's weights fails the check).
FUNCTION_TOLERANCE = 1e-4


def _checked_difference(checker: "FunctionChecker", changed: State, reference: torch.Tensor, what: str) -> float:
    """Max |logit difference| of `changed` from the `reference` logits; AssertionError beyond FUNCTION_TOLERANCE
    times max(1, the largest |reference logit|)."""
    diff = float((checker.logits(changed) - reference).abs().max())
    assert diff <= FUNCTION_TOLERANCE * max(1.0, float(reference.abs().max())), \
        f"{what}not function-preserving: logits differ by {diff:.3g}"
    return diff


def check_function_preserving(original: State, changed: State, config, checker: "FunctionChecker" = None) -> float:
    """Max |logit difference| of the two states' models on random tokens; AssertionError beyond FUNCTION_TOLERANCE
    times max(1, the largest |logit| of `original`)."""
    checker = checker or FunctionChecker(config)
    return _checked_difference(checker, changed, checker.logits(original), "")


def obfuscate(state: State, config, name: str, seed: int = 0, checker: "FunctionChecker" = None,
              reference: torch.Tensor = None):
    """(obfuscated state, max logit difference): `name` is a key of OBFUSCATIONS or "obf-all"; the result is
    asserted to compute the same logits as `state` before it is returned (`reference`: checker.logits(state), when
    the caller has it already)."""
    fn = obfuscate_all if name == "obf-all" else OBFUSCATIONS[name]
    out = fn(state, config, seed=seed)
    if reference is None:
        return out, check_function_preserving(state, out, config, checker)
    return out, _checked_difference(checker, out, reference, f"{name}: ")
