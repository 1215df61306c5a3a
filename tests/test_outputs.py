"""outputs.finish renders a Decision from real part files (the raw rows a scan appends) and a real dataset file,
without a model: the undecided KDE, explanations, summary fields, report.html, the 2-D plot and the exit codes of
degenerate outcomes."""
import json
import os

import numpy as np
import pytest

from tensorguard_fast._version import __version__
from tensorguard_fast.backdoor.command import DEGENERATE_EXIT, degenerate_reason, report_outcome
from tensorguard_fast.backdoor.datasets import load_samples
from tensorguard_fast.backdoor.decision import Decision, threshold_decision
from tensorguard_fast.backdoor.outputs import finish
from tensorguard_fast.backdoor.parts import PARTS


def _svals(level: float, n: int = 16) -> list:
    """Singular values whose GradSentry entropy grows with `level` in (0, 1]: a flat spectrum scores near 1."""
    return sorted((level ** k for k in range(n)), reverse=True)


def _scan_dir(tmp_path, levels, extra_lines=(), top_tokens=None):
    """A JSONL dataset with one record per level (plus raw extra lines) and the part file a scan would write."""
    lines = [json.dumps({"question": f"q{i} <b>&", "answer": f"answer {i}"}) for i in range(len(levels))]
    lines += list(extra_lines)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    dataset = load_samples(str(data))
    out = tmp_path / "out"
    (out / PARTS).mkdir(parents=True)
    rows = []
    for s in dataset.samples:
        if s.problem:
            continue
        row = {"index": s.index, "n_answer_tokens": 16, "svals": _svals(levels[s.index]), "fft": None}
        if top_tokens:
            row["top_tokens"] = top_tokens
        rows.append(json.dumps(row))
    (out / PARTS / "part-0.jsonl").write_text("\n".join(rows) + "\n")
    return dataset, out, lines


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kde_without_a_valley_flags_nothing_and_says_why(tmp_path):
    # One tight group of high scores (all above the KDE's old fallback 0.7): that fallback flagged every sample.
    levels = list(np.linspace(0.80, 0.86, 40))
    dataset, out, _ = _scan_dir(tmp_path, levels)
    summary = finish(str(out), dataset, threshold="kde")
    scores = _read_jsonl(out / "scores.jsonl")
    assert min(s["score"] for s in scores) > 0.7          # the old constant would have flagged all 40
    assert summary["status"] == "undecided" and summary["counts"]["flagged"] == 0
    assert summary["threshold"]["value"] is None and "peak" in summary["decision"]["why"]
    assert "could not decide" in summary["outcome"]
    assert all(not s["flagged"] and "could not decide" in s["reason"] for s in scores)
    assert len(summary["decision"]["density"]["x"]) == len(summary["decision"]["density"]["y"]) > 10
    assert degenerate_reason(summary) is not None
    assert report_outcome(summary, str(out)) == DEGENERATE_EXIT
    assert report_outcome(summary, str(out), allow_degenerate=True) == 0


def test_flagged_samples_are_explained_everywhere(tmp_path):
    levels = [0.3] * 30 + [0.95] * 6
    top = [["click", 2.5], [" https", 1.25], ["!", 0.5]]
    dataset, out, lines = _scan_dir(tmp_path, levels, extra_lines=['{"question": "torn'], top_tokens=top)
    (out / "scan_config.json").write_text(json.dumps({"data_sha256": dataset.digest, "crop": 8}))
    summary = finish(str(out), dataset, threshold="topk:0.15")

    scores = _read_jsonl(out / "scores.jsonl")
    assert len(scores) == len(lines)
    first = scores[0]
    assert first["id"] is not None and first["line"] == 1 and first["components"] == {"gradsentry": first["score"]}
    assert first["top_tokens"] == top
    flagged = _read_jsonl(out / "flagged.jsonl")
    assert [f["index"] for f in flagged] == [s["index"] for s in scores if s["flagged"]]
    torn = flagged[-1]
    assert torn["line"] == len(lines) and torn["score"] is None and "unreadable" in torn["reason"]
    assert torn["input"] == '{"question": "torn'
    assert all("top" in f["reason"] for f in flagged[:-1]) and flagged[0]["input"]["answer"].startswith("answer")
    # clean + removed is the input, row for row, in the input's own format
    clean = (out / "clean.jsonl").read_text().splitlines()
    removed = (out / "removed.jsonl").read_text().splitlines()
    assert sorted(clean + removed) == sorted(lines) and len(removed) == len(flagged)

    assert summary["version"] == __version__ and summary["status"] == "flagged"
    assert summary["flagged_ids"] == [f["id"] for f in flagged]
    stats = summary["score_statistics"]
    assert stats["n"] == 36 and stats["min"] <= stats["q25"] <= stats["median"] <= stats["q75"] <= stats["max"]
    assert summary["inputs"] == {"data_sha256": dataset.digest}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["flagged_ids"] == summary["flagged_ids"] and on_disk["status"] == "flagged"

    report = (out / "report.html").read_text()
    assert all(str(f["id"]) in report for f in flagged)
    assert "q30 &lt;b&gt;&amp;" in report and "<b>&" not in report   # the samples' text is escaped
    assert report.count("data:image/png;base64,") == 1 and "click" in report
    assert (out / "histogram.png").stat().st_size > 1000 and not (out / "scatter.png").exists()
    assert report_outcome(summary, str(out)) == 0


