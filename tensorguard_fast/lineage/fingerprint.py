"""`fast_fingerprint(model_or_path, profile, seed, device) -> Fingerprint`, and the `Fingerprint` record itself.

Profiles (the registry in profiles.py: feature function, distance, same-family radius of each):
- "invariant" (default): vocabulary-anchored products that function-preserving permutations of the residual stream,
  MLP neurons and attention heads, and norm/linear rescalings cannot move (profile_invariant.py).
- "full": our earlier profile, probe sketches at fixed coordinates, built to tell apart families with identical
  shapes and to survive fine-tuning, quantisation, pruning and vocabulary growth (profile_full.py); a permuted copy
  of a model reads as unrelated to it.
- "tensorguard": TensorGuard's published fingerprint (arXiv 2506.01631, its public code), computed exactly and in one
  read of each selected tensor (profile_tensorguard.py).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from .._version import __version__
from . import profiles as _profiles
from .loading import open_model

PROFILES = _profiles.names()
DEFAULT_PROFILE = _profiles.DEFAULT

# TensorGuard's key names, in the order its extractor writes them (the "norm_*" group only appears when a selected
# 2-D tensor has "norm" in its name; it is kept when present).
TENSORGUARD_KEYS = ["global_mean", "global_std", "global_norm", "global_skewness", "global_kurtosis",
                    "attention_mean", "attention_std", "attention_norm", "ffn_mean", "ffn_std", "ffn_norm",
                    "embedding_mean", "embedding_std", "embedding_norm", "total_params", "num_layers"]


@dataclass
class Fingerprint:
    """A fixed-order feature vector with its names and where it came from.

    metadata keys: model (name), path, file_hashes, profile, seed, version, plus profile-specific facts
    (tensor count, non-finite values found, seconds taken).
    """

    vector: np.ndarray
    names: List[str]
    metadata: Dict = field(default_factory=dict)

    def __post_init__(self):
        self.vector = np.asarray(self.vector, dtype=np.float64).reshape(-1)
        if len(self.names) != self.vector.size:
            raise ValueError(f"Fingerprint: {self.vector.size} values but {len(self.names)} names")

    @property
    def profile(self) -> str:
        return self.metadata.get("profile", "unknown")

    @property
    def model(self) -> str:
        return self.metadata.get("model", "model")

    def as_dict(self) -> Dict[str, float]:
        return dict(zip(self.names, self.vector.tolist()))

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        data = {"format": "tensorguard-fast-fingerprint", "names": self.names,
                "vector": [v if math.isfinite(v) else None for v in self.vector.tolist()], "metadata": self.metadata}
        text = json.dumps(data, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: Union[str, Path]) -> "Fingerprint":
        """Read `to_json` output (a path or the JSON text); TensorGuard's feature files are recognised too."""
        text = str(path_or_text)
        source = None
        if not text.lstrip().startswith("{"):
            source = Path(text)
            text = source.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source or 'text'}: not a fingerprint JSON ({exc})") from exc
        if data.get("format") != "tensorguard-fast-fingerprint":
            if "global_mean" in data and "model_name" in data:
                return cls._from_tensorguard_dict(data, str(source) if source else None)
            raise ValueError(f"{source or 'text'}: not a tensorguard-fast fingerprint (no 'format' key)")
        vector = [math.nan if v is None else v for v in data["vector"]]
        return cls(np.array(vector, dtype=np.float64), list(data["names"]), dict(data.get("metadata", {})))

    @classmethod
    def from_tensorguard_json(cls, path: Union[str, Path]) -> "Fingerprint":
        """One of TensorGuard's released per-model feature files (features/<model>_features.json)."""
        data = json.loads(Path(path).read_text())
        return cls._from_tensorguard_dict(data, str(path))

    @classmethod
    def _from_tensorguard_dict(cls, data: dict, path: Optional[str]) -> "Fingerprint":
        missing = [k for k in ("global_mean", "global_std", "global_norm") if k not in data]
        if missing:
            raise ValueError(f"{path}: not a TensorGuard feature file (missing {missing})")
        names = [k for k in TENSORGUARD_KEYS if k in data]
        # Extra numeric groups TensorGuard may write (norm_*), kept after the standard keys.
        names += [k for k, v in data.items() if k not in names and k != "model_name"
                  and isinstance(v, (int, float)) and not isinstance(v, bool)]
        vector = [float(data[k]) for k in names]
        meta = {"model": data.get("model_name", Path(path).stem if path else "model"), "path": path,
                "profile": "tensorguard", "seed": 0, "version": "tensorguard-release", "file_hashes": {}}
        return cls(np.array(vector), names, meta)


def fast_fingerprint(model_or_path, profile: str = DEFAULT_PROFILE, seed: int = 0, device=None,
                     allow_pickle: bool = False, base: Optional[str] = None, name: Optional[str] = None,
                     config=None, allow_nonfinite: bool = False) -> Fingerprint:
    """Fingerprint a model: a path (safetensors file, sharded or HF directory, GGUF, LoRA adapter directory), a hub
    id, an nn.Module or a state dict. Weights are read one tensor at a time (see io/loading.py).

    profile: "invariant" (default), "full" or "tensorguard" (see profiles.py). seed: probe/anchor seed (0 is
    TensorGuard's). device: where the products run (default: CUDA if available, else CPU). config: the model's config
    (a dict, a transformers config or a directory) for a state dict, whose head width and norm convention the
    invariant profile otherwise reads from config.json beside the weights or infers (recorded in the metadata).
    """
    spec = _profiles.get(profile)
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config is None and isinstance(model_or_path, torch.nn.Module):
        config = getattr(model_or_path, "config", None)
    source = open_model(model_or_path, allow_pickle=allow_pickle, base=base, allow_nonfinite=allow_nonfinite)
    t0 = time.perf_counter()
    names, values, extra = spec.features(source, seed, torch.device(device), config)
    meta = {"model": name or source.name, "path": source.path, "file_hashes": source.file_hashes(),
            "profile": profile, "seed": seed, "version": __version__}
    meta.update(extra)
    meta["seconds"] = round(time.perf_counter() - t0, 4)
    return Fingerprint(np.array(values, dtype=np.float64), names, meta)
