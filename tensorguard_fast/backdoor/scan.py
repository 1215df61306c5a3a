"""Scan a fine-tuning dataset for poisoned samples: score every sample, pick a threshold, write the clean set back.

Layout of an output directory:
    scan_config.json      the settings the spectra depend on; a restart with other settings is refused
    parts/part-*.jsonl    raw per-sample results (singular values, FFT entropy, n_answer_tokens or the problem),
                          appended one whole batch at a time as batches finish
    scores.jsonl          id, score, n_answer_tokens, flagged, reason: one line per input sample, in input order
    flagged.jsonl         the flagged samples as they were in the input (unreadable lines included, verbatim)
    clean.<ext>           the rest, in the input's own format
    summary.json          threshold, rule, reason, counts, timings
    histogram.png         the scores with the threshold marked

Resuming: batches are fixed before any work (sorted by length, then cut), and a batch's lines are written with one
append and fsync. A scan killed at any moment leaves at most a torn last line, which the restart drops before it
redoes that batch, so the final files are the same as an uninterrupted run (same batches, same arithmetic).

Sharding: `scan_part` scores any subset of sample indices into its own part file; `finish` merges every part file
of the directory. Under torchrun (`python -m tensorguard_fast.backdoor`) rank r scores the indices r::size into
part-r-of-size.jsonl and rank 0 calls `finish` once every rank is done; a restart resumes each rank's part.
"""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional, Sequence

import torch

from .. import distributed
from . import entropy, prefix
from .datasets import Dataset, collate, load_samples, pad_id
from .features import encode, spectra_and_sketches
from .outputs import finish
from .parts import PARTS, read_part
from .scan_config import check_config, scan_config
from .rules import DEFAULT as DEFAULT_SCORE, SCORES



def plan_batches(dataset: Dataset, indices: Sequence[int], batch_size: int) -> List[List[int]]:
    """Fixed batches of the scorable samples among `indices`: sorted by length (less padding), then cut."""
    scorable = [i for i in indices if not dataset.samples[i].problem]
    scorable.sort(key=lambda i: (len(dataset.samples[i].input_ids), i))
    return [scorable[k:k + batch_size] for k in range(0, len(scorable), batch_size)]


def score_batch(model, tokenizer, dataset: Dataset, batch_indices: Sequence[int], spectrum: str = "svd",
                crop: int = 8) -> List[dict]:
    """Raw results of one batch: singular values (all of them), n_answer_tokens and the compact gradient sketch
    (features.py), plus the FFT entropy when spectrum == 'fft'. One forward pass, one pass over the vocabulary."""
    samples = [dataset.samples[i] for i in batch_indices]
    device = next(model.parameters()).device
    batch = collate(samples, pad_id(tokenizer), device=device)
    hidden, weight, targets = entropy.gradient_inputs(model, batch, prefix_cache=prefix.for_dataset(model, dataset))
    svals, n_tokens, sketches = spectra_and_sketches(hidden, weight, targets, crop)
    fft = None
    if spectrum == "fft":
        fft = entropy.fft_entropy_from_hidden(hidden, weight, targets, crop=crop).to(torch.float64).cpu()
    rows = []
    for j, i in enumerate(batch_indices):
        n = int(n_tokens[j])
        s = svals[j, :max(n, 1)].cpu().tolist()
        rows.append({"index": i, "n_answer_tokens": n, "svals": s,
                     "fft": None if fft is None else float(fft[j]), "sketch": encode(sketches[j]) if n else None})
    return rows


def _score_or_isolate(model, tokenizer, dataset, batch, spectrum, crop) -> List[dict]:
    """score_batch; when the batch fails on a sample's values (NaN/Inf hidden states or logits: ValueError), each
    sample is scored alone and the ones that still fail get a row with the problem, so one bad sample is flagged
    with its reason instead of ending the scan."""
    try:
        return score_batch(model, tokenizer, dataset, batch, spectrum, crop)
    except ValueError:
        pass
    rows = []
    for i in batch:
        try:
            rows += score_batch(model, tokenizer, dataset, [i], spectrum, crop)
        except ValueError as exc:
            rows.append({"index": i, "n_answer_tokens": 0, "svals": [], "fft": None, "sketch": None,
                         "problem": f"could not be scored: {str(exc).splitlines()[0]}"})
    return rows


