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


# --- issue 10 item 5: byte-exact JSON Lines ---------------------------------------------------------------------------

def test_line_separators_inside_strings_stay_in_their_row(tmp_path):
    # U+2028, U+2029 and U+0085 are line breaks for str.splitlines() but ordinary characters inside JSON strings.
    rows = [json.dumps({"question": f"q{k}{sep}x", "answer": f"a{sep}b"}, ensure_ascii=False)
            for k, sep in enumerate(["\u2028", "\u2029", "\u0085", "\r"])]
    p = tmp_path / "seps.jsonl"
    p.write_bytes("\n".join(rows).encode("utf-8") + b"\n")
    ds = load_samples(p)
    assert len(ds) == 4 and not ds.problems
    assert ds.samples[0].prompt == "q0\u2028x" and ds.samples[2].answer == "a\u0085b"
    ds.write(str(tmp_path / "clean.jsonl"), range(4))
    assert (tmp_path / "clean.jsonl").read_bytes() == p.read_bytes()


def test_crlf_and_bom_jsonl(tmp_path):
    p = tmp_path / "crlf.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"id": "first", "question": "q", "answer": "a"}\r\n{"question": "q", "answer": "b"}\r\n')
    ds = load_samples(p)
    assert [s.id for s in ds.samples] == ["first", "line:2"] and not ds.problems   # BOM: row 1 readable, id kept
    ds.write(str(tmp_path / "clean.jsonl"), [1])
    assert (tmp_path / "clean.jsonl").read_bytes() == b'{"question": "q", "answer": "b"}\r\n'   # CRLF kept


# --- issue 10 item 7: rows rewritten as they were ---------------------------------------------------------------------

def test_csv_duplicate_header_column_is_refused_naming_it(tmp_path):
    p = tmp_path / "dup.csv"
    p.write_text("question,answer,answer\nq,a1,a2\n")
    with pytest.raises(ValueError, match=r"dup.csv: column 'answer' appears twice .*columns 2 and 3") as err:
        load_samples(p)
    assert "\n" not in str(err.value)


def test_csv_bom_keeps_the_id_column_and_cells_are_written_back_exactly(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes('\ufeffid,question,answer,note\r\nx1,"q, with comma",a1,"multi\nline"\r\nx2,q2,a2,\r\n'
                  .encode("utf-8"))
    ds = load_samples(p)
    assert [s.id for s in ds.samples] == ["x1", "x2"] and ds.samples[1].line == 4
    ds.write(str(tmp_path / "clean.csv"), [0, 1])
    back = list(csv.reader(open(tmp_path / "clean.csv", newline="", encoding="utf-8")))
    assert back == [["id", "question", "answer", "note"], ["x1", "q, with comma", "a1", "multi\nline"],
                    ["x2", "q2", "a2", ""]]


def test_json_wrapper_keys_survive_the_write_back(tmp_path):
    doc = {"version": "1.2", "data": [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}],
           "license": "cc-by"}
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps(doc))
    ds = load_samples(p)
    assert ds.clean_name == "clean.json" and [s.id for s in ds.samples] == ["row:1", "row:2"]
    ds.write(str(tmp_path / "clean.json"), [1])
    assert json.loads((tmp_path / "clean.json").read_text()) == {**doc, "data": [doc["data"][1]]}


def test_ids_are_unique_and_stable(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"id": "line:2", "question": "q", "answer": "a"}),   # a real id like ours
                          json.dumps({"question": "q", "answer": "a"}),                    # line 2, no id
                          json.dumps({"id": 7, "question": "q", "answer": "a"}),
                          json.dumps({"id": 7, "question": "q", "answer": "a"}),           # a repeated id
                          json.dumps({"id": [1], "question": "q", "answer": "a"}),         # not an id
                          json.dumps({"id": True, "question": "q", "answer": "a"})])
    ids = [s.id for s in load_samples(p).samples]
    assert ids == ["line:2", "line:2#2", 7, "7@line:4", "line:5", "line:6"]
    assert ids == [s.id for s in load_samples(p).samples]   # the same file gives the same ids


# --- issue 10 item 8: one bad row never aborts the read ---------------------------------------------------------------

