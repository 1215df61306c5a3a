"""fft_entropy (streaming four-step) vs materialising G, torch.fft.rfft of its flattening, and the entropy.

Inputs: E (B, T, N1), H (B, T, N2) with T = 64, at GradSentry's crops: SmolLM2-135M (6144 x 72) and Llama-7B
(4000 x 512); one-sided spectrum, no mean removal (the defaults). Ours never holds G or its spectrum whole (tiles of
~2^20 complex values); the baseline holds G (N floats) and its spectrum (N/2 + 1 complex) per sample.
Time per sample (median) and peak extra memory (bench/_memory.py) of each route, measured in the same run.

Run: python bench/bench_fft_entropy.py [--device cpu|cuda] [--repeats 5] [--no-memory]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_route_arguments, apply_threads, print_table, timeit, write_results  # noqa: E402
from _memory import cuda_peak_bytes, print_peak_bytes, rss_peak_bytes_subprocess  # noqa: E402

from tensorguard_fast import _backend  # noqa: E402
from tensorguard_fast.ops.fft_entropy import fft_entropy  # noqa: E402

CROPS = {"smollm2-crop": (6144, 72), "llama7b-crop": (4000, 512)}
T_ANSWER = 64


def make_blocks(name: str, batch: int, device: str, seed: int = 0):
    n1, n2 = CROPS[name]
    g = torch.Generator().manual_seed(seed)
    e = torch.softmax(torch.randn(batch, T_ANSWER, n1, generator=g) * 2, -1) * 0.3
    e[:, ::7, 3] -= 1.0
    h = torch.randn(batch, T_ANSWER, n2, generator=g)
    return e.to(device), h.to(device)


def ours(e, h):
    return fft_entropy(e, h)


def materialised(e, h):
    out = []
    for eb, hb in zip(e, h):
        spec = torch.fft.rfft((eb.mT @ hb).reshape(-1))
        p = spec.real ** 2 + spec.imag ** 2
        p = p / p.sum()
        out.append(float(-(p * torch.log(p.clamp_min(1e-45))).sum() / math.log(p.numel())))
    return out


ROUTES = {"ours (four-step, streamed)": ours, "G + torch.fft.rfft + entropy": materialised}


def memory_probe(argv) -> int:
    config, route, batch, device = argv
    e, h = make_blocks(config, int(batch), device)
    fn = ROUTES[route]
    print_peak_bytes(lambda: fn(e, h), device)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-probe":
        return memory_probe(argv[1:])
    ap = argparse.ArgumentParser()
    add_route_arguments(ap, "samples per call (default 4 on CPU, 32 on CUDA)")
    args = ap.parse_args(argv)
    apply_threads(args)
    cuda = args.device == "cuda"
    batch = args.batch or (32 if cuda else 4)
    rows = []
    torch.set_grad_enabled(False)
    for config in CROPS:
        e, h = make_blocks(config, batch, args.device)
        base = None
        for route, fn in ROUTES.items():
            t = timeit(lambda: fn(e, h), repeats=args.repeats, device=args.device)
            base = t if base is None else base
            row = {"config": config, "batch": batch, "route": route,
                   "backend": _backend.last_backend("fft_entropy") if route.startswith("ours") else "torch",
                   "ms_per_sample": t["p50"] / batch * 1e3, "x_slower_than_ours": t["p50"] / base["p50"],
                   "timing": t}
            if not args.no_memory:
                peak = cuda_peak_bytes(lambda: fn(e, h)) if cuda else rss_peak_bytes_subprocess(
                    __file__, [config, route, str(batch), args.device])
                row["peak_extra_MB"] = peak / 2**20
            rows.append(row)
            print(f"{config:14s} {route:32s} {row['ms_per_sample']:9.2f} ms/sample x{row['x_slower_than_ours']:.2f} "
                  f"{row.get('peak_extra_MB', float('nan')):8.1f} MB", flush=True)
        agree = max(abs(a - b) for a, b in zip(ours(e, h).tolist(), materialised(e, h)))
        rows[-1]["max_abs_entropy_difference"] = agree
    title = (f"fft_entropy on {args.device} (T = {T_ANSWER}; one-sided; medians; {torch.get_num_threads()} threads; "
             f"x = route time / ours)")
    print_table(title, rows, ["config", "batch", "route", "backend", "ms_per_sample", "x_slower_than_ours",
                              "peak_extra_MB", "max_abs_entropy_difference"])
    write_results(f"bench_fft_entropy_{args.device}_{torch.get_num_threads()}threads", rows,
                  {"memory_method": "cuda allocator peak" if cuda else "subprocess ru_maxrss - rss before (psutil)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
