"""The dataset-level decision: which scored samples are flagged, and why.

A decision rule turns the raw per-sample results of a scan (parts.py rows) into a `Decision`: one primary value per
sample (what the histogram shows), the flags, a reason per sample, named per-sample components (every number the rule
looked at, written to scores.jsonl), and a summary of what the rule found (written to summary.json). The outputs
layer (outputs.py) only renders a Decision; it never decides.

`status` says how the rule ended, in the user's words:
- "flagged": the rule found structure and flagged the samples it names;
- "no_poison_found": the rule looked and found nothing (its evidence is in `summary`);
- "undecided": the rule could not find the structure it needs (e.g. no KDE valley); nothing is flagged on its
  account, and the scan says so loudly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np

from .association import AssociationConfig, associate
from .datasets import Dataset
from .features import decode as decode_sketch
from .scores import compute_scores
from .threshold import choose_threshold, parse_threshold

STATUSES = ("flagged", "no_poison_found", "undecided")


@dataclass
class Decision:
    values: np.ndarray                 # (N,) float64 primary score per sample, NaN where not scored
    value_name: str                    # what `values` is ("gradsentry", ...)
    flagged: np.ndarray                # (N,) bool, scored samples only (unscorable rows are flagged by outputs)
    reasons: List[Optional[str]]       # (N,) why each scored sample is flagged or kept
    status: str                        # one of STATUSES
    summary: dict                      # the rule, its threshold(s), groups, evidence; JSON-ready
    components: List[dict] = field(default_factory=list)  # (N,) named numbers per sample, JSON-ready
    threshold: Optional[float] = None  # a cut on `values`, when the rule has one (drawn on the histogram)
    plot_axes: Optional[tuple] = None  # two component names for the 2-D plot, when the rule has them


def threshold_decision(rows: List[Optional[dict]], dataset: Dataset, score: str, spectrum: str,
                       threshold: str) -> Decision:
    """GradSentry's way: one score per sample, flagged above a threshold chosen by a 1-D rule."""
    # Rounded to 10 decimals, far below the float32 noise of the forward pass, so that reruns in other processes
    # (thread scheduling changes the last float64 bits) write byte-identical files.
    values = np.round(compute_scores(rows, score=score, spectrum=spectrum), 10)
    rule, ratio = parse_threshold(threshold)
    finite = np.isfinite(values)
    th = choose_threshold(values[finite], rule, ratio)
    components = [{score: float(v)} if np.isfinite(v) else {} for v in values]
    summary = {"rule": rule, "threshold": th.as_dict()}
    if th.details.get("bandwidth") and finite.sum() > 1:   # the density the KDE rule looked at, for the histogram
        x, bw = values[finite], th.details["bandwidth"]
        grid = np.linspace(x.min() - bw, x.max() + bw, 128)
        y = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / bw) ** 2).sum(1) / (x.size * bw * np.sqrt(2 * np.pi))
        summary["density"] = {"x": np.round(grid, 6).tolist(), "y": np.round(y, 6).tolist(), "bandwidth": bw}
    if th.reason.startswith("fallback") or not finite.any():
        # No structure found. A fallback constant such as the KDE's 0.7 is foreign to the score's scale (it flagged
        # every sample of one set and none of another), so nothing is flagged on the rule's account.
        why = th.reason.split(": ", 1)[-1] if th.reason.startswith("fallback") else "no sample has a finite score"
        summary["threshold"]["value"] = None
        summary["why"] = why
        reasons = [f"kept: the {rule} rule could not decide ({why})" if ok else None for ok in finite]
        return Decision(values, score, np.zeros(len(values), dtype=bool), reasons, "undecided", summary,
                        components, None)
    flagged = th.flags(values)   # top-k flags by rank (exactly k), the other rules by value
    reasons = [th.explain(v, f) if ok else None for v, ok, f in zip(values, finite, flagged)]
    if not flagged.any():
        summary["evidence"] = (f"no score above the threshold {th.value:.4f} ({th.reason}); the highest is "
                               f"{values[finite].max():.4f}")
    return Decision(values, score, flagged, reasons, "flagged" if flagged.any() else "no_poison_found", summary,
                    components, th.value)


