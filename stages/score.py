"""Score images with a trained run or an exported bundle: quality (and alignment) in MOS units.

INPUT is one image, a folder (recursive) or a CSV with a ``path`` column (relative to the CSV)
and an optional ``prompt`` column. MODEL is a run folder (``runs/<dataset>/<run>``), a bundle
folder (``agiqa export``) or a Hugging Face Hub repo id of a bundle. The default averages every
split's head; ``--split K`` uses one. Writes a CSV to ``--out`` with a ``<out>.json`` sidecar naming
the model, or prints a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer


def main(
    input: Annotated[Path, typer.Argument(help="an image, a folder of images, or a CSV (path[, prompt])")],
    model: Annotated[str, typer.Option(help="run folder, bundle folder, or hub repo id")],
    out: Annotated[Path | None, typer.Option(help="CSV to write (default: a table on stdout)")] = None,
    split: Annotated[int | None, typer.Option(help="one split's head (default: mean of all)")] = None,
    prompt: Annotated[
        str | None, typer.Option(help="the prompt of every image (heads that read one)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:1")] = "auto",
    batch_size: Annotated[
        int | None, typer.Option(help="images per encoder pass (default: the extraction's)")
    ] = None,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers decoding images")] = 0,
    on_bad_image: Annotated[str, typer.Option(help="error | skip (skipped files are listed)")] = "error",
    revision: Annotated[str | None, typer.Option(help="hub revision of a repo id MODEL")] = None,
) -> None:
    from pipeline.runs import RunError
    from pipeline.scoring import Scorer, collect_inputs

    try:
        inputs = collect_inputs(input)
        if prompt is not None and "prompt" in inputs:
            raise ValueError(f"{input} has a prompt column: drop --prompt or the column")
        prompts = prompt if prompt is not None else inputs.get("prompt")
        scorer = Scorer.from_pretrained(
            model,
            revision=revision,
            device=device,
            split=split,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        scores = scorer.score(
            inputs["path"].tolist(),
            None if prompts is None else prompts if isinstance(prompts, str) else prompts.tolist(),
            on_bad_image=on_bad_image,
        )
    except (RunError, ValueError, FileNotFoundError) as err:
        raise fail(err) from err
    if "skipped" in scores:
        listed = scores[scores["skipped"] != ""]
        typer.echo(f"skipped {len(listed)} bad image(s):", err=True)
        for row in listed.itertuples():
            typer.echo(f"  {row.path}: {row.skipped}", err=True)
    if out is None:
        typer.echo(f"# {scorer.description}")
        typer.echo(scores.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out, index=False)
    sidecar = {
        "model": scorer.description,
        "source": scorer.source,
        "run": scorer.run.name,
        "head": scorer.run.record["head"]["name"],
        "split": split if split is not None else "mean of all splits",
        "outputs": scorer.run.outputs,
        "units": f"MOS of {scorer.run.record['dataset']}",
        "command": " ".join(sys.argv),
    }
    out.with_name(out.name + ".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    typer.echo(f"{len(scores)} images scored by {scorer.description} -> {out}", err=True)


def fail(err: Exception) -> typer.Exit:
    """A refusal (bad input, altered run or bundle, mismatched encoder) as one line on stderr, exit 2."""
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


if __name__ == "__main__":
    typer.run(main)
