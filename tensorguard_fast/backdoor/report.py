"""report.html: one self-contained page a reviewer can read without Python: the outcome, the counts, the rule, the
pictures (embedded as base64) and every flagged sample with its text and reasons. All text is escaped."""
from __future__ import annotations

import base64
import html
import json
import os
from typing import List

MAX_SAMPLES = 1000      # flagged samples listed in full; the rest are counted (flagged.jsonl has them all)
MAX_TEXT = 2000         # characters of a prompt or answer shown

_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;width:100%;font-size:13px}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}
th{background:#eee;text-align:left}pre{white-space:pre-wrap;margin:0;font-size:12px}
.status{font-size:18px;padding:8px;border-radius:4px}.flagged{background:#fde2e2}.no_poison_found{background:#e2f5e2}
.undecided{background:#fff1c6}"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f" ... [{len(text) - MAX_TEXT} more characters]"


def _image(path: str, alt: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _sample_row(item: dict) -> str:
    tokens = ", ".join(f"{_e(repr(t))} ({n:.3g})" for t, n in item.get("top_tokens") or [])
    components = ", ".join(f"{_e(k)}={v:.4g}" if isinstance(v, (int, float)) else f"{_e(k)}={_e(v)}"
                           for k, v in (item.get("components") or {}).items())
    score = item.get("score")
    return (f"<tr><td>{_e(item['id'])}</td><td>{_e(item.get('line') or '')}</td>"
            f"<td>{'' if score is None else f'{score:.4f}'}</td><td>{_e(item['reason'])}</td>"
            f"<td>{components}</td><td>{tokens}</td><td><pre>{_e(_cut(item['prompt_text']))}</pre></td>"
            f"<td><pre>{_e(_cut(item['answer_text']))}</pre></td></tr>")


def write_report(path: str, summary: dict, flagged: List[dict], images: List[tuple]) -> None:
    """Write report.html. flagged: explanation rows with prompt_text / answer_text; images: (png path, caption)."""
    counts = summary["counts"]
    facts = {"input": summary.get("data"), "model": summary.get("model"), "score": summary.get("score"),
             "spectrum": summary.get("spectrum"), "rule": (summary.get("decision") or {}).get("rule"),
             "threshold": json.dumps(summary.get("threshold"), sort_keys=True),
             "tensorguard-fast": summary.get("version")}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tensorguard-fast scan report</title>"
             f"<style>{_STYLE}</style></head><body><h1>Backdoor scan report</h1>",
             f"<p class='status {_e(summary['status'])}'><b>{_e(summary['status'])}</b>: {_e(summary['outcome'])}</p>",
             "<p>" + ", ".join(f"{_e(k)}: {_e(v)}" for k, v in counts.items()) + "</p>",
             "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items()
                                 if v is not None) + "</table>"]
    parts += [_image(p, caption) for p, caption in images]
    parts.append(f"<h2>Flagged samples ({len(flagged)})</h2>")
    if flagged:
        parts.append("<table><tr><th>id</th><th>line</th><th>score</th><th>reason</th><th>components</th>"
                     "<th>top answer tokens (error norm)</th><th>prompt</th><th>answer</th></tr>")
        parts += [_sample_row(item) for item in flagged[:MAX_SAMPLES]]
        parts.append("</table>")
        if len(flagged) > MAX_SAMPLES:
            parts.append(f"<p>... and {len(flagged) - MAX_SAMPLES} more: see flagged.jsonl</p>")
    else:
        parts.append("<p>None.</p>")
    parts.append("</body></html>\n")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write("\n".join(parts))
    os.replace(tmp, path)
