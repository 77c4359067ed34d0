"""IQA metrics, the 4-parameter logistic mapping, and aggregation over splits.

Conventions follow the two papers (methods.md §7): SRCC and KRCC (tau-b) on raw predictions;
PLCC both raw (IP-IQA) and after the VQEG 4-parameter logistic fit (MA-AGIQA); RMSE after the
fit, in MOS units. Correlations come from scipy.stats; the fit from scipy.optimize.curve_fit.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import optimize, stats

METRICS = ("srcc", "krcc", "plcc", "plcc_raw", "rmse")


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """``b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))``: MA-AGIQA's `performance_fit` curve."""
    z = np.clip(-(x - b3) / np.abs(b4), -500.0, 500.0)
    return b2 + (b1 - b2) / (1.0 + np.exp(z))


def fit_logistic(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Fit ``logistic4`` mapping predictions to MOS, from MA-AGIQA's starting point.

    p0 = [max(target), min(target), mean(pred), 0.5], Levenberg-Marquardt, no bounds. If the fit
    fails, NaNs are returned and ``map_logistic`` leaves predictions raw (with a warning), so a
    degenerate split (e.g. an untrained model's constant output) never aborts an evaluation.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    p0 = [target.max(), target.min(), pred.mean(), 0.5]
    if np.ptp(pred) == 0:
        warnings.warn("constant predictions: the 4-parameter logistic fit did not converge", stacklevel=2)
        return np.full(4, np.nan)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            beta, _ = optimize.curve_fit(logistic4, pred, target, p0=p0, maxfev=100_000)
        if np.all(np.isfinite(beta)):
            return beta
    except RuntimeError:
        pass
    warnings.warn(
        "4-parameter logistic fit did not converge; PLCC/RMSE use the raw predictions", stacklevel=2
    )
    return np.full(4, np.nan)


def map_logistic(pred: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Apply a fitted logistic; a failed fit (NaN beta) leaves predictions as they are."""
    return np.asarray(pred, dtype=np.float64) if np.isnan(beta).any() else logistic4(np.asarray(pred), *beta)


def compute(pred: np.ndarray, target: np.ndarray, beta: np.ndarray | None = None) -> dict[str, float]:
    """All metrics of one prediction set; ``beta`` reuses a logistic fitted elsewhere (cross-dataset)."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 1:
        raise ValueError(f"pred and target must be 1-D of equal length, got {pred.shape} and {target.shape}")
    if len(pred) < 3:
        raise ValueError(f"need at least 3 images to compute correlations, got {len(pred)}")
    if beta is None:
        beta = fit_logistic(pred, target)
    mapped = map_logistic(pred, beta)
    return {
        "srcc": float(stats.spearmanr(pred, target).statistic),
        "krcc": float(stats.kendalltau(pred, target).statistic),
        "plcc": float(stats.pearsonr(mapped, target).statistic),
        "plcc_raw": float(stats.pearsonr(pred, target).statistic),
        "rmse": float(np.sqrt(np.mean((mapped - target) ** 2))),
        "n": len(pred),
    }


def aggregate(per_split: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, median and std (population, as numpy) of each metric over splits."""
    out: dict[str, dict[str, float]] = {}
    for name in METRICS:
        values = np.array([m[name] for m in per_split], dtype=np.float64)
        out[name] = {
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "std": float(values.std()),
        }
    return out
