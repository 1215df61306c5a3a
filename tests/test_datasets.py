"""Dataset reading, GradSentry tokenisation, the collator, and writing a subset back in the input's format."""
import csv
import json

import pytest
import torch

from tensorguard_fast.backdoor.datasets import collate, load_samples


class CharTokenizer:
    """One token per character, EOS = 1, no chat template: enough to check the tokenisation policy exactly."""

    eos_token_id = 1
    pad_token_id = 0
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return ([2] if add_special_tokens else []) + [3 + (ord(c) % 200) for c in text]

    def __len__(self):
        return 203


def _jsonl(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def test_schemas_and_ids(tmp_path):
    p = _jsonl(tmp_path, [
        json.dumps({"id": "a", "question": "Q1", "answer": "A1"}),
        json.dumps({"instruction": "Do", "input": "this", "output": "ok"}),
        json.dumps({"prompt": "P", "response": "R"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        json.dumps({"question": "list", "answer": ["x", "y"]}),
    ])
    ds = load_samples(p)
    assert [s.id for s in ds.samples] == ["a", "line:2", "line:3", "line:4", "line:5"]
    assert [s.answer for s in ds.samples] == ["A1", "ok", "R", "yo", "x; y"]
    assert ds.samples[1].prompt == "Do\n\nthis"
    assert ds.samples[3].prompt == [{"role": "user", "content": "hi"}]
    assert not ds.problems


def test_malformed_lines_and_missing_answers_are_reported_with_line_numbers(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"question": "q", "answer": "a"}), "{not json", "",
                          json.dumps({"question": "q", "answer": ""}), json.dumps({"foo": 1})])
    ds = load_samples(p, CharTokenizer())
    assert len(ds) == 4   # the blank line is not a record
    assert ds.samples[0].problem is None
    assert ds.samples[1].problem.startswith("unreadable line 2 of d.jsonl: not JSON") and ds.samples[1].raw == b"{not json"
    assert "line 4 of d.jsonl" in ds.samples[2].problem and "empty answer" in ds.samples[2].problem
    assert "line 5 of d.jsonl" in ds.samples[3].problem and "no known schema" in ds.samples[3].problem


def test_empty_file_is_an_error(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        load_samples(p)
    with pytest.raises(ValueError, match="extension"):
        load_samples(_jsonl(tmp_path, ["{}"], "x.txt"))


def test_truncation_policy_and_collator(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"question": "abcdef", "answer": "uvwxyz"}),
                          json.dumps({"question": "q", "answer": "a"})])
    ds = load_samples(p, CharTokenizer(), max_len=4)
    long, short = ds.samples
    # GradSentry: prompt (with its special token) and answer each cut to max_len, then EOS after the answer.
    assert long.prompt_ids == [2] + [3 + ord(c) for c in "abc"]
    assert long.answer_ids == [3 + ord(c) for c in "uvwx"] + [1]
    assert long.truncation == "prompt 7->4; answer 6->4"
    assert short.truncation is None and short.n_answer_tokens == 2
    batch = collate(ds.samples, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 9)
    assert batch["labels"][0].tolist() == [-100] * 4 + long.answer_ids
    assert batch["labels"][1].tolist() == [-100, -100, 3 + ord("a"), 1] + [-100] * 5
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * 5
    with pytest.raises(ValueError, match="cannot be scored"):
        bad = load_samples(_jsonl(tmp_path, ["{oops"], "b.jsonl"), CharTokenizer())
        collate(bad.samples)


def test_chat_template_is_used_when_present(smollm2, tmp_path):
    _, tok = smollm2
    p = _jsonl(tmp_path, [json.dumps({"question": "Who won?", "answer": "Right"})])
    s = load_samples(p, tok).samples[0]
    text = tok.decode(s.prompt_ids)
    assert text.endswith("<|im_start|>assistant\n") and "Who won?" in text
    assert s.answer_ids[-1] == tok.eos_token_id
    plain = load_samples(p, tok, use_chat_template=False).samples[0]
    assert tok.decode(plain.prompt_ids) == "Who won?"


def test_write_back_in_the_input_format(tmp_path):
    rows = [{"id": "1", "question": "q1", "answer": "a1"}, {"id": "2", "question": "q2", "answer": "a2"}]
    c = tmp_path / "d.csv"
    with open(c, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "question", "answer"])
        w.writeheader()
        w.writerows(rows)
    ds = load_samples(c)
    ds.write(str(tmp_path / "clean.csv"), [1])
    assert list(csv.DictReader(open(tmp_path / "clean.csv"))) == [rows[1]]
    j = tmp_path / "d.json"
    j.write_text(json.dumps(rows))
    load_samples(j).write(str(tmp_path / "clean.json"), [0])
    assert json.loads((tmp_path / "clean.json").read_text()) == [rows[0]]
    raw = '{"question": "q",   "answer": "a"}'   # odd spacing survives: lines are copied, not re-serialised
    ds = load_samples(_jsonl(tmp_path, [raw]))
    ds.write(str(tmp_path / "clean.jsonl"), [0])
    assert (tmp_path / "clean.jsonl").read_text() == raw + "\n"


def test_collate_device(tmp_path):
    ds = load_samples(_jsonl(tmp_path, [json.dumps({"question": "q", "answer": "a"})]), CharTokenizer())
    assert collate(ds.samples, device="meta")["input_ids"].device == torch.device("meta")
