"""Columnar inputs: Parquet files, `datasets.Dataset` objects, saved datasets (`save_to_disk` directories) and hub
dataset names that `datasets.load_dataset` can resolve (offline: from the local Hugging Face cache).

Rows are numbered from 1 ("row N"). The clean set is written back as Parquet (clean.parquet) for all of them: a
Parquet input keeps its schema and metadata; a Dataset, a saved dataset or a hub dataset becomes the Parquet file
`datasets.Dataset.from_parquet` (or `load_dataset("parquet", data_files=...)`) reads back.
Needs pyarrow (Parquet) and datasets (the rest): `pip install tensorguard-fast[data]`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from .readers import Row, Source

# owner/name or name, optionally :split; a path-like string (./x, /x, x.jsonl) is never sent to the hub.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = "pyarrow" if module.startswith("pyarrow") else "datasets"
        raise ImportError(f"reading this input needs {package}: pip install {package} "
                          "(or pip install tensorguard-fast[data])") from None


def is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"


def _rows_digest(records) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=True, default=repr).encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def read_parquet(path: str) -> Source:
    pq = _need("pyarrow.parquet")
    try:
        table = pq.read_table(path)
    except Exception as exc:   # pyarrow's errors for corrupt files are of several types
        raise ValueError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())[:200]})") from None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    rows = [Row(n, None, r) for n, r in enumerate(table.to_pylist(), 1)]
    return Source(path, "parquet", rows, h.hexdigest(), columns=table.column_names, table=table,
                  clean_ext=".parquet")


def read_hf_dataset(ds, name: str) -> Source:
    if type(ds).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise ValueError(f"{name} holds the splits {sorted(ds)}; pick one (e.g. ds['train'], or NAME:train for a hub "
                         "name, or the split's own directory for a saved dataset)")
    if not hasattr(ds, "select"):
        raise ValueError(f"{name}: a {type(ds).__name__} cannot be scanned; materialise it as a datasets.Dataset")
    records = ds.to_list()
    rows = [Row(n, None, r) for n, r in enumerate(records, 1)]
    return Source(name, "parquet", rows, _rows_digest(records), columns=list(ds.column_names), table=ds,
                  clean_ext=".parquet")


def read_saved_dataset(path: str) -> Source:
    datasets = _need("datasets")
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: a directory, but not a saved dataset (save_to_disk) "
                         f"({' '.join(str(exc).split())[:200]})") from None
    return read_hf_dataset(ds, path)


def read_hub_dataset(name: str) -> Source:
    datasets = _need("datasets")
    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as exc:   # offline misses, unknown names and bad splits raise many types
        raise ValueError(f"{name}: no such dataset file, and `datasets` could not load it as a hub dataset "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:240]}); offline, only datasets in "
                         "the local Hugging Face cache load") from None
    return read_hf_dataset(ds, name)


def write_parquet(table, path: str, indices) -> None:
    """Rows at `indices` of a pyarrow Table or datasets.Dataset to the Parquet file `path`."""
    pa, pq = _need("pyarrow"), _need("pyarrow.parquet")
    if is_hf_dataset(table):   # its rows as an Arrow table (indices mappings applied), no progress bar
        table = table.with_format("arrow")[:]
    pq.write_table(table.take(pa.array(list(indices), type=pa.int64())), path)


def looks_like_hub_name(text: str) -> bool:
    return bool(HUB_NAME.match(text)) and not os.path.splitext(text.partition(":")[0])[1].lower() in (
        ".jsonl", ".json", ".csv", ".parquet", ".ndjson", ".pq")
