"""nearest_neighbours at scale: the inverted file's time, peak memory and recall@5 for N up to 1,000,000 (D = 128),
and the exact search at 20,000 rows, where the module switches between them.

Data: clustered unit rows, float32 (N // 200 Gaussian centres on the sphere, cluster sizes ~ rank^-0.5, noise of norm
1 so in-cluster cosines are ~0.5), built in chunks so that building it peaks near its own size; `diffuse` rows
(uniform on the sphere, no clusters) at 100,000 show the hard case.
Each (N, data, route) runs in a fresh subprocess that imports numpy and the module only (no torch): seconds of the
fastest of REPEATS calls (one call at 1,000,000); peak RSS as getrusage ru_maxrss after the calls minus the resident
set just before them (the input array, already resident, is reported apart); then recall@5 against exact search for
2,000 random queries (those queries against all rows, blocked). Another process may share the CPUs: the load average
is recorded.

Run: python bench/bench_neighbours.py [--sizes 20000 100000 1000000] [--no-diffuse] [--blas-threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tensorguard_fast.backdoor import neighbours  # noqa: E402

D, K, QUERIES = 128, 5, 2000
REPEATS = 3   # up to 100,000 rows; the fastest run is reported (another process may share the CPUs)


def clustered_rows(n: int, d: int = D, per: int = 200, zipf: float = 0.5, seed: int = 0, chunk: int = 65536):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per), d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weight = 1.0 / np.arange(1, len(centres) + 1) ** zipf
    label = rng.choice(len(centres), size=n, p=weight / weight.sum())
    x = np.empty((n, d), dtype=np.float32)
    for r0 in range(0, n, chunk):
        part = label[r0:r0 + chunk]
        b = centres[part] + rng.standard_normal((len(part), d), dtype=np.float32) / np.float32(np.sqrt(d))
        x[r0:r0 + chunk] = b / np.linalg.norm(b, axis=1, keepdims=True)
    return x


def diffuse_rows(n: int, d: int = D, seed: int = 0, chunk: int = 65536):
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), dtype=np.float32)
    for r0 in range(0, n, chunk):
        b = rng.standard_normal((min(chunk, n - r0), d), dtype=np.float32)
        x[r0:r0 + chunk] = b / np.linalg.norm(b, axis=1, keepdims=True)
    return x


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def one(n: int, data: str, route: str) -> dict:
    """The child: build the rows, run one search, measure; returns the row of the table."""
    x = (clustered_rows if data == "clustered" else diffuse_rows)(n)
    before = _rss_kb()
    times = []
    for _ in range(REPEATS if n <= 100_000 else 1):
        t0 = time.perf_counter()
        if route == "exact":
            found = neighbours.exact_neighbours(x, K)
        else:
            found = neighbours.nearest_neighbours(x, K, exact_below=0)
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queries = np.random.default_rng(12345).choice(n, size=min(QUERIES, n), replace=False)
    truth = neighbours.exact_neighbours(x, K, queries)
    recall = float(np.mean([len(set(a) & set(b)) for a, b in zip(found[queries], truth)]) / K)
    return {"n": n, "d": D, "k": K, "data": data, "route": route, "seconds": round(seconds, 2), "runs": len(times),
            "rows_per_s": round(n / seconds), "recall@5": round(recall, 4),
            "input_mb": round(x.nbytes / 2**20, 1), "peak_beyond_input_mb": round(max(0, peak - before) / 1024, 1),
            "process_peak_mb": round(peak / 1024, 1),
            "lists": None if route == "exact" else neighbours.default_lists(n),
            "probes": None if route == "exact" else neighbours.PROBES}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000, 1000000])
    ap.add_argument("--no-diffuse", action="store_true")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="OPENBLAS_NUM_THREADS for the runs (default: BLAS's own); results get a _Nthreads suffix")
    ap.add_argument("--one", nargs=3, metavar=("N", "DATA", "ROUTE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.one[2])))
        return
    runs = [(n, "clustered", "approximate") for n in args.sizes]
    runs.insert(1 if args.sizes else 0, (20000, "clustered", "exact"))
    if not args.no_diffuse:
        runs.append((100000, "diffuse", "approximate"))
    env = dict(os.environ)
    if args.blas_threads:
        env.update({v: str(args.blas_threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    load_start, rows = os.getloadavg(), []
    for n, data, route in runs:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), data, route], capture_output=True, text=True,
                             timeout=1800, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{n} {data} {route} failed: {out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import print_table, write_results

    print_table("nearest_neighbours, k = 5, D = 128 (fresh process each; seconds: fastest of `runs`)", rows,
                ["n", "data", "route", "lists", "probes", "seconds", "runs", "rows_per_s", "recall@5", "input_mb",
                 "peak_beyond_input_mb", "process_peak_mb"])
    write_results("bench_neighbours" + (f"_{args.blas_threads}threads" if args.blas_threads else ""), rows, {
        "numpy": np.__version__, "openblas_threads": env.get("OPENBLAS_NUM_THREADS", "default"),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "queries_for_recall": QUERIES,
        "exact_below": neighbours.EXACT_BELOW})


if __name__ == "__main__":
    main()
