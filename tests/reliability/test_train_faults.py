"""Stage 2 under faults: NaN scores and diverging losses, non-finite predictions, the shuffled-label
control under test-oracle selection, prompt streams bound by name, and run folders that a crash or a
full disk cannot leave looking complete.
"""

from __future__ import annotations

import errno
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch

import pipeline.train as train_module
from pipeline.evaluation import Bootstrap, evaluate_predictions
from pipeline.features import Features
from pipeline.heads import create_head
from pipeline.store import FeatureStore, StoreWriter
from pipeline.train import Recipe, RunConfig, SplitResult, TrainingDiverged, train_protocol

ROOT = Path(__file__).resolve().parents[2]
N, D = 120, 8


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 2, D)).astype(np.float16)
    ids = [f"img{i:03d}" for i in range(N)]
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "prompt": "p",
            "mos_quality": x.astype(float).mean(1) @ rng.normal(size=D),
            "mos_align": np.nan,
        }
    )
    with StoreWriter(tmp_path / "vit.h5", ids, {"encoder": "vit"}, {"features": ((2, D), "float16")}) as w:
        w.write(0, N, {"features": x})
    perm = rng.permutation(ids)
    splits = [{"train": list(perm[:80]), "val": list(perm[80:90]), "test": list(perm[90:])}]
    return manifest, FeatureStore(tmp_path / "vit.h5"), splits


def _train(data, epochs=4, lr=0.01, **run):
    manifest, store, splits = data
    features = Features({"vit": store}, manifest["image_id"].tolist(), budget_bytes=1 << 30)

    def build():
        return create_head("probe", n_outputs=1, input_shapes=features.shapes, encoder="vit", hidden=0)

    recipe = Recipe(epochs=epochs, batch_size=16, lr=lr)
    return train_protocol(
        build,
        features,
        manifest,
        splits,
        ["quality"],
        recipe,
        RunConfig(**run),
        False,
        label="demo/probe_vit",
    )


def test_a_nan_first_score_does_not_stay_best(data, monkeypatch):
    real, calls = train_module._score, {"n": 0}

    def nan_first_epoch(pred, target):
        calls["n"] += 1
        return math.nan if calls["n"] <= 2 else real(pred, target)  # epoch 0: val and test

    monkeypatch.setattr(train_module, "_score", nan_first_epoch)
    (result,) = _train(data)
    assert result.best_epoch > 0
    assert math.isnan(result.curves[0]["val_score"])


def test_a_diverging_loss_stops_naming_run_split_and_epoch(data):
    with pytest.raises(
        TrainingDiverged, match=r"demo/probe_vit, split 0, epoch \d+: training loss is (nan|inf)"
    ):
        _train(data, lr=1e30)


def test_non_finite_predictions_stop_training_naming_images(data, monkeypatch):
    real = train_module.predict

    def nan_for_one_row(head, features, rows, batch_size, device):
        out = real(head, features, rows, batch_size, device)
        out[1] = np.nan
        return out

    monkeypatch.setattr(train_module, "predict", nan_for_one_row)
    with pytest.raises(
        TrainingDiverged, match=r"demo/probe_vit, split 0, epoch 0: 1 non-finite val predictions"
    ):
        _train(data)


def test_evaluate_names_non_finite_predictions():
    pred = pd.DataFrame(
        {"split": 0, "part": "test", "image_id": ["a", "b", "c"], "pred_quality": [1.0, np.inf, 2.0]}
    ).assign(target_quality=[1.0, 2.0, 3.0])
    manifest = pd.DataFrame({"image_id": ["a", "b", "c"], "generator": "g", "variant": ""})
    with pytest.raises(
        ValueError,
        match=r"runs/demo/x/predictions.csv: 1 non-finite predictions in split\(s\) \[0\], images \['b'\]",
    ):
        evaluate_predictions(
            pred, manifest, ["quality"], Bootstrap(resamples=0), source="runs/demo/x/predictions.csv"
        )


def test_the_control_never_selects_on_the_true_test_mos(data, monkeypatch):
    """Under select: test_oracle the control picks its epoch on a permutation of the test MOS."""
    manifest, _, splits = data
    truth = manifest.set_index("image_id").loc[splits[0]["test"], "mos_quality"].to_numpy()
    seen = []
    real = train_module._score

    def recording(pred, target):
        seen.append(target[:, 0].copy())
        return real(pred, target)

    monkeypatch.setattr(train_module, "_score", recording)
    (result,) = _train(data, select="test_oracle", shuffle_labels=True)
    test_targets = [t for t in seen if len(t) == len(truth)]
    assert test_targets and all(np.allclose(np.sort(t), np.sort(truth)) for t in test_targets)
    assert not any(np.allclose(t, truth) for t in test_targets)
    scored = result.predictions.query("part == 'test'")["target_quality"].to_numpy()
    np.testing.assert_allclose(scored, truth, rtol=1e-6)  # yet it is scored on the true MOS


