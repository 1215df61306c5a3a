"""Shared-prefix forward: run a token prefix that many samples share once, and each sample's remainder on its keys
and values.

A chat template puts the same ~25 tokens (system prompt, role markers) before every question; an instruction set
repeats its preamble. In a causal model the keys, values and hidden states at those positions depend on those
tokens alone, so they are the same for every sample that starts with them. Running them once and feeding the rest
of each sample with the cached keys/values, positions continued from the prefix length and a mask that opens the
prefix to every row, gives each sample the hidden states of its own full forward (to float rounding: the matrix
shapes differ).

`PrefixCache` keeps the prefixes it has run (keys/values per layer, hidden states) for one model, so a scan that
holds one across its batches runs the chat template once for the whole dataset. A cached prefix also serves any
shorter prefix of it (causality: the first m positions' keys/values depend on the first m tokens only).

Only what we can show equal is shared: model types whose attention we test (`SUPPORTED`), sdpa/eager attention,
and a sliding window (Gemma-3, Mistral) that no sample crosses. Anything else runs the full forward, logged once.
"""
from __future__ import annotations

import collections
import inspect
import logging
import re
import weakref
from typing import Callable, List, Optional, Tuple

import torch

log = logging.getLogger(__name__)

# Model types whose cached-prefix forward the parity tests check (tests/test_prefix.py).
SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"})
# Below this many shared tokens a separate prefix call costs about what it saves.
MIN_PREFIX_TOKENS = 8
_logged = set()


class _Entry:
    """One prefix run: its token ids, hidden states (1, P, d), and per-layer keys/values (1, heads, P, head_dim)."""

    def __init__(self, ids: Tuple[int, ...], hidden: torch.Tensor, kv: List[Tuple[torch.Tensor, torch.Tensor]]):
        self.ids, self.hidden, self.kv = ids, hidden, kv

    def cut(self, m: int) -> "_Entry":
        return _Entry(self.ids[:m], self.hidden[:, :m], [(k[:, :, :m], v[:, :, :m]) for k, v in self.kv])


class PrefixCache:
    """Prefixes already run through one model, reused by later batches. Belongs to one model and to its weights as
    they are: changed weights (in place, or moved to another dtype/device) empty it.

    tokens_run: tokens the forward passes that used this cache computed (padding included);
    tokens_reused: prefix tokens taken from the cache instead of being computed again."""

    def __init__(self, model, max_entries: int = 16):
        self._model = weakref.ref(model)
        self.max_entries = max_entries
        self.entries: "collections.OrderedDict[Tuple[int, ...], _Entry]" = collections.OrderedDict()
        self._weights = _weights_state(model)
        self._last_row: Tuple[int, ...] = ()
        self.tokens_run = 0
        self.tokens_reused = 0

    def capture_rows(self, capture: Callable, model, ids: torch.Tensor, lengths: List[int]) -> Optional[torch.Tensor]:
        """Hidden states (g, w, d) entering the output embedding for right-padded rows `ids` (g, w) of real lengths
        `lengths`, from the shared prefix and each row's remainder; None when the prefix cannot be shared here (the
        caller then runs the full forward). `capture(model, ids, mask, position_ids=, cache=)` is the stopped
        forward."""
        if self._model() is not model:
            raise ValueError("this PrefixCache belongs to another model; make one per model: PrefixCache(model)")
        reason = unshareable(model, max(lengths))
        if reason:
            _log_once(model, reason)
            return None
        self._drop_if_weights_changed(model)
        g, width = ids.shape
        target = self._target_length(ids, lengths)
        if target < MIN_PREFIX_TOKENS:
            return None
        entry = self._entry_for(capture, model, tuple(ids[0, :target].tolist()))
        remainder = ids[:, target:]
        mask = torch.arange(width, device=ids.device).unsqueeze(0) < torch.tensor(lengths, device=ids.device)[:, None]
        positions = torch.arange(target, width, device=ids.device).unsqueeze(0).expand(g, -1)
        cache = _cache_from(model, entry, g)
        tail = capture(model, remainder, mask.long(), position_ids=positions, cache=cache)
        self.tokens_run += g * (width - target)
        self.tokens_reused += g * target
        return torch.cat([entry.hidden.expand(g, -1, -1), tail], dim=1)

    def _target_length(self, ids: torch.Tensor, lengths: List[int]) -> int:
        """How many leading tokens to take from a prefix run: those every row shares (one row: those it shares with
        the last row seen, so a batch-size-1 scan still finds the template), leaving each row >= 1 token."""
        g, width = ids.shape
        first = ids[0]
        if g > 1:
            same = (ids == first).all(0)
        else:
            last = torch.tensor(self._last_row[:width], dtype=ids.dtype, device=ids.device)
            same = torch.zeros(width, dtype=torch.bool, device=ids.device)
            same[:last.numel()] = first[:last.numel()] == last
        self._last_row = tuple(first[:lengths[0]].tolist())
        differ = (~same).nonzero()
        common = int(differ[0, 0]) if differ.numel() else width
        return min(common, min(lengths) - 1)

    def _entry_for(self, capture: Callable, model, ids: Tuple[int, ...]) -> _Entry:
        """The run of prefix `ids`: from the cache, cut from a longer cached run, or extended from the longest
        cached run that starts it."""
        best, best_m = None, 0
        for entry in self.entries.values():
            m = _common_length(entry.ids, ids)
            if m > best_m:
                best, best_m = entry, m
        if best is not None:
            self.entries.move_to_end(best.ids)
        if best_m == len(ids):
            return best if len(best.ids) == best_m else best.cut(best_m)
        base = best.cut(best_m) if best is not None else None
        entry = self._run_prefix(capture, model, ids, base)
        self.entries[ids] = entry
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry

    def _run_prefix(self, capture: Callable, model, ids: Tuple[int, ...], base: Optional[_Entry]) -> _Entry:
        m = 0 if base is None else len(base.ids)
        device = next(model.parameters()).device
        new = torch.tensor([ids[m:]], device=device)
        mask = torch.ones(1, len(ids), dtype=torch.long, device=device)
        positions = torch.arange(m, len(ids), device=device).unsqueeze(0)
        cache = _cache_from(model, base, 1) if base is not None else _new_cache(model)
        hidden = capture(model, new, mask, position_ids=positions, cache=cache)
        self.tokens_run += len(ids) - m
        if base is not None:
            hidden = torch.cat([base.hidden, hidden], dim=1)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        if any(k.shape[-2] != len(ids) for k, _ in kv):   # a layer dropped keys: not the prefix we asked for
            raise RuntimeError(f"{type(model).__name__}: the cache kept {[k.shape[-2] for k, _ in kv]} positions "
                               f"of a {len(ids)}-token prefix")
        return _Entry(ids, hidden, kv)

    def _drop_if_weights_changed(self, model) -> None:
        state = _weights_state(model)
        if state != self._weights:
            self.entries.clear()
            self._weights = state


_caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cache_for(model) -> PrefixCache:
    """The PrefixCache of `model` in this process (made on first use, dropped with the model): lets a scan reuse a
    prefix across batches without holding an object of its own."""
    cache = _caches.get(model)
    if cache is None:
        cache = _caches[model] = PrefixCache(model)
    return cache


def unshareable(model, max_length: int) -> Optional[str]:
    """Why a cached prefix might not reproduce `model`'s full forward for rows up to `max_length` tokens, or None."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} is not among those tested with a cached prefix ({', '.join(sorted(SUPPORTED))})"
    params = inspect.signature(model.forward).parameters
    if _cache_keyword(model) is None or "position_ids" not in params:
        return f"{type(model).__name__}.forward takes no cache or no position_ids"
    attn = getattr(config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return f"attention implementation {attn!r} (only sdpa and eager are tested)"
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        return "bidirectional attention"
    window = getattr(config, "sliding_window", None)
    if window and max_length > window and _uses_sliding_window(config):
        return f"a sample of {max_length} tokens crosses the sliding window of {window}"
    return None


def _uses_sliding_window(config) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return "sliding_attention" in layer_types
    return getattr(config, "use_sliding_window", True)   # Mistral: every layer; Qwen2 says so with this flag


def _cache_keyword(model) -> Optional[str]:
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):   # transformers renamed past_key_values to cache
        if name in params:
            return name
    return None


def cache_keyword(model) -> str:
    name = _cache_keyword(model)
    if name is None:
        raise ValueError(f"{type(model).__name__}.forward takes no key/value cache")
    return name


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_from(model, entry: _Entry, batch: int):
    """A DynamicCache holding `entry`'s keys/values for `batch` rows. The stored prefix is expanded (a view); the
    cache copies it into its own (batch, heads, P, head_dim) tensors, a few MB against a forward pass."""
    from transformers import DynamicCache

    rows = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in entry.kv]
    return DynamicCache(rows, config=model.config)


def _common_length(a: Tuple[int, ...], b: Tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _weights_state(model) -> tuple:
    # Tensor._version moves with every in-place change (optimizer steps, load_state_dict); data_ptr/dtype with .to().
    return tuple((p._version, p.data_ptr(), p.dtype) for p in model.parameters())


def _log_once(model, reason: str) -> None:
    key = (type(model).__name__, re.sub(r"\d+", "N", reason))   # one line per kind, not per sample length
    if key not in _logged:
        _logged.add(key)
        log.warning("shared-prefix forward off for %s: %s; running the full forward", type(model).__name__, reason)
