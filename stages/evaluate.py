"""Stage `evaluate@<dataset>`: every run's predictions -> metrics/<dataset>/ (committed, cache: false).

Per run, output and split, the metrics of the test part (pipeline.metrics), then mean, median
and std over splits. Writes ``metrics.json`` (nested run -> output -> metric -> statistic),
``per_split.csv``, and plot data: ``scatter/<run>.csv`` (prediction vs MOS, every split's test
part) and ``curves/<run>.csv`` (per-epoch selection score, one column per split).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import typer

from pipeline import metrics
from stages import read_params

PARAMS = ("probe.encoders", "ma_agiqa.variants", "ipiqa.variants")


def run_names(p: dict) -> list[str]:
    """The run folders the DAG trains, in dvc.yaml order (stale folders of removed runs are ignored)."""
    return (
        [f"probe_{e}" for e in p["probe.encoders"]] + list(p["ma_agiqa.variants"]) + list(p["ipiqa.variants"])
    )


def evaluate_run(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    meta = json.loads((run_dir / "run.json").read_text())
    pred = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str})
    test = pred[pred["part"] == "test"]
    rows = []
    for output in meta["outputs"]:
        for k, part in test.groupby("split"):
            rows.append(
                {
                    "run": run_dir.name,
                    "output": output,
                    "split": k,
                    **metrics.compute(part[f"pred_{output}"], part[f"target_{output}"]),
                }
            )
    per_split = pd.DataFrame(rows)
    summary = {
        out: metrics.aggregate(per_split[per_split["output"] == out].to_dict("records"))
        for out in meta["outputs"]
    }
    summary["n_splits"] = int(test["split"].nunique())
    summary["select"] = meta["select"]
    summary["protocol"] = meta["protocol"]
    return summary, per_split


def main(dataset: str, runs_dir: Path, out_dir: Path) -> None:
    names = run_names(read_params(PARAMS))
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "scatter").mkdir(parents=True)
    (out_dir / "curves").mkdir()
    summary, tables = {}, []
    for name in names:
        run_dir = runs_dir / name
        if not (run_dir / "run.json").exists():
            raise FileNotFoundError(
                f"{run_dir}/run.json missing: run `dvc repro` for the train stage of {name}"
            )
        summary[name], per_split = evaluate_run(run_dir)
        tables.append(per_split)
        pred = pd.read_csv(run_dir / "predictions.csv")
        pred[pred["part"] == "test"].to_csv(out_dir / "scatter" / f"{name}.csv", index=False)
        curves = pd.read_csv(run_dir / "curves.csv")
        score = "val_score" if summary[name]["select"] == "val" else "test_score"
        wide = curves.pivot(index="epoch", columns="split", values=score).add_prefix("split")
        wide.insert(0, "mean", wide.mean(axis=1))
        wide.reset_index().to_csv(out_dir / "curves" / f"{name}.csv", index=False)
    pd.concat(tables).to_csv(out_dir / "per_split.csv", index=False, float_format="%.6g")
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(f"{dataset}: evaluated {', '.join(names)}")


if __name__ == "__main__":
    typer.run(main)
