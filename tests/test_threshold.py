"""Thresholds: GradSentry's KDE valley rule (checked against scikit-learn's KernelDensity, which the original uses)
and the robust alternatives."""
import numpy as np
import pytest

from tensorguard_fast.backdoor.threshold import (choose_threshold, gmm_threshold, kde_valley_threshold, mad_threshold,
                                        otsu_threshold, parse_threshold, topk_threshold)


def _bimodal(n_clean=180, n_poison=20, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.45, 0.06, n_clean), rng.normal(0.85, 0.03, n_poison)])


def _sklearn_valley(x, grid_points=1000):
    """The valley as GradSentry computes it, with sklearn's KernelDensity (no fallbacks: the data here passes them)."""
    from scipy.signal import find_peaks
    from sklearn.neighbors import KernelDensity

    bw = 1.06 * x.std(ddof=1) * x.size ** (-0.2)
    grid = np.linspace(x.min() - 1e-6, x.max() + 1e-6, grid_points).reshape(-1, 1)
    dens = np.exp(KernelDensity(bandwidth=bw, kernel="gaussian").fit(x.reshape(-1, 1)).score_samples(grid))
    peaks = list(find_peaks(dens, prominence=0.01 * dens.max())[0])
    at = grid[peaks].ravel()
    left, right = peaks[int(np.argmin(np.abs(at)))], peaks[int(np.argmin(np.abs(at - 1)))]
    left, right = min(left, right), max(left, right)
    return float(grid[left + int(np.argmin(dens[left:right + 1]))][0])


def test_kde_valley_matches_sklearn_and_separates():
    x = _bimodal()
    th = kde_valley_threshold(x)
    assert th.rule == "kde" and not th.reason.startswith("fallback"), th.reason
    assert th.value == pytest.approx(_sklearn_valley(x), abs=1e-9)
    assert 0.6 < th.value < 0.8
    assert th.flags(x)[-20:].all() and not th.flags(x)[:180].any()


@pytest.mark.parametrize("scores, why", [
    (np.linspace(0.2, 0.8, 29), "only 29"),                                      # n < 30
    (np.full(50, 0.5), "equal"),                                                 # no spread
    (np.random.default_rng(1).normal(0.5, 0.05, 300), "no two groups"),          # unimodal
    (np.concatenate([np.random.default_rng(2).normal(0.4, 0.03, 300), [0.89, 0.9, 0.91, 1.2]]), "only 4 samples"),  # < 5 above
    (np.concatenate([np.random.default_rng(3).normal(0.40, 0.02, 200),
                     np.random.default_rng(4).normal(0.50, 0.02, 200)]), "< 0.15"),  # peaks too close
])
def test_kde_valley_fallbacks(scores, why):
    th = kde_valley_threshold(scores)
    assert th.value == 0.7 and th.reason.startswith("fallback") and why in th.reason, th.reason


def test_kde_ignores_nan():
    x = np.concatenate([_bimodal(), [np.nan, np.nan]])
    assert kde_valley_threshold(x).value == pytest.approx(kde_valley_threshold(_bimodal()).value)


def test_other_rules_separate_a_clear_mixture():
    x = _bimodal()
    truth = np.arange(x.size) >= 180
    for th in (otsu_threshold(x), gmm_threshold(x), mad_threshold(x), topk_threshold(x, 0.1)):
        flags = th.flags(x)
        assert (flags == truth).mean() >= 0.98, (th.rule, th.value)


def test_topk_counts_and_edges():
    x = np.arange(10, dtype=float)
    assert topk_threshold(x, 0.3).flags(x).sum() == 3
    assert topk_threshold(x, 0.0).flags(x).sum() == 0
    assert topk_threshold(x, 1.0).flags(x).sum() == 10
    with pytest.raises(ValueError):
        topk_threshold(x, 1.5)


