"""moments vs the obvious PyTorch way and vs one torch.sum over the same tensor (the memory-bound floor).

Goals (issue 2): >= 3x faster than the naive way on CPU; time within 1.3x of one torch.sum.
Run: python bench/bench_moments.py [--sizes 1000000 16000000 64000000] [--repeats 7]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, timeit, write_results  # noqa: E402

from tensorguard_fast import _backend  # noqa: E402
from tensorguard_fast.ops.moments import moments  # noqa: E402


def naive(x: torch.Tensor) -> dict:
    """What one writes without this library: separate torch calls, finite values selected first."""
    finite = torch.isfinite(x)
    v = x[finite].double() if x.dtype != torch.float32 else x[finite]
    mean = v.mean()
    std = v.std(correction=0)
    z = (v - mean) / std
    return {
        "mean": mean, "std": std, "skew": (z ** 3).mean(), "kurt": (z ** 4).mean() - 3, "min": v.min(),
        "max": v.max(), "l1": v.abs().sum(), "l2": torch.linalg.vector_norm(v), "nonfinite": (~finite).sum(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_003, 16_000_000, 64_000_000])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.sizes:
            x = torch.randn(n, device=args.device).to(dtype)
            ours = timeit(lambda: moments(x), repeats=args.repeats, device=args.device)
            backend = _backend.last_backend("moments")
            base = timeit(lambda: naive(x), repeats=max(3, args.repeats // 2), device=args.device)
            floor = timeit(lambda: x.sum(), repeats=args.repeats, device=args.device)
            nbytes = x.numel() * x.element_size()
            rows.append({
                "dtype": dtype_name, "n": n, "backend": backend, "ours_ms": ours["p50"] * 1e3,
                "naive_ms": base["p50"] * 1e3, "sum_ms": floor["p50"] * 1e3,
                "speedup_vs_naive": base["p50"] / ours["p50"], "ours_over_sum": ours["p50"] / floor["p50"],
                "ours_GBps": nbytes / ours["p50"] / 1e9, "ours": ours, "naive": base, "sum": floor,
            })
    print_table(f"moments on {args.device} (medians; {torch.get_num_threads()} threads)", rows,
                ["dtype", "n", "backend", "ours_ms", "naive_ms", "sum_ms", "speedup_vs_naive", "ours_over_sum",
                 "ours_GBps"])
    write_results(f"bench_moments_{args.device}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
