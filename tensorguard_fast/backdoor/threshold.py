"""Thresholds that turn per-sample scores into flags: a sample is flagged when its score is > the threshold.

`kde_valley_threshold` is GradSentry's rule (docs/methods.md section 1.2); the others are robust alternatives evaluated next
to it in bench/backdoor_eval.py. Every rule returns a `Threshold` that says which rule and why, so a report can show
when GradSentry's rule fell back to its fixed 0.7. NaN scores (samples that could not be scored) are ignored.
Top-k is by rank (exactly k flagged; ties broken by input order); fixed thresholds must be finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

RULES = ("kde", "otsu", "mad", "gmm", "topk")


@dataclass
class Threshold:
    value: float
    rule: str
    reason: str
    details: dict = field(default_factory=dict)
    k: Optional[int] = None   # top-k by rank: flag exactly k of the finite scores (see `flags`)

    def flags(self, scores) -> np.ndarray:
        """Flags of `scores` (NaN: never flagged). A value rule flags scores > value. Top-k flags exactly k: the
        finite scores ranked from high to low, ties broken by input order (the earlier sample first)."""
        s = np.asarray(scores, dtype=np.float64)
        if self.k is None:
            return np.where(np.isfinite(s), s > self.value, False)
        finite = np.flatnonzero(np.isfinite(s))
        order = finite[np.argsort(-s[finite], kind="stable")]   # stable: equal scores keep input order
        out = np.zeros(s.shape, dtype=bool)
        out[order[:self.k]] = True
        return out

    def explain(self, score: float, flagged: bool) -> str:
        """Why a sample with `score` is (not) flagged, in words."""
        if self.k is None:
            return f"score {score:.4f} {'>' if flagged else '<='} threshold {self.value:.4f}"
        if self.k == 0:
            return f"score {score:.4f}: the top-k ratio rounds to 0 samples of {self.details.get('n')}, none flagged"
        if flagged:
            return f"score {score:.4f} ranks in the top {self.k} (cut {self.value:.4f})"
        if score == self.value:
            return f"score {score:.4f} ties the top-{self.k} cut but comes later in the input (ties: earlier first)"
        return f"score {score:.4f} is below the top-{self.k} cut {self.value:.4f}"

    def as_dict(self) -> dict:
        return {"value": self.value, "rule": self.rule, "reason": self.reason, **self.details}


def _finite(scores) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def kde_valley_threshold(scores: Sequence[float], grid_points: int = 1000, fallback: float = 0.7) -> Threshold:
    """GradSentry's KDE-valley rule for scores in [0, 1].

    Gaussian KDE with Silverman's bandwidth 1.06 * std * n^(-1/5) on `grid_points` points over [min, max]; peaks with
    prominence >= 1% of the highest density; the threshold is the density minimum between the peak nearest 0 and the
    peak nearest 1. Falls back to `fallback` (reason says which check failed) when n < 30, the scores do not vary,
    fewer than 2 peaks, the two peaks are adjacent, they are < 0.15 apart, or fewer than 5 (or 1%) of the samples
    lie at or above the valley.
    """
    from scipy.signal import find_peaks

    x = _finite(scores)
    n = int(x.size)

    def fall(reason, **details):
        return Threshold(float(fallback), "kde", f"fallback {fallback}: {reason}", {"n": n, **details})

    if n < 30:
        return fall(f"only {n} scored samples (< 30)")
    if np.std(x) < 1e-12:
        return fall("all scores are equal")
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-6:
        return fall(f"score range {hi - lo:.2e} is too narrow")
    std = x.std(ddof=1)
    bandwidth = 1.06 * (std if std > 0 else 1.0) * n ** (-1.0 / 5.0)
    grid = np.linspace(lo - 1e-6, hi + 1e-6, grid_points)
    # Gaussian KDE evaluated directly (what sklearn's KernelDensity computes), in blocks to bound memory.
    density = np.zeros(grid_points)
    for start in range(0, n, 4096):
        d = (grid[:, None] - x[None, start:start + 4096]) / bandwidth
        density += np.exp(-0.5 * d * d).sum(1)
    density /= n * bandwidth * math.sqrt(2 * math.pi)
    peaks = list(find_peaks(density, prominence=0.01 * density.max())[0])
    details = {"bandwidth": float(bandwidth), "n_peaks": len(peaks)}
    if len(peaks) < 2:
        return fall(f"{len(peaks)} density peak(s): no two groups", **details)
    at = grid[peaks]
    left = peaks[int(np.argmin(np.abs(at - 0.0)))]
    right = peaks[int(np.argmin(np.abs(at - 1.0)))]
    if left == right:
        left, right = min(peaks), max(peaks)
    left, right = min(left, right), max(left, right)
    details.update(left_peak=float(grid[left]), right_peak=float(grid[right]))
    if right - left <= 1:
        return fall("the two peaks are adjacent on the grid", **details)
    valley = left + int(np.argmin(density[left:right + 1]))
    tau = float(grid[valley])
    above = int(np.sum(x >= tau))
    details.update(valley=tau, n_above=above)
    if grid[right] - grid[left] < 0.15:
        return fall(f"peaks {grid[right] - grid[left]:.3f} apart (< 0.15)", **details)
    if above < 5 or above / n < 0.01:
        return fall(f"only {above} samples at or above the valley {tau:.4f}", **details)
    return Threshold(tau, "kde", f"KDE valley between peaks at {grid[left]:.3f} and {grid[right]:.3f}",
                     {"n": n, **details})


def otsu_threshold(scores: Sequence[float], bins: int = 256) -> Threshold:
    """Otsu's rule: the histogram cut that maximises the between-class variance."""
    x = _finite(scores)
    if x.size < 2 or np.ptp(x) == 0:
        return Threshold(float(x.max()) if x.size else math.inf, "otsu", "fewer than two distinct scores: nothing "
                         "flagged", {"n": int(x.size)})
    counts, edges = np.histogram(x, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)
    w1 = x.size - w0
    m0 = np.cumsum(counts * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between[:-1]))
    return Threshold(float(edges[k + 1]), "otsu", f"maximal between-class variance over {bins} bins",
                     {"n": int(x.size)})


