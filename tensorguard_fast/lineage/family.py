"""Compare fingerprints and assign models to families (thin layer over numpy and scikit-learn).

distance(a, b) and similarity(a, b) are the profile's own (profiles.py):
- "invariant", "full": RMS of the difference. Each block has unit RMS, so unrelated models sit near sqrt(2) ~ 1.41
  and derivatives near 0; similarity is the cosine (1 = same weights, ~0 = unrelated).
- "tensorguard": RMS of relative differences, |a - b| / ((|a| + |b|) / 2), over the features TensorGuard clusters on
  (all but total_params). Its features span ten orders of magnitude and a pair has no population to standardise
  on; the classifier standardises on the population exactly as TensorGuard does. similarity = 1 / (1 + distance).
same_family(a, b): the pairwise verdict of `compare`, where the profile has a scale-free radius (None otherwise).

FamilyClassifier, open set: a model is "unknown" when it is farther from its assigned base than the open-set radius,
in the profile's own distance (also for kmeans, which assigns in a space standardised over the population given: a
radius there would move with whoever else is being classified). The radius:
- the profile's `open_set_radius` where it has one (invariant: 1.2, measured against models that are not related,
  bench/lineage_null.py): "unknown" then means "no closer than unrelated models come", and does not depend on how
  far apart the bases happen to be;
- else half the smallest distance between two bases: a member of a family should be closer to its base than to the
  midpoint towards any other base;
- else (one base, no measured radius) max(median + 3 MADs, 2 x median) of the nearest-base distances of the
  population (an outlier rule; it assumes most models given are derivatives).
`threshold=` overrides them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import profiles
from .fingerprint import Fingerprint


def feature_vector(fp: Fingerprint) -> np.ndarray:
    """The features that distances and clustering use (the profile's excluded names left out)."""
    skip = profiles.get(fp.profile).excluded
    if not skip:
        return fp.vector.astype(np.float64)
    return np.array([v for n, v in zip(fp.names, fp.vector) if n not in skip], dtype=np.float64)


_features = feature_vector  # the earlier private name


def check_comparable(a: Fingerprint, b: Fingerprint) -> None:
    if a.profile != b.profile:
        raise ValueError(f"cannot compare a {a.profile!r} fingerprint ({a.model}) with a {b.profile!r} one "
                         f"({b.model}); fingerprint both with the same --profile")
    if a.names != b.names:
        raise ValueError(f"fingerprints of {a.model} and {b.model} have different features (library versions "
                         f"{a.metadata.get('version')} and {b.metadata.get('version')}); recompute one of them")


def distance(a: Fingerprint, b: Fingerprint) -> float:
    check_comparable(a, b)
    return profiles.get(a.profile).distance(feature_vector(a), feature_vector(b))


def similarity(a: Fingerprint, b: Fingerprint) -> float:
    check_comparable(a, b)
    return profiles.get(a.profile).similarity(feature_vector(a), feature_vector(b))


def same_family(a: Fingerprint, b: Fingerprint) -> Optional[bool]:
    """Pairwise verdict: distance within the profile's same-family radius; None when the profile has none."""
    radius = profiles.get(a.profile).same_family_threshold
    return None if radius is None else distance(a, b) <= radius


@dataclass
class Prediction:
    model: str
    family: str          # a base's name, or "unknown" (open set)
    distance: float      # to the base of `nearest` (the assigned one), in the profile's distance
    known: bool
    margin: float        # distance to the closest other base minus `distance` (large = clear-cut; < 0: kmeans
                         # assigned a base that is not the closest)
    nearest: str         # the assigned base even when the model is called unknown

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class FamilyClassifier:
    """Assign fingerprints to the families of `bases` (name -> Fingerprint).

    method="kmeans": TensorGuard's procedure: standardise the features on the whole population (bases + models),
    K-Means with one cluster per base, init = the bases' vectors, n_init=1; each cluster takes the family of the
    base that seeded it. The open-set radius and the reported distances are the profile's own (module docstring).
    method="nearest": the nearest base under `distance` (no population needed; stable when models are few).
    """

    def __init__(self, bases: Dict[str, Fingerprint], method: str = "kmeans", open_set: bool = True,
                 threshold: Optional[float] = None):
        if not bases:
            raise ValueError("FamilyClassifier needs at least one base fingerprint")
        if method not in ("kmeans", "nearest"):
            raise ValueError(f"method must be 'kmeans' or 'nearest', not {method!r}")
        first = next(iter(bases.values()))
        for fp in bases.values():
            check_comparable(first, fp)
        self.bases = dict(bases)
        self.method = method
        self.open_set = open_set
        self.threshold = threshold
        self.threshold_used: Optional[float] = None

    def fit_predict(self, fingerprints: Sequence[Fingerprint]) -> List[Prediction]:
        names = list(self.bases)
        first = self.bases[names[0]]
        for fp in fingerprints:
            check_comparable(first, fp)
        dists = np.array([[distance(fp, self.bases[n]) for n in names] for fp in fingerprints])
        dists = dists.reshape(len(fingerprints), len(names))
        if self.method == "kmeans":
            labels = self._kmeans(fingerprints)
        else:
            labels = dists.argmin(axis=1) if len(fingerprints) else np.zeros(0, dtype=int)
        self.threshold_used = self._calibrate(dists)
        out = []
        for i, fp in enumerate(fingerprints):
            k = int(labels[i])
            d = float(dists[i, k])
            others = np.delete(dists[i], k)
            margin = float(others.min() - d) if others.size else float("inf")
            known = (not self.open_set) or d <= self.threshold_used
            out.append(Prediction(fp.model, names[k] if known else "unknown", d, bool(known), margin, names[k]))
        return out

    # -- internals ----------------------------------------------------------------------------------------------

    def _kmeans(self, fingerprints) -> np.ndarray:
        """Each model's base index: k-means on the population standardised per feature, started at the bases."""
        from sklearn.cluster import KMeans
        from sklearn.preprocessing import StandardScaler

        names = list(self.bases)
        pop = np.array([feature_vector(self.bases[n]) for n in names] + [feature_vector(fp) for fp in fingerprints])
        pop = np.nan_to_num(pop, nan=0.0, posinf=0.0, neginf=0.0)
        scaled = StandardScaler().fit_transform(pop)
        if len(names) > 1 and len(pop) >= len(names):
            km = KMeans(n_clusters=len(names), init=scaled[:len(names)], n_init=1).fit(scaled)
            return km.labels_[len(names):]
        return np.zeros(len(fingerprints), dtype=int)

    def _base_distances(self) -> np.ndarray:
        names = list(self.bases)
        return np.array([[distance(self.bases[a], self.bases[b]) for b in names] for a in names])

    def _calibrate(self, dists: np.ndarray) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        measured = profiles.get(next(iter(self.bases.values())).profile).open_set_radius
        if measured is not None:
            return float(measured)
        base_d = self._base_distances()   # only the half-distance rule needs them
        if len(base_d) > 1:
            off = base_d[~np.eye(len(base_d), dtype=bool)]
            return float(0.5 * off.min())
        nearest = dists.min(axis=1) if dists.size else np.zeros(0)
        if nearest.size == 0:
            return float("inf")
        med = float(np.median(nearest))
        mad = float(np.median(np.abs(nearest - med)))
        # at least twice the median: in few dimensions the distances of true members spread by a factor of ~2
        return max(med + 3 * 1.4826 * mad, 2 * med) if med > 0 else float(nearest.max())
