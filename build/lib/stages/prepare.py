"""Stage `prepare@<dataset>`: labels (+ images) -> data/<dataset>/{manifest.csv, bad_images.csv, source.json}.

The demo profile generates its images into data/<dataset>/images from a seed. Real datasets keep
their images where the user put them (``data.<dataset>.images``); a missing folder is an error
that says where the dataset goes and how to get it. Everything is written to a sibling
``.partial`` folder and renamed at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from pipeline.data import check_images, generate_demo, load_labels
from stages import read_params

PARAMS = ("data.{dataset}",)


def main(dataset: str, out_dir: Path) -> None:
    cfg = read_params(PARAMS, dataset=dataset)["data.{dataset}"]
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg["kind"] == "demo":
        manifest = generate_demo(
            tmp,
            seed=cfg["seed"],
            n_prompts=cfg["n_prompts"],
            images_per_prompt=cfg["images_per_prompt"],
            size=cfg["size"],
        )
        root, source_root = tmp, out_dir
    else:
        manifest = load_labels(cfg["kind"], Path(cfg["labels"]), **cfg.get("options", {}))
        root = source_root = Path(cfg["images"])
    good, bad = check_images(manifest, root, on_bad_image=cfg.get("on_bad_image", "error"))
    good.to_csv(tmp / "manifest.csv", index=False)
    bad.to_csv(tmp / "bad_images.csv", index=False)
    (tmp / "source.json").write_text(
        json.dumps({"dataset": dataset, "kind": cfg["kind"], "root": str(source_root)}, indent=2) + "\n"
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    typer.echo(f"{dataset}: {len(good)} images in manifest, {len(bad)} skipped (bad_images.csv)")


if __name__ == "__main__":
    typer.run(main)
