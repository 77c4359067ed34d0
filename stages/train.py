"""Stage `train_<family>@<dataset>-<variant>`: cached features + splits -> runs/<dataset>/<run>/.

Writes per split the selected epoch's weights (``split<k>.safetensors``), all predictions
(``predictions.csv``: split, part, image_id, target_*/pred_* per output), per-epoch curves
(``curves.csv``) and ``run.json``, the record that lets ``pipeline.runs.TrainedRun`` rebuild and
apply every head (head, config, inputs, target scale per split, encoders, protocol, selection).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
import typer

from pipeline.data import manifest_hash
from pipeline.features import Features
from pipeline.heads import create_head
from pipeline.provenance import built_beside
from pipeline.runs import FORMAT, prediction_frame, save_weights, split_entry
from pipeline.splits import read_splits
from pipeline.store import FeatureStore
from pipeline.train import Recipe, RunConfig, output_names, train_protocol
from stages import read_manifest, read_params, resolve_device, runtime

# The params each head family reads: its own sections plus the shared `train` section. MA-AGIQA's
# ablations have a family (and stage) of their own that reads no fusion.experts or fusion.streams,
# so that an experts/streams experiment re-trains the full model alone.
_MA_AGIQA = ("train", "ma_agiqa.outputs", "ma_agiqa.maniqa", "ma_agiqa.recipe", "ma_agiqa.semantic_encoder")
# Per key, never a whole section, where a section also lists the runs: adding an encoder to
# probe.encoders or a variant to ipiqa.variants must retrain nothing that exists.
_IPIQA = ("outputs", "qa_token", "fusion", "dropout", "head_scale", "recipe")
PARAMS = {
    "probe": ("train", "probe.outputs", "probe.model", "probe.recipe"),
    "ma_agiqa": (*_MA_AGIQA, "fusion"),
    "ma_agiqa_ablation": (
        *_MA_AGIQA,
        "fusion.gate",
        "fusion.afm_width",
        "fusion.shared_hidden",
        "fusion.drop",
    ),
    "ipiqa": ("train", *(f"ipiqa.{k}" for k in _IPIQA), "profile", "extract.clip"),
    "zeroshot": (),  # trains nothing: it reads no params, only the zero-shot outputs of the store <variant>
}
ABLATIONS = ("maniqa", "semantic_only")


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"ma_agiqa.recipe": r, "fusion.gate": g} -> {"ma_agiqa": {"recipe": r}, "fusion": {"gate": g}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def head_inputs(family: str, variant: str, p: dict[str, Any]) -> list[str]:
    """The feature stores a run reads, known from its params before any store is opened."""
    if family == "probe":
        return [variant]
    if family == "ipiqa":
        return ["clip"]
    if variant in ABLATIONS:
        return ["vit"] if variant == "maniqa" else ["semantic"]
    streams = p["fusion"]["streams"]
    return ["vit"] * ("maniqa" in streams) + ["semantic"] * any(s != "maniqa" for s in streams)


def store_files(family: str, inputs: list[str], p: dict[str, Any]) -> dict[str, str]:
    """The store each head input reads: its own name, except MA-AGIQA's ``semantic`` input, which reads
    the prompt-feature encoder ``ma_agiqa.semantic_encoder`` names (mPLUG-Owl2 or a transformers VLM)."""
    reads = p["ma_agiqa"]["semantic_encoder"] if family.startswith("ma_agiqa") else "semantic"
    return {name: reads if name == "semantic" else name for name in inputs}


def open_stores(features_dir: Path, files: dict[str, str], expect: dict) -> dict[str, FeatureStore]:
    """Exactly the stores a run declares (head input -> encoder), each checked against the manifest."""
    return {name: FeatureStore(features_dir / f"{file}.h5", expect=expect) for name, file in files.items()}


def head_config(
    family: str,
    variant: str,
    p: dict[str, Any],
    prompts: list[str],
    image_tower: Path | None = None,
    semantic_prompts: list[str] | None = None,
    per_prompt: bool = False,
) -> tuple[str, dict, dict]:
    """(registered head name, builder kwargs, recipe) for a family and variant; ``p`` nested by section.

    ``image_tower``: IP-IQA's Image2Prompt-adapted CLIP image tower, whose attnpool the head starts from.
    ``semantic_prompts``: the semantic store's ``prompt_names``, the names of its rows, by which
    MA-AGIQA binds its streams (never by position). ``per_prompt``: the probe's store holds one vector
    per named prompt (its provenance lists ``prompt_names``), which the probe concatenates.
    """
    if family == "probe":
        cfg = p["probe"]
        return "probe", {"encoder": variant, "per_prompt": per_prompt, **cfg["model"]}, cfg["recipe"]
    if family == "ma_agiqa_ablation" and variant not in ABLATIONS:
        raise ValueError(
            f"ma_agiqa.ablations lists {variant!r}, which reads fusion.experts and fusion.streams; "
            f"ablations are {list(ABLATIONS)}: list other heads under ma_agiqa.variants"
        )
    if family in ("ma_agiqa", "ma_agiqa_ablation"):
        cfg, fusion = p["ma_agiqa"], p["fusion"]
        branch = {"drop": fusion["drop"], **cfg["maniqa"]}
        if variant == "maniqa":
            return variant, branch, cfg["recipe"]
        mixing = {k: fusion[k] for k in ("gate", "afm_width", "shared_hidden")}
        if semantic_prompts is not None:
            mixing["prompts"] = list(semantic_prompts)
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
            "clip_model": build_clip_model(p["extract"]["clip"], p["profile"], image_tower=image_tower),
            "prompts": prompts,
        }
        return variant, kwargs, cfg["recipe"]
    raise typer.BadParameter(f"unknown family {family!r}; choose from {sorted(PARAMS)}")


def family_outputs(family: str, p: dict[str, Any], manifest: pd.DataFrame) -> list[str]:
    """The outputs a family's runs train: its section's ``outputs`` (the ablations: ma_agiqa's)."""
    return output_names(manifest, p[family.removesuffix("_ablation")].get("outputs", "auto"))


def check_image_tower(clip_store: FeatureStore, tower: Path | None) -> None:
    """The CLIP features and the head's attnpool must come from the same (adapted or not) image tower."""
    from pipeline.encoders.common import sha256_file

    expected = sha256_file(tower) if tower is not None else None
    found = clip_store.provenance.get("i2p")
    if found != expected:
        raise ValueError(
            f"{clip_store.path} was extracted with Image2Prompt weights {found} "
            f"but this run uses {expected}; "
            "run `dvc repro` so extraction and training use the same image tower"
        )


def main(
    family: str,
    dataset: str,
    variant: str,
    manifest_path: Path,
    splits_path: Path,
    features_dir: Path,
    out_dir: Path,
    i2p: Annotated[
        Path | None, typer.Option(help="IP-IQA: the pretrain_i2p record folder models/i2p/clip")
    ] = None,
) -> None:
    if family not in PARAMS:
        raise typer.BadParameter(f"unknown family {family!r}; choose from {sorted(PARAMS)}")
    if family == "zeroshot":
        manifest, splits = read_manifest(manifest_path), read_splits(splits_path)
        zeroshot_run(dataset, manifest, splits, features_dir / f"{variant}.h5", out_dir)
        return
    p = nest(read_params(PARAMS[family]))
    rt = runtime()
    run = RunConfig(
        **p["train"], device=resolve_device(rt["device"]), memory_budget_gb=rt["memory_budget_gb"]
    )
    manifest = read_manifest(manifest_path)
    splits = read_splits(splits_path)
    prompts = sorted(set(manifest["prompt"]))
    inputs = head_inputs(family, variant, p)
    stores = open_stores(
        features_dir, store_files(family, inputs, p), {"manifest_hash": manifest_hash(manifest)}
    )
    shapes = {name: tuple(store.shape("features")[1:]) for name, store in stores.items()}
    outputs = family_outputs(family, p, manifest)
    tower = None
    if i2p is not None:
        from pipeline.encoders.common import adapted_tower

        tower = adapted_tower(i2p, "clip")
    if family == "ipiqa":
        check_image_tower(stores["clip"], tower)
    semantic = stores["semantic"].provenance["prompt_names"] if "semantic" in stores else None
    per_prompt = family == "probe" and "prompt_names" in stores[variant].provenance
    name, kwargs, recipe = head_config(family, variant, p, prompts, tower, semantic, per_prompt)

    def build() -> torch.nn.Module:
        return create_head(name, n_outputs=len(outputs), input_shapes=shapes, **kwargs)

    head = build()  # one built up front: what it reads and whether it reads prompts
    if list(head.inputs) != inputs:
        raise ValueError(f"head {name!r} reads {list(head.inputs)}, its family declares {inputs}")
    reads_prompts = getattr(head, "prompt_text", None) is not None
    del head
    prompt_index = manifest["prompt"].map({t: i for i, t in enumerate(prompts)}).to_numpy()
    features = Features(
        stores,
        manifest["image_id"].tolist(),
        budget_bytes=int(run.memory_budget_gb * 2**30),
        extras={"prompt_index": prompt_index},
    )
    label = f"{dataset}/{out_dir.name}"
    results = train_protocol(
        build, features, manifest, splits["splits"], outputs, Recipe(**recipe), run, label=label
    )
    clip_model = None
    if family == "ipiqa":
        clip_model = {
            "cfg": p["extract"]["clip"],
            "profile": p["profile"],
            "image_tower": str(tower) if tower is not None else None,
            "image_tower_sha256": stores["clip"].provenance.get("i2p"),
        }
    record = {
        "format": FORMAT,
        "dataset": dataset,
        "run": out_dir.name,
        "family": family,
        "variant": variant,
        "head": {
            "name": name,
            "config": {k: v for k, v in kwargs.items() if k not in ("clip_model", "prompts")},
            "input_shapes": {k: list(v) for k, v in shapes.items()},
            "outputs": outputs,
            "prompts": prompts if reads_prompts else None,
            "clip_model": clip_model,
        },
        "target_norm": run.target_norm,
        "select": run.select,
        "protocol": splits["protocol"],
        "protocol_params": splits["params"],
        "protocol_hash": splits["hash"],
        "recipe": recipe,
        "best_epochs": [r.best_epoch for r in results],
        "params": p,
        "stores": {i: stores[i].provenance for i in inputs},
    }
    write_run(out_dir, results, record)
    typer.echo(f"{label}: {len(results)} splits, best epochs {record['best_epochs']}")


def zeroshot_run(dataset: str, manifest: pd.DataFrame, splits: dict, store_path: Path, out_dir: Path) -> None:
    """Q-Align and VQAScore predictions from the store at ``store_path`` on every split's val and test
    parts, in a run folder's layout (no weights: nothing is trained; ``agiqa score`` refuses it)."""
    from pipeline.zeroshot import zeroshot_predictions

    store = FeatureStore(store_path, expect={"manifest_hash": manifest_hash(manifest)})
    preds = zeroshot_predictions(store, output_names(manifest, "auto"))
    index = pd.Series(np.arange(len(manifest)), index=manifest["image_id"])
    frames = []
    for k, split in enumerate(splits["splits"]):
        for part in ("val", "test"):
            rows = index.loc[split.get(part, [])].to_numpy()
            frames.append(prediction_frame(manifest, k, part, rows, {o: v[rows] for o, v in preds.items()}))
    record = {
        "format": FORMAT,
        "dataset": dataset,
        "run": out_dir.name,
        "family": "zeroshot",
        "head": {
            "name": "zeroshot",
            "config": {},
            "input_shapes": {},
            "outputs": list(preds),
            "prompts": None,
        },
        "select": "none",
        "protocol": splits["protocol"],
        "protocol_params": splits["params"],
        "protocol_hash": splits["hash"],
        "best_epochs": [None] * len(splits["splits"]),
        "stores": {store_path.stem: store.provenance},
        "splits": [],
    }
    with built_beside(out_dir) as building:
        pd.concat(frames).to_csv(building / "predictions.csv", index=False)
        pd.DataFrame(columns=["split", "epoch", "train_loss", "val_score", "test_score"]).to_csv(
            building / "curves.csv", index=False
        )
        (building / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    typer.echo(f"{dataset}/{out_dir.name}: zero-shot {', '.join(preds)} on {len(splits['splits'])} splits")


def write_run(out_dir: Path, results: list, record: dict) -> None:
    """The run folder, written beside it and renamed when complete: a killed run leaves no folder that
    could be read as finished (``run.json``, written last, is what evaluate requires)."""
    with built_beside(out_dir) as building:
        splits = [
            split_entry(save_weights(building, k, r.state), r.offset, r.scale) for k, r in enumerate(results)
        ]
        pd.concat([r.predictions for r in results]).to_csv(building / "predictions.csv", index=False)
        pd.DataFrame([{"split": k, **c} for k, r in enumerate(results) for c in r.curves]).to_csv(
            building / "curves.csv", index=False
        )
        record = {**record, "splits": splits}
        (building / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    typer.run(main)
