"""The outputs of a scan, rendered from the merged raw results and a `Decision` (each file written whole and renamed
into place; nothing is written outside the output directory):

    scores.jsonl     one explanation row per input sample, in input order: index, id, line, score, n_answer_tokens,
                     flagged, reason, components (every number the decision looked at), top_tokens (the answer tokens
                     carrying most of the sample's gradient, when the scan recorded them)
    flagged.jsonl    the same explanation rows for the flagged samples only, each with the record as read ("input")
    clean.<ext>      the kept samples, in the input's own format
    removed.<ext>    the flagged samples, in the input's own format (clean + removed = the input, row for row)
    summary.json     status and outcome, counts, flagged ids, score statistics, the rule's summary, version, input
                     digests, timings
    histogram.png    the primary score with the rule's density, threshold and reason
    scatter.png      two components against each other, when the decision names them (Decision.plot_axes)
    report.html      all of it on one self-contained page, with the flagged samples' text
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, List, Optional

import numpy as np

from .._version import __version__
from ..io.files import write_json, write_lines
from .datasets import Dataset
from .decision import Decision, threshold_decision
from .parts import merge_parts
from .plots import histogram, scatter
from .report import write_report

log = logging.getLogger(__name__)
MAX_IDS = 100   # flagged ids listed in summary.json (all of them are in flagged.jsonl)


def finish(out_dir: str, dataset: Dataset, spectrum: str = "svd", score: str = "gradsentry",
           threshold: str = "kde", seconds: Optional[float] = None, extra: Optional[dict] = None,
           decide: Optional[Callable[[List[Optional[dict]], Dataset], Decision]] = None) -> dict:
    """Merge the parts, decide (decide(rows, dataset) -> Decision; default: GradSentry's threshold rule with
    `score`, `spectrum`, `threshold`) and write every output file (module docstring). Returns the summary."""
    rows = merge_parts(out_dir, dataset)
    decision = decide(rows, dataset) if decide else threshold_decision(rows, dataset, score, spectrum, threshold)
    explained = [explain(s, rows[s.index], decision) for s in dataset.samples]
    write_lines(os.path.join(out_dir, "scores.jsonl"), [json_line(e) for e in explained])
    flagged = [e for e in explained if e["flagged"]]
    write_lines(os.path.join(out_dir, "flagged.jsonl"),
                [json_line({**e, "input": _input(dataset.samples[e["index"]])}) for e in flagged])
    clean_idx = [e["index"] for e in explained if not e["flagged"]]
    dataset.write(os.path.join(out_dir, dataset.clean_name), clean_idx)
    dataset.write(os.path.join(out_dir, removed_name(dataset)), [e["index"] for e in flagged])

    summary = _summary(out_dir, dataset, decision, explained, score, spectrum, seconds, extra)
    write_json(os.path.join(out_dir, "summary.json"), summary)
    if decision.status == "undecided":
        log.warning("%s", summary["outcome"])
    images = [(os.path.join(out_dir, "histogram.png"), "scores, the rule's density and threshold")]
    histogram(decision, images[0][0], caption=summary["outcome"])
    scatter_path = os.path.join(out_dir, "scatter.png")
    if scatter(decision, scatter_path):
        images.append((scatter_path, f"{decision.plot_axes[0]} vs {decision.plot_axes[1]}"))
    for e in flagged:
        s = dataset.samples[e["index"]]
        e["prompt_text"], e["answer_text"] = _texts(s)
    write_report(os.path.join(out_dir, "report.html"), summary, flagged, images)
    return summary


def removed_name(dataset: Dataset) -> str:
    """removed.<ext>: the flagged rows in the input's own format, beside clean.<ext>."""
    return "removed" + os.path.splitext(dataset.clean_name)[1]


def explain(s, row: Optional[dict], decision: Decision) -> dict:
    """The explanation row of one sample: why it is flagged or kept, and every number behind that."""
    value = float(decision.values[s.index])
    finite = bool(np.isfinite(value))
    if s.problem:
        flag, reason = True, s.problem
    elif row and row.get("problem"):
        flag, reason = True, row["problem"]
    elif not finite:
        flag, reason = True, "no finite score (no answer token scored)"
    else:
        flag, reason = bool(decision.flagged[s.index]), decision.reasons[s.index] or ""
    if s.truncation and not s.problem:
        reason += f"; truncated: {s.truncation}"
    out = {"index": s.index, "id": s.id, "line": s.line, "score": value if finite else None,
           "n_answer_tokens": row.get("n_answer_tokens", 0) if row else 0, "flagged": flag, "reason": reason,
           "components": decision.components[s.index] if decision.components else {}}
    if row and row.get("top_tokens") is not None:
        out["top_tokens"] = row["top_tokens"]
    return out


