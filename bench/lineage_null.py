"""How close can two models that are NOT derived from one another come under the invariant profile?

The open-set radius of the invariant profile (profiles.py) is set against this null, not against the zoo's
derivatives. Three kinds of unrelated pairs, over many anchor draws:
- random: two random inits of a config, and each against the trained model of that config (nothing shared);
- same-strings: SmolLM2-135M against Gemma-3-270M, both anchored at the SAME token strings (tokens that are one
  token in both vocabularies). Trained independently on similar text, the two share the language: this is the pair
  a radius must not call related, and the one the zoo cannot show (its families have different tokenizers or are
  random);
- shared-embedding: SmolLM2 against a copy whose layers are a random init and whose (tied) embedding is SmolLM2's
  own: everything the vocabulary blocks can share, shared exactly, with independent layers.

Run: python bench/lineage_null.py [--draws 20]   (writes bench/results/lineage_null.json)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tensorguard_fast.evaluation import zoo  # noqa: E402
from tensorguard_fast.io.bundled import bundled_model_dir  # noqa: E402
from tensorguard_fast.lineage import profile_invariant, profiles  # noqa: E402
from tensorguard_fast.lineage.family import distance  # noqa: E402
from tensorguard_fast.lineage.fingerprint import fast_fingerprint  # noqa: E402

def shared_tokens(dir_a: Path, dir_b: Path) -> np.ndarray:
    """(n, 2) token ids of words (letters only, >= 2 of them) that decode to the same string as one token in both
    vocabularies, A's id below 32768 as the profile's own anchors are."""
    from transformers import AutoTokenizer

    ta, tb = AutoTokenizer.from_pretrained(dir_a), AutoTokenizer.from_pretrained(dir_b)
    pairs = []
    for i in range(256, min(32768, len(ta))):
        s = ta.decode([i])
        if len(s.strip()) < 2 or not s.strip().isalpha():
            continue
        j = tb.encode(s, add_special_tokens=False)
        if len(j) == 1 and tb.decode(j) == s:
            pairs.append((i, j[0]))
    return np.array(pairs)


@contextlib.contextmanager
def anchored_at(ids_by_salt: dict):
    """Make the invariant profile use these anchor ids ({salt: ids}) instead of its seeded draw."""
    original = profile_invariant.anchor_ids
    profile_invariant.anchor_ids = lambda vocab, seed, salt, count=profile_invariant.ANCHORS: \
        ids_by_salt[salt][:count]
    try:
        yield
    finally:
        profile_invariant.anchor_ids = original


def per_block(a, b) -> dict:
    va, vb = np.asarray(a.vector), np.asarray(b.vector)
    out = {}
    for blk in profile_invariant.BLOCKS:   # feature names are "<block>.<...>"
        m = np.array([n.split(".", 1)[0] == blk for n in a.names])
        out[blk] = float(np.sqrt(np.mean((va[m] - vb[m]) ** 2)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=1000, help="anchor seeds used: first-seed .. + draws - 1 "
                    "(apart from the 0-2 that lineage_eval reports)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lineage_null.json"))
    args = ap.parse_args(argv)
    from safetensors.torch import load_file

    sd, gd = bundled_model_dir("smollm2"), bundled_model_dir("gemma3-270m")
    smol, gemma = load_file(str(sd / "model.safetensors")), load_file(str(gd / "model.safetensors"))
    rand1, rand2, grand = zoo.random_init(sd, 1), zoo.random_init(sd, 2), zoo.random_init(gd, 1)
    glued = dict(rand1, **{"model.embed_tokens.weight": smol["model.embed_tokens.weight"]})
    pairs = shared_tokens(sd, gd)
    kinds = {"random": [], "same-strings": [], "shared-embedding": []}
    blocks_same = []

    def fp(state, cfg, seed):
        return fast_fingerprint(state, profile="invariant", seed=seed, config=cfg)

    for seed in range(args.first_seed, args.first_seed + args.draws):
        s, r1, r2, g, gr = fp(smol, sd, seed), fp(rand1, sd, seed), fp(rand2, sd, seed), fp(gemma, gd, seed), \
            fp(grand, gd, seed)
        kinds["random"] += [distance(s, r1), distance(r1, r2), distance(g, gr)]
        kinds["shared-embedding"].append(distance(s, fp(glued, sd, seed)))
        rng = np.random.default_rng(seed)
        draw = {1: rng.choice(len(pairs), profile_invariant.ANCHORS, replace=False),
                2: rng.choice(len(pairs), profile_invariant.KEYS, replace=False)}
        with anchored_at({k: pairs[v, 0] for k, v in draw.items()}):
            s_str = fp(smol, sd, seed)
        with anchored_at({k: pairs[v, 1] for k, v in draw.items()}):
            g_str = fp(gemma, gd, seed)
        kinds["same-strings"].append(distance(s_str, g_str))
        blocks_same.append(per_block(s_str, g_str))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in kinds.items()), flush=True)

    radius = profiles.get("invariant").same_family_threshold
    summary = {}
    for kind, values in kinds.items():
        v = np.asarray(values)
        summary[kind] = {"n": len(v), "min": float(v.min()), "mean": float(v.mean()), "max": float(v.max()),
                         "sd": float(v.std(ddof=1)),
                         "radius_below_min_in_sd": float((v.min() - radius) / v.std(ddof=1))}
    blocks = {b: float(np.mean([d[b] for d in blocks_same])) for b in profile_invariant.BLOCKS}
    from _common import machine_info  # bench/_common.py

    report = {"benchmark": "lineage_null", "machine": machine_info(), "radius": radius, "shared_tokens": len(pairs),
              "seeds": [args.first_seed, args.first_seed + args.draws - 1], "summary": summary,
              "same_strings_mean_distance_per_block": blocks, "distances": kinds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\ninvariant profile, unrelated pairs ({args.draws} anchor draws; open-set radius {radius}):")
    print("| pair | n | min | mean | max | sd | (min - radius) / sd |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in summary.items():
        print(f"| {kind} | {r['n']} | {r['min']:.3f} | {r['mean']:.3f} | {r['max']:.3f} | {r['sd']:.3f} | "
              f"{r['radius_below_min_in_sd']:.1f} |")
    print("same-strings, mean distance per block: " + ", ".join(f"{k} {v:.2f}" for k, v in blocks.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
