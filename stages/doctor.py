"""Pre-flight check before a run: GPU, datasets, disk and cached weights, each with its fix.

Not a DVC stage: it reads params.yaml (``--profile`` and ``--datasets`` override its ``profile`` and
``datasets``), writes nothing, and exits 1 when anything the run needs is MISSING.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline import params as params_file
from pipeline.doctor import MISSING, OK, run_checks

SECTIONS = ("profile", "datasets", "encoders", "vlms", "runtime", "data", "extract")
STYLES = {OK: "green", "WARN": "yellow", MISSING: "bold red"}


def main(
    profile: Annotated[str | None, typer.Option(help="paper | demo (default: params.yaml's profile)")] = None,
    datasets: Annotated[
        str | None, typer.Option(help="comma-separated, e.g. agiqa3k,aigcqa20k (default: params.yaml's)")
    ] = None,
    params: Annotated[Path, typer.Option(help="the params file; paths are relative to its folder")] = Path(
        "params.yaml"
    ),
) -> None:
    from rich.console import Console
    from rich.table import Table

    try:
        cfg = params_file.load(*SECTIONS, path=params)
    except (params_file.ParamsError, FileNotFoundError) as err:
        typer.echo(f"doctor: {err}", err=True)
        raise typer.Exit(1) from None
    profile = profile or cfg["profile"]
    if profile not in ("paper", "demo"):
        raise typer.BadParameter(f"{profile!r} is not paper or demo", param_hint="--profile")
    names = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else cfg["datasets"]
    checks = run_checks(cfg, profile, names, params.resolve().parent)

    console = Console()
    table = Table(title=f"agiqa doctor: profile {profile}, datasets {', '.join(names)}")
    for column in ("check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for check in checks:
        table.add_row(check.name, f"[{STYLES[check.status]}]{check.status}[/]", check.detail)
    console.print(table)
    fixes = [c for c in checks if c.fix]
    if fixes:  # printed unwrapped, so that each command can be copied whole
        console.print("To fix:")
        for check in fixes:
            console.print(f"  {check.name} ({check.status}): {check.fix}", soft_wrap=True, markup=False)
    if any(c.status == MISSING for c in checks):
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
