"""The shared training loop: it learns a learnable target, fails on shuffled labels, selects honestly."""

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.features import Features
from pipeline.heads import create_head
from pipeline.store import FeatureStore, StoreWriter
from pipeline.train import Recipe, RunConfig, output_names, train_protocol

N, D = 240, 16


def _dataset(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 4, D)).astype(np.float16)
    w = rng.normal(size=D)
    quality = x.astype(np.float64).mean(axis=1) @ w
    ids = [f"img{i:03d}" for i in range(N)]
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "prompt": [f"p{i % 30}" for i in range(N)],
            "mos_quality": quality,
            "mos_align": np.nan,
        }
    )
    path = tmp_path / "vit.h5"
    with StoreWriter(path, ids, {"encoder": "vit"}, {"features": ((4, D), "float16")}, chunk_rows=64) as w_:
        for start, stop in w_.pending():
            w_.write(start, stop, {"features": x[start:stop]})
    perm = rng.permutation(ids)
    splits = [
        {"train": list(perm[:160]), "val": list(perm[160:200]), "test": list(perm[200:])},
        {"train": list(perm[80:]), "val": list(perm[40:80]), "test": list(perm[:40])},
    ]
    return manifest, FeatureStore(path), splits


def _run(manifest, store, splits, budget=2**30, select="val", epochs=40, shuffle_labels=False):
    features = Features({"vit": store}, manifest["image_id"].tolist(), budget_bytes=budget)

    def build():
        return create_head("probe", n_outputs=1, input_shapes=features.shapes, encoder="vit", hidden=0)

    recipe = Recipe(epochs=epochs, batch_size=16, lr=0.01, optimizer="adam")
    return train_protocol(
        build,
        features,
        manifest,
        splits,
        ["quality"],
        recipe,
        RunConfig(select=select, shuffle_labels=shuffle_labels),
        progress=False,
    )


def _test_srcc(results):
    from scipy import stats

    return [
        stats.spearmanr(
            r.predictions.query("part == 'test'")["pred_quality"],
            r.predictions.query("part == 'test'")["target_quality"],
        ).statistic
        for r in results
    ]


def test_learns_linear_target_and_shuffled_control_does_not(tmp_path):
    manifest, store, splits = _dataset(tmp_path)
    assert min(_test_srcc(_run(manifest, store, splits))) > 0.8
    shuffled = manifest.assign(mos_quality=np.random.default_rng(1).permutation(manifest["mos_quality"]))
    assert max(np.abs(_test_srcc(_run(shuffled, store, splits)))) < 0.4


def test_shuffle_labels_control_learns_nothing_but_is_scored_on_true_mos(tmp_path):
    manifest, store, splits = _dataset(tmp_path)
    results = _run(manifest, store, splits, shuffle_labels=True)
    # the true labels give > 0.8 on every split (above); a random linear map of 16 features gives ~N(0, 0.25)
    assert max(np.abs(_test_srcc(results))) < 0.6
    truth = manifest.set_index("image_id")["mos_quality"]
    for r in results:
        test = r.predictions.query("part == 'test'")
        np.testing.assert_allclose(test["target_quality"], truth[test["image_id"]].to_numpy(), rtol=1e-6)


def test_shuffled_labels_permute_within_train_and_within_val():
    from pipeline.train import shuffled_labels

    targets = np.arange(30, dtype=np.float32)[:, None]
    parts = {"train": np.arange(0, 20), "val": np.arange(20, 25), "test": np.arange(25, 30)}
    out = shuffled_labels(targets, parts, np.random.default_rng(0))
    assert sorted(out[:20, 0]) == list(range(20)) and not np.array_equal(out[:20], targets[:20])
    assert sorted(out[20:25, 0]) == list(range(20, 25))
    np.testing.assert_array_equal(out[25:], targets[25:])


@pytest.mark.parametrize(
    "rows_per_block", [50, 16, 1], ids=["blocks of 50 rows", "one batch", "below a batch"]
)
def test_streamed_training_equals_resident_training_exactly(tmp_path, rows_per_block):
    """The memory budget is a runtime (speed) setting: streaming must change no number."""
    manifest, store, splits = _dataset(tmp_path)
    resident = _run(manifest, store, splits[:1], epochs=6)
    tiny_budget = 4 * D * 2 * rows_per_block
    streamed = _run(manifest, store, splits[:1], budget=tiny_budget, epochs=6)
    assert Features({"vit": store}, manifest["image_id"].tolist(), tiny_budget).resident is None
    assert resident[0].best_epoch == streamed[0].best_epoch
    pd.testing.assert_frame_equal(resident[0].predictions, streamed[0].predictions, check_exact=True)
    assert resident[0].curves == streamed[0].curves


def test_predictions_carry_every_image_of_val_and_test_once_per_split(tmp_path):
    manifest, store, splits = _dataset(tmp_path)
    results = _run(manifest, store, splits, epochs=2)
    for split, result in zip(splits, results, strict=True):
        pred = result.predictions
        assert sorted(pred.query("part == 'test'")["image_id"]) == sorted(split["test"])
        assert sorted(pred.query("part == 'val'")["image_id"]) == sorted(split["val"])
        assert 0 <= result.best_epoch < 2
        assert len(result.curves) == 2


def test_selection_needs_a_val_part(tmp_path):
    manifest, store, splits = _dataset(tmp_path)
    no_val = [{**s, "val": []} for s in splits]
    with pytest.raises(ValueError, match="select: val needs a 'val' part"):
        _run(manifest, store, no_val, epochs=1)
    oracle = _run(manifest, store, no_val, select="test_oracle", epochs=3)
    best = oracle[0].best_epoch
    assert oracle[0].curves[best]["test_score"] == max(c["test_score"] for c in oracle[0].curves)


def test_output_names_follow_labels():
    frame = pd.DataFrame({"mos_quality": [1.0, 2.0], "mos_align": [np.nan, 1.0]})
    assert output_names(frame) == ["quality"]
    assert output_names(frame.fillna(0.5)) == ["quality", "alignment"]
    with pytest.raises(ValueError, match="mos_align has missing values"):
        output_names(frame, ["quality", "alignment"])


def test_recipe_and_run_config_validate():
    with pytest.raises(ValueError, match="schedule"):
        Recipe(epochs=1, batch_size=1, lr=1e-3, schedule="linear")
    with pytest.raises(ValueError, match="select"):
        RunConfig(select="best")


def test_cosine_step_schedule_cycles_like_ma_agiqa():
    """MA-AGIQA steps CosineAnnealingLR(T_max=50) per batch: lr returns to its start after 100 steps."""
    from pipeline.train import _scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-5)
    sched = _scheduler(opt, Recipe(epochs=1, batch_size=8, lr=1e-5, schedule="cosine_step"))
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[50] == pytest.approx(0.0, abs=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
