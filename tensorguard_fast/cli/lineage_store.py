"""`tensorguard-fast store add|search|list`, and the file names `fingerprint -o DIR` writes.

Store commands open the store before reading any model, so a damaged, foreign or locked store fails first, in one
line. `list` and `search` open it read-only and never create a file; `--json` prints machine-readable rows.
`add` goes on past a model that cannot be read (recorded as a failure in the store) or that is already stored under
another family (refused unless --relabel), and exits 2 when any input failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Set

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def add_store_parser(subparsers, common: Callable, func: Callable) -> None:
    p = subparsers.add_parser("store", help="a SQLite store of fingerprints: add, search, list")
    sub = p.add_subparsers(dest="store_command", required=True)
    a = sub.add_parser("add", help="fingerprint models (or read fingerprint JSONs) into the store")
    a.add_argument("db")
    a.add_argument("models", nargs="+", metavar="MODEL_OR_FP")
    a.add_argument("--family", default=None, help="label the added fingerprints with a family")
    a.add_argument("--relabel", action="store_true",
                   help="a checkpoint already stored under another family takes --family (refused otherwise)")
    a.add_argument("--json", action="store_true", help="print one JSON object per input")
    common(a)
    s = sub.add_parser("search", help="the stored fingerprints nearest to a model")
    s.add_argument("db")
    s.add_argument("model", metavar="MODEL_OR_FP")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--json", action="store_true", help="print the hits as JSON")
    common(s)
    ls = sub.add_parser("list", help="the stored fingerprints (and failures with --failures)")
    ls.add_argument("db")
    ls.add_argument("--failures", action="store_true", help="list the recorded failures instead")
    ls.add_argument("--json", action="store_true", help="print the rows as JSON")
    common(ls)
    p.set_defaults(func=func)


def run_store(args, load_any: Callable) -> int:
    from ..lineage.store import FingerprintStore

    if args.store_command == "search" and args.k < 1:
        raise ValueError(f"-k {args.k}: must be at least 1")
    readonly = args.store_command in ("search", "list")
    with FingerprintStore(args.db, readonly=readonly) as store:
        if args.store_command == "add":
            return _add(store, args, load_any)
        if args.store_command == "search":
            fp = load_any(args.model, args.profile, args)
            hits = [dict(rec, distance=d) for d, rec in store.search(fp, k=args.k)]
            if args.json:
                print(json.dumps({"query": fp.model, "profile": fp.profile, "hits": hits}, indent=1))
            for h in hits if not args.json else []:
                print(f"{h['distance']:10.4g}  #{h['id']:<5} {h['model']}  family={h['family']}")
            return 0
        if args.failures:
            rows = store.failures()
            if args.json:
                print(json.dumps(rows, indent=1))
            for r in rows if not args.json else []:
                print(f"{r['created']}  {r['profile']:<12} {r['path']}: {r['error']}")
            return 0
        rows = store.list(args.profile)
        if args.json:
            print(json.dumps(rows, indent=1))
        for r in rows if not args.json else []:
            print(f"#{r['id']:<5} {r['profile']:<12} {r['model']}  family={r['family']}")
        return 0


def _add(store, args, load_any: Callable) -> int:
    from ..lineage.store import StoreConflict, StoreError

    failed = 0
    for spec in args.models:
        try:
            fp = load_any(spec, args.profile, args)
        except (ValueError, OSError, RuntimeError) as exc:
            if isinstance(exc, StoreError):
                raise
            failed += 1
            store.record_failure(spec, args.profile or "default", str(exc))
            _report(args, {"input": spec, "status": "failed", "error": str(exc)})
            continue
        try:
            rid = store.add(fp, family=args.family, relabel=args.relabel)
        except StoreConflict as exc:
            failed += 1
            _report(args, {"input": spec, "status": "conflict", "error": str(exc)})
            continue
        _report(args, {"input": spec, "status": "stored", "id": rid, "profile": fp.profile, "model": fp.model})
    return 2 if failed else 0


def _report(args, row: dict) -> None:
    if args.json:
        print(json.dumps(row))
    elif row["status"] == "stored":
        print(f"{row['input']}: stored as #{row['id']} ({row['profile']})")
    else:
        print(f"{row['input']}: {row['status']}: {row['error']}", file=sys.stderr)


# ------------------------------------------------------------------------------------ fingerprint output names

def output_stem(name: str, spec: str, identity: str, used: Set[str]) -> str:
    """A file stem for a fingerprint: `name` with every character outside [A-Za-z0-9._+-] replaced and no leading
    dot (so never a path), made unique among `used` (compared case-insensitively) by a short digest of the input."""
    stem = _UNSAFE.sub("_", str(name)).strip("._")[:100] or "model"
    if stem.lower() in used:
        tag = hashlib.sha256(f"{identity}\0{os.path.abspath(spec)}".encode()).hexdigest()[:8]
        base, stem, n = f"{stem}-{tag}", f"{stem}-{tag}", 1
        while stem.lower() in used:
            n += 1
            stem = f"{base}-{n}"
    used.add(stem.lower())
    return stem


def write_inside(directory: Path, filename: str, text: str) -> Path:
    """Write `text` to directory/filename atomically (temporary file, then rename, so a symlink there is replaced,
    never followed); refuses a name that would land anywhere but directly inside `directory`."""
    if Path(filename).name != filename or filename in (".", ".."):
        raise ValueError(f"{filename!r}: refusing to write outside {directory}")
    target = directory / filename
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
