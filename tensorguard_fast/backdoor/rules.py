"""The scores a scan can decide by, as a registry: each names the raw per-sample data it needs (fields of a part
row) and how it turns the rows into a Decision. A new score is one entry here (and its function)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

from .decision import association_decision, threshold_decision


@dataclass(frozen=True)
class Score:
    name: str
    needs: tuple          # part-row fields it reads
    spectrum: str         # what the forward pass must compute ("svd" or "fft")
    uses_threshold: bool  # whether --threshold applies
    decide: Callable      # (rows, dataset, *, threshold, decode_token) -> Decision
    help: str


def _threshold_rule(name: str, spectrum: str):
    return lambda rows, dataset, threshold, decode_token=None: threshold_decision(rows, dataset, name, spectrum,
                                                                                  threshold)


SCORES: Dict[str, Score] = {s.name: s for s in (
    Score("association", ("sketch", "svals"), "svd", False,
          lambda rows, dataset, threshold, decode_token=None: association_decision(rows, dataset, decode_token),
          "a trigger in the prompt that goes with a shared payload in the answer (docs/backdoor.md); no ratio "
          "or threshold needed"),
    Score("gradsentry", ("svals",), "svd", True, _threshold_rule("gradsentry", "svd"),
          "GradSentry's spectral entropy of the cropped lm_head gradient, flagged above --threshold"),
    Score("energy", ("svals",), "svd", True, _threshold_rule("energy", "svd"),
          "entropy of the squared singular values (less confounded by answer length), above --threshold"),
    Score("fft", ("fft",), "fft", True, _threshold_rule("fft", "fft"),
          "FFT spectral entropy of the cropped gradient (needs --spectrum fft), above --threshold"),
)}
DEFAULT = "association"