def test_choose_and_parse():
    assert parse_threshold("topk:0.05") == ("topk", 0.05)
    assert choose_threshold([0.1, 0.9], "0.5").value == 0.5
    with pytest.raises(ValueError, match="ratio"):
        choose_threshold([0.1, 0.9], "topk")
    with pytest.raises(ValueError, match="threshold"):
        choose_threshold([0.1, 0.9], "median-ish")


# --- issue 10 item 2: top-k by rank, thresholds and crops refused before scoring ------------------------------------

def test_topk_flags_exactly_k_on_ties_earlier_first():
    # The case: 9 identical copies of one poisoned sample among 40 rows, topk:0.1 -> 4 flagged, not 1.
    x = np.concatenate([np.linspace(0.2, 0.5, 31), np.full(9, 0.84)])
    x[5] = 0.9   # one clean sample above them
    th = topk_threshold(x, 0.1)
    flags = th.flags(x)
    assert flags.sum() == 4 and th.k == 4
    assert flags[5] and flags[31:34].all() and not flags[34:].any()   # ties: the earlier copies first
    assert th.details["tied_unflagged"] == 6 and "6 more tie the cut" in th.reason
    assert "ties the top-4 cut" in th.explain(0.84, False) and "top 4" in th.explain(0.84, True)
    # NaN (unscorable) samples are never flagged and do not count.
    y = np.concatenate([[np.nan, np.nan], np.full(10, 0.5)])
    assert topk_threshold(y[np.isfinite(y)], 0.3).flags(y).tolist() == [False] * 2 + [True] * 3 + [False] * 7
    every = topk_threshold(np.full(10, 0.5), 1.0)
    assert every.flags(np.full(10, 0.5)).all()


@pytest.mark.parametrize("text, why", [
    ("nan", "finite"), ("inf", "finite"), ("-inf", "finite"), ("NaN", "finite"), ("median", "use one of"),
    ("", "use one of"), ("topk", "needs the poison ratio"), ("topk:", "not a number"), ("topk:x", "not a number"),
    ("topk:nan", r"\[0, 1\]"), ("topk:1.5", r"\[0, 1\]"), ("topk:-0.1", r"\[0, 1\]"),
])
def test_bad_thresholds_are_refused_in_one_line(text, why):
    with pytest.raises(ValueError, match=why) as err:
        parse_threshold(text)
    assert "\n" not in str(err.value)
    if why == "finite":   # the API refuses it too, not only the command line
        with pytest.raises(ValueError, match="finite"):
            choose_threshold([0.1, 0.9], text)


def test_threshold_option_is_checked_when_the_arguments_are_parsed(capsys):
    from tensorguard_fast.backdoor.command import scan_parser

    with pytest.raises(SystemExit) as exit_:
        scan_parser().parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o", "--threshold", "nan"])
    assert exit_.value.code == 2 and "a fixed threshold must be a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scan_parser().parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o", "--crop", "0"])
    args = scan_parser().parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o", "--threshold", "topk:0.1",
                                     "--prompt-field", "ask", "--answer-field", "reply"])
    assert (args.threshold, args.prompt_field, args.answer_field) == ("topk:0.1", "ask", "reply")


def test_a_crop_beyond_the_lm_head_is_an_error():
    import torch

    from tensorguard_fast.ops.fft_entropy import fft_entropy_from_hidden
    from tensorguard_fast.ops.gram_entropy import gram_spectrum_from_hidden

    hidden, weight = torch.randn(1, 4, 16), torch.randn(64, 16)
    targets = torch.tensor([[-100, 3, 5, 7]])
    gram_spectrum_from_hidden(hidden, weight, targets, crop=16)   # keeps 4 rows and 1 column: fine
    for op in (gram_spectrum_from_hidden, fft_entropy_from_hidden):
        with pytest.raises(ValueError, match="crop 17 leaves no gradient to score: the lm_head is 64 x 16"):
            op(hidden, weight, targets, crop=17)
