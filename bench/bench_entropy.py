"""fast_entropy against the GradSentry way and against a plain batched forward pass, on SmolLM2, same 16 samples.

    PYTHONPATH=. python bench/bench_entropy.py [--repeats 5] [--no-memory]

Routes (all on the same 16 fanoutqa samples, chat template, answer + EOS scored):
- gradsentry: batch size 1, model.train() as GradSentry calls it, autograd.grad of the mean answer loss w.r.t. the
  lm_head weight (a full backward pass: the weight is tied to the input embedding), crop [:V/8, :d/8],
  torch.svd_lowrank(q=16, niter=2), normalised entropy. One sample after another.
- fast_entropy: one batched forward pass that stops at the lm_head input, Gram route (spectrum="svd").
- forward: model(**batch) under no_grad, logits included: the floor a scoring pass cannot go below by much.
Goals (issue 4): gradsentry / fast_entropy >= 8 (throughput), fast_entropy / forward <= 1.15. Peak memory of each
route in a fresh process (bench/_memory.py). Writes bench/results/bench_entropy.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import machine_info, print_table, timeit, write_results  # noqa: E402

N_SAMPLES = 16


def setup():
    from tensorguard_fast.evaluation.attacks import fanoutqa_pairs
    from tensorguard_fast.io.bundled import load_bundled
    from tensorguard_fast.backdoor.datasets import Sample, collate, pad_id

    model, tok = load_bundled("smollm2")
    pairs = random.Random(0).sample(fanoutqa_pairs(max_answer_chars=200), N_SAMPLES)
    samples = []
    for i, (q, a) in enumerate(pairs):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        samples.append(Sample(index=i, id=i, line=None, record=None,
                              prompt_ids=tok.encode(prompt, add_special_tokens=False),
                              answer_ids=tok.encode(a, add_special_tokens=False) + [tok.eos_token_id]))
    singles = [collate([s], pad_id(tok)) for s in samples]
    return model, collate(samples, pad_id(tok)), singles


def routes(model, batch, singles):
    from tensorguard_fast import reference
    from tensorguard_fast.backdoor.entropy import fast_entropy

    def gradsentry():
        model.train()
        try:
            return [reference.gradsentry_lowrank_entropy(reference.gradsentry_gradient(model, b["input_ids"],
                                                                                       b["labels"]))
                    for b in singles]
        finally:
            model.eval()

    def fast():
        return fast_entropy(model, batch, spectrum="svd")

    def forward():
        with torch.no_grad():
            return model(**batch).logits

    return {"gradsentry": gradsentry, "fast_entropy": fast, "forward": forward}


def memory_probe(route: str) -> None:
    from _memory import rss_peak_bytes_here

    model, batch, singles = setup()
    fn = routes(model, batch, singles)[route]
    print(json.dumps({"peak_bytes": rss_peak_bytes_here(fn)}))


def main(argv=None):
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--memory-probe":
        return memory_probe(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, batch, singles = setup()
    fns = routes(model, batch, singles)
    times = {name: timeit(fn, repeats=args.repeats if name != "gradsentry" else max(2, args.repeats // 2))
             for name, fn in fns.items()}
    memory = {}
    if not args.no_memory:
        from _memory import rss_peak_bytes_subprocess

        memory = {name: rss_peak_bytes_subprocess(os.path.abspath(__file__), [name]) for name in fns}
    tokens = int(batch["attention_mask"].sum())
    rows = []
    for name, t in times.items():
        rows.append({"route": name, "p20_s": t["p20"], "p50_s": t["p50"], "p80_s": t["p80"],
                     "samples_per_s": N_SAMPLES / t["p50"], "peak_MiB": memory.get(name, 0) / 2**20 or None})
    ratios = {"gradsentry_over_fast": times["gradsentry"]["p50"] / times["fast_entropy"]["p50"],
              "fast_over_forward": times["fast_entropy"]["p50"] / times["forward"]["p50"]}
    print_table(f"SmolLM2-135M, {N_SAMPLES} samples ({tokens} tokens), {torch.get_num_threads()} threads", rows,
                ["route", "p20_s", "p50_s", "p80_s", "samples_per_s", "peak_MiB"])
    print(f"\nthroughput fast_entropy / GradSentry way: {ratios['gradsentry_over_fast']:.1f}x (goal >= 8)")
    print(f"time fast_entropy / plain forward:       {ratios['fast_over_forward']:.3f} (goal <= 1.15)")
    write_results("bench_entropy", rows, {"ratios": ratios, "samples": N_SAMPLES, "tokens": tokens,
                                          "machine_note": machine_info().get("cpu")})


if __name__ == "__main__":
    main()
