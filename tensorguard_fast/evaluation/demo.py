"""The main job on the bundled real model, offline: `python -m tensorguard_fast.evaluation.demo [--out DIR] [-n N]`.

1. Backdoor filter: a fine-tuning set of real fanoutqa (question, answer) pairs, 10% poisoned with a BadNets-style
   trigger and a link payload, with long-answer and repeated-closing-line clean controls, scanned with
   SmolLM2-135M-Instruct by the default association rule: flags, reasons, clean set (`scan`).
2. Model lineage: SmolLM2 against a copy with 1e-3 relative noise (a derivative) and a random-init model of the same
   shape (another family): fingerprints and distances.
3. The engine: every weight tensor of SmolLM2 summarised by the fused moments kernel, checked against float64.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def backdoor(out: Path, n: int) -> None:
    from .attacks import poisoned_set, write_jsonl
    from ..io.bundled import load_bundled
    from ..backdoor.scan import scan

    records = poisoned_set("badnets", n, 0.1, seed=0, long_clean=0.15, benign_repeat=0.15)
    data = write_jsonl(records, str(out / "train.jsonl"))
    model, tokenizer = load_bundled("smollm2")
    t0 = time.perf_counter()
    summary = scan(model, tokenizer, data, str(out / "scan"), batch_size=16, model_name="bundled:smollm2")
    scores = [json.loads(line) for line in (out / "scan" / "scores.jsonl").read_text().splitlines()]
    poisoned = {r["id"] for r in records if r["poison"]}
    flagged = {s["id"] for s in scores if s["flagged"]}
    hit = len(poisoned & flagged)
    print(f"[scan] {n} samples ({len(poisoned)} poisoned) in {time.perf_counter() - t0:.1f} s: flagged "
          f"{len(flagged)}, of which {hit} poisoned (recall {hit / max(1, len(poisoned)):.2f}, precision "
          f"{hit / max(1, len(flagged)):.2f}); {summary['status']}: {summary['outcome']}; clean set: "
          f"{out / 'scan' / 'clean.jsonl'}")


def lineage() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ..lineage.family import distance
    from ..lineage.fingerprint import fast_fingerprint
    from ..lineage.profiles import get as get_profile
    from ..io.bundled import bundled_model_dir

    path = bundled_model_dir("smollm2")
    base = fast_fingerprint(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3 * p.detach().float().std())
    noisy = fast_fingerprint(model, name="smollm2+noise")
    torch.manual_seed(1)
    other = fast_fingerprint(AutoModelForCausalLM.from_config(model.config), name="random-init")
    radius = get_profile(base.profile).same_family_threshold
    print(f"[lineage] {base.profile}-profile distance SmolLM2 -> noised copy {distance(base, noisy):.3f}, "
          f"-> random init of the same shape {distance(base, other):.3f} (same family below {radius})")


def engine() -> None:
    from safetensors import safe_open

    from .. import _backend, reference
    from ..io.bundled import bundled_model_dir
    from ..ops.moments import moments_many

    with safe_open(str(bundled_model_dir("smollm2") / "model.safetensors"), "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    total = sum(t.numel() for t in tensors)
    t0 = time.perf_counter()
    stats = moments_many(tensors)
    dt = time.perf_counter() - t0
    worst = max(abs(s.std - r.std) / max(r.std, 1e-30) for s, r in zip(stats, map(reference.moments, tensors)))
    print(f"[moments] {len(tensors)} tensors, {total / 1e6:.1f} M weights in {dt * 1e3:.0f} ms "
          f"(backend {_backend.last_backend('moments')}); worst std error vs float64 {worst:.1e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tensorguard_fast.evaluation.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tensorguard-demo", help="where the dataset and the scan results go")
    ap.add_argument("-n", type=int, default=400, help="fine-tuning samples to scan")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backdoor(out, args.n)
    lineage()
    engine()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