def scan_part(model, tokenizer, dataset: Dataset, indices: Sequence[int], part_path: str, spectrum: str = "svd",
              crop: int = 8, batch_size: int = 16, progress: bool = True) -> int:
    """Score the samples at `indices` into `part_path`, skipping those already there. Returns samples scored now."""
    done = {row["index"] for row in read_part(part_path)}
    batches = [b for b in plan_batches(dataset, indices, batch_size) if not set(b) <= done]
    for b in batches:
        if set(b) & done:   # cannot happen with whole-batch appends; a mixed batch means another writer
            raise RuntimeError(f"{part_path}: batch {b[:3]}... is partly done; was the part file written by another "
                               "scan?")
    todo = sum(len(b) for b in batches)
    bar = None
    if progress and todo:
        from tqdm import tqdm
        # a resumed scan shows done/total, not 0/remaining
        bar = tqdm(total=todo + len(done), initial=len(done), unit="sample", desc="scan", smoothing=0.1)
    scored = 0
    with open(part_path, "ab") as fh:
        for b in batches:
            rows = _score_or_isolate(model, tokenizer, dataset, b, spectrum, crop)
            fh.write("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            scored += len(b)
            if bar is not None:
                bar.update(len(b))
    if bar is not None:
        bar.close()
    return scored


def scan(model, tokenizer, data: str, out_dir: str, spectrum: str = "svd", score: str = DEFAULT_SCORE,
         batch_size: int = 16, threshold: str = "kde", max_len: int = 512, crop: int = 8, model_name: str = "model",
         progress: bool = True, world: Optional[distributed.World] = None, prompt_field: Optional[str] = None,
         answer_field: Optional[str] = None) -> dict:
    """Scan the dataset file `data` with (model, tokenizer) into `out_dir` (see the module docstring); resumes a
    killed scan of the same settings. Returns summary.json's content.

    world: this process's place in a torchrun job (`distributed.init()`); rank r scores the samples r::size into
    parts/part-r-of-size.jsonl, rank 0 merges after every rank is done, and every rank returns the summary."""
    w = world or distributed.World(0, 1, 0)
    if spectrum not in entropy.SPECTRA:
        raise ValueError(f"spectrum={spectrum!r}: choose one of {entropy.SPECTRA}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if score not in SCORES:
        raise ValueError(f"score={score!r}: choose one of {sorted(SCORES)}")
    rule = SCORES[score]
    if rule.spectrum != spectrum:
        raise ValueError(f"score {score!r} needs spectrum={rule.spectrum!r}")
    check_vocab(model, tokenizer)
    dataset = load_samples(data, tokenizer, max_len=max_len, prompt_field=prompt_field, answer_field=answer_field)
    config = {**scan_config(model_name, dataset, spectrum, crop, max_len, batch_size, model=model),
              "world_size": w.size}
    def prepare():  # one writer of the directory and its config; the others wait for it
        if w.is_main:
            os.makedirs(os.path.join(out_dir, PARTS), exist_ok=True)
            check_config(out_dir, config)

    _on_every_rank(w, prepare)
    start = time.perf_counter()
    part = "part-0.jsonl" if w.size == 1 else f"part-{w.rank}-of-{w.size}.jsonl"
    _on_every_rank(w, lambda: scan_part(model, tokenizer, dataset, distributed.shard(range(len(dataset)), w),
                                        os.path.join(out_dir, PARTS, part), spectrum, crop, batch_size,
                                        progress and w.is_main))
    seconds = time.perf_counter() - start
    extra = {"model": model_name, "data": os.path.abspath(dataset.path) if os.path.exists(dataset.path) else dataset.path, "max_len": max_len, "batch_size": batch_size,
             "world_size": w.size}
    def decide(rows, ds):
        return rule.decide(rows, ds, threshold, decode_token=lambda t: tokenizer.decode([t]))

    summary = _on_every_rank(w, lambda: finish(out_dir, dataset, spectrum, score, threshold, seconds, extra,
                                               decide=decide) if w.is_main else None)
    if summary is None:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
    return summary


def _on_every_rank(w: "distributed.World", step):
    """Run step() here, then wait for every rank; if it failed on any rank, raise on all (none waits forever)."""
    try:
        result, error = step(), None
    except Exception as exc:
        result, error = None, exc
    if not distributed.all_ok(error is None):
        if error is not None:
            raise error
        raise RuntimeError("scan: another rank failed (its error is in its own output)")
    return result


def check_vocab(model, tokenizer) -> None:
    """A tokenizer with more ids than the model has output rows belongs to another model."""
    vocab = entropy.output_embedding(model).weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's output layer has {vocab} rows: "
                         "they do not belong together")

