"""The outputs of a scan: scores.jsonl, flagged.jsonl, clean.<ext>, summary.json and histogram.png, from the merged
raw results (each file written whole and renamed into place)."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from ..io.files import write_json, write_lines
from .datasets import Dataset
from .parts import merge_parts
from .decision import threshold_decision
from .scores import DEFAULT_SCORE


def finish(out_dir: str, dataset: Dataset, spectrum: str = "svd", score: str = DEFAULT_SCORE,
           threshold: str = "kde", seconds: Optional[float] = None, extra: Optional[dict] = None) -> dict:
    """Merge the parts, choose the threshold, write scores.jsonl, flagged.jsonl, clean.<ext>, summary.json and
    histogram.png (each written whole and renamed into place). Returns the summary."""
    rows = merge_parts(out_dir, dataset)
    decision = threshold_decision(rows, dataset, score, spectrum, threshold)
    values = decision.values
    flagged_idx, clean_idx, lines = [], [], []
    for s in dataset.samples:
        value = values[s.index]
        n = rows[s.index]["n_answer_tokens"] if rows[s.index] else 0
        if s.problem:
            flag, reason = True, s.problem
        elif not np.isfinite(value):
            flag, reason = True, "no finite score (no answer token scored)"
        else:
            flag, reason = bool(decision.flagged[s.index]), decision.reasons[s.index]
        if s.truncation and not s.problem:
            reason += f"; truncated: {s.truncation}"
        (flagged_idx if flag else clean_idx).append(s.index)
        lines.append(json.dumps({"id": s.id, "score": float(value) if np.isfinite(value) else None,
                                 "n_answer_tokens": n, "flagged": flag, "reason": reason}, ensure_ascii=False))
    write_lines(os.path.join(out_dir, "scores.jsonl"), lines)
    flagged_set = Dataset(dataset.path, "jsonl", dataset.samples, dataset.columns)
    flagged_set.write(os.path.join(out_dir, "flagged.jsonl"), flagged_idx)
    ext = {"jsonl": ".jsonl", "json": ".json", "csv": ".csv"}[dataset.format]
    dataset.write(os.path.join(out_dir, f"clean{ext}"), clean_idx)
    scored = int(np.isfinite(values).sum())
    summary = {"threshold": decision.summary["threshold"], "decision": decision.summary, "status": decision.status,
               "score": score, "spectrum": spectrum,
               "counts": {"samples": len(dataset), "scored": scored, "flagged": len(flagged_idx),
                          "clean": len(clean_idx), "unscorable": len(dataset) - scored,
                          "truncated": sum(1 for s in dataset.samples if s.truncation)},
               "timings": {"seconds": seconds, "samples_per_s": (scored / seconds) if seconds else None},
               **(extra or {})}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    histogram(values[np.isfinite(values)], decision, os.path.join(out_dir, "histogram.png"))
    return summary


def histogram(values: np.ndarray, decision, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=min(60, max(10, len(values) // 5)), color="#4878a8")
    th = decision.threshold
    if th is not None and np.isfinite(th):
        ax.axvline(th, color="#c03030", linestyle="--", label=f"threshold {th:.3f} ({decision.summary['rule']})")
        ax.legend()
    ax.set_xlabel(f"score ({decision.value_name})")
    ax.set_ylabel("samples")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
