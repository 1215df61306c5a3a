"""`FingerprintStore(path)`: fingerprints in one SQLite file (stdlib), with exact nearest-neighbour search (numpy).

Built for a later many-model job: N workers can share one file (WAL journal, busy timeout); `has(file_hash,
profile)` lets a worker skip a checkpoint already fingerprinted; `record_failure` keeps the reason a model failed,
per model, so a rerun can retry or report it. Search is exact (a scan over vectors of one profile): fine to
hundreds of thousands of fingerprints of ~1k floats.
"""
from __future__ import annotations

import datetime
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


def identity(fp: Fingerprint) -> str:
    """The store key of a fingerprint's checkpoint: its file hashes joined, or the model name when it has none."""
    return checkpoint_key(fp.metadata.get("file_hashes") or {}, fp.model)


def checkpoint_key(file_hashes: dict, model: str) -> str:
    """`identity` from a checkpoint's file hashes (io.loading's WeightSource.file_hashes()), before fingerprinting."""
    if file_hashes:
        return "|".join(f"{k}={v}" for k, v in sorted(file_hashes.items()))
    return "model:" + model


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class FingerprintStore:
    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, fp: Fingerprint, family: Optional[str] = None, replace: bool = True) -> int:
        """Store `fp` (labelled with `family` if known); the same checkpoint and profile is replaced, not doubled."""
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        cur = self.db.execute(
            f"{verb} INTO fingerprints (model, path, profile, file_hash, family, created, fingerprint, vector) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (fp.model, fp.metadata.get("path"), fp.profile, identity(fp), family, _now(), fp.to_json(),
             fp.vector.astype(np.float64).tobytes()))
        self.db.commit()
        return int(cur.lastrowid)

    def has(self, file_hash: str, profile: str) -> bool:
        row = self.db.execute("SELECT 1 FROM fingerprints WHERE file_hash = ? AND profile = ?",
                              (file_hash, profile)).fetchone()
        return row is not None

    def get(self, key: Union[int, str]) -> Fingerprint:
        """By row id, or by model name (the latest one stored)."""
        if isinstance(key, int):
            row = self.db.execute("SELECT fingerprint FROM fingerprints WHERE id = ?", (key,)).fetchone()
        else:
            row = self.db.execute("SELECT fingerprint FROM fingerprints WHERE model = ? ORDER BY id DESC LIMIT 1",
                                  (key,)).fetchone()
        if row is None:
            raise KeyError(f"{self.path}: no fingerprint {key!r}")
        return Fingerprint.from_json(row[0])

    def list(self, profile: Optional[str] = None) -> List[dict]:
        sql = "SELECT id, model, path, profile, family, created FROM fingerprints"
        rows = self.db.execute(sql + (" WHERE profile = ?" if profile else "") + " ORDER BY id",
                               (profile,) if profile else ()).fetchall()
        return [dict(zip(("id", "model", "path", "profile", "family", "created"), r)) for r in rows]

    def search(self, fp: Fingerprint, k: int = 5) -> List[Tuple[float, dict]]:
        """The k stored fingerprints of the same profile nearest to `fp` (exact; `family.distance`)."""
        from .family import distance

        rows = self.db.execute("SELECT id, model, family, fingerprint FROM fingerprints WHERE profile = ?",
                               (fp.profile,)).fetchall()
        scored = []
        for rid, model, family, text in rows:
            other = Fingerprint.from_json(text)
            if other.names != fp.names:
                continue
            scored.append((distance(fp, other), {"id": rid, "model": model, "family": family}))
        scored.sort(key=lambda t: t[0])
        return scored[:k]

    def record_failure(self, path: str, profile: str, error: str) -> None:
        self.db.execute("INSERT INTO failures (path, profile, error, created) VALUES (?, ?, ?, ?)",
                        (str(path), profile, str(error), _now()))
        self.db.commit()

    def failures(self) -> List[dict]:
        rows = self.db.execute("SELECT path, profile, error, created FROM failures ORDER BY id").fetchall()
        return [dict(zip(("path", "profile", "error", "created"), r)) for r in rows]
