"""The demo's heads learn from the labels: each beats its own shuffled-label control on every output.

The committed demo profile runs through DVC in a throwaway repo, as `dvc repro` does, then again
with ``train.shuffle_labels: true`` (train and val MOS permuted, test scored on the true MOS), the
control a user gets from ``dvc exp run -S train.shuffle_labels=true``. Both see the same splits and
features, so each split's test SRCC is a paired comparison.
"""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dvc_repo import run_in, snapshot_repo
from scipy import stats

pytestmark = pytest.mark.slow

RUNS = {"ma_agiqa": "train_ma_agiqa@demo-ma_agiqa", "ipiqa": "train_ipiqa@demo-ipiqa"}
# The head must lead its control by a paired t-statistic of at least T_MIN over the splits (mean test-SRCC
# gap over its standard error), so that the assertion does not hang on one seed's luck; and by MARGIN on
# average. Under no signal the mean SRCC of 5 splits of 96 images has a standard error of about 0.046.
T_MIN = 3.0
MARGIN = 0.1


def split_srcc(run_dir: Path) -> dict[str, np.ndarray]:
    """Test SRCC per split, for each output in the run's predictions."""
    outputs = json.loads((run_dir / "run.json").read_text())["outputs"]
    test = pd.read_csv(run_dir / "predictions.csv").query("part == 'test'")
    per_split = test.groupby("split")
    return {
        o: np.array([stats.spearmanr(g[f"pred_{o}"], g[f"target_{o}"]).statistic for _, g in per_split])
        for o in outputs
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    repo = snapshot_repo(tmp_path_factory.mktemp("control"))
    out = {}
    for mode in ("real", "control"):
        if mode == "control":
            params = repo / "params.yaml"
            text, n = re.subn(r"(?m)^  shuffle_labels: false", "  shuffle_labels: true", params.read_text())
            assert n == 1, "train.shuffle_labels not found in params.yaml"
            params.write_text(text)
        run_in(["dvc", "repro", *RUNS.values()], repo)
        out[mode] = {run: split_srcc(repo / "runs" / "demo" / run) for run in RUNS}
    return out


@pytest.mark.parametrize("run", list(RUNS))
def test_head_beats_its_shuffled_label_control(results, run):
    real, control = results["real"][run], results["control"][run]
    assert set(real) == set(control) and real, run
    for output, srcc in real.items():
        gap = srcc - control[output]
        se = gap.std(ddof=1) / np.sqrt(len(gap))
        report = (
            f"{run} {output}: SRCC per split {srcc.round(3)} vs control {control[output].round(3)}; "
            f"gap {gap.mean():.3f} +- {se:.3f} (t = {gap.mean() / se:.1f})"
        )
        print(report)
        assert gap.mean() >= T_MIN * se, report
        assert gap.mean() >= MARGIN, report


def test_ipiqa_trains_both_outputs(results):
    assert set(results["real"]["ipiqa"]) == {"quality", "alignment"}
