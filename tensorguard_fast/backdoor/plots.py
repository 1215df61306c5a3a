"""The two pictures of a scan: histogram.png (the primary score, the rule's density and threshold, the reason) and
scatter.png (two components of the decision against each other, flagged samples in colour)."""
from __future__ import annotations

import os
import textwrap
from typing import Optional

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    plt = _pyplot()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def histogram(decision, path: str, caption: Optional[str] = None) -> None:
    """Histogram of the finite primary values, with the rule's density (when its summary has one, scaled to sample
    counts) and threshold, and a caption saying what the rule concluded."""
    plt = _pyplot()
    values = decision.values[np.isfinite(decision.values)]
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = min(60, max(10, len(values) // 5))
    if values.size:
        _, edges, _ = ax.hist(values, bins=bins, color="#4878a8", label=f"{values.size} scored samples")
        density = decision.summary.get("density")
        if density:
            width = edges[1] - edges[0] if len(edges) > 1 else 1.0
            ax.plot(density["x"], np.asarray(density["y"]) * values.size * width, color="#e08020",
                    label=f"{decision.summary.get('rule', 'rule')} density")
    else:
        ax.text(0.5, 0.5, "no sample could be scored", ha="center", va="center", transform=ax.transAxes)
    th = decision.threshold
    if th is not None and np.isfinite(th):
        ax.axvline(th, color="#c03030", linestyle="--", label=f"threshold {th:.3f} ({decision.summary.get('rule')})")
    if values.size or (th is not None and np.isfinite(th)):
        ax.legend(fontsize=8)
    ax.set_xlabel(f"score ({decision.value_name})")
    ax.set_ylabel("samples")
    if caption:
        ax.set_title("\n".join(textwrap.wrap(caption, 90)[:3]), fontsize=8)
    _save(fig, path)


def scatter(decision, path: str) -> bool:
    """component x vs component y of decision.plot_axes, flagged samples in red; False when there is nothing to
    draw (no axes named, or no sample has both components)."""
    if not decision.plot_axes or len(decision.plot_axes) != 2:
        return False
    xname, yname = decision.plot_axes
    points = [(c.get(xname), c.get(yname), bool(f)) for c, f in zip(decision.components, decision.flagged)]
    points = [(x, y, f) for x, y, f in points if isinstance(x, (int, float)) and isinstance(y, (int, float))]
    if not points:
        return False
    plt = _pyplot()
    xy = np.array([(x, y) for x, y, _ in points], dtype=np.float64)
    flagged = np.array([f for _, _, f in points])
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(xy[~flagged, 0], xy[~flagged, 1], s=12, color="#4878a8", label=f"kept ({(~flagged).sum()})")
    ax.scatter(xy[flagged, 0], xy[flagged, 1], s=16, color="#c03030", label=f"flagged ({flagged.sum()})")
    ax.set_xlabel(xname)
    ax.set_ylabel(yname)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True
