"""Cached augmented views: the ViT encodes transformed images, training draws them, evaluation never."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.encoders import create_encoder
from pipeline.features import Features
from pipeline.heads import create_head
from pipeline.store import FeatureStore, StoreWriter
from pipeline.train import Recipe, RunConfig, train_protocol

# The views by PIL's own transposes of the image, independent of the encoder's tensor ops.
PIL_VIEWS = {
    "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
    "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
}


@pytest.fixture(scope="module")
def vit_cfg(params):
    return params["extract"]["vit"]


def test_each_view_is_the_encoder_on_the_transformed_image(vit_cfg):
    """At the model's own size resizing is the identity, so PIL-transposed inputs are exact references."""
    views = ["identity", *PIL_VIEWS]
    enc = create_encoder("vit", {**vit_cfg, "views": views}, "demo")
    plain = create_encoder("vit", vit_cfg, "demo")
    rng = np.random.default_rng(0)
    size = vit_cfg["demo"]["img_size"]
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
    out = enc.encode(torch.stack([enc.preprocess(im) for im in images]))
    n_tokens, channels = plain.shape
    assert enc.schema()["views"] == ((len(PIL_VIEWS), n_tokens, channels), "float16")
    assert "views" not in plain.schema() and enc.provenance()["views"] == views
    assert out["views"].shape == (2, len(PIL_VIEWS), n_tokens, channels)
    pixels = torch.stack([plain.preprocess(im) for im in images])
    np.testing.assert_array_equal(out["features"], plain.encode(pixels)["features"])
    for k, (name, transpose) in enumerate(PIL_VIEWS.items()):
        ref = plain.encode(torch.stack([plain.preprocess(im.transpose(transpose)) for im in images]))[
            "features"
        ]
        np.testing.assert_allclose(out["views"][:, k], ref, rtol=1e-3, atol=1e-3, err_msg=name)
        assert np.abs(out["views"][:, k].astype(np.float32) - out["features"]).max() > 0.1, name


def test_views_must_be_known_and_start_with_identity(vit_cfg):
    with pytest.raises(ValueError, match="unknown views \\['flip'\\]"):
        create_encoder("vit", {**vit_cfg, "views": ["identity", "flip"]}, "demo")
    with pytest.raises(ValueError, match="starting with identity"):
        create_encoder("vit", {**vit_cfg, "views": ["hflip", "identity"]}, "demo")


N, T, C, V = 40, 3, 4, 3  # rows, tokens, channels, extra views


def _store(tmp_path, views: bool, name="vit.h5") -> FeatureStore:
    """Row i holds i in channel 0; channel 1 is 0 for identity and k + 1 for extra view k."""
    ids = [f"img{i:03d}" for i in range(N)]
    features = np.zeros((N, T, C), np.float16)
    features[..., 0] = np.arange(N)[:, None]
    schema = {"features": ((T, C), "float16")}
    arrays = {"features": features}
    if views:
        extra = np.repeat(features[:, None], V, axis=1)
        extra[..., 1] = np.arange(1, V + 1)[None, :, None]
        schema["views"] = ((V, T, C), "float16")
        arrays["views"] = extra
    with StoreWriter(tmp_path / name, ids, {"encoder": "vit"}, schema) as writer:
        writer.write(0, N, arrays)
    return FeatureStore(tmp_path / name)


