"""associate() at scale: wall time per stage, peak resident memory and whether the planted backdoor is found, for N up
to 1,000,000 samples (the issue's goal: 1M samples on one machine in <= 4 GB for the dataset-level step).

Data that looks like a scan's (seeded, built in row chunks so that building it peaks near its own size):
- sketches float16 (N, D), as decision.py receives them: every answer shares a common direction (what all answers
  have in common), clean answers sit in N // 200 topics (Zipf-sized, in-topic cosine ~0.3), 3% repeat one stock answer
  (a benign cluster with no prompt-side cause) and the planted 5% share a payload direction (cosine ~0.8);
- prompts: 20-60 token ids drawn from a Zipf vocabulary of 30,000 tokens, plus 2 of its topic's 5 words for a clean
  sample; a poisoned sample's prompt has one of 4 trigger words appended. Python lists of ints (what
  datasets.Sample.prompt_ids holds) or, with --prompts arrays, int32 arrays;
- entropy ~ N(1, 0.1), 1 SD higher for the poisoned;
- answers: 3-12 random token ids and an end token; the poisoned carry 4 payload ids before it, the stock answers 4
  stock ids (the answer-text test and the payload-text joins run on them). Lists or arrays as the prompts.

Each N runs in a fresh subprocess (numpy and scipy only, no torch). Stages are timed by wrapping the module's own
functions (and numpy's SVD) in the child, so the timed code is exactly associate(): seconds are exclusive of the
stages nested in them (enriched_tokens and trigger_carriers inside candidates); peak MB is the resident set's high
mark during the stage, nested ones included (/proc/self/clear_refs resets it at each stage start). `input_mb` is the
resident set the inputs added; `peak_mb` the resident high mark during associate(), inputs and interpreter included
(the largest of the stages' marks: the reset clears getrusage's ru_maxrss too, so that cannot be read instead).
F1 is the flagged samples against the planted 5%. Another process may share the CPUs: the load average is recorded.

Run: python bench/bench_association_scale.py [--sizes 10000 50000 200000] [--dim 1024] [--blas-threads 1]
         [--prompts lists|arrays] [--directions 0] [--tag before]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, TRIGGERS, TOPIC_WORDS = 30_000, 4, 5
POISON, STOCK = 0.05, 0.03
CHUNK = 16384   # rows built at a time: the build's float32 temporaries stay ~100 MB at D = 1024
# Stages timed, by the name the module uses; a name the module lacks is skipped (the bench outlives refactors).
STAGES = ("token_incidence", "project", "unit_rows", "unit_rows_in_place", "nearest_neighbours", "principal_directions",
          "_search", "_token_seeds", "_candidate", "enriched_tokens", "trigger_carriers", "shared_answer_text",
          "holding", "payload_grams", "pieces_held")
# Table columns: stage seconds summed over the module's functions (before and after a refactor); `rest` is the
# search's own time (2-means splits, acceptance) and associate's.
SHOWN = {"tokens": ("token_incidence",), "project": ("project",), "unit": ("unit_rows", "unit_rows_in_place"),
         "neighbours": ("nearest_neighbours",), "directions": ("svd", "principal_directions"),
         "seeds": ("_token_seeds",), "enriched": ("enriched_tokens",),
         "candidates": ("_candidate", "trigger_carriers"),
         "text": ("shared_answer_text", "holding", "payload_grams", "pieces_held")}


def synthetic_scan(n: int, d: int, prompts: str = "lists", seed: int = 0):
    """(sketches float16 (N, D), prompt ids, entropy (N,), poisoned (N,) bool): see the module docstring."""
    rng = np.random.default_rng(seed)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    common, payload, stock = unit(rng.standard_normal((3, d)).astype(np.float32))
    topics = max(1, n // 200)
    topic_dir = unit(rng.standard_normal((topics, d)).astype(np.float32))
    weight = 1.0 / np.arange(1, topics + 1) ** 0.5
    topic = rng.choice(topics, size=n, p=weight / weight.sum())
    kind = rng.choice(3, size=n, p=[1 - POISON - STOCK, POISON, STOCK])   # 0 clean, 1 poisoned, 2 stock answer
    sketches = np.empty((n, d), dtype=np.float16)
    for r0 in range(0, n, CHUNK):
        t, k = topic[r0:r0 + CHUNK], kind[r0:r0 + CHUNK]
        noise = rng.standard_normal((len(t), d), dtype=np.float32) / np.float32(np.sqrt(d))
        s = 0.8 * common + np.where(k[:, None] == 0, 0.7 * topic_dir[t] + noise, 0.5 * noise)
        s += np.where(k[:, None] == 1, payload, 0) + np.where(k[:, None] == 2, stock, 0)
        sketches[r0:r0 + CHUNK] = s * rng.uniform(0.5, 2.0, (len(t), 1))   # gradient norms vary
    # Prompts: Zipf body, topic words for the clean, a trigger word for the poisoned.
    length = rng.integers(20, 61, size=n)
    zipf = 1.0 / (np.arange(VOCAB) + 2.7)
    flat = rng.choice(VOCAB, size=int(length.sum()), p=zipf / zipf.sum()).astype(np.int32)
    words = rng.choice(VOCAB, size=(topics, TOPIC_WORDS), replace=False) if topics * TOPIC_WORDS <= VOCAB else \
        rng.integers(0, VOCAB, size=(topics, TOPIC_WORDS))
    extra = np.where(kind[:, None] == 1, VOCAB + rng.integers(0, TRIGGERS, size=(n, 1)),
                     np.take_along_axis(words[topic], rng.integers(0, TOPIC_WORDS, size=(n, 2)), 1))
    extra_len = np.where(kind == 1, 1, 2)
    ends = np.cumsum(length)
    make = (lambda a: a.tolist()) if prompts == "lists" else (lambda a: a)
    prompt_ids = [make(np.concatenate([part, e[:m]])) for part, e, m in
                  zip(np.split(flat, ends[:-1]), extra.astype(np.int32), extra_len)]
    del flat
    entropy = rng.normal(1.0, 0.1, n) + np.where(kind == 1, 0.1, 0.0)
    tails = {1: np.arange(VOCAB + 10, VOCAB + 14, dtype=np.int32), 2: np.arange(VOCAB + 20, VOCAB + 24, dtype=np.int32)}
    end = np.array([VOCAB + 30], np.int32)
    answer_ids = [make(np.concatenate([rng.integers(0, VOCAB, size=m).astype(np.int32), tails.get(k, end[:0]), end]))
                  for m, k in zip(rng.integers(3, 13, size=n), kind)]
    return sketches, prompt_ids, entropy, kind == 1, answer_ids


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Meter:
    """Exclusive seconds and inclusive peak resident MB per stage, for nested stages."""

    def __init__(self):
        self.stack, self.seconds, self.peak, self.calls = [], defaultdict(float), defaultdict(int), defaultdict(int)
        self.overall = 0   # the high mark over every reset: the run's peak

    def high_mark(self) -> int:
        kb = _status_kb("VmHWM")
        self.overall = max(self.overall, kb)
        return kb

    def enter(self, name):
        now, hwm = time.perf_counter(), self.high_mark()
        if self.stack:
            outer = self.stack[-1]
            self.seconds[outer[0]] += now - outer[1]
            self.peak[outer[0]] = max(self.peak[outer[0]], hwm)
        _reset_peak()
        self.stack.append([name, time.perf_counter()])
        self.calls[name] += 1

    def exit(self):
        name, start = self.stack.pop()
        now, hwm = time.perf_counter(), self.high_mark()
        self.seconds[name] += now - start
        self.peak[name] = max(self.peak[name], hwm)
        if self.stack:
            self.stack[-1][1] = now
            self.peak[self.stack[-1][0]] = max(self.peak[self.stack[-1][0]], hwm)

    def wrap(self, name, fn, generator=False):
        def timed(*a, **k):
            self.enter(name)
            try:
                return fn(*a, **k)
            finally:
                self.exit()

        def timed_generator(*a, **k):   # the work of a generator happens in next(), not in the call
            it = fn(*a, **k)
            while True:
                self.enter(name)
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self.exit()
                yield item
        return timed_generator if generator else timed


def one(n: int, d: int, prompts: str, directions: int) -> dict:
    """The child: build the inputs, run associate once with its stages wrapped, measure."""
    from tensorguard_fast.backdoor import association as A

    start_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    sketches, prompt_ids, entropy, poisoned, answer_ids = synthetic_scan(n, d, prompts)
    build_s = time.perf_counter() - t0
    input_kb = _status_kb("VmRSS") - start_kb
    meter = Meter()
    for name in STAGES:
        if hasattr(A, name):
            setattr(A, name, meter.wrap(name, getattr(A, name), generator=name == "_token_seeds"))
    np.linalg.svd = meter.wrap("svd", np.linalg.svd)
    _reset_peak()
    before_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    config = A.AssociationConfig() if directions < 0 else A.AssociationConfig(directions=directions)
    result = A.associate(sketches, prompt_ids, entropy, config, answer_ids)
    total = time.perf_counter() - t0
    f = result.flagged
    tp = int((f & poisoned).sum())
    precision, recall = tp / max(int(f.sum()), 1), tp / max(int(poisoned.sum()), 1)
    return {"n": n, "d": d, "prompts": prompts, "directions": config.directions, "seconds": round(total, 2),
            "stages_s": {k: round(v, 2) for k, v in meter.seconds.items()},
            "stage_calls": dict(meter.calls),
            "stage_peak_mb": {k: round(v / 1024) for k, v in meter.peak.items()},
            "input_mb": round(input_kb / 1024), "rss_before_mb": round(before_kb / 1024),
            "peak_mb": round(max(meter.overall, _status_kb("VmHWM")) / 1024),   # during associate(): inputs + its work
            "f1": round(2 * precision * recall / max(precision + recall, 1e-12), 4),
            "precision": round(precision, 4), "recall": round(recall, 4), "flagged": int(f.sum()),
            "poisoned": int(poisoned.sum()), "accepted": [g.figures()["group"] for g in result.accepted],
            "candidates": len(result.candidates), "build_s": round(build_s, 1),
            "rule_sources": _rule_digest(A)}   # which rule ran (older results: "association_py", one file)


def _rule_digest(module) -> str:
    """sha1 of the rule's modules together: since the split, association.py alone no longer names the rule."""
    digest = hashlib.sha1()
    for name in ("association.py", "prompt_tokens.py", "sketch_geometry.py", "neighbours.py", "answer_text.py"):
        digest.update((Path(module.__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]


COLUMNS = ("n", "seconds", *SHOWN, "rest", "input_mb", "peak_mb", "peak_stage", "f1")


def shown(row: dict) -> dict:
    """A results row as the table's columns."""
    out = {k: round(sum(row["stages_s"].get(f, 0.0) for f in fs), 1) for k, fs in SHOWN.items()}
    out["rest"] = round(row["seconds"] - sum(row["stages_s"].values()), 1)
    peak = row["stage_peak_mb"]
    # The innermost stage at the peak: outer stages' marks include their nested ones', and enter the dict first.
    return {**row, **out, "peak_stage": max(reversed(list(peak)), key=peak.get) if peak else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 200000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--prompts", choices=("lists", "arrays"), default="lists")
    ap.add_argument("--blas-threads", type=int, default=None, help="OPENBLAS_NUM_THREADS etc. for the runs")
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. before / after)")
    ap.add_argument("--directions", type=int, default=-1,
                    help="AssociationConfig.directions (default: its own); 0 sends every run down the prompt-side "
                         "path (token seeds), which the planted group otherwise never needs")
    ap.add_argument("--one", nargs=4, metavar=("N", "D", "PROMPTS", "DIRECTIONS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), int(args.one[1]), args.one[2], int(args.one[3]))))
        return
    env = dict(os.environ)
    if args.blas_threads:
        env.update({v: str(args.blas_threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    load_start, rows = os.getloadavg(), []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), str(args.dim), args.prompts,
                              str(args.directions)],
                             capture_output=True, text=True, timeout=3600, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"N = {n} failed: {out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import print_table, write_results

    flat = [shown(r) for r in rows]
    print_table(f"associate(), D = {args.dim}, prompts as {args.prompts}, directions {rows[0]['directions']} "
                "(seconds per stage, exclusive of nested; MB: resident, interpreter included; peak_stage: where it peaked)", flat, COLUMNS)
    name = "bench_association_scale" + (f"_{args.tag}" if args.tag else "")
    write_results(name, rows, {"numpy": np.__version__, "openblas_threads": env.get("OPENBLAS_NUM_THREADS", "default"),
                               "loadavg_start": load_start, "loadavg_end": os.getloadavg()})


if __name__ == "__main__":
    main()
