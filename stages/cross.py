"""Stage `cross@<pair>`: train on one dataset's train parts, test on another's test parts.

As MA-AGIQA's Table 2 ("A -> B": train on A's train subset, test on B's test subset). For every
run in ``cross.runs`` and every split k of the protocol, the head is trained on split k of the
source exactly as its train stage does (same loop, recipe, seed and epoch selection, which uses
the source's val or test part, never the target), then predicts the test part of split k of the
target. Both datasets use the same ``split`` params, so they have the same number of splits.

Scoring follows the in-dataset evaluation: SRCC and KRCC on the predictions as they are, PLCC and
RMSE after the 4-parameter logistic fitted on the target's test part (each split's), intervals
and per-group tables as in ``evaluate``. Outputs the target does not label (alignment on
AIGCQA-20k) are trained but not scored.

Refused: feature stores of the two datasets made with other encoder settings (their provenance
may differ only in ``dataset`` and ``manifest_hash``). IP-IQA's prompt stream is built over both
datasets' prompts, so the target's prompts have text states; training touches only the source's.

Writes ``runs/cross/<pair>/<run>/`` (predictions.csv, curves.csv, run.json: the train stage's
layout) and ``metrics/cross/<pair>/`` (metrics.json, per_split.csv, groups.csv).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import typer

from pipeline.data import manifest_hash
from pipeline.features import Features
from pipeline.heads import create_head
from pipeline.splits import read_splits
from pipeline.store import FeatureStore
from pipeline.train import TARGETS, Recipe, RunConfig, predict, target_scale, train_protocol
from stages import read_manifest, read_params, resolve_device, runtime
from stages.evaluate import bootstrap_config, evaluate_run, write_tables
from stages.train import check_image_tower, family_outputs, head_config, head_inputs, nest, open_stores

PARAMS = (
    "train",
    "probe",
    "ma_agiqa",
    "fusion",
    "ipiqa",
    "profile",
    "extract.clip",
    "cross.runs",
    "evaluate",
)
# Provenance keys that name the data rather than the encoder.
DATA_KEYS = ("dataset", "manifest_hash")


@dataclass
class Dataset:
    """One side of a pair: manifest, splits document and feature stores (checked against the manifest)."""

    name: str
    manifest: pd.DataFrame
    splits: dict
    stores: dict[str, FeatureStore]

    @classmethod
    def load(
        cls, name: str, manifest_path: Path, splits_path: Path, features_dir: Path, encoders: list[str]
    ) -> Dataset:
        """The dataset with exactly the stores of ``encoders`` open (those its runs declare)."""
        manifest = read_manifest(manifest_path)
        stores = open_stores(features_dir, encoders, {"manifest_hash": manifest_hash(manifest)})
        return cls(name, manifest, read_splits(splits_path), stores)

    def rows(self, image_ids: list[str]) -> np.ndarray:
        return (
            pd.Series(np.arange(len(self.manifest)), index=self.manifest["image_id"])
            .loc[image_ids]
            .to_numpy()
        )

    def features(self, inputs: tuple[str, ...], prompts: list[str], budget_bytes: int) -> Features:
        index = self.manifest["prompt"].map({t: i for i, t in enumerate(prompts)}).to_numpy()
        stores = {i: self.stores[i] for i in inputs}
        return Features(
            stores, self.manifest["image_id"].tolist(), budget_bytes, extras={"prompt_index": index}
        )


def run_family(run: str, p: dict) -> tuple[str, str]:
    """(family, variant) of a run name as the DAG names runs (probe_<encoder>, or a variant)."""
    if run.startswith("probe_") and run.removeprefix("probe_") in p["probe"]["encoders"]:
        return "probe", run.removeprefix("probe_")
    if run in p["ma_agiqa"]["ablations"]:
        return "ma_agiqa_ablation", run
    for family in ("ma_agiqa", "ipiqa"):
        if run in p[family]["variants"]:
            return family, run
    known = [f"probe_{e}" for e in p["probe"]["encoders"]] + [
        *p["ma_agiqa"]["variants"],
        *p["ma_agiqa"]["ablations"],
        *p["ipiqa"]["variants"],
    ]
    raise ValueError(f"params.yaml: cross.runs names {run!r}, which is not a run of this DAG; runs: {known}")


def check_same_encoders(source: Dataset, target: Dataset, inputs: tuple[str, ...]) -> None:
    """Refuse stores whose provenance differs in anything but the data they were run on."""
    for name in inputs:
        for side in (source, target):
            if name not in side.stores:
                raise FileNotFoundError(f"cross-dataset: {side.name} has no {name} feature store")
        a, b = (
            {k: v for k, v in side.stores[name].provenance.items() if k not in DATA_KEYS}
            for side in (source, target)
        )
        diffs = [
            f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
        ]
        if diffs:
            raise ValueError(
                f"cross-dataset: {source.stores[name].path} and {target.stores[name].path} were extracted "
                f"with different encoder settings ({'; '.join(diffs)}); extract both with the same settings"
            )


def check_pairing(source: Dataset, target: Dataset) -> None:
    """Split k of the source pairs with split k of the target: same protocol, same number of splits."""
    a, b = source.splits, target.splits
    if a["protocol"] != b["protocol"] or len(a["splits"]) != len(b["splits"]):
        raise ValueError(
            f"cross-dataset: {source.name} has {len(a['splits'])} {a['protocol']} splits, {target.name} has "
            f"{len(b['splits'])} {b['protocol']} splits; re-run both split stages with the same split params"
        )


def cross_run(run_name: str, p: dict, run: RunConfig, source: Dataset, target: Dataset, out: Path) -> None:
    """Train one run on the source's splits, predict the target's test parts, write the run folder."""
    family, variant = run_family(run_name, p)
    prompts = sorted(set(source.manifest["prompt"]) | set(target.manifest["prompt"]))
    shapes = {name: tuple(store.shape("features")[1:]) for name, store in source.stores.items()}
    outputs = family_outputs(family, p, source.manifest)
    if family == "ipiqa":  # cross-dataset runs use the unadapted CLIP tower (no Image2Prompt)
        check_image_tower(source.stores["clip"], None)
    semantic = source.stores["semantic"].provenance["prompt_names"] if "semantic" in source.stores else None
    name, kwargs, recipe = head_config(family, variant, p, prompts, semantic_prompts=semantic)

    def build() -> torch.nn.Module:
        return create_head(name, n_outputs=len(outputs), input_shapes=shapes, **kwargs)

    inputs = build().inputs
    check_same_encoders(source, target, inputs)
    budget = int(run.memory_budget_gb * 2**30) // 2  # two datasets share the budget
    source_features = source.features(inputs, prompts, budget)
    target_features = target.features(inputs, prompts, budget)
    splits = source.splits["splits"]
    label = f"cross {source.name}->{target.name}/{run_name}"
    results = train_protocol(
        build, source_features, source.manifest, splits, outputs, Recipe(**recipe), run, label=label
    )

    source_targets = source.manifest[[TARGETS[o] for o in outputs]].to_numpy(dtype=np.float32)
    frames = []
    for k, (result, test_split) in enumerate(zip(results, target.splits["splits"], strict=True)):
        offset, scale = target_scale(source_targets[source.rows(splits[k]["train"])], run.target_norm)
        head = build()
        head.load_state_dict(result.state)
        rows = target.rows(test_split["test"])
        pred = predict(
            head.to(run.torch_device), target_features, rows, recipe["batch_size"], run.torch_device
        )
        frame = pd.DataFrame(
            {"split": k, "part": "test", "image_id": target.manifest["image_id"].to_numpy()[rows]}
        )
        for j, output in enumerate(outputs):
            frame[f"target_{output}"] = target.manifest[TARGETS[output]].to_numpy()[rows]
            frame[f"pred_{output}"] = pred[:, j] * scale[j] + offset[j]
        frames.append(frame)

    out.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(out / "predictions.csv", index=False)
    pd.DataFrame([{"split": k, **c} for k, r in enumerate(results) for c in r.curves]).to_csv(
        out / "curves.csv", index=False
    )
    meta = {
        "train_dataset": source.name,
        "test_dataset": target.name,
        "family": family,
        "head": name,
        "variant": variant,
        "outputs": outputs,
        "select": run.select,
        "protocol": target.splits["protocol"],
        "protocol_params": target.splits["params"],
        "protocol_hash": target.splits["hash"],
        "train_protocol_hash": source.splits["hash"],
        "recipe": recipe,
        "best_epochs": [r.best_epoch for r in results],
        "stores": {i: source.stores[i].provenance for i in inputs},
    }
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def main(
    train_dataset: str,
    test_dataset: str,
    train_manifest: Path,
    train_splits: Path,
    train_features: Path,
    test_manifest: Path,
    test_splits: Path,
    test_features: Path,
    runs_dir: Path,
    out_dir: Path,
) -> None:
    p = nest(read_params(PARAMS))
    rt = runtime()
    run = RunConfig(
        **p["train"], device=resolve_device(rt["device"]), memory_budget_gb=rt["memory_budget_gb"]
    )
    encoders = sorted({e for r in p["cross"]["runs"] for e in head_inputs(*run_family(r, p), p)})
    source = Dataset.load(train_dataset, train_manifest, train_splits, train_features, encoders)
    target = Dataset.load(test_dataset, test_manifest, test_splits, test_features, encoders)
    check_pairing(source, target)
    shutil.rmtree(runs_dir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    boot = bootstrap_config(p["evaluate"])
    summary, per_split, groups = {}, [], []
    for name in p["cross"]["runs"]:
        cross_run(name, p, run, source, target, runs_dir / name)
        result_summary, result, _ = evaluate_run(runs_dir / name, target.manifest, boot)
        pair = {"train_dataset": train_dataset, "test_dataset": test_dataset}
        summary[name] = {**pair, "train_protocol_hash": source.splits["hash"], **result_summary}
        per_split.append(result.per_split.assign(run=name))
        groups.append(result.groups.assign(run=name))
    write_tables(out_dir, summary, per_split, groups)
    typer.echo(f"{train_dataset} -> {test_dataset}: {', '.join(summary) or 'no runs'}")


if __name__ == "__main__":
    typer.run(main)
