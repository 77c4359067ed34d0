"""Zero-shot rows end to end below DVC: the semantic encoder stores Q-Align log-probabilities and P(yes)
from its one vision pass, and the zeroshot family turns them into predictions that evaluate can score."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data import manifest_hash
from pipeline.encoders import create_encoder
from pipeline.runs import RunError, TrainedRun
from pipeline.store import StoreWriter
from pipeline.zeroshot import NoZeroShot, qalign_score
from stages.train import zeroshot_run


@pytest.fixture(scope="module")
def encoders(params):
    """The demo semantic encoder with and without the zero-shot outputs."""
    cfg = params["extract"]["semantic"]
    plain = create_encoder("semantic", {**cfg, "zeroshot": []}, "demo", dtype="float32")
    both = create_encoder("semantic", {**cfg, "zeroshot": ["qalign", "vqascore"]}, "demo", dtype="float32")
    return plain, both


def test_semantic_encoder_adds_zero_shot_outputs_without_moving_its_features(encoders):
    plain, both = encoders
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, both.preprocessor.resolution, both.preprocessor.resolution)
    prompts = ["a red fox", "an astronaut riding a horse on the moon", "cat"]
    out = both.encode(pixels, prompts)
    np.testing.assert_array_equal(out["features"], plain.encode(pixels)["features"])
    assert out["qalign"].shape == (3, 5) and (out["qalign"] < 0).all()  # log-probabilities
    assert out["vqascore"].shape == (3, 1) and ((out["vqascore"] > 0) & (out["vqascore"] < 1)).all()
    assert set(both.schema()) == {"features", "qalign", "vqascore"} and both.reads_prompts
    alone = both.encode(pixels[2:], prompts[2:])  # each row's P(yes) is its own prompt's, not the batch's
    np.testing.assert_allclose(alone["vqascore"], out["vqascore"][2:], rtol=1e-5)
    with pytest.raises(ValueError, match="needs each image's prompt"):
        both.encode(pixels)
    assert both.provenance()["rating_weights"] == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert "zeroshot" not in plain.provenance()


def test_qalign_score_is_the_rating_softmax_times_weights():
    log_probs = np.log(np.array([[0.5, 0.3, 0.1, 0.05, 0.05], [0.0, 0.0, 0.0, 0.0, 1.0]]) * 0.2 + 1e-30)
    np.testing.assert_allclose(
        qalign_score(log_probs, [5, 4, 3, 2, 1]), [4.15, 1.0], rtol=1e-9
    )  # 2.5 + 1.2 + 0.3 + 0.1 + 0.05


def _store(tmp_path, manifest: pd.DataFrame, names: tuple[str, ...]) -> None:
    rng = np.random.default_rng(0)
    n = len(manifest)
    arrays = {"features": rng.normal(size=(n, 2, 4)).astype(np.float16)}
    schema = {"features": ((2, 4), "float16")}
    if "qalign" in names:
        arrays["qalign"] = np.log(rng.dirichlet(np.ones(5), size=n)).astype(np.float32)
        schema["qalign"] = ((5,), "float32")
    if "vqascore" in names:
        arrays["vqascore"] = rng.uniform(size=(n, 1)).astype(np.float32)
        schema["vqascore"] = ((1,), "float32")
    provenance = {
        "encoder": "semantic",
        "rating_weights": [5, 4, 3, 2, 1],
        "manifest_hash": manifest_hash(manifest),
    }
    (tmp_path / "features").mkdir()
    with StoreWriter(
        tmp_path / "features" / "semantic.h5", manifest["image_id"].tolist(), provenance, schema
    ) as w:
        for start, stop in w.pending():
            w.write(start, stop, {k: v[start:stop] for k, v in arrays.items()})
    return arrays


def test_zeroshot_run_predicts_every_split_from_the_store(tmp_path):
    ids = [f"i{k}" for k in range(12)]
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "path": [f"{i}.png" for i in ids],
            "prompt": "p",
            "group": "g",
            "generator": "m",
            "variant": "",
            "mos_quality": np.arange(12.0),
            "mos_align": np.arange(12.0)[::-1],
        }
    )
    splits = {
        "protocol": "grouped_kfold",
        "params": {},
        "hash": "ab" * 32,
        "splits": [{"train": ids[:6], "val": ids[6:8], "test": ids[8:]}, {"train": ids[4:], "test": ids[:4]}],
    }
    arrays = _store(tmp_path, manifest, ("qalign", "vqascore"))
    zeroshot_run("toy", manifest, splits, tmp_path / "features/semantic.h5", tmp_path / "runs" / "zeroshot")
    pred = pd.read_csv(tmp_path / "runs" / "zeroshot" / "predictions.csv")
    assert sorted(set(zip(pred["split"], pred["part"], strict=True))) == [
        (0, "test"),
        (0, "val"),
        (1, "test"),
    ]
    rows = pred["image_id"].str[1:].astype(int).to_numpy()
    np.testing.assert_allclose(pred["pred_quality"], qalign_score(arrays["qalign"], [5, 4, 3, 2, 1])[rows])
    np.testing.assert_allclose(pred["pred_alignment"], arrays["vqascore"][rows, 0], rtol=1e-6)
    record = json.loads((tmp_path / "runs" / "zeroshot" / "run.json").read_text())
    assert record["head"]["outputs"] == ["quality", "alignment"] and record["splits"] == []
    with pytest.raises(RunError, match="holds no trained heads"):
        TrainedRun.load(tmp_path / "runs" / "zeroshot")


def test_a_store_without_zero_shot_outputs_is_named(tmp_path):
    ids = ["a", "b", "c"]
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "path": ids,
            "prompt": "p",
            "group": "g",
            "generator": "m",
            "variant": "",
            "mos_quality": [1.0, 2, 3],
            "mos_align": np.nan,
        }
    )
    _store(tmp_path, manifest, ())
    splits = {"protocol": "x", "params": {}, "hash": "0", "splits": [{"train": ids, "test": ids}]}
    with pytest.raises(NoZeroShot, match=r"semantic\.h5 holds no zero-shot outputs"):
        zeroshot_run(
            "toy", manifest, splits, tmp_path / "features/semantic.h5", tmp_path / "runs" / "zeroshot"
        )
