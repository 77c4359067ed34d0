"""Stage `split@<dataset>`: manifest -> splits/<dataset>/splits.json (+ one CSV per split)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.splits import make_splits, write_splits
from stages import read_manifest, read_params

PARAMS = ("split",)


def main(dataset: str, manifest: Path, out_dir: Path) -> None:
    cfg = read_params(PARAMS)["split"]
    protocol = cfg["protocol"]
    if protocol not in cfg:
        raise KeyError(
            f"params.yaml: split.protocol is {protocol!r} but there is no split.{protocol} section"
        )
    splits = make_splits(protocol, read_manifest(manifest), **cfg[protocol])
    digest = write_splits(out_dir / "splits.json", protocol, cfg[protocol], splits)
    typer.echo(f"{dataset}: {protocol} -> {len(splits)} splits, hash {digest[:12]}")


if __name__ == "__main__":
    typer.run(main)
