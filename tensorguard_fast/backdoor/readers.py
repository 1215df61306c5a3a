"""Dataset files read into rows, byte-exact, with every unreadable row kept and named instead of aborting the read.

JSONL (.jsonl, .ndjson): the bytes are split on b"\\n" only, so U+2028 / U+2029 / U+0085 inside a JSON string stay in
their row; a trailing "\\r" (CRLF files) is ignored by the parser and kept for the write-back; a UTF-8 BOM at the start
is dropped; blank lines are not rows. A line that is not UTF-8, not JSON, or nested too deep for the parser becomes a
row with its problem and its exact bytes (written back unchanged).

JSON (.json): a list of records, or an object holding one list of records (e.g. {"version": 1, "data": [...]}: the
other keys are written back around the clean list). A .json file that is JSON Lines (what `datasets`' to_json
writes) is read as JSON Lines and written back as JSON Lines. Records of a list get their line numbers; one nested
too deep for the parser becomes a row with its problem.

CSV (.csv): a header row; a BOM is dropped; cells are kept as read and written back cell for cell; a duplicated
header name is refused (the record would hold only one of the two values); a row with the wrong number of cells, or
bytes that are not UTF-8, becomes a row with its problem.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_TOKEN = re.compile(r'["\[\]{}]')


@dataclass
class Row:
    position: int                 # 1-based record number in the input
    line: Optional[int]           # 1-based line where the record starts, None when the source has no lines
    record: Any                   # the record as read; None when it could not be read
    raw: Optional[bytes] = None   # exact input bytes of the row (JSONL line without "\n"), written back unchanged
    cells: Optional[list] = None  # CSV cells as read
    problem: Optional[str] = None  # why the row cannot be read (the caller names the file and line)


@dataclass
class Source:
    name: str                     # what messages call the input (its path or dataset name)
    format: str                   # jsonl | json | csv | parquet
    rows: List[Row]
    digest: str                   # sha256 of the content read
    columns: Optional[List[str]] = None   # CSV header
    wrapper: Optional[tuple] = None       # (the JSON object, the key of its record list)
    table: Any = None             # pyarrow Table or datasets.Dataset to write a parquet subset from
    clean_ext: str = ".jsonl"     # extension of the clean file written back


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse_json(text: str) -> tuple:
    """(value, problem) of one JSON text; problems are short and on one line."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "JSON nested too deep to read"
    except ValueError as exc:   # e.g. an integer longer than Python's digit limit
        return None, f"not readable JSON: {_one_line(exc)}"


def read_jsonl(name: str, data: bytes) -> Source:
    rows = []
    body = data[len(BOM):] if data.startswith(BOM) else data
    for n, raw in enumerate(body.split(b"\n"), 1):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"byte 0x{line[exc.start]:02x} at column {exc.start + 1} is not UTF-8"
            rows.append(Row(len(rows) + 1, n, None, raw=raw, problem=problem))
            continue
        record, problem = parse_json(text)
        rows.append(Row(len(rows) + 1, n, record, raw=raw, problem=problem))
    return Source(name, "jsonl", rows, hashlib.sha256(data).hexdigest())


def _value_end(text: str, i: int) -> int:
    """Index just past the JSON container starting at text[i], found without recursion (for values nested deeper
    than the parser's recursion limit). Raises ValueError when it is not closed."""
    depth = 0
    pos = i
    while True:
        m = _TOKEN.search(text, pos)
        if m is None:
            raise ValueError(f"unterminated value starting at offset {i}")
        ch = m.group()
        if ch == '"':
            s = _STRING.match(text, m.start())
            if s is None:
                raise ValueError(f"unterminated string at offset {m.start()}")
            pos = s.end()
            continue
        depth += 1 if ch in "[{" else -1
        pos = m.end()
        if depth == 0:
            return pos


