"""tensorguard-fast: gradient statistics for model lineage (TensorGuard) and backdoor filtering (GradSentry).

Public names are imported lazily, so `import tensorguard_fast` stays cheap and a part whose optional dependency is
missing only fails when it is used.
"""
from __future__ import annotations

import importlib

from ._version import __version__

_EXPORTS = {
    # engine ops
    "Moments": "tensorguard_fast.stats",
    "moments": "tensorguard_fast.ops.moments",
    "moments_many": "tensorguard_fast.ops.moments",
    "outer_moments": "tensorguard_fast.ops.moments",
    "gram_entropy": "tensorguard_fast.ops.gram_entropy",
    "fft_entropy": "tensorguard_fast.ops.fft_entropy",
    "BackendUnavailable": "tensorguard_fast._backend",
    "last_backend": "tensorguard_fast._backend",
    # model lineage
    "fast_fingerprint": "tensorguard_fast.lineage.fingerprint",
    "Fingerprint": "tensorguard_fast.lineage.fingerprint",
    "distance": "tensorguard_fast.lineage.family",
    "similarity": "tensorguard_fast.lineage.family",
    "FamilyClassifier": "tensorguard_fast.lineage.family",
    "Prediction": "tensorguard_fast.lineage.family",
    "FingerprintStore": "tensorguard_fast.lineage.store",
    # backdoor filtering
    "fast_entropy": "tensorguard_fast.backdoor.entropy",
    "kde_valley_threshold": "tensorguard_fast.backdoor.threshold",
    "load_samples": "tensorguard_fast.backdoor.datasets",
    "scan": "tensorguard_fast.backdoor.scan",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tensorguard_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
