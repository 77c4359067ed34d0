"""Metrics against scipy and hand-computed values; the logistic fit recovers known parameters."""

import numpy as np
import pytest
from scipy import stats

from pipeline import metrics


def test_hand_example():
    target = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    pred = np.array([1.0, 3.0, 2.0, 4.0, 5.0])
    m = metrics.compute(pred, target)
    # one adjacent swap in 5: rank differences d = (0, 1, -1, 0, 0), SRCC = 1 - 6*2/(5*24) = 0.9
    assert m["srcc"] == pytest.approx(0.9)
    # 10 pairs, 1 discordant: tau = (9 - 1) / 10
    assert m["krcc"] == pytest.approx(0.8)
    assert m["plcc_raw"] == pytest.approx(0.9)  # cov 2.25 / var 2.5 on identical spreads
    assert m["n"] == 5


def test_matches_scipy_on_random_data():
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 5, 200)
    pred = target + rng.normal(0, 1, 200)
    m = metrics.compute(pred, target)
    assert m["srcc"] == pytest.approx(stats.spearmanr(pred, target).statistic, abs=1e-12)
    assert m["krcc"] == pytest.approx(stats.kendalltau(pred, target).statistic, abs=1e-12)
    assert m["plcc_raw"] == pytest.approx(stats.pearsonr(pred, target).statistic, abs=1e-12)
    beta = metrics.fit_logistic(pred, target)
    mapped = metrics.logistic4(pred, *beta)
    assert m["plcc"] == pytest.approx(stats.pearsonr(mapped, target).statistic, abs=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((mapped - target) ** 2)), abs=1e-12)
    # the fit maps onto the MOS scale, so it can only improve on raw PLCC for a monotone relation
    assert m["plcc"] >= m["plcc_raw"] - 1e-9


def test_logistic_fit_recovers_known_parameters():
    rng = np.random.default_rng(1)
    true = np.array([4.5, 0.5, 0.2, 0.7])
    x = rng.uniform(-3, 3, 500)
    y = metrics.logistic4(x, *true) + rng.normal(0, 0.01, 500)
    beta = metrics.fit_logistic(x, y)
    beta[3] = abs(beta[3])  # the curve depends on |b4| only
    np.testing.assert_allclose(beta, true, atol=0.02)


def test_logistic_makes_plcc_invariant_to_monotone_distortion():
    rng = np.random.default_rng(2)
    target = rng.uniform(0, 5, 300)
    raw = metrics.compute(target + rng.normal(0, 0.3, 300), target)
    distorted = metrics.compute(np.exp(target + rng.normal(0, 0.3, 300)), target)
    assert distorted["plcc_raw"] < raw["plcc"] - 0.1
    assert distorted["plcc"] == pytest.approx(raw["plcc"], abs=0.03)


def test_constant_prediction_does_not_crash_fit():
    target = np.linspace(0, 5, 20)
    with pytest.warns(UserWarning, match="did not converge"):
        beta = metrics.fit_logistic(np.ones(20), target)
    assert np.isnan(beta).all()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="equal length"):
        metrics.compute(np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match="at least 3"):
        metrics.compute(np.ones(2), np.ones(2))


def test_aggregate_mean_median_std():
    per_split = [{name: v for name in metrics.METRICS} for v in (0.1, 0.2, 0.6)]
    agg = metrics.aggregate(per_split)
    assert agg["srcc"]["mean"] == pytest.approx(0.3)
    assert agg["srcc"]["median"] == pytest.approx(0.2)
    assert agg["srcc"]["std"] == pytest.approx(np.std([0.1, 0.2, 0.6]))
