"""The malformed-input corpus (tests/corpus/lineage_corpus.py) through `fingerprint` and `store`, as a user runs them.

Every input ends in a result (exit 0, its file inside -o) or in a user error: exit 2, one line on stderr that names
the input, no traceback. Nothing is ever written outside the output directory (or, for `store`, beside the DB).
The counts printed at the end of each test are the corpus figures the issue asks for.
"""
import json
import os
import sqlite3
from pathlib import Path

import pytest

from tensorguard_fast.cli import main

from corpus.lineage_corpus import evil_fingerprint, model_cases, store_cases

PROFILE = ["--profile", "tensorguard"]  # the loading paths are what is under test; this profile is the quickest


def _tree(root: Path, skip: Path = None) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents) or p.name.endswith(("-wal", "-shm")):
            continue  # (SQLite's write-ahead side files of a store are part of that store)
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
        else:
            out[str(p)] = "dir"
    return out


def _run(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code, err, names, label):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{label}: exit {code}, stderr {err!r}"
    assert len(lines) == 1 and "Traceback" not in err, f"{label}: not one line: {err!r}"
    assert names in lines[0], f"{label}: the error does not name {names!r}: {lines[0]!r}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, model_cases(root / "models")


def test_model_corpus_through_fingerprint(corpus, tmp_path, capsys, monkeypatch):
    root, cases = corpus
    monkeypatch.chdir(root / "models")  # relative inputs resolve here; a stray relative write would show up here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _tree(root)
    named, results = 0, 0
    for i, case in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, stdout, err = _run(capsys, ["fingerprint", *case.args, "-o", str(out), *PROFILE])
        if case.ok:
            assert code == 0, f"{case.name}: {err}"
            assert [p.parent for p in out.iterdir()] == [out], case.name
            results += 1
        else:
            _assert_user_error(code, err, case.names, case.name)
            named += 1
    assert _tree(root) == before, "a file was written or changed outside -o"
    assert len(cases) >= 30 and named == sum(not c.ok for c in cases)
    print(f"\nlineage model corpus: {len(cases)} inputs tried, {results} results, {named} errors naming their input")


def test_untrusted_names_stay_inside_the_output_directory(corpus, tmp_path, capsys):
    root, _ = corpus
    good = root / "models" / "good"
    first = tmp_path / "first"
    assert main(["fingerprint", str(good), "-o", str(first), *PROFILE]) == 0
    (written,) = first.iterdir()
    text = written.read_text()
    evil = tmp_path / "evil"
    evil.mkdir()
    inputs = [evil_fingerprint(evil, text, name, f"e{i}.json")
              for i, name in enumerate(["../../escape", str(tmp_path / "abs"), "..", "", "a/../../b", "good"])]
    (tmp_path / "deep").mkdir()
    out = tmp_path / "deep" / "out"
    before = _tree(tmp_path, skip=out)
    code, _, err = _run(capsys, ["fingerprint", *map(str, inputs), "-o", str(out), *PROFILE])
    assert code == 0, err
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == len(inputs) and all(not f.startswith(".") for f in files), files
    assert _tree(tmp_path, skip=out) == before, "a file was written outside -o"


def test_same_directory_and_parent_names_write_three_files(tmp_path, corpus, capsys):
    root, _ = corpus
    import shutil

    specs = []
    for parent in ("p1", "p2", "p3"):  # before: ft, b_ft, b_ft again -> one fingerprint lost, exit 0
        d = tmp_path / parent / "b" / "ft"
        shutil.copytree(root / "models" / "good", d)
        specs.append(str(d))
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, ["fingerprint", *specs, "-o", str(out), *PROFILE])
    assert code == 0, err
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3 and "ft.tensorguard.json" in files, files
    models = {json.loads((out / f).read_text())["metadata"]["model"] for f in files}
    assert len(models) == 3


