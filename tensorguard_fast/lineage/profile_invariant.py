"""The "invariant" fingerprint (the default): features that a function-preserving reparametrisation cannot move.

What an obfuscator can do without changing the model's outputs, and why each leaves these features unchanged:
- permute the residual stream (every matrix's residual-side axis, every norm weight and the embedding columns, all
  with one permutation P): every feature below contracts the residual axis between two residual-side quantities
  (x P)(y P)^T = x y^T, so P cancels. The same holds for any orthogonal R once the norm weights are folded into the
  matrices that read them.
- permute MLP neurons (gate/up rows with down columns): the MLP's output on the anchors, down(act(gate a) * up a),
  is computed in full, so the neuron axis is summed over.
- permute attention heads within a KV group (q rows with o columns), or whole KV groups with their q heads: the
  query-key block sums the score matrices over all heads, the value-output block is the attention output itself.
- rescale between a norm and its consumers (norm weight x c, the columns of q/k/v or gate/up / c, c per channel):
  the anchors are multiplied by the effective norm weight before each matrix, so only diag(g) W^T enters.
- rescale inside a block (up rows x c with down columns / c; v rows x c with o columns / c; q x c with k / c per
  dimension): products across the rescaled axis (up..down, v..o, q.k) are what is kept.
- any global scale of a block: each block is scaled to unit RMS.

The anchor is the vocabulary, which cannot move without changing the tokenizer: ANCHORS token ids drawn by the seed
(below 32768 and above the first special/byte tokens, inside any real vocabulary, the same ids for an extended
vocabulary), their embedding rows RMS-normalised (the input every pre-norm layer sees up to its norm weight). The
first QUERIES of them are pushed through every layer's matrices; the outputs are read against the other KEYS, in the
residual space, which costs no further weight read. Per layer, with a = x^ * g (g the effective weight of the norm
before the matrix; Gemma's norms use 1 + w):
- attn_qk: sum over heads of Q_h K_h^T, queries against keys (q_norm/k_norm applied per head when present, the
  keys then pushed through the small key matrix; else computed as (Q_sum W_k) a_keys^T); no rotary embedding (every
  anchor at position 0, where it is the identity);
- attn_vo: each query's attention output when it attends to itself (V expanded to the q heads, through W_o; Gemma's
  post-attention norm applied), against the keys;
- mlp: the MLP output (act(a W_gate^T) * a W_up^T) W_down^T (post-feed-forward norm applied), against the keys;
and for the vocabulary: embed (queries against keys: the embedding's own geometry) and lm_head (final-norm queries
against KEYS other token rows of the output matrix: logits at fixed tokens).
Each QUERIES x KEYS block is double-centred (row and column means removed, so a token's overall scale, which
unrelated models trained on the same text may share, does not count), scaled to unit RMS per layer, averaged over
the layers of each depth quarter and scaled to unit RMS again. Unrelated models give unrelated blocks (distance ~
sqrt 2); a derivative moves each block by about its relative weight change.

Cost: every matrix is read once, as W a^T with a = QUERIES rows (BLAS streams W once: measured as fast as a
mat-vec on this CPU); of the embedding and lm_head only ANCHORS + KEYS rows are read.

Not invariant to (documented in docs/lineage.md): a permuted or re-trained vocabulary (a new tokenizer), biases
(ignored), per-layer changes that are not function-preserving (layer removal, distillation), and anything that
changes the architecture's roles (fused qkv matrices are not recognised: that role is then a zero block).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .loading import ModelLoadError, WeightSource
from .profile_full import _LAYER, role_of

QUERIES = 4      # anchors pushed through every matrix (the cost: QUERIES multiply-adds per weight)
KEYS = 64        # anchors the outputs are read against (in the residual space: no weight is read for them)
ANCHORS = QUERIES + KEYS
DEPTH_BINS = 4
BLOCKS = ["embed"] + ["attn_qk", "attn_vo", "mlp"] + ["lm_head"]
LAYER_BLOCKS = ["attn_qk", "attn_vo", "mlp"]
_NORMS = [  # (role, needles), first match wins; "post_attention_layernorm" is decided by the architecture
    ("q_norm", ("q_norm", "attn_q_norm", "query_layernorm")),
    ("k_norm", ("k_norm", "attn_k_norm", "key_layernorm")),
    ("attn_in", ("input_layernorm", "attn_norm", "ln_1", "attention_norm")),
    ("mlp_in", ("pre_feedforward_layernorm", "ffn_norm", "ln_2")),
    ("mlp_out", ("post_feedforward_layernorm", "post_ffw_norm")),
    ("post_attention", ("post_attention_layernorm", "post_attention_norm")),
    ("final", ("model.norm.", "output_norm", "ln_f", "final_layernorm", "norm.weight")),
]


def norm_role(key: str) -> Optional[str]:
    low = key.lower()
    for role, needles in _NORMS:
        if any(n in low for n in needles):
            return role
    return None


def feature_names() -> List[str]:
    pairs = [f"{i}_{j}" for i in range(QUERIES) for j in range(KEYS)]
    names = [f"embed.{p}" for p in pairs]
    for block in LAYER_BLOCKS:
        names += [f"{block}.d{b}.{p}" for b in range(DEPTH_BINS) for p in pairs]
    return names + [f"lm_head.{p}" for p in pairs]


def anchor_ids(vocab: int, seed: int, salt: int, count: int = ANCHORS) -> np.ndarray:
    """`count` distinct token ids below min(32768, the largest power of two <= vocab), above its first eighth up to
    256 (special and byte tokens); drawn by (seed, salt), so they do not depend on the exact vocabulary size. The
    first QUERIES are the queries, the rest the keys."""
    span = min(1 << (vocab.bit_length() - 1), 32768)
    lo = min(256, span // 8)
    if span - lo < count:
        raise ModelLoadError(f"vocabulary of {vocab} tokens is too small for {count} anchor tokens")
    rng = np.random.default_rng([seed, salt, 0x7E9])
    return rng.choice(np.arange(lo, span), size=count, replace=False)


def read_config(source: WeightSource, config=None) -> dict:
    """The model's config as a dict: `config` (a dict, a transformers config or a directory/file path), else the
    config.json beside the source's files; {} when there is none."""
    if config is not None:
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        elif not isinstance(config, dict):
            p = Path(config)
            config = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    elif source.path:
        p = Path(source.path)
        for cand in (p / "config.json", p.parent / "config.json"):
            if cand.is_file():
                try:
                    config = json.loads(cand.read_text())
                except (OSError, json.JSONDecodeError):
                    config = None
                break
    config = dict(config or {})
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    return config


