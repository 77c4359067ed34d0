"""The `custom` protocol reads the user's split files in both layouts and names every bad id and file."""

import json

import pandas as pd
import pytest

from pipeline.splits import custom, make_splits, write_splits


@pytest.fixture
def manifest():
    ids = [f"img{i:02d}" for i in range(24)]
    return pd.DataFrame({"image_id": ids, "group": [f"p{i // 3}" for i in range(24)]})


def test_reads_back_what_write_splits_wrote_in_both_layouts(manifest, tmp_path):
    splits = make_splits("grouped_kfold", manifest, k=3, val_fraction=0.2, seed=1)
    write_splits(tmp_path / "splits.json", "grouped_kfold", {"k": 3}, splits)
    assert custom(manifest, tmp_path / "splits.json") == splits
    assert custom(manifest, tmp_path / "splits") == splits  # the folder of split_*.csv beside it


def test_csv_folder_in_any_row_order_gives_manifest_order(manifest, tmp_path):
    rows = [(f"img{i:02d}", "test" if i < 6 else "train") for i in reversed(range(20))]
    pd.DataFrame(rows, columns=["image_id", "part"]).to_csv(tmp_path / "a.csv", index=False)
    (split,) = custom(manifest, tmp_path)
    assert split["test"] == [f"img{i:02d}" for i in range(6)]
    assert split["val"] == [] and len(split["train"]) == 14  # img20..img23 are in no part


def test_unknown_ids_are_named_with_their_file(manifest, tmp_path):
    pd.DataFrame({"image_id": ["img01", "ghost_1", "ghost_2"], "part": "train"}).to_csv(
        tmp_path / "split_00.csv", index=False
    )
    with pytest.raises(
        ValueError, match=r"split_00\.csv: 2 image ids not in the manifest: 'ghost_1', 'ghost_2'"
    ):
        custom(manifest, tmp_path)


def test_bad_part_duplicates_and_columns_are_refused(manifest, tmp_path):
    pd.DataFrame({"image_id": ["img01"], "part": ["holdout"]}).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(ValueError, match=r"s\.csv: unknown parts \['holdout'\]"):
        custom(manifest, tmp_path)
    pd.DataFrame({"image_id": ["img01", "img01"], "part": ["train", "test"]}).to_csv(
        tmp_path / "s.csv", index=False
    )
    with pytest.raises(ValueError, match="listed twice: 'img01'"):
        custom(manifest, tmp_path)
    pd.DataFrame({"id": ["img01"], "part": ["train"]}).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(ValueError, match=r"missing columns \['image_id'\]"):
        custom(manifest, tmp_path)


def test_json_checks_hash_and_duplicates(manifest, tmp_path):
    splits = make_splits("ma_agiqa_random", manifest)
    path = tmp_path / "splits.json"
    write_splits(path, "ma_agiqa_random", {}, splits)
    document = json.loads(path.read_text())
    document["splits"][0]["test"].append(document["splits"][0]["train"][0])
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="do not match the recorded hash"):
        custom(manifest, path)
    del document["hash"]  # a hand-written file without a hash is read, and checked id by id
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="split 0: image ids listed twice"):
        custom(manifest, path)


def test_missing_path(manifest, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split\.custom\.path"):
        custom(manifest, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no per-split CSV"):
        custom(manifest, tmp_path)
