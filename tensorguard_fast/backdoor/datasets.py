"""Fine-tuning datasets as (prompt, answer) samples: reading, tokenising the GradSentry way, batching, writing back.

Formats: JSONL (one record a line), JSON (a list of records, or {"data": [...]}) and CSV (header row). Schemas, checked
in this order: chat `messages` (the last assistant turn is the answer, everything before it the prompt);
question/answer (also GradSentry's context/target); instruction/input/output; prompt/response (or completion).

Tokenisation follows GradSentry's `trainProcess`: the prompt and the answer are each cut to `max_len` tokens (the
start kept), the answer gets the tokenizer's EOS, and only answer + EOS are scored. A list answer is joined with "; "
as GradSentry does. When the tokenizer has a chat template, the prompt is rendered with it (GradSentry feeds the raw
question; the template is what the model is fine-tuned with, so it is what a defender should score).

Nothing is dropped silently: an unreadable line or a record with no usable answer becomes a sample with `problem`
set (and its line number), which the scan reports as flagged with that reason and never scores.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch

from ..ops.lm_head_errors import IGNORE_INDEX  # the one definition: labels the ops do not score
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


@dataclass
class Sample:
    index: int                      # 0-based position among the file's records
    id: Any                         # the record's own "id", else its index
    line: Optional[int]             # 1-based line in the file (JSONL, CSV), None for JSON
    record: Any                     # the record as read (dict), or the raw text of an unreadable line
    raw: Optional[str] = None       # the exact input line (JSONL), written back unchanged
    prompt: Any = None              # str, or the list of chat messages before the answer
    answer: Optional[str] = None
    prompt_ids: List[int] = field(default_factory=list)
    answer_ids: List[int] = field(default_factory=list)   # answer + EOS: the scored tokens
    truncation: Optional[str] = None  # what the max_len policy cut, e.g. "prompt 900->512"
    problem: Optional[str] = None     # why this sample cannot be scored

    @property
    def input_ids(self) -> List[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def n_answer_tokens(self) -> int:
        # The first position of a sequence is predicted by nothing, so an answer starting there loses one token.
        return len(self.answer_ids) - (1 if not self.prompt_ids and self.answer_ids else 0)


@dataclass
class Dataset:
    path: str
    format: str
    samples: List[Sample]
    columns: Optional[List[str]] = None   # CSV header, to write the clean file back in the same shape

    def __len__(self):
        return len(self.samples)

    @property
    def problems(self) -> List[Sample]:
        return [s for s in self.samples if s.problem]

    def write(self, path: str, indices: Sequence[int]) -> None:
        """Write the samples at `indices` (in that order) to `path` in this dataset's own format."""
        chosen = [self.samples[i] for i in indices]
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            if self.format == "jsonl":
                for s in chosen:
                    fh.write((s.raw if s.raw is not None else json.dumps(s.record, ensure_ascii=False)).rstrip("\n")
                             + "\n")
            elif self.format == "json":
                json.dump([s.record for s in chosen], fh, ensure_ascii=False, indent=1)
                fh.write("\n")
            else:
                writer = csv.DictWriter(fh, fieldnames=self.columns or [], extrasaction="ignore")
                writer.writeheader()
                for s in chosen:
                    if isinstance(s.record, dict):
                        writer.writerow(s.record)
        os.replace(tmp, path)


def detect_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: unknown dataset extension {ext!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[ext]


def _answer_text(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)   # GradSentry's rule for list answers
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def split_record(record) -> tuple:
    """(prompt, answer, problem) of one record; prompt is a str or a list of chat messages."""
    if not isinstance(record, dict):
        return None, None, f"record is a {type(record).__name__}, not an object"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            return None, None, "'messages' is not a list of {role, content} objects"
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            return None, None, "'messages' has no assistant turn to score"
        return msgs[:last], _answer_text(msgs[last].get("content")), None
    for q, a in (("question", "answer"), ("context", "target"), ("prompt", "response"), ("prompt", "completion")):
        if q in record and a in record:
            return _answer_text(record[q]) or "", _answer_text(record[a]), None
    if "instruction" in record and "output" in record:
        prompt = _answer_text(record["instruction"]) or ""
        extra = _answer_text(record.get("input"))
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return prompt, _answer_text(record["output"]), None
    return None, None, f"no known schema in keys {sorted(record)[:8]} (want question/answer, " \
                       "instruction/input/output, prompt/response or messages)"


def _read_records(path: str, fmt: str):
    """Yield (line, raw, record, problem) for every record of the file."""
    with open(path, "r", encoding="utf-8", newline="") as fh:
        text = fh.read()
    if not text.strip():
        raise ValueError(f"{path} is empty: no samples to scan")
    if fmt == "jsonl":
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                yield n, raw, json.loads(raw), None
            except json.JSONDecodeError as exc:
                yield n, raw, raw, f"unreadable line {n}: {exc.msg} (column {exc.colno})"
    elif fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for record in data:
            yield None, None, record, None
    else:
        reader = csv.DictReader(io.StringIO(text))
        for record in reader:
            line = reader.line_num
            if None in record:   # more cells than header columns
                yield line, None, record, f"unreadable line {line}: more cells than the header has columns"
            elif any(v is None for v in record.values()):
                yield line, None, record, f"unreadable line {line}: fewer cells than the header has columns"
            else:
                yield line, None, record, None


def load_samples(path: str, tokenizer=None, max_len: int = 512, use_chat_template: Optional[bool] = None) -> Dataset:
    """Read a dataset file into samples; with a tokenizer, tokenise them (see the module docstring for the policy).

    use_chat_template: None = when the tokenizer has one. Raises ValueError for an empty file or one with no sample.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such dataset file")
    fmt = detect_format(path)
    samples = []
    for index, (line, raw, record, problem) in enumerate(_read_records(path, fmt)):
        own_id = record.get("id") if isinstance(record, dict) else None
        s = Sample(index=index, id=own_id if own_id is not None else index, line=line, record=record, raw=raw)
        if problem is None:
            s.prompt, s.answer, problem = split_record(record)
            if problem is None and (s.answer is None or not s.answer.strip()):
                problem = "empty answer: no answer token to score"
        if problem is not None:
            s.problem = problem if line is None or "line" in problem else f"line {line}: {problem}"
        samples.append(s)
    if not samples:
        raise ValueError(f"{path} holds no records")
    columns = None
    if fmt == "csv":
        with open(path, "r", encoding="utf-8", newline="") as fh:
            columns = next(csv.reader(fh), None)
    dataset = Dataset(path=path, format=fmt, samples=samples, columns=columns)
    if tokenizer is not None:
        tokenize(dataset, tokenizer, max_len, use_chat_template)
    return dataset


def tokenize(dataset: Dataset, tokenizer, max_len: int = 512, use_chat_template: Optional[bool] = None) -> Dataset:
    """Fill prompt_ids / answer_ids / truncation of every readable sample, in place."""
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: must be >= 1")
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token_id
    for s in dataset.samples:
        if s.problem:
            continue
        if use_chat_template:
            messages = s.prompt if isinstance(s.prompt, list) else [{"role": "user", "content": s.prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            text = s.prompt if isinstance(s.prompt, str) else "\n".join(str(m.get("content", "")) for m in s.prompt)
            prompt_ids = tokenizer.encode(text)
        answer_ids = tokenizer.encode(s.answer, add_special_tokens=False)
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
