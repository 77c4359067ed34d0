"""Stage `generate_demo`: draws the synthetic demo dataset into data/raw/demo (images + labels.csv).

The demo is a raw dataset like any other: `prepare@demo` reads it from data/raw/demo through the same
path as AGIQA-3k's (a label file and an image folder that are its DVC deps). The folder is built
beside its target and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.data.demo import generate_demo
from pipeline.provenance import built_beside
from stages import read_params

PARAMS = ("data.demo.generate",)


def main(out: Path) -> None:
    cfg = read_params(PARAMS)["data.demo.generate"]
    with built_beside(out) as building:
        manifest = generate_demo(building, **cfg)
        manifest.to_csv(building / "labels.csv", index=False)
    typer.echo(f"demo: {len(manifest)} images in {out}")


if __name__ == "__main__":
    typer.run(main)
