"""Bad images and bad label files, generated here: each is converted correctly or reported naming its
file (and row, column) before any work, and `prepare` leaves nothing half-written behind.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dvc_repo import copy_project
from PIL import Image

from pipeline.data import ManifestError, check_images, load_labels, load_rgb
from pipeline.data.images import ImageChanged
from stages import read_manifest

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _jpeg(image: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **kw)
    return out.getvalue()


RGB = Image.fromarray(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8))


def _bad_crc(data: bytes) -> bytes:
    """The PNG with its IHDR chunk's CRC flipped."""
    crc_at = 8 + 8 + 13  # signature, IHDR length + type, IHDR data
    return data[:crc_at] + bytes([data[crc_at] ^ 0xFF]) + data[crc_at + 1 :]


BAD_IMAGES = {
    "zero bytes": (b"", "empty file"),
    "truncated JPEG": (_jpeg(RGB)[:400], "not a readable image"),
    "bad-CRC PNG": (_bad_crc(_png(RGB)), "not a readable image"),
    "text named .jpg": (b"these are not the pixels you are looking for", "not a readable image"),
    "decompression bomb": (
        _png(RGB),
        "not a readable image (DecompressionBombError: Image size (2400 pixels)",
    ),
}


def _manifest(names: list[str]) -> pd.DataFrame:
    from pipeline.data import validate_manifest

    frame = pd.DataFrame(
        {"image_id": names, "path": names, "prompt": "p", "mos_quality": 1.0, "mos_align": np.nan}
    ).assign(group="p", generator="g", variant="")
    frame.index = range(2, 2 + len(names))
    return validate_manifest(frame, "labels.csv")


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_is_reported_with_its_path_and_row(tmp_path, monkeypatch, case):
    data, reason = BAD_IMAGES[case]
    if case == "decompression bomb":  # 2,400 pixels against a limit of 100: PIL's bomb error
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    (tmp_path / "good.png").write_bytes(_png(Image.new("RGB", (5, 5))))
    (tmp_path / "bad.jpg").write_bytes(data)
    manifest = _manifest(["good.png", "bad.jpg"])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad.jpg'} (row 3): {reason}")):
        check_images(manifest, tmp_path, on_bad_image="error")
    good, bad = check_images(manifest, tmp_path, on_bad_image="skip")
    assert good["image_id"].tolist() == ["good.png"] and bad["path"].tolist() == ["bad.jpg"]
    assert reason in bad["reason"].iloc[0]


CONVERTED = {
    "16-bit grey": (Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)), (255, 255, 255)),
    "CMYK": (Image.new("CMYK", (4, 5), (0, 255, 255, 0)), (255, 0, 0)),
    "palette with transparency": (None, (255, 255, 255)),
    "1 x 1": (Image.new("RGB", (1, 1), (10, 20, 30)), (10, 20, 30)),
}


@pytest.mark.parametrize("case", list(CONVERTED))
def test_odd_but_valid_images_are_converted_as_a_viewer_shows_them(tmp_path, case):
    image, first_pixel = CONVERTED[case]
    if image is None:
        image = Image.new("P", (4, 5), 0)
        image.putpalette([0, 0, 0] * 256)
        image.info["transparency"] = 0  # index 0, black, fully transparent: shown as the white page
    path = tmp_path / "x.png"
    image.save(path) if image.mode != "CMYK" else image.save(tmp_path / "x.jpg")
    path = path if path.exists() else tmp_path / "x.jpg"
    good, bad = check_images(_manifest([path.name]), tmp_path)
    assert bad.empty and len(good) == 1
    rgb = load_rgb(path, good["sha256"].iloc[0])
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert np.abs(np.asarray(rgb)[0, 0].astype(int) - first_pixel).max() <= 2


