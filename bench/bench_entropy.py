"""Scan throughput of fast_entropy with and without the shared-prefix forward, against the GradSentry way and a
plain batched forward: SmolLM2, a fanoutqa scan set, with the chat template and without, same run.

    PYTHONPATH=. python bench/bench_entropy.py [--samples 200] [--repeats 3] [--threads 1] [--gradsentry 8]

Data: tensorguard_fast.evaluation.attacks.poisoned_set('badnets', N, 0.1) read by the scan's own loader
(load_samples, answer + EOS scored), cut into the scan's batches (plan_batches: sorted by length, 16 a batch).
Routes, each scoring the whole set batch by batch as scan.score_batch does (forward + Gram spectrum + entropy):
- gradsentry: batch size 1, model.train(), autograd of the mean answer loss w.r.t. the lm_head weight (a full
  backward pass), crop, torch.svd_lowrank(q=16, niter=2), entropy; on the first --gradsentry samples only (its cost
  is per sample), reported per sample.
- today: the full forward of every real token per length group, as before this issue (no shared prefix, nothing cut).
- cut_only: the same less the tokens after each row's last scored position (entropy.through_last_scored; its end
  token), no shared prefix: fast_entropy with share_prefix=False, and what sharing adds to.
- shared_batch: the shared prefix found and run once per batch (what fast_entropy / scan do with no cache held).
- shared_scan: one PrefixCache for the whole scan, made from the prefix every sample shares (scan.py with the
  prefix hook, prefix.for_dataset): the template runs once per scan.
- forward: model(**batch) under no_grad, logits included, on the same batches: a plain batched forward.
tokens = tokens the forward passes computed (padding included; gradsentry: real tokens, plus its backward).
floor: the decoder's Linear layers alone (the matrix products no route can skip), timed on this machine in the same
run on 16 x 30 rows (a batch's shape), per computed token; times the shared_scan route's tokens per sample it is a
floor under that route's time per sample, and today / that floor is the most that sharing these tokens could gain.
Rounds alternate the route order; medians of each route and of the per-round ratios (on a loaded machine the
per-round ratios are the numbers to read: a route's own median moves with the load). Writes
bench/results/bench_entropy.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import machine_info, print_table, write_results  # noqa: E402

BATCH = 16


def load_sets(tok, n):
    """{'chat_template': dataset, 'no_template': dataset}: the same records through the scan's loader."""
    from tensorguard_fast.backdoor.datasets import load_samples
    from tensorguard_fast.evaluation.attacks import poisoned_set, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.jsonl")
        write_jsonl(poisoned_set("badnets", n, 0.1, seed=0), path)
        return {"chat_template": load_samples(path, tok, max_len=512, use_chat_template=True),
                "no_template": load_samples(path, tok, max_len=512, use_chat_template=False)}


def batches_of(model, tok, dataset):
    from tensorguard_fast.backdoor.datasets import collate, pad_id
    from tensorguard_fast.backdoor.scan import plan_batches

    plan = plan_batches(dataset, range(len(dataset)), BATCH)
    return [collate([dataset.samples[i] for i in b], pad_id(tok)) for b in plan]


def group_tokens(batch):
    """Tokens the full forward computes for a batch: each length group at its own width."""
    from tensorguard_fast.backdoor.entropy import length_groups

    lengths = batch["attention_mask"].sum(-1).tolist()
    return sum(lengths[g[0]] * len(g) for g in length_groups(lengths))


