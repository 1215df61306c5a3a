"""Part files: the raw per-sample results of a scan, one JSON line per sample, appended a whole batch at a time.

A kill mid-write leaves at most a torn last line, which `read_part` cuts off; `merge_parts` joins every rank's part.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from .datasets import Dataset

PARTS = "parts"


def read_part(path: str) -> List[dict]:
    """Complete lines of a part file; a torn last line (a kill mid-write) is cut off the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        data = fh.read()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(keep))
    return [json.loads(line) for line in keep.decode("utf-8").splitlines() if line.strip()]


def merge_parts(out_dir: str, dataset: Dataset) -> List[Optional[dict]]:
    """Raw rows of every part file, by sample index; a duplicate or a missing scorable sample is an error."""
    rows: List[Optional[dict]] = [None] * len(dataset)
    part_dir = os.path.join(out_dir, PARTS)
    for name in sorted(os.listdir(part_dir)) if os.path.isdir(part_dir) else []:
        if not name.endswith(".jsonl"):
            continue
        for row in read_part(os.path.join(part_dir, name)):
            i = row["index"]
            if rows[i] is not None:
                raise RuntimeError(f"sample {i} appears twice in {part_dir}")
            rows[i] = row
    missing = [s.index for s in dataset.samples if not s.problem and rows[s.index] is None]
    if missing:
        raise RuntimeError(f"{len(missing)} samples have no result yet (first: {missing[:5]}); rerun the scan")
    return rows
