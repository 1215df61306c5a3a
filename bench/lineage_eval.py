"""Lineage evaluation on a model zoo: does each fingerprint profile keep derivatives with their family?

Families (identical shapes within a config): SmolLM2-135M-Instruct, two random inits of its config, Gemma-3-270M,
one random init of its config. Derivatives of each base: full fine-tune and LoRA fine-tune on fanoutqa text (the
LoRA one read back from its PEFT adapter directory, merged on load), int8 and 4-bit round trips, 20%/50% magnitude
pruning, 1e-3 relative noise, extended vocabulary (+1000 rows), and a 50/50 merge of the two fine-tuned siblings;
the five function-preserving obfuscations (zoo.OBFUSCATIONS, each checked on logits first), on a fine-tune; and the
long fine-tunes built with --train-long, each with its merge and obfuscations.

Fine-tuning budget on a shared 2-core CPU (one training step of SmolLM2 took ~30 s of wall time there): --ft-steps
(default 8; Gemma families --gemma-steps, default 4) steps of batch 2 x 48 tokens, AdamW lr 2e-4 (full, every
parameter) and 3e-3 (LoRA r=8 on q/k/v/o). Adam moves each weight by about lr per step, so 8 steps at 2e-4 move
weights about as far as 30 steps at 5e-5; still far fewer steps than the few hundred a GPU run would take. The mean
relative weight change is logged and reported so the size of the perturbation is visible.

Zoo and fingerprints are cached under ~/.cache/tensorguard-fast/zoo (delete it to rebuild).
Run: python bench/lineage_eval.py [--ft-steps 30] [--families smollm2,smollm2-rand1,...]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tensorguard_fast.evaluation import zoo  # noqa: E402
from tensorguard_fast.lineage.family import FamilyClassifier, distance, similarity  # noqa: E402
from tensorguard_fast.lineage.fingerprint import Fingerprint, fast_fingerprint  # noqa: E402
from tensorguard_fast.io.bundled import bundled_model_dir, cache_dir  # noqa: E402

FAMILIES = {"smollm2": ("smollm2", None), "smollm2-rand1": ("smollm2", 1), "smollm2-rand2": ("smollm2", 2),
            "gemma3": ("gemma3-270m", None), "gemma3-rand1": ("gemma3-270m", 1)}
CHEAP = ("int4", "prune50", "extvocab")  # (int8, 20% pruning and 1e-3 noise: cheap_variant still makes them)
# run name -> (profile, seed). The invariant profile's design (QUERIES/KEYS, centring, blocks) was settled on the
# tiny random models of the tests and quick SmolLM2 checks, all with anchor seed 0; the figures reported here use
# anchor seed 1, a draw of anchor tokens never looked at while developing it. Seed 2 was added when the open-set
# radius moved to the one measured against unrelated models (bench/lineage_null.py), after seed 1's figures had been
# seen: it is the check on anchors that played no part in any choice.
RUNS = {"tensorguard": ("tensorguard", 0), "full": ("full", 0), "invariant": ("invariant", 1),
        "invariant-s2": ("invariant", 2)}
PROFILES = tuple(RUNS)


def zoo_dir() -> Path:
    d = cache_dir() / "zoo"
    d.mkdir(parents=True, exist_ok=True)
    return d


def base_state(family: str):
    bundled, seed = FAMILIES[family]
    cfg = bundled_model_dir(bundled)
    if seed is None:
        from safetensors.torch import load_file

        return load_file(str(cfg / "model.safetensors")), cfg
    return zoo.random_init(cfg, seed), cfg


def cheap_variant(state, name: str):
    if name == "int8":
        return zoo.quantize_roundtrip(state, 8)
    if name == "int4":
        return zoo.quantize_roundtrip(state, 4)
    if name.startswith("prune"):
        return zoo.magnitude_prune(state, int(name[5:]) / 100)
    if name == "noise1e-3":
        return zoo.add_noise(state, 1e-3, seed=7)
    if name == "extvocab":
        return zoo.extend_vocab(state, 1000)
    raise ValueError(name)


def trained_variants(family: str, state, cfg: Path, steps: int, log):
    """Full fine-tune and LoRA adapter directories, cached (each one separately)."""
    batch, seq = 2, 48
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = zoo_dir() / family
    ft_dir, lora_dir = out / f"ft{steps}", out / f"lora{steps}"
    if (ft_dir / "model.safetensors").exists() and (lora_dir / "adapter_model.safetensors").exists():
        return ft_dir, lora_dir
    base_dir = out / "base"
    if not (base_dir / "model.safetensors").exists():
        zoo.save(state, cfg, base_dir)  # the LoRA adapter's base must be a path
    tok = AutoTokenizer.from_pretrained(cfg)
    texts = zoo.fanoutqa_texts()
    config = AutoConfig.from_pretrained(cfg)

    def fresh():
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state, strict=False)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        return model

    if not (ft_dir / "model.safetensors").exists():
        _full_finetune(fresh, tok, texts, steps, batch, seq, state, cfg, ft_dir, out, family, log)
    if (lora_dir / "adapter_model.safetensors").exists():
        return ft_dir, lora_dir
    t0 = time.time()
    model = zoo.finetune(fresh(), tok, texts, steps, lr=3e-3, lora_rank=8, seed=1, batch=batch, seq=seq)
    model.save_pretrained(str(lora_dir))
    cfg_path = lora_dir / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(adapter_cfg, indent=1))
    log(f"  {family}: LoRA fine-tune {steps} steps in {time.time() - t0:.0f}s")
    return ft_dir, lora_dir


def _full_finetune(fresh, tok, texts, steps, batch, seq, state, cfg, ft_dir, out, family, log):
    t0 = time.time()
    model = zoo.finetune(fresh(), tok, texts, steps, lr=2e-4, batch=batch, seq=seq)
    ft = zoo.state_of(model)
    change = np.mean([float((ft[k] - state[k]).norm() / state[k].norm().clamp_min(1e-12))
                      for k in state if state[k].dim() == 2])
    zoo.save(ft, cfg, ft_dir)
    log(f"  {family}: full fine-tune {steps} steps in {time.time() - t0:.0f}s, mean relative change {change:.2e}")
    (out / f"ft{steps}.change.json").write_text(json.dumps({"mean_relative_change": change}))


def long_finetune(family: str, state, cfg: Path, steps: int, lr: float, log=print) -> Path:
    """A longer full fine-tune (every parameter, AdamW, batch 2 x 48 tokens, a data order of its own), cached as a
    model directory with the measured mean relative weight change beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = zoo_dir() / family
    target = out / f"ftlong{steps}_lr{lr:g}"
    if (target / "model.safetensors").exists():
        return target
    config = AutoConfig.from_pretrained(cfg)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    texts = zoo.fanoutqa_texts()
    texts = texts[len(texts) // 2:] + texts[:len(texts) // 2]  # another order than the short fine-tune's
    t0 = time.time()
    model = zoo.finetune(model, AutoTokenizer.from_pretrained(cfg), texts, steps, lr=lr, batch=2, seq=48, seed=2)
    ft = zoo.state_of(model)
    change = zoo.relative_change(state, ft)
    zoo.save(ft, cfg, target)
    (target / "change.json").write_text(json.dumps({"mean_relative_change": change, "steps": steps, "lr": lr,
                                                    "seconds": time.time() - t0}))
    log(f"  {family}: long fine-tune {steps} steps lr {lr:g} in {time.time() - t0:.0f}s, "
        f"mean relative change {change:.2e}")
    return target


def _code_version() -> str:
    """Hash of the profile code, so cached fingerprints are recomputed when a profile changes (taken once per run)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        _CODE_VERSION = _hash_profiles()
    return _CODE_VERSION


_CODE_VERSION = None


def _hash_profiles() -> str:
    import hashlib

    root = Path(__file__).resolve().parents[1] / "tensorguard_fast" / "lineage"
    # (profile_tensorguard.py is not hashed: it is edited by others for speed, not for its features)
    text = b"".join((root / f).read_bytes() for f in ("profile_invariant.py", "profile_full.py"))
    return hashlib.sha1(text).hexdigest()[:10]


def fingerprint_cached(key: str, make, profile: str, seed: int = 0, config=None) -> Fingerprint:
    path = zoo_dir() / "fingerprints" / _code_version() / f"{key}.{profile}.s{seed}.json"
    if path.exists():
        return Fingerprint.from_json(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fp = fast_fingerprint(make(), profile=profile, name=key, seed=seed, config=config)
    fp.to_json(path)
    return fp


def _check_log() -> Path:
    return zoo_dir() / "fingerprints" / "function_checks.json"


def _read_checks() -> dict:
    return json.loads(_check_log().read_text()) if _check_log().exists() else {}


def long_dirs(family: str, steps: int, lr: float):
    """[(variant prefix, directory)] of the family's long fine-tunes on disk: the one at `lr` is "ft-long", any
    other step size "ft-long-lr<lr>" (a random init trained at 1e-3 is largely relearned; a smaller step moves it
    as far as a pretrained model moves at 1e-3)."""
    found = []
    for d in sorted((zoo_dir() / family).glob(f"ftlong{steps}_lr*")):
        if (d / "model.safetensors").exists():
            other = d.name.split("_lr", 1)[1]
            found.append(("ft-long" if other == f"{lr:g}" else f"ft-long-lr{other}", d))
    return sorted(found, key=lambda x: x[0] != "ft-long")


def _load_dir(d):
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "model.safetensors"))


def build(families, steps: int, log=print, trained=True, gemma_steps: int = 4, long_steps: int = 150,
          long_lr: float = 1e-3, variants=None):
    """{profile: {(family, variant): Fingerprint}}, profiles as in RUNS. trained: True (every family), False, or the
    set of families that get fine-tuned variants. Long fine-tunes are used where they exist on disk (build them
    with --train-long FAMILY...). Every obfuscated variant is checked to compute the base's logits (float64, random
    tokens) before it is fingerprinted (zoo.obfuscate asserts it); the largest difference is logged and returned."""
    from transformers import AutoConfig

    fps = {run: {} for run in RUNS}
    checks = {}
    for family in families:
        log(f"family {family}")
        state, cfg = base_state(family)
        config = AutoConfig.from_pretrained(cfg)
        # built on first use: a rerun with every fingerprint cached needs none
        checker = functools.cache(lambda config=config: zoo.FunctionChecker(config))
        items = [("base", lambda s=state: s)]
        items += [(v, lambda v=v, s=state: cheap_variant(s, v)) for v in CHEAP]
        # untrained families: every obfuscation of the base; trained ones: every obfuscation of a fine-tune (the
        # long one where it exists) and all of them at once on the base
        obf_sources = [("", state, None)]
        if trained is True or (trained and family in trained):
            ft_dir, lora_dir = trained_variants(family, state, cfg, gemma_steps if family.startswith("gemma") else steps,
                                                log)
            items += [("finetune", lambda d=ft_dir: d), ("lora", lambda d=lora_dir: d)]

            def merged(ft_dir=ft_dir, lora_dir=lora_dir):
                from tensorguard_fast.lineage.loading import open_model

                a = open_model(ft_dir)
                b = open_model(lora_dir)
                return zoo.merge({k: a.get(k).float() for k in a.keys()}, {k: b.get(k).float() for k in b.keys()})
            items.append(("merge-ft+lora", merged))
            longs = long_dirs(family, long_steps, long_lr)
            for name, ld in longs:
                items.append((name, lambda d=ld: d))
                items.append((name.replace("ft-long", "merge-long") + "+ft",
                              lambda a=ld, b=ft_dir: zoo.merge(_load_dir(a), _load_dir(b))))
                obf_sources.append((f"{name}+", _load_dir(ld), None))
            if not longs:
                obf_sources.append(("ft+", _load_dir(ft_dir), None))
            obf_sources[0] = ("", state, ["obf-all"])
        for prefix, src, only in obf_sources:
            reference = functools.cache(lambda src=src, checker=checker: checker().logits(src))
            for i, name in enumerate(list(zoo.OBFUSCATIONS) + ["obf-all"]):
                variant = f"{prefix}{name}"
                if (variants and variant not in variants) or (only and name not in only):
                    continue

                def make(src=src, name=name, i=i, variant=variant, reference=reference):
                    out, diff = zoo.obfuscate(src, config, name, seed=11 + i, checker=checker(), reference=reference())
                    checks[f"{family}/{variant}"] = diff
                    _check_log().write_text(json.dumps({**_read_checks(), f"{family}/{variant}": diff}))
                    log(f"  {family}/{variant}: function-preserving, max |logit difference| {diff:.2e}")
                    return out
                items.append((variant, make))
        for variant, make in items:
            once = functools.cache(make)
            for run, (profile, seed) in RUNS.items():
                fps[run][(family, variant)] = fingerprint_cached(f"{family}.{variant}", once, profile, seed, config)
        del state, checker
    recorded = _read_checks()
    checks.update({k: v for k, v in recorded.items() if k not in checks and k.split("/")[0] in families})
    return fps, checks


def evaluate(fps_by_key, families):
    """Accuracy (closed and open set) of kmeans and nearest with margins; leave-one-family-out unknown detection.

    margin: distance to the second-nearest base minus distance to the nearest (> 0: assigned to the nearest base).
    slack: the open-set radius minus the distance to the own base (> 0: called a member, not unknown).
    """
    bases = {f: fps_by_key[(f, "base")] for f in families}
    derived = [(k, fp) for k, fp in fps_by_key.items() if k[1] != "base"]
    truth = [k[0] for k, _ in derived]
    rows = {}
    for method in ("kmeans", "nearest"):
        clf = FamilyClassifier(bases, method=method, open_set=True)
        preds = clf.fit_predict([fp for _, fp in derived])
        closed = np.mean([p.nearest == t for p, t in zip(preds, truth)])
        opened = np.mean([p.family == t for p, t in zip(preds, truth)])
        signed = [p.margin if p.nearest == t else -p.margin for p, t in zip(preds, truth)]
        slack = [clf.threshold_used - p.distance for p in preds]
        worst = int(np.argmin(signed))
        worst_slack = int(np.argmin(slack))
        # leave one family out: the held-out base and its derivatives should be called unknown
        unknown_hits, total, held_slack = 0, 0, []
        for held in families:
            sub = {f: b for f, b in bases.items() if f != held}
            if not sub:
                continue
            held_fps = [fp for (f, _), fp in derived if f == held] + [bases[held]]
            others = [fp for (f, _), fp in derived if f != held]
            clf2 = FamilyClassifier(sub, method=method, open_set=True)
            p2 = clf2.fit_predict(others + held_fps)
            unknown_hits += sum(not p.known for p in p2[len(others):])
            total += len(held_fps)
            held_slack += [p.distance - clf2.threshold_used for p in p2[len(others):]]
        rows[method] = {"closed_set_accuracy": float(closed), "open_set_accuracy": float(opened),
                        "threshold": clf.threshold_used, "unknown_detection": unknown_hits / max(total, 1),
                        "n_derivatives": len(derived),
                        "min_margin": float(min(signed)), "min_margin_model": "/".join(derived[worst][0]),
                        "min_open_set_slack": float(min(slack)),
                        "min_open_set_slack_model": "/".join(derived[worst_slack][0]),
                        "min_unknown_slack": float(min(held_slack)) if held_slack else None,
                        "per_model": {"/".join(k): {"family": p.family, "distance": p.distance, "margin": m,
                                                    "slack": sl}
                                      for (k, _), p, m, sl in zip(derived, preds, signed, slack)},
                        "errors": [f"{k[0]}/{k[1]} -> {p.family} (nearest {p.nearest}, d={p.distance:.3g})"
                                   for (k, _), p in zip(derived, preds) if p.family != k[0]]}
    return rows


def distance_table(fps_by_key, families):
    rows = []
    for (family, variant), fp in fps_by_key.items():
        own = distance(fp, fps_by_key[(family, "base")])
        other = min((distance(fp, fps_by_key[(f, "base")]), f) for f in families if f != family) \
            if len(families) > 1 else (float("nan"), "")
        row = {"family": family, "variant": variant, "d_own_base": own, "d_nearest_other": other[0],
               "nearest_other": other[1], "sim_own_base": similarity(fp, fps_by_key[(family, "base")])}
        parents = ("finetune", "lora") if variant == "merge-ft+lora" else \
            (variant.replace("merge-long", "ft-long")[:-3], "finetune") if variant.startswith("merge-long") else ()
        for parent in parents:
            row[f"d_parent_{parent}"] = distance(fp, fps_by_key[(family, parent)])
        if parents:
            row["d_parents_to_each_other"] = distance(fps_by_key[(family, parents[0])], fps_by_key[(family, parents[1])])
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--ft-steps", type=int, default=8)
    ap.add_argument("--gemma-steps", type=int, default=4)
    ap.add_argument("--long-steps", type=int, default=150)
    ap.add_argument("--long-lr", type=float, default=1e-3)
    ap.add_argument("--train-long", default=None, metavar="FAMILY[:LR],...",
                    help="build these long fine-tunes (cached) before evaluating; LR defaults to --long-lr")
    ap.add_argument("--no-train", action="store_true", help="skip the fine-tuned variants")
    ap.add_argument("--train-families", default=None,
                    help="comma list: only these families get fine-tuned variants (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lineage_eval.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    families = args.families.split(",")
    for item in (args.train_long.split(",") if args.train_long else []):
        family, _, lr = item.partition(":")
        state, cfg = base_state(family)
        long_finetune(family, state, cfg, args.long_steps, float(lr) if lr else args.long_lr)
    trained = set(args.train_families.split(",")) if args.train_families else True
    fps, checks = build(families, args.ft_steps, trained=False if args.no_train else trained,
                        gemma_steps=args.gemma_steps, long_steps=args.long_steps, long_lr=args.long_lr)
    changes = {}
    for family in families:
        for f in sorted((zoo_dir() / family).glob("ft*.change.json")) + \
                sorted((zoo_dir() / family).glob(f"ftlong{args.long_steps}_lr*/change.json")):
            changes[f"{family}/{f.parent.name if f.name == 'change.json' else f.stem.split('.')[0]}"] = \
                json.loads(f.read_text())
    report = {"families": families, "ft_steps": args.ft_steps, "gemma_steps": args.gemma_steps,
              "long_steps": args.long_steps, "long_lr": args.long_lr,
              "trained_families": sorted(trained) if trained is not True else families,
              "weight_change": changes, "function_checks_max_logit_difference": checks,
              "runs": {k: {"profile": v[0], "seed": v[1]} for k, v in RUNS.items()}, "profiles": {}}
    for run in RUNS:
        report["profiles"][run] = {"classification": evaluate(fps[run], families),
                                   "distances": distance_table(fps[run], families),
                                   "seconds_per_model": float(np.median([fp.metadata.get("seconds", 0)
                                                                         for fp in fps[run].values()]))}
    from _common import machine_info  # bench/_common.py

    report["machine"] = machine_info()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("\n| run (profile, seed) | method | closed-set acc | open-set acc | held-out family unknown | min margin "
          "| min open-set slack | min unknown slack |")
    print("|---|---|---|---|---|---|---|---|")
    for run in RUNS:
        for method, r in report["profiles"][run]["classification"].items():
            print(f"| {run} {RUNS[run]} | {method} | {r['closed_set_accuracy']:.3f} | {r['open_set_accuracy']:.3f} | "
                  f"{r['unknown_detection']:.3f} | {r['min_margin']:.3g} ({r['min_margin_model']}) | "
                  f"{r['min_open_set_slack']:.3g} ({r['min_open_set_slack_model']}) | "
                  f"{'n/a' if r['min_unknown_slack'] is None else format(r['min_unknown_slack'], '.3g')} |")
    for run in RUNS:
        print(f"\n{run}: distance to own base vs nearest other base")
        for r in report["profiles"][run]["distances"]:
            extra = "".join(f"  {k[2:]} {v:.3g}" for k, v in r.items() if k.startswith("d_parent"))
            print(f"  {r['family']:>14} {r['variant']:<22} own {r['d_own_base']:.3g}  other {r['d_nearest_other']:.3g}"
                  f" ({r['nearest_other']}){extra}")
        for method, r in report["profiles"][run]["classification"].items():
            for e in r["errors"]:
                print(f"  [{method}] {e}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
