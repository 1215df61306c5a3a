"""Fine-tuning datasets as (prompt, answer) samples: reading, tokenising the GradSentry way, batching, writing back.

Inputs (see readers.py and arrow_sources.py for the exact rules): JSONL, JSON (a list, an object holding one, or
JSON Lines under .json), CSV, Parquet, a `datasets.Dataset`, a saved dataset directory, or a hub dataset name
(NAME or NAME:SPLIT) that `datasets` can load. Schemas: see schemas.py; `prompt_field` / `answer_field` map others.

Tokenisation follows GradSentry's `trainProcess`: the prompt and the answer are each cut to `max_len` tokens (the
start kept), the answer gets the tokenizer's EOS, and only answer + EOS are scored. A list answer is joined with "; "
as GradSentry does. When the tokenizer has a chat template, the prompt is rendered with it (GradSentry feeds the raw
question; the template is what the model is fine-tuned with, so it is what a defender should score).

Nothing is dropped silently: a row that cannot be read, has no usable answer, or fails in the tokenizer becomes a
sample with `problem` set (naming the file and line), which the scan reports as flagged with that reason and never
scores. Ids: the record's own "id" (a string or an integer) when it is valid and not taken by an earlier row, else
"line:N" (the row's 1-based line) or "row:N" (its 1-based position where the input has no lines); a repeated own id
becomes "ID@line:N". Every sample's id is unique.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch

from ..ops.lm_head_errors import IGNORE_INDEX  # the one definition: labels the ops do not score
from . import arrow_sources, readers
from .schemas import bad_text, split_record

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
           ".pq": "parquet"}


@dataclass
class Sample:
    index: int                      # 0-based position among the input's records
    id: Any                         # unique: the record's own "id", else "line:N" / "row:N" (module docstring)
    line: Optional[int]             # 1-based line in the file where the record starts; None where there are no lines
    record: Any                     # the record as read (dict), or None / the cells when it could not be read
    raw: Optional[bytes] = None     # the exact input bytes of the row (JSONL), written back unchanged
    prompt: Any = None              # str, or the list of chat messages before the answer
    answer: Optional[str] = None
    prompt_ids: List[int] = field(default_factory=list)
    answer_ids: List[int] = field(default_factory=list)   # answer + EOS: the scored tokens
    truncation: Optional[str] = None  # what the max_len policy cut, e.g. "prompt 900->512"
    problem: Optional[str] = None     # why this sample cannot be scored (names the file and line)
    cells: Optional[list] = None      # CSV cells as read, written back cell for cell

    @property
    def input_ids(self) -> List[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def n_answer_tokens(self) -> int:
        # The first position of a sequence is predicted by nothing, so an answer starting there loses one token.
        return len(self.answer_ids) - (1 if not self.prompt_ids and self.answer_ids else 0)


@dataclass
class Dataset:
    path: str                       # the input as named in messages (a path, a dataset name, or "<Dataset>")
    format: str                     # jsonl | json | csv | parquet: how write() writes
    samples: List[Sample]
    columns: Optional[List[str]] = None   # CSV header / Parquet columns
    digest: Optional[str] = None          # sha256 of the content read (resume checks it)
    clean_name: str = "clean.jsonl"       # the clean file's name, in the input's own format
    wrapper: Optional[tuple] = None       # JSON: (the object around the record list, its key)
    table: Any = None                     # Parquet: the table (or datasets.Dataset) to take the subset from
    tokenization: dict = field(default_factory=dict)   # what tokenize() used: max_len, chat template digest
    fields: Optional[tuple] = None        # (prompt_field, answer_field) when the user mapped them

    def __len__(self):
        return len(self.samples)

    @property
    def problems(self) -> List[Sample]:
        return [s for s in self.samples if s.problem]

    def write(self, path: str, indices: Sequence[int]) -> None:
        """Write the samples at `indices` (in that order) to `path` in this dataset's own format, whole or not at
        all (a temporary file renamed into place)."""
        from .writers import write_samples

        tmp = f"{path}.tmp"
        write_samples(self, [self.samples[i] for i in indices], tmp)
        os.replace(tmp, path)


def detect_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: unknown dataset extension {ext!r}; expected one of {sorted(FORMATS)}, a saved "
                         "dataset directory or a hub dataset name")
    return FORMATS[ext]


def read_source(data) -> readers.Source:
    """The rows of `data`: a file path, a saved dataset directory, a datasets.Dataset, or a hub dataset name."""
    if arrow_sources.is_hf_dataset(data):
        return arrow_sources.read_hf_dataset(data, f"<{type(data).__name__}>")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a path, a dataset name or a datasets.Dataset, not {type(data).__name__}")
    path = os.fspath(data)
    if os.path.isdir(path):
        return arrow_sources.read_saved_dataset(path)
    if not os.path.exists(path):
        if arrow_sources.looks_like_hub_name(path):
            return arrow_sources.read_hub_dataset(path)
        raise FileNotFoundError(f"{path}: no such dataset file")
    fmt = detect_format(path)
    if fmt == "parquet":
        return arrow_sources.read_parquet(path)
    try:
        with open(path, "rb") as fh:
            content = fh.read()
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror})") from None
    if not content[len(readers.BOM):].strip() if content.startswith(readers.BOM) else not content.strip():
        raise ValueError(f"{path} is empty: no samples to scan")
    return {"jsonl": readers.read_jsonl, "json": readers.read_json, "csv": readers.read_csv}[fmt](path, content)


def _where(source: readers.Source, row: readers.Row) -> str:
    name = os.path.basename(source.name) if os.path.exists(source.name) else source.name
    return f"line {row.line} of {name}" if row.line is not None else f"row {row.position} of {name}"


def _assign_ids(source: readers.Source, samples: List[Sample]) -> None:
    def own(s):
        value = s.record.get("id") if isinstance(s.record, dict) else None
        if isinstance(value, bool) or not isinstance(value, (str, int)) or bad_text(value):
            return None   # not an id, or one that cannot be written as UTF-8
        return value

    taken = {own(s) for s in samples} - {None}
    used = set()
    for s, row in zip(samples, source.rows):
        value = own(s)
        if value is None or value in used:
            place = f"line:{row.line}" if row.line is not None else f"row:{row.position}"
            value = place if value is None else f"{value}@{place}"
            k = 2
            while value in taken or value in used:   # a real id spelled like a generated one
                value = f"{place}#{k}"
                k += 1
        used.add(value)
        s.id = value


def load_samples(data, tokenizer=None, max_len: int = 512, use_chat_template: Optional[bool] = None,
                 prompt_field: Optional[str] = None, answer_field: Optional[str] = None) -> Dataset:
    """Read a dataset (a file path, a saved dataset directory, a datasets.Dataset or a hub dataset name) into
    samples; with a tokenizer, tokenise them (see the module docstring for the policy).

    prompt_field / answer_field: the two fields that hold the prompt and the answer, for records of no known schema
    (give both). use_chat_template: None = when the tokenizer has one. Raises ValueError (one line, naming the input)
    for an empty input, one with no record, or a mapping no record has.
    """
    if (prompt_field is None) != (answer_field is None):
        raise ValueError("give both prompt_field and answer_field (--prompt-field and --answer-field), or neither")
    source = read_source(data)
    if not source.rows:
        raise ValueError(f"{source.name} holds no records")
    if answer_field is not None:
        fields = set()
        for row in source.rows:
            if isinstance(row.record, dict):
                fields.update(row.record)
        missing = [f for f in (prompt_field, answer_field) if f not in fields]
        if missing:
            raise ValueError(f"{source.name}: no record has the field {missing[0]!r}; fields seen: "
                             f"{sorted(map(str, fields))[:12]}")
    samples = []
    for index, row in enumerate(source.rows):
        s = Sample(index=index, id=None, line=row.line, record=row.record, raw=row.raw, cells=row.cells)
        problem = row.problem or bad_text(row.record)
        if problem is None:
            s.prompt, s.answer, problem = split_record(row.record, prompt_field, answer_field)
            if problem is None and (s.answer is None or not s.answer.strip()):
                problem = "empty answer: no answer token to score"
        if problem is not None:
            s.problem = f"{'unreadable ' if row.problem else ''}{_where(source, row)}: {problem}"
        samples.append(s)
    _assign_ids(source, samples)
    dataset = Dataset(path=source.name, format=source.format, samples=samples, columns=source.columns,
                      digest=source.digest, clean_name="clean" + source.clean_ext, wrapper=source.wrapper,
                      table=source.table, fields=(prompt_field, answer_field) if answer_field else None)
    if tokenizer is not None:
        tokenize(dataset, tokenizer, max_len, use_chat_template)
    return dataset


def tokenize(dataset: Dataset, tokenizer, max_len: int = 512, use_chat_template: Optional[bool] = None) -> Dataset:
    """Fill prompt_ids / answer_ids / truncation of every readable sample, in place."""
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: must be >= 1")
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    template = getattr(tokenizer, "chat_template", None) if use_chat_template else None
    dataset.tokenization = {"max_len": max_len, "chat_template": use_chat_template,
                            "chat_template_sha256": hashlib.sha256(str(template).encode("utf-8", "replace")).hexdigest()
                            if template else None}
    eos = tokenizer.eos_token_id
    for s in dataset.samples:
        if s.problem:
            continue
        try:
            prompt_ids, answer_ids = _encode(tokenizer, s, use_chat_template)
        except Exception as exc:   # a template that rejects this conversation, a tokenizer error: this row only
            where = f"line {s.line}" if s.line is not None else f"row {s.index + 1}"
            s.problem = f"{where} of {os.path.basename(dataset.path)}: the tokenizer failed: " \
                        f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            continue
        cut = []
        if len(prompt_ids) > max_len:
            cut.append(f"prompt {len(prompt_ids)}->{max_len}")
        if len(answer_ids) > max_len:
            cut.append(f"answer {len(answer_ids)}->{max_len}")
        s.prompt_ids = list(prompt_ids[:max_len])
        s.answer_ids = list(answer_ids[:max_len]) + ([eos] if eos is not None else [])
        s.truncation = "; ".join(cut) or None
        if s.n_answer_tokens < 1:
            s.problem = "no answer token left to score after tokenisation"
    return dataset


def _encode(tokenizer, s: Sample, use_chat_template: bool) -> tuple:
    if use_chat_template:
        messages = s.prompt if isinstance(s.prompt, list) else [{"role": "user", "content": s.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        text = s.prompt if isinstance(s.prompt, str) else "\n".join(str(m.get("content", "")) for m in s.prompt)
        prompt_ids = tokenizer.encode(text)
    return prompt_ids, tokenizer.encode(s.answer, add_special_tokens=False)


def collate(samples: Sequence[Sample], pad_token_id: int = 0, device=None) -> dict:
    """input_ids / attention_mask / labels (B, S) for scoring: right padding, labels -100 on prompt and padding."""
    if not samples:
        raise ValueError("collate: no samples")
    bad = [s for s in samples if s.problem]
    if bad:
        raise ValueError(f"collate: sample {bad[0].id} cannot be scored: {bad[0].problem}")
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for b, s in enumerate(samples):
        ids = s.input_ids
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[b, :len(ids)] = 1
        labels[b, len(s.prompt_ids):len(ids)] = torch.tensor(s.answer_ids, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (padding is masked and never scored)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0
