"""`agiqa`: one command with a sub-command per DVC stage (what dvc.yaml runs) and the tools that use
what they train: ``score``, ``export``, ``doctor``.

A sub-command's module is imported only when that sub-command runs or shows its help, so
``agiqa --help`` starts without torch or any model library; the one-line helps in the listing are
the modules' docstrings, read from their source files without importing them.
"""

from __future__ import annotations

import ast
import importlib
from functools import cached_property
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

COMMANDS = (
    "score",
    "export",
    "doctor",
    "generate_demo",
    "prepare",
    "split",
    "pretrain_i2p",
    "extract",
    "train",
    "evaluate",
    "cross",
    "report",
)


def summary(name: str) -> str:
    """The first line of ``stages.<name>``'s docstring, from its source (nothing imported)."""
    doc = ast.get_docstring(ast.parse((Path(__file__).parent / f"{name}.py").read_text())) or name
    return doc.splitlines()[0]


class LazyCommand(TyperCommand):
    """A listed sub-command; its module is imported when it is parsed (run, or asked for --help)."""

    def __init__(self, name: str):
        super().__init__(name, help=summary(name), short_help=summary(name))

    @cached_property
    def real(self) -> Any:
        module = importlib.import_module(f"stages.{self.name}")
        sub = typer.Typer(add_completion=False)
        sub.command(self.name, help=module.__doc__)(module.main)
        return typer.main.get_command(sub)

    def make_context(self, info_name, args, parent=None, **extra) -> Any:
        return self.real.make_context(info_name, args, parent=parent, **extra)


class LazyGroup(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        return [name for name in COMMANDS if (Path(__file__).parent / f"{name}.py").is_file()]

    def get_command(self, ctx: Any, name: str) -> LazyCommand | None:
        return LazyCommand(name) if name in self.list_commands(ctx) else None


app = typer.Typer(cls=LazyGroup, no_args_is_help=True, add_completion=False)


@app.callback()
def agiqa() -> None:
    """agiqa-pipeline: the DVC stages (normally run by `dvc repro`, see dvc.yaml); score, export, doctor."""


if __name__ == "__main__":
    app()
