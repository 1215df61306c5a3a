"""Peak extra memory of one call, for the benchmarks that compare memory of routes.

- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated before (exact, the
  caching allocator's own count).
- CPU: torch's CPU allocations are invisible to tracemalloc, and RSS deltas inside one long process lie (glibc keeps
  freed arenas and raises its mmap threshold). So each route runs in a fresh subprocess with a fixed glibc mmap
  threshold (MALLOC_MMAP_THRESHOLD_=128 KiB: large blocks go back to the OS when freed): inputs are built, the route
  runs once to warm up (thread pools, FFT plans, lazy library state), the kernel's peak-RSS mark is reset
  (/proc/self/clear_refs = 5), the route runs again, and the reported figure is VmHWM minus the resident set just
  before that run. ~MB resolution; allocator slack included.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Callable, Sequence


def cuda_peak_bytes(run: Callable[[], object]) -> int:
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_peak_bytes_here(run: Callable[[], object]) -> int:
    """Peak extra resident memory of run() (Linux; see module docstring). Meant for a fresh subprocess."""
    import gc

    run()  # warm-up: one-time library state is not the route's memory
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _status_kb("VmRSS")
    run()
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, (peak - before) * 1024)


def print_peak_bytes(run: Callable[[], object], device: str) -> None:
    """The memory-probe side of rss_peak_bytes_subprocess: run once here and print the peak as the JSON it reads."""
    peak = cuda_peak_bytes(run) if device == "cuda" else rss_peak_bytes_here(run)
    print(json.dumps({"peak_bytes": peak}))


def rss_peak_bytes_subprocess(script: str, args: Sequence[str]) -> int:
    """Run `script --memory-probe ARGS...` in a fresh interpreter; it must print {"peak_bytes": n} as its last line."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, script, "--memory-probe", *args], capture_output=True, text=True,
                         timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {args} failed: {out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])
