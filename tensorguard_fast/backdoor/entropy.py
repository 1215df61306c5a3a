"""Per-sample gradient spectra of a causal LM's output projection, from one batched forward pass.

GradSentry scores a fine-tuning sample by the spectrum of G = d(mean answer-token cross-entropy) / d(lm_head weight),
cropped to its first V/8 rows and d/8 columns. That gradient is E^T H / n (docs/methods.md section 2): E = softmax - onehot at
the answer positions, H = the inputs of lm_head there. Both come out of the forward pass, so no backward pass and no
V x d gradient are needed; the `gram_entropy` / `fft_entropy` ops turn (H, W, targets) into the spectrum.

Choices a user should know about:
- Tied embeddings (SmolLM2, Gemma, GPT-2): the matrix is also the input embedding, so autograd on it would add the
  gradient reaching it through the input tokens. We take the logits path only: the gradient of the output projection
  as a layer. For untied models (the Llama-2/Mistral models GradSentry was run on) the two are the same.
- Mode: the forward runs in eval mode (dropout off), so a score is deterministic. GradSentry calls `model.train()`;
  for models whose dropout probabilities are 0 (SmolLM2, Gemma-3, Llama, Qwen2 as shipped) both modes give the same
  forward pass; with dropout > 0 GradSentry's own score is random from call to call.
- Hidden states are captured by a forward pre-hook on the output embedding that stops the forward there, so the
  (B, S, V) logits are never formed; this works for any model whose `get_output_embeddings()` is the module applied
  last (Llama, Qwen2, Mistral, Phi3, Gemma, GPT-2). Logit soft-capping (Gemma-2) changes the gradient and is refused.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Mapping, Optional, Tuple

import torch

from ..ops.fft_entropy import fft_entropy_from_hidden
from ..ops.gram_entropy import gram_spectrum_from_hidden, spectral_entropy
from ..ops.lm_head_errors import IGNORE_INDEX
from .prefix import MIN_PREFIX_TOKENS, PrefixCache, cache_keyword

SPECTRA = ("svd", "fft")


class _Captured(Exception):
    """Raised inside the pre-hook to end the forward pass once the lm_head input is known."""


def output_embedding(model) -> torch.nn.Module:
    """The model's output projection (lm_head), with a clear error when it has none we can use."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise ValueError(f"{type(model).__name__} exposes no output embedding with a 2-D weight "
                         "(get_output_embeddings()); fast_entropy needs a causal LM with an lm_head")
    if getattr(head, "bias", None) is not None:
        raise ValueError("the output embedding has a bias; the gradient spectrum here assumes logits = h W^T")
    config = getattr(model, "config", None)
    cap = getattr(config, "final_logit_softcapping", None) if config is not None else None
    if cap:
        raise ValueError(f"final_logit_softcapping={cap}: soft-capped logits change the lm_head gradient; "
                         "not supported")
    return head


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_batch(model, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) after the checks that turn silent garbage into clear errors."""
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"batch has no {key!r}; make it with tensorguard_fast.backdoor.datasets.collate")
    input_ids, labels = batch["input_ids"], batch["labels"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.dim() != 2 or labels.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids, labels, attention_mask must all be (B, S); got {tuple(input_ids.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(attention_mask.shape)}")
    device = _model_device(model)
    for key, t in (("input_ids", input_ids), ("labels", labels), ("attention_mask", attention_mask)):
        if t.device != device:
            raise ValueError(f"batch[{key!r}] is on {t.device} but the model is on {device}; move the batch with "
                             f"{{k: v.to({str(device)!r}) for k, v in batch.items()}}")
    vocab = output_embedding(model).weight.shape[0]
    for key, t in (("input_ids", input_ids), ("labels", labels[labels != IGNORE_INDEX])):
        if t.numel() and (int(t.max()) >= vocab or int(t.min()) < 0):
            raise ValueError(f"batch[{key!r}] has token id {int(t.max())} (min {int(t.min())}) outside the model's "
                             f"vocabulary of {vocab}: the tokenizer does not belong to this model")
    return input_ids, attention_mask, labels


def lm_head_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefix: bool = True,
                   prefix_cache: Optional[PrefixCache] = None) -> torch.Tensor:
    """Hidden states (B, S, d) entering the output embedding, from forward passes that stop before the logits.

    A padded batch is cut into groups of similar length (`length_groups`), each run at its own width: padding is
    compute thrown away, and a batch of mixed lengths is often half padding. Results are placed back at the batch's
    positions; padding positions are never scored (they hold zeros or whatever the model computed there). A mask
    with holes runs as one call.

    share_prefix: the leading tokens a group's rows share (a chat template, an instruction preamble) run once, each
    row's remainder on their keys/values (`prefix.PrefixCache`; the same hidden states to float rounding). Pass a
    `prefix_cache` kept across calls (a scan) to run a prefix once for all of them; without one, per call."""
    lengths = attention_mask.long().sum(-1)
    side = _padding_side(attention_mask)
    sharer = (prefix_cache if prefix_cache is not None else PrefixCache(model)) if share_prefix else None
    if side is None or (input_ids.shape[0] <= 1 and sharer is None):
        return _capture(model, input_ids, attention_mask)
    width = input_ids.shape[1]
    hidden = None
    shared = ()
    if sharer is not None:
        shared = sharer.batch_prefix([(row[:n] if side == "right" else row[width - n:]).tolist()
                                      for row, n in zip(input_ids, lengths.tolist())])
    # too short to pay for a prefix run: no group could use it, so skip the per-group realignment
    shares = sharer is not None and len(shared) >= MIN_PREFIX_TOKENS
    for group in length_groups(lengths.tolist()):
        rows = torch.tensor(group, device=input_ids.device)
        w = max(1, int(lengths[group[0]]))
        cols = slice(0, w) if side == "right" else slice(width - w, width)
        part = None
        if shares:
            part = _capture_shared(sharer, model, input_ids, [int(lengths[i]) for i in group], group, w, side,
                                   shared)
        realigned = part is not None and side == "left"
        if part is None:
            part = _capture(model, input_ids[rows, cols], attention_mask[rows, cols])
            if sharer is not None:
                sharer.tokens_run += len(group) * w
        if hidden is None:
            hidden = part.new_zeros(input_ids.shape[0], width, part.shape[-1])
        if not realigned:
            hidden[rows, cols] = part
        else:   # the shared path's right-aligned rows back into the left-padded batch
            for j, i in enumerate(group):
                n = int(lengths[i])
                hidden[i, width - n:] = part[j, :n]
    return hidden


def _capture_shared(sharer: PrefixCache, model, input_ids: torch.Tensor, lengths: list, group: list, w: int,
                    side: str, shared: tuple) -> Optional[torch.Tensor]:
    """The group's rows through the shared-prefix path, laid out right-padded at width w; None if not shared."""
    if side == "right":
        ids = input_ids[torch.tensor(group, device=input_ids.device), :w]
    else:   # left padding: move each row's real tokens to the left so the shared prefix starts every row
        ids = input_ids.new_zeros(len(group), w)
        width = input_ids.shape[1]
        for j, (i, n) in enumerate(zip(group, lengths)):
            ids[j, :n] = input_ids[i, width - n:]
    return sharer.capture_rows(_capture, model, ids, lengths, shared)


