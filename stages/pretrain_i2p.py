"""Stage `pretrain_i2p`: Image2Prompt (IP-IQA's pretraining of the CLIP image tower) -> models/i2p/.

Writes one folder per registered encoder, ``models/i2p/<encoder>/i2p.json``, and, when ``i2p.enabled``,
the adapted tower ``models/i2p/clip/image_tower.safetensors``. Each ``extract@<ds>-<encoder>``
depends on its own encoder's folder only, so (re)training Image2Prompt re-extracts CLIP features
and nothing else; disabled, every record is constant. The pairs are ``i2p.pairs``: ``demo``
(synthetic pairs drawn from ``i2p.demo``, a draw apart from the evaluated demo set, as DiffusionDB
is apart from AGIQA-3k) or a CSV with columns ``path,prompt``. Like the datasets' label files, that
CSV and its images are read through params, not tracked as DVC deps: after editing them, rerun
with ``dvc repro -f pretrain_i2p``. The checkpoint lives in ``<out>.partial/`` (DVC deletes a
stage's outputs before running it), so a killed run resumes from its last finished epoch; one made by
other code or settings is set aside there (``checkpoint.pt.discarded-<time>``) and kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from pipeline.data import generate_demo
from pipeline.encoders import list_encoders
from pipeline.encoders.clip import build_clip_model
from pipeline.encoders.common import write_disabled
from pipeline.i2p import I2PConfig, pretrain_image2prompt, read_pairs
from stages import read_params, resolve_device, runtime

PARAMS = ("profile", "extract.clip", "i2p")


def demo_pairs(root: Path, cfg: dict) -> list[tuple[Path, str]]:
    manifest = generate_demo(root, **cfg)
    return [(root / path, prompt) for path, prompt in zip(manifest["path"], manifest["prompt"], strict=True)]


def main(out: Path) -> None:
    p = read_params(PARAMS)
    cfg = p["i2p"]
    scratch = out.with_name(out.name + ".partial")
    build = scratch / "out"
    shutil.rmtree(build, ignore_errors=True)
    for encoder in list_encoders():
        if encoder != "clip":
            write_disabled(build / encoder, encoder, "Image2Prompt adapts only the clip image tower")
    if not cfg["enabled"]:
        write_disabled(build / "clip", "clip", "i2p.enabled is false")
    else:
        if cfg["pairs"] == "demo":
            pairs = demo_pairs(scratch / "pairs", cfg["demo"])
        else:
            pairs = read_pairs(Path(cfg["pairs"]), cfg["images_root"] or None)
        settings = {"min_similarity": cfg["min_similarity"], "hflip": cfg["hflip"], "seed": cfg["seed"]}
        rt = runtime()
        record = pretrain_image2prompt(
            build_clip_model(p["extract.clip"], p["profile"]),
            pairs,
            I2PConfig(**cfg["recipe"], **settings),
            build / "clip",
            device=resolve_device(rt["device"]),
            checkpoint=scratch / "checkpoint.pt",
            num_workers=rt["num_workers"],
            on_epoch=lambda epoch, loss: typer.echo(f"epoch {epoch}: train loss {loss:.4f}"),
        )
        typer.echo(
            f"i2p: {record['pairs_kept']} of {record['pairs']} pairs, "
            f"loss {record['loss_before']:.4f} -> {record['loss_after']:.4f}, sha256 {record['sha256'][:12]}"
        )
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    build.replace(out)
    clean_scratch(scratch)


def clean_scratch(scratch: Path) -> None:
    """Remove the scratch folder, except checkpoints set aside (``*.discarded-*``): never delete training."""
    for entry in scratch.iterdir():
        if ".discarded-" not in entry.name:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if kept := sorted(entry.name for entry in scratch.iterdir()):
        typer.echo(f"kept {kept} in {scratch}: checkpoints set aside, delete them when no longer wanted")
    else:
        scratch.rmdir()


if __name__ == "__main__":
    typer.run(main)
