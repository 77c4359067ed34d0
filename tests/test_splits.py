"""Split protocols: exact reproduction of the papers' draws, group hygiene, determinism, splits.json."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data import load_labels, validate_manifest
from pipeline.splits import PARTS, PROTOCOLS, make_splits, read_splits, split_hash, write_splits

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def real(kind: str, relative: str) -> pd.DataFrame:
    path = DATASETS / relative
    if not path.is_file():
        pytest.skip(f"{path} absent: the real label files live in ../shared/datasets")
    return load_labels(kind, path)


def synthetic(groups: list[str]) -> pd.DataFrame:
    n = len(groups)
    frame = pd.DataFrame(
        {
            "image_id": [f"img{i:03d}" for i in range(n)],
            "path": [f"img{i:03d}.png" for i in range(n)],
            "prompt": groups,
            "mos_quality": np.linspace(0, 5, n),
            "mos_align": np.nan,
            "group": groups,
            "generator": "g",
            "variant": "",
        }
    )
    return validate_manifest(frame, "synthetic")


PROMPTS = synthetic([f"prompt {i % 37}" for i in range(200)])  # 37 groups of 5-6 images
INDICES = synthetic([str(i % 50) for i in range(240)])  # AGIQA-3k-like integer groups


def assert_partition(manifest: pd.DataFrame, split: dict, grouped: bool) -> None:
    ids = [i for part in PARTS for i in split[part]]
    assert sorted(ids) == sorted(manifest["image_id"])  # every image in exactly one part
    if grouped:
        part_of = {i: part for part in PARTS for i in split[part]}
        parts_per_group = manifest["image_id"].map(part_of).groupby(manifest["group"]).nunique()
        assert (parts_per_group == 1).all(), "a group straddles two parts"


# `custom` reads the user's files: tests/test_custom_splits.py
DRAWN = sorted(set(PROTOCOLS) - {"custom"})


@pytest.mark.parametrize("manifest", [PROMPTS, INDICES], ids=["prompts", "indices"])
@pytest.mark.parametrize("protocol", DRAWN)
def test_partition_and_determinism(protocol, manifest):
    splits = make_splits(protocol, manifest)
    for split in splits:
        assert_partition(manifest, split, grouped=protocol != "ma_agiqa_random")
        order = {i: n for n, i in enumerate(manifest["image_id"])}
        assert all(split[p] == sorted(split[p], key=order.get) for p in PARTS)  # manifest order
    assert make_splits(protocol, manifest) == splits
    assert (
        make_splits(protocol, manifest.sample(frac=1, random_state=1)) != splits
        or protocol == "grouped_kfold"
    )


def test_seed_changes_splits():
    for protocol, seed in (("ipiqa_grouped", 7), ("ma_agiqa_random", 7), ("grouped_kfold", 7)):
        assert split_hash(make_splits(protocol, PROMPTS, seed=seed)) != split_hash(
            make_splits(protocol, PROMPTS)
        )


def test_grouped_kfold_tests_every_image_once_with_val():
    splits = make_splits("grouped_kfold", PROMPTS, k=4, val_fraction=0.2, seed=3)
    assert len(splits) == 4
    tested = [i for s in splits for i in s["test"]]
    assert sorted(tested) == sorted(PROMPTS["image_id"])
    group_of = dict(zip(PROMPTS["image_id"], PROMPTS["group"], strict=True))
    for s in splits:
        val_groups = {group_of[i] for i in s["val"]}
        rest_groups = 37 - len({group_of[i] for i in s["test"]})
        assert len(val_groups) == round(0.2 * rest_groups)
    # row order does not matter: groups are sorted before the draw
    assert make_splits("grouped_kfold", PROMPTS.iloc[::-1], k=4, val_fraction=0.2, seed=3) == [
        {p: s[p][::-1] for p in PARTS} for s in splits
    ]
    # a pinned hash: the same params give these splits on any machine
    assert split_hash(splits) == "1edd95beea082a89ede85879c0613d66b018fd2724d16b4998ec441c19758b48"


def test_grouped_kfold_checks_params():
    with pytest.raises(ValueError, match="k=40"):
        make_splits("grouped_kfold", PROMPTS, k=40)
    with pytest.raises(ValueError, match="val_fraction"):
        make_splits("grouped_kfold", PROMPTS, val_fraction=1.0)


def test_ipiqa_draw_selection():
    # integer groups use numpy's legacy permutation over range(max + 1) ...
    splits = make_splits("ipiqa_grouped", INDICES, repeats=2)
    state = np.random.RandomState(42)
    for split in splits:
        train_groups = {str(g) for g in state.permutation(50)[:40]}
        expected = INDICES.loc[INDICES["group"].isin(train_groups), "image_id"].to_list()
        assert split["train"] == expected and split["val"] == []
    # ... other groups the stdlib first-appearance walk
    assert make_splits("ipiqa_grouped", INDICES, draw="walk") != make_splits("ipiqa_grouped", INDICES)
    with pytest.raises(ValueError, match="non-negative integers"):
        make_splits("ipiqa_grouped", PROMPTS, draw="permutation")
    with pytest.raises(ValueError, match="draw must be"):
        make_splits("ipiqa_grouped", PROMPTS, draw="shuffle")


def test_integer_groups_split_like_their_strings():
    as_ints = INDICES.assign(group=INDICES["group"].astype(int))
    for protocol in DRAWN:
        assert make_splits(protocol, as_ints) == make_splits(protocol, INDICES)


def test_ipiqa_walk_follows_row_order():
    walked = make_splits("ipiqa_grouped", PROMPTS, repeats=3)
    reordered = make_splits("ipiqa_grouped", PROMPTS.iloc[::-1], repeats=3)
    assert split_hash(walked) != split_hash(reordered)


def test_make_splits_rejects_unknowns():
    with pytest.raises(ValueError, match="unknown split protocol"):
        make_splits("random_8020", PROMPTS)
    with pytest.raises(TypeError, match="folds"):
        make_splits("grouped_kfold", PROMPTS, folds=3)


def test_write_read_roundtrip_with_csvs(tmp_path):
    params = {"k": 3, "val_fraction": 0.1, "seed": 0}
    splits = make_splits("grouped_kfold", PROMPTS, **params)
    path = tmp_path / "splits.json"
    digest = write_splits(path, "grouped_kfold", params, splits)
    document = read_splits(path)
    assert document == {"protocol": "grouped_kfold", "params": params, "hash": digest, "splits": splits}
    csvs = sorted((tmp_path / "splits").glob("*.csv"))
    assert [p.name for p in csvs] == ["split_00.csv", "split_01.csv", "split_02.csv"]
    with open(csvs[1], newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["image_id"] for r in rows if r["part"] == "test"} == set(splits[1]["test"])
    assert len(rows) == len(PROMPTS)
    # fewer splits later: stale CSVs go
    write_splits(path, "ma_agiqa_random", {}, make_splits("ma_agiqa_random", PROMPTS))
    assert [p.name for p in (tmp_path / "splits").glob("*.csv")] == ["split_00.csv"]


def test_read_splits_refuses_edited_file(tmp_path):
    path = tmp_path / "splits.json"
    write_splits(path, "ma_agiqa_random", {"seed": 20}, make_splits("ma_agiqa_random", PROMPTS))
    document = json.loads(path.read_text())
    document["splits"][0]["test"].append(document["splits"][0]["train"].pop())
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"splits\.json: the splits do not match the recorded hash"):
        read_splits(path)


def test_hash_ignores_order_within_a_part():
    split = make_splits("ma_agiqa_random", PROMPTS)[0]
    shuffled = {p: split[p][::-1] for p in PARTS}
    assert split_hash([split]) == split_hash([shuffled])


# ------------------------------------------------------------------------- on the real label files


def test_agiqa3k_ma_agiqa_random_reproduces_paper_split():
    m = real("agiqa3k", "agiqa-3k/data.csv")
    [split] = make_splits("ma_agiqa_random", m)
    assert [len(split[p]) for p in PARTS] == [2087, 298, 597]
    assert_partition(m, split, grouped=False)
    assert split_hash([split]) == "83d666315b9f27f0c85373d5e09319bf71a3432bdb652ac16a8143adbf7e762d"


def test_agiqa3k_ipiqa_grouped_reproduces_paper_draws():
    m = real("agiqa3k", "agiqa-3k/data.csv")
    splits = make_splits("ipiqa_grouped", m)
    sizes = [len(s["test"]) for s in splits]
    assert len(splits) == 10 and all(592 <= n <= 599 for n in sizes)
    assert sizes == [599, 597, 598, 598, 596, 596, 595, 592, 597, 596]
    for split in splits:
        assert split["val"] == []
        assert_partition(m, split, grouped=True)
        assert m.loc[m["image_id"].isin(split["test"]), "group"].nunique() == 60
    assert split_hash(splits) == "6825cd214a38297fb895e25ca1cbd1fda683933ecec61d6c6bec66ecfda4fa9c"


def test_agiqa3k_grouped_kfold_keeps_prompts_together():
    m = real("agiqa3k", "agiqa-3k/data.csv")
    splits = make_splits("grouped_kfold", m, k=5, val_fraction=0.1, seed=0)
    for split in splits:
        assert_partition(m, split, grouped=True)
        assert len(split["val"]) > 0
    assert sorted(i for s in splits for i in s["test"]) == sorted(m["image_id"])


def test_agiqa1k_ipiqa_grouped_walks_the_xlsx():
    m = real("agiqa1k", "agiqa-1k/AIGC_MOS_Zscore.xlsx")
    splits = make_splits("ipiqa_grouped", m)
    sizes = [len(s["train"]) for s in splits]
    assert all(764 <= n <= 948 for n in sizes) and (min(sizes), max(sizes)) == (764, 948)
    assert sizes == [880, 764, 948, 904, 816, 852, 889, 873, 857, 892]
    for split in splits:
        assert_partition(m, split, grouped=True)


def test_aigcqa20k_ma_agiqa_random_sizes():
    m = real("aigcqa20k", "aigcqa-20k/info_train.csv")
    [split] = make_splits("ma_agiqa_random", m)
    assert [len(split[p]) for p in PARTS] == [9800, 1400, 2800]
