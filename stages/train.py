"""Stage `train_<family>@<dataset>-<variant>`: cached features + splits -> runs/<dataset>/<run>/.

Writes per split the selected epoch's weights (``split<k>.pt``), all predictions
(``predictions.csv``: split, part, image_id, target_*/pred_* per output), per-epoch curves
(``curves.csv``) and ``run.json`` (what was trained, on which protocol, how the epoch was chosen).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import typer

from pipeline.data import manifest_hash
from pipeline.features import Features
from pipeline.heads import create_head
from pipeline.splits import read_splits
from pipeline.store import FeatureStore
from pipeline.train import Recipe, RunConfig, output_names, train_protocol
from stages import read_manifest, read_params, resolve_device, runtime

# The params each head family reads: its own sections plus the shared `train` section.
PARAMS = {
    "probe": ("train", "probe"),
    "ma_agiqa": ("train", "ma_agiqa", "fusion"),
    "ipiqa": ("train", "ipiqa", "profile", "extract.clip"),
}


def head_config(family: str, variant: str, p: dict[str, Any], prompts: list[str]) -> tuple[str, dict, dict]:
    """(registered head name, builder kwargs, recipe) for a family and variant."""
    if family == "probe":
        cfg = p["probe"]
        return "probe", {"encoder": variant, **cfg["model"]}, cfg["recipe"]
    if family == "ma_agiqa":
        cfg, fusion = p["ma_agiqa"], p["fusion"]
        branch = {"drop": fusion["drop"], **cfg["maniqa"]}
        if variant == "maniqa":
            return variant, branch, cfg["recipe"]
        mixing = {k: fusion[k] for k in ("gate", "afm_width", "shared_hidden")}
        if variant == "semantic_only":  # the two prompt experts alone: S = K = 2
            return variant, {**branch, **mixing}, cfg["recipe"]
        return (
            variant,
            {**branch, **mixing, "experts": fusion["experts"], "streams": fusion["streams"]},
            cfg["recipe"],
        )
    if family == "ipiqa":
        from pipeline.encoders.clip import build_clip_model

        cfg = p["ipiqa"]
        qa_token = {False: "none", True: "unfrozen_wte"}.get(cfg["qa_token"], cfg["qa_token"])
        kwargs = {
            "qa_token": qa_token,
            "fusion": cfg["fusion"],
            "dropout": cfg["dropout"],
            "head_scale": cfg["head_scale"],
            "clip_model": build_clip_model(p["extract.clip"], p["profile"]),
            "prompts": prompts,
        }
        return variant, kwargs, cfg["recipe"]
    raise typer.BadParameter(f"unknown family {family!r}; choose from {sorted(PARAMS)}")


def main(
    family: str,
    dataset: str,
    variant: str,
    manifest_path: Path,
    splits_path: Path,
    features_dir: Path,
    out_dir: Path,
) -> None:
    if family not in PARAMS:
        raise typer.BadParameter(f"unknown family {family!r}; choose from {sorted(PARAMS)}")
    p = read_params(PARAMS[family])
    run = RunConfig(**p["train"], device=resolve_device(runtime()["device"]))
    manifest = read_manifest(manifest_path)
    splits = read_splits(splits_path)
    prompts = sorted(set(manifest["prompt"]))
    expect = {"manifest_hash": manifest_hash(manifest)}
    stores = {s.stem: FeatureStore(s, expect=expect) for s in sorted(features_dir.glob("*.h5"))}
    shapes = {name: tuple(store.shape("features")[1:]) for name, store in stores.items()}
    outputs = output_names(manifest, p[family].get("outputs", "auto"))
    name, kwargs, recipe = head_config(family, variant, p, prompts)

    def build() -> torch.nn.Module:
        return create_head(name, n_outputs=len(outputs), input_shapes=shapes, **kwargs)

    inputs = build().inputs
    missing = [i for i in inputs if i not in stores]
    if missing:
        raise FileNotFoundError(f"head {name!r} reads {missing} but {features_dir} has only {sorted(stores)}")
    prompt_index = manifest["prompt"].map({t: i for i, t in enumerate(prompts)}).to_numpy()
    features = Features(
        {i: stores[i] for i in inputs},
        manifest["image_id"].tolist(),
        budget_bytes=int(run.memory_budget_gb * 2**30),
        extras={"prompt_index": prompt_index},
    )
    results = train_protocol(build, features, manifest, splits["splits"], outputs, Recipe(**recipe), run)

    out_dir.mkdir(parents=True, exist_ok=True)
    for k, result in enumerate(results):
        torch.save(result.state, out_dir / f"split{k}.pt")
    pd.concat([r.predictions for r in results]).to_csv(out_dir / "predictions.csv", index=False)
    pd.DataFrame([{"split": k, **c} for k, r in enumerate(results) for c in r.curves]).to_csv(
        out_dir / "curves.csv", index=False
    )
    meta = {
        "dataset": dataset,
        "family": family,
        "head": name,
        "variant": variant,
        "outputs": outputs,
        "select": run.select,
        "protocol": splits["protocol"],
        "protocol_params": splits["params"],
        "protocol_hash": splits["hash"],
        "recipe": recipe,
        "best_epochs": [r.best_epoch for r in results],
        "stores": {i: stores[i].provenance for i in inputs},
    }
    (out_dir / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    typer.echo(f"{dataset}/{out_dir.name}: {len(results)} splits, best epochs {meta['best_epochs']}")


if __name__ == "__main__":
    typer.run(main)
