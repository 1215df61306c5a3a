"""fast_fingerprint speed and peak memory on SmolLM2-135M, against TensorGuard's own way, measured in the same run.

Rows (each in a fresh subprocess, so peak RSS is that job's own; page cache warmed first; "cold" is the first call
in the process, "warm" the same call repeated in it):
- read_all: read every tensor of the checkpoint once (get_tensor, then a BLAS mat-vec with ones): the I/O floor.
- tensorguard (ours): profile="tensorguard".
- invariant (ours, the default): profile="invariant".
- full (ours): profile="full".
- tensorguard_way: reference_tensorguard: whole model (layers <= 15) materialised in float32, 15 autograd passes per
  tensor with the gradient materialised, numpy/scipy statistics with the 500k subsample (TensorGuard's procedure).
- fwd_bwd_hooks: the alternative design for "full": one forward/backward of the whole model on 128 random tokens,
  every weight gradient reduced by `moments` in a post-accumulate-grad hook and freed.
Also: relative difference of each tensorguard feature, ours vs TensorGuard's way (the effect of exact moments and
float64 accumulation instead of a float32 gradient and a 500k subsample).

Run: python bench/bench_fingerprint.py [--model DIR] [--repeats 3] [--device cuda]
Peak RSS is host memory; on CUDA the weights still pass through host memory (memory-mapped file -> device).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _job(name: str, model: str, device: str = "cpu") -> dict:
    """Runs in the child: one measurement."""
    import torch

    from tensorguard_fast import fast_fingerprint
    from tensorguard_fast.lineage.loading import open_model

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = {}

    def read_all():
        src = open_model(model)
        total = 0.0
        for k in src.keys():
            # get_tensor may be a zero-copy mmap view, so something must touch every byte. A BLAS mat-vec with a
            # ones vector is the fastest full read measured here (torch's sum/max reductions were 10x slower on this
            # CPU wheel), so it is the floor: the fingerprints cannot read faster than it.
            w = src.get(k)
            if w.dim() == 2:
                w = w.to(device, torch.float32)
                total += float((w @ torch.ones(w.shape[1], device=device)).sum())
            else:
                total += float(w.float().clone().view(-1)[:1].sum()) if w.numel() else 0.0
        return total

    if name in ("read_all", "tensorguard", "full", "invariant"):
        def once():
            if name == "read_all":
                return read_all()
            return fast_fingerprint(model, profile=name, device=device)
        out = once()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result["seconds_cold"] = time.perf_counter() - t0
        # warm: the same call again in this process (first-call costs of BLAS/FFT/CUDA set-up paid; file pages
        # were already in the page cache for the cold call too)
        t1 = time.perf_counter()
        out = once()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result["seconds_warm"] = time.perf_counter() - t1
        if name == "tensorguard":
            result["features"] = out.as_dict()
    elif name == "tensorguard_way":
        from tensorguard_fast.evaluation.tensorguard_way import tensorguard_reference

        result["features"] = tensorguard_reference(open_model(model), subsample=True, device=device)
    elif name == "fwd_bwd_hooks":
        from transformers import AutoModelForCausalLM

        from tensorguard_fast.ops.moments import moments

        net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device)
        stats = {}

        def hook(p, name_):
            stats[name_] = moments(p.grad)
            p.grad = None

        for n, p in net.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, n=n: hook(p, n))
        tokens = torch.randint(0, net.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(device)
        net(tokens, labels=tokens).loss.backward()
        result["tensors"] = len(stats)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    result["seconds"] = result.get("seconds_cold", time.perf_counter() - t0)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_after_import_mb"] = rss0 / 1024
    return result


def run_child(name: str, model: str, device: str = "cpu") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--model", model, "--device", device],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: bundled SmolLM2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the TensorGuard way runs there too)")
    ap.add_argument("--out", default=None, help="results file (default bench/results/bench_fingerprint_<device>.json)")
    ap.add_argument("--quick", action="store_true", help="only read_all and the three profiles (no TensorGuard's "
                    "way, no forward/backward)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_job(args.child, args.model, args.device)))
        return
    from _common import RESULTS, machine_info

    from tensorguard_fast.io.bundled import bundled_model_dir

    model = args.model or str(bundled_model_dir("smollm2"))
    run_child("read_all", model, args.device)  # warm the page cache
    rows = {}
    jobs = [("read_all", args.repeats), ("invariant", args.repeats), ("tensorguard", args.repeats),
            ("full", args.repeats), ("fwd_bwd_hooks", 1), ("tensorguard_way", 1)]
    if args.quick:  # the fingerprint/read ratios only
        jobs = jobs[:4]
    # Interleaved: round i runs every job once, so a load change on a shared machine hits all jobs of a round alike,
    # and the paired ratio (job / read_all of the same round) is taken per round.
    results = {name: [] for name, _ in jobs}
    for i in range(max(r for _, r in jobs)):
        for name, repeats in jobs:
            if i < repeats:
                results[name].append(run_child(name, model, args.device))
    for name, _ in jobs:
        runs = results[name]
        times = sorted(r["seconds"] for r in runs)
        warm = sorted(r.get("seconds_warm", r["seconds"]) for r in runs)
        rows[name] = {"seconds_p50": times[len(times) // 2], "seconds_all": times,
                      "seconds_all_unsorted": [r["seconds"] for r in runs],
                      "seconds_warm_p50": warm[len(warm) // 2],
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                      "rss_after_import_mb": runs[0]["rss_after_import_mb"], "features": runs[0].get("features")}
        print(f"{name:>16}: {rows[name]['seconds_p50']:.3f}s (warm {rows[name]['seconds_warm_p50']:.3f}s)  peak RSS "
              f"{rows[name]['peak_rss_mb']:.0f} MB", flush=True)
    read = rows["read_all"]["seconds_p50"]
    summary = {}
    for prof in ("invariant", "tensorguard", "full"):
        summary[f"{prof}_over_read_all"] = rows[prof]["seconds_p50"] / read
        summary[f"{prof}_over_read_all_warm"] = rows[prof]["seconds_warm_p50"] / rows["read_all"]["seconds_warm_p50"]
        # ratio of medians can hide a bad pairing on a shared machine: also the median of per-repeat ratios
        summary[f"{prof}_over_read_all_paired_median"] = float(sorted(
            a / b for a, b in zip(rows[prof]["seconds_all_unsorted"], rows["read_all"]["seconds_all_unsorted"])
        )[len(rows[prof]["seconds_all_unsorted"]) // 2])
    diffs = {}
    if "tensorguard_way" in rows:
        ours, way = rows["tensorguard"]["features"], rows["tensorguard_way"]["features"]
        diffs = {k: abs(ours[k] - way[k]) / max(abs(way[k]), 1e-30) for k in way}
        summary["speedup_tensorguard_vs_tensorguard_way"] = (rows["tensorguard_way"]["seconds_p50"]
                                                              / rows["tensorguard"]["seconds_p50"])
        summary["fwd_bwd_over_full"] = rows["fwd_bwd_hooks"]["seconds_p50"] / rows["full"]["seconds_p50"]
    summary["feature_relative_difference"] = diffs
    for r in rows.values():
        r.pop("features", None)
    report = {"model": model, "device": args.device, "machine": machine_info(), "rows": rows, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"bench_fingerprint_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(report, indent=1))
    wread = rows["read_all"]["seconds_warm_p50"]
    print("\n| job | seconds cold (p50) | x read_all | seconds warm (p50) | x read_all warm | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds_p50']:.3f} | {r['seconds_p50'] / read:.2f} | {r['seconds_warm_p50']:.3f} | "
              f"{r['seconds_warm_p50'] / wread:.2f} | {r['peak_rss_mb']:.0f} |")
    for prof in ("invariant", "tensorguard", "full"):
        print(f"{prof} / read_all: {summary[prof + '_over_read_all']:.2f} (median of paired repeats "
              f"{summary[prof + '_over_read_all_paired_median']:.2f})")
    if diffs:
        print(f"\nspeed-up, tensorguard profile vs TensorGuard's way: "
              f"{summary['speedup_tensorguard_vs_tensorguard_way']:.1f}x")
    print("feature relative difference, ours vs TensorGuard's way:")
    for k, v in diffs.items():
        print(f"  {k:<18} {v:.2e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