def _apply(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a W^T for a few rows a, as (W a^T)^T: BLAS then streams W once, row by row (as fast as a mat-vec here; the
    a @ W.T form was measured ~1.8x slower on the CPU for 4 rows)."""
    return (w @ a.T).T.contiguous()


def _rmsnorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def _act(name: str):
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"):
        return lambda t: torch.nn.functional.gelu(t, approximate="tanh")
    if name in ("gelu", "gelu_python"):
        return torch.nn.functional.gelu
    if name == "relu":
        return torch.relu
    return torch.nn.functional.silu


def _centre(m: torch.Tensor) -> torch.Tensor:
    """Double centring of (..., k, k) blocks: row and column means removed."""
    m = m.to(torch.float64)
    return m - m.mean(-2, keepdim=True) - m.mean(-1, keepdim=True) + m.mean((-2, -1), keepdim=True)


def _blocks(v: torch.Tensor) -> torch.Tensor:
    """Rows of `v` (one flattened block each) scaled to unit RMS (an all-zero row stays zero)."""
    rms = torch.sqrt((v * v).mean(-1, keepdim=True))
    return torch.where(rms > 0, v / torch.where(rms > 0, rms, 1), v)


class _Counter:
    """Non-finite rows. With check=False (the first pass) nothing is looked at: the loader has already refused
    non-finite tensors unless allow_nonfinite, and a non-finite result sends us to a second, checking pass."""

    def __init__(self, check: bool):
        self.rows = 0
        self.check = check

    def clean(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Zero the non-finite lines of a product (a line along `dim` = one row of the weight that made it)."""
        if not self.check:
            return t
        bad = ~torch.isfinite(t)
        if bad.any():
            lines = bad.any(dim=dim)
            self.rows += int(lines.sum())
            t = torch.where(bad, torch.zeros((), dtype=t.dtype), t)
        return t


def invariant_features(source: WeightSource, seed: int = 0, device=torch.device("cpu"), config=None):
    """(names, values, metadata) of the invariant fingerprint for `source`."""
    names, values, meta = _features(source, seed, device, config, check=False)
    if not np.isfinite(values).all():  # a NaN/Inf weight got through (allow_nonfinite): again, zeroing its rows
        names, values, meta = _features(source, seed, device, config, check=True)
    return names, values.tolist(), meta


def _features(source: WeightSource, seed, device, config, check: bool):
    keys = list(source.keys())
    mats = {k: role_of(k) for k in keys if len(source.shape(k)) == 2}
    embed_keys = [k for k, r in mats.items() if r == "embed"]
    if not embed_keys:
        raise ModelLoadError(f"{source.describe()}: no token embedding found; the invariant profile is anchored on "
                             f"the vocabulary (use --profile full)")
    cfg = read_config(source, config)
    gemma_style = str(cfg.get("model_type", "")).startswith("gemma") or any("pre_feedforward_layernorm" in k
                                                                           for k in keys)
    offset = 1.0 if gemma_style else 0.0
    act_name = cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma_style
                                                                         else "silu")
    act = _act(str(act_name))
    counter = _Counter(check)
    fdev = dict(device=device, dtype=torch.float32)

    # --- vocabulary: anchor rows only (the loader has checked the whole tensor for NaN/Inf unless told not to)
    emb = source.get(embed_keys[0])
    vocab = emb.shape[0]
    ids = torch.from_numpy(anchor_ids(vocab, seed, 1))
    x = counter.clean(emb[ids].to(**fdev), dim=1)
    head_keys = [k for k, r in mats.items() if r == "lm_head"]
    tied = source.tied_embeddings or not head_keys
    out_w = emb if tied else source.get(head_keys[0])
    out_ids = torch.from_numpy(anchor_ids(vocab, seed, 2, KEYS))
    out_rows = counter.clean(out_w[out_ids].to(**fdev), dim=1)
    del emb, out_w
    xh = _rmsnorm(x)
    xq, xk = xh[:QUERIES], xh[QUERIES:]

    # --- group the rest by layer
    layers: Dict[int, Dict[str, str]] = {}
    final_norm = None
    for k in keys:
        m = _LAYER.search(k)
        role = mats.get(k) or (norm_role(k) if len(source.shape(k)) == 1 and k.endswith("weight") else None)
        if role in (None, "embed", "lm_head"):
            continue
        if m is None:
            if role == "final":
                final_norm = k
            continue
        if role == "post_attention":
            role = "attn_out" if gemma_style else "mlp_in"
        layers.setdefault(int(m.group(1)), {}).setdefault(role, k)
    num_layers = max(layers) + 1 if layers else 1

    def get(key):
        return source.get(key).to(**fdev)

    def norm_weight(layer, role):
        key = layer.get(role)
        return get(key) + offset if key else None

    def scaled(base, g):
        return base if g is None else base * g

    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // cfg["num_attention_heads"]
                                       if cfg.get("hidden_size") and cfg.get("num_attention_heads") else None)
    head_dim_source = "config" if head_dim else None
    raw: Dict[str, List[torch.Tensor]] = {b: [] for b in LAYER_BLOCKS}
    depths: Dict[str, List[int]] = {b: [] for b in LAYER_BLOCKS}
    for li, layer in sorted(layers.items()):
        depth = min(DEPTH_BINS - 1, li * DEPTH_BINS // num_layers)
        blocks = {}
        g_attn = norm_weight(layer, "attn_in")
        aq, ak = scaled(xq, g_attn), scaled(xk, g_attn)
        if "q_norm" in layer:
            dh, head_dim_source = int(source.shape(layer["q_norm"])[0]), "q_norm"
        elif head_dim:
            dh = head_dim
        else:  # no config: 64 when it divides the key/value width, else one head over that width
            kv_key = layer.get("attn_k") or layer.get("attn_v")
            kv = source.shape(kv_key)[0] if kv_key else 64
            dh, head_dim_source = (64 if kv % 64 == 0 else kv), "guessed"
        if all(r in layer for r in ("attn_q", "attn_k")):
            q = counter.clean(_apply(aq, get(layer["attn_q"])))
            if "q_norm" in layer:
                q = (_rmsnorm(q.view(QUERIES, -1, dh)) * norm_weight(layer, "q_norm")).reshape(q.shape)
            wk = get(layer["attn_k"])
            r = q.shape[1] // wk.shape[0]
            # sum over the q heads that share a key head: sum_h Q_h K_h^T
            qs = q.view(QUERIES, -1, r, dh).sum(2).reshape(QUERIES, -1) if r > 1 else q
            if "k_norm" in layer:  # keys through their per-head norm: KEYS rows through the (small) key matrix
                kk = counter.clean(_apply(ak, wk))
                kk = (_rmsnorm(kk.view(KEYS, -1, dh)) * norm_weight(layer, "k_norm")).reshape(kk.shape)
                blocks["attn_qk"] = qs @ kk.T
            else:  # linear keys: (Q W_k) A_keys^T, QUERIES multiply-adds per key weight
                blocks["attn_qk"] = counter.clean(qs @ wk, dim=1) @ ak.T
        if all(r in layer for r in ("attn_v", "attn_o")):
            v = counter.clean(_apply(aq, get(layer["attn_v"])))
            wo = get(layer["attn_o"])
            r = wo.shape[1] // v.shape[1]
            if r > 1:  # each q head's output is its key/value head's value
                v = v.view(QUERIES, -1, 1, dh).expand(QUERIES, v.shape[1] // dh, r, dh).reshape(QUERIES, -1)
            o = counter.clean(_apply(v, wo))
            g = norm_weight(layer, "attn_out")
            if g is not None:
                o = _rmsnorm(o) * g
            blocks["attn_vo"] = o @ xk.T
        if all(r in layer for r in ("mlp_up", "mlp_down")):
            a = scaled(xq, norm_weight(layer, "mlp_in"))
            u = counter.clean(_apply(a, get(layer["mlp_up"])))
            h = act(counter.clean(_apply(a, get(layer["mlp_gate"])))) * u if "mlp_gate" in layer else act(u)
            o = counter.clean(_apply(h, get(layer["mlp_down"])))
            g = norm_weight(layer, "mlp_out")
            if g is not None:
                o = _rmsnorm(o) * g
            blocks["mlp"] = o @ xk.T
        for name, m in blocks.items():
            raw[name].append(m)
            depths[name].append(depth)

    parts = [_blocks(_centre(xq @ xk.T).reshape(1, -1))[0]]
    counts = {}
    for name in LAYER_BLOCKS:
        # (layers, QUERIES * KEYS): centred and scaled per layer, all layers at once
        per_layer = _blocks(_centre(torch.stack(raw[name])).reshape(len(raw[name]), -1)) if raw[name] else None
        for d in range(DEPTH_BINS):
            sel = [i for i, dd in enumerate(depths[name]) if dd == d]
            counts[(name, d)] = len(sel)
            block = per_layer[sel].mean(0) if sel else torch.zeros(QUERIES * KEYS, dtype=torch.float64)
            parts.append(_blocks(block.reshape(1, -1))[0])
    g = get(final_norm) + offset if final_norm else None
    parts.append(_blocks(_centre(scaled(xq, g) @ out_rows.T).reshape(1, -1))[0])
    values = torch.cat(parts).numpy()
    meta = {"num_tensors": len(mats), "num_layers": num_layers, "nonfinite_rows": counter.rows,
            "anchors": ids.tolist(), "head_dim": head_dim, "head_dim_source": head_dim_source,
            "norm_offset": offset, "activation": str(act_name),
            "roles_missing": sorted({b for b in LAYER_BLOCKS if not any(counts.get((b, d)) for d in
                                                                        range(DEPTH_BINS))})}
    return feature_names(), values, meta