@pytest.fixture(scope="module")
def stores(corpus, tmp_path_factory):
    root, _ = corpus
    good = root / "models" / "good"
    base = tmp_path_factory.mktemp("stores")
    fp_dir = base / "fp"
    assert main(["fingerprint", str(good), "-o", str(fp_dir), *PROFILE]) == 0
    (fp,) = fp_dir.iterdir()
    cases = store_cases(base / "db", good, fp)
    valid = base / "db" / "valid.db"
    assert main(["store", "add", str(valid), str(fp), "--family", "tiny"]) == 0
    for name in ("readonly.db", "locked.db", "damaged.db"):
        (base / "db" / name).write_bytes(valid.read_bytes())
    con = sqlite3.connect(str(base / "db" / "damaged.db"))
    con.execute("UPDATE fingerprints SET fingerprint = '{cut short'")
    con.commit()
    con.close()
    con = sqlite3.connect(str(base / "db" / "locked.db"))
    con.execute("PRAGMA journal_mode=DELETE")  # a rollback journal: an exclusive lock keeps readers out too
    con.close()
    os.chmod(base / "db" / "readonly.db", 0o444)
    return base, fp, valid, cases


def test_store_corpus_through_store_commands(stores, capsys, monkeypatch):
    base, fp, valid, cases = stores
    monkeypatch.setenv("TENSORGUARD_FAST_STORE_TIMEOUT", "0.5")
    root_user = os.geteuid() == 0  # root writes through 0o444, so the read-only case can only be checked as a user
    tried = named = 0
    for case in cases:
        db = case.args[0]
        lock = None
        if case.extra.get("lock"):
            lock = sqlite3.connect(db, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
        before = _tree(base)
        runs = {"list": ["store", "list", db], "search": ["store", "search", db, str(fp)],
                "list --json": ["store", "list", db, "--json"], "add": ["store", "add", db, str(fp)]}
        for label, argv in runs.items():
            if label == "add" and (case.extra.get("readonly") and root_user):
                continue
            code, out, err = _run(capsys, argv)
            tried += 1
            expect_ok = case.ok and not (label == "add" and case.extra.get("readonly"))
            expect_ok = expect_ok or (label == "add" and case.extra.get("add_ok"))
            expect_ok = expect_ok or (case.extra.get("damaged") and label in ("list", "list --json", "add"))
            if expect_ok:
                assert code == 0, f"{case.name} / {label}: {err}"
                if label == "list --json":
                    rows = json.loads(out)
                    assert rows == [] if case.extra.get("empty") else rows[0]["family"] == "tiny"
            else:
                _assert_user_error(code, err, case.names, f"{case.name} / {label}")
                named += 1
            if label != "add":
                assert _tree(base) == before, f"{case.name} / {label} wrote something"
        if lock is not None:
            lock.rollback()
            lock.close()
        if case.extra.get("add_ok"):
            Path(db).unlink()
    assert len(cases) >= 5
    print(f"\nlineage store corpus: {len(cases)} stores, {tried} commands, {named} errors naming their store")


def test_store_json_and_conflicts(stores, tmp_path, capsys):
    base, fp, valid, _ = stores
    db = tmp_path / "s.db"
    code, out, _ = _run(capsys, ["store", "add", str(db), str(fp), "--family", "smol", "--json"])
    assert code == 0 and json.loads(out)["status"] == "stored"
    code, out, err = _run(capsys, ["store", "add", str(db), str(fp), "--family", "gemma"])
    _assert_user_error(code, err, "s.db", "conflict")
    assert "'smol'" in err and "'gemma'" in err and "--relabel" in err
    code, out, _ = _run(capsys, ["store", "search", str(db), str(fp), "--json", "-k", "3"])
    hits = json.loads(out)["hits"]
    assert code == 0 and hits[0]["distance"] == 0 and hits[0]["family"] == "smol"
    assert _run(capsys, ["store", "add", str(db), str(fp), "--family", "gemma", "--relabel"])[0] == 0
    code, out, _ = _run(capsys, ["store", "list", str(db), "--json"])
    assert [r["family"] for r in json.loads(out)] == ["gemma"]
