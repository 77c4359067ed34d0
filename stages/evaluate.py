"""Stage `evaluate@<dataset>`: every run's predictions -> metrics/<dataset>/ (committed, cache: false).

Per run, output and split, the metrics of the test part with bootstrap intervals, then mean,
median and std over splits and per-generator / per-variant tables (pipeline.evaluation). Writes
``metrics.json`` (run -> output -> metric -> statistic, plus the protocol, its hash and the
selection mode), ``per_split.csv``, ``groups.csv``, and plot data: ``scatter/<run>.csv``
(prediction vs MOS, every split's test part), ``curves/<run>.csv`` (per-epoch selection score,
one line per split and their mean) and ``generators/<run>.csv`` (SRCC and PLCC per generator).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import typer

from pipeline.evaluation import bootstrap_config, evaluate_run, write_tables
from stages import read_manifest, read_params

PARAMS = (
    "probe.encoders",
    "ma_agiqa.variants",
    "ma_agiqa.ablations",
    "ipiqa.variants",
    "zeroshot.stores",
    "evaluate",
)
PLOTS = ("scatter", "curves", "generators")


def run_names(p: dict) -> list[str]:
    """The run folders the DAG trains, in dvc.yaml order (stale folders of removed runs are ignored)."""
    return (
        [f"probe_{e}" for e in p["probe.encoders"]]
        + list(p["ma_agiqa.variants"])
        + list(p["ma_agiqa.ablations"])
        + list(p["ipiqa.variants"])
        + [f"zeroshot_{store}" for store in p["zeroshot.stores"]]
    )


def curves_long(curves: pd.DataFrame, select: str) -> pd.DataFrame:
    """Per-epoch selection score (SRCC + PLCC summed over outputs), one row per epoch and split, plus
    their mean: the layout the ``split_curves`` plot template colours by split."""
    part = "val" if select == "val" else "test"
    long = curves[["epoch", "split", f"{part}_score"]].rename(columns={f"{part}_score": "score"})
    mean = long.groupby("epoch", as_index=False)["score"].mean().assign(split="mean")
    return pd.concat([long.astype({"split": str}), mean], ignore_index=True).assign(part=part)


def generator_bars(groups: pd.DataFrame) -> pd.DataFrame:
    """Per-generator rows labelled ``generator (output)`` for a horizontal bar chart."""
    rows = groups[groups["by"] == "generator"]
    label = rows["group"] + " (" + rows["output"] + ")"
    return rows.assign(label=label)[["label", "output", "group", "n_images", "srcc", "plcc"]]


def main(dataset: str, manifest_path: Path, runs_dir: Path, out_dir: Path) -> None:
    p = read_params(PARAMS)
    boot = bootstrap_config(p["evaluate"])
    manifest = read_manifest(manifest_path)
    shutil.rmtree(out_dir, ignore_errors=True)
    for plot in PLOTS:
        (out_dir / plot).mkdir(parents=True)
    summary, per_split, groups = {}, [], []
    for name in run_names(p):
        run_dir = runs_dir / name
        summary[name], result, pred = evaluate_run(run_dir, manifest, boot)
        per_split.append(result.per_split.assign(run=name))
        groups.append(result.groups.assign(run=name))
        pred[pred["part"] == "test"].to_csv(out_dir / "scatter" / f"{name}.csv", index=False)
        curves = curves_long(pd.read_csv(run_dir / "curves.csv"), summary[name]["select"])
        curves.to_csv(out_dir / "curves" / f"{name}.csv", index=False, float_format="%.6g")
        bars = generator_bars(result.groups)
        bars.to_csv(out_dir / "generators" / f"{name}.csv", index=False, float_format="%.6g")
    write_tables(out_dir, summary, per_split, groups)
    typer.echo(f"{dataset}: evaluated {', '.join(summary)}")


if __name__ == "__main__":
    typer.run(main)
