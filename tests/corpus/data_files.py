"""A malformed-input corpus for the backdoor filter's dataset reader, written at test time (issue 10).

`build(root)` writes every file into `root` and returns [(path, expected)], where expected is the number of rows the
input holds (every one must come out in exactly one of clean / flagged) or "error" (a one-line error that names the
input, and nothing written). Each entry is a probe a careless or hostile user could send; the comment says which.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Tuple, Union

Q = {"question": "Capital of France?", "answer": "Paris"}
GOOD = json.dumps(Q).encode()
DEEP = b"[" * 200_000 + b"]" * 200_000   # deeper than any recursive JSON parser goes


def _lines(*rows: bytes, end: bytes = b"\n") -> bytes:
    return b"".join(r + end for r in rows)


def _j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# name -> (content bytes, or a function that writes the path; expected rows or "error")
Entry = Tuple[str, Union[bytes, Callable[[Path], None], None], Union[int, str]]


def _text_entries() -> List[Entry]:
    qa = [_j({"id": f"q{k}", "question": f"Question {k}?", "answer": f"Answer {k}"}) for k in range(3)]
    return [
        ("good.jsonl", _lines(*qa), 3),
        ("good.ndjson", _lines(*qa[:2]), 2),
        ("empty.jsonl", b"", "error"),
        ("only_whitespace.jsonl", b"  \n\t\n\r\n", "error"),
        ("only_bom.jsonl", b"\xef\xbb\xbf\n", "error"),
        ("crlf.jsonl", _lines(*qa[:2], end=b"\r\n"), 2),
        ("bom.jsonl", b"\xef\xbb\xbf" + _lines(*qa[:2]), 2),
        ("line_separators.jsonl", _lines(*[_j({"question": f"a{s}b", "answer": f"c{s}d"})
                                           for s in ("\u2028", "\u2029", "\u0085")]), 3),
        ("not_json_line.jsonl", _lines(GOOD, b'{"question": "oops"', GOOD), 3),
        ("non_utf8.jsonl", _lines(GOOD, b'{"question": "caf\xe9", "answer": "x"}'), 2),
        ("deep_nesting.jsonl", _lines(GOOD, DEEP), 2),
        ("lone_surrogate_id.jsonl", _lines(GOOD, b'{"id": "\\ud800", "question": "q", "answer": "a"}'), 2),
        ("lone_surrogate_answer.jsonl", _lines(GOOD, b'{"question": "q", "answer": "x\\udfffy"}'), 2),
        ("wrong_types.jsonl", _lines(b"[1, 2]", b'"text"', b"42", b"null", b"true", GOOD), 6),
        ("answer_list_dict_number.jsonl", _lines(*[_j({"question": "q", "answer": a})
                                                   for a in (["x", "y"], {"k": "v"}, 3.5, True, [], 0)]), 6),
        ("nulls.jsonl", _lines(_j({"question": None, "answer": "a"}), _j({"question": "q", "answer": None}),
                               _j({"question": None, "answer": None})), 3),
        ("missing_fields.jsonl", _lines(_j({"question": "q"}), _j({"answer": "a"}), b"{}"), 3),
        ("huge_line.jsonl", _lines(_j({"question": "Long?", "answer": "word " * 60_000}), GOOD), 2),
        ("mixed_schemas.jsonl", _lines(
            GOOD, _j({"instruction": "Translate", "input": "chat", "output": "cat"}),
            _j({"prompt": "P", "response": "R"}), _j({"prompt": "P", "completion": "C"}),
            _j({"context": "C", "target": "T"}),
            _j({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
            _j({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]})), 7),
        ("duplicate_ids.jsonl", _lines(_j({"id": "a", **Q}), _j({"id": "a", **Q}), _j({"id": "line:4", **Q}),
                                       GOOD, _j({"id": 5, **Q}), _j({"id": "5", **Q})), 6),
        ("unknown_schema.jsonl", _lines(b'{"foo": 1}', b'{"bar": [2]}'), 2),
        ("messages_bad.jsonl", _lines(_j({"messages": "hi"}), _j({"messages": [{"role": "user", "content": "x"}]}),
                                      _j({"messages": [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": None}]}),
                                      _j({"messages": [{"content": "no role"}]}),
                                      _j({"messages": []})), 5),
        ("sharegpt.jsonl", _lines(_j({"conversations": [{"from": "system", "value": "s"},
                                                        {"from": "human", "value": "hi"},
                                                        {"from": "gpt", "value": "yo"}]}),
                                  _j({"conversations": [{"from": "alien", "value": "x"}]}),
                                  _j({"conversations": "nope"})), 3),
        ("no_trailing_newline.jsonl", GOOD + b"\n" + GOOD, 2),
        ("blank_lines_between.jsonl", b"\n\n" + GOOD + b"\n   \n\n" + GOOD + b"\n\n", 2),
        ("nul_byte.jsonl", _lines(GOOD, b'{"question": "q", "answer": "a"}\x00'), 2),
        ("huge_int.jsonl", _lines(GOOD, b'{"question": "q", "answer": 1' + b"0" * 6000 + b"}"), 2),
        ("truncated_last_line.jsonl", GOOD + b"\n" + b'{"question": "q", "ans', 2),
        ("blank_answer.jsonl", _lines(_j({"question": "q", "answer": "   "}), GOOD), 2),
        ("nan_answer.jsonl", _lines(b'{"question": "q", "answer": NaN}', GOOD), 2),
        ("list.json", _j([Q, {"question": "Two?", "answer": "2"}]), 2),
        ("wrapper.json", _j({"version": "1.0", "data": [Q, Q], "license": "x"}), 2),
        ("json_lines_as.json", _lines(*qa), 3),
        ("deep_in_list.json", b"[" + GOOD + b",\n" + DEEP + b",\n" + GOOD + b"]", 3),
        ("bad_bytes_in_list.json", b"[" + GOOD + b',\n{"question": "\xff", "answer": "a"}]', 2),
        ("bom.json", b"\xef\xbb\xbf" + _j([Q]), 1),
        ("not_json.json", b"{oops", "error"),
        ("scalar.json", b"42", "error"),
        ("object_without_list.json", b'{\n "a": 1,\n "b": 2\n}\n', "error"),
        ("empty_list.json", b"[]", "error"),
        ("trailing_garbage.json", _j([Q]) + b" xyz", "error"),
        ("unclosed_list.json", b"[" + GOOD + b",\n" + GOOD, "error"),
        ("good.csv", b"id,question,answer\nc1,Q1?,A1\nc2,Q2?,A2\n", 2),
        ("empty.csv", b"", "error"),
        ("header_only.csv", b"question,answer\n", "error"),
        ("duplicate_header.csv", b"question,answer,answer\nq,a,b\n", "error"),
        ("bom_id.csv", b"\xef\xbb\xbfid,question,answer\r\nb1,q,a\r\nb2,q,a\r\n", 2),
        ("ragged.csv", b"question,answer\nq,a\nq,a,extra\nq\n", 3),
        ("non_utf8.csv", b"question,answer\nq,a\nq\xff,a\n", 2),
        ("quoted_multiline.csv", b'question,answer\n"line one\nline two",a\n"q, with comma","a ""quoted"""\n', 2),
        ("huge_cell.csv", b"question,answer\nq," + b"x" * 300_000 + b"\n", 1),
        ("unknown_columns.csv", b"a,b\n1,2\n3,4\n", 2),
        ("unknown_extension.txt", GOOD + b"\n", "error"),
    ]


def _parquet(rows):
    def write(path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return write


def _saved(rows, splits=False):
    def write(path: Path):
        import datasets

        d = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"train": d}) if splits else d).save_to_disk(str(path))
    return write


def _columnar_entries() -> List[Entry]:
    rows = [{"id": "p1", **Q}, {"id": "p2", "question": "q", "answer": None}, {"id": "p3", "question": "q",
                                                                              "answer": "a"}]
    return [
        ("good.parquet", _parquet(rows), 3),
        ("corrupt.parquet", b"PAR1 this is not a parquet file PAR1", "error"),
        ("saved_dataset", _saved(rows), 3),
        ("saved_splits", _saved(rows, splits=True), "error"),
        ("empty_directory", lambda p: p.mkdir(), "error"),
        ("missing.jsonl", None, "error"),   # never written: a path that does not exist
    ]


def build(root: Path) -> List[Tuple[Path, Union[int, str]]]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name, content, expected in _text_entries() + _columnar_entries():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            content(path)
        out.append((path, expected))
    return out
