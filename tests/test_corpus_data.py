"""The malformed-input corpus (tests/corpus/data_files.py) through load_samples and through a real scan on SmolLM2:
every input row in exactly one output (clean or flagged, flagged ones with a reason), or a one-line error that names
the input with nothing written."""
import csv
import json
import sys
from pathlib import Path

import pytest

from corpus.data_files import build
from tensorguard_fast.backdoor.datasets import load_samples

ERRORS = (ValueError, FileNotFoundError)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("data_corpus"))


def _assert_names_the_input(exc, path: Path):
    text = str(exc)
    assert "\n" not in text and path.name in text, f"{path.name}: {text!r}"


def test_corpus_is_large_enough(corpus):
    assert len(corpus) >= 40
    assert sum(1 for _, e in corpus if e == "error") >= 10 and sum(1 for _, e in corpus if e != "error") >= 30


def test_every_corpus_file_through_load_samples(corpus):
    for path, expected in corpus:
        if expected == "error":
            with pytest.raises(ERRORS) as err:
                load_samples(path)
            _assert_names_the_input(err.value, path)
            continue
        ds = load_samples(path)
        assert len(ds) == expected, path.name
        ids = [s.id for s in ds.samples]
        assert len(set(map(repr, ids))) == len(ids), (path.name, ids)
        for s in ds.problems:   # every problem names its file and line (or row)
            assert path.name in s.problem and ("line " in s.problem or "row " in s.problem), (path.name, s.problem)
            assert "\n" not in s.problem


def _clean_rows(out: Path) -> int:
    """Rows of clean.<ext>, read in its own format."""
    (clean,) = [p for p in out.iterdir() if p.name.startswith("clean.") and not p.name.endswith(".tmp")]
    if clean.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(clean).num_rows
    if clean.suffix == ".csv":
        limit = csv.field_size_limit(sys.maxsize)   # the corpus has a 300 kB cell
        try:
            with open(clean, newline="", encoding="utf-8") as fh:
                return max(0, len(list(csv.reader(fh))) - 1)
        finally:
            csv.field_size_limit(limit)
    data = clean.read_bytes()
    if clean.suffix == ".json":
        try:
            doc = json.loads(data)   # a list, or the corpus's {"data": [...]} wrapper
            return len(doc if isinstance(doc, list) else doc["data"])
        except ValueError:
            pass   # JSON Lines under .json, written back as JSON Lines
    return sum(1 for line in data.split(b"\n") if line.strip())


def _tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_every_corpus_file_through_a_real_scan(smollm2, corpus, tmp_path):
    from tensorguard_fast.backdoor.scan import scan

    model, tok = smollm2
    corpus_dir = corpus[0][0].parent
    before = _tree(corpus_dir)
    tried = rows_in = rows_out = named = 0
    for path, expected in corpus:
        out = tmp_path / f"out_{path.name}"
        tried += 1
        try:
            scan(model, tok, str(path), str(out), batch_size=8, max_len=16, threshold="topk:0.2", progress=False)
        except ERRORS as exc:
            assert expected == "error", f"{path.name}: {exc}"
            _assert_names_the_input(exc, path)
            assert not out.exists(), f"{path.name}: the refused scan wrote {sorted(_tree(out))}"
            named += 1
            continue
        assert expected != "error", f"{path.name} was scanned; expected a clear error"
        scores = [json.loads(line) for line in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
        assert len(scores) == expected, path.name
        flagged = [s for s in scores if s["flagged"]]
        assert all(s["reason"] for s in scores), path.name
        assert len(flagged) + _clean_rows(out) == expected, path.name   # each row in exactly one output
        assert len({json.dumps(s["id"]) for s in scores}) == expected, path.name
        rows_in += expected
        rows_out += len(flagged) + _clean_rows(out)
    assert _tree(corpus_dir) == before   # nothing written beside the inputs
    assert rows_out == rows_in
    print(f"\ndata corpus: {tried} inputs tried, {rows_out} of {rows_in} rows accounted for, "
          f"{named} errors named their input")
