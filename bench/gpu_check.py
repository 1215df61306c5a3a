"""One script for a lent GPU: check every Triton op against the float64 reference, then time them.

    python bench/gpu_check.py --out DIR            # on a CUDA machine (H100/H200 class), < 8 minutes
    python bench/gpu_check.py --dry-run            # here: Triton interpreter on CPU, tiny sizes, same code paths

Each section runs on its own: a failure is recorded in the table with its reason and the next section runs. A time
budget skips what would not fit. Prints one table last and writes gpu_check.json (rows + machine info) to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any Triton import

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, timeit  # noqa: E402

ROWS: list = []


def row(section: str, item: str, value, unit: str = "", note: str = "", ok=None):
    ROWS.append({"section": section, "item": item, "value": value, "unit": unit, "ok": ok, "note": note})
    v = f"{value:.4g}" if isinstance(value, float) else value
    print(f"[{section}] {item}: {v} {unit} {'' if ok is None else ('PASS' if ok else 'FAIL')} {note}", flush=True)


def dev() -> torch.device:
    return torch.device("cpu" if DRY else "cuda")


def median_time(fn, repeats=10, warmup=2) -> float:
    return timeit(fn, repeats=repeats, warmup=warmup, device=dev())["p50"]


# ----------------------------------------------------------------------------------------------------- checks
def check_moments():
    from tensorguard_fast import reference
    from tensorguard_fast.ops.moments import moments

    sizes = [1, 7, 127, 4097, 1000003] + ([] if DRY else [67108867])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        worst = 0.0
        for n in sizes:
            x = torch.randn(n, dtype=torch.float64)
            x[: n // 3] = x[: n // 3].abs() ** 1.5  # skewed
            if n > 10:
                x[3], x[5] = math.nan, math.inf
            x = x.to(dtype)
            got = moments(x.to(dev()), backend="triton")
            want = reference.moments(x)
            assert got.count == want.count and got.nonfinite == want.nonfinite, (n, got, want)
            assert got.min == want.min and got.max == want.max
            for f in ("std", "l1", "l2"):
                worst = max(worst, abs(getattr(got, f) - getattr(want, f)) / max(abs(getattr(want, f)), 1e-300))
            if n > 2:
                for f in ("skewness", "kurtosis"):
                    worst = max(worst, abs(getattr(got, f) - getattr(want, f)) / max(1.0, abs(getattr(want, f))))
        row("check", f"moments triton {str(dtype)[6:]} (n up to {sizes[-1]})", worst, "max rel err", ok=worst < 1e-5)


def check_gram_fft():
    from tensorguard_fast import reference
    from tensorguard_fast.ops import fft_entropy as fe
    from tensorguard_fast.ops import gram_entropy as ge

    g = torch.Generator().manual_seed(0)
    B, S, d, V = (2, 9, 64, 1000) if DRY else (4, 96, 576, 49152)
    hidden = torch.randn(B, S, d, generator=g)
    weight = torch.randn(V, d, generator=g) * 0.05
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[:, : S // 2] = -100
    want = reference.gram_entropy_from_hidden(hidden, weight, targets)
    got = ge.gram_entropy_from_hidden(hidden.to(dev()), weight.to(dev()), targets.to(dev()), backend="triton")
    err = float((got.cpu().double() - want).abs().max())
    row("check", "gram_entropy_from_hidden triton", err, "max abs err", ok=err < 1e-5)
    for dtype in (torch.bfloat16,):
        got = ge.gram_entropy_from_hidden(hidden.to(dev(), dtype), weight.to(dev(), dtype), targets.to(dev()),
                                          backend="triton")
        ref16 = reference.gram_entropy_from_hidden(hidden.to(dtype), weight.to(dtype), targets)
        err = float((got.cpu().double() - ref16).abs().max())
        row("check", "gram_entropy_from_hidden triton bf16 inputs", err, "max abs err", ok=err < 1e-3)
    T, n1, n2 = (5, 31, 7) if DRY else (48, 6144, 72)
    E = torch.randn(3, T, n1, generator=g)
    H = torch.randn(3, T, n2, generator=g)
    want = reference.fft_entropy(E, H)
    got = fe.fft_entropy(E.to(dev()), H.to(dev()), backend="triton")
    err = float((got.cpu().double() - want).abs().max())
    row("check", "fft_entropy triton (four-step)", err, "max abs err", ok=err < 1e-5)


def check_gradient_sketch():
    """gradient_sketch (Triton) vs the float64 oracle (materialised logits and G, then R^T G), float32 and bf16
    inputs; the fused answer_error_blocks(sketch=R) leaves E/H/n bit-identical and gives the same sketch."""
    from tensorguard_fast import reference
    from tensorguard_fast.ops.gradient_sketch import gradient_sketch_from_hidden, sketch_matrix
    from tensorguard_fast.ops.lm_head_errors import answer_error_blocks

    g = torch.Generator().manual_seed(0)
    B, S, d, V = (2, 9, 64, 1000) if DRY else (4, 96, 576, 49152)
    hidden = torch.randn(B, S, d, generator=g)
    weight = torch.randn(V, d, generator=g) * (3.0 / math.sqrt(d))
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[:, : S // 2] = -100
    for dtype in (torch.float32, torch.bfloat16):
        h, w = hidden.to(dtype), weight.to(dtype)
        want, _ = reference.gradient_sketch_from_hidden(h, w, targets, sketch_matrix(V, 32, 0, dtype=torch.float64))
        got, _ = gradient_sketch_from_hidden(h.to(dev()), w.to(dev()), targets.to(dev()), backend="triton")
        err = float(((got.cpu().double() - want).abs().amax((1, 2)) / want.abs().amax((1, 2))).max())
        row("check", f"gradient_sketch triton {str(dtype)[6:]} inputs", err, "max rel err", ok=err < 1e-5)
    h, w, t = hidden.to(dev()), weight.to(dev()), targets.to(dev())
    e0, h0, n0 = answer_error_blocks(h, w, t, backend="triton")
    e1, h1, n1, s1 = answer_error_blocks(h, w, t, backend="triton", sketch=sketch_matrix(V, 32, 0, device=dev()))
    alone, _ = gradient_sketch_from_hidden(h, w, t, backend="triton")
    same = bool(torch.equal(e0, e1) and torch.equal(h0, h1) and torch.equal(n0, n1))
    err = float((s1 - alone).abs().max() / alone.abs().max())
    row("check", "gradient_sketch fused into the error-block pass", err, "rel diff vs alone", ok=same and err < 1e-5,
        note="E/H/n bit-identical" if same else "E/H/n CHANGED by the sketch request")


# ---------------------------------------------------------------------------------------------------- timings
def time_gradient_sketch():
    """The error-block pass with and without the fused sketch, and the materialised way, per head shape."""
    from tensorguard_fast.ops.gradient_sketch import sketch_matrix
    from tensorguard_fast.ops.lm_head_errors import answer_error_blocks

    heads = {"SmolLM2 head": (49152, 576), "Llama-7B head": (32000, 4096)}
    batch, seq, answer = (2, 16, 8) if DRY else (16, 256, 128)
    for name, (V, d) in heads.items():
        if DRY:
            V, d = V // 64, d // 8
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(batch, seq, d, generator=g).to(dev())
        weight = (torch.randn(V, d, generator=g) * (3.0 / math.sqrt(d))).to(dev())
        targets = torch.randint(0, V, (batch, seq), generator=g)
        targets[:, : seq - answer] = -100
        targets = targets.to(dev())
        r = sketch_matrix(V, 32, 0, device=dev())

        def materialised():
            for b in range(batch):
                keep = targets[b] != -100
                e = torch.softmax(hidden[b][keep] @ weight.T, -1)
                e[torch.arange(int(keep.sum()), device=dev()), targets[b][keep]] -= 1
                _ = r.T @ (e.T @ hidden[b][keep])

        t_pass = median_time(lambda: answer_error_blocks(hidden, weight, targets, backend="triton"), repeats=5)
        t_fused = median_time(lambda: answer_error_blocks(hidden, weight, targets, backend="triton", sketch=r),
                              repeats=5)
        t_mat = median_time(materialised, repeats=3, warmup=1)
        row("gradient_sketch", f"{name} fp32, {batch} x {answer} answer tokens: pass + sketch", t_fused / batch * 1e3,
            "ms/sample", note=f"pass alone {t_pass / batch * 1e3:.2f} ms -> sketch adds {(t_fused / t_pass - 1) * 100:.1f}%"
                              f"; materialised logits + G + R^T G {t_mat / batch * 1e3:.2f} ms")


def time_moments():
    from tensorguard_fast.ops.moments import moments

    n = (1 << 16) + 3 if DRY else 1 << 28  # 1 GiB of fp32
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, device=dev(), dtype=dtype)
        y = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        t_copy = median_time(lambda: y.copy_(x))
        t_ours = median_time(lambda: moments(x, backend="triton"))
        t_sum = median_time(lambda: x.sum())
        t_naive = median_time(lambda: (x.float().mean(), x.float().std(), ((x.float() - 1) ** 3).mean(),
                                       ((x.float() - 1) ** 4).mean(), x.min(), x.max(), x.float().norm(),
                                       x.float().abs().sum(), (~torch.isfinite(x)).sum()), repeats=5)
        copy_bw = 2 * nbytes / t_copy
        row("moments", f"{str(dtype)[6:]} {nbytes / 2**30:.2f} GiB: ours", nbytes / t_ours / 1e9, "GB/s",
            note=f"{t_ours * 1e3:.2f} ms; copy {copy_bw / 1e9:.0f} GB/s (r+w) -> {nbytes / t_ours / copy_bw:.2f} of copy;"
                 f" one torch.sum {t_sum * 1e3:.2f} ms; naive torch {t_naive / t_ours:.1f}x slower")


def sweep_moments():
    """Launch settings of the moments kernel: block size x warps, GB/s on 1 GiB of fp32 (the default is marked)."""
    from tensorguard_fast.ops import moments_triton

    n = (1 << 14) + 3 if DRY else 1 << 28
    x = torch.randn(n, device=dev())
    default = (moments_triton._block_size(n), 4)
    best = None
    for block in ((1024, 4096) if DRY else (2048, 4096, 8192, 16384, 32768)):
        for warps in ((4,) if DRY else (4, 8, 16)):
            t = median_time(lambda: moments_triton.moments(x, block=block, num_warps=warps), repeats=7)
            gbps = x.numel() * 4 / t / 1e9
            best = max(best or (0, None), (gbps, (block, warps)))
            ROWS.append({"section": "sweep", "item": f"block {block} warps {warps}", "value": gbps, "unit": "GB/s",
                         "ok": None, "note": "default" if (block, warps) == default else ""})
    row("moments", "sweep: best launch (block, warps)", best[0], "GB/s", note=f"{best[1]}; default {default}")


def _answer_batch(vocab: int, batch: int, seq: int, gen):
    input_ids = torch.randint(10, vocab, (batch, seq), generator=gen)
    attention = torch.ones_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for b in range(batch):
        a = int(torch.randint(8, seq // 2, (1,), generator=gen))
        labels[b, seq - a:] = input_ids[b, seq - a:]
        pad = int(torch.randint(0, 8, (1,), generator=gen))
        if pad:
            attention[b, :pad] = 0  # left padding
            labels[b, :pad] = -100
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _gradsentry_way(model, batch, exact: bool = False):
    """The reference method (`reference.gradsentry_gradient` + `gradsentry_lowrank_entropy`): one sample at a time,
    autograd w.r.t. lm_head.weight, crop, svd_lowrank(q=16).

    exact=True takes torch.linalg.svdvals of the same crop instead (the parity target of fast_entropy). With tied
    embeddings autograd also adds the input-embedding path to that weight's gradient; fast_entropy takes the logits
    path only (documented), so parity is judged on the untied model."""
    from tensorguard_fast import reference

    out = []
    for b in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][b].bool()
        crop = reference.gradsentry_gradient(model, batch["input_ids"][b][keep][None], batch["labels"][b][keep][None])
        if exact:
            out.append(float(reference.spectral_entropy(torch.linalg.svdvals(crop.double()), 16)[0]))
        else:
            out.append(reference.gradsentry_lowrank_entropy(crop, 16))
    return out


def time_entropy(name: str, config, batch: int, seq: int):
    from transformers import AutoModelForCausalLM

    from tensorguard_fast.backdoor.entropy import fast_entropy

    torch.manual_seed(0)
    with torch.device(dev()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    head = model.get_output_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(False)
    head.requires_grad_(True)  # GradSentry differentiates w.r.t. lm_head only (tied: the embedding too)
    gen = torch.Generator().manual_seed(1)
    data = {k: v.to(dev()) for k, v in _answer_batch(config.vocab_size, batch, seq, gen).items()}
    from tensorguard_fast.backdoor import entropy as entropy_mod
    from tensorguard_fast.ops import gram_entropy as ge

    with torch.no_grad():
        t_fast = median_time(lambda: fast_entropy(model, data), repeats=5)
        t_fwd = median_time(lambda: model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]),
                            repeats=5)
        t_capture = median_time(lambda: entropy_mod.gradient_inputs(model, data), repeats=5)
        default = ge.HOST_FACTOR_ON_CUDA
        ge.HOST_FACTOR_ON_CUDA = not default
        try:
            t_other = median_time(lambda: fast_entropy(model, data), repeats=5)
        finally:
            ge.HOST_FACTOR_ON_CUDA = default
    t_host, t_dev = (t_fast, t_other) if default else (t_other, t_fast)
    row("fast_entropy", f"{name}: where the time goes", t_fast * 1e3, "ms/batch",
        note=f"forward up to lm_head input {t_capture * 1e3:.1f} ms; spectra {(t_dev - t_capture) * 1e3:.1f} ms "
             f"with cuSOLVER eigh, {(t_host - t_capture) * 1e3:.1f} ms with host factorisation "
             f"(default: {'host' if default else 'device'})")
    n_ref = min(batch, 8)
    sub = {k: v[:n_ref] for k, v in data.items()}
    t_ref = median_time(lambda: _gradsentry_way(model, sub), repeats=3, warmup=1) / n_ref
    ours = fast_entropy(model, sub).double().cpu()
    lowrank = torch.tensor(_gradsentry_way(model, sub), dtype=torch.float64)
    exact = torch.tensor(_gradsentry_way(model, sub, exact=True), dtype=torch.float64)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    row("fast_entropy", f"{name} bf16, {batch} x {seq} tokens", t_fast / batch * 1e3, "ms/sample",
        note=f"GradSentry way {t_ref * 1e3:.1f} ms/sample -> {t_ref / (t_fast / batch):.1f}x; "
             f"/ plain batched forward = {t_fast / t_fwd:.2f}")
    row("fast_entropy", f"{name}: max |ours - autograd crop svdvals|", float((ours - exact).abs().max()), "abs",
        ok=None if tied else float((ours - exact).abs().max()) < 5e-3,
        note=("tied embeddings: autograd adds the input-embedding path, ours is the logits path (documented)"
              if tied else "bf16 model: forward rounding differs between batched and one-at-a-time runs") +
             f"; vs svd_lowrank(q=16) way {float((ours - lowrank).abs().max()):.1e}")


def _configs():
    from transformers import LlamaConfig

    if DRY:
        small = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        untied = LlamaConfig(**{**small.to_dict(), "tie_word_embeddings": False})
        return {"SmolLM2-shape (tiny in dry run)": (small, 4, 32), "Llama-7B-shape (tiny in dry run)": (untied, 4, 32)}
    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       max_position_embeddings=8192, rope_theta=100000.0)
    llama7b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    return {"SmolLM2-135M-shape": (smol, 16, 256), "Llama-7B-shape": (llama7b, 16, 256)}


def time_fingerprint(config):
    from transformers import AutoModelForCausalLM

    from tensorguard_fast.lineage.fingerprint import fast_fingerprint

    with torch.device(dev()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    params = [p for p in model.parameters()]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    t_read = median_time(lambda: [p.sum() for p in params], repeats=3)
    for profile in ("tensorguard", "full"):
        t = median_time(lambda: fast_fingerprint(model, profile=profile, device=dev()), repeats=3, warmup=1)
        row("fingerprint", f"{profile} on {sum(p.numel() for p in params) / 1e9:.2f} B params bf16", t * 1e3, "ms",
            note=f"reading every weight once: {t_read * 1e3:.1f} ms ({nbytes / t_read / 1e9:.0f} GB/s) -> "
                 f"{t / t_read:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--skip", nargs="*", default=[], help="skip sections whose name contains any of these words")
    args = ap.parse_args()
    start = time.time()
    info = machine_info()
    print(json.dumps(info), flush=True)
    from tensorguard_fast import info as tinfo

    print(tinfo.render(tinfo.collect()), flush=True)
    configs = _configs()
    sections = [("check moments", check_moments), ("check gram/fft", check_gram_fft),
                ("check gradient_sketch", check_gradient_sketch), ("time gradient_sketch", time_gradient_sketch),
                ("time moments", time_moments),
                ("sweep moments", sweep_moments)]
    for name, (cfg, b, s) in configs.items():
        sections.append((f"time entropy {name}", lambda cfg=cfg, b=b, s=s, name=name: time_entropy(name, cfg, b, s)))
    sections.append(("time fingerprint", lambda: time_fingerprint(list(configs.values())[-1][0])))
    for name, fn in sections:
        if any(word in name for word in args.skip):
            continue
        if time.time() - start > args.budget_s:
            row(name, "skipped", "-", note=f"time budget {args.budget_s:.0f} s spent")
            continue
        t0 = time.time()
        try:
            fn()
        except Exception as exc:  # record and go on: one broken section must not hide the others
            traceback.print_exc()
            row(name, "error", f"{type(exc).__name__}: {exc}"[:300], ok=False)
        if not DRY:
            torch.cuda.empty_cache()  # a section's model is gone once it returns; hand its memory back
        print(f"-- {name}: {time.time() - t0:.1f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("gpu_check_dry.json" if args.dry_run else "gpu_check.json")).write_text(
        json.dumps({"machine": info, "rows": ROWS, "seconds": time.time() - start}, indent=2, default=str))
    print(f"\ngpu_check on {info['cuda_device'] or 'CPU (dry run)'}  ({time.time() - start:.0f} s)")
    w = max(len(r["section"]) + len(r["item"]) for r in ROWS) + 3
    for r in ROWS:
        v = f"{r['value']:.4g}" if isinstance(r["value"], float) else str(r["value"])
        ok = "" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL")
        print(f"{(r['section'] + ': ' + r['item']).ljust(w)} {v:>10} {r['unit']:<12} {ok:<4} {r['note']}")
    return 1 if any(r["ok"] is False for r in ROWS) else 0


if __name__ == "__main__":
    raise SystemExit(main())
