"""The scan command's arguments and its run step, shared by `tensorguard-fast scan` and the torchrun entry
(`python -m tensorguard_fast.backdoor`), so the entry needs nothing from the CLI package."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from .rules import DEFAULT as DEFAULT_SCORE, SCORES

log = logging.getLogger(__name__)

DESCRIPTION = ("Score each (prompt, answer) sample by the spectrum of its own lm_head gradient (GradSentry), flag "
               "the high ones, and write into --out: scores.jsonl and flagged.jsonl (why each sample is flagged or "
               "kept), clean.<ext> and removed.<ext> (the input split, in its own format), summary.json, "
               "histogram.png and report.html. The data, options, device and --out are checked before the model "
               "loads (--dry-run stops there). A killed scan resumes where it stopped when run again. Exit codes: 0 "
               "done, 2 a mistake in the input or options, 3 a degenerate outcome (everything flagged, nothing "
               "scored, or the threshold rule could not decide; --allow-degenerate accepts it). Under torchrun "
               "(python -m tensorguard_fast.backdoor) the dataset is sharded across ranks.")


def scan_parser() -> argparse.ArgumentParser:
    """The same arguments for `python -m tensorguard_fast.backdoor` (the torchrun entry point)."""
    p = argparse.ArgumentParser(prog="python -m tensorguard_fast.backdoor", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _threshold(text: str) -> str:
    """Checked when the arguments are parsed, before any model loads; passed on unchanged."""
    from .threshold import parse_threshold

    try:
        parse_threshold(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_arguments(p) -> None:
    p.add_argument("--model", required=True,
                   help="a local Hugging Face model directory, a hub id, or bundled:smollm2 / bundled:gemma3-270m")
    p.add_argument("--data", required=True,
                   help="dataset: a .jsonl, .json (a list, {\"data\": [...]} or JSON Lines), .csv or .parquet file, a "
                        "saved dataset directory (save_to_disk), or a hub dataset NAME[:SPLIT] the local cache has")
    p.add_argument("--prompt-field", default=None,
                   help="the record field that holds the prompt, for records of no known schema (with --answer-field)")
    p.add_argument("--answer-field", default=None,
                   help="the record field that holds the answer (with --prompt-field)")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--spectrum", choices=("svd", "fft"), default="svd",
                   help="svd: singular values of the gradient crop; fft: FFT spectral entropy of it")
    p.add_argument("--score", choices=SCORES, default=None,
                   help="; ".join(f"{s.name}: {s.help}" for s in SCORES.values()) +
                        f" (default: fft for --spectrum fft, else {DEFAULT_SCORE})")
    p.add_argument("--threshold", default="kde", type=_threshold,
                   help="kde (GradSentry's KDE valley), otsu, mad, gmm, topk:RATIO (exactly round(RATIO x scored) "
                        "flagged, ties broken by input order), or a finite number")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-len", type=_positive_int, default=512,
                   help="prompt and answer are each cut to this many tokens")
    p.add_argument("--crop", type=_positive_int, default=8,
                   help="gradient crop: first V/crop rows, d/crop columns (at most the lm_head's smaller side)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none unless stderr is a "
                   "terminal)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the data, options, device and output directory, print the plan, and stop before the "
                        "model loads")
    p.add_argument("--allow-degenerate", action="store_true",
                   help=f"exit 0 even when every sample is flagged, none could be scored, or the threshold rule could "
                        f"not decide (otherwise exit {DEGENERATE_EXIT})")
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


DEGENERATE_EXIT = 3   # a scan that flags everything, scores nothing, or whose rule could not decide


def run(args) -> int:
    """Check everything that can be checked before the model loads (preflight), then load, scan and say plainly
    what came out. Returns the exit code: 0, or DEGENERATE_EXIT unless --allow-degenerate."""
    from .. import distributed
    from . import preflight
    from .scan import scan

    plan = preflight.check(args)
    if args.dry_run:
        if os.environ.get("RANK", "0") == "0":
            print(plan.render())
        return 0
    progress = not args.no_progress and sys.stderr.isatty() and not getattr(args, "quiet", 0)
    if not progress:   # transformers' own "Loading weights" bar too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    w = distributed.init()
    try:
        device = args.device
        if device is None and w.size > 1:
            device = str(distributed.device_for(w))
        model, tokenizer = load_model(args.model, device or plan.device, args.dtype)
        summary = scan(model, tokenizer, args.data, args.out, spectrum=args.spectrum, score=plan.score,
                       batch_size=args.batch_size, threshold=args.threshold, max_len=args.max_len, crop=args.crop,
                       model_name=args.model, progress=progress, world=w,
                       prompt_field=args.prompt_field, answer_field=args.answer_field)
    finally:
        distributed.close()
    return report_outcome(summary, args.out, args.allow_degenerate) if w.is_main else 0


def degenerate_reason(summary: dict) -> Optional[str]:
    """Why a finished scan's result cannot be used as a filter as it stands, or None."""
    c = summary["counts"]
    if c["scored"] == 0:
        return f"no sample of {c['samples']} could be scored"
    if c["clean"] == 0:
        return f"all {c['samples']} samples were flagged: the clean set is empty"
    if summary["status"] == "undecided":
        return "the threshold rule could not decide, so the clean set is unfiltered"
    return None


def report_outcome(summary: dict, out: str, allow_degenerate: bool = False) -> int:
    """Print the outcome (stdout) and, for a degenerate one, why (stderr); return the exit code."""
    print(f"{summary['outcome']}; clean set in {os.path.join(out, summary['files']['clean'])}, report in "
          f"{os.path.join(out, 'report.html')}")
    reason = degenerate_reason(summary)
    if reason is None:
        return 0
    if allow_degenerate:
        log.warning("%s (accepted: --allow-degenerate)", reason)
        return 0
    print(f"tensorguard-fast scan: {reason}; the files are in {out}; pass --allow-degenerate to accept this outcome "
          f"(exit {DEGENERATE_EXIT})", file=sys.stderr)
    return DEGENERATE_EXIT
