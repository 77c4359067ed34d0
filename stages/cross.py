"""Stage `cross@<pair>`: the heads trained on one dataset, applied to another's test parts.

As MA-AGIQA's Table 2 ("A -> B": train on A's train subset, test on B's test subset). For every
run in ``cross.runs``, the head of split k that ``train_*@<A>`` trained (its epoch chosen on A, as
``train.select`` says) predicts the test part of split k of B, through ``pipeline.runs`` (the path
``agiqa score`` uses): nothing is retrained, so the in-dataset and cross-dataset numbers come from
the same weights. Both datasets use the same ``split`` params, so they have the same splits.

Scoring follows the in-dataset evaluation: SRCC and KRCC on the predictions as they are, PLCC and
RMSE after the 4-parameter logistic fitted on the target's test part (each split's), intervals
and per-group tables as in ``evaluate``. Outputs the target does not label (alignment on
AIGCQA-20k) are predicted but not scored.

Refused: target stores made with other encoder settings than the run's (their provenance may
differ only in ``dataset`` and ``manifest_hash``). IP-IQA reads the target's prompts through its
trained text side (``PromptText.retarget``).

Writes ``runs/cross/<pair>/<run>/`` (predictions.csv, run.json) and ``metrics/cross/<pair>/``
(metrics.json, per_split.csv, groups.csv).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from pipeline.data import manifest_hash
from pipeline.evaluation import bootstrap_config, evaluate_run, write_tables
from pipeline.features import Features
from pipeline.runs import TrainedRun, prediction_frame
from pipeline.splits import read_splits
from pipeline.store import FeatureStore
from stages import read_manifest, read_params, resolve_device, runtime

PARAMS = ("cross.runs", "evaluate")
# Provenance keys that name the data rather than the encoder.
DATA_KEYS = ("dataset", "manifest_hash")


def _plain(value):
    """JSON-normal form, so that a record read from run.json compares with a store's attributes."""
    return json.loads(json.dumps(value, default=str))


def check_same_encoders(run: TrainedRun, stores: dict[str, FeatureStore]) -> None:
    """Refuse target stores whose provenance differs from the run's in anything but the data."""
    for name in run.inputs:
        a, b = (
            {k: v for k, v in _plain(prov).items() if k not in DATA_KEYS}
            for prov in (run.record["stores"][name], stores[name].provenance)
        )
        diffs = [
            f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
        ]
        if diffs:
            raise ValueError(
                f"cross-dataset: {run.name} was trained on {name} features of other encoder settings than "
                f"{stores[name].path} ({'; '.join(diffs)}); extract both with the same settings"
            )


def check_pairing(run: TrainedRun, splits: dict, target: str) -> None:
    """Split k of the source pairs with split k of the target: same protocol, same number of splits."""
    protocol = run.record["protocol"]
    if protocol != splits["protocol"] or run.n_splits != len(splits["splits"]):
        raise ValueError(
            f"cross-dataset: {run.name} has {run.n_splits} {protocol} splits, {target} has "
            f"{len(splits['splits'])} {splits['protocol']} splits; re-run both split stages with the same "
            "split params"
        )


def load_run(source_runs: Path, name: str) -> TrainedRun:
    if not (source_runs / name).is_dir():
        have = sorted(p.name for p in source_runs.iterdir() if p.is_dir()) if source_runs.is_dir() else []
        raise ValueError(
            f"params.yaml: cross.runs names {name!r}, which {source_runs} does not hold; runs: {have}"
        )
    return TrainedRun.load(source_runs / name)


def cross_run(
    run: TrainedRun,
    target: str,
    manifest: pd.DataFrame,
    splits: dict,
    features_dir: Path,
    out: Path,
    device: str,
) -> None:
    """Split k's head predicts the target's test part of split k; writes predictions.csv and run.json."""
    expect = {"manifest_hash": manifest_hash(manifest)}
    # a head input names its role; the store is the encoder the run read for it (its provenance says which)
    files = {name: run.record["stores"][name].get("encoder", name) for name in run.inputs}
    stores = {name: FeatureStore(features_dir / f"{file}.h5", expect=expect) for name, file in files.items()}
    check_same_encoders(run, stores)
    prompts = sorted(set(manifest["prompt"])) if run.needs_prompts else None
    extras = {}
    if prompts is not None:
        extras["prompt_index"] = manifest["prompt"].map({t: i for i, t in enumerate(prompts)}).to_numpy()
    features = Features(
        stores,
        manifest["image_id"].tolist(),
        budget_bytes=int(runtime()["memory_budget_gb"] * 2**30),
        extras=extras,
    )
    index = pd.Series(np.arange(len(manifest)), index=manifest["image_id"])
    frames = []
    for k, split in enumerate(splits["splits"]):
        rows = index.loc[split["test"]].to_numpy()
        pred = run.predictor(k, prompts, device)(features, rows)
        outputs = {output: pred[:, j] for j, output in enumerate(run.outputs)}
        frames.append(prediction_frame(manifest, k, "test", rows, outputs))
    out.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(out / "predictions.csv", index=False)
    record = {k: v for k, v in run.record.items() if k not in ("splits", "protocol_params", "protocol_hash")}
    record |= {
        "train_dataset": run.record["dataset"],
        "test_dataset": target,
        "weights": {"run": run.name, "splits": run.record["splits"]},
        "protocol_params": splits["params"],
        "protocol_hash": splits["hash"],
        "train_protocol_hash": run.record["protocol_hash"],
    }
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def main(
    train_dataset: str,
    test_dataset: str,
    train_runs: Path,
    test_manifest: Path,
    test_splits: Path,
    test_features: Path,
    runs_dir: Path,
    out_dir: Path,
) -> None:
    p = read_params(PARAMS)
    device = resolve_device(runtime()["device"])
    manifest = read_manifest(test_manifest)
    splits = read_splits(test_splits)
    runs = {name: load_run(train_runs, name) for name in p["cross.runs"]}
    for run in runs.values():
        check_pairing(run, splits, test_dataset)
    shutil.rmtree(runs_dir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    boot = bootstrap_config(p["evaluate"])
    summary, per_split, groups = {}, [], []
    for name, run in runs.items():
        cross_run(run, test_dataset, manifest, splits, test_features, runs_dir / name, device)
        result_summary, result, _ = evaluate_run(runs_dir / name, manifest, boot)
        pair = {"train_dataset": train_dataset, "test_dataset": test_dataset}
        summary[name] = {**pair, "train_protocol_hash": run.record["protocol_hash"], **result_summary}
        per_split.append(result.per_split.assign(run=name))
        groups.append(result.groups.assign(run=name))
    write_tables(out_dir, summary, per_split, groups)
    typer.echo(f"{train_dataset} -> {test_dataset}: {', '.join(summary) or 'no runs'}")


if __name__ == "__main__":
    typer.run(main)
