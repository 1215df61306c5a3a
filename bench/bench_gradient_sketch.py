"""gradient_sketch: what the sketch adds to the vocabulary-chunked pass, against the materialised way, same run.

Inputs (from hidden states, T = 64 answer tokens of S = 96 per sample): hidden (B, S, d), lm_head weight (V, d),
targets with the last T positions scored; SmolLM2-135M's head (V = 49152, d = 576) and a Llama-7B head (32000 x 4096).
Routes, all on the same inputs, timed in interleaved rounds (one run of each route per round; the medians of the
rounds are compared, so a load change on a shared machine hits every route alike):
- pass: `answer_error_blocks` (GradSentry's error blocks at crop 8: chunked logits, online logsumexp), no sketch;
- pass + sketch (gemm): the same call with `sketch=R`, the C++ kernel writing exp(z - m) and a torch GEMM by [R, 1];
- pass + sketch (in-kernel): the same with the product accumulated inside the C++ kernel (CPP_PRODUCT = "acc");
- sketch alone: `gradient_sketch_from_hidden` (no error blocks);
- materialised: float32 logits of the scored rows, softmax - onehot, G_b = E_b^T H_b / n_b (V x d), R^T G_b.
The issue's budget is the sketch's share of a scan's scoring time (<= 15%, measured end to end by
bench/bench_entropy.py); here the op-level overhead = (pass + sketch) / pass - 1, in wall time and in process CPU time
(the steadier figure on a shared machine; run with --threads 1 to keep OpenMP spin-waits out of it).
Memory: bench/_memory.py (a fresh subprocess per route on CPU, VmHWM - RSS before).

Run: python bench/bench_gradient_sketch.py [--device cpu|cuda] [--repeats 5] [--threads 2] [--no-memory] [--skip-7b]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_route_arguments, apply_threads, print_table, write_results  # noqa: E402
from _memory import cuda_peak_bytes, print_peak_bytes, rss_peak_bytes_subprocess  # noqa: E402

from tensorguard_fast.ops import gradient_sketch_accumulator as accumulator  # noqa: E402
from tensorguard_fast.ops.gradient_sketch import gradient_sketch_from_hidden, sketch_matrix  # noqa: E402
from tensorguard_fast.ops.lm_head_errors import answer_error_blocks  # noqa: E402

HEADS = {"smollm2": (49152, 576), "llama7b": (32000, 4096)}
T_ANSWER = 64
SEQ = 96
K = 32


def make_forward(name: str, batch: int, device: str, seed: int = 0):
    vocab, d = HEADS[name]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, SEQ, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * (3.0 / math.sqrt(d))
    targets = torch.randint(0, vocab, (batch, SEQ), generator=g)
    targets[:, : SEQ - T_ANSWER] = -100
    return hidden.to(device), weight.to(device), targets.to(device)


def _with_product(product: str, fn):
    def run(hidden, weight, targets):
        old = accumulator.CPP_PRODUCT
        accumulator.CPP_PRODUCT = product
        try:
            return fn(hidden, weight, targets)
        finally:
            accumulator.CPP_PRODUCT = old
    return run


def pass_only(hidden, weight, targets):
    return answer_error_blocks(hidden, weight, targets)


def pass_with_sketch(hidden, weight, targets):
    return answer_error_blocks(hidden, weight, targets, sketch=sketch_matrix(weight.shape[0], K, device=weight.device))


def sketch_alone(hidden, weight, targets):
    return gradient_sketch_from_hidden(hidden, weight, targets, k=K)


def materialised(hidden, weight, targets):
    r = sketch_matrix(weight.shape[0], K, device=weight.device)
    out = []
    for b in range(hidden.shape[0]):
        keep = targets[b] != -100
        h, y = hidden[b][keep], targets[b][keep]
        e = torch.softmax(h @ weight.T, -1)  # T x V
        e[torch.arange(len(y)), y] -= 1
        g = e.T @ h / len(y)  # V x d: the full gradient
        out.append(r.T @ g)
    return torch.stack(out)


ROUTES = {"pass (error blocks, no sketch)": pass_only,
          "pass + sketch (C++ exp, torch GEMM)": _with_product("gemm", pass_with_sketch),
          "pass + sketch (C++ in-kernel product)": _with_product("acc", pass_with_sketch),
          "sketch alone (gemm)": _with_product("gemm", sketch_alone),
          "materialised logits + G + R^T G": materialised}


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(routes, inputs, repeats: int, device: str) -> dict:
    """Wall and process CPU seconds per route. On a shared CPU the process CPU time is the steadier measure of the
    work (time spent preempted is not in it); with one thread it has no OpenMP spin-wait in it either."""
    wall = {name: [] for name in routes}
    cpu = {name: [] for name in routes}
    with torch.no_grad():
        for fn in routes.values():
            fn(*inputs)  # warm-up: R cache, thread pools, kernel selection
        for _ in range(repeats):
            for name, fn in routes.items():
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn(*inputs)
                _sync(device)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {name: {"p50": statistics.median(wall[name]), "min": min(wall[name]), "cpu_p50": statistics.median(cpu[name]),
                   "runs": len(wall[name])} for name in routes}


def memory_probe(argv) -> int:
    config, route, batch, device = argv
    inputs = make_forward(config, int(batch), device)
    fn = ROUTES[route]
    with torch.no_grad():
        print_peak_bytes(lambda: fn(*inputs), device)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-probe":
        return memory_probe(argv[1:])
    ap = argparse.ArgumentParser()
    add_route_arguments(ap, "samples per call (default 4 SmolLM2 / 2 7B on CPU, 16 / 8 on CUDA)")
    ap.add_argument("--skip-7b", action="store_true")
    args = ap.parse_args(argv)
    apply_threads(args)
    cuda = args.device == "cuda"
    plan = [("smollm2", args.batch or (16 if cuda else 4))]
    if not args.skip_7b:
        plan.append(("llama7b", args.batch or (8 if cuda else 2)))
    routes = dict(ROUTES) if not cuda else {k: v for k, v in ROUTES.items() if "in-kernel" not in k}
    rows = []
    for config, batch in plan:
        inputs = make_forward(config, batch, args.device)
        med = interleaved_medians(routes, inputs, args.repeats, args.device)
        base = med["pass (error blocks, no sketch)"]
        for route, t in med.items():
            row = {"config": config, "V x d": "x".join(map(str, HEADS[config])), "batch": batch,
                   "route": route, "ms_per_sample": t["p50"] / batch * 1e3, "vs_pass": t["p50"] / base["p50"],
                   "cpu_ms_per_sample": t["cpu_p50"] / batch * 1e3, "cpu_vs_pass": t["cpu_p50"] / base["cpu_p50"],
                   "timing_s": t}
            if not args.no_memory:
                peak = (cuda_peak_bytes(lambda: routes[route](*inputs)) if cuda else
                        rss_peak_bytes_subprocess(__file__, [config, route, str(batch), args.device]))
                row["peak_extra_MB"] = peak / 2**20
            rows.append(row)
            print(f"{config:8s} {route:40s} {row['ms_per_sample']:9.2f} ms/sample x{row['vs_pass']:.3f}  cpu "
                  f"{row['cpu_ms_per_sample']:9.2f} ms/sample x{row['cpu_vs_pass']:.3f} "
                  f"{row.get('peak_extra_MB', float('nan')):8.1f} MB", flush=True)
        del inputs
    title = (f"gradient_sketch on {args.device} (k = {K}, T = {T_ANSWER} answer tokens; medians of {args.repeats} "
             f"interleaved rounds; {torch.get_num_threads()} threads; vs_pass = route time / pass without sketch; "
             f"cpu = process CPU time)")
    print_table(title, rows, ["config", "V x d", "batch", "route", "ms_per_sample", "vs_pass", "cpu_ms_per_sample",
                              "cpu_vs_pass", "peak_extra_MB"])
    write_results(f"bench_gradient_sketch_{args.device}", rows,
                  {"memory_method": "cuda allocator peak" if cuda else "subprocess VmHWM - RSS before",
                   "k": K, "t_answer": T_ANSWER})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
