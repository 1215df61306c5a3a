"""`FingerprintStore(path)`: fingerprints in one SQLite file (stdlib), with exact nearest-neighbour search (numpy).

Keyed by content: a row's `file_hash` is the sha256 of every file of the checkpoint (io.digest, cached), so an
edited copy is never "already in the store". One checkpoint and profile is one row: adding it again keeps the row
(and returns its id); adding it under another family raises `StoreConflict` naming both, unless `relabel=True` asks
to change the row's family. Rows are never replaced silently.

N workers can share one file (WAL journal, busy timeout: $TENSORGUARD_FAST_STORE_TIMEOUT seconds, default 60);
`has(file_hash, profile)` lets a worker skip a checkpoint already fingerprinted; `record_failure` keeps the reason a
model failed. `readonly=True` opens an existing store without creating or changing anything (list, search).
Search is exact (a scan over vectors of one profile): fine to hundreds of thousands of fingerprints of ~1k floats.
"""
from __future__ import annotations

import datetime
import os
import sqlite3
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from .fingerprint import Fingerprint

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fingerprints (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    path TEXT,
    profile TEXT NOT NULL,
    file_hash TEXT NOT NULL,
    family TEXT,
    created TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (file_hash, profile)
);
CREATE INDEX IF NOT EXISTS fingerprints_profile ON fingerprints (profile);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    profile TEXT NOT NULL,
    error TEXT NOT NULL,
    created TEXT NOT NULL
);
"""
_COLUMNS = {"fingerprints": {"id", "model", "path", "profile", "file_hash", "family", "created", "fingerprint",
                             "vector"},
            "failures": {"id", "path", "profile", "error", "created"}}


class StoreError(ValueError):
    """The store file cannot be used (not SQLite, another schema, read-only, locked); the message names it."""


class StoreConflict(StoreError):
    """Adding a checkpoint already stored under another family."""


def identity(fp: Fingerprint) -> str:
    """The store key of a fingerprint's checkpoint: its file digests joined, or the model name when it has none."""
    return checkpoint_key(fp.metadata.get("file_hashes") or {}, fp.model)


def checkpoint_key(file_hashes: dict, model: str) -> str:
    """`identity` from a checkpoint's file digests (WeightSource.file_hashes()), before fingerprinting."""
    if file_hashes:
        return "|".join(f"{k}={v}" for k, v in sorted(file_hashes.items()))
    return "model:" + model


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _timeout() -> float:
    try:
        return float(os.environ.get("TENSORGUARD_FAST_STORE_TIMEOUT", "60"))
    except ValueError:
        return 60.0


