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
