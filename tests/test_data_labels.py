"""Label loaders on the publishers' real files, the generic CSV loader, and bad label input."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data import MANIFEST_COLUMNS, ManifestError, load_labels, manifest_hash, validate_manifest
from pipeline.data.labels import agiqa1k_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def real(relative: str) -> Path:
    path = DATASETS / relative
    if not path.is_file():
        pytest.skip(f"{path} absent: the real label files live in ../shared/datasets")
    return path


def test_agiqa3k_rows_groups_generators_variants():
    m = load_labels("agiqa3k", real("agiqa-3k/data.csv"))
    assert list(m.columns) == list(MANIFEST_COLUMNS)
    assert len(m) == 2982 and m["image_id"].is_unique
    assert m["group"].nunique() == 300
    assert set(m["group"]) == {str(i) for i in range(300)}
    assert m["generator"].value_counts().to_dict() == {
        "sd1.5": 1200, "midjourney": 592, "AttnGAN": 300, "glide": 300, "xl2.2": 300, "DALLE2": 290,
    }  # fmt: skip
    assert m["variant"].value_counts().to_dict() == {
        "normal": 1786,
        "lowstep": 596,
        "highcorr": 300,
        "lowcorr": 300,
    }
    assert m["mos_align"].notna().all() and m["mos_quality"].between(0, 5).all()
    # CRLF line ends leave no stray carriage return in any text field
    assert not m[["image_id", "prompt"]].apply(lambda c: c.str.contains("\r")).any().any()
    first = m.iloc[0]
    assert (first["image_id"], first["group"], first["prompt"]) == (
        "AttnGAN_normal_000.jpg",
        "0",
        "statue of a man",
    )
    assert m.index[0] == 2  # file row numbers: header is row 1


def test_agiqa3k_image_dir_prefixes_path():
    m = load_labels("agiqa3k", real("agiqa-3k/data.csv"), image_dir="AGIQA-3K")
    assert m["path"].iloc[0] == "AGIQA-3K/AttnGAN_normal_000.jpg"
    assert m["image_id"].iloc[0] == "AttnGAN_normal_000.jpg"


def test_agiqa1k_xlsx_keeps_duplicate_row_with_unique_id():
    m = load_labels("agiqa1k", real("agiqa-1k/AIGC_MOS_Zscore.xlsx"))
    assert len(m) == 1080 and m["image_id"].is_unique
    assert m["group"].nunique() == 180
    assert m["generator"].value_counts().to_dict() == {"deepai": 720, "dreamStudio": 360}
    dup = m[m["path"] == "dreamStudio_8_9_1_1.jpg"]
    assert dup["image_id"].to_list() == ["dreamStudio_8_9_1_1.jpg", "dreamStudio_8_9_1_1.jpg#2"]
    assert dup["mos_quality"].round(6).to_list() == [0.441416, 2.084116]
    assert "dreamStudio_8_5_0_0.jpg" not in set(m["path"])
    assert m["image_id"].iloc[0] == "deepai_0_0_0_0.jpg"  # file order kept for the IP-IQA walk
    assert m["mos_align"].isna().all()


def test_agiqa1k_group_is_object_action_key():
    m = load_labels("agiqa1k", real("agiqa-1k/AIGC_MOS_Zscore.xlsx"))
    object_action = m["prompt"].str.split(", ").str[:2].str.join(", ")
    # one group <-> one (main object, action) pair, shared by both generators
    assert object_action.nunique() == 180
    assert (object_action.groupby(m["group"]).nunique() == 1).all()
    assert m.groupby("group")["generator"].nunique().max() == 2


def test_agiqa1k_prompts_rebuilt_from_names_match_xlsx():
    m = load_labels("agiqa1k", real("agiqa-1k/AIGC_MOS_Zscore.xlsx"))
    assert (m["path"].map(agiqa1k_prompt) == m["prompt"]).all()


def test_agiqa1k_csv_repairs_malformed_name():
    m = load_labels("agiqa1k", real("agiqa-1k/AIGC_all.csv"))
    xlsx = load_labels("agiqa1k", real("agiqa-1k/AIGC_MOS_Zscore.xlsx"))
    assert len(m) == 1080 and m["image_id"].is_unique
    assert {"dreamStudio_8_5_0_0.jpg", "dreamStudio_8_9_1_1.jpg"} <= set(m["path"])
    assert "dreamStudio_8_9_1_.jpg" not in set(m["path"])
    assert set(m["path"]) == set(xlsx["path"]) | {"dreamStudio_8_5_0_0.jpg"}
    assert set(m["group"]) == set(xlsx["group"])
    row = m[m["path"] == "dreamStudio_8_5_0_0.jpg"].iloc[0]
    assert row["prompt"] == "alien, using laptop, city, anime style"


def test_aigcqa20k_rows_generators_groups():
    m = load_labels("aigcqa20k", real("aigcqa-20k/info_train.csv"))
    assert len(m) == 14000 and m["image_id"].is_unique
    generators = "SD1.4 SD1.5 SDXL LCM Pixart Playground SSD1B Dream DALLE2 DALLE3 IF MJ"
    assert set(m["generator"]) == set(generators.split())
    assert m["group"].nunique() == 13624
    assert (m["group"] == m["prompt"].str.strip()).all()
    assert m["mos_align"].isna().all() and m["mos_quality"].notna().all()


def test_missing_label_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="lcysyzxdxc/AGIQA-3k-Database") as err:
        load_labels("agiqa3k", tmp_path / "data.csv")
    assert str(tmp_path / "data.csv") in str(err.value)


def test_unknown_kind():
    with pytest.raises(ValueError, match="agiqa3k"):
        load_labels("koniq", Path("x.csv"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


COLUMNS = {"image": "file", "prompt": "text", "mos_quality": "mos"}


def test_csv_loader_maps_columns_and_groups(tmp_path):
    path = write(
        tmp_path,
        "file,text,mos,align,gen,pid\na.png,cat,3.5,4,g1,7\nb.png,cat,2,,g2,7\nc.png,dog,1,1.5,g1,8\n",
    )
    columns = {**COLUMNS, "mos_align": "align", "generator": "gen"}
    m = load_labels("csv", path, columns=columns, image_dir="imgs")
    assert m["path"].to_list() == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]
    assert m["group"].to_list() == ["cat", "cat", "dog"]
    assert m["generator"].to_list() == ["g1", "g2", "g1"]
    assert np.isnan(m["mos_align"].iloc[1]) and m["mos_align"].iloc[2] == 1.5
    assert load_labels("csv", path, columns=COLUMNS, group="image")["group"].to_list() == [
        "a.png",
        "b.png",
        "c.png",
    ]
    assert load_labels("csv", path, columns=COLUMNS, group="pid")["group"].to_list() == ["7", "7", "8"]
    minimal = load_labels("csv", path, columns={"image": "file", "mos_quality": "mos"}, group="image")
    assert (minimal["prompt"] == "").all() and minimal["mos_align"].isna().all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,text\na.png,cat\n", r"labels.csv: missing columns 'mos'; has"),
        (
            "file,text,mos\na.png,cat,3\nb.png,cat,\n",
            r"labels.csv: mos_quality is missing or not finite in rows 3",
        ),
        ("file,text,mos\na.png,cat,3\nb.png,cat,nan\n", r"mos_quality is missing or not finite in rows 3"),
        (
            "file,text,mos\na.png,cat,3\nb.png,cat,good\n",
            r"labels.csv, row 3: mos_quality 'good' is not a number",
        ),
        ("file,text,mos\na.png,cat,3\nb.png,cat,inf\n", r"not finite in rows 3"),
        (
            "file,text,mos\na.png,cat,3\nb.png,dog,2\na.png,cat,1\n",
            r"image 'a.png' appears more than once, rows 2, 4",
        ),
        ("file,text,mos\n../a.png,cat,3\n", r"labels.csv, row 2: path '../a.png' leaves the dataset root"),
        ("file,text,mos\nx/../../a.png,cat,3\n", r"leaves the dataset root"),
        ("file,text,mos\n/etc/passwd,cat,3\n", r"leaves the dataset root"),
        ("file,text,mos\n,cat,3\n", r"empty image_id in rows 2"),
        ("file,text,mos\na.png,,3\n", r"empty group in rows 2"),
    ],
)
def test_csv_loader_bad_input_names_file_and_row(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        load_labels("csv", write(tmp_path, text), columns=COLUMNS)


def test_csv_loader_bad_align_and_options(tmp_path):
    path = write(tmp_path, "file,text,mos,align\na.png,cat,3,high\n")
    with pytest.raises(ManifestError, match="row 2: mos_align 'high' is not a number"):
        load_labels("csv", path, columns={**COLUMNS, "mos_align": "align"})
    with pytest.raises(ValueError, match="needs image and mos_quality"):
        load_labels("csv", path, columns={"image": "file", "score": "mos"})
    with pytest.raises(ValueError, match="group 'prompt' needs a prompt column"):
        load_labels("csv", path, columns={"image": "file", "mos_quality": "mos"})
    with pytest.raises(ManifestError, match="missing columns"):
        load_labels("csv", path, columns=COLUMNS, group="prompt_id")


def test_agiqa3k_malformed_name_names_row(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("name,prompt,mos_quality,mos_align\r\nsd1.5_normal_001.jpg,a,1,2\r\nbroken.jpg,b,1,2\r\n")
    with pytest.raises(ManifestError, match=r"data.csv, row 3: name 'broken.jpg'"):
        load_labels("agiqa3k", path)


def test_agiqa1k_unexpected_duplicate_still_fails(tmp_path):
    path = tmp_path / "AIGC_all.csv"
    path.write_text("Image,Score\ndeepai_0_0_0_0.jpg,3\ndeepai_0_0_0_0.jpg,2\n")
    with pytest.raises(ManifestError, match="appears more than once"):
        load_labels("agiqa1k", path)


def manifest(**overrides) -> pd.DataFrame:
    base = {
        "image_id": ["a", "b"], "path": ["a.png", "b.png"], "prompt": ["p", "q"], "mos_quality": [1.0, 2.0],
        "mos_align": [np.nan, 3.0], "group": ["p", "q"], "generator": ["g", "g"], "variant": ["", ""],
    }  # fmt: skip
    return pd.DataFrame({**base, **overrides})


def test_validate_manifest_missing_column_names_source():
    with pytest.raises(ManifestError, match=r"my.csv: missing manifest columns \['variant'\]"):
        validate_manifest(manifest().drop(columns="variant"), "my.csv")


def test_manifest_hash_tracks_content_and_order_not_index():
    m = validate_manifest(manifest(), "x")
    assert manifest_hash(m) == manifest_hash(m.set_axis([10, 11]))
    assert manifest_hash(m) != manifest_hash(m.iloc[::-1])
    assert manifest_hash(m) != manifest_hash(validate_manifest(manifest(mos_quality=[1.0, 2.0000001]), "x"))
    assert len(manifest_hash(m)) == 64
