"""`agiqa`: one command with a sub-command per DVC stage (what dvc.yaml runs, callable by hand)."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    help="agiqa-pipeline stages. Normally run through `dvc repro`; see dvc.yaml for arguments.",
    no_args_is_help=True,
)

for _name in (
    "generate_demo",
    "prepare",
    "split",
    "pretrain_i2p",
    "extract",
    "train",
    "evaluate",
    "cross",
    "report",
):
    _module = importlib.import_module(f"stages.{_name}")
    app.command(_name, help=_module.__doc__.splitlines()[0])(_module.main)