def routes(model, batches, gradsentry_n):
    """name -> fn() returning (scores, tokens computed)."""
    from tensorguard_fast import reference
    from tensorguard_fast.backdoor import entropy
    from tensorguard_fast.backdoor.prefix import PrefixCache
    from tensorguard_fast.ops.gram_entropy import gram_spectrum_from_hidden, spectral_entropy

    def entropy_of(hidden, weight, targets):
        svals, _ = gram_spectrum_from_hidden(hidden, weight, targets)
        return spectral_entropy(svals, 16)

    def score(batch, **kw):
        return entropy_of(*entropy.gradient_inputs(model, batch, **kw))

    def score_every_token(batch):   # as before this issue: every real token computed, nothing shared
        hidden = entropy.lm_head_inputs(model, batch["input_ids"], batch["attention_mask"], share_prefix=False)
        weight = entropy.output_embedding(model).weight.detach()
        return entropy_of(hidden, weight, entropy.answer_targets(batch["labels"]))

    def today():
        return torch.cat([score_every_token(b) for b in batches]), sum(group_tokens(b) for b in batches)

    def cut_only():
        cut = [dict(b, attention_mask=entropy.through_last_scored(b["attention_mask"],
                                                                  entropy.answer_targets(b["labels"])))
               for b in batches]
        return torch.cat([score(b, share_prefix=False) for b in batches]), sum(group_tokens(b) for b in cut)

    def shared_batch():
        out, tokens = [], 0
        for b in batches:
            cache = PrefixCache(model)
            out.append(score(b, prefix_cache=cache))
            tokens += cache.tokens_run
        return torch.cat(out), tokens

    rows = [b["input_ids"][r, :int(b["attention_mask"][r].sum())].tolist()
            for b in batches for r in range(b["input_ids"].shape[0])]

    def shared_scan():   # as scan with the hook: prefix.for_dataset(model, dataset)
        cache = PrefixCache.for_rows(model, rows)
        return torch.cat([score(b, prefix_cache=cache) for b in batches]), cache.tokens_run

    def forward():
        with torch.no_grad():
            for b in batches:
                model(**b)
        return None, sum(b["input_ids"].numel() for b in batches)

    every = [{k: v[r:r + 1, :int(b["attention_mask"][r].sum())] for k, v in b.items()}
             for b in batches for r in range(b["input_ids"].shape[0])]
    step = max(1, len(every) // max(1, gradsentry_n))
    singles = every[::step][:gradsentry_n]   # spread over the length-sorted set: its own length mix

    def gradsentry():
        model.train()
        try:
            s = [reference.gradsentry_lowrank_entropy(reference.gradsentry_gradient(model, b["input_ids"], b["labels"]))
                 for b in singles]
        finally:
            model.eval()
        return s, sum(b["input_ids"].numel() for b in singles)

    return {"today": today, "cut_only": cut_only, "shared_batch": shared_batch, "shared_scan": shared_scan,
            "forward": forward, "gradsentry": gradsentry}, len(singles)


def linear_floor(model, rows: int = 16 * 30, repeats: int = 5) -> float:
    """Seconds per token of the decoder's Linear layers alone (lm_head left out: it runs on answer positions only),
    each shape timed on `rows` rows (best of `repeats`) and counted as often as the model holds it."""
    from collections import Counter

    shapes = Counter((m.in_features, m.out_features) for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    total = 0.0
    with torch.no_grad():
        for (i, o), count in shapes.items():
            x, w = torch.randn(rows, i), torch.randn(o, i)
            torch.nn.functional.linear(x, w)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best = min(best, time.perf_counter() - t0)
            total += count * best / rows
    return total


def run_set(model, batches, repeats, gradsentry_n):
    fns, n_gs = routes(model, batches, gradsentry_n)
    n = sum(b["input_ids"].shape[0] for b in batches)
    names = list(fns)
    times = {k: [] for k in names}
    tokens, scores = {}, {}
    warm, _ = routes(model, batches[:1], 1)
    for fn in warm.values():
        fn()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]   # no route always first or last
        for name in order:
            t0 = time.perf_counter()
            scores[name], tokens[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    per_sample = {k: statistics.median(v) / (n_gs if k == "gradsentry" else n) for k, v in times.items()}
    # same samples, same round: a time ratio is a throughput ratio
    paired = {f"{a}_over_{b}": statistics.median(times[a][i] / times[b][i] for i in range(repeats))
              for a, b in [("today", "shared_scan"), ("today", "shared_batch"), ("today", "cut_only"),
                           ("forward", "shared_scan")]}
    for b in ("shared_scan", "today"):   # per sample, same round
        paired[f"gradsentry_over_{b}"] = statistics.median(times["gradsentry"][i] / n_gs / (times[b][i] / n)
                                                           for i in range(repeats))
    parity = float((scores["today"] - scores["shared_scan"]).abs().nan_to_num(0).max())
    rows = [{"route": k, "samples": n_gs if k == "gradsentry" else n, "p50_s_per_sample": per_sample[k],
             "samples_per_s": 1 / per_sample[k], "tokens": tokens[k],
             "tokens_per_sample": tokens[k] / (n_gs if k == "gradsentry" else n),
             "runs_s": [round(t, 3) for t in times[k]]} for k in names]
    return rows, paired, parity


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--gradsentry", type=int, default=8, help="samples the GradSentry way scores per round")
    ap.add_argument("--note", default="", help="what the machine was doing (recorded in the JSON)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tensorguard_fast.io.bundled import load_bundled

    torch.manual_seed(0)
    model, tok = load_bundled("smollm2")
    model.eval()
    results = {}
    for name, dataset in load_sets(tok, args.samples).items():
        batches = batches_of(model, tok, dataset)
        load_before = os.getloadavg()[0]
        rows, ratios, parity = run_set(model, batches, args.repeats, args.gradsentry)
        per_token = linear_floor(model)
        shared = next(r for r in rows if r["route"] == "shared_scan")
        today = next(r for r in rows if r["route"] == "today")
        least = per_token * shared["tokens_per_sample"]   # s a sample: shared_scan's tokens through Linear layers
        floor = {"linear_s_per_token": per_token, "shared_scan_floor_s_per_sample": least,
                 "shared_scan_over_floor": shared["p50_s_per_sample"] / least,
                 "today_over_floor": today["p50_s_per_sample"] / least}
        results[name] = {"rows": rows, "ratios": ratios, "floor": floor, "max_score_diff_today_vs_shared": parity,
                         "real_tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
                         "load_avg_1min": [load_before, os.getloadavg()[0]]}
        print_table(f"SmolLM2-135M, fanoutqa, {name}, {args.samples} samples in batches of {BATCH}, "
                    f"{torch.get_num_threads()} threads", rows,
                    ["route", "samples", "p50_s_per_sample", "samples_per_s", "tokens", "tokens_per_sample"])
        for k, v in ratios.items():
            print(f"  {k}: {v:.2f}")
        print(f"  max |score today - score shared_scan|: {parity:.2e}")
        print(f"  floor: Linear layers {per_token * 1e3:.2f} ms a token; shared_scan's tokens need "
              f"{floor['shared_scan_floor_s_per_sample'] * 1e3:.1f} ms a sample there; shared_scan takes "
              f"{floor['shared_scan_over_floor']:.2f}x that, today {floor['today_over_floor']:.2f}x (the most sharing "
              f"these tokens could gain)")
    write_results("bench_entropy", [], {"sets": results, "threads": torch.get_num_threads(), "batch": BATCH,
                                        "samples": args.samples, "repeats": args.repeats, "note": args.note,
                                        "cpu": machine_info().get("cpu")})


if __name__ == "__main__":
    main()
