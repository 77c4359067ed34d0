"""dvc.yaml declares exactly the params each stage reads, and params.yaml names only registered parts.

A stage reading an undeclared key would go silently stale after `dvc exp run -S` on that key
(dvc-practice G14); declaring keys it does not read re-runs it for nothing.
"""

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

from pipeline.encoders import list_encoders
from pipeline.heads import list_heads

ROOT = Path(__file__).resolve().parents[1]

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _normalise(key: str) -> str:
    """dvc.yaml's ${item} / ${item.x} -> the stage's {dataset} / {x} templates."""
    key = re.sub(r"\$\{item\.(\w+)\}", r"{\1}", key)
    return key.replace("${item}", "{dataset}")


def _declared(stage: dict) -> set[str]:
    body = stage.get("do", stage)
    return {_normalise(p) for p in body.get("params", [])}


def _module(stage_name: str) -> str:
    """The module a stage runs (``python -m stages.<module>``)."""
    return re.search(r"python -m (stages\.\w+)", DVC[stage_name].get("do", DVC[stage_name])["cmd"])[1]


def _module_params(stage_name: str) -> tuple:
    if stage_name.startswith("train_"):
        return importlib.import_module("stages.train").PARAMS[stage_name.removeprefix("train_")]
    return importlib.import_module(_module(stage_name)).PARAMS


@pytest.mark.parametrize("stage_name", sorted(DVC))
def test_declared_params_equal_what_the_stage_reads(stage_name):
    assert _declared(DVC[stage_name]) == set(_module_params(stage_name))


def test_every_train_family_has_a_stage():
    families = importlib.import_module("stages.train").PARAMS
    assert {f"train_{f}" for f in families} == {s for s in DVC if s.startswith("train_")}


@pytest.mark.parametrize("path", sorted((ROOT / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stages_read_params_only_through_read_params(path):
    """Only stages/__init__.py may touch params.yaml directly; the rest go through PARAMS. The tools that
    are no DVC stage are exempt: doctor reads a whole params file on purpose, score and export none."""
    if path.name in ("__init__.py", "cli.py", "doctor.py", "score.py", "export.py"):
        return
    tree = ast.parse(path.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    modules = {a.module for a in ast.walk(tree) if isinstance(a, ast.ImportFrom)}
    assert "safe_load" not in attrs and "yaml" not in names
    assert "pipeline.params" not in modules and "params" not in {
        a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
    }


def test_params_name_registered_encoders_and_heads(params):
    assert set(params["encoders"]) <= set(list_encoders())
    assert set(params["probe"]["encoders"]) <= set(params["encoders"]) | set(params["vlms"])
    heads = set(list_heads())
    assert set(params["ma_agiqa"]["variants"]) <= heads
    assert set(params["ipiqa"]["variants"]) <= heads
    for name in params["datasets"]:
        assert name in params["data"], f"dataset {name} has no data.{name} section"


def test_train_sections_build_typed_configs(params):
    from pipeline.train import Recipe, RunConfig

    RunConfig(**params["train"])
    for family in ("probe", "ma_agiqa", "ipiqa"):
        Recipe(**params[family]["recipe"])


def test_cli_has_a_command_for_every_stage():
    from typer.testing import CliRunner

    from stages.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in {_module(s).removeprefix("stages.") for s in DVC}:
        assert f" {stage} " in result.output, stage


def test_params_yaml_is_a_fixed_point_of_exp_run_set(tmp_path, params):
    """`dvc exp run -S` rewrites params.yaml (ruamel + hydra); setting a value to itself changes nothing."""
    from dvc.utils.hydra import apply_overrides

    text = (ROOT / "params.yaml").read_text()
    copy = tmp_path / "params.yaml"
    copy.write_text(text)
    apply_overrides(copy, [f"fusion.experts={params['fusion']['experts']}"])
    assert copy.read_text() == text


def test_only_the_full_ma_agiqa_stage_reads_experts_and_streams():
    """-S fusion.experts=4 must re-train the full MA-AGIQA model alone, not its ablations."""
    readers = {
        name
        for name, stage in DVC.items()
        if {"fusion", "fusion.experts", "fusion.streams"} & _declared(stage)
    }
    assert readers == {"train_ma_agiqa"}  # cross applies the trained heads: it reads no fusion params


def test_ablation_family_refuses_heads_that_read_experts(params):
    from stages import read_params
    from stages.train import PARAMS, head_config, nest

    p = nest(read_params(PARAMS["ma_agiqa_ablation"]))
    for variant in params["ma_agiqa"]["ablations"]:
        name, kwargs, _ = head_config("ma_agiqa_ablation", variant, p, [])
        assert name == variant and "experts" not in kwargs and "streams" not in kwargs
    with pytest.raises(ValueError, match=r"list other heads under ma_agiqa\.variants"):
        head_config("ma_agiqa_ablation", "ma_agiqa", p, [])
