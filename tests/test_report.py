"""The report: a short DVC metrics file, and a summary with protocol, intervals, groups and anchors."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.anchors import ANCHORS, load_anchors
from pipeline.evaluation import Bootstrap, evaluate_predictions, write_tables
from stages import report

ROOT = Path(__file__).resolve().parents[1]

META = {"select": "val", "protocol": "grouped_kfold", "protocol_params": {"k": 2}, "protocol_hash": "ab" * 32}


def _metrics_dir(folder, runs=("ma_agiqa", "ipiqa"), **extra) -> None:
    """Evaluate synthetic predictions of two runs and write them as the evaluate stage does."""
    rng = np.random.default_rng(0)
    ids = [f"i{i}" for i in range(60)]
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "generator": np.array(["midjourney", "glide"])[np.arange(60) % 2],
            "variant": "normal",
        }
    )
    quality, align = rng.uniform(0, 5, 60), rng.uniform(0, 5, 60)
    pred = pd.DataFrame(
        {
            "split": np.arange(60) % 2,
            "part": "test",
            "image_id": ids,
            "target_quality": quality,
            "pred_quality": quality + rng.normal(0, 1, 60),
            "target_alignment": align,
            "pred_alignment": align + rng.normal(0, 2, 60),
        }
    )
    summary, per_split, groups = {}, [], []
    for run in runs:
        result = evaluate_predictions(pred, manifest, ["quality", "alignment"], Bootstrap(100))
        summary[run] = {**result.summary, "n_splits": 2, "best_epochs": [1, 2], **META, **extra}
        per_split.append(result.per_split.assign(run=run))
        groups.append(result.groups.assign(run=run))
    folder.mkdir(parents=True)
    write_tables(folder, summary, per_split, groups)


@pytest.fixture
def reported(tmp_path, monkeypatch):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(profile="paper", datasets=["agiqa3k", "aigcqa20k"])
    params["cross"]["pairs"] = {"x": {"train": "aigcqa20k", "test": "agiqa3k"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    _metrics_dir(tmp_path / "metrics" / "agiqa3k")
    _metrics_dir(tmp_path / "metrics" / "aigcqa20k")
    cross = {"train_dataset": "aigcqa20k", "train_protocol_hash": "cd" * 32}
    _metrics_dir(tmp_path / "metrics" / "cross" / "x", runs=("ma_agiqa",), **cross)
    report.main(
        tmp_path / "metrics", tmp_path / "reports" / "metrics.json", tmp_path / "reports" / "summary.md"
    )
    return tmp_path / "reports"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def test_metrics_file_is_short_and_flat(reported):
    flat = _flat(json.loads((reported / "metrics.json").read_text()))
    ours = sorted(
        k.removeprefix("agiqa3k.ma_agiqa.quality.") for k in flat if k.startswith("agiqa3k.ma_agiqa.quality.")
    )
    kept = "srcc.mean srcc.lo srcc.hi plcc.mean plcc.lo plcc.hi krcc.mean plcc_raw.mean rmse.mean"
    assert ours == sorted([*kept.split(), "worst_generator.srcc"])
    assert flat["agiqa3k.ma_agiqa.n_splits"] == 2
    assert "cross.x.ma_agiqa.quality.srcc.mean" in flat
    assert all(
        isinstance(v, int | float) for v in flat.values()
    )  # no strings: dvc metrics diff stays numeric
    assert len(flat) == 5 * (1 + 2 * 10)  # two runs on each dataset, one cross


def test_summary_states_protocol_intervals_groups_and_anchors(reported):
    text = (reported / "summary.md").read_text()
    protocol = (
        "Protocol `grouped_kfold` (k=2), hash `abababababab`, 2 split(s); epoch selected on the validation"
    )
    assert protocol in text
    assert "CI images" in text and "CI splits" in text
    assert "SRCC per generator" in text and "| glide | midjourney | worst |" in text
    lines = text.splitlines()
    ours = next(i for i, line in enumerate(lines) if line.startswith("| **ours: ma_agiqa** | quality"))
    # the paper's MA-AGIQA number follows our MA-AGIQA rows, with its protocol and source
    paper = next(
        i for i, line in enumerate(lines) if line.startswith("| MA-AGIQA (paper) | quality | 0.8939")
    )
    assert ours < paper and "seed 20" in lines[paper] and "Table 1" in lines[paper]
    assert "(unverified)" in next(
        line for line in lines if line.startswith("| IP-IQA (quoted by ACL-IQA) | quality")
    )
    # cross-dataset: MA-AGIQA's Table 2 row 20k -> 3k
    assert (
        "### x: aigcqa20k -> agiqa3k" in text
        and "`abababababab` (test) and `cdcdcdcdcdcd` (train)" in text
        and "| MA-AGIQA (paper) | quality | 0.8053 | 0.8430" in text
    )


def test_anchors_file_is_complete():
    anchors = load_anchors()
    assert {"agiqa3k", "aigcqa20k", "agiqa1k"} <= set(anchors["dataset"])
    assert (anchors["source"].str.len() > 5).all() and (anchors["protocol"].str.len() > 0).all()
    paper = anchors[(anchors["method"] == "MA-AGIQA (paper)") & (anchors["dataset"] == "agiqa3k")]
    assert paper[["srcc", "plcc", "krcc", "rmse"]].iloc[0].tolist() == [0.8939, 0.9273, 0.7211, 0.3756]
    assert (anchors.loc[anchors["method"].str.startswith("IP-IQA"), "verified"] == "no").all()


def test_bad_anchor_rows_are_named(tmp_path):
    text = ANCHORS.read_text().splitlines()
    bad = text[1].replace(",val,logistic,yes,", ",on_val,logistic,yes,")
    (tmp_path / "a.csv").write_text("\n".join([text[0], bad]) + "\n")
    with pytest.raises(ValueError, match=r"a\.csv, row 2: select 'on_val'"):
        load_anchors(tmp_path / "a.csv")
    (tmp_path / "a.csv").write_text("\n".join([text[0], text[1].replace("0.8939", "high")]) + "\n")
    with pytest.raises(ValueError, match=r"row 2: srcc 'high' is not a number"):
        load_anchors(tmp_path / "a.csv")
