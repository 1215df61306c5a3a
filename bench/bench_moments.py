"""moments vs the obvious PyTorch way and vs one torch.sum over the same tensor (the memory-bound floor).

Goals (issues 2 and 13): >= 3x faster than the naive way on CPU; time within 1.3x of one torch.sum from 16M to 256M
values, fp32 and bf16.
Run: python bench/bench_moments.py [--sizes 16000000 64000000 256000000] [--repeats 7] [--rounds 3] [--no-naive]

Timing: `ours` and `torch.sum` are measured in alternation, `--rounds` times, each round `--repeats` calls of each;
the reported ratio is the median over rounds of (ours p50 / sum p50) within the round, so a burst of load from other
processes hits both sides of a ratio, not one. On a shared machine read the p20..p80 spread of the rounds too.
"""
from __future__ import annotations

import argparse
import statistics
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
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_003, 16_000_000, 64_000_000, 256_000_000])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of ours / torch.sum (ratio: median of rounds)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive way (slow at 256M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="results name (default bench_moments_<device>)")
    args = ap.parse_args(argv)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.sizes:
            x = torch.randn(n, device=args.device).to(dtype)
            ours_runs, sum_runs, ratios = [], [], []
            for _ in range(args.rounds):
                ours_runs.append(timeit(lambda: moments(x), repeats=args.repeats, device=args.device))
                sum_runs.append(timeit(lambda: x.sum(), repeats=args.repeats, device=args.device))
                ratios.append(ours_runs[-1]["p50"] / sum_runs[-1]["p50"])
            backend = _backend.last_backend("moments")
            ours_s = statistics.median(r["p50"] for r in ours_runs)
            sum_s = statistics.median(r["p50"] for r in sum_runs)
            row = {"dtype": dtype_name, "n": n, "backend": backend, "ours_ms": ours_s * 1e3, "sum_ms": sum_s * 1e3,
                   "ours_over_sum": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                   "ours_GBps": x.numel() * x.element_size() / ours_s / 1e9, "ratios": ratios,
                   "ours": ours_runs, "sum": sum_runs}
            if not args.no_naive:
                base = timeit(lambda: naive(x), repeats=max(3, args.repeats // 2), device=args.device)
                row.update(naive_ms=base["p50"] * 1e3, speedup_vs_naive=base["p50"] / ours_s, naive=base)
            rows.append(row)
            del x
    print_table(f"moments on {args.device} (medians over {args.rounds} rounds of {args.repeats}; "
                f"{torch.get_num_threads()} threads)", rows,
                ["dtype", "n", "backend", "ours_ms", "sum_ms", "ours_over_sum", "ratio_min", "ratio_max",
                 "naive_ms", "speedup_vs_naive", "ours_GBps"])
    write_results(args.out or f"bench_moments_{args.device}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
