"""Stage `prepare@<dataset>`: data/raw/<dataset> -> data/<dataset>/{manifest.csv, bad_images.csv}.

Every dataset lives in data/raw/<dataset>/ (a folder or a symlink to one): its label file
(``data.<dataset>.labels``, relative to that folder) and its images. That folder is the stage's DVC
dep, so editing the labels or replacing an image re-runs it, while moving the data elsewhere and
re-pointing the symlink re-runs nothing. The manifest records each image's sha256, so downstream
stages depend on image content, never on where the images are. The demo's folder is drawn by the
generate_demo stage. The label file is validated before anything is written; the outputs are
written to a sibling ``.partial`` folder and renamed at the end, so a failed run leaves nothing
half-written.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.data import check_images, load_labels
from pipeline.data.labels import DATASET_GUIDES
from pipeline.provenance import built_beside
from stages import read_params

PARAMS = ("data.{dataset}",)
RAW = Path("data/raw")


def main(dataset: str, out_dir: Path) -> None:
    cfg = read_params(PARAMS, dataset=dataset)["data.{dataset}"]
    root = RAW / dataset
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder {root} does not exist: put (or symlink) the dataset there. "
            f"{DATASET_GUIDES.get(cfg['kind'], '')}".strip()
        )
    manifest = load_labels(cfg["kind"], root / cfg["labels"], **cfg.get("options", {}))
    good, bad = check_images(
        manifest, root, on_bad_image=cfg.get("on_bad_image", "error"), dataset=cfg["kind"]
    )
    with built_beside(out_dir) as building:
        good.to_csv(building / "manifest.csv", index=False)
        bad.to_csv(building / "bad_images.csv", index=False)
    typer.echo(f"{dataset}: {len(good)} images in manifest, {len(bad)} skipped (bad_images.csv)")


if __name__ == "__main__":
    typer.run(main)
