"""Everything `scan` can check before the model loads (loading takes minutes on a big model; a typo should not): the
options, the device, the output directory, the model name and the data (read and split into prompt / answer, not
tokenised). `check(args)` returns the `Plan` that `--dry-run` prints, or raises a one-line ValueError /
FileNotFoundError / PermissionError naming the input and the fix."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional

from .rules import DEFAULT as DEFAULT_SCORE

OUTPUT_FILES = ("scan_config.json", "parts/", "scores.jsonl", "flagged.jsonl", "{clean}", "{removed}",
                "summary.json", "histogram.png", "scatter.png (when the rule has two components)", "report.html")


@dataclass
class Plan:
    data: str
    format: str
    rows: int
    problems: int
    schemas: dict                 # schema name -> rows
    mapping: Optional[tuple]      # (prompt_field, answer_field) when given
    model: str
    device: str
    dtype: str
    score: str
    spectrum: str
    threshold: str
    out: str
    outputs: List[str] = field(default_factory=list)
    first_problems: List[str] = field(default_factory=list)

    def render(self) -> str:
        schemas = ", ".join(f"{name} ({n})" for name, n in self.schemas.items()) or "none"
        mapping = f"--prompt-field {self.mapping[0]} --answer-field {self.mapping[1]}" if self.mapping else "none"
        lines = [f"data:      {self.data} ({self.format}, {self.rows} rows, {self.problems} with problems)",
                 f"schema:    {schemas}; field mapping: {mapping}",
                 f"model:     {self.model} on {self.device}, {self.dtype}",
                 f"score:     {self.score} ({self.spectrum} spectrum), threshold {self.threshold}",
                 f"output:    {self.out}: {', '.join(self.outputs)}"]
        lines += [f"  problem: {p}" for p in self.first_problems]
        return "\n".join(lines)


def check_device(text: Optional[str]) -> str:
    """The device to run on; a device this machine does not have is a one-line error, not a CUDA traceback."""
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
            raise ValueError(f"--device {text}: no CUDA device is usable here (torch {torch.__version__}, built with "
                             f"{built}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: unsupported device type {device.type!r}; use cpu or cuda")
    return text


def check_out_dir(path: str) -> None:
    """The output directory exists as a writable directory, or can be created (nothing is created here)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise NotADirectoryError(f"--out {path}: is a file, not a directory; choose another --out")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {path}: the directory is not writable; choose another --out")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"--out {path}: {parent} is a file, not a directory; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {path}: cannot be created ({parent} is not writable); choose another --out")


def check_model_name(name: str) -> None:
    """bundled:NAME must be a bundled model; a name that looks like a local path must exist (it would otherwise be
    sent to the hub as a model id and fail there with a confusing message)."""
    if name.startswith("bundled:"):
        from ..io.bundled import BUNDLED

        if name.split(":", 1)[1] not in BUNDLED:
            raise ValueError(f"--model {name}: unknown bundled model; choose from "
                             f"{', '.join('bundled:' + k for k in sorted(BUNDLED))}")
        return
    if os.path.exists(name):
        return
    looks_local = (name.startswith((".", "/", "~")) or os.sep in name.strip(os.sep).split(os.sep, 1)[-1]
                   or name.endswith((".safetensors", ".gguf", ".bin", ".pt")))
    if looks_local:
        raise FileNotFoundError(f"--model {name}: no such file or directory (a hub id is ORG/NAME)")


def schema_of(sample) -> Optional[str]:
    """The schema a readable record was read with (as the datasets module tries them), for the plan."""
    record = sample.record
    if not isinstance(record, dict):
        return None
    for key in ("messages", "conversations"):
        if key in record:
            return key
    for q, a in (("question", "answer"), ("context", "target"), ("prompt", "response"), ("prompt", "completion"),
                 ("instruction", "output")):
        if q in record and a in record:
            return f"{q}/{a}"
    return None


def _unscorable_error(dataset, mapping) -> ValueError:
    """One line for a dataset none of whose rows can be scored: the commonest problem, and for a schema problem
    the fields seen and the fix."""
    def bare(problem: str) -> str:   # drop the "line N of FILE: " prefix, so equal problems count together
        return problem.split(": ", 1)[1] if ": " in problem and " of " in problem.split(": ", 1)[0] else problem

    problem, n = Counter(bare(s.problem) for s in dataset.samples).most_common(1)[0]
    fields = sorted({str(k) for s in dataset.samples if isinstance(s.record, dict) for k in s.record})
    message = f"{dataset.path}: none of its {len(dataset)} rows can be scored; {n} of them: {problem}"
    if "schema" in problem or "field" in problem:
        message = (f"{dataset.path}: no row has a known schema (fields seen: {fields[:12]}); name the prompt and "
                   f"answer fields with --prompt-field FIELD --answer-field FIELD")
        if mapping:
            message += f" (the mapping {mapping[0]} -> {mapping[1]} did not fit: {problem})"
    return ValueError(message)


def check(args) -> Plan:
    """Check every option and input `run` needs, before any model loads (module docstring)."""
    from .datasets import load_samples
    from .threshold import parse_threshold

    try:
        parse_threshold(args.threshold)
    except ValueError as exc:
        raise ValueError(f"--threshold {args.threshold!r}: {exc}") from None
    score = args.score or ("fft" if args.spectrum == "fft" else DEFAULT_SCORE)
    if score == "fft" and args.spectrum != "fft":
        raise ValueError("--score fft needs --spectrum fft (the FFT entropy is computed while scanning)")
    for name in ("batch_size", "max_len", "crop"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    device = check_device(args.device)
    check_out_dir(args.out)
    check_model_name(args.model)
    prompt_field, answer_field = getattr(args, "prompt_field", None), getattr(args, "answer_field", None)
    mapping = (prompt_field, answer_field) if prompt_field or answer_field else None
    dataset = load_samples(args.data, None, prompt_field=prompt_field, answer_field=answer_field)
    readable = [s for s in dataset.samples if not s.problem]
    if not readable and not getattr(args, "allow_degenerate", False):
        raise _unscorable_error(dataset, mapping)
    schemas = Counter("mapped fields" if mapping else (schema_of(s) or "other") for s in readable)
    ext = os.path.splitext(dataset.clean_name)[1]
    outputs = [f.format(clean=dataset.clean_name, removed=f"removed{ext}") for f in OUTPUT_FILES]
    return Plan(data=str(dataset.path), format=dataset.format, rows=len(dataset), problems=len(dataset.problems),
                schemas=dict(schemas.most_common()), mapping=mapping, model=args.model, device=device,
                dtype=args.dtype, score=score, spectrum=args.spectrum, threshold=args.threshold, out=args.out,
                outputs=outputs, first_problems=[s.problem for s in dataset.problems[:5]])