def length_groups(lengths, slack: float = 1.2) -> list:
    """Row indices, longest first, cut into groups whose padded size (longest x rows) stays within `slack` of their
    real token count. Greedy; a few groups per batch, so the per-call cost stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current, real = [], [], 0
    for i in order:
        if current and lengths[current[0]] * (len(current) + 1) > slack * (real + lengths[i]):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups


def _padding_side(attention_mask: torch.Tensor):
    """'right' when every row is ones then zeros, 'left' when zeros then ones, None otherwise (holes)."""
    m = attention_mask.long()
    if bool((m[:, 1:] <= m[:, :-1]).all()):
        return "right"
    if bool((m[:, 1:] >= m[:, :-1]).all()):
        return "left"
    return None


def _capture(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None,
             cache=None) -> torch.Tensor:
    """One forward pass stopped by a pre-hook on the output embedding; returns its input. With `cache` (a prefix's
    keys/values), input_ids are the positions after it, attention_mask covers prefix and input, and position_ids
    are given."""
    head = output_embedding(model)
    seen = {}

    def hook(module, args):
        seen["hidden"] = args[0]
        raise _Captured

    kwargs = {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    elif "position_ids" in inspect.signature(model.forward).parameters:
        # From the mask, so a left-padded batch scores as its samples would alone (transformers otherwise counts
        # positions from the first column, padding included).
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    if cache is not None:
        kwargs[cache_keyword(model)] = cache
    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), _eval_mode(model):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=cache is not None, **kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise RuntimeError(f"{type(model).__name__}.forward never called its output embedding")
    return seen["hidden"]


def answer_targets(labels: torch.Tensor) -> torch.Tensor:
    """Shift labels so targets[b, t] is the token the logits at t predict (HF's causal-LM convention)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def gradient_spectrum(model, batch: Mapping[str, torch.Tensor], crop: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Singular values (B, T) float64, descending, of each sample's cropped lm_head gradient, and n_tokens (B,).

    A sample with no answer token has NaN singular values and n_tokens 0.
    """
    hidden, weight, targets = gradient_inputs(model, batch)
    return gram_spectrum_from_hidden(hidden, weight, targets, crop=crop)


def gradient_inputs(model, batch, prefix_cache: Optional[PrefixCache] = None, share_prefix: bool = True):
    """(hidden, lm_head weight, targets): all the ops need for the per-sample lm_head gradients of a batch. Positions
    after a row's last scored one are not computed (`through_last_scored`): like padding, they hold no hidden state.
    prefix_cache / share_prefix: see `lm_head_inputs` (a scan passes one cache for all its batches)."""
    input_ids, attention_mask, labels = check_batch(model, batch)
    targets = answer_targets(labels)
    from_padding = (targets != IGNORE_INDEX) & (attention_mask == 0)
    if bool(from_padding.any()):
        b = int(from_padding.any(1).nonzero()[0, 0])
        raise ValueError(f"sample {b}: a scored label would be predicted from a padding position (attention_mask 0); "
                         "labels must be -100 on padding and on a sample's first token")
    hidden = lm_head_inputs(model, input_ids, through_last_scored(attention_mask, targets), share_prefix,
                            prefix_cache)
    return hidden, output_embedding(model).weight.detach(), targets


def through_last_scored(attention_mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The attention mask cut after each row's last scored position. In a causal model a later token feeds no scored
    position (the end-of-answer token is one: the last answer token predicts it, and it predicts nothing), so it need
    not be computed; the positions kept get the hidden states they would have had. Right-padded batches only (a cut
    left-padded row would have a hole); a row with nothing scored keeps its mask."""
    if targets.numel() == 0 or _padding_side(attention_mask) != "right":
        return attention_mask
    scored = targets != IGNORE_INDEX
    positions = torch.arange(targets.shape[1], device=targets.device)
    last = torch.where(scored, positions, -1).max(1).values   # -1: nothing scored
    keep = (positions[None, :] <= last[:, None]) | (last < 0)[:, None]
    return attention_mask * keep.to(attention_mask.dtype)


def fast_entropy(model, batch: Mapping[str, torch.Tensor], spectrum: str = "svd", rank: int = 16,
                 crop: int = 8) -> torch.Tensor:
    """GradSentry's per-sample score, (B,) float64, from one batched forward pass and no backward pass.

    spectrum="svd": normalised entropy of the `rank` largest singular values of the cropped lm_head gradient
    (GradSentry's score, with exact singular values where GradSentry's svd_lowrank is randomised).
    spectrum="fft": normalised entropy of the one-sided power spectrum of the row-major flattened crop (the
    `fft_entropy` op's defaults).
    `batch` holds input_ids, attention_mask and labels (-100 on prompt and padding) on the model's device, as
    `tensorguard_fast.backdoor.datasets.collate` makes them. NaN for a sample without answer tokens.
    """
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum={spectrum!r}: choose one of {SPECTRA}")
    if spectrum == "svd":
        svals, _ = gradient_spectrum(model, batch, crop)
        return spectral_entropy(svals, rank).cpu()
    hidden, weight, targets = gradient_inputs(model, batch)
    return fft_entropy_from_hidden(hidden, weight, targets, crop=crop).to(torch.float64).cpu()
