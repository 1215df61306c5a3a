"""Fingerprint a registry of models into a FingerprintStore: one model = one unit of work, N workers.

    tensorguard-fast fingerprint --from models.txt --store lineage.db --workers 4
    torchrun --nproc-per-node 4 -m tensorguard_fast.lineage.many --from DIR --store lineage.db

Workers are processes (spawned; each with its share of the CPU threads) or torchrun ranks (each takes every
size-th model). A model whose checkpoint (same file hashes) and profile are already in the store is skipped without
reading its weights (the file hashes are sha256 digests of the whole files, cached by io.digest, so an edited
copy is fingerprinted again); a failure is recorded in the store with its reason and the others go on.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .profiles import DEFAULT as DEFAULT_PROFILE, PROFILES

MODEL_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


@dataclass
class Job:
    model: str
    store: str
    profile: str = DEFAULT_PROFILE
    seed: int = 0
    device: Optional[str] = None
    allow_pickle: bool = False
    threads: Optional[int] = None
    allow_nonfinite: bool = False


def model_list(source: str) -> List[str]:
    """Models named by `source`: a text file (one model per line; blank lines and # comments skipped) or a directory
    whose entries are models (sub-directories, and files ending in .safetensors/.gguf/...)."""
    path = Path(source)
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        models = [str(p) for p in entries if p.is_dir() or p.suffix in MODEL_SUFFIXES]
        if not models:
            raise ValueError(f"{source}: no model directories or weight files in it")
        return models
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{source}: not a UTF-8 text list of models ({exc})") from exc
        lines = [line.strip() for line in text.split("\n")]  # "\n" only: U+2028 may sit inside a file name
        models = [line for line in lines if line and not line.startswith("#")]
        if not models:
            raise ValueError(f"{source}: the list names no model")
        return models
    raise FileNotFoundError(f"{source}: no such list file or directory")


def run_job(job: Job) -> dict:
    """Fingerprint one model into the store. Returns {"model", "status": done|skipped|failed, "error"?}."""
    import torch

    from .fingerprint import fast_fingerprint
    from .loading import open_model
    from .store import FingerprintStore, checkpoint_key

    if job.threads:
        torch.set_num_threads(job.threads)
    with FingerprintStore(job.store) as store:
        try:
            source = open_model(job.model, allow_pickle=job.allow_pickle, allow_nonfinite=job.allow_nonfinite)
            if store.has(checkpoint_key(source.file_hashes(), source.name), job.profile):
                return {"model": job.model, "status": "skipped"}
            fp = fast_fingerprint(source, profile=job.profile, seed=job.seed, device=job.device,
                                  allow_pickle=job.allow_pickle, allow_nonfinite=job.allow_nonfinite)
            store.add(fp)
            return {"model": job.model, "status": "done", "seconds": fp.metadata.get("seconds")}
        except Exception as exc:  # one broken checkpoint must not stop the registry
            error = f"{type(exc).__name__}: {exc}"
            store.record_failure(job.model, job.profile, error)
            return {"model": job.model, "status": "failed", "error": error,
                    "trace": traceback.format_exc(limit=3)}


def fingerprint_many(models: List[str], store: str, profile: str = DEFAULT_PROFILE, workers: int = 1, seed: int = 0,
                     device: Optional[str] = None, allow_pickle: bool = False, progress: bool = True,
                     allow_nonfinite: bool = False) -> List[dict]:
    """Fingerprint every model of `models` into `store` with `workers` processes; results in input order."""
    from .store import FingerprintStore

    FingerprintStore(store).close()  # create the schema once, before workers race to
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    jobs = [Job(m, store, profile, seed, device, allow_pickle, threads if workers > 1 else None, allow_nonfinite)
            for m in models]
    bar = None
    if progress and len(jobs) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="model", desc="fingerprinting")
    results: List[Optional[dict]] = [None] * len(jobs)
    if workers <= 1:
        for i, job in enumerate(jobs):
            results[i] = run_job(job)
            if bar:
                bar.update()
    else:
        import multiprocessing

        # spawn: a forked torch with live OpenMP threads can deadlock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if bar:
                    bar.update()
    if bar:
        bar.close()
    return results  # type: ignore[return-value]


def summarize(results: List[dict]) -> str:
    counts = {k: sum(r["status"] == k for r in results) for k in ("done", "skipped", "failed")}
    lines = [f"{counts['done']} fingerprinted, {counts['skipped']} already in the store, {counts['failed']} failed"]
    lines += [f"  failed: {r['model']}: {r['error']}" for r in results if r["status"] == "failed"]
    return "\n".join(lines)


def main(argv=None) -> int:
    """torchrun entry: each rank fingerprints every size-th model of the list into the shared store."""
    from .. import distributed

    ap = argparse.ArgumentParser(prog="python -m tensorguard_fast.lineage.many", description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", required=True, help="list file or directory of models")
    ap.add_argument("--store", required=True, help="SQLite fingerprint store")
    ap.add_argument("--profile", choices=tuple(PROFILES), default=DEFAULT_PROFILE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--allow-pickle", action="store_true")
    ap.add_argument("--allow-nonfinite", action="store_true", help="fingerprint checkpoints holding NaN/Inf")
    args = ap.parse_args(argv)
    # The store is the only shared data; the (gloo) group is there so that every rank waits for the others before
    # exiting: torchrun stops the whole job as soon as one rank exits non-zero, which would kill a rank mid-model.
    w = distributed.init("gloo")
    ok = False
    try:
        mine = distributed.shard(model_list(args.source), w)
        device = args.device or (f"cuda:{w.local_rank}" if _cuda() else None)
        results = fingerprint_many(mine, args.store, args.profile, 1, args.seed, device, args.allow_pickle,
                                   progress=w.is_main, allow_nonfinite=args.allow_nonfinite)
        print(f"rank {w.rank}/{w.size}: " + summarize(results), flush=True)
        ok = not any(r["status"] == "failed" for r in results)
    finally:  # an error here (a bad list, an unusable store) still meets the other ranks, then propagates
        ok = distributed.all_ok(ok)
        distributed.close()
    return 0 if ok else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
