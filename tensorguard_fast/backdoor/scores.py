"""Per-sample scores from the singular values of the cropped lm_head gradient (higher = more suspicious).

- "gradsentry": GradSentry's score, entropy of the 16 largest singular values as amplitudes (p = s / sum s),
  over ln 16. Confounded by answer length: the gradient has rank <= n answer tokens, so a short answer cannot reach a
  high value and any long answer does (measured in bench/backdoor_eval.py).
- "energy": the same entropy over the energy shares p = s^2 / sum s^2 of the top 16. Squaring lets the few large
  directions decide and mutes the many small ones that every extra token adds, which is where the length confound
  lives; bench/results/backdoor_eval.json compares the two.
- "fft": the FFT spectral entropy of the flattened crop (needs spectrum="fft" at scan time).
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch

from ..ops.gram_entropy import spectral_entropy

SCORES = ("gradsentry", "energy", "fft")
RANK = 16


def compute_scores(rows: List[Optional[dict]], score: str = "gradsentry", spectrum: str = "svd") -> np.ndarray:
    """Scores of raw scan rows ({"svals", "n_answer_tokens", "fft"}; None = not scored) as float64; NaN for samples
    without a score."""
    if score not in SCORES:
        raise ValueError(f"score={score!r}: choose one of {SCORES}")
    scored = [r is not None and r.get("n_answer_tokens", 0) >= 1 for r in rows]
    if score == "fft":
        if spectrum != "fft" or any(ok and r.get("fft") is None for ok, r in zip(scored, rows)):
            raise ValueError("score 'fft' needs a scan with spectrum='fft'")
        return np.array([float(r["fft"]) if ok else math.nan for ok, r in zip(scored, rows)], dtype=np.float64)
    width = max([len(r["svals"]) for ok, r in zip(scored, rows) if ok] + [1])
    svals = torch.full((len(rows), width), math.nan, dtype=torch.float64)
    for i, (ok, r) in enumerate(zip(scored, rows)):
        if ok:
            svals[i] = 0.0
            svals[i, :len(r["svals"])] = torch.tensor(r["svals"], dtype=torch.float64)
    out = spectral_entropy(svals, rank=RANK, squared=(score == "energy")) if len(rows) else torch.zeros(0)
    return out.numpy().astype(np.float64)

