"""gram_entropy vs the routes that materialise the gradient: time per sample and peak extra memory, same run.

Two families of inputs (T = 64 answer tokens per sample):
- blocks: E (B, T, V') and H (B, T, d') at GradSentry's crops: SmolLM2-135M (V/8 x d/8 = 6144 x 72) and Llama-7B
  (4000 x 512). Ours = Gram route (`gram_entropy`); baselines form G_b = E_b^T H_b (float32, one sample at a time, as
  GradSentry does) and take `torch.svd_lowrank(q=16, niter=2)` (GradSentry's call) or `torch.linalg.svdvals` (exact).
- from hidden states: hidden (B, S, d), lm_head weight (V, d), targets with the last T positions scored. Ours =
  `gram_entropy_from_hidden` (logits only at scored positions, vocabulary chunks of 8192, crop, Gram route). Baselines:
  GradSentry's way restricted to lm_head (logits of all S positions, autograd of the mean answer CE w.r.t. the whole
  weight, crop, svd_lowrank), and materialised B x S x V logits with the analytic G and svdvals.
Memory: see bench/_memory.py (CUDA allocator peak; on CPU a fresh subprocess per route and ru_maxrss).

Run: python bench/bench_gram_entropy.py [--device cpu|cuda] [--repeats 5] [--no-memory] [--skip-7b-hidden]
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
from tensorguard_fast.ops.gram_entropy import gram_entropy, gram_entropy_from_hidden  # noqa: E402

CROPS = {"smollm2-crop": (6144, 72), "llama7b-crop": (4000, 512)}
HEADS = {"smollm2": (49152, 576), "llama7b": (32000, 4096)}
T_ANSWER = 64
SEQ = 96


def gradsentry_entropy(s: torch.Tensor, q: int = 16) -> float:
    s = s.double().clamp_min(1e-12)
    s = torch.cat([s, s.new_full((max(0, q - s.numel()),), 1e-12)])[:q]
    p = s / s.sum()
    return float(-(p * p.log()).sum() / math.log(q))


# --- inputs ---------------------------------------------------------------------------------------------------------

def make_blocks(name: str, batch: int, device: str, seed: int = 0):
    vc, dc = CROPS[name]
    g = torch.Generator().manual_seed(seed)
    # E rows look like softmax - onehot restricted to the crop: small positive mass, an occasional -1
    e = torch.softmax(torch.randn(batch, T_ANSWER, vc, generator=g) * 2, -1) * 0.3
    e[:, ::7, 3] -= 1.0
    h = torch.randn(batch, T_ANSWER, dc, generator=g)
    return e.to(device), h.to(device)


def make_forward(name: str, batch: int, device: str, seed: int = 0):
    vocab, d = HEADS[name]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, SEQ, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * (1.0 / math.sqrt(d))
    targets = torch.randint(0, vocab, (batch, SEQ), generator=g)
    targets[:, : SEQ - T_ANSWER] = -100
    return hidden.to(device), weight.to(device), targets.to(device)


# --- routes ---------------------------------------------------------------------------------------------------------

def blocks_ours(e, h):
    return gram_entropy(e, h)


def blocks_lowrank(e, h):
    return [gradsentry_entropy(torch.svd_lowrank(eb.mT @ hb, q=16, niter=2)[1]) for eb, hb in zip(e, h)]


def blocks_svdvals(e, h):
    return [gradsentry_entropy(torch.linalg.svdvals(eb.mT @ hb)[:16]) for eb, hb in zip(e, h)]


def hidden_ours(hidden, weight, targets):
    return gram_entropy_from_hidden(hidden, weight, targets)


def hidden_gradsentry(hidden, weight, targets):
    vocab, d = weight.shape
    out = []
    for b in range(hidden.shape[0]):
        w = weight.detach().requires_grad_(True)
        logits = hidden[b] @ w.T  # all S positions, as the model's forward makes them
        keep = targets[b] != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], targets[b][keep])
        (grad,) = torch.autograd.grad(loss, [w])
        out.append(gradsentry_entropy(torch.svd_lowrank(grad[: vocab // 8, : d // 8], q=16, niter=2)[1]))
    return out


def hidden_materialised(hidden, weight, targets):
    vocab, d = weight.shape
    probs = torch.softmax(hidden @ weight.T, -1)  # B x S x V
    out = []
    for b in range(hidden.shape[0]):
        keep = targets[b] != -100
        e = probs[b][keep][:, : vocab // 8].clone()
        y = targets[b][keep]
        inside = y < vocab // 8
        e[inside.nonzero()[:, 0], y[inside]] -= 1
        g = e.T @ hidden[b][keep][:, : d // 8] / int(keep.sum())
        out.append(gradsentry_entropy(torch.linalg.svdvals(g)[:16]))
    return out


BLOCK_ROUTES = {"ours (Gram route)": blocks_ours, "crop + svd_lowrank": blocks_lowrank, "crop + svdvals": blocks_svdvals}
HIDDEN_ROUTES = {"ours (chunked logits, Gram)": hidden_ours, "GradSentry: logits + autograd + svd_lowrank":
                 hidden_gradsentry, "B x S x V logits + G + svdvals": hidden_materialised}


def build(kind: str, config: str, batch: int, device: str):
    if kind == "blocks":
        return make_blocks(config, batch, device), BLOCK_ROUTES
    return make_forward(config, batch, device), HIDDEN_ROUTES


def memory_probe(argv) -> int:
    kind, config, route, batch, device = argv
    inputs, routes = build(kind, config, int(batch), device)
    fn = routes[route]
    torch.set_grad_enabled(kind == "hidden")
    print_peak_bytes(lambda: fn(*inputs), device)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-probe":
        return memory_probe(argv[1:])
    ap = argparse.ArgumentParser()
    add_route_arguments(ap, "samples per call (default 8 blocks / 4 hidden on CPU)")
    ap.add_argument("--skip-7b-hidden", action="store_true", help="the 7B forward routes take minutes on 2 cores")
    args = ap.parse_args(argv)
    apply_threads(args)
    cuda = args.device == "cuda"
    plan = [("blocks", c, args.batch or (32 if cuda else 8)) for c in CROPS]
    plan += [("hidden", "smollm2", args.batch or (16 if cuda else 4))]
    if not args.skip_7b_hidden:
        plan += [("hidden", "llama7b", args.batch or (8 if cuda else 2))]
    rows = []
    for kind, config, batch in plan:
        inputs, routes = build(kind, config, batch, args.device)
        base = None
        for route, fn in routes.items():
            with torch.set_grad_enabled(kind == "hidden"):
                t = timeit(lambda: fn(*inputs), repeats=args.repeats if route.startswith("ours") else
                           max(3, args.repeats // 2), device=args.device)
            op = "gram_spectrum" if kind == "blocks" else "gram_entropy"
            ours_backend = _backend.last_backend(op) if route.startswith("ours") else "torch"
            base = t if base is None else base
            row = {"inputs": kind, "config": config, "batch": batch, "route": route, "backend": ours_backend,
                   "ms_per_sample": t["p50"] / batch * 1e3, "x_slower_than_ours": t["p50"] / base["p50"],
                   "timing": t}
            if not args.no_memory:
                if cuda:
                    peak = cuda_peak_bytes(lambda: fn(*inputs))
                else:
                    peak = rss_peak_bytes_subprocess(__file__, [kind, config, route, str(batch), args.device])
                row["peak_extra_MB"] = peak / 2**20
            rows.append(row)
            print(f"{kind:6s} {config:14s} {route:45s} {row['ms_per_sample']:9.2f} ms/sample "
                  f"x{row['x_slower_than_ours']:.2f}  {row.get('peak_extra_MB', float('nan')):8.1f} MB", flush=True)
        del inputs
    title = (f"gram_entropy on {args.device} (T = {T_ANSWER} answer tokens; medians; {torch.get_num_threads()} "
             f"threads; x = route time / ours)")
    print_table(title, rows, ["inputs", "config", "batch", "route", "backend", "ms_per_sample", "x_slower_than_ours",
                              "peak_extra_MB"])
    write_results(f"bench_gram_entropy_{args.device}_{torch.get_num_threads()}threads", rows,
                  {"memory_method": "cuda allocator peak" if cuda else "subprocess ru_maxrss - rss before (psutil)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
