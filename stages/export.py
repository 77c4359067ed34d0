"""Export a trained run as a self-contained bundle (safetensors, config.json, model card).

The metrics for the model card are read from ``metrics/<dataset>/metrics.json`` (written by
``evaluate``) when present. ``--push-to-hub ORG/NAME`` also uploads the bundle to the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def main(
    run: Annotated[Path, typer.Argument(help="a run folder, runs/<dataset>/<run>")],
    out: Annotated[Path, typer.Option(help="the bundle folder to write")],
    metrics: Annotated[
        Path | None, typer.Option(help="evaluate's metrics.json (default: metrics/<dataset>/metrics.json)")
    ] = None,
    push_to_hub: Annotated[str | None, typer.Option(help="also upload to this hub repo id")] = None,
    revision: Annotated[str | None, typer.Option(help="hub branch to upload to")] = None,
) -> None:
    from pipeline.bundle import export_bundle
    from pipeline.bundle import push_to_hub as push
    from pipeline.runs import RunError, read_record

    try:
        record = read_record(run)
        metrics = metrics or Path("metrics") / record["dataset"] / "metrics.json"
        summary = json.loads(metrics.read_text()).get(record["run"]) if metrics.is_file() else None
        export_bundle(run, out, summary)
    except (RunError, ValueError, FileNotFoundError) as err:
        raise fail(err) from err
    typer.echo(
        f"{run} -> {out}" + ("" if summary else f" (no metrics in {metrics}: model card without them)")
    )
    if push_to_hub:
        typer.echo(f"pushed: {push(out, push_to_hub, revision)}")


def fail(err: Exception) -> typer.Exit:
    """A refusal (bad input, altered run or bundle, mismatched encoder) as one line on stderr, exit 2."""
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


if __name__ == "__main__":
    typer.run(main)
