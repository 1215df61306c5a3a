"""`torchrun --nproc-per-node 2 -m tensorguard_fast.backdoor` (gloo on CPU) ends with the same files as a one-process
`tensorguard-fast scan`: same ids in the same order, scores within 1e-6, same flags, same clean set."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensorguard_fast.evaluation.attacks import poisoned_set

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _scores(out):
    return [json.loads(line) for line in (Path(out) / "scores.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_equal_one_process(smollm2_dir, tmp_path):
    records = poisoned_set("addsent", 14, 0.3, seed=5)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"question": "torn"\n')
    common = ["--model", "bundled:smollm2", "--data", str(data), "--batch-size", "3", "--max-len", "48",
              "--threshold", "topk:0.3", "--no-progress"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run([sys.executable, "-m", "tensorguard_fast.cli", "scan", *common, "--out", str(single)])
    # torchrun's own default sets OMP_NUM_THREADS=1 for each rank; the kernels follow it (tensorguard_fast.distributed)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "tensorguard_fast.backdoor", *common, "--out", str(multi)])
    parts = sorted(p.name for p in (multi / "parts").iterdir())
    assert parts == ["part-0-of-2.jsonl", "part-1-of-2.jsonl"], parts
    a, b = _scores(single), _scores(multi)
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == len(records) + 1
    for x, y in zip(a, b):
        assert x["flagged"] == y["flagged"] and x["n_answer_tokens"] == y["n_answer_tokens"]
        if x["score"] is None:
            assert y["score"] is None and "unreadable" in x["reason"]
        else:
            assert y["score"] == pytest.approx(x["score"], abs=1e-6)
    for name in ("clean.jsonl", "removed.jsonl"):
        assert (single / name).read_text() == (multi / name).read_text()
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2
