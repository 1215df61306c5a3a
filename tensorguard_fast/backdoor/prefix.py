"""Shared-prefix forward: run a token prefix that many samples share once, and each sample's remainder on its keys
and values.

A chat template puts the same ~25 tokens (system prompt, role markers) before every question; an instruction set
repeats its preamble. In a causal model the keys, values and hidden states at those positions depend on those
tokens alone, so they are the same for every sample that starts with them. Running them once and feeding the rest
of each sample with the cached keys/values, positions continued from the prefix length and a mask that opens the
prefix to every row, gives each sample the hidden states of its own full forward (to float rounding: the matrix
shapes differ).

`PrefixCache` keeps the prefixes it has run (keys/values per layer, hidden states) for one model. Made for a
dataset (`for_dataset`, `PrefixCache.for_rows`) it runs the prefix every sample shares once and serves every batch
from it; without one, each batch shares what its own rows share. Either way a batch's hidden states depend on the
batch (and the dataset) alone, never on which batches came before, so a resumed scan computes the same bits:
prefixes are always run from scratch, and a shorter one is cut from the dataset's (causality: the first m
positions' keys/values depend on the first m tokens only).

Only what we can show equal is shared: model types whose attention we test (`SUPPORTED`), sdpa/eager attention,
and a sliding window (Gemma-3, Mistral) that no sample crosses. Anything else runs the full forward, logged once.
"""
from __future__ import annotations

import collections
import inspect
import logging
import os
import re
import weakref
from typing import Callable, List, Optional, Sequence, Tuple

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

    shared: the token prefix every row of the dataset starts with (`for_rows`); batches then take it (cut to leave
    each row a token). Without it, a batch of >= 2 rows shares what its rows share; a single row, nothing.
    tokens_run: tokens the forward passes that used this cache computed (padding included);
    tokens_reused: prefix tokens taken from a prefix run instead of being computed again."""

    def __init__(self, model, shared: Sequence[int] = (), max_entries: int = 16):
        self._model = weakref.ref(model)
        self.shared = tuple(int(t) for t in shared)
        self.max_entries = max_entries
        self.entries: "collections.OrderedDict[Tuple[int, ...], _Entry]" = collections.OrderedDict()
        self._weights = _weights_state(model)
        self.tokens_run = 0
        self.tokens_reused = 0

    @classmethod
    def for_rows(cls, model, rows: Sequence[Sequence[int]], **kw) -> "PrefixCache":
        """A cache whose shared prefix is the longest one all `rows` (token id lists) start with."""
        rows = [list(r) for r in rows]
        return cls(model, shared=os.path.commonprefix(rows) if rows else (), **kw)

    def batch_prefix(self, rows: Sequence[Sequence[int]]) -> Tuple[int, ...]:
        """The prefix a batch's rows (real token lists) take from a prefix run: the dataset's shared prefix when
        every row starts with it, else (>= 2 rows) the longest one they all share. The batch decides it alone."""
        if self.shared and len(self.shared) <= max(map(len, rows)):
            t = min(len(self.shared), min(map(len, rows)) - 1)
            if all(tuple(r[:t]) == self.shared[:t] for r in rows):
                return self.shared
        if len(rows) < 2:
            return ()
        return tuple(os.path.commonprefix([list(r) for r in rows]))

    def capture_rows(self, capture: Callable, model, ids: torch.Tensor, lengths: List[int],
                     prefix: Tuple[int, ...]) -> Optional[torch.Tensor]:
        """Hidden states (g, w, d) entering the output embedding for right-padded rows `ids` (g, w) of real lengths
        `lengths`, that all start with `prefix` (`batch_prefix`): the prefix from a prefix run, each row's remainder
        on its keys/values. None when it cannot be shared here (the caller then runs the full forward).
        `capture(model, ids, mask, position_ids=, cache=)` is the stopped forward."""
        if self._model() is not model:
            raise ValueError("this PrefixCache belongs to another model; make one per model: PrefixCache(model)")
        target = min(len(prefix), min(lengths) - 1)   # each row keeps >= 1 token of its own
        if target < MIN_PREFIX_TOKENS:
            return None
        reason = unshareable(model, max(max(lengths), len(prefix)))
        if reason:
            _log_once(model, reason)
            return None
        if not bool((ids[:, :target] == torch.tensor(prefix[:target], device=ids.device)).all()):
            raise ValueError("capture_rows: the rows do not start with the prefix given")
        self._drop_if_weights_changed(model)
        g, width = ids.shape
        entry = self._entry_for(capture, model, prefix)
        if target < len(prefix):
            entry = entry.cut(target)
        remainder = ids[:, target:]
        mask = torch.arange(width, device=ids.device).unsqueeze(0) < torch.tensor(lengths, device=ids.device)[:, None]
        positions = torch.arange(target, width, device=ids.device).unsqueeze(0).expand(g, -1)
        cache = _cache_from(model, entry, g)
        tail = capture(model, remainder, mask.long(), position_ids=positions, cache=cache)
        self.tokens_run += g * (width - target)
        self.tokens_reused += g * target
        return torch.cat([entry.hidden.expand(g, -1, -1), tail], dim=1)

    def _entry_for(self, capture: Callable, model, ids: Tuple[int, ...]) -> _Entry:
        """The run of prefix `ids`, cached or run now from scratch (so no result depends on what ran before; a
        group that needs fewer tokens cuts this run)."""
        if ids in self.entries:
            self.entries.move_to_end(ids)
            return self.entries[ids]
        entry = self._run_prefix(capture, model, ids)
        self.entries[ids] = entry
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry

    def _run_prefix(self, capture: Callable, model, ids: Tuple[int, ...]) -> _Entry:
        device = next(model.parameters()).device
        tokens = torch.tensor([ids], device=device)
        positions = torch.arange(len(ids), device=device).unsqueeze(0)
        cache = _new_cache(model)
        hidden = capture(model, tokens, torch.ones_like(tokens), position_ids=positions, cache=cache)
        self.tokens_run += len(ids)
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


def for_dataset(model, dataset) -> PrefixCache:
    """The PrefixCache of (`model`, `dataset`) in this process, made on first use from the prefix all of the
    dataset's scorable samples share (`dataset.samples[i].input_ids`), dropped with either. Lets scan.score_batch
    run the chat template once per scan without holding an object of its own; every rank of a sharded scan finds
    the same prefix."""
    per_model = _caches.setdefault(model, {})
    held = per_model.get(id(dataset))
    if held is None or held[0]() is not dataset:
        rows = [s.input_ids for s in dataset.samples if not getattr(s, "problem", None)]
        per_model.clear()   # one dataset at a time: an old one's prefix is not kept alive
        held = per_model[id(dataset)] = (weakref.ref(dataset), PrefixCache.for_rows(model, rows))
    return held[1]


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
    # Tensor._version moves with every in-place change (optimizer steps, load_state_dict); dtype/device with .to().
    return tuple((p._version, p.dtype, p.device) for p in model.parameters())


def _log_once(model, reason: str) -> None:
    key = (type(model).__name__, re.sub(r"\d+", "N", reason))   # one line per kind, not per sample length
    if key not in _logged:
        _logged.add(key)
        log.warning("shared-prefix forward off for %s: %s; running the full forward", type(model).__name__, reason)
