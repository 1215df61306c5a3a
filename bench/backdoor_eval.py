"""Detection quality of the backdoor filter: precision, recall, F1 and FPR of every score under every threshold rule,
on fanoutqa QA pairs poisoned by four attacks at 1/5/10/50/90%, with a long-answer clean control in every set.

    PYTHONPATH=. python bench/backdoor_eval.py                 # full: SmolLM2, 4 attacks x 5 ratios, + Gemma
                                                               # (17 min of CPU on 2 cores; 46 min wall when shared)
    PYTHONPATH=. python bench/backdoor_eval.py --quick         # a few dozen samples (what the tests run)

Each set: N samples, round(ratio N) poisoned, 15% of the rest clean answers lengthened by a benign sentence of the
payload's length (kind long_clean; FPR_long is the share of them flagged), for CBA also trigger-bearing clean
negatives. The prompt is the raw question, no chat template (GradSentry's own format; also 3-4x fewer tokens here);
--chat-template renders it as `scan` does by default (--attacks badnets --ratios 0.1,0.5 for a ~10 min check).
A sample's spectrum does not depend on the set it is in, so each distinct sample is scored once and reused.
Output: bench/results/backdoor_eval.json and the tables printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tensorguard_fast.evaluation.attacks import ATTACKS, fanoutqa_pairs, poisoned_set, write_jsonl  # noqa: E402
from tensorguard_fast.backdoor.datasets import load_samples  # noqa: E402
from tensorguard_fast.backdoor.scan import plan_batches, score_batch  # noqa: E402
from tensorguard_fast.backdoor.scores import compute_scores  # noqa: E402
from tensorguard_fast.backdoor.threshold import choose_threshold  # noqa: E402

SCORES = ("gradsentry", "fft", "energy")
RULES = ("kde", "otsu", "gmm", "mad", "topk")
RATIOS = (0.01, 0.05, 0.10, 0.50, 0.90)


class SpectrumCache:
    """Raw scan rows of distinct samples (same token ids = same spectrum), computed in batches on demand."""

    def __init__(self, model, tokenizer, batch_size=16, max_len=256, path=None, chat_template=False):
        self.model, self.tokenizer, self.batch_size, self.max_len = model, tokenizer, batch_size, max_len
        self.chat_template = chat_template
        self.rows: Dict[tuple, dict] = {}
        self.seconds = 0.0
        self.scored = 0
        self.path = path   # optional JSON file: lets a rerun re-score and re-threshold without any forward pass
        if path and os.path.exists(path):
            with open(path) as fh:
                self.rows = {tuple(map(tuple, json.loads(k))): v for k, v in json.load(fh).items()}

    def save(self):
        if self.path:
            with open(self.path, "w") as fh:
                json.dump({json.dumps(k): v for k, v in self.rows.items()}, fh)

    def rows_for(self, records: List[dict]) -> List[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            ds = load_samples(write_jsonl(records, os.path.join(tmp, "set.jsonl")), self.tokenizer,
                              max_len=self.max_len, use_chat_template=self.chat_template)
        keys = [(tuple(s.prompt_ids), tuple(s.answer_ids)) for s in ds.samples]
        todo, seen = [], set()
        for s, k in zip(ds.samples, keys):
            if k not in self.rows and k not in seen and not s.problem:
                todo.append(s.index)
                seen.add(k)
        start = time.perf_counter()
        for batch in plan_batches(ds, todo, self.batch_size):
            for row in score_batch(self.model, self.tokenizer, ds, batch, spectrum="fft"):
                self.rows[keys[row["index"]]] = row
        self.seconds += time.perf_counter() - start
        self.scored += len(todo)
        if todo:
            self.save()
        return [self.rows.get(k) for k in keys]


def metrics(flags: np.ndarray, poison: np.ndarray, kinds: np.ndarray) -> dict:
    tp = int((flags & poison).sum())
    fp = int((flags & ~poison).sum())
    fn = int((~flags & poison).sum())
    tn = int((~flags & ~poison).sum())
    long_ = kinds == "long_clean"
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"P": p, "R": r, "F1": 2 * p * r / (p + r) if p + r else 0.0, "FPR": fp / (fp + tn) if fp + tn else 0.0,
            "FPR_long": float(flags[long_].mean()) if long_.any() else None, "TP": tp, "FP": fp}


def best_f1(values: np.ndarray, poison: np.ndarray) -> float:
    """The F1 of the best possible threshold: the ceiling any rule could reach with this score."""
    best = 0.0
    for tau in np.unique(values):
        flags = values >= tau
        tp = (flags & poison).sum()
        if tp:
            p, r = tp / flags.sum(), tp / poison.sum()
            best = max(best, 2 * p * r / (p + r))
    return float(best)


def evaluate_set(cache: SpectrumCache, records: List[dict], setting: dict) -> List[dict]:
    rows = cache.rows_for(records)
    poison = np.array([r["poison"] == 1 for r in records])
    kinds = np.array([r["kind"] for r in records])
    out = []
    for score in SCORES:
        values = compute_scores(rows, score, spectrum="fft")
        ok = np.isfinite(values)
        for rule in RULES:
            th = choose_threshold(values[ok], rule, ratio=setting["ratio"])
            m = metrics(th.flags(values), poison, kinds)
            out.append({**setting, "score": score, "rule": rule, "threshold": th.value,
                        "fallback": th.reason.startswith("fallback"), **m})
        out.append({**setting, "score": score, "rule": "best", "F1": best_f1(values[ok], poison[ok])})
    return out


def run(model, tokenizer, attacks=ATTACKS, ratios=RATIOS, n=200, model_name="smollm2", seed=0, batch_size=16,
        cache_path=None, chat_template=False) -> List[dict]:
    cache = SpectrumCache(model, tokenizer, batch_size, path=cache_path, chat_template=chat_template)
    pairs = fanoutqa_pairs(max_answer_chars=200)
    results = []
    for attack in attacks:
        for ratio in ratios:
            records = poisoned_set(attack, n, ratio, long_clean=0.15, seed=seed, pairs=pairs)
            results += evaluate_set(cache, records, {"model": model_name, "attack": attack, "ratio": ratio, "n": n})
            print(f"{model_name} {attack} {ratio}: {cache.scored} distinct samples scored in {cache.seconds:.0f} s",
                  flush=True)
    return results


def summary_table(results: List[dict]) -> List[dict]:
    """One row per (model, attack, ratio): F1 of each score under kde and topk, the best-threshold F1, FPR_long."""
    table = {}
    for r in results:
        key = (r["model"], r["attack"], r["ratio"])
        row = table.setdefault(key, {"model": r["model"], "attack": r["attack"], "ratio": r["ratio"]})
        if r["rule"] in ("kde", "otsu", "gmm", "topk"):
            row[f"{r['score']}:{r['rule']}"] = round(r["F1"], 3)
        elif r["rule"] == "best":
            row[f"{r['score']}:best"] = round(r["F1"], 3)
        if r["rule"] == "topk":
            row[f"{r['score']}:FPRlong@topk"] = None if r["FPR_long"] is None else round(r["FPR_long"], 3)
    return list(table.values())


def averages(results: List[dict]) -> List[dict]:
    """Mean F1 / FPR / FPR_long per (model, score, rule) over all attacks and ratios."""
    groups = {}
    for r in results:
        groups.setdefault((r["model"], r["score"], r["rule"]), []).append(r)
    rows = []
    for (model, score, rule), rs in sorted(groups.items()):
        row = {"model": model, "score": score, "rule": rule, "F1": float(np.mean([r["F1"] for r in rs]))}
        if rule != "best":
            row["P"] = float(np.mean([r["P"] for r in rs]))
            row["R"] = float(np.mean([r["R"] for r in rs]))
            row["FPR"] = float(np.mean([r["FPR"] for r in rs]))
            longs = [r["FPR_long"] for r in rs if r["FPR_long"] is not None]
            row["FPR_long"] = float(np.mean(longs)) if longs else None
            row["fallbacks"] = int(sum(r["fallback"] for r in rs))
        rows.append(row)
    return rows


def main(argv=None):
    import torch

    from _common import print_table, write_results
    from tensorguard_fast.io.bundled import load_bundled

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 samples, 2 attacks, 2 ratios, no Gemma")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--gemma-n", type=int, default=100)
    ap.add_argument("--no-gemma", action="store_true")
    ap.add_argument("--chat-template", action="store_true", help="render prompts with the tokenizer's chat template "
                    "(what `scan` does by default; about 3x the tokens here)")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--cache", default=None, help="directory for raw spectra (reruns then re-score without models)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_bundled("smollm2")
    start = time.perf_counter()
    if args.quick:
        results = run(model, tok, attacks=("badnets", "cba"), ratios=(0.1, 0.5), n=40)
    else:
        cache = (lambda name: os.path.join(args.cache, f"{name}.json") if args.cache else None)
        if args.cache:
            os.makedirs(args.cache, exist_ok=True)
        tag = "smollm2-chat" if args.chat_template else "smollm2"
        results = run(model, tok, attacks=args.attacks.split(","), ratios=[float(r) for r in args.ratios.split(",")],
                      n=args.n, cache_path=cache(tag), chat_template=args.chat_template, model_name=tag)
        if not args.no_gemma:
            del model
            gmodel, gtok = load_bundled("gemma3-270m")
            results += run(gmodel, gtok, attacks=("badnets",), ratios=(0.1,), n=args.gemma_n,
                           model_name="gemma3-270m", batch_size=8, cache_path=cache("gemma3-270m"))
    seconds = time.perf_counter() - start
    table = summary_table(results)
    cols = ["model", "attack", "ratio"] + [f"{s}:{r}" for s in SCORES for r in ("kde", "topk", "best")] + \
        [f"{s}:FPRlong@topk" for s in SCORES]
    print_table("F1 by attack and ratio (kde = GradSentry's rule, topk = known ratio, best = best threshold)",
                table, cols)
    avg = averages(results)
    print_table("Means over all attacks and ratios", avg,
                ["model", "score", "rule", "F1", "P", "R", "FPR", "FPR_long", "fallbacks"])
    name = "backdoor_eval" + ("_quick" if args.quick else "") + ("_chat" if args.chat_template else "")
    write_results(name, results, {"summary": table, "averages": avg, "seconds": seconds})


if __name__ == "__main__":
    main()