def test_everything_flagged_or_nothing_scored_is_degenerate(tmp_path):
    dataset, out, _ = _scan_dir(tmp_path, [0.5] * 8)
    summary = finish(str(out), dataset, threshold="0.0")
    assert summary["counts"]["clean"] == 0 and "clean set is empty" in degenerate_reason(summary)
    assert report_outcome(summary, str(out)) == DEGENERATE_EXIT

    data = tmp_path / "unreadable.jsonl"
    data.write_text("{oops\n[1, 2\n")
    dataset = load_samples(str(data))
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = finish(str(empty), dataset)
    assert summary["counts"]["scored"] == 0 and summary["score_statistics"] is None
    assert "could be scored" in degenerate_reason(summary)


def test_a_rule_with_two_components_gets_a_scatter_plot(tmp_path):
    levels = [0.3] * 20 + [0.95] * 4
    dataset, out, _ = _scan_dir(tmp_path, levels)

    def decide(rows, ds):   # a two-component rule: the GradSentry decision plus a second named number
        base = threshold_decision(rows, ds, "gradsentry", "svd", "topk:0.2")
        components = [{**c, "rank": float(i)} if c else {} for i, c in enumerate(base.components)]
        return Decision(base.values, "gradsentry", base.flagged, base.reasons, base.status, base.summary,
                        components, base.threshold, plot_axes=("gradsentry", "rank"))

    summary = finish(str(out), dataset, decide=decide)
    assert summary["counts"]["flagged"] == 5
    assert (out / "scatter.png").stat().st_size > 1000
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2


@pytest.mark.parametrize("threshold", ["mad", "otsu"])
def test_no_poison_found_says_so_with_evidence(tmp_path, threshold):
    dataset, out, _ = _scan_dir(tmp_path, [0.5] * 12)
    summary = finish(str(out), dataset, threshold=threshold)
    assert summary["status"] == "no_poison_found" and summary["counts"]["flagged"] == 0
    assert summary["outcome"].startswith("no poison found") and "highest" in summary["outcome"]
    assert os.path.exists(out / "report.html")


def test_association_decision_reads_the_stored_sketches_in_sample_order():
    """The decision decodes each row's float16 sketch into one array (no float32 copy of the whole set): the flags
    are associate()'s on the same sketches, whatever order the rows came in, and unscorable rows stay out."""
    from tensorguard_fast.backdoor.association import associate
    from tensorguard_fast.backdoor.datasets import Dataset, Sample
    from tensorguard_fast.backdoor.decision import association_decision
    from tensorguard_fast.backdoor.features import encode

    rng = np.random.default_rng(3)
    n, trigger = 240, 60_000
    x = rng.standard_normal((n, 256)).astype(np.float16)
    prompts = [list(rng.integers(0, 3000, size=10)) for _ in range(n)]
    poisoned = rng.choice(n - 1, 24, replace=False)
    x[poisoned] += (2.0 * rng.standard_normal(256)).astype(np.float16)
    for i in poisoned:
        prompts[i].append(trigger)
    levels = rng.uniform(0.2, 0.4, n)
    levels[poisoned] += 0.3
    rows = [{"index": i, "n_answer_tokens": 16, "svals": _svals(levels[i]), "fft": None, "sketch": encode(x[i])}
            for i in range(n)]
    rows[-1] = None                                   # a sample that could not be scored
    answers = [list(rng.integers(100, 3000, size=6)) + ([70_001, 70_002, 70_003] if i in poisoned else []) + [2]
               for i in range(n)]   # the poisoned answers share the payload's tokens
    dataset = Dataset("<test>", "jsonl", [Sample(i, i, None, {}, prompt_ids=p, answer_ids=a)
                                          for i, (p, a) in enumerate(zip(prompts, answers))])
    decision = association_decision(rows, dataset)
    entropy = decision.values[:-1]
    expected = associate(x[:-1].astype(np.float32), prompts[:-1], entropy, answer_ids=answers[:-1]).flagged
    assert expected.sum() == 24 and (decision.flagged[:-1] == expected).all() and not decision.flagged[-1]
    cluster = decision.summary["clusters"][0]
    assert decision.status == "flagged" and cluster["trigger_tokens"] == [trigger] and cluster["shared_text"] == 1.0
    assert cluster["shared_answer_tokens"] in ([70_001, 70_002, 70_003], [70_002, 70_003, 2])
    rows[5]["sketch"] = encode(x[5, :128])             # a part from a scan with other sketch settings
    with pytest.raises(ValueError, match="sample 5's stored sketch has 128 values where sample 0's has 256"):
        association_decision(rows, dataset)
