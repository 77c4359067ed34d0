"""A run's test predictions -> per-split metrics with bootstrap intervals, a summary, per-group tables.

Intervals are percentile bootstraps at ``confidence`` (default 95%), two kinds (methods.md §6):

- **over images**: within each split, paired resamples of the test images
  (``scipy.stats.bootstrap``). The 4-parameter logistic is fitted once on the split's test part and
  held fixed across resamples (refitting it per resample costs a curve fit each and moves PLCC by
  little). KRCC gets no interval: it is quadratic in the number of images per resample. The mean
  over splits gets the interval of the mean of the per-split resamples (splits resampled
  independently), so a one-split protocol (MA-AGIQA's) has an interval too.
- **over splits**: resamples of the k per-split values (k >= 2). Splits of one protocol share
  images, so read it as the spread a new draw of splits would show, not as an independent-sample
  guarantee.

Per-group metrics (generator, variant) use the logistic of the whole split, so a group is scored
with the calibration the model has on that test part, then averaged over the splits where the
group has at least ``MIN_GROUP`` test images. The worst group is the one with the lowest mean SRCC.
Every output (quality, and alignment where it is labelled) is treated the same way.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline import metrics
from pipeline.runs import read_record

CI_METRICS = ("srcc", "plcc", "plcc_raw", "rmse")
GROUP_COLUMNS = ("generator", "variant")
MIN_GROUP = 3


@dataclass(frozen=True)
class Bootstrap:
    """The ``evaluate`` params: resamples per interval (0: no intervals), level, seed.

    Every split is resampled from the same seed, so two runs tested on the same split see the same
    resampled image sets (their intervals differ only by the models).
    """

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 0:
            raise ValueError(f"evaluate.bootstrap must be >= 0, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"evaluate.confidence must be in (0, 1), got {self.confidence}")


@dataclass
class Evaluation:
    """``per_split``: one row per output and split; ``summary``: output -> metric -> statistic;
    ``groups``: one row per output, grouping column and group (means over splits)."""

    per_split: pd.DataFrame
    summary: dict
    groups: pd.DataFrame


def _pearson(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.mean(axis=axis, keepdims=True)
    y = y - y.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(axis=axis) / np.sqrt((x * x).sum(axis=axis) * (y * y).sum(axis=axis))


def resampled_metrics(pred: np.ndarray, mapped: np.ndarray, target: np.ndarray, axis: int = -1) -> np.ndarray:
    """``CI_METRICS`` along ``axis``, vectorised over the other axes (scipy's resample batches).

    SRCC is Pearson's r of average ranks (what ``scipy.stats.spearmanr`` computes); PLCC and RMSE use
    the logistic-mapped predictions ``mapped``, raw PLCC the predictions themselves.
    """
    srcc = _pearson(stats.rankdata(pred, axis=axis), stats.rankdata(target, axis=axis), axis)
    rmse = np.sqrt(np.mean((mapped - target) ** 2, axis=axis))
    return np.stack([srcc, _pearson(mapped, target, axis), _pearson(pred, target, axis), rmse])


def bootstrap_images(
    pred: np.ndarray, mapped: np.ndarray, target: np.ndarray, boot: Bootstrap, stream: int = 0
) -> np.ndarray:
    """Resampled ``CI_METRICS`` of one split, shape ``(len(CI_METRICS), boot.resamples)``.

    ``stream`` (the split index) seeds the draws together with ``boot.seed``: independent across
    splits, identical for every run on the same split.
    """
    with warnings.catch_warnings():  # scipy's own interval is unused; NaN replicates are handled below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            (pred, mapped, target),
            resampled_metrics,
            paired=True,
            vectorized=True,
            n_resamples=boot.resamples,
            method="percentile",
            rng=np.random.default_rng([boot.seed, stream]),
        )
    return result.bootstrap_distribution


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile bounds along the last axis.

    Replicates where a metric is undefined (NaN: a resample whose predictions, or logistic-mapped
    predictions, are constant) are left out; a metric undefined in every replicate gets NaN bounds.
    """
    tail = 50 * (1 - confidence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        lo, hi = np.nanpercentile(replicates, [tail, 100 - tail], axis=-1)
    return lo, hi


def bootstrap_splits(values: np.ndarray, boot: Bootstrap) -> np.ndarray:
    """Resampled means over splits of ``values`` (k splits x metrics), shape ``(metrics, resamples)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            (values,),
            np.mean,
            axis=0,
            vectorized=True,
            n_resamples=boot.resamples,
            method="percentile",
            rng=np.random.default_rng(boot.seed),
        )
    return result.bootstrap_distribution


def _group_rows(test: pd.DataFrame, betas: dict[int, np.ndarray]) -> pd.DataFrame:
    """Metrics of every (split, grouping column, group) with at least MIN_GROUP images."""
    rows = []
    for by in GROUP_COLUMNS:
        if test[by].nunique() < 2:  # one group (e.g. AIGCQA-20k has no variants): nothing to break down
            continue
        for (split, group), part in test.groupby(["split", by], sort=True):
            if len(part) < MIN_GROUP:
                continue
            with warnings.catch_warnings():  # small groups may have (near-)constant MOS or mapped scores
                warnings.simplefilter("ignore", stats.DegenerateDataWarning)
                row = metrics.compute(part["pred"], part["target"], beta=betas[split])
            rows.append({"by": by, "group": group, "split": split, **row})
    return pd.DataFrame(rows, columns=["by", "group", "split", *metrics.METRICS, "n"])


def group_table(test: pd.DataFrame, betas: dict[int, np.ndarray]) -> pd.DataFrame:
    """Per-group means over splits: by, group, n_images (summed over splits), n_splits, metrics."""
    rows = _group_rows(test, betas)
    table = rows.groupby(["by", "group"], sort=False).agg(
        n_images=("n", "sum"), n_splits=("split", "nunique"), **{m: (m, "mean") for m in metrics.METRICS}
    )
    return table.reset_index()


def worst_groups(table: pd.DataFrame) -> dict[str, dict]:
    """For each grouping column, the group with the lowest mean SRCC (ties: the first by name)."""
    worst = {}
    for by, part in table.dropna(subset=["srcc"]).groupby("by"):
        row = part.sort_values(["srcc", "group"]).iloc[0]
        worst[by] = {"group": row["group"], "srcc": float(row["srcc"]), "n_images": int(row["n_images"])}
    return worst


def evaluate_output(test: pd.DataFrame, boot: Bootstrap) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """One output's test rows (split, pred, target, generator, variant) -> per-split, summary, groups."""
    rows, replicates, betas = [], [], {}
    for split, part in test.groupby("split", sort=True):
        pred, target = part["pred"].to_numpy(np.float64), part["target"].to_numpy(np.float64)
        betas[split] = metrics.fit_logistic(pred, target)
        row = {"split": split, **metrics.compute(pred, target, beta=betas[split])}
        if boot.resamples:
            mapped = metrics.map_logistic(pred, betas[split])
            replicates.append(bootstrap_images(pred, mapped, target, boot, stream=int(split)))
            lo, hi = percentile_interval(replicates[-1], boot.confidence)
            for m, low, high in zip(CI_METRICS, lo, hi, strict=True):
                row[f"{m}_lo"], row[f"{m}_hi"] = float(low), float(high)
        rows.append(row)
    per_split = pd.DataFrame(rows)
    summary = metrics.aggregate(rows)
    if boot.resamples:
        lo, hi = percentile_interval(np.mean(replicates, axis=0), boot.confidence)
        for i, m in enumerate(CI_METRICS):
            summary[m] |= {"lo": float(lo[i]), "hi": float(hi[i])}
        if len(rows) >= 2:
            values = per_split[list(CI_METRICS)].to_numpy(np.float64)
            lo, hi = percentile_interval(bootstrap_splits(values, boot), boot.confidence)
            for i, m in enumerate(CI_METRICS):
                summary[m] |= {"splits_lo": float(lo[i]), "splits_hi": float(hi[i])}
    groups = group_table(test, betas)
    summary["worst"] = worst_groups(groups)
    return per_split, summary, groups


def check_finite_predictions(predictions: pd.DataFrame, outputs: list[str], source: str) -> None:
    """Refuse NaN or infinite predictions, naming ``source``, the splits and the first images."""
    values = predictions[[f"pred_{o}" for o in outputs]].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        rows = predictions[bad]
        raise ValueError(
            f"{source}: {int(bad.sum())} non-finite predictions in split(s) {sorted(set(rows['split']))}, "
            f"images {rows['image_id'].head(5).tolist()}; retrain that run (its head diverged)"
        )


def evaluate_predictions(
    predictions: pd.DataFrame,
    manifest: pd.DataFrame,
    outputs: list[str],
    boot: Bootstrap,
    source: str = "predictions",
) -> Evaluation:
    """Test-part predictions (predictions.csv layout) joined to the manifest's generator and variant.

    Outputs without a label in ``manifest`` (alignment on AIGCQA-20k) are skipped, so a cross-dataset
    run trained with alignment is scored on what the target set labels. ``source`` names the
    predictions in errors.
    """
    check_finite_predictions(predictions, outputs, source)
    test = predictions[predictions["part"] == "test"]
    groups = manifest.set_index("image_id")[list(GROUP_COLUMNS)]
    unknown = sorted(set(test["image_id"]) - set(groups.index))
    if unknown:
        raise ValueError(f"predictions name {len(unknown)} image ids not in the manifest, e.g. {unknown[:5]}")
    test = test.join(groups, on="image_id")
    per_split, summary, tables = [], {}, []
    for output in outputs:
        frame = test.rename(columns={f"pred_{output}": "pred", f"target_{output}": "target"})
        frame = frame[["split", "image_id", "pred", "target", *GROUP_COLUMNS]].dropna(subset=["target"])
        if frame.empty:
            continue
        rows, summary[output], table = evaluate_output(frame, boot)
        per_split.append(rows.assign(output=output))
        tables.append(table.assign(output=output))
    first = ["output", "split"]
    per_split_frame = pd.concat(per_split, ignore_index=True)
    per_split_frame = per_split_frame[first + [c for c in per_split_frame if c not in first]]
    groups_frame = pd.concat(tables, ignore_index=True)
    groups_frame = groups_frame[["output"] + [c for c in groups_frame if c != "output"]]
    return Evaluation(per_split_frame, summary, groups_frame)


def bootstrap_config(cfg: dict) -> Bootstrap:
    return Bootstrap(resamples=cfg["bootstrap"], confidence=cfg["confidence"], seed=cfg["seed"])


def evaluate_run(
    run_dir: Path, manifest: pd.DataFrame, boot: Bootstrap
) -> tuple[dict, Evaluation, pd.DataFrame]:
    """A run folder (run.json + predictions.csv) -> its summary (with protocol and selection), tables
    and the predictions themselves (read once, for the plot files)."""
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir}/run.json missing: run `dvc repro` for the stage that writes it")
    meta = read_record(run_dir)
    pred = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str})
    result = evaluate_predictions(
        pred, manifest, meta["head"]["outputs"], boot, source=str(run_dir / "predictions.csv")
    )
    summary = {
        **result.summary,
        "n_splits": int(result.per_split["split"].nunique()),
        "select": meta["select"],
        "protocol": meta["protocol"],
        "protocol_params": meta["protocol_params"],
        "protocol_hash": meta["protocol_hash"],
        "best_epochs": meta["best_epochs"],
    }
    return summary, result, pred


def write_tables(
    out_dir: Path, summary: dict, per_split: list[pd.DataFrame], groups: list[pd.DataFrame]
) -> None:
    """metrics.json, per_split.csv and groups.csv of several runs (each table's rows carry ``run``)."""
    for rows, file in ((per_split, "per_split.csv"), (groups, "groups.csv")):
        table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["run"])
        table[["run"] + [c for c in table if c != "run"]].to_csv(
            out_dir / file, index=False, float_format="%.6g"
        )
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