def json_line(obj) -> str:
    """One JSON line, UTF-8 text where possible; ASCII escapes when a string is not valid Unicode (a lone surrogate
    would otherwise crash the UTF-8 write after all the scoring)."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, default=str)
    return text


def _raw_text(s) -> Optional[str]:
    if isinstance(s.raw, bytes):
        return s.raw.decode("utf-8", "replace")
    return s.raw


def _input(s):
    """The record as read, or the exact text of a row that could not be read."""
    if s.record is not None and not (s.problem and isinstance(s.record, str)):
        return s.record
    return _raw_text(s) if s.raw is not None else (s.cells if getattr(s, "cells", None) else s.record)


def _texts(s) -> tuple:
    """(prompt, answer) as plain text for the report; an unreadable row shows its raw input as the prompt."""
    if s.prompt is None and s.answer is None:
        shown = _input(s)
        return (shown if isinstance(shown, str) else json.dumps(shown, ensure_ascii=False, default=str)), ""
    prompt = s.prompt
    if isinstance(prompt, list):
        prompt = "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt or ""), str(s.answer or "")


def score_statistics(values: np.ndarray) -> Optional[dict]:
    """min / quantiles / max / mean of the finite primary values; None when nothing was scored."""
    x = values[np.isfinite(values)]
    if not x.size:
        return None
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(x.size), "min": float(x.min()), "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]),
            "q75": float(q[3]), "q95": float(q[4]), "max": float(x.max()), "mean": float(x.mean())}


def outcome(decision: Decision, counts: dict) -> str:
    """The scan's result in one plain sentence."""
    n, k, bad = counts["samples"], counts["flagged"], counts["unscorable"]
    unscorable = f", {bad} of them unscorable" if bad else ""
    if decision.status == "undecided":
        rule = decision.summary.get("rule", "decision")
        why = decision.summary.get("why", "it found no structure")
        return (f"the {rule} rule could not decide ({why}): nothing was flagged on its account ({k} of {n} samples "
                f"flagged{unscorable}); choose a rule that needs no structure, e.g. --threshold mad or topk:RATIO")
    if decision.status == "no_poison_found":
        evidence = decision.summary.get("evidence", "no sample passed the rule")
        return f"no poison found: {evidence} ({k} of {n} samples flagged{unscorable})"
    th = decision.summary.get("threshold") or {}
    rule = f"; {th.get('rule')}: {th.get('reason')}" if th.get("reason") else ""
    return f"{k} of {n} samples flagged{unscorable}{rule}"


def _inputs(out_dir: str) -> dict:
    """The content digests scan_config.json recorded (data, model, chat template), for the summary."""
    try:
        with open(os.path.join(out_dir, "scan_config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in config.items() if "sha256" in k or k in ("model_files", "model_tensors", "dtype",
                                                                        "device")}


def _summary(out_dir, dataset, decision, explained, score, spectrum, seconds, extra) -> dict:
    values = decision.values
    scored = int(np.isfinite(values).sum())
    flagged_ids = [e["id"] for e in explained if e["flagged"]]
    counts = {"samples": len(dataset), "scored": scored, "flagged": len(flagged_ids),
              "clean": len(explained) - len(flagged_ids), "unscorable": len(dataset) - scored,
              "truncated": sum(1 for s in dataset.samples if s.truncation)}
    decision_summary = dict(decision.summary)
    return {"version": __version__, "status": decision.status, "outcome": outcome(decision, counts),
            "threshold": decision_summary.get("threshold"), "decision": decision_summary, "score": score,
            "spectrum": spectrum, "counts": counts, "flagged_ids": flagged_ids[:MAX_IDS],
            "flagged_ids_listed": min(len(flagged_ids), MAX_IDS), "score_statistics": score_statistics(values),
            "inputs": _inputs(out_dir), "files": {"clean": dataset.clean_name, "removed": removed_name(dataset)},
            "timings": {"seconds": seconds, "samples_per_s": (scored / seconds) if seconds else None},
            **(extra or {})}
