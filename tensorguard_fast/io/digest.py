"""Content digests of files, model directories and in-memory tensors: sha256 of every byte, never a sample.

    file_digest(path) -> "9f86d0...": sha256 hex of the whole file, streamed in 16 MiB blocks
    model_digest(path_or_dir) -> {"model.safetensors": "9f86d0...", "config.json": ...}: every file of a model
    tensors_digest(state) -> sha256 hex over names, dtypes, shapes and bytes of a dict of tensors

Why whole files: a digest of sampled pieces calls two checkpoints equal when an edit misses the samples (two
re-noised layers of a 538 MB file did). Re-reading a large file on every run would be slow, so a digest is cached
under the file's (real path, size, mtime_ns, ctime_ns, inode): any write to the file changes mtime and ctime (ctime
cannot be set back by a user), so a stale entry is never used. The cache is one JSON file,
$TENSORGUARD_FAST_CACHE/digests.json (default ~/.cache/tensorguard-fast), guarded by a file lock; if it cannot be read
or written the digest is still computed, only not remembered. `TENSORGUARD_FAST_DIGEST_CACHE=0` turns it off.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

BLOCK = 1 << 24
_CACHE_NAME = "digests.json"
_CACHE_LIMIT = 20_000  # entries kept; the oldest are dropped past this (a path rewritten often leaves old keys)


def cache_file() -> Optional[Path]:
    """Where digests are remembered, or None when caching is turned off."""
    if os.environ.get("TENSORGUARD_FAST_DIGEST_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return None
    root = os.environ.get("TENSORGUARD_FAST_CACHE") or os.path.join(Path.home(), ".cache", "tensorguard-fast")
    return Path(root) / _CACHE_NAME


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def _read_cache(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: start again (it only saves time)


def _remember(cache: Path, key: str, digest: str) -> None:
    from filelock import FileLock, Timeout

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache) + ".lock", timeout=10):
            entries = _read_cache(cache)
            entries[key] = digest
            if len(entries) > _CACHE_LIMIT:
                entries = dict(list(entries.items())[-_CACHE_LIMIT:])
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries), encoding="utf-8")
            os.replace(tmp, cache)
    except (OSError, Timeout):
        pass  # a read-only or busy cache costs a re-read next time, nothing else


def stream_digest(path: Union[str, Path]) -> str:
    """sha256 hex of every byte of `path`, uncached."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Union[str, Path]) -> str:
    """sha256 hex of the whole file, cached by (real path, size, mtime_ns, ctime_ns, inode)."""
    path = Path(path)
    cache = cache_file()
    if cache is None:
        return stream_digest(path)
    key = _stat_key(path)
    known = _read_cache(cache).get(key)
    if isinstance(known, str) and len(known) == 64:
        return known
    digest = stream_digest(path)
    if _stat_key(path) == key:  # not rewritten while we read it
        _remember(cache, key, digest)
    return digest


def model_digest(path_or_dir: Union[str, Path]) -> Dict[str, str]:
    """{relative file name: file_digest} of a model file, or of every regular file under a model directory
    (weights, config, tokenizer; hidden files such as cache markers are left out), in sorted order."""
    root = Path(path_or_dir)
    if root.is_file():
        return {root.name: file_digest(root)}
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or directory")
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return {p.relative_to(root).as_posix(): file_digest(p) for p in files}


def tensors_digest(state: Mapping) -> str:
    """sha256 hex over the names, dtypes, shapes and bytes of a dict of tensors (an nn.Module's state), in key order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()
