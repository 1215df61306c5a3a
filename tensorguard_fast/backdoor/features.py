"""Per-sample raw results of one forward pass: GradSentry's spectrum and the gradient sketch, in one vocabulary pass.

The sketch is the seeded projection R^T G of the sample's FULL lm_head gradient (ops/gradient_sketch.py), k x d,
compressed on the right by a second seeded d x WIDTH projection to k x WIDTH numbers (random projections keep the
angles between sketches, which is all the association rule uses) and stored as float16: 2 KB per sample whatever the
model's width, so a million samples fit in 2 GB of part files.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch

from ..ops.gradient_sketch import sketch_matrix
from ..ops.gram_entropy import gram_spectrum
from ..ops.lm_head_errors import answer_error_blocks


@dataclass(frozen=True)
class SketchConfig:
    k: int = 32            # rows of R (vocabulary side)
    seed: int = 0
    width: int = 32        # columns kept of the hidden side, by a second seeded projection
    width_seed: int = 1


SKETCH = SketchConfig()


def spectra_and_sketches(hidden, weight, targets, crop: int, config: SketchConfig = SKETCH):
    """(svals (B, T) float64 with 1/n included and NaN rows for n = 0, n_tokens (B,), sketches (B, k*width) float16
    numpy, NaN rows for n = 0) from one chunked pass over the vocabulary."""
    vocab, dim = weight.shape
    r = sketch_matrix(vocab, config.k, config.seed, weight.device, torch.float32)
    e, h, n, s = answer_error_blocks(hidden, weight, targets, crop, sketch=r)
    svals = gram_spectrum(e, h) / n.clamp_min(1).to(torch.float64).unsqueeze(1)
    svals[n == 0] = float("nan")
    q = sketch_matrix(dim, config.width, config.width_seed, s.device, s.dtype)
    compact = (s @ q).reshape(s.shape[0], -1)
    return svals, n, compact.to(torch.float16).cpu().numpy()


def encode(sketch: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(sketch, dtype=np.float16).tobytes()).decode("ascii")


def decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float16)