def mad_threshold(scores: Sequence[float], k: float = 3.5) -> Threshold:
    """Robust outlier rule: median + k * 1.4826 * MAD (flags the high tail; meant for small poison ratios)."""
    x = _finite(scores)
    if x.size == 0:
        return Threshold(math.inf, "mad", "no scored samples", {"n": 0})
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    return Threshold(med + k * mad, "mad", f"median {med:.4f} + {k} x scaled MAD {mad:.4f}",
                     {"n": int(x.size), "median": med, "mad": mad})


def gmm_threshold(scores: Sequence[float], seed: int = 0) -> Threshold:
    """Two-component 1-D Gaussian mixture (scikit-learn); the threshold is where the high component becomes the more
    probable one, between the two means."""
    from sklearn.mixture import GaussianMixture

    x = _finite(scores)
    if x.size < 4 or np.ptp(x) == 0:
        return Threshold(float(x.max()) if x.size else math.inf, "gmm", "too few distinct scores for two components",
                         {"n": int(x.size)})
    gmm = GaussianMixture(2, random_state=seed).fit(x.reshape(-1, 1))
    means = gmm.means_.ravel()
    hi = int(np.argmax(means))
    grid = np.linspace(means.min(), means.max(), 2001)
    post = gmm.predict_proba(grid.reshape(-1, 1))[:, hi]
    cross = np.nonzero(post >= 0.5)[0]
    tau = float(grid[cross[0]]) if cross.size else float(means.mean())
    return Threshold(tau, "gmm", f"equal posterior between component means {means.min():.4f} and {means.max():.4f}",
                     {"n": int(x.size), "means": sorted(map(float, means)),
                      "weights": [float(w) for w in gmm.weights_[np.argsort(means)]]})


def topk_threshold(scores: Sequence[float], ratio: float) -> Threshold:
    """Flag the k = round(ratio * n) highest of the n finite scores, exactly k: by rank, not by a value cut, so ties
    at the cut cannot shrink or grow the set (ties are broken by input order, the earlier sample first; the summary
    says how many tied samples stayed unflagged). `value` is the k-th highest score (inf when k = 0)."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 <= ratio <= 1):
        raise ValueError(f"top-k ratio {ratio!r}: must be a number in [0, 1], e.g. topk:0.1")
    x = np.sort(_finite(scores))[::-1]
    k = int(round(ratio * x.size))
    cut = float(x[k - 1]) if k else math.inf
    tied_out = int(np.sum(x[k:] == cut)) if k else 0
    reason = f"top {k} of {x.size} scores by rank (ratio {ratio})"
    if tied_out:
        reason += f"; {tied_out} more tie the cut {cut:.4f} and stay unflagged (ties: earlier in the input first)"
    return Threshold(cut, "topk", reason, {"n": int(x.size), "k": k, "tied_unflagged": tied_out}, k=k)


def choose_threshold(scores: Sequence[float], rule: str = "kde", ratio: Optional[float] = None) -> Threshold:
    """Apply a rule by name: kde, otsu, mad, gmm, topk (needs ratio), or a number given as text (a fixed value)."""
    if rule == "kde":
        return kde_valley_threshold(scores)
    if rule == "otsu":
        return otsu_threshold(scores)
    if rule == "mad":
        return mad_threshold(scores)
    if rule == "gmm":
        return gmm_threshold(scores)
    if rule == "topk":
        if ratio is None:
            raise ValueError("threshold rule 'topk' needs the poison ratio (e.g. --threshold topk:0.1)")
        return topk_threshold(scores, ratio)
    value = _fixed(rule)
    return Threshold(value, "fixed", f"fixed threshold {value}")


def _fixed(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"threshold {text!r}: use one of {RULES} (topk:RATIO) or a number") from None
    if not math.isfinite(value):
        raise ValueError(f"threshold {text!r}: a fixed threshold must be a finite number")
    return value


def parse_threshold(text: str):
    """'kde' | 'otsu' | 'mad' | 'gmm' | 'topk:0.1' | '0.75' -> (rule, ratio); anything else (an unknown rule, a bad
    or out-of-range ratio, NaN, inf) raises ValueError with a one-line message, so a CLI can refuse it before any
    work."""
    text = str(text).strip()
    if text.lower().startswith("topk:"):
        raw = text.split(":", 1)[1]
        try:
            ratio = float(raw)
        except ValueError:
            raise ValueError(f"threshold {text!r}: the top-k ratio {raw!r} is not a number (e.g. topk:0.1)") from None
        if not (math.isfinite(ratio) and 0 <= ratio <= 1):
            raise ValueError(f"threshold {text!r}: the top-k ratio must be in [0, 1] (e.g. topk:0.1)")
        return "topk", ratio
    if text == "topk":
        raise ValueError("threshold rule 'topk' needs the poison ratio (e.g. --threshold topk:0.1)")
    if text in RULES:
        return text, None
    _fixed(text)
    return text, None
