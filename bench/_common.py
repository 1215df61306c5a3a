"""Shared by the benchmarks: machine info, median timing, a printed table, and a JSON results file.

Every benchmark measures its baseline in the same run and reports ratios of medians (p20/p50/p80 kept too).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    from tensorguard_fast import __version__, _backend

    cpp = _backend.cpp()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpp_isa": cpp.isa() if cpp is not None else None,   # the C++ kernels' vector width: the same "cpu" can differ
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "tensorguard_fast": __version__,
        "commit": commit,
    }


def _sync(device) -> None:
    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeats: int = 7, warmup: int = 1, device=None) -> dict:
    """Seconds of fn(): p20/p50/p80 over `repeats` runs after `warmup` runs. On CUDA each run is timed with device
    events (the work is asynchronous); elsewhere with the host clock."""
    cuda = device is not None and str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"p20": q[0], "p50": statistics.median(times), "p80": q[3], "runs": len(times)}


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_results(name: str, rows: Sequence[dict], extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), "rows": list(rows)}
    if extra:
        payload.update(extra)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {path}")
    return path


def add_route_arguments(ap, batch_help: str) -> None:
    """The options every per-route benchmark takes; `apply_threads(args)` after parsing."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help=batch_help)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every route (default: torch's)")


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)  # the C++ kernels follow torch's setting (_backend.num_threads)
