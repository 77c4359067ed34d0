"""Cross-dataset stage on two demo datasets of different seeds (features synthesised from their MOS).

The two datasets share a feature "encoder" (the same projection of MOS into feature space), so a
probe trained on one transfers to the other. The stage applies the heads the train stage wrote: run
with the source as its own target, it must reproduce the train stage's test predictions.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.data import manifest_hash
from pipeline.data.demo import generate_demo
from pipeline.splits import make_splits, write_splits
from pipeline.store import StoreWriter
from stages import cross, train

ROOT = Path(__file__).resolve().parents[1]
D = 12


def _dataset(root: Path, seed: int, k: int = 2, model: str = "synthetic") -> None:
    """data/<name>/manifest.csv, splits/<name>/splits.json, features/<name>/vit.h5 under ``root``."""
    name = root.name
    manifest = generate_demo(root / "data", seed=seed, n_prompts=12, images_per_prompt=5, size=24)
    manifest.to_csv(root / "manifest.csv", index=False)
    rng = np.random.default_rng(seed)
    shared = np.random.default_rng(99).normal(size=(2, D))  # the "encoder": same for every dataset
    mos = manifest[["mos_quality", "mos_align"]].to_numpy()
    x = mos @ shared + rng.normal(0, 0.4, (len(mos), D))
    tokens = (x[:, None, :] + rng.normal(0, 0.2, (len(mos), 4, D))).astype(np.float16)
    provenance = {"encoder": "vit", "model": model, "dataset": name, "manifest_hash": manifest_hash(manifest)}
    (root / "features").mkdir()
    ids = manifest["image_id"].tolist()
    with StoreWriter(root / "features" / "vit.h5", ids, provenance, {"features": ((4, D), "float16")}) as w:
        for start, stop in w.pending():
            w.write(start, stop, {"features": tokens[start:stop]})
    splits = make_splits("grouped_kfold", manifest, k=k, val_fraction=0.25, seed=0)
    write_splits(root / "splits.json", "grouped_kfold", {"k": k}, splits)


def _paths(root: Path) -> list[Path]:
    return [root / "manifest.csv", root / "splits.json", root / "features"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A cwd with params.yaml: the repo's, with a short probe recipe and cross.runs = [probe_vit]."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["probe"]["recipe"] |= {"epochs": 20, "lr": 0.01}
    params["probe"]["model"]["hidden"] = 0
    params["cross"]["runs"] = ["probe_vit"]
    params["evaluate"]["bootstrap"] = 100
    params["runtime"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / name).mkdir()
        _dataset(tmp_path / name, seed)
    return tmp_path


def _cross(root: Path, source: str, target: str) -> tuple[Path, Path]:
    """Train the source's probe_vit (as its train stage does), then run the cross stage."""
    trained = root / "runs" / source
    if not (trained / "probe_vit").is_dir():
        train.main("probe", source, "vit", *_paths(root / source), trained / "probe_vit")
    runs, out = root / "runs" / f"{source}_to_{target}", root / "metrics" / f"{source}_to_{target}"
    cross.main(source, target, trained, *_paths(root / target), runs, out)
    return runs, out


def test_cross_on_itself_reproduces_the_train_stage(workdir):
    runs, _ = _cross(workdir, "a", "a")
    own = pd.read_csv(workdir / "runs" / "a" / "probe_vit" / "predictions.csv").query("part == 'test'")
    mine = pd.read_csv(runs / "probe_vit" / "predictions.csv")
    assert list(mine["image_id"]) == list(own["image_id"])
    for column in ("pred_quality", "pred_alignment", "target_quality"):
        np.testing.assert_allclose(mine[column], own[column], rtol=1e-5, atol=1e-5)
    assert (
        json.loads((runs / "probe_vit" / "run.json").read_text())["best_epochs"]
        == json.loads((workdir / "runs" / "a" / "probe_vit" / "run.json").read_text())["best_epochs"]
    )


def test_cross_a_to_b_scores_b_test_parts(workdir):
    runs, out = _cross(workdir, "a", "b")
    pred = pd.read_csv(runs / "probe_vit" / "predictions.csv")
    b_splits = json.loads((workdir / "b" / "splits.json").read_text())["splits"]
    for k, split in enumerate(b_splits):
        assert list(pred.loc[pred["split"] == k, "image_id"]) == split["test"]
    b = pd.read_csv(workdir / "b" / "manifest.csv").set_index("image_id")
    np.testing.assert_allclose(pred["target_quality"], b.loc[pred["image_id"], "mos_quality"])
    summary = json.loads((out / "metrics.json").read_text())["probe_vit"]
    assert (summary["train_dataset"], summary["test_dataset"], summary["n_splits"]) == ("a", "b", 2)
    meta = json.loads((runs / "probe_vit" / "run.json").read_text())
    assert meta["protocol_hash"] == json.loads((workdir / "b" / "splits.json").read_text())["hash"]
    assert meta["train_protocol_hash"] == json.loads((workdir / "a" / "splits.json").read_text())["hash"]
    assert summary["train_protocol_hash"] == meta["train_protocol_hash"]
    assert summary["quality"]["srcc"]["mean"] > 0.6  # the shared encoder makes quality transfer
    assert (
        summary["quality"]["srcc"]["lo"]
        < summary["quality"]["srcc"]["mean"]
        < summary["quality"]["srcc"]["hi"]
    )
    per_split = pd.read_csv(out / "per_split.csv")
    assert set(per_split["output"]) == {"quality", "alignment"} and set(per_split["split"]) == {0, 1}
    assert (pd.read_csv(out / "groups.csv")["by"] == "generator").any()


def test_refuses_stores_from_other_encoder_settings(workdir):
    shutil.rmtree(workdir / "b")
    (workdir / "b").mkdir()
    _dataset(workdir / "b", seed=1, model="another")
    with pytest.raises(ValueError, match=r"other encoder settings .*\(model: 'synthetic' vs 'another'\)"):
        _cross(workdir, "a", "b")


def test_refuses_splits_that_do_not_pair(workdir):
    shutil.rmtree(workdir / "b")
    (workdir / "b").mkdir()
    _dataset(workdir / "b", seed=1, k=3)
    with pytest.raises(ValueError, match="a/probe_vit has 2 grouped_kfold splits, b has 3"):
        _cross(workdir, "a", "b")


def test_unknown_run_is_named(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["cross"]["runs"] = ["probe_clip"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=r"'probe_clip', which .*does not hold; runs: \['probe_vit'\]"):
        _cross(workdir, "a", "b")
