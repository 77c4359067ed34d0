"""The heads learn from the labels: each beats its own shuffled-label control, on a planted signal.

The control a user gets from ``dvc exp run -S train.shuffle_labels=true`` (train and val MOS
permuted, test scored on the true MOS) must sit at chance while the head learns. On the demo's own
labels, the random demo encoders leave IP-IQA's quality signal too weak to test that robustly (a
paired t of about 2 over the 5 splits), so this test plants one: the demo images are drawn into a
dataset of their own whose quality MOS is each image's mean brightness and whose alignment MOS is
its contrast, image-level facts that every encoder sees. The demo DAG then runs through DVC in a
throwaway repo, as is and with ``train.shuffle_labels: true``; both see the same splits and
features, so each split's test SRCC is a paired comparison.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dvc_repo import run_in, snapshot_repo
from PIL import Image
from scipy import stats

pytestmark = pytest.mark.slow

RUNS = {"ma_agiqa": "train_ma_agiqa@planted-ma_agiqa", "ipiqa": "train_ipiqa@planted-ipiqa"}
# The head must lead its control by a paired t-statistic of at least T_MIN over the splits (the mean
# test-SRCC gap over its standard error), so that the assertion cannot hang on one seed's luck. A
# shuffled-label head's predictions follow the features' main direction with a random sign, so its
# SRCC against an image-level MOS swings widely around 0; the control is the mean of CONTROL_SEEDS runs.
T_MIN = 3.0
CONTROL_SEEDS = (0, 1, 2)


def split_srcc(run_dir: Path) -> dict[str, np.ndarray]:
    """Test SRCC per split, for each output in the run's predictions."""
    outputs = json.loads((run_dir / "run.json").read_text())["head"]["outputs"]
    test = pd.read_csv(run_dir / "predictions.csv").query("part == 'test'")
    per_split = test.groupby("split")
    return {
        o: np.array([stats.spearmanr(g[f"pred_{o}"], g[f"target_{o}"]).statistic for _, g in per_split])
        for o in outputs
    }


def plant(repo: Path) -> None:
    """data/raw/planted: the demo's images, with MOS planted from their pixels; params to use it."""
    run_in(["python", "-m", "stages.generate_demo", "data/raw/planted"], repo)
    labels = repo / "data" / "raw" / "planted" / "labels.csv"
    manifest = pd.read_csv(labels, dtype=str, keep_default_na=False)
    pixels = [np.asarray(Image.open(labels.parent / p).convert("L"), dtype=float) for p in manifest["path"]]
    manifest["mos_quality"] = [round(1 + 4 * x.mean() / 255, 4) for x in pixels]
    manifest["mos_align"] = [round(1 + 4 * x.std() / 128, 4) for x in pixels]
    manifest.to_csv(labels, index=False)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"] = ["planted"]
    params["data"]["planted"] = {"kind": "demo", "labels": "labels.csv"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    repo = snapshot_repo(tmp_path_factory.mktemp("control"))
    plant(repo)
    run_in(["dvc", "repro", *RUNS.values()], repo)
    out = {"real": {run: split_srcc(repo / "runs" / "planted" / run) for run in RUNS}}
    controls = []
    for seed in CONTROL_SEEDS:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["train"].update(shuffle_labels=True, seed=seed)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run_in(["dvc", "repro", *RUNS.values()], repo)
        controls.append({run: split_srcc(repo / "runs" / "planted" / run) for run in RUNS})
    out["control"] = {
        run: {o: np.mean([c[run][o] for c in controls], axis=0) for o in controls[0][run]} for run in RUNS
    }
    return out


@pytest.mark.parametrize("run", list(RUNS))
def test_head_beats_its_shuffled_label_control(results, run):
    real, control = results["real"][run], results["control"][run]
    assert set(real) == set(control) == ({"quality"} if run == "ma_agiqa" else {"quality", "alignment"})
    for output, srcc in real.items():
        gap = srcc - control[output]
        se = gap.std(ddof=1) / np.sqrt(len(gap))
        report = (
            f"{run} {output}: SRCC per split {srcc.round(3)} vs control {control[output].round(3)}; "
            f"gap {gap.mean():.3f} +- {se:.3f} (t = {gap.mean() / se:.1f})"
        )
        print(report)
        assert gap.mean() >= T_MIN * se, report
        assert (gap > 0).all(), report
