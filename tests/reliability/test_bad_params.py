"""Bad params: every edit below stops validation (and so the first stage) before any work, naming the
dotted key, the value and what is allowed; the committed file and the README's paper settings pass.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc_repo import copy_project

from pipeline.params import ParamsError, validate

ROOT = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _edit(path: str, value, base=None) -> dict:
    cfg = copy.deepcopy(base or PARAMS)
    *parents, last = path.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


DELETE = object()
BAD = {  # case: (dotted key, bad value, what the error says)
    "unknown top-level key": ("fuson", {"experts": 3}, r"fuson: unknown key; did you mean 'fusion'\?"),
    "misspelled nested key": ("train.selcet", "val", r"train.selcet: unknown key; did you mean 'select'"),
    "missing key": ("train.select", DELETE, r"train.select: missing"),
    "wrong type": ("probe.model.hidden", "128", r"probe.model.hidden: '128' is not an integer"),
    "fusion.experts 0": ("fusion.experts", 0, r"fusion.experts: 0 is below the minimum 1"),
    "fewer experts than streams": ("fusion.experts", 2, r"fusion.experts: 2 is below the number of"),
    "negative learning rate": ("ma_agiqa.recipe.lr", -1e-3, r"recipe.lr: -0.001 is not above the minimum 0"),
    "learning rate as text": ("ipiqa.recipe.lr", "3e-4", r"ipiqa.recipe.lr: '3e-4' is not a number"),
    "bool as epochs": ("probe.recipe.epochs", True, r"probe.recipe.epochs: True is not an integer"),
    "unknown head": ("ma_agiqa.variants", ["ma_agiqa", "maniqaa"], r"variants\[1\]: 'maniqaa' is not one of"),
    "unknown protocol": ("split.protocol", "kfold", r"split.protocol: 'kfold' is not one of grouped_kfold"),
    "unknown dataset": ("datasets", ["demo", "agiqa4k"], r"datasets: 'agiqa4k' has no data.agiqa4k section"),
    "dataset twice": ("datasets", ["demo", "demo"], r"datasets: demo listed more than once"),
    "unknown encoder": (
        "encoders",
        ["vit", "clip", "x"],
        r"encoders\[2\]: 'x' is not one of clip, semantic, vit",
    ),
    "profile spelled Paper": ("profile", "Paper", r"profile: 'Paper' is not one of demo, paper"),
    "runtime.device gpu": ("runtime.device", "gpu", r"runtime.device: 'gpu' is not auto, cpu, cuda or"),
    "zero memory budget": ("runtime.memory_budget_gb", 0, r"memory_budget_gb: 0 is not above the minimum 0"),
    "probability above 1": ("train.view_prob", 1.5, r"train.view_prob: 1.5 is above the maximum 1"),
    "unknown gate": ("fusion.gate", "sigmoid", r"fusion.gate: 'sigmoid' is not one of linear, softmax"),
    "cross pair on a missing dataset": (
        "cross.pairs",
        {"a_to_b": {"train": "demo", "test": "agiqa3k"}},
        r"cross.pairs.a_to_b.test: 'agiqa3k' is not in datasets \['demo'\]",
    ),
    "probe on an unextracted encoder": ("encoders", ["vit", "clip"], r"probe.encoders: 'semantic' is not in"),
    "blank prompt": ("extract.semantic.prompts", ["coherence", " "], r"prompts\[1\]: ' ' is not a non-blank"),
    "bad on_bad_image": ("data.agiqa3k.on_bad_image", "x", r"on_bad_image: 'x' is not one of error, skip"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_edit_is_named_with_its_key_and_what_is_allowed(case):
    key, value, message = BAD[case]
    with pytest.raises(ParamsError, match=message):
        validate(_edit(key, value))


def test_every_problem_is_listed_at_once():
    cfg = _edit("profile", "Paper", _edit("fusion.experts", 0))
    with pytest.raises(ParamsError, match=r"2 problem\(s\), nothing was run") as err:
        validate(cfg)
    assert "profile: 'Paper'" in str(err.value) and "fusion.experts: 0" in str(err.value)


PAPER = {
    "profile": "paper",
    "datasets": ["agiqa3k"],
    "split.protocol": "ipiqa_grouped",
    "train.select": "test_oracle",
    "train.target_norm": "none",
    "ipiqa.qa_token": False,
    "ma_agiqa.maniqa.score_act": "relu",
    "ma_agiqa.recipe.lr": 1e-5,
    "fusion.experts": 4,
    "cross.pairs": {},
}


def test_the_committed_params_and_the_paper_settings_pass():
    validate(PARAMS)
    cfg = PARAMS
    for key, value in PAPER.items():
        cfg = _edit(key, value, cfg)
    validate(cfg)


def test_a_stage_with_bad_params_stops_before_any_work(tmp_path):
    copy_project(tmp_path, _edit("fusion.experts", 0))
    cmd = [sys.executable, "-m", "stages.generate_demo", "data/raw/demo"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "fusion.experts: 0 is below the minimum 1" in " ".join(proc.stderr.split())
    assert not (tmp_path / "data").exists()


def test_values_are_read_as_dvc_writes_them(tmp_path):
    """`dvc exp run -S i2p.recipe.lr=1e-5` writes 1e-05: YAML 1.2 reads a float (PyYAML a string)."""
    from pipeline.params import load

    text = (ROOT / "params.yaml").read_text().replace("    lr: 0.001\n", "    lr: 1e-05\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    assert load("i2p.recipe.lr", path=tmp_path / "params.yaml")["i2p.recipe.lr"] == 1e-5
