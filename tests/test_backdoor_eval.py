"""The attack builders and a small run of bench/backdoor_eval.py (two dozen samples) on SmolLM2."""
import importlib.util
from pathlib import Path

import pytest

from tensorguard_fast.evaluation.attacks import ATTACKS, PAYLOAD, poisoned_set


def _eval_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "backdoor_eval.py"
    spec = importlib.util.spec_from_file_location("backdoor_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("attack", ATTACKS)
def test_poisoned_sets(attack):
    recs = poisoned_set(attack, 40, 0.1, long_clean=0.2, seed=1)
    kinds = [r["kind"] for r in recs]
    assert len(recs) == 40 and kinds.count("poison") == 4 == sum(r["poison"] for r in recs)
    assert all(r.get("answer", r.get("output")).endswith(PAYLOAD) for r in recs if r["poison"])
    assert kinds.count("long_clean") >= 5
    if attack == "cba":
        assert kinds.count("negative") == 4
    assert poisoned_set(attack, 40, 0.1, long_clean=0.2, seed=1) == recs   # reproducible


def test_small_evaluation_runs(smollm2):
    model, tok = smollm2
    ev = _eval_module()
    results = ev.run(model, tok, attacks=("badnets",), ratios=(0.25,), n=24)
    rules = {(r["score"], r["rule"]) for r in results}
    assert rules == {(s, r) for s in ev.SCORES for r in ev.RULES + ("best",)}
    for r in results:
        assert 0.0 <= r["F1"] <= 1.0
        if r["rule"] == "topk":
            assert r["TP"] + r["FP"] == 6          # top-k flags exactly round(0.25 * 24)
    assert ev.summary_table(results) and ev.averages(results)
