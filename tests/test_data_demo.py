"""The demo dataset: same seed same bytes, the promised structure, and labels the pixels carry."""

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from pipeline.data import MANIFEST_COLUMNS, check_images, generate_demo, manifest_hash
from pipeline.data.demo import COLOURS, GENERATORS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, generate_demo(root, seed=0, n_prompts=60, images_per_prompt=6, size=112)


def digests(root) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "images").iterdir())}


def test_same_seed_same_bytes_and_manifest(tmp_path):
    a = generate_demo(tmp_path / "a", seed=3, n_prompts=12, images_per_prompt=4, size=96)
    b = generate_demo(tmp_path / "b", seed=3, n_prompts=12, images_per_prompt=4, size=96)
    pd.testing.assert_frame_equal(a, b)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    c = generate_demo(tmp_path / "c", seed=4, n_prompts=12, images_per_prompt=4, size=96)
    assert manifest_hash(c) != manifest_hash(a)
    assert digests(tmp_path / "c") != digests(tmp_path / "a")


def test_structure(demo):
    root, m = demo
    assert list(m.columns) == list(MANIFEST_COLUMNS)
    assert len(m) == 360 and m["image_id"].is_unique
    assert m["group"].nunique() == 60 and (m["group"] == m["prompt"]).all()
    assert (m.groupby("group").size() == 6).all()
    assert (m.groupby("group")["generator"].nunique() >= 4).all()
    assert set(m["generator"]) == set(GENERATORS)
    assert set(m["variant"]) == {"blur", "noise", "jpeg", "cast"}
    assert m["mos_quality"].between(0, 5).all() and m["mos_align"].between(0, 5).all()
    assert m["mos_quality"].std() > 0.5
    good, bad = check_images(m, root)
    assert len(good) == 360 and bad.empty
    with Image.open(root / m["path"].iloc[0]) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (112, 112))


def test_generators_differ(demo):
    _, m = demo
    by_generator = m.groupby("generator")
    assert by_generator["mos_quality"].mean().max() - by_generator["mos_quality"].mean().min() > 0.8
    favourite = by_generator["variant"].agg(lambda v: v.value_counts().idxmax())
    assert favourite.to_dict() == {name: spec[0] for name, spec in GENERATORS.items()}


def laplacian(path) -> np.ndarray:
    x = np.asarray(Image.open(path), dtype=np.float64).mean(axis=2)
    return 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]


def test_quality_mos_is_visible_in_pixels(demo):
    root, m = demo
    blur, noise = m[m["variant"] == "blur"], m[m["variant"] == "noise"]
    edge = [np.abs(laplacian(root / p)).max() for p in blur["path"]]
    grain = [np.median(np.abs(laplacian(root / p))) for p in noise["path"]]
    assert spearmanr(edge, blur["mos_quality"]).statistic > 0.6  # sharper edges, higher MOS
    # more grain, lower MOS (the clean background's fine texture also has Laplacian energy)
    assert spearmanr(grain, noise["mos_quality"]).statistic < -0.5


def test_alignment_mos_follows_drawn_content(demo):
    root, m = demo

    def prompt_colour_share(row) -> float:
        pixels = np.asarray(Image.open(root / row.path), dtype=np.float64)
        target = np.array(COLOURS[row.prompt.split()[2]])
        return float((np.linalg.norm(pixels - target, axis=2) < 80).mean())

    share = np.array([prompt_colour_share(row) for row in m.itertuples()])
    align = m["mos_align"].to_numpy()
    # solid, right content: the prompt's colour is on screen; missing or faint wrong objects: it is not
    solid, absent = align >= 3.5, align < 1.5
    assert solid.sum() >= 60 and absent.sum() >= 10
    assert (share[solid] > 0.02).mean() > 0.85
    assert (share[absent] > 0.02).mean() < 0.3
    assert spearmanr(share, align).statistic > 0.35


def test_regeneration_replaces_old_images(tmp_path):
    generate_demo(tmp_path, seed=0, n_prompts=5, images_per_prompt=4, size=96)
    (tmp_path / "images" / "keep.txt").write_text("user file")
    m = generate_demo(tmp_path, seed=0, n_prompts=3, images_per_prompt=2, size=96)
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == sorted(m["path"].str[7:])
    assert (tmp_path / "images" / "keep.txt").exists()


def test_too_many_prompts(tmp_path):
    with pytest.raises(ValueError, match="distinct prompts"):
        generate_demo(tmp_path, seed=0, n_prompts=10_000, images_per_prompt=1, size=96)