def _seen(features: Features, rng, view_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Per delivered row: (row index, view id) read back from the batch contents."""
    rows, view_ids = [], []
    for batch_rows, batch in features.batches(np.arange(N), 8, rng=rng, view_prob=view_prob):
        x = batch["vit"].float().numpy()
        np.testing.assert_array_equal(x[..., 0], np.repeat(batch_rows[:, None], T, axis=1))
        assert (x[..., 1] == x[:, :1, 1]).all()  # a whole row comes from one view
        rows.append(batch_rows)
        view_ids.append(x[:, 0, 1].astype(int))
    return np.concatenate(rows), np.concatenate(view_ids)


@pytest.mark.parametrize("budget", [1 << 20, 2 * T * C * (V + 1) * 10], ids=["resident", "streamed"])
def test_training_mixes_views_and_evaluation_sees_identity(tmp_path, budget):
    store = _store(tmp_path, views=True)
    features = Features({"vit": store}, store.ids, budget)
    assert (features.resident is None) == (budget < (1 << 20))
    rows, ids = _seen(features, None, view_prob=0.5)
    assert sorted(rows) == list(range(N)) and (ids == 0).all()
    rng = np.random.default_rng(0)
    ids = np.concatenate([_seen(features, rng, view_prob=0.5)[1] for _ in range(20)])
    assert set(ids) == set(range(V + 1))
    assert abs((ids == 0).mean() - 0.5) < 0.08
    assert (_seen(features, rng, view_prob=1.0)[1] > 0).all()
    assert (_seen(features, rng, view_prob=0.0)[1] == 0).all()


def test_view_draws_do_not_depend_on_the_memory_budget(tmp_path):
    store = _store(tmp_path, views=True)
    seen = [
        _seen(Features({"vit": store}, store.ids, budget), np.random.default_rng(3), view_prob=0.5)
        for budget in (1 << 20, 2 * T * C * (V + 1) * 10)
    ]
    np.testing.assert_array_equal(seen[0][0], seen[1][0])
    np.testing.assert_array_equal(seen[0][1], seen[1][1])


def test_views_count_in_the_memory_budget(tmp_path):
    store = _store(tmp_path, views=True)
    identity_only = N * T * C * 2
    assert Features({"vit": store}, store.ids, identity_only).resident is None
    assert Features({"vit": store}, store.ids, identity_only * (V + 1)).resident is not None


def test_views_of_another_shape_are_refused(tmp_path):
    ids = [f"img{i}" for i in range(4)]
    schema = {"features": ((T, C), "float16"), "views": ((1, T, C + 1), "float16")}
    with StoreWriter(tmp_path / "vit.h5", ids, {"encoder": "vit"}, schema) as writer:
        writer.write(0, 4, {"features": np.zeros((4, T, C)), "views": np.zeros((4, 1, T, C + 1))})
    with pytest.raises(ValueError, match=r"vit\.h5 \(vit\): views rows"):
        Features({"vit": FeatureStore(tmp_path / "vit.h5")}, ids, 1 << 20)


def test_store_without_views_is_untouched_by_view_prob(tmp_path):
    """Same rows, same values and the same rng consumption as without augmentation."""
    store = _store(tmp_path, views=False)
    features = Features({"vit": store}, store.ids, 1 << 20)
    runs = []
    for view_prob in (0.0, 0.5):
        rng = np.random.default_rng(3)
        batches = [
            (r, b["vit"].clone()) for r, b in features.batches(np.arange(N), 8, rng=rng, view_prob=view_prob)
        ]
        runs.append((batches, rng.random()))
    (a, next_a), (b, next_b) = runs
    assert next_a == next_b
    np.testing.assert_array_equal(np.concatenate([r for r, _ in a]), np.random.default_rng(3).permutation(N))
    for (ra, xa), (rb, xb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra, rb)
        assert torch.equal(xa, xb)


def test_view_prob_is_validated():
    with pytest.raises(ValueError, match=r"train\.view_prob"):
        RunConfig(view_prob=1.5)


def test_training_uses_view_prob(tmp_path):
    """Views holding other images' features act as shuffled labels: with view_prob=1 the loss stays high."""
    rng = np.random.default_rng(0)
    n, d = 240, 16
    x = rng.normal(size=(n, 4, d)).astype(np.float16)
    ids = [f"img{i:03d}" for i in range(n)]
    quality = x.astype(np.float64).mean(axis=1) @ rng.normal(size=d)
    manifest = pd.DataFrame({"image_id": ids, "mos_quality": quality, "mos_align": np.nan})
    schema = {"features": ((4, d), "float16"), "views": ((1, 4, d), "float16")}
    with StoreWriter(tmp_path / "vit.h5", ids, {"encoder": "vit"}, schema) as writer:
        writer.write(0, n, {"features": x, "views": x[rng.permutation(n)][:, None]})
    store = FeatureStore(tmp_path / "vit.h5")
    features = Features({"vit": store}, ids, 1 << 20)
    perm = rng.permutation(ids)
    splits = [{"train": list(perm[:160]), "val": list(perm[160:200]), "test": list(perm[200:])}]

    def final_train_loss(view_prob: float) -> float:
        def build():
            return create_head("probe", n_outputs=1, input_shapes=features.shapes, encoder="vit", hidden=0)

        recipe = Recipe(epochs=20, batch_size=16, lr=0.01)
        (result,) = train_protocol(
            build, features, manifest, splits, ["quality"], recipe, RunConfig(view_prob=view_prob), False
        )
        return result.curves[-1]["train_loss"]

    assert final_train_loss(1.0) > 5 * final_train_loss(0.0)
