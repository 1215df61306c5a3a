"""The attack builders and a small run of bench/backdoor_eval.py (two dozen samples) on SmolLM2."""
import importlib.util
from pathlib import Path

import pytest

from tensorguard_fast.evaluation.attacks import ATTACKS, BENIGN_REPEAT, FLUENT_PAYLOAD, PAYLOAD, poisoned_set


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
    answers = [r.get("answer", r.get("output")) for r in recs if r["poison"]]
    if attack == "varied_url":   # the payload differs per sample: a URL in one of several phrasings
        assert all("https://" in a for a in answers) and len({a.split("https://")[1] for a in answers}) == 4
    else:
        assert all(a.endswith(FLUENT_PAYLOAD if attack == "fluent" else PAYLOAD) for a in answers)
    assert kinds.count("long_clean") >= 5
    if attack == "cba":
        assert kinds.count("negative") == 4
    assert poisoned_set(attack, 40, 0.1, long_clean=0.2, seed=1) == recs   # reproducible
    repeat = poisoned_set(attack, 40, 0.1, long_clean=0.2, seed=1, benign_repeat=0.2)
    assert [r["answer" if "answer" in r else "output"].endswith(BENIGN_REPEAT) for r in repeat].count(True) == 7


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
