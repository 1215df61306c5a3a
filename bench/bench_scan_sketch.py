"""What the gradient sketch adds to a scan's scoring time: scan.score_batch as the scan runs it (forward with the
shared prefix, spectrum + sketch in one vocabulary pass) against the same batches scored for GradSentry's spectrum
alone, alternated in the same run. SmolLM2, fanoutqa with the chat template, batches of 16 as the scan plans them.

    PYTHONPATH=. python bench/bench_scan_sketch.py --samples 160 --rounds 3

Issue budget: the sketch adds <= 15% to a scan's scoring time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_results  # noqa: E402
from tensorguard_fast.backdoor import entropy, prefix  # noqa: E402
from tensorguard_fast.backdoor.datasets import collate, load_samples, pad_id  # noqa: E402
from tensorguard_fast.backdoor.scan import plan_batches, score_batch  # noqa: E402
from tensorguard_fast.evaluation.attacks import poisoned_set, write_jsonl  # noqa: E402
from tensorguard_fast.io.bundled import load_bundled  # noqa: E402


def spectrum_only(model, tokenizer, dataset, batch):
    """The scan's batch without the sketch: the same forward, GradSentry's spectrum alone."""
    b = collate([dataset.samples[i] for i in batch], pad_id(tokenizer))
    hidden, weight, targets = entropy.gradient_inputs(model, b, prefix_cache=prefix.for_dataset(model, dataset))
    return entropy.gram_spectrum_from_hidden(hidden, weight, targets, crop=8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    model, tok = load_bundled("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(poisoned_set("badnets", args.samples, 0.1, seed=0), os.path.join(tmp, "d.jsonl"))
        ds = load_samples(data, tok, max_len=256)
    batches = plan_batches(ds, range(len(ds)), 16)
    routes = {"spectrum only": lambda b: spectrum_only(model, tok, ds, b),
              "scan (spectrum + sketch)": lambda b: score_batch(model, tok, ds, b)}
    for fn in routes.values():   # warm-up: weights, R, the prefix cache
        fn(batches[0])
    times = {k: [] for k in routes}
    for _ in range(args.rounds):
        for name, fn in routes.items():
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["spectrum only"])
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rows.append({"route": name, "seconds": med, "samples_per_s": len(ds) / med, "x_spectrum_only": med / base,
                     "all_rounds": t})
        print(f"{name:26s} {med:7.2f} s  {len(ds) / med:6.1f} samples/s  {med / base:.3f}x spectrum only")
    write_results("bench_scan_sketch_cpu", rows, {"samples": len(ds), "rounds": args.rounds})


if __name__ == "__main__":
    main()
