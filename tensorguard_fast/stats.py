"""`Moments`: the summary every moments kernel returns, and the stable merge of two summaries.

Kept apart from the kernels so the reference, the C++ and the Triton paths all finish the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Moments:
    """Statistics of the finite values of a tensor; `nonfinite` counts the NaN/Inf that were left out.

    `std` has ddof 0; `skewness` and `kurtosis` follow scipy.stats defaults (biased, Fisher: normal -> 0).
    `l1` = sum |x|, `l2` = sqrt(sum x^2) (the Frobenius norm of a matrix). Empty input: count 0, NaN moments,
    zero norms. A constant input has NaN skewness and kurtosis (0/0), as scipy reports.
    m2, m3, m4 are the central sums (not divided by count), kept so summaries can be merged exactly.
    """

    count: int
    mean: float
    m2: float
    m3: float
    m4: float
    min: float
    max: float
    l1: float
    sumsq: float
    nonfinite: int

    @classmethod
    def from_state(cls, state) -> "Moments":
        n, mean, m2, m3, m4, mn, mx, l1, sumsq, nonfinite = state
        if n == 0:
            mean = mn = mx = math.nan
            m2 = m3 = m4 = 0.0
        return cls(int(n), float(mean), float(m2), float(m3), float(m4), float(mn), float(mx), float(l1),
                   float(sumsq), int(nonfinite))

    @classmethod
    def empty(cls) -> "Moments":
        return cls.from_state((0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf, 0.0, 0.0, 0))

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.count) if self.count else math.nan

    @property
    def var(self) -> float:
        return max(self.m2, 0.0) / self.count if self.count else math.nan

    def _degenerate(self) -> bool:
        # Spread below ~1e-14 of the magnitude is rounding noise, not data: skew/kurtosis are 0/0 there.
        return self.count == 0 or self.m2 <= 0.0 or self.var <= (1e-14 * abs(self.mean)) ** 2

    @property
    def skewness(self) -> float:
        if self._degenerate():
            return math.nan
        n = self.count
        return (self.m3 / n) / (self.m2 / n) ** 1.5

    @property
    def kurtosis(self) -> float:
        if self._degenerate():
            return math.nan
        n = self.count
        return (self.m4 / n) / (self.m2 / n) ** 2 - 3.0

    @property
    def l2(self) -> float:
        return math.sqrt(self.sumsq)

    def merge(self, other: "Moments") -> "Moments":
        """Summary of the union of both inputs (Chan et al. / Terriberry pairwise update)."""
        if other.count == 0:
            return _replace_nonfinite(self, self.nonfinite + other.nonfinite)
        if self.count == 0:
            return _replace_nonfinite(other, self.nonfinite + other.nonfinite)
        na, nb = float(self.count), float(other.count)
        n = na + nb
        delta = other.mean - self.mean
        dn = delta / n
        dn2 = dn * dn
        t1 = delta * dn * na * nb
        m2 = self.m2 + other.m2 + t1
        m3 = self.m3 + other.m3 + t1 * dn * (na - nb) + 3.0 * dn * (na * other.m2 - nb * self.m2)
        m4 = (self.m4 + other.m4 + t1 * dn2 * (na * na - na * nb + nb * nb)
              + 6.0 * dn2 * (na * na * other.m2 + nb * nb * self.m2) + 4.0 * dn * (na * other.m3 - nb * self.m3))
        return Moments(self.count + other.count, self.mean + nb * dn, m2, m3, m4, min(self.min, other.min),
                       max(self.max, other.max), self.l1 + other.l1, self.sumsq + other.sumsq,
                       self.nonfinite + other.nonfinite)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("count", "mean", "std", "skewness", "kurtosis", "min", "max", "l1",
                                               "l2", "nonfinite")}


def _replace_nonfinite(m: Moments, nonfinite: int) -> Moments:
    return Moments(m.count, m.mean, m.m2, m.m3, m.m4, m.min, m.max, m.l1, m.sumsq, nonfinite)


def from_power_sums(count: int, s1: float, s2: float, s3: float, s4: float, mn: float, mx: float, l1: float,
                    nonfinite: int) -> Moments:
    """Moments from raw power sums sum x^p (p = 1..4), as the rank-1 factorisation delivers them (float64)."""
    if count == 0:
        return Moments.from_state((0, 0.0, 0.0, 0.0, 0.0, mn, mx, 0.0, 0.0, nonfinite))
    mean = s1 / count
    m2 = s2 - count * mean * mean
    m3 = s3 - 3.0 * mean * s2 + 2.0 * count * mean ** 3
    m4 = s4 - 4.0 * mean * s3 + 6.0 * mean * mean * s2 - 3.0 * count * mean ** 4
    return Moments(int(count), mean, max(m2, 0.0), m3, max(m4, 0.0), mn, mx, l1, s2, int(nonfinite))