class FingerprintStore:
    def __init__(self, path: Union[str, Path], readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._empty = False  # read-only on a file with no tables at all (e.g. 0 bytes): an empty store
        if readonly and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such fingerprint store")
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a fingerprint store file")
        if not readonly and not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path}: the directory {self.path.parent} does not exist")
        try:
            if readonly:
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=_timeout())
            else:
                self.db = sqlite3.connect(str(self.path), timeout=_timeout())
            self._check_schema()
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(_SCHEMA)
                self.db.commit()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _error(self, exc: Exception) -> StoreError:
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            why = "not a fingerprint store (the file is not an SQLite database, or is damaged)"
        elif "readonly" in text or "read-only" in text:
            why = "read-only: it cannot be written (list and search still work)"
        elif "locked" in text or "busy" in text:
            why = (f"locked by another process for more than {_timeout():g}s "
                   f"(TENSORGUARD_FAST_STORE_TIMEOUT raises the wait)")
        elif "unable to open" in text:
            why = "cannot be opened (missing directory or no permission)"
        else:
            why = f"SQLite error: {text}"
        return StoreError(f"{self.path}: {why}")

    def _check_schema(self) -> None:
        for table, expected in _COLUMNS.items():
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if have and have != expected:
                raise StoreError(f"{self.path}: not a tensorguard-fast fingerprint store (table {table} has columns "
                                 f"{sorted(have)}; expected {sorted(expected)})")
            if not have and self.readonly and table == "fingerprints":
                if self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise StoreError(f"{self.path}: not a tensorguard-fast fingerprint store (no fingerprints table)")
                self._empty = True

    def _run(self, sql: str, params=(), commit: bool = False):
        try:
            cur = self.db.execute(sql, params)
            if commit:
                self.db.commit()
            return cur
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def find(self, file_hash: str, profile: str) -> Optional[dict]:
        if self._empty:
            return None
        row = self._run("SELECT id, model, path, family FROM fingerprints WHERE file_hash = ? AND profile = ?",
                        (file_hash, profile)).fetchone()
        return dict(zip(("id", "model", "path", "family"), row)) if row else None

    def add(self, fp: Fingerprint, family: Optional[str] = None, relabel: bool = False) -> int:
        """Store `fp` (labelled with `family` if known) and return its row id. The same checkpoint and profile keeps
        its one row; a different family for it raises `StoreConflict` unless `relabel=True`."""
        key = identity(fp)
        known = self.find(key, fp.profile)
        if known is None:
            cur = self._run(
                "INSERT OR IGNORE INTO fingerprints (model, path, profile, file_hash, family, created, fingerprint, "
                "vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (fp.model, fp.metadata.get("path"), fp.profile, key, family, _now(), fp.to_json(),
                 fp.vector.astype(np.float64).tobytes()), commit=True)
            if cur.rowcount == 1:
                return int(cur.lastrowid)
            known = self.find(key, fp.profile)  # another writer stored the same checkpoint meanwhile
            assert known is not None
        if family is None or family == known["family"]:
            return known["id"]
        if known["family"] is not None and not relabel:
            raise StoreConflict(f"{self.path}: {fp.model} is the same checkpoint as #{known['id']} {known['model']} "
                                f"({known['path']}), stored as family {known['family']!r}; not relabelling it "
                                f"{family!r} (pass relabel=True / --relabel to change it)")
        self._run("UPDATE fingerprints SET family = ? WHERE id = ?", (family, known["id"]), commit=True)
        return known["id"]

    def has(self, file_hash: str, profile: str) -> bool:
        return self.find(file_hash, profile) is not None

    def get(self, key: Union[int, str]) -> Fingerprint:
        """By row id, or by model name (the latest one stored)."""
        if isinstance(key, int):
            row = self._run("SELECT fingerprint FROM fingerprints WHERE id = ?", (key,)).fetchone()
        else:
            row = self._run("SELECT fingerprint FROM fingerprints WHERE model = ? ORDER BY id DESC LIMIT 1",
                            (key,)).fetchone()
        if row is None:
            raise KeyError(f"{self.path}: no fingerprint {key!r}")
        return Fingerprint.from_json(row[0])

    def list(self, profile: Optional[str] = None) -> List[dict]:
        if self._empty:
            return []
        sql = "SELECT id, model, path, profile, family, created FROM fingerprints"
        rows = self._run(sql + (" WHERE profile = ?" if profile else "") + " ORDER BY id",
                         (profile,) if profile else ()).fetchall()
        return [dict(zip(("id", "model", "path", "profile", "family", "created"), r)) for r in rows]

    def search(self, fp: Fingerprint, k: int = 5) -> List[Tuple[float, dict]]:
        """The k stored fingerprints of the same profile nearest to `fp` (exact; `family.distance`)."""
        from .family import distance

        if self._empty:
            return []
        rows = self._run("SELECT id, model, path, family, fingerprint FROM fingerprints WHERE profile = ?",
                         (fp.profile,)).fetchall()
        scored = []
        for rid, model, path, family, text in rows:
            try:
                other = Fingerprint.from_json(text)
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"{self.path}: row #{rid} holds a damaged fingerprint ({exc})") from exc
            if other.names != fp.names:
                continue
            scored.append((distance(fp, other), {"id": rid, "model": model, "path": path, "family": family}))
        scored.sort(key=lambda t: t[0])
        return scored[:k]

    def record_failure(self, path: str, profile: str, error: str) -> None:
        self._run("INSERT INTO failures (path, profile, error, created) VALUES (?, ?, ?, ?)",
                  (str(path), profile, str(error), _now()), commit=True)

    def failures(self) -> List[dict]:
        if self._empty or (self.readonly and not self._run("PRAGMA table_info(failures)").fetchall()):
            return []
        rows = self._run("SELECT path, profile, error, created FROM failures ORDER BY id").fetchall()
        return [dict(zip(("path", "profile", "error", "created"), r)) for r in rows]
