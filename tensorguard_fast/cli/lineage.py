"""Model lineage commands: fingerprint, compare, classify, store, plot.

Every MODEL argument may be a model (safetensors file, model directory, sharded directory, GGUF, LoRA adapter
directory, hub id, bundled:NAME) or a fingerprint JSON written by `fingerprint` (TensorGuard's released
feature files too).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

from ..lineage import profiles


def _progress(items, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, disable=len(items) < 2 or not sys.stderr.isatty(), file=sys.stderr)
    except ImportError:
        return items


def load_any(spec: str, profile: Optional[str], args):
    """A Fingerprint from a fingerprint JSON file, else by fingerprinting the model at `spec`."""
    from ..lineage.fingerprint import Fingerprint, fast_fingerprint

    path = Path(spec)
    if path.is_file() and path.suffix == ".json" and not path.name.endswith("index.json") \
            and path.name not in ("config.json", "adapter_config.json"):
        try:
            fp = Fingerprint.from_json(path)
        except (KeyError, TypeError, AttributeError, RecursionError, UnicodeDecodeError) as exc:
            raise ValueError(f"{spec}: not a fingerprint JSON ({type(exc).__name__}: {exc})") from exc
        if profile and fp.profile != profile:
            raise ValueError(f"{spec}: fingerprint has profile {fp.profile!r}, but --profile {profile} was asked")
        return fp
    return fast_fingerprint(spec, profile=profile or profiles.DEFAULT, seed=args.seed, device=args.device,
                            allow_pickle=args.allow_pickle, allow_nonfinite=getattr(args, "allow_nonfinite", False))


def _load_many(specs: List[str], args):
    return [load_any(s, args.profile, args) for s in _progress(specs, "fingerprinting")]


def _common(p):
    p.add_argument("--profile", choices=profiles.names(), default=None,
                   help=f"fingerprint profile for models (default {profiles.DEFAULT}; JSON inputs keep theirs)")
    p.add_argument("--seed", type=int, default=0, help="probe seed (0 = TensorGuard's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .bin/.pt checkpoints (torch.load weights_only=True)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="fingerprint checkpoints whose weights hold NaN/Inf (refused by default, naming the tensor)")


def cmd_fingerprint(args) -> int:
    if args.source or args.store:
        return _fingerprint_into_store(args)
    if not args.models:
        raise ValueError("name at least one MODEL, or --from LIST_OR_DIR with --store DB")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from ..lineage.store import identity
    from .lineage_store import output_stem, write_inside

    used = set()
    for spec in _progress(args.models, "fingerprinting"):
        fp = load_any(spec, args.profile, args)
        # the name comes from the input (a fingerprint JSON's metadata is untrusted): sanitised, de-duplicated
        stem = output_stem(fp.model, spec, identity(fp), used)
        if stem != fp.model:
            fp.metadata["model"] = stem
        target = write_inside(out, f"{stem}.{fp.profile}.json", fp.to_json())
        print(f"{spec}: {fp.profile} fingerprint, {fp.vector.size} features, {fp.metadata.get('seconds', 0):.2f}s "
              f"-> {target}")
    return 0


def _fingerprint_into_store(args) -> int:
    """Many models into a FingerprintStore with N workers; skips what the store has, records failures."""
    from ..lineage.many import fingerprint_many, model_list, summarize

    if not args.store:
        raise ValueError("--from needs --store DB (where the fingerprints and failures go)")
    models = list(args.models) + (model_list(args.source) if args.source else [])
    if not models:
        raise ValueError("no model to fingerprint")
    results = fingerprint_many(models, args.store, args.profile or profiles.DEFAULT, args.workers, args.seed,
                               args.device, args.allow_pickle, progress=sys.stderr.isatty(),
                               allow_nonfinite=args.allow_nonfinite)
    print(summarize(results))
    return 1 if any(r["status"] == "failed" for r in results) else 0


def cmd_compare(args) -> int:
    from ..lineage.family import distance, same_family, similarity

    a, b = load_any(args.a, args.profile, args), load_any(args.b, args.profile, args)
    d, s = distance(a, b), similarity(a, b)
    result = {"a": a.model, "b": b.model, "profile": a.profile, "distance": d, "similarity": s}
    verdict = same_family(a, b)
    if verdict is not None:
        result["same_family"] = verdict
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        verdict = ""
        if "same_family" in result:
            verdict = "  -> same family" if result["same_family"] else "  -> different families"
        print(f"{a.model} vs {b.model} ({a.profile}): distance {d:.4g}, similarity {s:.4f}{verdict}")
    return 0


def _bases(specs: List[str], args):
    bases = {}
    for item in specs:
        if "=" not in item:
            raise ValueError(f"--base {item!r}: expected NAME=MODEL_OR_FINGERPRINT")
        name, spec = item.split("=", 1)
        bases[name] = load_any(spec, args.profile, args)
    return bases


def cmd_classify(args) -> int:
    from ..lineage.family import FamilyClassifier

    bases = _bases(args.base, args)
    fps = _load_many(args.models, args)
    clf = FamilyClassifier(bases, method=args.method, open_set=not args.closed_set, threshold=args.threshold)
    preds = clf.fit_predict(fps)
    rows = [p.as_dict() for p in preds]
    report = {"method": args.method, "threshold": clf.threshold_used, "bases": list(bases), "predictions": rows}
    if args.json == "-":   # --json alone: JSON instead of the table
        print(json.dumps(report, indent=1))
        return 0
    print(f"{'model':<32} {'family':<16} {'distance':>10} {'margin':>10}  nearest")
    for p in preds:
        print(f"{p.model[:32]:<32} {p.family[:16]:<16} {p.distance:>10.4g} {p.margin:>10.4g}  {p.nearest}")
    if clf.open_set:
        print(f"(open set: unknown beyond distance {clf.threshold_used:.4g}; method {args.method})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def cmd_store(args) -> int:
    from .lineage_store import run_store

    return run_store(args, load_any)


def cmd_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from ..lineage.family import FamilyClassifier, check_comparable, feature_vector

    bases = _bases(args.base, args) if args.base else {}
    fps = _load_many(args.models, args)
    everything = list(bases.values()) + fps
    if len(everything) < 2:
        raise ValueError("plot needs at least two fingerprints")
    for fp in everything[1:]:
        check_comparable(everything[0], fp)
    labels = list(bases) + ([p.family for p in FamilyClassifier(bases, method="nearest").fit_predict(fps)]
                            if bases else [fp.model for fp in fps])
    x = StandardScaler().fit_transform(np.nan_to_num(np.array([feature_vector(fp) for fp in everything])))
    xy = PCA(n_components=2).fit_transform(x) if x.shape[0] > 2 else np.c_[x[:, 0], np.zeros(len(x))]
    fig, ax = plt.subplots(figsize=(8, 6))
    for fam in dict.fromkeys(labels):
        idx = [i for i, lab in enumerate(labels) if lab == fam]
        ax.scatter(xy[idx, 0], xy[idx, 1], label=fam, s=60)
    for i, fp in enumerate(everything):
        ax.annotate(fp.model[:24], xy[i], fontsize=7, alpha=0.8,
                    weight="bold" if i < len(bases) else "normal")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{everything[0].profile} fingerprints (PCA of standardised features)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


def register(subparsers) -> None:
    from .lineage_store import add_store_parser

    p = subparsers.add_parser("fingerprint", help="fingerprint models, one JSON each (or many into a store)")
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("-o", "--output", default=".", help="directory for the JSON files")
    p.add_argument("--from", dest="source", metavar="LIST_OR_DIR",
                   help="fingerprint every model named in a list file (one per line) or found in a directory")
    p.add_argument("--store", metavar="DB", help="write into this SQLite fingerprint store instead of JSON files; "
                   "models already in it (same file hashes and profile) are skipped, failures are recorded")
    p.add_argument("--workers", type=int, default=1, help="worker processes for --store")
    _common(p)
    p.set_defaults(func=cmd_fingerprint)

    p = subparsers.add_parser("compare", help="distance and similarity of two models or fingerprints")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("classify", help="assign models to the families of base models")
    p.add_argument("--base", action="append", required=True, metavar="NAME=MODEL_OR_FP")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_FP")
    p.add_argument("--method", choices=("kmeans", "nearest"), default="kmeans")
    p.add_argument("--closed-set", action="store_true", help="never answer 'unknown'")
    p.add_argument("--threshold", type=float, default=None,
                   help="open-set radius (default: the profile's measured one, else half the smallest base-to-base "
                        "distance)")
    p.add_argument("--json", metavar="FILE", nargs="?", const="-",
                   help="print the predictions as JSON instead of the table; --json FILE: also write them to FILE")
    _common(p)
    p.set_defaults(func=cmd_classify)

    add_store_parser(subparsers, _common, cmd_store)

    p = subparsers.add_parser("plot", help="PCA scatter of fingerprints coloured by family (PNG)")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_FP")
    p.add_argument("--base", action="append", default=[], metavar="NAME=MODEL_OR_FP")
    p.add_argument("-o", "--output", default="lineage.png")
    _common(p)
    p.set_defaults(func=cmd_plot)
