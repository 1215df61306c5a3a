"""The scan command's arguments and its run step, shared by `tensorguard-fast scan` and the torchrun entry
(`python -m tensorguard_fast.backdoor`), so the entry needs nothing from the CLI package."""
from __future__ import annotations

import argparse

from .scores import DEFAULT_SCORE, SCORES

DESCRIPTION = ("Score each (prompt, answer) sample by the spectrum of its own lm_head gradient (GradSentry), flag "
               "the high ones, and write scores.jsonl, flagged.jsonl, clean.<ext>, summary.json and histogram.png "
               "into --out. A killed scan resumes where it stopped when run again. Under torchrun "
               "(python -m tensorguard_fast.backdoor) the dataset is sharded across ranks.")


def scan_parser() -> argparse.ArgumentParser:
    """The same arguments for `python -m tensorguard_fast.backdoor` (the torchrun entry point)."""
    p = argparse.ArgumentParser(prog="python -m tensorguard_fast.backdoor", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p) -> None:
    p.add_argument("--model", required=True,
                   help="a local Hugging Face model directory, a hub id, or bundled:smollm2 / bundled:gemma3-270m")
    p.add_argument("--data", required=True, help="dataset file: .jsonl, .json or .csv")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--spectrum", choices=("svd", "fft"), default="svd",
                   help="svd: singular values of the gradient crop; fft: FFT spectral entropy of it")
    p.add_argument("--score", choices=SCORES, default=None,
                   help="gradsentry: GradSentry's score; energy: entropy of squared singular values (less confounded "
                        "by answer length); fft: with --spectrum fft (default: fft for --spectrum fft, else "
                        f"{DEFAULT_SCORE})")
    p.add_argument("--threshold", default="kde",
                   help="kde (GradSentry's KDE valley), otsu, mad, gmm, topk:RATIO, or a number")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512, help="prompt and answer are each cut to this many tokens")
    p.add_argument("--crop", type=int, default=8, help="gradient crop: first V/crop rows, d/crop columns")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_model(name: str, device=None, dtype: str = "float32"):
    """(model, tokenizer) from a local directory, a hub id (as transformers resolves it) or bundled:NAME."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if name.startswith("bundled:"):
        from ..io.bundled import load_bundled

        model, tokenizer = load_bundled(name.split(":", 1)[1], dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def run(args) -> int:
    from .. import distributed
    from .scan import scan

    w = distributed.init()
    try:
        device = args.device
        if device is None and w.size > 1:
            device = str(distributed.device_for(w))
        model, tokenizer = load_model(args.model, device, args.dtype)
        score = args.score or ("fft" if args.spectrum == "fft" else DEFAULT_SCORE)
        summary = scan(model, tokenizer, args.data, args.out, spectrum=args.spectrum, score=score,
                       batch_size=args.batch_size, threshold=args.threshold, max_len=args.max_len, crop=args.crop,
                       model_name=args.model, progress=not args.no_progress, world=w)
    finally:
        distributed.close()
    if w.is_main:
        c, th = summary["counts"], summary["threshold"]
        print(f"{c['flagged']} of {c['samples']} samples flagged ({c['unscorable']} unscorable); threshold "
              f"{th['value']:.4f} ({th['reason']}); clean set and report in {args.out}")
    return 0
