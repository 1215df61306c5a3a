"""`tensorguard-fast scan` and the CLI conventions as a user meets them: mistakes are one-line errors (exit 2) found
before the model loads, --dry-run prints the plan, --version, --json, -v, a closed pipe, and (slow, SmolLM2) a real
scan whose KDE cannot decide exits 3 instead of flagging by a foreign constant.

Before-the-model checks are proven with a --model that exists but is no model (an empty directory): had the scan got
as far as loading it, the error would name the model, not the data or the option."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tensorguard_fast._version import __version__
from tensorguard_fast.cli import main
from tensorguard_fast.evaluation.attacks import poisoned_set, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def not_a_model(tmp_path):
    path = tmp_path / "not_a_model"
    path.mkdir()
    return str(path)


def _data(tmp_path, n=20, name="train.jsonl"):
    return write_jsonl(poisoned_set("badnets", n, 0.2, seed=1), str(tmp_path / name))


def _scan(capsys, *args):
    code = main(["scan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_schema_is_one_line_before_the_model(tmp_path, capsys, not_a_model):
    data = tmp_path / "odd.jsonl"
    data.write_text('{"query": "q", "reply": "a"}\n{"query": "q2", "reply": "a2"}\n')
    out = tmp_path / "out"
    code, _, err = _scan(capsys, "--model", not_a_model, "--data", str(data), "--out", str(out))
    line = _one_error_line(err)
    assert code == 2 and "odd.jsonl" in line and "query" in line and "reply" in line and "--prompt-field" in line
    assert not out.exists()
    # the fix the message names works: the mapping is accepted and shown in the plan
    code, plan, _ = _scan(capsys, "--model", not_a_model, "--data", str(data), "--out", str(out), "--dry-run",
                          "--prompt-field", "query", "--answer-field", "reply")
    assert code == 0 and "--prompt-field query --answer-field reply" in plan and not out.exists()


def test_missing_data_file_is_one_line_before_the_model(tmp_path, capsys, not_a_model):
    code, _, err = _scan(capsys, "--model", not_a_model, "--data", str(tmp_path / "nope.jsonl"),
                         "--out", str(tmp_path / "out"))
    assert code == 2 and "nope.jsonl" in _one_error_line(err)


def test_bad_threshold_is_rejected_before_scoring(tmp_path, capsys, not_a_model):
    data = _data(tmp_path, 4)
    for bad in ("topk:abc", "topk:1.5", "nan", "valley"):
        with pytest.raises(SystemExit) as exit_:
            main(["scan", "--model", not_a_model, "--data", data, "--out", str(tmp_path / "out"), "--threshold", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "threshold" in err and "Traceback" not in err, (bad, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys, not_a_model):
    code, _, err = _scan(capsys, "--model", not_a_model, "--data", _data(tmp_path, 4), "--out",
                         str(tmp_path / "out"), "--device", "cuda")
    line = _one_error_line(err)
    assert code == 2 and "--device cuda" in line and "--device cpu" in line


def test_output_directory_must_be_writable(tmp_path, capsys, not_a_model):
    data = _data(tmp_path, 4)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    code, _, err = _scan(capsys, "--model", not_a_model, "--data", data, "--out", str(a_file))
    assert code == 2 and "not a directory" in _one_error_line(err) and a_file.read_text() == "x"
    if os.geteuid() != 0:   # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = _scan(capsys, "--model", not_a_model, "--data", data, "--out", str(locked / "out"))
        assert code == 2 and "not writable" in _one_error_line(err)


def test_missing_local_model_path_is_not_sent_to_the_hub(tmp_path, capsys):
    code, _, err = _scan(capsys, "--model", str(tmp_path / "models" / "mine"), "--data", _data(tmp_path, 4),
                         "--out", str(tmp_path / "out"))
    assert code == 2 and "no such file or directory" in _one_error_line(err)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps({"instruction": "Add", "input": "2+2", "output": "4"}) + "\n"
                    + json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n{torn\n")
    out = tmp_path / "out"
    code, plan, err = _scan(capsys, "--model", "bundled:smollm2", "--data", str(data), "--out", str(out),
                            "--device", "cpu", "--dry-run", "--threshold", "topk:0.1")
    assert code == 0 and not out.exists(), err
    assert "jsonl, 3 rows, 1 with problems" in plan and "instruction/output (1)" in plan
    assert "question/answer (1)" in plan and "bundled:smollm2 on cpu, float32" in plan
    assert "topk:0.1" in plan and "clean.jsonl" in plan and "report.html" in plan and "line 3" in plan


def test_verbose_shows_the_traceback_of_an_error(tmp_path, capsys):
    code, _, err = _scan(capsys, "-v", "--model", "bundled:smollm2", "--data", str(tmp_path / "nope.jsonl"),
                         "--out", str(tmp_path / "out"))
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].endswith("no such dataset file")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tensorguard-fast {__version__}"


def test_json_output_parses(tmp_path, capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensorguard_fast"] == __version__ and "cpp" in info
    from lineage_models import save_tiny

    a, b = save_tiny(tmp_path / "a", seed=0), save_tiny(tmp_path / "b", seed=1)
    assert main(["classify", "--base", f"a={a}", "--method", "nearest", str(b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bases"] == ["a"] and len(report["predictions"]) == 1


def test_a_closed_pipe_ends_quietly():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tensorguard_fast.cli", "info"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # the reader (`| head`) is gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.slow
def test_real_scan_exit_codes_and_explanations(smollm2_dir, tmp_path, capsys):
    """20 fanoutqa samples on SmolLM2: the KDE cannot decide on 20 scores, so nothing is flagged by its old 0.7 and
    the scan exits 3 (0 with --allow-degenerate); the same directory resumed with top-k flags, explains, reports."""
    data = _data(tmp_path, 20)
    out = tmp_path / "out"
    common = ["--model", "bundled:smollm2", "--data", data, "--out", str(out), "--max-len", "48",
              "--batch-size", "10", "--device", "cpu", "--score", "gradsentry"]
    code, stdout, err = _scan(capsys, *common)
    summary = json.loads((out / "summary.json").read_text())
    assert code == 3 and "could not decide" in err and "--allow-degenerate" in err
    assert summary["status"] == "undecided" and summary["counts"]["flagged"] == 0
    assert len((out / "clean.jsonl").read_text().splitlines()) == 20
    assert _scan(capsys, *common, "--allow-degenerate")[0] == 0

    code, stdout, err = _scan(capsys, *common, "--threshold", "topk:0.2")
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and "4 of 20 samples flagged" in stdout, err
    assert summary["status"] == "flagged" and len(summary["flagged_ids"]) == 4
    assert summary["version"] == __version__ and summary["inputs"]["data_sha256"]
    assert summary["score_statistics"]["n"] == 20
    flagged = [json.loads(x) for x in (out / "flagged.jsonl").read_text().splitlines()]
    assert [f["id"] for f in flagged] == summary["flagged_ids"]
    assert all(f["components"] and f["line"] and "top 4" in f["reason"] for f in flagged)
    report = (out / "report.html").read_text()
    assert all(f">{i}<" in report for i in summary["flagged_ids"])


def test_torchrun_entry_reports_a_missing_file_in_one_line(tmp_path, not_a_model):
    """`-m tensorguard_fast.backdoor` (what torchrun runs on every rank) answers a user's mistake as the CLI does."""
    proc = subprocess.run([sys.executable, "-m", "tensorguard_fast.backdoor", "--model", not_a_model, "--data",
                           str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "nope.jsonl" in _one_error_line(proc.stderr)
    assert not (tmp_path / "out").exists()