@pytest.mark.parametrize("head", ["ma_agiqa", "semantic_only"])
def test_reordered_prompts_give_the_same_predictions(head):
    torch.manual_seed(0)
    batch = {"vit": torch.randn(3, 64, 16), "semantic": torch.randn(3, 2, 12)}
    shapes = {"vit": (64, 16), "semantic": (2, 12)}
    cfg = {"embed_dim": 16, "dim_mlp": 16, "afm_width": 16, "shared_hidden": 16, "score_act": "softplus"}
    if head == "semantic_only":
        batch.pop("vit"), shapes.pop("vit"), cfg.pop("embed_dim"), cfg.pop("dim_mlp"), cfg.pop("score_act")
    outs = []
    for prompts, rows in (
        (["semantic_content", "coherence"], [0, 1]),
        (["coherence", "semantic_content"], [1, 0]),
    ):
        torch.manual_seed(1)
        model = create_head(head, 1, shapes, prompts=prompts, **cfg).eval()
        outs.append(model({**batch, "semantic": batch["semantic"][:, rows]}))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_a_stream_the_store_lacks_is_named():
    shapes = {"vit": (64, 16), "semantic": (2, 12)}
    with pytest.raises(
        ValueError,
        match=r"fusion.streams names \['coherence'\].*their prompts are \['semantic_content', 'aesthetics'\]",
    ):
        create_head(
            "ma_agiqa", 1, shapes, prompts=["semantic_content", "aesthetics"], embed_dim=16, dim_mlp=16
        )


def test_train_stage_binds_streams_by_the_store_prompt_names(params):
    from stages.train import head_config, nest

    p = nest({"ma_agiqa": params["ma_agiqa"], "fusion": params["fusion"], "train": params["train"]})
    _, kwargs, _ = head_config(
        "ma_agiqa", "ma_agiqa", p, [], semantic_prompts=["coherence", "semantic_content"]
    )
    assert kwargs["prompts"] == ["coherence", "semantic_content"]


def _results(k: int) -> list[SplitResult]:
    frame = pd.DataFrame(
        {"split": 0, "part": "test", "image_id": ["a"], "target_quality": [1.0], "pred_quality": [1.0]}
    )
    one = np.ones(1, np.float32)
    return [SplitResult(0, {"w": torch.ones(2)}, frame, [{"epoch": 0}], 0 * one, one) for _ in range(k)]


def test_a_crash_while_writing_a_run_leaves_the_previous_run_and_no_complete_looking_folder(
    tmp_path, monkeypatch
):
    from pipeline.evaluation import evaluate_run
    from stages.train import write_run

    out = tmp_path / "runs" / "demo" / "probe_vit"
    write_run(out, _results(2), {"outputs": ["quality"], "run": "previous"})
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save, calls = safetensors.torch.save_file, {"n": 0}

    def disk_full(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_run(out, _results(3), {"outputs": ["quality"], "run": "new"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    half = out.with_name("probe_vit.partial")
    assert half.is_dir() and not (half / "run.json").exists()
    with pytest.raises(FileNotFoundError, match=r"probe_vit.partial/run.json missing"):
        evaluate_run(half, pd.DataFrame(), Bootstrap(resamples=0))


def test_sigkill_while_writing_a_run_leaves_no_run_folder(tmp_path):
    script = (
        "import os, signal, sys, numpy as np, pandas as pd, safetensors.torch as st, torch\n"
        "from pipeline.train import SplitResult\n"
        "from stages.train import write_run\n"
        "real = st.save_file\n"
        "def save(tensors, path):\n"
        "    if path.endswith('split1.safetensors'): os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(tensors, path)\n"
        "st.save_file = save\n"
        "frame = pd.DataFrame({'split': [0], 'part': ['test'], 'image_id': ['a']})\n"
        "one = np.ones(1, np.float32)\n"
        "result = SplitResult(0, {'w': torch.ones(1)}, frame, [], one, one)\n"
        "write_run(__import__('pathlib').Path(sys.argv[1]), [result] * 3, {})\n"
    )
    out = tmp_path / "runs" / "demo" / "ma_agiqa"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT)
    assert proc.returncode == -9
    assert not out.exists()
    assert sorted(p.name for p in out.with_name("ma_agiqa.partial").iterdir()) == ["split0.safetensors"]