def test_exif_orientation_is_applied(tmp_path):
    """A phone JPEG stored sideways with orientation 6 (rotate 90 degrees clockwise to view)."""
    stored = Image.new("RGB", (40, 20), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # red on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    good, _ = check_images(_manifest(["phone.jpg"]), tmp_path)
    upright = np.asarray(load_rgb(tmp_path / "phone.jpg", good["sha256"].iloc[0]))
    assert upright.shape == (40, 20, 3)  # portrait, as a viewer shows it
    assert upright[2, 10, 0] > 200 and upright[2, 10, 1] < 60  # the red edge is now on top


def test_a_replaced_image_is_refused_by_its_manifest_digest(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(RGB))
    good, _ = check_images(_manifest(["a.png"]), tmp_path)
    (tmp_path / "a.png").write_bytes(_png(RGB.rotate(90)))
    with pytest.raises(ImageChanged, match=r"a\.png changed since prepare .*run `dvc repro`"):
        load_rgb(tmp_path / "a.png", good["sha256"].iloc[0])


CSV = {"columns": {"image": "name", "prompt": "prompt", "mos_quality": "mos"}}
BAD_LABELS = {
    "empty file": (b"", r"labels\.csv: the file is empty"),
    "header only": (b"name,prompt,mos\n", r"labels\.csv: a header and no rows"),
    "UTF-16": ("name,prompt,mos\na.png,a cat,3\n".encode("utf-16"), r"labels\.csv: not UTF-8 text"),
    "Latin-1": ("name,prompt,mos\na.png,caf\xe9,3\n".encode("latin-1"), r"labels\.csv: not UTF-8 text"),
    "misspelled column": (
        b"name,prompt,moss\na.png,a cat,3\n",
        r"missing columns 'mos' \(did you mean 'moss'\?\)",
    ),
    "NaN MOS": (
        b"name,prompt,mos\na.png,a cat,3\nb.png,a dog,nan\n",
        r"mos_quality is missing or not finite in rows 3",
    ),
    "inf MOS": (b"name,prompt,mos\na.png,a cat,inf\n", r"mos_quality is missing or not finite in rows 2"),
    "text MOS": (b"name,prompt,mos\na.png,a cat,good\n", r"row 2: mos_quality 'good' is not a number"),
    "duplicate names": (
        b"name,prompt,mos\na.png,a cat,3\na.png,a cat,2\n",
        r"image 'a.png' appears more than once, rows 2, 3",
    ),
    "empty prompt": (
        b"name,prompt,mos\na.png,a cat,3\nb.png,,2\n",
        r"empty or blank prompt in rows 3 \(column prompt\)",
    ),
    "whitespace prompt": (b"name,prompt,mos\na.png,a cat,3\nb.png,  ,2\n", r"blank prompt in rows 3"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_a_bad_label_file_is_named_with_row_and_column(tmp_path, case):
    data, message = BAD_LABELS[case]
    (tmp_path / "labels.csv").write_bytes(data)
    with pytest.raises(ManifestError, match=message):
        load_labels("csv", tmp_path / "labels.csv", **CSV)


def test_newlines_and_non_ascii_prompts_survive_the_manifest_round_trip(tmp_path):
    prompts = ['a "quoted" cat\non two lines', "ein Hund über dem Fluss, 日本の猫"]
    pd.DataFrame({"name": ["a.png", "b.png"], "prompt": prompts, "mos": [3, 2]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    manifest = load_labels("csv", tmp_path / "labels.csv", **CSV)
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    assert read_manifest(tmp_path / "manifest.csv")["prompt"].tolist() == prompts


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's code and params with a 'mine' dataset (csv kind) in data/raw/mine."""
    tmp = tmp_path_factory.mktemp("project")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = ["mine"]
    params["data"]["mine"] = {"kind": "csv", "labels": "labels.csv", "options": CSV, "on_bad_image": "error"}
    return copy_project(tmp, params)


def _prepare(project: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "stages.prepare", "mine", "data/mine"]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["empty file", "header only", "text MOS", "bad image", "no folder"])
def test_prepare_stops_before_any_work_and_leaves_nothing_behind(project, case):
    raw = project / "data" / "raw" / "mine"
    shutil.rmtree(project / "data", ignore_errors=True)
    if case != "no folder":
        raw.mkdir(parents=True)
        (raw / "a.png").write_bytes(_png(RGB))
        (raw / "b.png").write_bytes(b"" if case == "bad image" else _png(RGB))
        labels = {
            "empty file": b"",
            "header only": b"name,prompt,mos\n",
            "text MOS": b"name,prompt,mos\na.png,cat,x\n",
        }
        (raw / "labels.csv").write_bytes(labels.get(case, b"name,prompt,mos\na.png,cat,3\nb.png,dog,2\n"))
    proc = _prepare(project)
    assert proc.returncode != 0
    expected = {
        "empty file": "labels.csv: the file is empty",
        "header only": "labels.csv: a header and no rows",
        "text MOS": "row 2: mos_quality 'x' is not a number",
        "bad image": "b.png (row 3): empty file",
        "no folder": "dataset folder data/raw/mine does not exist",
    }[case]
    assert expected in " ".join(proc.stderr.split()), proc.stderr[-1500:]
    data = project / "data"
    assert not data.exists() or [p.name for p in data.iterdir()] == ["raw"]  # no data/mine, no .partial