def test_bad_bytes_deep_nesting_and_lone_surrogates_are_flagged_rows(tmp_path):
    good = b'{"question": "q", "answer": "a"}'
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join([good, b'{"question": "caf\xe9", "answer": "a"}', b"[" * 200_000 + b"]" * 200_000,
                              b'{"id": "\\ud800x", "question": "q", "answer": "a"}',
                              b'{"question": "q", "answer": "\\udfff"}', good]) + b"\n")
    ds = load_samples(p, CharTokenizer())
    assert [s.problem is None for s in ds.samples] == [True, False, False, False, False, True]
    assert ds.samples[1].problem == "unreadable line 2 of bad.jsonl: byte 0xe9 at column 18 is not UTF-8"
    assert ds.samples[2].problem == "unreadable line 3 of bad.jsonl: JSON nested too deep to read"
    assert ds.samples[3].problem == "line 4 of bad.jsonl: lone surrogate \\ud800 is not valid Unicode"
    assert ds.samples[3].id == "line:4" and "line 5 of bad.jsonl" in ds.samples[4].problem
    # Every row, bad ones included, is written back byte for byte.
    ds.write(str(tmp_path / "all.jsonl"), range(len(ds)))
    assert (tmp_path / "all.jsonl").read_bytes() == p.read_bytes()


def test_deep_nesting_and_bad_bytes_inside_a_json_list(tmp_path):
    p = tmp_path / "deep.json"
    p.write_bytes(b'[{"question": "q", "answer": "a"},\n' + b"[" * 200_000 + b"]" * 200_000
                  + b',\n{"question": "\xff", "answer": "a"},\n{"question": "q", "answer": "b"}]')
    ds = load_samples(p)
    assert [s.line for s in ds.samples] == [1, 2, 3, 4]
    assert ds.samples[1].problem == "unreadable line 2 of deep.json: JSON nested too deep to read"
    assert "line 3 of deep.json: byte 0xff is not UTF-8" in ds.samples[2].problem
    assert ds.samples[0].problem is None and ds.samples[3].problem is None


# --- issue 11 item 4: inputs where users keep them --------------------------------------------------------------------

ROWS = [{"id": "r1", "question": "q1", "answer": "a1"}, {"id": "r2", "question": "q2", "answer": None},
        {"id": "r3", "question": "q3", "answer": "a3"}]


def test_parquet_in_parquet_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    ds = load_samples(p)
    assert ds.clean_name == "clean.parquet" and [s.id for s in ds.samples] == ["r1", "r2", "r3"]
    assert "row 2 of d.parquet: empty answer" in ds.samples[1].problem
    ds.write(str(tmp_path / "clean.parquet"), [0, 2])
    back = pq.read_table(tmp_path / "clean.parquet")
    assert back.to_pylist() == [ROWS[0], ROWS[2]] and back.schema == pq.read_table(p).schema


def test_datasets_objects_saved_datasets_and_json_lines_under_json(tmp_path):
    import datasets

    d = datasets.Dataset.from_list(ROWS)
    in_memory = load_samples(d)
    assert in_memory.path == "<Dataset>" and [s.answer for s in in_memory.samples] == ["a1", None, "a3"]
    in_memory.write(str(tmp_path / "clean.parquet"), [2])
    assert datasets.Dataset.from_parquet(str(tmp_path / "clean.parquet")).to_list() == [ROWS[2]]

    d.save_to_disk(str(tmp_path / "saved"))
    saved = load_samples(tmp_path / "saved")
    assert saved.clean_name == "clean.parquet" and saved.digest == in_memory.digest   # same rows, same digest
    datasets.DatasetDict({"train": d}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"splits \['train'\]; pick one"):
        load_samples(tmp_path / "splits")
    with pytest.raises(ValueError, match=r"splits \['train'\]"):
        load_samples(datasets.DatasetDict({"train": d}))

    d.to_json(str(tmp_path / "exported.json"))   # JSON Lines, as datasets writes it
    lines = load_samples(tmp_path / "exported.json")
    assert lines.format == "jsonl" and lines.clean_name == "clean.json" and len(lines) == 3
    lines.write(str(tmp_path / "clean.json"), [0])
    assert datasets.Dataset.from_json(str(tmp_path / "clean.json")).to_list() == [ROWS[0]]


def test_hub_name_that_is_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)   # as HF_DATASETS_OFFLINE=1 sets it
    with pytest.raises(ValueError, match=r"^no-such-owner/no-such-set:train: no such dataset file, and") as err:
        load_samples("no-such-owner/no-such-set:train")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such dataset file"):
        load_samples(tmp_path / "missing.jsonl")   # a path is never sent to the hub


