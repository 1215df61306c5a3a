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
from typing import List, Optional, Sequence

import numpy as np

SCORES = ("gradsentry", "energy", "fft")
DEFAULT_SCORE = "gradsentry"
RANK = 16


def entropy_of(svals: Sequence[float], rank: int = RANK, squared: bool = False) -> float:
    """Normalised entropy of the top-`rank` values (zero-padded, clamped at 1e-12 as GradSentry does)."""
    s = np.sort(np.asarray(svals, dtype=np.float64))[::-1][:rank]
    if s.size == 0 or not np.all(np.isfinite(s)):
        return math.nan
    s = np.concatenate([s, np.zeros(rank - s.size)]).clip(min=1e-12)
    if squared:
        s = s * s
    p = s / s.sum()
    return float(-(p * np.log(p)).sum() / math.log(rank))


def score_row(row: Optional[dict], score: str = DEFAULT_SCORE) -> float:
    """The score of one raw scan row ({"svals", "n_answer_tokens", "fft"}); NaN when it cannot be scored."""
    if row is None or row.get("n_answer_tokens", 0) < 1:
        return math.nan
    if score == "gradsentry":
        return entropy_of(row["svals"])
    if score == "energy":
        return entropy_of(row["svals"], squared=True)
    if score == "fft":
        value = row.get("fft")
        if value is None:
            raise ValueError("score 'fft' needs a scan with spectrum='fft'")
        return float(value)
    raise ValueError(f"score={score!r}: choose one of {SCORES}")


def compute_scores(rows: List[Optional[dict]], score: str = DEFAULT_SCORE, spectrum: str = "svd") -> np.ndarray:
    """Scores of all raw rows (None = not scored) as a float64 array; NaN for samples without a score."""
    if score not in SCORES:
        raise ValueError(f"score={score!r}: choose one of {SCORES}")
    if score == "fft" and spectrum != "fft":
        raise ValueError("score 'fft' needs spectrum='fft'")
    return np.array([score_row(r, score) for r in rows], dtype=np.float64)