def association_decision(rows: List[Optional[dict]], dataset: Dataset, decode_token=None,
                         config: Optional[AssociationConfig] = None) -> Decision:
    """The association rule (association.py): flags the samples whose answer joins a shared payload cluster that
    goes with trigger tokens in their prompts; GradSentry's entropy is a component and a vote, not the cut."""
    config = config or AssociationConfig()
    entropy = np.round(compute_scores(rows, score="gradsentry", spectrum="svd"), 10)
    scored = [i for i, r in enumerate(rows) if r is not None and r.get("sketch") and np.isfinite(entropy[i])]
    n = len(rows)
    if not scored:
        return Decision(entropy, "gradsentry", np.zeros(n, bool), [None] * n, "undecided",
                        {"rule": "association", "why": "no sample has a sketch (no answer token scored)"},
                        [{} for _ in rows])
    sketches = _sketch_matrix(rows, scored)
    prompts = [dataset.samples[i].prompt_ids for i in scored]
    answers = [dataset.samples[i].answer_ids for i in scored]
    result = associate(sketches, prompts, entropy[scored], config, answers)
    words = (lambda ids: [decode_token(t) for t in ids]) if decode_token else (lambda ids: ids)
    groups = [{**g.figures(), "trigger_text": words(g.tokens)} for g in result.accepted]
    flagged = np.zeros(n, bool)
    flagged[scored] = result.flagged
    components: List[dict] = [{} for _ in rows]
    reasons: List[Optional[str]] = [None] * n
    x = result.unit
    centre = _payload_direction(x, result.flagged)
    for j, i in enumerate(scored):
        c = {"gradsentry": float(entropy[i]), "neighbours_in_cluster": int(result.inside[j])}
        if centre is not None:
            c["payload_similarity"] = round(float(x[j] @ centre), 6)
        if result.group[j] >= 0:
            g = groups[result.group[j]]
            c["cluster"] = int(result.group[j])
            reasons[i] = (f"answer joins payload cluster {c['cluster']} (core {g['core']}, purity {g['purity']:.2f}) "
                          f"whose prompts share {g['trigger_text'][:4]}")
        else:
            reasons[i] = "kept: its answer joins no payload cluster that goes with shared prompt tokens"
        components[i] = c
    best = max(result.candidates, key=lambda g: g.purity + g.entropy_lift, default=None)
    summary = {"rule": "association", "config": asdict(config), "clusters": groups,
               "candidates_tested": len(result.candidates)}
    status = "flagged" if flagged.any() else "no_poison_found"
    if not flagged.any():
        summary["evidence"] = ("no candidate answer cluster had prompt tokens over-represented with purity >= "
                               f"{config.min_purity}, entropy lift >= {config.min_entropy_lift} and their sum >= "
                               f"{config.min_evidence}, and answers sharing content (shared_text >= "
                               f"{config.min_shared_text})" +
                               (f"; the strongest was {best.figures()}" if best is not None else
                                "; no candidate had over-represented prompt tokens"))
    return Decision(entropy, "gradsentry", flagged, reasons, status, summary, components, None,
                    ("gradsentry", "payload_similarity") if centre is not None else None)


def _sketch_matrix(rows: List[Optional[dict]], scored: List[int]) -> np.ndarray:
    """(len(scored), D) float16: the stored sketches, decoded one row at a time into one array. Stacking the decoded
    rows and casting to float32 held three copies at once (6 GB at a million samples); associate() makes the one
    float32 copy it works on, or from `project_rows` samples on only row blocks of it."""
    first = decode_sketch(rows[scored[0]]["sketch"])
    out = np.empty((len(scored), first.size), dtype=np.float16)
    for j, i in enumerate(scored):
        row = decode_sketch(rows[i]["sketch"])
        if row.size != first.size:
            raise ValueError(f"sample {i}'s stored sketch has {row.size} values where sample {scored[0]}'s has "
                             f"{first.size}: the part files come from scans with different sketch settings; "
                             "delete the output directory's parts/ and scan again")
        out[j] = row
    return out


def _payload_direction(x: np.ndarray, flagged: np.ndarray) -> Optional[np.ndarray]:
    """Unit direction from the rest of the set to the flagged samples (the 2-D plot's axis), None when none."""
    if not flagged.any() or flagged.all():
        return None
    v = x[flagged].mean(0) - x[~flagged].mean(0)
    return v / max(float(np.linalg.norm(v)), 1e-12)