def _array_rows(name: str, text: str, start: int) -> Iterator[Row]:
    """Rows of the JSON array starting at text[start] == "[", each with its line; the rest must be whitespace."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def where(i):
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    i = _WS.match(text, start + 1).end()
    if text[i:i + 1] == "]":
        i = _WS.match(text, i + 1).end()
    else:
        n = 0
        while True:
            n += 1
            at = where(i)
            try:
                value, end = decoder.raw_decode(text, i)
                problem = None
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
            except RecursionError:
                value, problem = None, "JSON nested too deep to read"
                try:
                    end = _value_end(text, i)
                except ValueError as exc:
                    raise ValueError(f"{name}: not valid JSON at line {at}: {exc}") from None
            except ValueError as exc:
                value, problem, end = None, f"not readable JSON: {_one_line(exc)}", _value_end_scalar(text, i)
            raw = None
            if problem is not None:   # keep the element's own text (one line) for flagged.jsonl
                raw = re.sub(r"[\r\n]", " ", text[i:end]).encode("utf-8", "surrogateescape")
            yield Row(n, at, value, raw=raw, problem=problem)
            i = _WS.match(text, end).end()
            if text[i:i + 1] == ",":
                i = _WS.match(text, i + 1).end()
                continue
            if text[i:i + 1] != "]":
                raise ValueError(f"{name}: not valid JSON at line {where(i)}: expected ',' or ']' after record {n}")
            i = _WS.match(text, i + 1).end()
            break
    if i != len(text):
        raise ValueError(f"{name}: not valid JSON at line {where(i)}: extra data after the list of records")


def _value_end_scalar(text: str, i: int) -> int:
    """End of a scalar (a number the parser refused) starting at text[i]."""
    m = re.compile(r"[^,\]\s]*").match(text, i)
    return m.end()


def read_json(name: str, data: bytes) -> Source:
    digest = hashlib.sha256(data).hexdigest()
    text = data.decode("utf-8-sig", "surrogateescape")   # bad bytes become U+DCxx and are flagged per record
    start = _WS.match(text).end()
    if text[start:start + 1] == "[":
        return Source(name, "json", list(_array_rows(name, text, start)), digest, clean_ext=".json")
    if text[start:start + 1] != "{":
        raise ValueError(f"{name}: expected a JSON list of records, an object holding one, or JSON Lines")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # JSON Lines saved as .json (what datasets' to_json writes): the first line is a record by itself.
        first = text[start:].split("\n", 1)[0]
        if isinstance(exc, RecursionError) or isinstance(parse_json(first)[0], dict) \
                or not isinstance(exc, json.JSONDecodeError):
            return _as_json_lines(name, data)
        raise ValueError(f"{name}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    lists = [k for k, v in doc.items() if isinstance(v, list)]
    key = "data" if "data" in lists else (lists[0] if len(lists) == 1 else None)
    if key is not None:
        rows = [Row(n, None, r) for n, r in enumerate(doc[key], 1)]
        return Source(name, "json", rows, digest, wrapper=(doc, key), clean_ext=".json")
    if len([ln for ln in text.splitlines() if ln.strip()]) == 1:   # one JSON Lines record
        return _as_json_lines(name, data)
    raise ValueError(f"{name}: a JSON object without a list of records (keys {sorted(doc)[:8]}); expected a list, "
                     "an object like {\"data\": [...]}, or JSON Lines")


def _as_json_lines(name: str, data: bytes) -> Source:
    source = read_jsonl(name, data)
    source.clean_ext = ".json"
    return source


def read_csv(name: str, data: bytes) -> Source:
    text = data.decode("utf-8-sig", "surrogateescape")
    if not text.strip():
        raise ValueError(f"{name} is empty: no samples to scan")
    old_limit = csv.field_size_limit(sys.maxsize)   # one huge cell is a row to score, not a reader crash
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader)
        seen = {}
        for k, col in enumerate(header):
            if col in seen:
                raise ValueError(f"{name}: column {col!r} appears twice in the header (columns {seen[col] + 1} and "
                                 f"{k + 1}); rename one")
            seen[col] = k
        rows = []
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise ValueError(f"{name}: line {start}: not readable CSV: {_one_line(exc)}") from None
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue   # a blank line is not a record
            problem = None
            if len(cells) != len(header):
                problem = f"{len(cells)} cells, but the header has {len(header)} columns"
                record = cells
            else:
                record = dict(zip(header, cells))
            rows.append(Row(len(rows) + 1, start, record, cells=cells, problem=problem))
    finally:
        csv.field_size_limit(old_limit)
    return Source(name, "csv", rows, hashlib.sha256(data).hexdigest(), columns=header, clean_ext=".csv")
