"""Samples written back in their input's own format (the clean set) or as JSON Lines (the flagged set).

JSONL rows are copied byte for byte from the input (CRLF, odd spacing and invalid bytes included); records that
have no input bytes (CSV, JSON, Parquet rows) are written as one JSON line each, with \\u escapes only where a string
is not valid Unicode. JSON keeps the object around the record list; CSV keeps the header and every cell; Parquet
keeps the table's schema.
"""
from __future__ import annotations

import csv
import json
from typing import List


def json_line(value) -> bytes:
    """One JSON line (no newline) of a record; non-JSON values (dates, bytes) as their text."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate: its \u escape is valid JSON and valid UTF-8
        return json.dumps(value, ensure_ascii=True, default=str).encode("ascii")


def write_samples(dataset, samples: List, path: str) -> None:
    fmt = dataset.format
    if fmt == "jsonl":
        with open(path, "wb") as fh:
            for s in samples:
                raw = s.raw if s.raw is not None else json_line(s.cells if s.record is None else s.record)
                fh.write(raw + b"\n")
    elif fmt == "json":
        records = [s.record for s in samples]
        if dataset.wrapper is not None:
            doc, key = dataset.wrapper
            records = {k: (records if k == key else v) for k, v in doc.items()}
        with open(path, "wb") as fh:
            fh.write(_json_document(records) + b"\n")
    elif fmt == "csv":
        # surrogateescape: bytes that were not UTF-8 in the input (flagged rows) go back out as the same bytes
        with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(dataset.columns or [])
            for s in samples:
                writer.writerow(s.cells if s.cells is not None else [s.record.get(c, "") for c in dataset.columns])
    elif fmt == "parquet":
        from .arrow_sources import write_parquet

        write_parquet(dataset.table, path, [s.index for s in samples])
    else:
        raise ValueError(f"cannot write the format {fmt!r}")


def _json_document(value) -> bytes:
    text = json.dumps(value, ensure_ascii=False, indent=1, default=str)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, indent=1, default=str).encode("ascii")

