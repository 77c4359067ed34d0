"""load_rgb for every image mode, and check_images on broken, missing and misplaced files."""

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.data import check_images, load_rgb, validate_manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def saved(tmp_path, image: Image.Image, name: str, **kwargs) -> np.ndarray:
    image.save(tmp_path / name, **kwargs)
    out = load_rgb(tmp_path / name)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)


def test_rgb_passes_through(tmp_path):
    pixels = np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (saved(tmp_path, Image.fromarray(pixels), "a.png") == pixels).all()


def test_grayscale_and_bilevel(tmp_path):
    assert (saved(tmp_path, Image.new("L", (4, 4), 77), "g.png") == 77).all()
    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((0, 0), 1)
    out = saved(tmp_path, bilevel, "b.png")
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (0, 0, 0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100], [32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = saved(tmp_path, image, "g16.png")
    assert out[..., 0].tolist() == [[0, 100], [128, 255]]
    assert (out[..., 0] == out[..., 2]).all()


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black: shown as background
    out = saved(tmp_path, rgba, "a.png")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
    half = saved(tmp_path, Image.new("RGBA", (1, 1), (0, 0, 255, 128)), "h.png")
    assert tuple(half[0, 0]) == pytest.approx((127, 127, 255), abs=1)
    gray_alpha = saved(tmp_path, Image.new("LA", (1, 1), (0, 0)), "la.png")
    assert tuple(gray_alpha[0, 0]) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    out = saved(tmp_path, palette, "p.png")
    assert out[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    out = saved(tmp_path, palette, "pt.png", transparency=0)
    assert out[0].tolist() == [[255, 255, 255], [200, 100, 50]]


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (255, 0, 0, 0))  # pure cyan
    cmyk.putpixel((1, 0), (0, 0, 0, 255))  # pure black
    out = saved(tmp_path, cmyk, "c.tif")
    assert out[0].tolist() == [[0, 255, 255], [0, 0, 0]]
    jpeg = saved(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "c.jpg", quality=95)
    assert np.abs(jpeg[4, 4].astype(int) - [255, 0, 255]).max() <= 8  # magenta


def test_load_rgb_closes_the_file(tmp_path):
    Image.new("RGB", (3, 3)).save(tmp_path / "x.png")
    image = load_rgb(tmp_path / "x.png")
    (tmp_path / "x.png").unlink()
    assert image.getpixel((0, 0)) == (0, 0, 0)


@pytest.fixture
def dataset(tmp_path):
    """A root with two good images and one of each kind of bad file; manifest rows 2..9."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    noisy = Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8))
    noisy.save(root / "good.png")
    noisy.save(root / "sub" / "good.jpg", quality=90)
    (root / "empty.png").write_bytes(b"")
    jpg = (root / "sub" / "good.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = (root / "good.png").read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "notes.png").write_text("not an image")
    (root / "folder.png").mkdir()
    names = [
        "good.png",
        "sub/good.jpg",
        "empty.png",
        "cut.jpg",
        "cut.png",
        "notes.png",
        "gone.png",
        "folder.png",
    ]
    frame = pd.DataFrame(
        {
            "image_id": names,
            "path": names,
            "prompt": "p",
            "mos_quality": 1.0,
            "mos_align": np.nan,
            "group": "p",
            "generator": "g",
            "variant": "",
        },
        index=range(2, 2 + len(names)),
    )
    return root, validate_manifest(frame, "labels.csv")


def test_check_images_skip_returns_bad_table(dataset):
    root, manifest = dataset
    good, bad = check_images(manifest, root, on_bad_image="skip")
    assert good["path"].to_list() == ["good.png", "sub/good.jpg"]
    assert list(bad.columns) == ["image_id", "path", "row", "reason"]
    reasons = dict(zip(bad["path"], bad["reason"], strict=True))
    assert reasons["empty.png"] == "empty file"
    assert reasons["gone.png"] == "missing file"
    assert reasons["folder.png"] == "not a regular file"
    assert "truncated" in reasons["cut.jpg"] and "truncated" in reasons["cut.png"]
    assert "cannot identify image" in reasons["notes.png"]
    assert bad.set_index("path").loc["cut.jpg", "row"] == 5


def test_check_images_error_names_file_and_row(dataset):
    root, manifest = dataset
    with pytest.raises(ValueError, match="6 bad image") as err:
        check_images(manifest, root)
    message = str(err.value)
    assert f"{root / 'empty.png'} (row 4): empty file" in message
    assert f"{root / 'gone.png'} (row 8): missing file" in message
    assert "on_bad_image: skip" in message
    good, bad = check_images(manifest.iloc[:2], root)
    assert len(good) == 2 and bad.empty


def test_missing_root_explains_layout_and_source(dataset, tmp_path):
    _, manifest = dataset
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        check_images(manifest, tmp_path / "AGIQA-3K", dataset="agiqa3k")
    message = str(err.value)
    assert str(tmp_path / "AGIQA-3K") in message
    assert "github.com/lcysyzxdxc/AGIQA-3k-Database" in message
    assert str(tmp_path / "AGIQA-3K" / "good.png") in message


def test_root_without_any_image_is_a_layout_error(dataset, tmp_path):
    _, manifest = dataset
    (tmp_path / "wrong").mkdir()
    with pytest.raises(FileNotFoundError, match="none of the 8 images was found"):
        check_images(manifest, tmp_path / "wrong", on_bad_image="skip")


def test_on_bad_image_value_is_checked(dataset):
    root, manifest = dataset
    with pytest.raises(ValueError, match="on_bad_image"):
        check_images(manifest, root, on_bad_image="ignore")
