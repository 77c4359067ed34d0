"""`dvc plots show` renders every plot dvc.yaml declares for `evaluate`, from files in our layout.

A throwaway DVC repo gets the evaluate stage's plot definitions (read from the real dvc.yaml, as
top-level plots), the custom template, and plot files written by the evaluate stage's own helpers.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.evaluate import curves_long, generator_bars

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("ma_agiqa", "probe_vit")


def _dvc(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _declared_plots() -> dict[str, dict]:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["do"]
    plots = {}
    for entry in stage["plots"]:
        ((path, cfg),) = entry.items()
        plots[path.replace("${item}", "demo")] = {k: v for k, v in cfg.items() if k != "cache"}
    return plots


def _write_plot_files(root: Path) -> None:
    rng = np.random.default_rng(0)
    curves = pd.DataFrame(
        [
            {
                "split": k,
                "epoch": e,
                "train_loss": 1 / (e + 1),
                "val_score": 0.5 + 0.1 * e + k,
                "test_score": 0.4,
            }
            for k in range(3)
            for e in range(4)
        ]
    )
    groups = pd.DataFrame(
        {
            "output": ["quality", "quality", "alignment", "quality"],
            "by": ["generator", "generator", "generator", "variant"],
            "group": ["pixelsmith", "tintgan", "pixelsmith", "blur"],
            "n_images": [40, 38, 40, 70],
            "srcc": [0.8, 0.6, 0.5, 0.7],
            "plcc": [0.82, 0.63, 0.52, 0.71],
        }
    )
    for run in RUNS:
        for plot in ("scatter", "curves", "generators"):
            (root / "metrics" / "demo" / plot).mkdir(parents=True, exist_ok=True)
        target = rng.uniform(0, 5, 30)
        scatter = pd.DataFrame(
            {"split": 0, "part": "test", "target_quality": target, "pred_quality": target + 0.1}
        )
        scatter.to_csv(root / "metrics" / "demo" / "scatter" / f"{run}.csv", index=False)
        curves_long(curves, "val").to_csv(root / "metrics" / "demo" / "curves" / f"{run}.csv", index=False)
        generator_bars(groups).to_csv(root / "metrics" / "demo" / "generators" / f"{run}.csv", index=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plots")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(["init", "-q"], root)
    shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{p: c} for p, c in _declared_plots().items()]}))
    _write_plot_files(root)
    return root


def test_every_declared_plot_renders_with_data(repo):
    shown = json.loads(_dvc(["plots", "show", "--json"], repo))
    assert not shown.get("errors"), shown["errors"]
    for folder, cfg in _declared_plots().items():
        for run in RUNS:
            (spec,) = shown["data"][f"{folder}/{run}.csv"]
            content = spec["content"]
            values = content["data"]["values"]
            assert values, folder
            assert content["encoding"]["x"]["field"] == cfg["x"] and cfg["x"] in values[0]
            if folder.endswith("curves"):  # one line per split and their mean, from our template
                assert content["encoding"]["color"]["field"] == "split"
                assert {str(v["split"]) for v in values} == {"0", "1", "2", "mean"}
            if folder.endswith("generators"):  # generators only, labelled with their output
                assert content["mark"]["type"] == "bar"
                assert sorted(v["label"] for v in values) == [
                    "pixelsmith (alignment)",
                    "pixelsmith (quality)",
                    "tintgan (quality)",
                ]


def test_plots_show_writes_html_with_each_plot(repo):
    _dvc(["plots", "show", "-o", "rendered"], repo)
    html = (repo / "rendered" / "index.html").read_text()
    for folder in _declared_plots():
        for run in RUNS:
            assert f"{folder}/{run}.csv" in html
    assert html.count("vegaEmbed(") == len(_declared_plots()) * len(RUNS)