def test_sharegpt_conversations(tmp_path):
    p = _jsonl(tmp_path, [
        json.dumps({"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "yo"}, {"from": "human", "value": "again"}]}),
        json.dumps({"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "only a question"}]})])
    ds = load_samples(p)
    s = ds.samples[0]
    assert s.prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert s.answer == "yo" and s.problem is None
    assert "conversations[0] is from 'narrator'" in ds.samples[1].problem
    assert "no assistant turn" in ds.samples[2].problem


def test_field_mapping(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"ask": "Q?", "reply": "R", "id": "k"}), json.dumps({"ask": "Q2"})])
    ds = load_samples(p, prompt_field="ask", answer_field="reply")
    assert (ds.samples[0].prompt, ds.samples[0].answer, ds.fields) == ("Q?", "R", ("ask", "reply"))
    assert "line 2 of d.jsonl: no field 'reply'" in ds.samples[1].problem
    assert "no known schema" in load_samples(p).samples[0].problem   # without the mapping
    with pytest.raises(ValueError, match="no record has the field 'answer_text'; fields seen"):
        load_samples(p, prompt_field="ask", answer_field="answer_text")
    with pytest.raises(ValueError, match="give both"):
        load_samples(p, prompt_field="ask")


# --- issue 10 item 1: a resume checks content, not names --------------------------------------------------------------

@pytest.mark.slow
def test_resume_refuses_edited_data_and_other_model_dtype_device(smollm2, tmp_path):
    import hashlib

    from tensorguard_fast.backdoor.scan import scan
    from tensorguard_fast.backdoor.scan_config import check_config

    model, tok = smollm2
    lines = [json.dumps({"id": f"s{k}", "question": f"Capital number {k}?", "answer": f"City {k}"}) for k in range(4)]
    data, out = tmp_path / "d.jsonl", tmp_path / "out"
    data.write_text("\n".join(lines) + "\n")
    scan(model, tok, str(data), str(out), batch_size=2, threshold="topk:0.25", max_len=16, progress=False)
    config = json.loads((out / "scan_config.json").read_text())
    assert config["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert (config["dtype"], config["device"], config["chat_template"]) == ("float32", "cpu", True)
    assert any(name.endswith(".safetensors") for name in config["model_files"])

    # Same path, same row count, two lines swapped: refused, naming the data digest.
    data.write_text("\n".join([lines[2], lines[1], lines[0], lines[3]]) + "\n")
    with pytest.raises(ValueError, match=r"other settings or content \(data_sha256: [0-9a-f]+\.\.\. then, "):
        scan(model, tok, str(data), str(out), batch_size=2, threshold="topk:0.25", max_len=16, progress=False)
    data.write_text("\n".join(lines) + "\n")
    scan(model, tok, str(data), str(out), batch_size=2, threshold="topk:0.5", max_len=16, progress=False)  # resumes

    for key, value, said in (("dtype", "bfloat16", "dtype: float32 then, bfloat16 now"),
                             ("device", "cuda:0", "device: cpu then, cuda:0 now"), ("crop", 4, "crop: 8 then, 4 now"),
                             ("chat_template", False, "chat_template: true then, false now"),
                             ("fields", ["ask", "reply"], "fields: null then")):
        with pytest.raises(ValueError, match=said.replace("[", r"\[")):
            check_config(str(out), {**config, key: value})
    weights = next(name for name in config["model_files"] if name.endswith(".safetensors"))
    with pytest.raises(ValueError, match=f"model_files: {weights} differ"):
        check_config(str(out), {**config, "model_files": {**config["model_files"], weights: "0" * 64}})


def test_model_rewritten_in_place_changes_its_identity(tmp_path):
    from safetensors.torch import save_file

    from tensorguard_fast.backdoor.scan_config import model_identity

    path = tmp_path / "model"
    path.mkdir()
    weights = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    save_file(weights, str(path / "model.safetensors"))
    before = model_identity(None, str(path))
    weights["w"][2, 3] += 1e-3   # same size, same names: only the content differs
    save_file(weights, str(path / "model.safetensors"))
    after = model_identity(None, str(path))
    assert set(before["model_files"]) == {"model.safetensors"} and before != after
