"""The scan end to end on SmolLM2: output files, bad samples, sharded parts, and a real scan process killed with
SIGKILL mid-run and restarted, which must end with the same files as an uninterrupted scan."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensorguard_fast.evaluation.attacks import poisoned_set
from tensorguard_fast.backdoor.datasets import load_samples
from tensorguard_fast.backdoor.outputs import finish
from tensorguard_fast.backdoor.parts import PARTS, read_part
from tensorguard_fast.backdoor.scan import scan, scan_part

ROOT = Path(__file__).resolve().parents[1]


def _dataset(tmp_path, n=10):
    records = poisoned_set("badnets", n, 0.2, seed=3)
    lines = [json.dumps(r) for r in records]
    lines.insert(3, '{"question": "broken line"')                          # unreadable
    lines.insert(5, json.dumps({"id": "empty", "question": "q", "answer": "  "}))   # no answer token
    lines.append(json.dumps({"id": "long", "question": "Say it. " * 40, "answer": "word " * 80}))  # cut by max_len
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def _outputs(out):
    return {name: (Path(out) / name).read_text() for name in ("scores.jsonl", "removed.jsonl", "clean.jsonl")}


def test_scan_writes_every_file(smollm2, tmp_path):
    model, tok = smollm2
    path, lines = _dataset(tmp_path)
    out = tmp_path / "out"
    summary = scan(model, tok, str(path), str(out), batch_size=4, score="gradsentry", threshold="topk:0.2", max_len=48,
                   progress=False)
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == len(lines)
    assert [s["id"] for s in scores][:3] == ["s0", "s1", "s2"] and scores[3]["id"] == "line:4"
    broken, empty, long = scores[3], scores[5], scores[-1]
    assert broken["flagged"] and broken["score"] is None and "unreadable line 4" in broken["reason"]
    assert empty["flagged"] and empty["score"] is None and "empty answer" in empty["reason"]
    assert "truncated: prompt" in long["reason"] and long["n_answer_tokens"] == 49   # 48 answer tokens + EOS
    flagged = (out / "removed.jsonl").read_text().splitlines()
    clean = (out / "clean.jsonl").read_text().splitlines()
    assert '{"question": "broken line"' in flagged
    assert sorted(flagged + clean) == sorted(lines)               # nothing lost, nothing duplicated
    assert len(flagged) == sum(s["flagged"] for s in scores)
    assert summary["counts"]["unscorable"] == 2
    assert summary["counts"]["truncated"] == sum("truncated" in s["reason"] for s in scores) >= 1
    assert summary["threshold"]["rule"] == "topk" and (out / "histogram.png").stat().st_size > 1000

    # Shards: two part files over disjoint index sets, merged, give the same files.
    sharded = tmp_path / "sharded"
    (sharded / PARTS).mkdir(parents=True)
    ds = load_samples(str(path), tok, max_len=48)
    for rank in range(2):
        scan_part(model, tok, ds, range(rank, len(ds), 2), str(sharded / PARTS / f"part-{rank}.jsonl"),
                  batch_size=4, progress=False)
    finish(str(sharded), ds, threshold="topk:0.2")
    for name, text in _outputs(out).items():
        got = _outputs(sharded)[name]
        if name == "scores.jsonl":   # other batches (other padding), so float32 rounding differs: compare values
            for a, b in zip(text.splitlines(), got.splitlines()):
                a, b = json.loads(a), json.loads(b)
                assert (a["id"], a["flagged"], a["score"] is None) == (b["id"], b["flagged"], b["score"] is None)
                if a["score"] is not None:
                    assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        else:
            assert got == text, name


def test_scan_refuses_other_settings_in_the_same_dir(smollm2, tmp_path):
    model, tok = smollm2
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    scan(model, tok, str(path), str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        scan(model, tok, str(path), str(tmp_path / "o"), spectrum="fft", score="fft", progress=False)


def test_read_part_drops_a_torn_last_line(tmp_path):
    p = tmp_path / "part-0.jsonl"
    p.write_text('{"index": 0}\n{"index": 1}\n{"ind')
    assert [r["index"] for r in read_part(str(p))] == [0, 1]
    assert p.read_text() == '{"index": 0}\n{"index": 1}\n'


def _cli(data, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return [sys.executable, "-m", "tensorguard_fast.cli", "scan", "--model", "bundled:smollm2", "--data", str(data),
            "--out", str(out), "--batch-size", "2", "--score", "gradsentry", "--threshold", "topk:0.2", "--no-progress",
            *extra], env


def test_killed_scan_resumes_to_the_same_files(smollm2, tmp_path):
    model, tok = smollm2
    records = poisoned_set("addsent", 12, 0.25, seed=5)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    killed = tmp_path / "killed"
    cmd, env = _cli(data, killed)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    part = killed / PARTS / "part-0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and len(part.read_bytes().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the scan ended before it could be killed: {proc.stdout.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_part(str(part)))
    assert 4 <= done < len(records) and not (killed / "scores.jsonl").exists()
    rerun = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    indices = [r["index"] for r in read_part(str(part))]
    assert sorted(indices) == list(range(len(records)))          # nothing lost, nothing done twice

    whole = tmp_path / "whole"
    scan(model, tok, str(data), str(whole), batch_size=2, score="gradsentry", threshold="topk:0.2", progress=False)
    assert _outputs(killed) == _outputs(whole)


def test_a_sample_with_nan_hidden_states_is_flagged_not_fatal(smollm2_dir, tmp_path):
    """A model whose embedding row of one token is NaN: the samples holding that token cannot be scored; they are
    flagged with the reason, the rest of the batch is scored, and the scan completes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=False)).eval()
    bad = tok(" zebra", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.get_input_embeddings().weight[bad] = float("nan")
    records = [{"id": f"r{i}", "question": f"Question {i}?" + (" zebra" if i == 3 else ""), "answer": f"Answer {i}"}
               for i in range(6)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    scan(model, tok, str(data), str(tmp_path / "o"), batch_size=6, score="gradsentry", threshold="topk:0.2",
         progress=False)
    scores = {s["id"]: s for s in map(json.loads, (tmp_path / "o" / "scores.jsonl").read_text().splitlines())}
    assert scores["r3"]["flagged"] and "could not be scored" in scores["r3"]["reason"]
    assert "NaN" in scores["r3"]["reason"] and scores["r3"]["score"] is None
    assert all(scores[f"r{i}"]["score"] is not None for i in (0, 1, 2, 4, 5))
